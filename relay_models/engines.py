"""Inference engines: what runs a model's forward pass on a batch of tiles.

Why more than one: PyTorch runs everything this package does (training, bf16 autocast,
GPUs), but on a CPU the same fp32 forward pass runs faster in ONNX Runtime, whose CPU
kernels fuse what eager PyTorch dispatches op by op (``bench/speed.py``,
``docs/benchmarks.md``, "Speed"). Which one wins depends on the host, so the choice is
data (:data:`ENGINES`, :func:`resolve_engine`), and the tiled engine of
:mod:`relay_models.inference` takes either behind one callable, :class:`TileEngine`:

    ``engine(local, global_) -> (N, K, L, L)`` float32 class probabilities of the local
    windows, on the CPU (``global_`` is ``None`` for a model without a global window).

* :class:`TorchEngine`: the model itself, in ``precision`` (:mod:`relay_models.precision`),
  on any device.
* :class:`OnnxEngine`: an ONNX Runtime session (CPU execution provider, fp32) of the graph
  :func:`export_onnx` made from the model: the local branch's softmax, one input per
  window (``local``, and ``global`` where the model takes two; the exporter drops a window
  the model never reads), a dynamic batch axis and the tile side fixed at export (the
  backbones' window arithmetic is traced as constants).

Storage is the caller's business: :func:`export_onnx` returns bytes and
:class:`OnnxEngine` takes bytes or a local path (``relaymap.flows`` caches the export
beside the weights, keyed by their digest).
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Literal

import numpy as np
import torch
from torch import nn

from .precision import Precision, autocast, native_bf16, resolve_precision
from .spec import DataSpec

#: ``auto``: :func:`resolve_engine`'s rule; ``torch``; ``onnxruntime`` (fp32, CPU).
Engine = Literal["auto", "torch", "onnxruntime"]
ENGINES: tuple[str, ...] = ("auto", "torch", "onnxruntime")

#: Largest probability difference an export may show against the model on its check batch
#: (fp32 both; kernels differ in summation order only: measured ~1e-7).
EXPORT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The model could not be exported to ONNX, or its export does not compute the model."""


def resolve_engine(
    engine: Engine, precision: Precision, device: torch.device | str
) -> Literal["torch", "onnxruntime"]:
    """``torch`` or ``onnxruntime``: what ``engine`` means for ``precision`` on ``device``.

    The ``auto`` rule, from ``bench/speed.py`` (``docs/benchmarks.md``, "Speed"): on a CPU,
    ONNX Runtime fp32 unless ``precision`` is ``bf16`` (then PyTorch bf16); on a CUDA
    device, PyTorch (in ``precision``). On CPUs ONNX Runtime fp32 ran the forward pass
    faster than PyTorch in fp32 *and* in bf16, on a CPU with native bf16 (AVX512-BF16)
    too: ``swinv2_small_relay`` at 256 px 2.4x PyTorch fp32's tiles per CPU second and
    2.7x bf16's, ``swinv2_nano_relay`` at 64 px 14x and 6x. So ``precision: auto`` (bf16
    where native) is what PyTorch runs at; with ``engine: auto`` a CPU runs ONNX Runtime.

    Raises:
        ValueError: an unknown engine, ``onnxruntime`` on a non-CPU device, or
            ``onnxruntime`` with ``precision="bf16"`` (ONNX Runtime runs the fp32 export).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    device = torch.device(device)
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(
                f"engine onnxruntime runs on CPUs (its CPU execution provider), not on "
                f"{device.type}; use engine torch or auto there"
            )
        if precision == "bf16":
            raise ValueError("engine onnxruntime runs fp32: use precision fp32 or auto")
        return "onnxruntime"
    if engine == "torch" or device.type != "cpu" or precision == "bf16":
        return "torch"
    return "onnxruntime"


def auto_rule(device: torch.device | str = "cpu") -> str:
    """The ``auto`` engine and precision on ``device``, as words (for logs and benches)."""
    engine = resolve_engine("auto", "auto", device)
    precision = "fp32" if engine == "onnxruntime" else resolve_precision("auto", device)
    bf16 = "native bf16" if native_bf16(device) else "no native bf16"
    return f"{engine} {precision} ({torch.device(device).type}, {bf16})"


class TileEngine:
    """One forward pass over a batch of tiles (see the module docstring); ``spec`` is the
    model's data contract."""

    spec: DataSpec
    #: What runs, for logs: ``torch fp32``, ``onnxruntime fp32`` ...
    name: str

    def __call__(self, local: torch.Tensor, global_: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, L, L)`` float32 normalised windows -> ``(N, K, L, L)`` float32
        probabilities of the local windows, on the CPU."""
        raise NotImplementedError


@torch.inference_mode()
def predict_tiles(
    model: nn.Module, local: torch.Tensor, global_: torch.Tensor | None = None
) -> torch.Tensor:
    """Class probabilities ``(N, K, L, L)`` float32 of the local windows (local branch)."""
    return model.predict_local(local, global_).float().softmax(1)


class TorchEngine(TileEngine):
    """The model's own forward pass (:func:`predict_tiles`) on
    ``device`` (default: the model's), under ``precision``'s autocast."""

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str | None = None,
        precision: Precision = "auto",
    ) -> None:
        self.model, self.spec, self.precision = model, model.spec, precision
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.name = f"torch {resolve_precision(precision, self.device)}"

    def __call__(self, local: torch.Tensor, global_: torch.Tensor | None = None) -> torch.Tensor:
        local = local.to(self.device)
        global_ = None if global_ is None else global_.to(self.device)
        with autocast(self.precision, self.device):
            return predict_tiles(self.model, local, global_).float().cpu()


class OnnxEngine(TileEngine):
    """An ONNX Runtime session of an :func:`export_onnx` graph, on the CPU, in fp32.

    Args:
        model: the ONNX graph (bytes) or a local path to it.
        spec: the model's data contract (saved with its weights; the graph has none).
        threads: ONNX Runtime's intra-op threads: the CPUs this process may use (a Ray
            actor's share of its node); default ``torch.get_num_threads()``, which Ray sets
            to an actor's CPUs as well.
    """

    name = "onnxruntime fp32"

    def __init__(self, model: bytes | str, spec: DataSpec, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1  # one graph at a time: no parallel branches to run
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.spec = spec
        #: The graph's inputs: the model's windows, less one it never reads (a
        #: ``_downsample`` model's graph has ``global`` alone).
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tile_px = self.session.get_inputs()[0].shape[-1]
        windows = ["local", "global"] if spec.takes_global else ["local"]
        if not self.inputs or not set(self.inputs) <= set(windows):
            raise ExportError(f"the ONNX graph takes {self.inputs}; this model has {windows}")

    def __call__(self, local: torch.Tensor, global_: torch.Tensor | None = None) -> torch.Tensor:
        if local.shape[-1] != self.tile_px:
            raise ValueError(
                f"this ONNX export runs {self.tile_px} px tiles, got {local.shape[-1]} px: "
                f"export the model for that tile size"
            )
        if self.spec.takes_global and global_ is None:
            raise ValueError("this model takes a global window: global_ is required")
        windows = {"local": local, "global": global_}
        feed = {name: _numpy(windows[name]) for name in self.inputs}
        return torch.from_numpy(self.session.run(["probs"], feed)[0])


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def as_engine(
    model: nn.Module | TileEngine,
    device: torch.device | str | None = None,
    precision: Precision = "auto",
) -> TileEngine:
    """``model`` as a :class:`TileEngine`: an engine as it is (``device`` and ``precision``
    are then the engine's own), a module as a :class:`TorchEngine`."""
    if isinstance(model, TileEngine):
        return model
    return TorchEngine(model, device=device, precision=precision)


class _Probabilities(nn.Module):
    """What an export computes: the local branch's class probabilities, float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, local: torch.Tensor, global_: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.predict_local(local, global_).float().softmax(1)


def export_onnx(model: nn.Module, tile_px: int | None = None) -> bytes:
    """``model`` (any family: one window or two) as an ONNX graph for :class:`OnnxEngine`,
    checked against the model itself.

    PyTorch's TorchScript exporter (``dynamo=False``, needs the ``onnx`` package): the
    ``torch.export`` one (``dynamo=True``, the default since PyTorch 2.9, needs
    ``onnxscript``) cannot translate the Swin V2 windows' 5-D attention and took 26x as
    long on ``swinv2_nano_relay`` once that was made 4-D (383 s against 14.5 s).

    Args:
        model: a model from ``create_model``, in eval mode (a copy is exported where its
            weights are not fp32 on the CPU).
        tile_px: tile side L the graph runs (default ``spec.window_px``); the batch axis is
            dynamic.

    Returns:
        The graph as bytes: inputs ``local`` (and ``global``), ``(N, C, L, L)`` float32;
        output ``probs``, ``(N, K, L, L)`` float32.

    Raises:
        ExportError: the exporter failed, or the export's probabilities differ from the
            model's by more than :data:`EXPORT_TOLERANCE` on a random check batch.
    """
    spec: DataSpec = model.spec
    tile_px = tile_px or spec.window_px
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu()
    model.eval()
    names = ["local", "global"] if spec.takes_global else ["local"]
    g = torch.Generator().manual_seed(1)
    example = tuple(torch.randn(2, spec.in_chans, tile_px, tile_px, generator=g) for _ in names)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # TracerWarnings (shapes traced as constants: the tile side is fixed on purpose)
            # and the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Probabilities(model).eval(),  # the exporter restores this mode afterwards
                example,
                buf,
                input_names=names,
                output_names=["probs"],
                dynamic_axes={n: {0: "batch"} for n in [*names, "probs"]},
                dynamo=False,
            )
    except Exception as e:  # the exporter's errors have no common base: all are reported
        raise ExportError(f"ONNX export of {_name(model)} failed: {type(e).__name__}: {e}") from e
    data = buf.getvalue()
    _check_export(model, data, names, tile_px)
    return data


def _name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name", type(model).__name__)


def _check_export(model: nn.Module, data: bytes, names: list[str], tile_px: int) -> None:
    """The export computes the model: three random tiles (a batch size the trace never
    saw), fp32 both."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, model.spec.in_chans, tile_px, tile_px, generator=g) for _ in names]
    ref = TorchEngine(model, device="cpu", precision="fp32")(*x)
    got = OnnxEngine(data, model.spec, threads=torch.get_num_threads())(*x)
    err = float((got - ref).abs().max())
    if not err <= EXPORT_TOLERANCE:  # NaN fails too
        raise ExportError(
            f"the ONNX export of {_name(model)} differs from the model by {err:.2g} in "
            f"probability (tolerance {EXPORT_TOLERANCE:g})"
        )
