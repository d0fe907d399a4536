"""FineTune / FrozenFeatures: what trains, what stays frozen, which LRs, and resume."""

from __future__ import annotations

import pytest
import torch

from tlframe.backbones import backbone_stages
from tlframe.module import TransferModule
from tlframe.strategies import DANN, MMD, FineTune, FrozenFeatures


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, prefix: str) -> dict[str, bool]:
    return {k: not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)}


def test_frozen_features_trains_only_the_head(synthetic_dm, trainer_factory):
    model = TransferModule("dtn", num_classes=10, strategy=FrozenFeatures(), lr=0.05)
    before = snapshot(model)
    trainer_factory(max_steps=3).fit(model, synthetic_dm())
    after = snapshot(model)
    backbone = changed(before, after, "backbone.")
    assert backbone and not any(backbone.values()), "backbone weights or BN running stats changed"
    assert any("running_mean" in k for k in backbone)  # BN statistics were really compared
    head = changed(before, after, "head.")
    assert head["head.classifier.weight"] and head["head.bottleneck.0.weight"]
    assert head["head.bottleneck.1.running_mean"]  # the head's BN does train
    assert all(not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("strategy", [FineTune(backbone_lr_mult=1.0), DANN(backbone_lr_mult=1.0), MMD(backbone_lr_mult=1.0)],
                         ids=["finetune", "dann", "mmd"])
def test_full_strategies_train_backbone_and_head(strategy, synthetic_dm, trainer_factory):
    model = TransferModule("dtn", num_classes=10, strategy=strategy)
    before = snapshot(model)
    trainer_factory(max_steps=3).fit(model, synthetic_dm())
    after = snapshot(model)
    for prefix in ("backbone.stages.0.0.weight", "backbone.stages.2.1.running_mean", "head.classifier.weight"):
        assert changed(before, after, prefix)[prefix], prefix
    if isinstance(strategy, DANN):
        assert changed(before, after, "strategy.discriminator.0.weight")["strategy.discriminator.0.weight"]


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {}),
    ("convnext_atto", {}),
    ("vit_tiny_patch16_224", {"img_size": 32}),
])
def test_freeze_first_n_stages_freezes_exactly_those(name, kwargs, synthetic_dm, trainer_factory):
    n = 2
    model = TransferModule(name, num_classes=10, backbone_kwargs=kwargs, strategy=FineTune(freeze_stages=n), lr=0.05)
    stages = backbone_stages(model.backbone)
    frozen = {f"backbone.{p}" for s in stages[:n] for p in s}
    trained = {f"backbone.{p}" for s in stages[n:] for p in s}
    frozen_buffers = {f"backbone.{b}" for b, _ in model.backbone.named_buffers()
                      if any(b.rsplit(".", 1)[0] + ".weight" in s for s in stages[:n])}
    before = snapshot(model)
    trainer_factory(max_steps=2).fit(model, synthetic_dm(batch_size=4))
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in frozen | frozen_buffers)
    moved = [k for k in trained if not torch.equal(before[k], after[k])]
    assert len(moved) > 0.5 * len(trained), f"only {len(moved)}/{len(trained)} later-stage tensors changed"
    params = dict(model.named_parameters())
    assert all(not params[k].requires_grad for k in frozen) and all(params[k].requires_grad for k in trained)
    if name == "resnet18":
        assert frozen_buffers, "BN running stats of frozen stages were not checked"


def test_param_group_lrs_follow_multipliers(synthetic_dm, trainer_factory):
    strategy = DANN(backbone_lr_mult=0.1, head_lr_mult=1.0, discriminator_lr_mult=0.5, layer_decay=0.5)
    model = TransferModule("dtn", num_classes=10, strategy=strategy, lr=0.02)
    trainer = trainer_factory(max_steps=1)
    trainer.fit(model, synthetic_dm())
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    decay = (1 + 0.001 * 1) ** -0.75  # one scheduler step of the inverse-decay schedule
    expected = {"head": 0.02, "backbone.stage0": 0.02 * 0.1 * 0.25, "backbone.stage1": 0.02 * 0.1 * 0.5,
                "backbone.stage2": 0.02 * 0.1, "discriminator": 0.01}
    assert set(groups) == set(expected)
    for name, lr in expected.items():
        assert groups[name]["lr"] == pytest.approx(lr * decay), name
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))


def test_custom_optimizer_and_scheduler_keep_multipliers(synthetic_dm, trainer_factory):
    from functools import partial

    model = TransferModule("dtn", num_classes=10, strategy=FineTune(backbone_lr_mult=0.1),
                           optimizer=partial(torch.optim.AdamW, lr=1e-3),
                           scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=100))
    trainer = trainer_factory(max_steps=1)
    trainer.fit(model, synthetic_dm())
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)
    assert lrs == pytest.approx({"head": 1e-3, "backbone": 1e-4})


def _unfreeze_state(model: TransferModule, trainer) -> dict:
    frozen = model.strategy.frozen_stages(model.progress)
    return {"frozen_stages": frozen,
            "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups],
            "state": snapshot(model)}


def test_gradual_unfreezing_same_after_resume(synthetic_dm, trainer_factory, tmp_path):
    def make():
        torch.manual_seed(0)
        return TransferModule("dtn", num_classes=10, lr=0.05,
                              strategy=FineTune(freeze_stages=3, unfreeze_every=2, unfreeze_unit="step",
                                                layer_decay=0.5))

    def seeded_fit(model, ckpt_path=None, **kw):
        torch.manual_seed(0)
        trainer = trainer_factory(**kw)
        trainer.fit(model, synthetic_dm(iters_per_epoch=3), ckpt_path=ckpt_path)
        return trainer

    full = make()
    t_full = seeded_fit(full, max_steps=6)
    first = make()
    t_first = seeded_fit(first, max_steps=3)
    t_first.save_checkpoint(tmp_path / "mid.ckpt")
    assert first.strategy.frozen_stages(first.progress) == 2  # one stage released at step 2
    resumed = make()
    t_res = seeded_fit(resumed, ckpt_path=str(tmp_path / "mid.ckpt"), max_steps=6)
    a, b = _unfreeze_state(full, t_full), _unfreeze_state(resumed, t_res)
    assert a["frozen_stages"] == b["frozen_stages"] == 0
    assert a["lrs"] == pytest.approx(b["lrs"])
    # the stem was frozen for steps 0..5 (released at step 6): unchanged in both runs
    stem = "backbone.stages.0.0.weight"
    init = snapshot(make())
    assert torch.equal(a["state"][stem], init[stem]) and torch.equal(b["state"][stem], init[stem])
    # the last stage trained from the start in both runs
    last = "backbone.stages.2.0.weight"
    assert not torch.equal(a["state"][last], init[last]) and not torch.equal(b["state"][last], init[last])
