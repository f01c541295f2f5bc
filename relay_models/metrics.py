"""Exact segmentation metrics from a confusion matrix (summable across workers)."""

from __future__ import annotations

import torch


class ConfusionMatrix:
    """``K x K`` counts of (label, prediction), ignoring ``ignore_index``.

    Counts are int64 so they add exactly across batches and, with :meth:`all_reduce`,
    across distributed workers.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``(B, H, W)`` predicted and true class ids."""
        keep = labels != self.ignore_index
        idx = labels[keep].long().cpu() * self.num_classes + pred[keep].long().cpu()
        self.counts += torch.bincount(idx, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    def all_reduce(self) -> None:
        """Sum the counts over all workers (no-op outside ``torch.distributed``)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.counts)

    def iou(self) -> torch.Tensor:
        """Per-class IoU ``(K,)`` float64; NaN for a class absent from labels and predictions."""
        tp = self.counts.diag().double()
        union = self.counts.sum(0).double() + self.counts.sum(1).double() - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        """Mean IoU over the classes that occur (in labels or predictions)."""
        iou = self.iou()
        present = ~torch.isnan(iou)
        return float(iou[present].mean()) if present.any() else float("nan")
