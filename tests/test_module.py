"""TransferModule behaviour not tied to one strategy: the non-finite guard."""

from __future__ import annotations

import pytest
import torch

from tlframe.module import NonFiniteLossError, TransferModule


def test_infinite_gradient_with_finite_loss_stops_before_the_update(synthetic_dm, trainer_factory):
    model = TransferModule("dtn", num_classes=10)
    model.head.classifier.weight.register_hook(lambda g: g * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"step 0 \(epoch 0\): the gradients \(loss terms finite: "
                                                 r"\{'train/loss_cls': [0-9.]+, 'train/loss': [0-9.]+\}\)"):
        trainer_factory(max_steps=2).fit(model, synthetic_dm())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_the_guard_can_be_turned_off(synthetic_dm, trainer_factory):
    model = TransferModule("dtn", num_classes=10, check_finite_loss=False)
    model.head.classifier.weight.register_hook(lambda g: g * float("inf"))
    trainer_factory(max_steps=1).fit(model, synthetic_dm())
    assert not torch.isfinite(model.head.classifier.weight).all()
