"""The relay-token training loss (paper, "Training"), usable by every registered model.

``total = CE(local) + global_weight * CE(crop(global), avgpool(onehot(labels)))
          + consistency_weight * CE(crop(global), avgpool(softmax(local)))``

``crop`` keeps the global logits over the local window (:func:`geometry.global_crop`), at
``L/f x L/f``; ``avgpool`` pools ``f x f`` cells of the ``L x L`` local grid to the same size.
A cell with any ignored pixel (``ignore_index``, e.g. outside the scene) is left out of both
global terms. The consistency target is detached by default: it teaches the global branch
from the local one and never pulls the local prediction toward the coarser view (the
authors' code backpropagates through both: ``detach_consistency=False``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import global_crop
from .segmenter import RelayOutput


class LossTerms(NamedTuple):
    """The weighted total and its unweighted terms (0 when a term does not apply)."""

    total: torch.Tensor
    local: torch.Tensor
    global_: torch.Tensor
    consistency: torch.Tensor


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over ``valid`` cells of ``-sum_k target_k log softmax(logits)_k``.

    Args:
        logits: ``(B, K, h, w)``.
        target: ``(B, K, h, w)`` class distributions.
        valid: ``(B, h, w)`` bool.
    """
    per_cell = -(target * F.log_softmax(logits, dim=1)).sum(1)
    return (per_cell * valid).sum() / valid.sum().clamp(min=1)


class RelayLoss(nn.Module):
    """Local CE plus the global and consistency terms for two-window models.

    Args:
        factor: global/local side ratio of the windows the logits come from.
        global_weight: weight of the global CE term (paper: 0.1).
        consistency_weight: weight of the consistency term (paper: 0.1).
        detach_consistency: no gradient through the consistency target (the local side).
        ignore_index: label value that is never scored.
    """

    def __init__(
        self,
        *,
        factor: int = 4,
        global_weight: float = 0.1,
        consistency_weight: float = 0.1,
        detach_consistency: bool = True,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.factor = factor
        self.global_weight = global_weight
        self.consistency_weight = consistency_weight
        self.detach_consistency = detach_consistency
        self.ignore_index = ignore_index

    def forward(self, output: RelayOutput | torch.Tensor, labels: torch.Tensor) -> LossTerms:
        """``output``: a model's output; ``labels``: ``(B, L, L)`` int class ids of the local
        window. Plain logits (sliding window) and ``global_=None`` (registers) get local CE."""
        local_logits = output.local if isinstance(output, RelayOutput) else output
        global_logits = output.global_ if isinstance(output, RelayOutput) else None
        labels = labels.long()
        ignored = labels == self.ignore_index
        n_valid = (~ignored).sum().clamp(min=1)
        local = (
            F.cross_entropy(local_logits, labels, ignore_index=self.ignore_index, reduction="sum")
            / n_valid
        )
        zero = local.new_zeros(())
        if global_logits is None:
            return LossTerms(local, local, zero, zero)

        f, k = self.factor, local_logits.shape[1]
        rows, cols = global_crop(global_logits.shape[-1], f)
        crop = global_logits[..., rows, cols]  # B, K, L/f, L/f
        valid = F.avg_pool2d(ignored.unsqueeze(1).float(), f)[:, 0] == 0  # B, L/f, L/f
        onehot = F.one_hot(labels.masked_fill(ignored, 0), k).permute(0, 3, 1, 2).float()
        glob = soft_cross_entropy(crop, F.avg_pool2d(onehot, f), valid)
        target = local_logits.detach() if self.detach_consistency else local_logits
        pooled_local = F.avg_pool2d(target.softmax(1), f)
        cons = soft_cross_entropy(crop, pooled_local, valid)
        total = local + self.global_weight * glob + self.consistency_weight * cons
        return LossTerms(total, local, glob, cons)
