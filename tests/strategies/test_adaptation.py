"""DANN and MMD: gradient reversal in the model, resume, mixed precision, DDP."""

from __future__ import annotations

import json
import math
import os
import socket
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


def test_dann_on_backbone_features_reverses_into_the_backbone_only():
    """``domain_features: backbone`` (Ganin & Lempitsky's split): the discriminator reads z, so the adversarial
    loss trains the backbone (reversed) and the discriminator, never the bottleneck or the classifier."""
    torch.manual_seed(0)
    model = TransferModule("dann_cnn", num_classes=10, bottleneck_dim=100, bottleneck_bn=False,
                           strategy=DANN(domain_features="backbone", hidden=100)).eval()
    assert model.strategy.discriminator[0].in_features == model.backbone.num_features == 768
    (z_s, f_s, g_s), (z_t, f_t, g_t) = model._forward_domains(torch.randn(4, 3, 28, 28), torch.randn(4, 3, 28, 28))
    step = TransferStep(z_s=z_s, f_s=f_s, logits_s=g_s, y_s=torch.zeros(4, dtype=torch.long),
                        progress=Progress(1000, 0), z_t=z_t, f_t=f_t, logits_t=g_t)
    adv = model.strategy.compute(step).losses["adv"]
    head, backbone = list(model.head.parameters()), list(model.backbone.parameters())
    grads = torch.autograd.grad(adv, head + backbone, allow_unused=True)
    assert all(g is None for g in grads[:len(head)])
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads[len(head):])
    d = model.strategy.discriminator(torch.cat([z_s, z_t]))
    assert adv.item() == pytest.approx(domain_adversarial_loss(d[:4], d[4:])[0].item(), rel=1e-6)
    with pytest.raises(ValueError, match="domain_features='conv'.*'bottleneck'.*'backbone'"):
        DANN(domain_features="conv")
    from tlframe.strategies import CDAN
    with pytest.raises(ValueError, match="domain_features is a DANN option"):
        CDAN(domain_features="backbone")


def test_dann_discriminator_shape_options_build_the_papers_digit_discriminator():
    """``hidden: 100, discriminator_layers: 1, discriminator_bn: false`` is Ganin & Lempitsky's digit domain
    classifier (768 -> 100 -> ReLU -> 1); the default stays TLlib's two BN layers; bad values are refused."""
    paper = TransferModule("dann_cnn", num_classes=10, bottleneck_dim=100, bottleneck_bn=False, strategy=DANN(
        domain_features="backbone", hidden=100, discriminator_layers=1, discriminator_bn=False)).strategy.discriminator
    assert [type(m).__name__ for m in paper] == ["Linear", "ReLU", "Linear"]
    assert (paper[0].in_features, paper[0].out_features, paper[2].out_features) == (768, 100, 1)
    assert paper(torch.randn(5, 768)).shape == (5, 1)
    tllib = TransferModule("dann_cnn", num_classes=10, strategy=DANN(hidden=64)).strategy.discriminator
    assert [type(m).__name__ for m in tllib] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    logistic = TransferModule("dann_cnn", num_classes=10, strategy=DANN(discriminator_layers=0)).strategy.discriminator
    assert [type(m).__name__ for m in logistic] == ["Linear"]
    with pytest.raises(ValueError, match="discriminator_layers"):
        DANN(discriminator_layers=-1)


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


ROOT = Path(__file__).resolve().parents[2]


DDP_RUNS = ["finetune", "frozen", "dann", "mmd", "frozen_cached", "dann_bbse", "fixmatch", "mean_teacher", "shot", "mcd", "syncbn"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Both ranks of ``ddp_fit.py`` (every strategy, then SyncBatchNorm), started once for all DDP tests.

    The ranks are started here with ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set, as a cluster
    launcher does, and this checkout first on their import path.
    """
    out = tmp_path_factory.mktemp("ddp")
    script = Path(__file__).with_name("ddp_fit.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "NODE_RANK": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    procs = [subprocess.Popen([sys.executable, str(script), str(out), *DDP_RUNS], env={**env, "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=open(out / f"stderr{r}.txt", "w"), cwd=out)
             for r in (0, 1)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], (out / "stderr0.txt").read_text()[-3000:] + (out / "stderr1.txt").read_text()[-3000:]
    return out


def _ranks(out: Path) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[return-value]


@pytest.mark.parametrize("name", ["finetune", "frozen", "dann", "mmd", "frozen_cached", "dann_bbse", "fixmatch",
                                  "mean_teacher", "shot", "mcd"])
def test_two_process_cpu_ddp_fit_validate_test(name, ddp_runs):
    tmp_path = ddp_runs / name
    r0, r1 = _ranks(tmp_path)
    assert Path(r0["tlframe_file"]).resolve().is_relative_to(ROOT)  # the spawned ranks ran this checkout
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["train_batches"] == r1["train_batches"] == 2  # 4 iterations per epoch shared by 2 ranks
    per_batch = 3 + 4 if name == "mcd" else 1  # MCD: every one of its optimizer steps counts (A: 2, B: 1, C: 4)
    assert [s["step"] for s in r0["steps"]] == [s["step"] for s in r1["steps"]] == [per_batch * i for i in (1, 2, 3, 4)]
    assert r0["steps"] == r1["steps"]  # coefficient and every group's LR
    if name == "dann":
        assert [s["coeff"] for s in r0["steps"]] == pytest.approx([warm_start_coefficient(i, 4) for i in range(4)])
    # each epoch, the ranks drew disjoint training samples of both domains, 2 batches of 8 each
    assert len(r0["epochs"]) == len(r1["epochs"]) == 2
    if name == "frozen_cached":  # images are read once, to build each rank's cache; batches are cached features
        assert sorted(set(r0["epochs"][0]["source"])) == sorted(set(r1["epochs"][0]["source"]))
        r0["epochs"] = r1["epochs"] = []
    if name == "dann_bbse":  # estimated at the start of epoch 1 from both ranks' shards: the same weights on both
        assert r0["label_shift_epoch"] == r1["label_shift_epoch"] == 1
        assert len(r0["label_shift_weight"]) == 10 and r0["label_shift_weight"] == r1["label_shift_weight"]
        r0["epochs"] = r1["epochs"] = []  # the estimate's reads of the target train split are in epoch 1's log
    if name == "shot":  # no source batch at all; the same pseudo-labels of all 64 target images on both ranks
        assert all(not e["source"] for e in r0["epochs"] + r1["epochs"])
        assert len(r0["pseudo_labels"]) == 64 and r0["pseudo_labels"] == r1["pseudo_labels"]
        r0["epochs"] = r1["epochs"] = []  # the labelling pass reads the whole target split on each rank
    for e0, e1 in zip(r0["epochs"], r1["epochs"]):
        for domain in ("source", "target"):
            assert len(e0[domain]) == len(e1[domain]) == 16, domain
            assert len(set(e0[domain])) == 16 and not set(e0[domain]) & set(e1[domain]), domain
    assert not r0["epochs"] or r0["epochs"][0]["source"] != r0["epochs"][1]["source"]  # a fresh order every epoch
    if name == "mean_teacher":  # the teacher followed the same student on both ranks: steps 1..3 of 4 applied
        assert r0["ema_step"] == r1["ema_step"] == 3
        assert any(".teacher.ema.module." in k for k in r0["checksums"])
    assert r0["checksums"].keys() == r1["checksums"].keys()
    for k, v in r0["checksums"].items():
        if "running_" in k or "num_batches" in k:
            continue  # BatchNorm statistics are per rank (no SyncBatchNorm)
        assert v == pytest.approx(r1["checksums"][k], rel=1e-6, abs=1e-6), k
    assert r0["val"] == pytest.approx(r1["val"]) and "val/target_acc" in r0["val"]
    assert r0["validate"] == pytest.approx(r1["validate"]) and "val/target_acc" in r0["validate"]
    # validators and A-distance use the target predictions/features gathered from both ranks
    assert {"val/target_snd", "val/target_entropy", "val/a_distance"} <= set(r0["val"])
    assert r0["test"] == pytest.approx(r1["test"]) and "test/target_acc" in r0["test"]
    # logs and checkpoints written once, by rank 0
    versions = sorted(p.name for p in (tmp_path / "tb" / "run").iterdir())
    assert versions == ["version_0"]
    events = list((tmp_path / "tb" / "run" / "version_0").glob("events.out.tfevents.*"))
    # one event file per stage (fit, validate, test: the writer is closed after each), all by rank 0's process
    assert len(events) == 3 and {p.name.split(".")[-2] for p in events} == {str(r0["pid"])}, events
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"epoch=1-step={4 * per_batch}.ckpt", "last.ckpt"]
    assert not list(tmp_path.glob("lightning_logs*"))


def test_two_process_cpu_ddp_sync_batchnorm(ddp_runs):
    r0, r1 = _ranks(ddp_runs / "syncbn")
    assert r0["supported"] == r1["supported"]
    if not r0["supported"]:
        pytest.skip(f"SyncBatchNorm is CUDA-only in torch {torch.__version__} (CPU/gloo refused: {r0['error']!r})")
    assert r0["sync_bn_modules"] > 0
    for k, v in r0["bn"].items():  # synced statistics: the same running means on both ranks
        assert v == pytest.approx(r1["bn"][k], rel=1e-5, abs=1e-6), k


def test_dann_grl_schedule_tied_to_the_run_length(synthetic_dm, trainer_factory):
    """``grl_max_steps: auto``: ``p = step / total_steps`` (Ganin & Lempitsky's progress) with ``grl_alpha: 10``."""
    dann = DANN(grl_max_steps="auto", grl_alpha=10.0)
    assert dann.coefficient(0, 200) == 0.0
    assert dann.coefficient(100, 200) == pytest.approx(2 / (1 + math.exp(-5)) - 1)  # p = 0.5
    assert dann.coefficient(200, 200) == pytest.approx(2 / (1 + math.exp(-10)) - 1)  # p = 1: ~1 at the end
    assert DANN().coefficient(1000, 200) == pytest.approx(0.4621, abs=1e-4)  # the default stays TLlib's fixed 1000
    with pytest.raises(ValueError, match="needs the run's total steps"):
        dann.coefficient(5, None)
    with pytest.raises(ValueError, match="positive number of steps or 'auto'"):
        DANN(grl_max_steps=0)
    # in a fit, the total is the trainer's estimated_stepping_batches (3 epochs x 4 batches = 12 steps)
    model = TransferModule("dtn", num_classes=10, strategy=DANN(grl_max_steps="auto", grl_alpha=10.0))
    rec = StepRecorder()
    trainer_factory(max_epochs=3, callbacks=[rec]).fit(model, synthetic_dm(iters_per_epoch=4))
    assert model.progress.total_steps == 12
    for step, (coeff, _) in rec.rows.items():
        assert coeff == pytest.approx(2 / (1 + math.exp(-10 * (step - 1) / 12)) - 1), step
