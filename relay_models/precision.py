"""Numeric precision of the forward pass: one option for inference and training.

``precision`` is ``auto``, ``fp32`` or ``bf16``. ``bf16`` runs the model under
``torch.autocast(device, torch.bfloat16)``: matmuls and convolutions in bfloat16, weights
kept in float32 (training keeps fp32 master weights and an fp32 optimiser). ``auto`` picks
bf16 where the hardware runs bf16 matmuls natively (:func:`native_bf16`) and fp32
elsewhere: on a CPU without bf16 instructions, PyTorch emulates bf16 matmuls and a forward
pass is many times *slower* than in fp32 (measured 9-27x on an AVX2-only AMD EPYC,
``docs/benchmarks.md``, "Speed"). What leaves the model (logits) is cast to float32 before
the softmax, and the tiled engine blends and accumulates in float32 whatever the precision.

Hosts of one machine kind differ (AVX2-only vs AVX512-BF16 CPUs), so ``auto`` means different
things on them. ``RELAYMAP_NATIVE_BF16=1`` (or ``0``) makes a CPU count as one with (or
without) native bf16 matmuls: what ``auto`` resolves to on the other kind of host, for
tests and for measuring; unset, the CPU's own flags decide.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from typing import Literal

import torch

#: ``auto``: bf16 autocast where bf16 matmuls are native (:func:`native_bf16`), else fp32.
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: Environment switch: ``1``/``0`` make the CPU count as having native bf16 matmuls or not.
NATIVE_BF16_ENV = "RELAYMAP_NATIVE_BF16"


@functools.cache
def _cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions.

    x86: the CPU capability flags PyTorch reads with cpuinfo
    (``torch._C._cpu._get_cpu_capability()``): ``amx_bf16`` (Sapphire Rapids and later,
    oneDNN's AMX kernels) or ``avx512_bf16`` (Cooper Lake, Zen 4 and later). oneDNN's own
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not used on x86: it is also true on
    AVX-512 CPUs without bf16 instructions, where oneDNN only emulates them. aarch64: that
    oneDNN check, which there tests the Arm BF16 extension (Neoverse V1/N2 and later).
    """
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        caps = torch._C._cpu._get_cpu_capability()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    mkldnn = torch.backends.mkldnn.is_available()
    return bool(mkldnn and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: a CUDA GPU that supports bf16
    (Ampere and later), or a CPU with bf16 instructions (:func:`_cpu_native_bf16`, unless
    :data:`NATIVE_BF16_ENV` says otherwise).

    Raises:
        ValueError: :data:`NATIVE_BF16_ENV` is set to something other than ``0`` or ``1``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        switch = os.environ.get(NATIVE_BF16_ENV, "").strip()
        if switch not in ("", "0", "1"):
            raise ValueError(f"{NATIVE_BF16_ENV} must be 0 or 1, got {switch!r}")
        return switch == "1" if switch else _cpu_native_bf16()
    return False


def resolve_precision(precision: Precision, device: torch.device | str) -> Literal["fp32", "bf16"]:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device``.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: Precision, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context to run a forward pass in: ``torch.autocast(device, bfloat16)`` when
    ``precision`` resolves to bf16 on ``device``, else a no-op."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
