"""Fine-tuning regularisers (L2-SP, BSS, DELTA) and class-weighted cross-entropy as strategy options: values equal
the loss functions applied by hand, starting state in the checkpoint and out of the optimizer and DDP, weight
decay, baselines, and one ``tlframe fit`` per option (TensorBoard tags, last.ckpt, resume of L2-SP's w0)."""

from __future__ import annotations

import copy
import glob
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from tlframe.backbones import create_backbone
from tlframe.baselines import FINETUNE, source_only_config
from tlframe.checks import ConfigError
from tlframe.label_shift import class_weights, long_tail_fractions
from tlframe.losses import batch_spectral_shrinkage, delta_channel_attention, delta_feature_map_loss, l2_penalty, l2_sp
from tlframe.module import TransferModule
from tlframe.strategies import (BSS, DANN, DELTA, L2SP, EntropyTerm, FineTune, FrozenFeatures, Progress,
                                TransferStep)
from tlframe.strategies.regularization import stage_output_modules

ROOT = Path(__file__).resolve().parents[2]


def make(strategy, **kwargs) -> TransferModule:
    torch.manual_seed(0)
    return TransferModule("dtn", num_classes=10, strategy=strategy, **kwargs)


def images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def step_of(model: TransferModule, x_s, y_s, x_t=None) -> TransferStep:
    """The strategy's view of one training step, as ``TransferModule.training_step`` builds it."""
    model.strategy.on_train_batch_start(model.backbone, Progress(0, 0))
    (z_s, f_s, g_s), (z_t, f_t, g_t) = model._forward_domains(x_s, x_t)
    return TransferStep(z_s=z_s, f_s=f_s, logits_s=g_s, y_s=y_s, progress=Progress(0, 0), z_t=z_t, f_t=f_t,
                        logits_t=g_t)


def w0_key(name: str, index: int = 0) -> str:
    return f"strategy.regularization.{index}.w0.{name.replace('.', '__')}"


# --------------------------------------------------------------------------- L2-SP
def test_l2sp_losses_equal_the_functions_applied_by_hand():
    model = make(FineTune(regularization=[L2SP(weight=0.1, head_weight=0.2)]))
    start = [p.detach().clone() for p in model.backbone.parameters()]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = model.strategy.compute(step_of(model, *images()))
    assert set(out.losses) == {"cls", "l2sp", "l2sp_head"}
    assert out.weights == {"l2sp": 0.1, "l2sp_head": 0.2}
    backbone = list(model.backbone.parameters())
    torch.testing.assert_close(out.losses["l2sp"], l2_sp(backbone, start), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.losses["l2sp_head"], l2_penalty(list(model.head.parameters())), rtol=1e-6, atol=0)
    assert out.losses["l2sp"] > 0
    out.losses["l2sp"].backward()  # the gradient is w - w0
    for p, p0 in zip(backbone, start):
        torch.testing.assert_close(p.grad, p.detach() - p0, rtol=1e-5, atol=1e-8)


def test_l2sp_w0_buffers_are_in_the_state_dict_unchanged_by_training_and_out_of_optimizer_and_ddp(
        synthetic_dm, trainer_factory):
    model = make(FineTune(backbone_lr_mult=1.0, regularization=[L2SP()]))
    start = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer = trainer_factory(max_steps=3)
    trainer.fit(model, synthetic_dm())
    state = model.state_dict()
    for n, w in start.items():
        assert torch.equal(state[w0_key(n)], w), n
    assert any(not torch.equal(p, start[n]) for n, p in model.backbone.named_parameters())  # the model trained
    w0 = [t for k, t in model.named_buffers() if ".w0." in k]
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert len(w0) == len(start) and not in_optimizer & {id(t) for t in w0}
    assert not any(".w0." in k for k, _ in model.named_parameters())
    # excluded from DDP: no broadcast before each forward, no gradient bucket
    assert set(model._ddp_params_and_buffers_to_ignore) == {w0_key(n) for n in start}
    assert all(getattr(t, "_ddp_ignored", False) for t in w0)


def test_l2sp_leaves_out_permanently_frozen_stages():
    model = make(FineTune(freeze_stages=1, regularization=[L2SP()]))
    trained = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trained and len(trained) < len(list(model.backbone.parameters()))
    assert {k for k in model.state_dict() if ".w0." in k} == {w0_key(n) for n in trained}


@pytest.mark.parametrize("strategy, kwargs, expected", [
    (lambda: FineTune(regularization=[L2SP()]), {}, {"head": 0.0, "backbone": 0.0}),
    (lambda: FineTune(regularization=[L2SP(head_weight=0.0)]), {}, {"head": 1e-3, "backbone": 0.0}),
    (lambda: FineTune(layer_decay=0.5, regularization=[L2SP()]), {},
     {"head": 0.0, "backbone.stage0": 0.0, "backbone.stage1": 0.0, "backbone.stage2": 0.0}),
    (lambda: DANN(regularization=[L2SP()]), {}, {"head": 0.0, "backbone": 0.0, "discriminator": 1e-3}),
    (lambda: FineTune(regularization=[L2SP()]), {"optimizer": partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)},
     {"head": 0.0, "backbone": 0.0}),
    (lambda: FineTune(regularization=[DELTA()]), {}, {"head": 0.0, "backbone": 1e-3}),
    (lambda: FineTune(regularization=[BSS()]), {}, {"head": 1e-3, "backbone": 1e-3}),
], ids=["l2sp", "l2sp-no-head", "l2sp-layer-decay", "dann-l2sp", "adamw-l2sp", "delta", "bss"])
def test_weight_decay_is_off_where_l2sp_regularises(strategy, kwargs, expected):
    optimizer = make(strategy(), **kwargs).configure_optimizers()["optimizer"]
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == pytest.approx(expected)


# --------------------------------------------------------------------------- BSS
@pytest.mark.parametrize("features", ["bottleneck", "backbone"])
def test_bss_loss_is_the_function_on_the_source_features(features):
    model = make(FineTune(regularization=[BSS(weight=0.003, k=2, features=features)]))
    step = step_of(model, *images())
    out = model.strategy.compute(step)
    assert out.weights == {"bss": 0.003}
    f = step.f_s if features == "bottleneck" else step.z_s
    assert torch.equal(out.losses["bss"], batch_spectral_shrinkage(f, 2))


# --------------------------------------------------------------------------- DELTA
def hooked(model: torch.nn.Module, names: list[str]):
    maps = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: maps.setdefault(n, o)) for n in names]
    return maps, handles


def test_delta_loss_equals_the_feature_map_function_on_the_source_rows_of_a_joint_batch():
    model = make(DANN(regularization=[DELTA(weight=0.02, head_weight=0.0)]))  # bn_policy joint: cat(x_s, x_t)
    teacher = copy.deepcopy(model.backbone).eval()
    with torch.no_grad():  # the student moves away from the start
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    layers = ["stages.1", "stages.2"]
    assert model.strategy.regularization[0]._layers == layers
    student_maps, handles = hooked(model.backbone, layers)
    (x_s, y_s), (x_t, _) = images(8, 0), images(8, 1)
    out = model.strategy.compute(step_of(model, x_s, y_s, x_t))
    for h in handles:
        h.remove()
    teacher_maps, _ = hooked(teacher, layers)
    with torch.no_grad():
        teacher(x_s)
    expected = delta_feature_map_loss([student_maps[n][:8] for n in layers], [teacher_maps[n] for n in layers])
    assert student_maps["stages.1"].shape[0] == 16  # the joint batch; DELTA takes its source rows
    assert out.weights["delta"] == 0.02 and "delta_head" not in out.losses
    torch.testing.assert_close(out.losses["delta"], expected, rtol=1e-6, atol=0)
    assert out.losses["delta"] > 0


def test_delta_is_zero_for_the_starting_model_in_eval_mode():
    model = make(FineTune(regularization=[DELTA(head_weight=0.01)]))
    model.eval()
    out = model.strategy.compute(step_of(model, *images()))
    assert out.losses["delta"].item() == 0.0
    torch.testing.assert_close(out.losses["delta_head"], l2_penalty(list(model.head.parameters())))


def test_delta_teacher_is_frozen_in_the_checkpoint_and_out_of_optimizer_and_ddp(synthetic_dm, trainer_factory):
    model = make(FineTune(backbone_lr_mult=1.0, regularization=[DELTA()]))
    start = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = trainer_factory(max_steps=2)
    trainer.fit(model, synthetic_dm())
    teacher = model.strategy.regularization[0].teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    state = model.state_dict()
    for k, v in start.items():  # weights and BN running statistics: the starting model's
        assert torch.equal(state[f"strategy.regularization.0.teacher.model.{k}"], v), k
    assert not torch.equal(model.backbone.state_dict()["stages.0.1.running_mean"], start["stages.0.1.running_mean"])
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert set(model._ddp_params_and_buffers_to_ignore) == {f"strategy.regularization.0.teacher.model.{k}" for k in start}


def test_delta_channel_attention_is_computed_once_at_the_start_from_channel_removal(synthetic_dm, trainer_factory):
    reg = DELTA(attention="channel_removal", attention_images=8, attention_batch_size=4)
    model = make(FineTune(regularization=[reg]))
    dm = synthetic_dm()
    trainer_factory(max_steps=1).fit(model, dm)
    weights = reg.attention_weights()
    assert [w.numel() for w in weights] == [128, 256]
    assert all(abs(float(w.sum()) - 1) < 1e-5 and float(w.std()) > 0 for w in weights)  # not uniform
    assert all(f"strategy.regularization.0.attention_{j}" in model.state_dict() for j in range(2))
    # by hand, for the first layer: probe on the starting features, zero each channel, average over 2 batches
    x, y = dm.source_train_sample(8)
    teacher = reg.teacher
    with torch.no_grad():
        probe = reg._fit_probe(torch.cat([teacher(x[:4]), teacher(x[4:])]), y, 10)
        loss = lambda: (F.cross_entropy(probe(teacher(x[:4])), y[:4]) + F.cross_entropy(probe(teacher(x[4:])), y[4:])) / 2
        base = loss()
        increase = []
        for c in range(128):
            h = teacher.model.get_submodule("stages.1").register_forward_hook(
                lambda m, a, o, c=c: o.index_fill(1, torch.tensor([c]), 0.0))
            increase.append(float(loss() - base))
            h.remove()
    torch.testing.assert_close(weights[0], delta_channel_attention(torch.tensor(increase, dtype=torch.float64)).float(),
                               rtol=1e-4, atol=1e-6)
    before = [w.clone() for w in weights]
    reg.on_train_start(Progress(5, 0), None)  # a resumed run keeps the checkpoint's attention
    assert all(torch.equal(a, b) for a, b in zip(before, reg.attention_weights()))


def test_stage_output_modules_are_the_stages_after_the_stem():
    assert stage_output_modules(create_backbone("dtn")) == ["stages.1", "stages.2"]
    assert stage_output_modules(create_backbone("lenet_tllib")) == ["stages.1", "stages.2"]
    assert stage_output_modules(create_backbone("resnet18")) == ["layer1", "layer2", "layer3", "layer4"]


# --------------------------------------------------------------------------- class weights
@pytest.mark.parametrize("kind, beta", [("inverse", 0.999), ("effective", 0.9)])
def test_class_weight_buffer_follows_the_source_train_counts(kind, beta, synthetic_dm, trainer_factory):
    dm = synthetic_dm(num_train=200, source_class_fractions=long_tail_fractions(10, 10))
    model = make(FineTune(class_weights=kind, class_weight_beta=beta))
    assert torch.equal(model.strategy.class_weight, torch.ones(10))  # placeholder until setup
    trainer_factory(max_steps=1).fit(model, dm)
    counts = dm.source_class_counts()
    expected = torch.as_tensor(class_weights(counts, kind, beta), dtype=torch.float32)
    assert counts[0] > 3 * counts[-1]
    torch.testing.assert_close(model.state_dict()["strategy.class_weight"], expected)
    x, y = images()
    step = step_of(model, x, y)
    per_sample = F.cross_entropy(step.logits_s, y, reduction="none")
    torch.testing.assert_close(model.strategy.classification_loss(step), (expected[y] * per_sample).mean())


def test_class_weights_reach_every_strategy_and_need_the_data_module():
    frozen = make(FrozenFeatures(class_weights="inverse"))
    dann = make(DANN(class_weights="effective"))
    assert frozen.strategy.class_weight.shape == dann.strategy.class_weight.shape == (10,)
    assert "strategy.class_weight" not in make(FineTune()).state_dict()  # none: no buffer (old checkpoints load)
    with pytest.raises(ConfigError, match="TransferDataModule"):
        frozen.strategy.on_setup("fit", None)
    with pytest.raises(ConfigError, match="class_weights"):
        FineTune(class_weights="balanced")


# --------------------------------------------------------------------------- composition and config
def test_names_clash_and_wrong_objects_are_config_errors():
    with pytest.raises(ConfigError, match="named 'l2sp'"):
        FineTune(regularization=[L2SP(), L2SP()])
    FineTune(regularization=[L2SP(), L2SP(name="l2sp2")])
    with pytest.raises(ConfigError, match="taken by DANN's own losses"):
        DANN(regularization=[BSS(name="adv")])
    with pytest.raises(ConfigError, match="taken by a regulariser"):
        DANN(terms=[EntropyTerm(name="bss")], regularization=[BSS()])
    with pytest.raises(ConfigError, match="not a regulariser"):
        FineTune(regularization=[EntropyTerm()])
    with pytest.raises(ConfigError, match="not modules of the backbone"):
        make(FineTune(regularization=[DELTA(layers=["stages.9"])]))
    with pytest.raises(ConfigError, match="features"):
        BSS(features="logits")


def test_regularisers_combine_with_adaptation_and_terms():
    model = make(DANN(terms=[EntropyTerm(weight=0.1)], regularization=[L2SP(), BSS(), DELTA()]))
    (x_s, y_s), (x_t, _) = images(8, 0), images(8, 1)
    out = model.strategy.compute(step_of(model, x_s, y_s, x_t))
    assert set(out.losses) == {"cls", "adv", "entropy", "l2sp", "l2sp_head", "bss", "delta", "delta_head"}
    out.total().backward()


def test_source_only_baseline_keeps_the_regularisers_and_class_weights():
    reg = [{"class_path": "tlframe.strategies.L2SP", "init_args": {"weight": 0.1, "head_weight": 0.01}}]
    config = {"model": {"strategy": {"class_path": "tlframe.strategies.DANN", "init_args": {
        "trade_off": 0.3, "regularization": reg, "class_weights": "inverse", "terms": []}}}}
    sibling = source_only_config(config)["model"]["strategy"]
    assert sibling == {"class_path": FINETUNE, "init_args": {"regularization": reg, "class_weights": "inverse"}}


# --------------------------------------------------------------------------- tlframe fit, one run per option
QUICK = ["--data.source.init_args.num_train=100", "--data.target.init_args.num_train=100",
         "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32", "--data.batch_size=16",
         "--data.iters_per_epoch=2", "--trainer.max_epochs=1", "--trainer.enable_model_summary=false",
         "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu"]

OPTIONS = {
    "l2sp": {"regularization": [{"class_path": "tlframe.strategies.L2SP", "init_args": {"weight": 0.01}}]},
    "bss": {"regularization": [{"class_path": "tlframe.strategies.BSS", "init_args": {"weight": 0.001}}]},
    "delta": {"regularization": [{"class_path": "tlframe.strategies.DELTA", "init_args": {
        "attention": "channel_removal", "attention_images": 4, "attention_batch_size": 4}}]},
    "class_weights": {"class_weights": "effective", "class_weight_beta": 0.99},
}


def tlframe_fit(tmp: Path, option: str, *extra: str) -> subprocess.CompletedProcess:
    config = tmp / f"{option}.yaml"
    config.write_text(yaml.safe_dump({"model": {"strategy": {"class_path": "tlframe.strategies.FineTune",
                                                             "init_args": OPTIONS[option]}}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "tlframe", "fit", "-c", str(ROOT / "configs" / "quickstart.yaml"), "-c", str(config),
           f"--trainer.logger.init_args.save_dir={tmp / 'runs'}", f"--trainer.logger.init_args.name={option}",
           *QUICK, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_ckpt(tmp: Path, option: str, version: int = 0) -> dict:
    path = tmp / "runs" / option / f"version_{version}" / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=False)


def tags(tmp: Path, option: str, version: int = 0) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return set(EventAccumulator(str(tmp / "runs" / option / f"version_{version}")).Reload().Tags()["scalars"])


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory) -> tuple[Path, dict]:
    """A dtn backbone's weights in a file (``model.weights``): the known starting point of the runs."""
    torch.manual_seed(123)
    state = create_backbone("dtn").state_dict()
    path = tmp_path_factory.mktemp("weights") / "dtn_start.pt"
    torch.save(state, path)
    return path, state


def test_fit_with_l2sp_keeps_w0_through_checkpoint_and_resume(tmp_path, start_weights):
    path, start = start_weights
    tlframe_fit(tmp_path, "l2sp", f"--model.weights={path}")
    assert {"train/loss_l2sp", "train/loss_l2sp_head", "train/loss_cls"} <= tags(tmp_path, "l2sp")
    first = last_ckpt(tmp_path, "l2sp")
    params = [k for k in start if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in params:
        assert torch.equal(first["state_dict"][w0_key(k)], start[k]), k  # the weights it started from
    assert any(not torch.equal(first["state_dict"][f"backbone.{k}"], start[k]) for k in params)
    decay = {g["name"]: g["weight_decay"] for g in first["optimizer_states"][0]["param_groups"]}
    assert decay == {"head": 0.0, "backbone": 0.0}
    # resume for a second epoch: w0 still the starting weights, not the resumed (trained) ones
    ckpt = tmp_path / "runs" / "l2sp" / "version_0" / "checkpoints" / "last.ckpt"
    tlframe_fit(tmp_path, "l2sp", f"--model.weights={path}", f"--ckpt_path={ckpt}", "--trainer.max_epochs=2")
    resumed = max((torch.load(p, map_location="cpu", weights_only=False)
                   for p in glob.glob(str(tmp_path / "runs" / "l2sp" / "version_*" / "checkpoints" / "last.ckpt"))),
                  key=lambda c: c["global_step"])
    assert resumed["global_step"] == 4
    for k in params:
        assert torch.equal(resumed["state_dict"][w0_key(k)], start[k]), k
    assert any(not torch.equal(resumed["state_dict"][f"backbone.{k}"], first["state_dict"][f"backbone.{k}"])
               for k in params)


def test_fit_with_bss_logs_its_loss(tmp_path):
    tlframe_fit(tmp_path, "bss")
    assert "train/loss_bss" in tags(tmp_path, "bss")
    assert last_ckpt(tmp_path, "bss")["global_step"] == 2


def test_fit_with_delta_attention_keeps_the_starting_model(tmp_path, start_weights):
    path, start = start_weights
    proc = tlframe_fit(tmp_path, "delta", f"--model.weights={path}")
    assert "DELTA channel attention of ['stages.1', 'stages.2']" in proc.stdout + proc.stderr
    assert {"train/loss_delta", "train/loss_delta_head"} <= tags(tmp_path, "delta")
    state = last_ckpt(tmp_path, "delta")["state_dict"]
    for k, v in start.items():
        assert torch.equal(state[f"strategy.regularization.0.teacher.model.{k}"], v), k
    for j in range(2):
        assert abs(float(state[f"strategy.regularization.0.attention_{j}"].sum()) - 1) < 1e-5


def test_fit_with_class_weights_stores_them_in_the_checkpoint(tmp_path):
    proc = tlframe_fit(tmp_path, "class_weights", "--data.source_class_fractions=[1.0,0.8,0.6,0.5,0.4,0.3,0.25,0.2,0.15,0.1]")
    match = re.search(r"class_weights=effective: source train counts (\[[\d, ]+\])", proc.stdout + proc.stderr)
    assert match, proc.stdout[-2000:]
    counts = yaml.safe_load(match.group(1))
    expected = torch.as_tensor(class_weights(counts, "effective", 0.99), dtype=torch.float32)
    torch.testing.assert_close(last_ckpt(tmp_path, "class_weights")["state_dict"]["strategy.class_weight"], expected)
    assert counts[0] > 3 * counts[-1] and "train/loss_cls" in tags(tmp_path, "class_weights")
