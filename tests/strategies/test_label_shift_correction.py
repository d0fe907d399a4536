"""``label_shift: bbse`` on a strategy: the weights a run estimates equal BBSE on the model's own predictions,
they weight the source cross-entropy and DANN/CDAN's source domain loss, their schedule survives resume, target
labels are never read, bad set-ups are clear errors, and ``tlframe fit`` logs them and keeps them in the checkpoint."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from tlframe.baselines import FINETUNE, source_only_config, target_only_config
from tlframe.checks import ConfigError
from tlframe.data.datamodule import DataError
from tlframe.label_shift import estimate_label_shift, long_tail_fractions
from tlframe.losses import domain_adversarial_loss
from tlframe.module import TransferModule
from tlframe.strategies import CDAN, DANN, FineTune, Progress, TransferStep

ROOT = Path(__file__).resolve().parents[2]
SHIFT = dict(source_class_fractions=long_tail_fractions(10, 5), target_class_fractions=long_tail_fractions(10, 5, True))


def make(strategy) -> TransferModule:
    torch.manual_seed(0)
    return TransferModule("dtn", num_classes=10, strategy=strategy)


def step_of(model: TransferModule, x_s, y_s, x_t=None) -> TransferStep:
    (z_s, f_s, g_s), (z_t, f_t, g_t) = model._forward_domains(x_s, x_t)
    return TransferStep(z_s=z_s, f_s=f_s, logits_s=g_s, y_s=y_s, progress=Progress(10, 0, 100), z_t=z_t, f_t=f_t,
                        logits_t=g_t)


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


def test_the_estimate_a_run_stores_is_bbse_on_the_models_own_predictions(synthetic_dm, trainer_factory):
    dm = synthetic_dm(num_train=300, val_fraction=0.3, **SHIFT)
    model = make(FineTune(label_shift="bbse", label_shift_start_epoch=0, label_shift_every_epoch=False))
    start = copy.deepcopy(model).eval()  # the model the estimate at the start of epoch 0 sees
    assert torch.equal(model.strategy.label_shift_weight, torch.ones(10)) and int(model.strategy.label_shift_epoch) == -1
    trainer = trainer_factory(max_epochs=2)
    trainer.fit(model, dm)
    source, target = dm.label_shift_loaders()
    with torch.no_grad():
        val = [(start(x).argmax(1), y) for x, y in source]
        tgt = torch.cat([start(x).argmax(1) for x, _ in target])
    expected = estimate_label_shift(torch.cat([p for p, _ in val]), torch.cat([y for _, y in val]), tgt, 10).weights
    torch.testing.assert_close(model.strategy.label_shift_weight, torch.as_tensor(expected, dtype=torch.float32))
    assert int(model.strategy.label_shift_epoch) == 0  # estimated once (every_epoch false), at epoch 0
    assert not torch.equal(model.strategy.label_shift_weight, torch.ones(10))
    logged = trainer.callback_metrics
    assert {f"label_shift/weight_{c}" for c in range(10)} <= set(logged)
    assert abs(sum(float(logged[f"label_shift/target_proportion_{c}"]) for c in range(10)) - 1) < 1e-5
    assert len(source.dataset) == len(dm.source_val) and len(target.dataset) == len(dm.target_train)


def test_the_estimate_never_reads_target_labels(synthetic_dm, trainer_factory):
    # an unlabelled target (every label -1): the estimate still runs (bincount of a -1 label would fail)
    dm = synthetic_dm(num_train=100, val_fraction=0.3, target_labelled=False)
    model = make(FineTune(label_shift="bbse", label_shift_start_epoch=0))
    trainer_factory(max_steps=1).fit(model, dm)
    assert int(model.strategy.label_shift_epoch) == 0
    weights = model.strategy.label_shift_weight
    assert weights.shape == (10,) and torch.isfinite(weights).all() and bool((weights >= 0).all())


def test_ddp_shards_cover_every_image_once(synthetic_dm):
    dm = synthetic_dm(num_train=101, val_fraction=0.3)
    shards = [dm.label_shift_loaders(rank, 3) for rank in range(3)]
    for i, split in enumerate((dm.source_val, dm.target_train)):
        indices = sorted(j for loaders in shards for j in loaders[i].sampler)
        assert indices == list(range(len(split)))


def test_weights_multiply_the_source_cross_entropy_and_dann_domain_loss():
    model = make(DANN(label_shift="bbse", class_weights="inverse"))
    model.eval()  # deterministic discriminator (no dropout) for the hand computation
    w = torch.linspace(0.2, 2.0, 10)
    model.strategy.set_label_shift_weights(w, epoch=3)
    model.strategy.class_weight.copy_(torch.linspace(1.5, 0.5, 10))
    (x_s, y_s), (x_t, _) = batch(16, 0), batch(16, 1)
    step = step_of(model, x_s, y_s, x_t)
    out = model.strategy.compute(step)
    per_sample = F.cross_entropy(step.logits_s, y_s, reduction="none")
    torch.testing.assert_close(out.losses["cls"], (model.strategy.class_weight[y_s] * w[y_s] * per_sample).mean())
    coeff = model.strategy.coefficient(10, 100)
    d_s, d_t = model.strategy.discriminate(step.f_s, step.f_t, coeff)
    torch.testing.assert_close(out.losses["adv"], domain_adversarial_loss(d_s, d_t, w[y_s])[0])
    assert not torch.allclose(out.losses["adv"], domain_adversarial_loss(d_s, d_t)[0])


def test_cdan_entropy_weights_and_label_shift_weights_multiply():
    model = make(CDAN(label_shift="bbse", entropy_conditioning=True))
    model.eval()
    w = torch.linspace(0.5, 1.5, 10)
    model.strategy.set_label_shift_weights(w, epoch=1)
    (x_s, y_s), (x_t, _) = batch(16, 0), batch(16, 1)
    step = step_of(model, x_s, y_s, x_t)
    out = model.strategy.compute(step)
    from tlframe.losses import cdan_entropy_weights

    p_s, p_t = F.softmax(step.logits_s.float(), 1).detach(), F.softmax(step.logits_t.float(), 1).detach()
    d_s, d_t = model.strategy.discriminate(model.strategy.conditioning(step.f_s, p_s),
                                           model.strategy.conditioning(step.f_t, p_t), model.strategy.coefficient(10, 100))
    e_s, e_t = cdan_entropy_weights(p_s, p_t)
    torch.testing.assert_close(out.losses["adv"], domain_adversarial_loss(d_s, d_t, e_s * w[y_s], e_t)[0])


def test_estimate_schedule_is_read_from_the_checkpointed_buffer():
    every = FineTune(label_shift="bbse", label_shift_start_epoch=1)
    once = FineTune(label_shift="bbse", label_shift_start_epoch=2, label_shift_every_epoch=False)
    for s in (every, once):
        s.attach(torch.nn.Identity(), torch.nn.Linear(2, 2), 10)
    assert [every.wants_label_shift_estimate(e) for e in range(3)] == [False, True, True]
    every.set_label_shift_weights(torch.ones(10), epoch=1)
    assert not every.wants_label_shift_estimate(1)  # resumed mid-epoch 1: keep the epoch's weights
    assert every.wants_label_shift_estimate(2)
    once.set_label_shift_weights(torch.ones(10), epoch=2)
    assert not once.wants_label_shift_estimate(3)
    restored = FineTune(label_shift="bbse", label_shift_start_epoch=1)
    restored.attach(torch.nn.Identity(), torch.nn.Linear(2, 2), 10)
    restored.load_state_dict(every.state_dict())
    assert int(restored.label_shift_epoch) == 1 and not restored.wants_label_shift_estimate(1)
    assert not FineTune().wants_label_shift_estimate(5) and FineTune().source_sample_weight(torch.zeros(2)) is None
    assert "strategy.label_shift_weight" not in make(FineTune()).state_dict()  # none: no buffer (old checkpoints load)


def test_bad_label_shift_set_ups_are_clear_errors(synthetic_dm):
    with pytest.raises(ConfigError, match="label_shift='ipw' must be 'none' or 'bbse'"):
        FineTune(label_shift="ipw")
    with pytest.raises(ValueError, match="label_shift_start_epoch"):
        FineTune(label_shift="bbse", label_shift_start_epoch=-1)
    model = make(FineTune(label_shift="bbse"))
    with pytest.raises(ConfigError, match="TransferDataModule"):
        model.strategy.on_setup("fit", None)
    with pytest.raises(DataError, match="data.val_fraction > 0"):
        model.strategy.on_setup("fit", synthetic_dm(val_fraction=0.0))


def test_baselines_drop_the_label_shift_correction():
    args = {"label_shift": "bbse", "label_shift_start_epoch": 2, "class_weights": "inverse"}
    for path in ("tlframe.strategies.FineTune", "tlframe.strategies.DANN"):
        config = {"model": {"strategy": {"class_path": path, "init_args": dict(args)}},
                  "data": {"source": {"class_path": "S"}, "target": {"class_path": "T"}}}
        # a FineTune + BBSE run reads the target: it has a source-only baseline, without the correction (its
        # arguments back to their defaults, so the sibling equals a plain FineTune run's resolved config)
        plain = {"class_path": FINETUNE,
                 "init_args": {"label_shift": "none", "label_shift_start_epoch": 1, "class_weights": "inverse"}}
        assert source_only_config(config)["model"]["strategy"] == plain
        assert target_only_config(config)["model"]["strategy"]["init_args"]["label_shift"] == "none"


def test_tlframe_fit_logs_the_estimate_and_checkpoints_it(tmp_path):
    config = tmp_path / "bbse.yaml"
    config.write_text(yaml.safe_dump({"model": {"strategy": {"class_path": "tlframe.strategies.DANN", "init_args": {
        "label_shift": "bbse", "label_shift_start_epoch": 1}}}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tlframe", "fit", "-c", str(ROOT / "configs" / "quickstart.yaml"), "-c", str(config),
           f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.logger.init_args.name=bbse",
           "--data.source.init_args.num_train=100", "--data.target.init_args.num_train=100",
           "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32", "--data.batch_size=16",
           "--data.iters_per_epoch=2", "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
           "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "label_shift bbse at the start of epoch 1" in out and "label_shift bbse at the start of epoch 2" in out
    assert "at the start of epoch 0" not in out
    run = tmp_path / "runs" / "bbse" / "version_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert {"label_shift/weight_0", "label_shift/target_proportion_9", "label_shift/condition_number"} <= set(scalars)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(ckpt["state_dict"]["strategy.label_shift_epoch"]) == 2
    assert ckpt["state_dict"]["strategy.label_shift_weight"].shape == (10,)
