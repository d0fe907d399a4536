"""Fault tolerance: a run killed with SIGKILL mid-epoch and resumed from ``last.ckpt`` ends exactly like an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tlframe.cli import main

ROOT = Path(__file__).resolve().parents[1]
ITERS = 6  # batches per epoch
# DANN with dropout and random crop/flip: every source of randomness a run has (data order, augmentation,
# dropout, the GRL schedule, the LR schedule) must come back identical after the resume; with BBSE label-shift
# weights re-estimated at every epoch start (a resume mid-epoch keeps the weights of the epoch it resumes).
# And Mean Teacher: an EMA model of its own and two random views of each target image.
COMMON = ["-c", str(ROOT / "configs" / "quickstart.yaml"),
          "--data.source.init_args.num_train=200", "--data.target.init_args.num_train=200",
          "--data.source.init_args.num_test=64", "--data.target.init_args.num_test=64",
          "--data.batch_size=16", f"--data.iters_per_epoch={ITERS}", "--data.train_augmentation=crop_flip",
          "--model.bottleneck_dropout=0.5",
          "--trainer.max_epochs=4", "--trainer.deterministic=true", "--checkpoint.every_n_train_steps=4",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
STRATEGIES = {
    "dann_bbse": ["--model.strategy=tlframe.strategies.DANN", "--model.strategy.grl_max_steps=10",
                  "--model.strategy.label_shift=bbse", "--model.strategy.label_shift_start_epoch=1"],
    # an EMA teacher (its own state, updated after every optimizer step) and seeded weak + strong target views
    "mean_teacher": ["--model.strategy=tlframe.strategies.MeanTeacher", "--model.strategy.ema_decay=0.9",
                     "--model.strategy.rampup_steps=10"],
    # two optimizers and schedulers, 3 + num_k optimizer steps per batch (global_step counts each)
    "mcd": ["--model.strategy=tlframe.strategies.MCD", "--model.strategy.num_k=2",
            "--model.strategy.classifier_width=64", "--checkpoint.every_n_train_steps=20"],
}
#: optimizer steps (trainer.global_step) per batch
PER_BATCH = {"mcd": 3 + 2}


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def _same(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, equal element by element (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _kill_when_last_ckpt_is_mid_epoch(proc: subprocess.Popen, last: Path, per_batch: int = 1,
                                     timeout: float = 240.0) -> int:
    """Freeze the run each time last.ckpt changes; SIGKILL it when that checkpoint is mid-epoch. Returns its step."""
    seen, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and last.stat().st_mtime_ns != seen:
            proc.send_signal(signal.SIGSTOP)
            seen = last.stat().st_mtime_ns
            step = _state(last)["global_step"]
            if (step // per_batch) % ITERS:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return step
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run ended before a mid-epoch checkpoint could be interrupted")


def _val_lines(out: str) -> list[str]:
    """The ``val/...`` lines of a run's printed results."""
    return [line for line in out.splitlines() if line.strip().startswith("val/")]


def _full_then_killed_and_resumed(tmp_path, capsys, args: list[str], per_batch: int = 1):
    """Run ``args`` uninterrupted; run them again, SIGKILL mid-epoch, resume from last.ckpt. Returns both final
    checkpoints and both runs' printed output."""
    main(["fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path}/full"])
    full_out = capsys.readouterr().out
    reference = _state(tmp_path / "full" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    assert reference["global_step"] == 4 * ITERS * per_batch

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tlframe", "fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path}/killed"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed" / "quickstart" / "version_0" / "checkpoints"
    step = _kill_when_last_ckpt_is_mid_epoch(proc, run / "last.ckpt", per_batch)
    assert proc.returncode == -signal.SIGKILL and 0 < step < 4 * ITERS * per_batch and (step // per_batch) % ITERS
    killed_at = _state(run / "last.ckpt")  # complete and loadable: written atomically
    assert killed_at["global_step"] == step

    main(["fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path}/killed", f"--ckpt_path={run / 'last.ckpt'}"])
    resumed_out = capsys.readouterr().out
    resumed = _state(tmp_path / "killed" / "quickstart" / "version_1" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"]
    return reference, resumed, full_out, resumed_out


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, capsys, strategy):
    per_batch = PER_BATCH.get(strategy, 1)
    reference, resumed, full_out, resumed_out = _full_then_killed_and_resumed(
        tmp_path, capsys, [*COMMON, *STRATEGIES[strategy]], per_batch)
    if strategy == "dann_bbse":
        assert int(reference["state_dict"]["strategy.label_shift_epoch"]) == 3  # re-estimated at epochs 1, 2, 3
    elif strategy == "mcd":  # both optimizers' and schedulers' states come back too
        assert len(resumed["optimizer_states"]) == len(resumed["lr_schedulers"]) == 2
        assert _same(resumed["optimizer_states"], reference["optimizer_states"])
        assert _same(resumed["lr_schedulers"], reference["lr_schedulers"])
    else:  # the teacher followed steps 1 .. 23 (applied before each step's forward)
        assert int(reference["state_dict"]["strategy.terms.0.teacher.ema_step"]) == 4 * ITERS - 1
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert _val_lines(resumed_out) == _val_lines(full_out) and len(_val_lines(full_out)) == 11  # with entropy, SND, IM, DEV, A-distance


def test_source_free_shot_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, capsys):
    """SHOT phase 2 (no source data; pseudo-labels per target image in ``strategy._extra_state``): the resumed run
    loads the killed run's labels into a fresh model and ends bit for bit like the uninterrupted one."""
    shot_model = ["--model.weight_norm_classifier=true"]
    main(["fit", *COMMON, *shot_model, "--trainer.max_epochs=1", f"--trainer.logger.init_args.save_dir={tmp_path}/source"])
    capsys.readouterr()
    source = tmp_path / "source" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    args = [*[a for a in COMMON if not a.startswith("--data.source.")], *shot_model, "--data.source=null",
            "--model.strategy=tlframe.strategies.SHOT", f"--model.weights={source}", "--model.weights_head=true"]
    reference, resumed, full_out, resumed_out = _full_then_killed_and_resumed(tmp_path / "shot", capsys, args)
    labels = reference["state_dict"]["strategy._extra_state"]
    assert int(labels[0]) == 3 and labels.shape == (1 + 200,)  # labelled at epoch 3, one label per target image
    assert _same(resumed["state_dict"], reference["state_dict"])
    assert _val_lines(resumed_out) == _val_lines(full_out) and any("val/target_acc" in m for m in _val_lines(full_out))


def test_several_domains_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, capsys):
    """Leave one domain out with three domains' samplers and GroupDRO's domain weights q (extra state): the same
    promise as above."""
    import yaml

    domains = [{"class_path": "tlframe.data.SyntheticDomain",
                "init_args": {"style": style, "num_train": 120, "num_test": 32, "seed": seed}}
               for style, seed in (("source", 0), ("source", 2), ("target", 1), ("target", 3))]
    small = tmp_path / "domains.yaml"
    small.write_text(yaml.safe_dump({"data": {"domains": domains}}))
    args = ["-c", str(ROOT / "configs" / "quickstart_domains.yaml"), "-c", str(small), "--data.test_domain=3",
            "--data.batch_size=8", f"--data.iters_per_epoch={ITERS}", "--data.train_augmentation=crop_flip",
            "--model.strategy=tlframe.strategies.GroupDRO", "--model.strategy.groupdro_eta=1.0",
            "--trainer.max_epochs=4", "--trainer.deterministic=true", "--checkpoint.every_n_train_steps=4",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    main(["fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path}/full"])
    capsys.readouterr()
    reference = _state(tmp_path / "full" / "quickstart_domains" / "version_0" / "checkpoints" / "last.ckpt")
    assert reference["global_step"] == 4 * ITERS
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tlframe", "fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path}/killed"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "killed" / "quickstart_domains" / "version_0" / "checkpoints"
    step = _kill_when_last_ckpt_is_mid_epoch(proc, run / "last.ckpt")
    assert proc.returncode == -signal.SIGKILL and step % ITERS
    main(["fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path}/killed", f"--ckpt_path={run / 'last.ckpt'}"])
    resumed = _state(tmp_path / "killed" / "quickstart_domains" / "version_1" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"]
    assert any(k.endswith("_extra_state") for k in reference["state_dict"])  # GroupDRO's q
    for key, value in reference["state_dict"].items():
        assert _same(value, resumed["state_dict"][key]), key
    assert _same(resumed["optimizer_states"], reference["optimizer_states"])
