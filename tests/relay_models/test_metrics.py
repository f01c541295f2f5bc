"""Confusion-matrix metrics against hand counts."""

from __future__ import annotations

import math

import torch

from relay_models.metrics import ConfusionMatrix


def test_iou_by_hand():
    cm = ConfusionMatrix(3)
    labels = torch.tensor([[0, 0, 1, 1, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 0]])
    cm.update(pred, labels)
    # class 0: tp 1, fp 1 (a 2 predicted as 0), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3;
    # class 2: tp 0, fn 1 -> 0 (the ignored pixel's prediction does not count)
    assert torch.allclose(cm.iou(), torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert math.isclose(cm.miou(), (1 / 3 + 2 / 3 + 0) / 3)


def test_absent_classes_are_not_averaged():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    assert math.isnan(cm.iou()[3].item()) and cm.miou() == 1.0


def test_batches_add_exactly():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    x = torch.randint(0, 2, (4, 8, 8))
    y = torch.randint(0, 2, (4, 8, 8))
    a.update(x, y)
    for i in range(4):
        b.update(x[i], y[i])
    assert torch.equal(a.counts, b.counts)
