"""One optimisation step and one evaluation pass: plain PyTorch, no Ray, no I/O.

The Ray Train worker (``relaymap.flows.train``) only wires data, model, checkpoints and reports
around these; they run as they are on a laptop, in a notebook or in a unit test.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .losses import LossTerms, RelayLoss
from .metrics import ConfusionMatrix
from .precision import Precision, autocast
from .segmenter import RelayOutput


def warmup_cosine(step: int, steps: int, lr: float, warmup_frac: float) -> float:
    """Learning rate at ``step`` (0-based) of ``steps``: linear warm-up over the first
    ``warmup_frac`` of the steps to ``lr``, then a half cosine down to 0 at the last step."""
    warmup = math.ceil(warmup_frac * steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> RelayOutput | torch.Tensor:
    """``model(local, global)`` when the batch has a global window, else ``model(local)``."""
    if "global" in batch:
        return model(batch["local"], batch["global"])
    return model(batch["local"])


def _float32(out: RelayOutput | torch.Tensor) -> RelayOutput | torch.Tensor:
    """Logits as float32 (a bf16 forward pass returns bf16 logits): the loss, its softmax
    and its reductions run in full precision."""
    if isinstance(out, RelayOutput):
        return RelayOutput(*(None if t is None else t.float() for t in out))
    return out.float()


def train_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_fn: RelayLoss,
    optimizer: torch.optim.Optimizer,
    *,
    grad_clip: float | None = 1.0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> LossTerms:
    """Forward, loss, backward, gradient clipping and one optimiser step.

    Args:
        model: the model (or its DDP wrapper), in train mode.
        batch: ``local`` (and ``global``) ``(B, C, L, L)`` float32, ``labels`` ``(B, L, L)``
            int64 with 255 = ignore, on the model's device.
        loss_fn: the paper's loss.
        optimizer: steps the model's parameters.
        grad_clip: max gradient norm; None: no clipping.
        autocast: the forward pass's precision context, e.g.
            :func:`relay_models.precision.autocast` (``torch.autocast(device, bfloat16)``
            on hardware with native bf16, the weights, gradients and optimiser state
            staying float32); None: full precision. The loss is computed on float32
            logits either way.

    Returns:
        The loss terms, detached (call ``.item()`` only when logging: it syncs a GPU).
    """
    with autocast or contextlib.nullcontext():
        out = forward(model, batch)
    terms = loss_fn(_float32(out), batch["labels"])
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return LossTerms(*(t.detach() for t in terms))


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    precision: Precision = "fp32",
) -> ConfusionMatrix:
    """Confusion matrix of the local predictions over ``batches`` (this process only; call
    :meth:`ConfusionMatrix.all_reduce` to sum over distributed workers), the forward pass
    in ``precision`` (:mod:`relay_models.precision`). Leaves the model in the mode it found
    it in."""
    cm = ConfusionMatrix(num_classes)
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(precision, device):
            out = forward(model, batch)
        logits = out.local if isinstance(out, tuple) else out
        cm.update(logits.argmax(1), batch["labels"])
    model.train(was_training)
    return cm
