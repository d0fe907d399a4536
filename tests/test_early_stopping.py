"""Early stopping (``early_stopping.*``): label-free by default, recorded, last.ckpt kept, final across a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlframe.callbacks import TransferEarlyStopping, uses_target_labels
from tlframe.cli import main

ROOT = Path(__file__).resolve().parents[1]
ITERS = 2  # batches per epoch
# A tiny run whose monitor cannot improve after the first validation: val/source_acc would have to rise by more
# than min_delta = 1, so with patience 1 the run stops at the end of epoch 1 (step 4) instead of running 6 epochs.
ARGS = ["-c", str(ROOT / "configs" / "quickstart.yaml"),
        "--data.source.init_args.num_train=120", "--data.target.init_args.num_train=120",
        "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32",
        "--data.batch_size=16", f"--data.iters_per_epoch={ITERS}", "--trainer.max_epochs=6",
        "--insights.a_distance=false", "--insights.projector=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
STOP = ["--early_stopping.enabled=true", "--early_stopping.patience=1", "--early_stopping.min_delta=1.0"]


def fit(save_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m tlframe fit`` in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "tlframe", "fit", *ARGS, f"--trainer.logger.init_args.save_dir={save_dir}",
                           *extra], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run that stopped early: (its folder, the command's stdout)."""
    save_dir = tmp_path_factory.mktemp("early")
    proc = fit(save_dir, *STOP)
    return save_dir, save_dir / "quickstart" / "version_0", proc.stdout


def test_a_run_whose_monitor_cannot_improve_stops_early_and_says_why(stopped_run):
    _, run, out = stopped_run
    last = state(run / "checkpoints" / "last.ckpt")  # still written
    assert last["global_step"] == 2 * ITERS < 6 * ITERS  # epochs 0 and 1 of 6
    record = json.loads((run / "early_stop.json").read_text())
    assert record["monitor"] == "val/source_acc" and record["mode"] == "max" and record["reason"] == "patience_exhausted"
    assert (record["epoch"], record["step"]) == (1, 2 * ITERS)
    assert (record["best_epoch"], record["best_step"]) == (0, ITERS)
    assert record["best_value"] == pytest.approx(float(last["callbacks"]["TransferEarlyStopping"]["best_score"]))
    assert record["ended_on_resume"] is False
    # the final summary says it, next to the metrics
    line = next(x for x in out.splitlines() if x.strip().startswith("early stop:"))
    assert "stopped at epoch 1, step 4: val/source_acc did not improve by more than 1 in 1 validation(s)" in line
    assert "best " in line and "early_stop.json" in line
    assert len([x for x in out.splitlines() if x.strip().startswith("val/")]) == 10  # the usual metrics (A-distance off)
    # the stop is in the checkpoint's callback state
    saved = last["callbacks"]["TransferEarlyStopping"]
    assert saved["stop"]["step"] == 2 * ITERS and saved["wait_count"] == 1 and saved["stopped_epoch"] == 1


def test_resuming_a_stopped_run_does_not_train_further(stopped_run):
    save_dir, run, _ = stopped_run
    proc = fit(save_dir, *STOP, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert "tlframe: not training further: the run of this checkpoint stopped early at epoch 1, step 4" in proc.stdout
    assert "--early_stopping.resume=true" in proc.stdout
    resumed = sorted((save_dir / "quickstart").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    assert state(resumed / "checkpoints" / "last.ckpt")["global_step"] == 2 * ITERS  # no step added
    assert json.loads((resumed / "early_stop.json").read_text())["ended_on_resume"] is True


def test_a_recorded_stop_holds_when_early_stopping_is_switched_off(stopped_run):
    save_dir, run, _ = stopped_run
    proc = fit(save_dir, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")  # no early_stopping.* at all
    assert "not training further" in proc.stdout
    resumed = sorted((save_dir / "quickstart").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    assert state(resumed / "checkpoints" / "last.ckpt")["global_step"] == 2 * ITERS


def test_resume_option_trains_on(stopped_run):
    save_dir, run, _ = stopped_run
    proc = fit(save_dir, *STOP, "--early_stopping.resume=true", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert "training on with the patience counter reset" in proc.stdout
    resumed = sorted((save_dir / "quickstart").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    step = state(resumed / "checkpoints" / "last.ckpt")["global_step"]
    assert step == 3 * ITERS  # one more epoch, then the (reset) patience of 1 runs out again
    record = json.loads((resumed / "early_stop.json").read_text())
    assert (record["epoch"], record["step"], record["ended_on_resume"]) == (2, 3 * ITERS, False)
    assert record["best_epoch"] == 0  # the best value was kept across the resume


def test_off_by_default_and_no_record(tmp_path, capsys):
    main(["fit", *ARGS, f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=2"])
    out = capsys.readouterr().out
    run = tmp_path / "quickstart" / "version_0"
    assert "early stop" not in out and not (run / "early_stop.json").exists()
    last = state(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 * ITERS and last["callbacks"]["TransferEarlyStopping"]["stop"] is None


def test_target_label_monitors_are_refused_unless_allowed(tmp_path, capsys):
    assert uses_target_labels("val/target_acc") and uses_target_labels("val/target_mean_class_acc")
    assert uses_target_labels("val/target_loss")
    assert not any(uses_target_labels(m) for m in ("val/source_acc", "val/target_snd", "val/target_entropy",
                                                   "val/target_im", "val/target_dev", "val/a_distance"))
    with pytest.raises(SystemExit) as err:
        main(["fit", *ARGS, f"--trainer.logger.init_args.save_dir={tmp_path}", "--early_stopping.enabled=true",
              "--early_stopping.monitor=val/target_acc"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "computed from target labels" in message and "early_stopping.allow_target_labels=true" in message
    assert not (tmp_path / "quickstart" / "version_0" / "checkpoints").exists()  # refused before training
    # knowingly: accepted (and warned at the start of the run); disabled: the monitor is not judged
    TransferEarlyStopping(enabled=True, monitor="val/target_acc", allow_target_labels=True)
    TransferEarlyStopping(enabled=False, monitor="val/target_acc")
    with pytest.raises(ValueError, match="patience"):
        TransferEarlyStopping(patience=0)


def test_a_monitor_the_run_does_not_log_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["fit", *ARGS, f"--trainer.logger.init_args.save_dir={tmp_path}", "--early_stopping.enabled=true",
              "--early_stopping.monitor=val/source_accuracy", "--trainer.max_epochs=1"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "early_stopping.monitor='val/source_accuracy' is not logged by this run" in message
    assert "val/source_acc" in message and "Traceback" not in message


def test_state_survives_a_checkpoint_and_a_stop_survives_another_monitor():
    a = TransferEarlyStopping(enabled=True, patience=2)
    a.wait_count, a.stopped_epoch, a.best_score, a.best_epoch, a.best_step = 2, 5, torch.tensor(0.7), 3, 30
    a.stop = {"monitor": "val/source_acc", "epoch": 5, "step": 60}
    saved = a.state_dict()
    b = TransferEarlyStopping(enabled=True, patience=4)
    b.load_state_dict(saved)
    assert (b.wait_count, b.stopped_epoch, b.best_epoch, b.best_step) == (2, 5, 3, 30)
    assert float(b.best_score) == pytest.approx(0.7)
    assert b.stop == a.stop and b.patience == 4  # the configured patience, not the checkpoint's
    c = TransferEarlyStopping(enabled=True, monitor="val/target_snd")
    c.load_state_dict(saved)
    assert c.stop == a.stop and c.wait_count == 0 and c.best_epoch is None  # another metric: counters start afresh
    assert a.state_key == b.state_key == c.state_key == "TransferEarlyStopping"
