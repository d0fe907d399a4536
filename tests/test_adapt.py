"""``tlframe adapt`` (TENT, AdaBN): what each method changes, the online protocol, the adapted checkpoint, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tlframe.adapt import adabn, batchnorm_layers, configure_tent, evaluate, tent
from tlframe.checks import ConfigError
from tlframe.module import TransferModule

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def model() -> TransferModule:
    torch.manual_seed(0)
    return TransferModule("dtn", num_classes=10).eval()


def stream(batches=3, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g) * 2 + 0.5, torch.randint(0, 10, (n,), generator=g))
            for _ in range(batches)]


def affine_names(m: nn.Module) -> set[str]:
    names = {id(p): n for n, p in m.named_parameters()}
    return {names[id(p)] for bn in batchnorm_layers(m) for p in (bn.weight, bn.bias)}


def changed(before: dict, m: nn.Module) -> set[str]:
    return {k for k, v in m.state_dict().items() if not torch.equal(before[k], v)}


def test_tent_updates_only_batchnorm_affine_parameters_and_lowers_entropy():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    data = stream()
    entropy_before = evaluate(configure_tent_copy(m), data, CPU).entropy
    tent(m, data, CPU, lr=0.01)
    moved = changed(before, m)
    assert moved and moved <= affine_names(m)  # no conv/linear weight, no running statistic
    assert {n for n in moved if n.startswith("head.")}  # the bottleneck's BatchNorm1d too
    assert all(not p.requires_grad for n, p in m.named_parameters() if n not in affine_names(m))
    assert evaluate(m, data, CPU).entropy < entropy_before


def configure_tent_copy(m: TransferModule) -> TransferModule:
    """A copy of ``m`` in TENT's mode (batch statistics), not adapted."""
    import copy

    c = copy.deepcopy(m)
    configure_tent(c)
    return c


def test_tent_online_predictions_come_before_each_update():
    m = model()
    data = stream(batches=2)
    reference = configure_tent_copy(m)
    first = evaluate(reference, data[:1], CPU)  # what the unadapted model predicts for the first batch
    online = tent(m, data[:1], CPU, lr=10.0)  # a huge step: a later prediction would differ
    assert online.correct == first.correct and online.images == 16
    assert evaluate(m, data[:1], CPU).entropy != pytest.approx(first.entropy)


def test_adabn_recomputes_running_statistics_and_nothing_else():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    data = stream(batches=3)
    bn = m.head.bottleneck[1]
    inputs = []
    hook = bn.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach()))
    adabn(m, data, CPU)
    hook.remove()
    assert not m.training and not bn.training
    moved = changed(before, m)
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)
    # the cumulative average over the batches of the batch means (momentum=None)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in inputs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0, unbiased=True) for x in inputs]).mean(0))


def test_models_without_batchnorm_are_refused():
    torch.manual_seed(0)
    plain = TransferModule("lenet_tllib", num_classes=10, bottleneck_dim=0)
    with pytest.raises(ConfigError, match="has none"):
        tent(plain, stream(1), CPU)
    with pytest.raises(ConfigError, match="has none"):
        adabn(plain, stream(1), CPU)


def tlframe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "tlframe", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A quickstart run (dtn with BatchNorm, 2 epochs of 2 steps); returns its last.ckpt."""
    tmp = tmp_path_factory.mktemp("adapt")
    proc = tlframe("fit", "-c", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.logger.init_args.save_dir={tmp}",
                   "--trainer.logger.init_args.name=src", "--data.source.init_args.num_train=100",
                   "--data.target.init_args.num_train=100", "--data.source.init_args.num_test=32",
                   "--data.target.init_args.num_test=48", "--data.batch_size=16", "--data.iters_per_epoch=2",
                   "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
                   cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "src" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("method", ["tent", "adabn"])
def test_tlframe_adapt_writes_its_numbers_and_a_loadable_adapted_checkpoint(trained, tmp_path, method):
    proc = tlframe("adapt", "--checkpoint", str(trained), "--method", method, "--batch-size", "16", "--out",
                   str(tmp_path / method), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / method / "adapt.json").read_text())
    assert result["method"] == method and result["images"] == result["labelled"] == 48
    for key in ("source_acc", "after_acc", "checkpoint_acc"):
        assert 0.0 <= result[key] <= 1.0, key
    assert (result["online_acc"] is not None) == (method == "tent")
    assert result["settings"]["config"].endswith("config.yaml") and result["settings"]["batch_size"] == 16
    original = torch.load(trained, map_location="cpu", weights_only=False)["state_dict"]
    adapted = TransferModule.load_from_checkpoint(tmp_path / method / "adapted.ckpt", map_location="cpu")
    moved = {k for k, v in adapted.state_dict().items() if not torch.equal(v, original[k])}
    assert moved == set(result["updated"]) and moved
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    bn = {name for name, mod in adapted.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    assert all(k.rsplit(".", 1)[0] in bn for k in moved)  # BatchNorm layers only, in both methods
    if method == "adabn":
        assert all(k.endswith(statistics) for k in moved)
    else:  # TENT's affine parameters, and the stream's running statistics for eval-mode use of the checkpoint
        assert {k for k in moved if k.endswith((".weight", ".bias"))} and {k for k in moved if k.endswith(statistics)}
    assert f"{method} on 48 target images" in proc.stdout


def test_tlframe_adapt_none_and_bf16(trained, tmp_path):
    proc = tlframe("adapt", "--checkpoint", str(trained), "--method", "none", "--out", str(tmp_path / "none"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "none" / "adapted.ckpt").exists()
    none = json.loads((tmp_path / "none" / "adapt.json").read_text())
    bf16 = tlframe("adapt", "--checkpoint", str(trained), "--precision", "bf16", "--out", str(tmp_path / "bf16"),
                   cwd=tmp_path)
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    result = json.loads((tmp_path / "bf16" / "adapt.json").read_text())
    assert result["settings"]["precision"] == "bf16" and abs(result["source_acc"] - none["source_acc"]) <= 0.1


def test_tlframe_adapt_bad_input_is_one_line(trained, tmp_path):
    missing = tlframe("adapt", "--checkpoint", str(tmp_path / "nope.ckpt"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("tlframe adapt: error:") and "nope.ckpt" in missing.stderr
    unknown = tlframe("adapt", "--checkpoint", str(trained), "--model.lr=1", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown option --model.lr=1" in unknown.stderr and "tlframe adapt takes" in unknown.stderr
    assert not (tmp_path / "x" / "adapt.json").exists()
