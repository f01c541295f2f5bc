"""RelayLoss against hand-computed values (K = 2, L = 4, factor = 2: a 2x2 crop)."""

from __future__ import annotations

import math

import pytest
import torch

from relay_models import RelayLoss, RelayOutput

LN2 = math.log(2)


def _logits(values):
    """(1, 2, h, w) logits whose class-1 minus class-0 margin is ``values``."""
    v = torch.tensor(values, dtype=torch.float32)
    return torch.stack([torch.zeros_like(v), v]).unsqueeze(0)


LABELS = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 255], [1, 1, 0, 0], [1, 0, 0, 0]]])


def _ce(margin, label):
    """CE of a two-class pixel with logit margin (class 1 - class 0)."""
    return math.log1p(math.exp(-margin)) if label == 1 else math.log1p(math.exp(margin))


class TestRelayLoss:
    def test_zero_logits(self):
        """Every CE of a uniform prediction is log 2, whatever the (soft) target."""
        out = RelayOutput(_logits([[0.0] * 4] * 4), _logits([[0.0] * 4] * 4))
        terms = RelayLoss(factor=2)(out, LABELS)
        assert terms.local.item() == pytest.approx(LN2)
        assert terms.global_.item() == pytest.approx(LN2)
        assert terms.consistency.item() == pytest.approx(LN2)
        assert terms.total.item() == pytest.approx(1.2 * LN2)

    def test_local_ce_skips_ignored_pixels(self):
        margins = [
            [1.0, -2.0, 0.5, 3.0],
            [0.0, 1.0, -1.0, 9.0],
            [2.0, 2.0, -3.0, 0.0],
            [1.0, 1.0, 1.0, -1.0],
        ]
        expected = [
            _ce(margins[i][j], int(LABELS[0, i, j]))
            for i in range(4)
            for j in range(4)
            if LABELS[0, i, j] != 255
        ]
        terms = RelayLoss(factor=2)(_logits(margins), LABELS)  # plain logits: local CE only
        assert terms.local.item() == pytest.approx(sum(expected) / 15)
        assert terms.total.item() == pytest.approx(terms.local.item())
        assert terms.global_.item() == 0 and terms.consistency.item() == 0

    def test_global_ce_on_cropped_logits_and_pooled_labels(self):
        # global crop = rows/cols 1:3 of the 4x4 global logits; label cells (2x2 pixels):
        #   top-left 0% class 1, top-right has an ignored pixel (masked),
        #   bottom-left 75% class 1, bottom-right 0% class 1
        g = [[9.0] * 4, [9.0, 1.0, -5.0, 9.0], [9.0, 2.0, -1.0, 9.0], [9.0] * 4]
        out = RelayOutput(_logits([[0.0] * 4] * 4), _logits(g))
        terms = RelayLoss(factor=2)(out, LABELS)

        def soft_ce(margin, p1):
            return p1 * _ce(margin, 1) + (1 - p1) * _ce(margin, 0)

        expected = (soft_ce(1.0, 0.0) + soft_ce(2.0, 0.75) + soft_ce(-1.0, 0.0)) / 3
        assert terms.global_.item() == pytest.approx(expected, rel=1e-6)
        # consistency: pooled softmax of zero local logits is 0.5 everywhere
        expected_cons = (soft_ce(1.0, 0.5) + soft_ce(2.0, 0.5) + soft_ce(-1.0, 0.5)) / 3
        assert terms.consistency.item() == pytest.approx(expected_cons, rel=1e-6)

    def test_weights_and_detached_consistency_target(self):
        local = _logits([[1.0, -1.0, 2.0, 0.0]] * 4).requires_grad_()
        glob = _logits([[0.5] * 4] * 4).requires_grad_()
        loss = RelayLoss(factor=2, global_weight=0.0, consistency_weight=1.0)
        terms = loss(RelayOutput(local, glob), torch.zeros(1, 4, 4, dtype=torch.long))
        assert terms.total.item() == pytest.approx(terms.local.item() + terms.consistency.item())
        terms.consistency.backward()
        assert local.grad is None  # the local branch is the teacher, never the student
        assert glob.grad.abs().sum() > 0

    def test_registers_output_gets_local_ce_only(self):
        out = RelayOutput(_logits([[0.0] * 4] * 4), None)
        terms = RelayLoss(factor=2)(out, LABELS)
        assert terms.total.item() == pytest.approx(LN2)

    def test_all_ignored_is_zero_not_nan(self):
        out = RelayOutput(_logits([[1.0] * 4] * 4), _logits([[1.0] * 4] * 4))
        terms = RelayLoss(factor=2)(out, torch.full((1, 4, 4), 255))
        assert terms.total.item() == 0.0
