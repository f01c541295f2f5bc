"""train_step and evaluate: plain PyTorch on the CPU, no Ray."""

from __future__ import annotations

import pytest
import torch

from relay_models import ConfusionMatrix, RelayLoss, create_model, evaluate, train_step


def _batch(n=4, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, side, side, generator=g) > 0.5).long()
    local = labels[:, None].float().repeat(1, 2, 1, 1) + 0.1 * torch.randn(
        n, 2, side, side, generator=g
    )
    labels[:, :2] = 255  # some ignored pixels
    return {"local": local, "global": local.clone(), "labels": labels}


@pytest.mark.parametrize("name", ["swinv2_nano_relay", "swinv2_nano"])
def test_train_step_learns_a_fixed_batch(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_chans=2)
    batch = _batch()
    if not model.takes_global:
        del batch["global"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = RelayLoss(factor=4)
    first = train_step(model, batch, loss_fn, opt)
    for _ in range(15):
        last = train_step(model, batch, loss_fn, opt)
    assert not first.total.requires_grad
    assert last.total < 0.5 * first.total


def test_gradients_are_clipped():
    torch.manual_seed(0)
    model = create_model("swinv2_nano", num_classes=2, in_chans=2)
    batch = _batch()
    del batch["global"]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, batch, RelayLoss(), opt, grad_clip=1e-3)
    step = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert 0 < step.norm() <= 1e-3 * (1 + 1e-4)  # SGD step = lr x clipped gradient


def test_evaluate_counts_the_local_predictions():
    torch.manual_seed(0)
    model = create_model("swinv2_nano_relay", num_classes=2, in_chans=2).train()
    batches = [_batch(seed=s) for s in range(2)]
    cm = evaluate(model, batches, 2)
    assert model.training  # mode restored
    ref = ConfusionMatrix(2)
    with torch.no_grad():
        model.eval()
        for b in batches:
            ref.update(model(b["local"], b["global"]).local.argmax(1), b["labels"])
    assert torch.equal(cm.counts, ref.counts)
    assert cm.counts.sum() == sum(int((b["labels"] != 255).sum()) for b in batches)
