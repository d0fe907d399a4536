"""DANN and MMD: gradient reversal in the model, resume, mixed precision, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tlframe.losses import domain_adversarial_loss, warm_start_coefficient
from tlframe.module import TransferModule
from tlframe.strategies import DANN, MMD, FineTune, FrozenFeatures, Progress, TransferStep


def test_feature_extractor_gradient_is_reversed_and_scaled():
    torch.manual_seed(0)
    model = TransferModule("dtn", num_classes=10, strategy=DANN()).eval()
    x_s, x_t = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    step = 1000
    coeff = warm_start_coefficient(step)
    params = [p for p in model.backbone.parameters()]

    def features():
        (z_s, f_s, g_s), (z_t, f_t, g_t) = model._forward_domains(x_s, x_t)
        return TransferStep(z_s=z_s, f_s=f_s, logits_s=g_s, y_s=torch.zeros(6, dtype=torch.long),
                            progress=Progress(step, 0), z_t=z_t, f_t=f_t, logits_t=g_t)

    out = model.strategy.compute(features())
    assert out.logs["grl_coeff"] == pytest.approx(0.46211715726)
    reversed_grads = torch.autograd.grad(out.losses["adv"], params)
    s = features()
    d = model.strategy.discriminator(torch.cat([s.f_s, s.f_t]))
    plain, _ = domain_adversarial_loss(d[:6], d[6:])
    plain_grads = torch.autograd.grad(plain, params)
    for g_rev, g in zip(reversed_grads, plain_grads):
        assert torch.allclose(g_rev, -coeff * g, atol=1e-7, rtol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in plain_grads)
    # the discriminator itself gets the plain (not reversed) gradient
    d_rev = torch.autograd.grad(model.strategy.compute(features()).losses["adv"], model.strategy.discriminator[0].weight)[0]
    d_plain = torch.autograd.grad(domain_adversarial_loss(*torch.split(
        model.strategy.discriminator(torch.cat([s.f_s, s.f_t]).detach()), 6))[0], model.strategy.discriminator[0].weight)[0]
    assert torch.allclose(d_rev, d_plain, atol=1e-7)


class StepRecorder(pl.Callback):
    def __init__(self):
        self.rows = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[trainer.global_step] = (float(trainer.callback_metrics["train/grl_coeff"]),
                                          [g["lr"] for g in trainer.optimizers[0].param_groups])


def test_dann_resume_gives_same_coefficient_and_lr_at_every_later_step(synthetic_dm, trainer_factory, tmp_path):
    def fit(max_steps, ckpt_path=None):
        torch.manual_seed(0)
        model = TransferModule("dtn", num_classes=10, strategy=DANN(grl_max_steps=5))
        rec = StepRecorder()
        trainer = trainer_factory(max_steps=max_steps, callbacks=[rec])
        trainer.fit(model, synthetic_dm(iters_per_epoch=4), ckpt_path=ckpt_path)
        return trainer, rec

    _, full = fit(10)
    first, _ = fit(6)  # stops mid-epoch (4 batches per epoch)
    first.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed = fit(10, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert sorted(resumed.rows) == list(range(7, 11))
    for step, (coeff, lrs) in resumed.rows.items():
        assert coeff == pytest.approx(full.rows[step][0]) and lrs == pytest.approx(full.rows[step][1]), step
        assert coeff == pytest.approx(warm_start_coefficient(step - 1, max_steps=5))


@pytest.mark.parametrize("strategy_cls, bn_policy", [
    (FineTune, "joint"), (FrozenFeatures, "joint"), (DANN, "joint"), (DANN, "separate"), (MMD, "joint"), (MMD, "separate"),
])  # source-only strategies never forward the target, so their BN policy has no effect
def test_bf16_mixed_fit_runs_every_strategy(strategy_cls, bn_policy, synthetic_dm, trainer_factory):
    model = TransferModule("dtn", num_classes=10, strategy=strategy_cls(bn_policy=bn_policy))
    trainer = trainer_factory(max_steps=2, precision="bf16-mixed", limit_val_batches=1)
    trainer.fit(model, synthetic_dm(iters_per_epoch=2))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/target_acc"]) <= 1.0
    if strategy_cls is DANN:
        assert torch.isfinite(metrics["train/loss_adv"]) and "train/domain_acc" in metrics
    if strategy_cls is MMD:
        assert torch.isfinite(metrics["train/loss_mmd"])


@pytest.mark.parametrize("name", ["finetune", "frozen", "dann", "mmd", "frozen_cached"])
def test_two_process_cpu_ddp_fit_agrees_across_ranks(name, tmp_path):
    script = Path(__file__).with_name("ddp_fit.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), name, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["train_batches"] == r1["train_batches"] == 2  # 4 iterations per epoch shared by 2 ranks
    assert [s["step"] for s in r0["steps"]] == [s["step"] for s in r1["steps"]] == [1, 2, 3, 4]
    assert r0["steps"] == r1["steps"]  # coefficient and every group's LR
    if name == "dann":
        assert [s["coeff"] for s in r0["steps"]] == pytest.approx([warm_start_coefficient(i, 4) for i in range(4)])
    assert r0["checksums"].keys() == r1["checksums"].keys()
    for k, v in r0["checksums"].items():
        if "running_" in k or "num_batches" in k:
            continue  # BatchNorm statistics are per rank (no SyncBatchNorm)
        assert v == pytest.approx(r1["checksums"][k], rel=1e-6, abs=1e-6), k
    assert r0["val"] == pytest.approx(r1["val"]) and "val/target_acc" in r0["val"]
    # validators and A-distance use the target predictions/features gathered from both ranks
    assert {"val/target_snd", "val/target_entropy", "val/a_distance"} <= set(r0["val"])
    assert r0["test"] == pytest.approx(r1["test"]) and "test/target_acc" in r0["test"]
