"""Pictures of how good a model or a map is: confusion matrices, per-class IoU bars and
learning curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from relay_models import ConfusionMatrix


def scores(cm: ConfusionMatrix, names: Sequence[str]) -> dict:
    """Overall accuracy, mean IoU and per-class IoU / F1 / support of a confusion matrix
    (rows: labels, columns: predictions); classes absent from labels and predictions get
    ``None``."""
    counts = cm.counts.double()
    tp = counts.diag()
    labelled, predicted = counts.sum(1), counts.sum(0)
    union = labelled + predicted - tp
    per_class = {}
    for k, name in enumerate(names):
        seen = bool(union[k] > 0)
        per_class[name] = {
            "iou": float(tp[k] / union[k]) if seen else None,
            "f1": float(2 * tp[k] / (labelled[k] + predicted[k])) if seen else None,
            "support": int(labelled[k]),
        }
    total = float(counts.sum())
    ious = [c["iou"] for c in per_class.values() if c["iou"] is not None]
    return {
        "overall_accuracy": float(tp.sum() / total) if total else None,
        "miou": float(np.mean(ious)) if ious else None,
        "pixels": int(total),
        "classes": per_class,
        "confusion_matrix": cm.counts.tolist(),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: ConfusionMatrix, names: Sequence[str], path: str | Path) -> None:
    """Row-normalised confusion matrix (labels down, predictions across) with counts."""
    plt = _pyplot()
    counts = cm.counts.numpy()
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{counts[i, j]}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    ax.set_title("confusion matrix (row-normalised colour, counts)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_iou(per_class: Mapping[str, Mapping], path: str | Path) -> None:
    """Per-class IoU bars (classes never seen are left out)."""
    plt = _pyplot()
    names = [n for n, c in per_class.items() if c.get("iou") is not None]
    values = [per_class[n]["iou"] for n in names]
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(names), 3.2), dpi=100)
    ax.bar(names, values, color="#2B6FD3")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title("per-class IoU")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_learning_curve(history: Sequence[Mapping], path: str | Path) -> None:
    """Training loss per report and validation mIoU per check, against the step."""
    plt = _pyplot()
    steps = [h["step"] for h in history if "loss" in h]
    loss = [h["loss"] for h in history if "loss" in h]
    val = [(h["step"], h["val_miou"]) for h in history if "val_miou" in h]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, loss, color="#C2473B", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if val:
        right = ax.twinx()
        right.plot(*zip(*val, strict=True), "o-", color="#1F6F2B", label="validation mIoU")
        right.set_ylim(0, 1)
        right.set_ylabel("validation mIoU")
        right.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("learning curve")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
