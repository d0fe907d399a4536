"""``tlframe.runs``: the run lock that keeps two processes (or SLURM tasks) from running one run twice."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tlframe.runs import RunLock, RunSpec, command_identity, content_identity, execute_run, stale_reason


def test_a_held_lock_is_refused_until_released(tmp_path):
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    assert first.acquire()
    assert first.path == tmp_path / "run.lock" and json.loads(first.path.read_text())["pid"] == os.getpid()
    assert not second.acquire()  # same host, live pid, fresh: held
    first.release()
    assert not first.path.exists() and second.acquire()
    second.release()


def test_the_lock_of_a_dead_process_or_a_silent_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = RunLock(tmp_path / "a")
    lock.path.write_text(json.dumps({"host": lock.me["host"], "pid": int(dead.stdout), "since": "then"}))
    assert lock.acquire() and json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # the broken lock's remains are cleaned up too
    other = RunLock(tmp_path / "b", stale_s=60)
    other.path.write_text(json.dumps({"host": "another-node", "pid": 1, "since": "then"}))
    assert not other.acquire()  # another host, refreshed recently: held
    old = time.time() - 120
    os.utime(other.path, (old, old))
    assert other.acquire()  # no heartbeat for longer than stale_s: its holder is gone
    other.release()


def test_the_lock_of_a_dead_holder_stays_held_while_the_run_it_started_lives(tmp_path):
    """A sweep killed alone leaves its ``tlframe fit`` running: nobody may resume that run under its feet."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = RunLock(tmp_path / "run", stale_s=0.0)  # even a lock nobody refreshes: the host can see its processes
        lock.path.write_text(json.dumps({"host": lock.me["host"], "pid": int(dead.stdout), "since": "then",
                                         "child": orphan.pid}))
        assert not lock.acquire()
    finally:
        orphan.kill()
        orphan.wait()
    assert lock.acquire()  # holder and run both gone
    lock.release()


def test_execute_run_names_the_run_process_in_its_lock(tmp_path):
    spec = RunSpec(tmp_path / "run", [sys.executable, "-c", "import time; time.sleep(30)"])
    thread = threading.Thread(target=execute_run, args=(spec,), daemon=True)
    thread.start()
    lock, deadline = RunLock(spec.run_dir), time.monotonic() + 20
    while time.monotonic() < deadline and "child" not in (lock.holder() or {}):
        time.sleep(0.05)
    holder = lock.holder()
    assert holder["pid"] == os.getpid() and holder["child"] != os.getpid()
    os.kill(holder["child"], 9)  # the run's process: the attempt ends as interrupted, the lock is released
    thread.join(timeout=20)
    assert not thread.is_alive() and lock.holder() is None
    assert json.loads((spec.run_dir / "failed.json").read_text())["interrupted"] is True


def test_the_holder_refreshes_its_lock(tmp_path):
    lock = RunLock(tmp_path / "run", heartbeat_s=0.05)
    assert lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()


def test_execute_run_skips_a_run_held_by_another_process(tmp_path):
    spec = RunSpec(tmp_path / "run", [sys.executable, "-c", "pass"])
    holder = RunLock(spec.run_dir)
    assert holder.acquire()
    outcome = execute_run(spec)
    assert outcome.status == "busy" and not outcome.ok and "running elsewhere" in outcome.error
    assert not spec.run_dir.exists()  # nothing of the other process's run was touched
    holder.release()


# --------------------------------------------------------------------------- resuming an interrupted attempt
#: A stand-in for ``tlframe fit``: logs ``val/x`` at steps [start, 6) (start = 3 when given --ckpt_path, the
#: checkpoint's step), writes ``checkpoints/last.ckpt`` (a zip archive, as torch.save writes) at step 3, and
#: kills itself with SIGKILL after step 4 when FAKE_FIT_DIE=1 (the interruption; the environment is not part of
#: the command's identity), else exits 0.
FAKE_FIT = """
import os, signal, sys, time, zipfile
from pathlib import Path
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
run, config = Path(sys.argv[1]), sys.argv[2]
resume = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--ckpt_path=")]
print("resuming from", resume[0] if resume else "nothing", "config", config, flush=True)
writer = EventFileWriter(str(run))
for step in range(3 if resume else 0, 6):
    value = step + (100 if resume else 0)
    writer.add_event(Event(wall_time=time.time(), step=step,
                           summary=Summary(value=[Summary.Value(tag="val/x", simple_value=value)])))
    writer.flush()
    if step == 3 and not resume:
        (run / "checkpoints").mkdir(exist_ok=True)
        with zipfile.ZipFile(run / "checkpoints" / "last.ckpt", "w") as z:
            z.writestr("step", "3")
    if step == 4 and os.environ.get("FAKE_FIT_DIE") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
writer.close()
"""


def _fake_fit_spec(tmp_path: Path) -> tuple[RunSpec, Path]:
    script, config = tmp_path / "fake_fit.py", tmp_path / "config.yaml"
    script.write_text(FAKE_FIT)
    config.write_text("lr: 0.1\n")
    run_dir = tmp_path / "run"
    spec = RunSpec(run_dir, [sys.executable, str(script), str(run_dir), str(config)],
                   checkpoint=run_dir / "checkpoints" / "last.ckpt")
    return spec, config


def _interrupt(spec: RunSpec) -> None:
    outcome = execute_run(dataclasses.replace(spec, env={"FAKE_FIT_DIE": "1"}))
    assert outcome.status == "failed" and outcome.error.startswith("interrupted by signal 9")
    failed = json.loads((spec.run_dir / "failed.json").read_text())
    assert failed["interrupted"] is True and failed["exit_code"] == -9
    assert zipfile.is_zipfile(spec.checkpoint)
    time.sleep(1.1)  # the next attempt's events file gets a later name (TensorBoard names them by the second)


def test_an_interrupted_run_resumes_from_its_last_checkpoint_and_keeps_the_scalars_it_logged(tmp_path):
    spec, _ = _fake_fit_spec(tmp_path)
    _interrupt(spec)
    outcome = execute_run(spec)
    assert outcome.status == "done", outcome.error
    log = (spec.run_dir / "output.log").read_text()
    assert "resuming from nothing" in log and f"resuming from {spec.checkpoint}" in log  # both attempts, in order
    assert log.index("resuming from nothing") < log.index("was interrupted; resuming from")
    # steps 0-2 from the first attempt, 3-5 from the resumed one: what the first logged after its checkpoint is dropped
    x = outcome.record["scalars"]["val/x"]
    assert (x["count"], x["min"], x["last"], x["step"]) == (6, 0.0, 105.0, 5)
    attempts = outcome.record["attempts"]
    assert [a["resumed_from"] for a in attempts] == [None, str(spec.checkpoint)]
    assert all(a["wall_s"] > 0 and "wall_s_estimated" not in a for a in attempts)  # both ends seen by execute_run
    assert outcome.record["wall_s"] == pytest.approx(sum(a["wall_s"] for a in attempts), abs=0.02)
    assert not (spec.run_dir / "failed.json").exists()
    assert json.loads((spec.run_dir / "done.json").read_text())["attempts"] == attempts


def test_a_run_killed_with_its_runner_resumes_too(tmp_path):
    """A runner killed with its run (SLURM time limit, preemption) leaves no failed.json: still an interruption."""
    spec, _ = _fake_fit_spec(tmp_path)
    _interrupt(spec)
    (spec.run_dir / "failed.json").unlink()
    attempt = json.loads((spec.run_dir / "attempt.json").read_text())
    first = attempt["attempts"][0].pop("wall_s")  # its runner died too: nobody saw it end
    (spec.run_dir / "attempt.json").write_text(json.dumps(attempt))
    outcome = execute_run(spec)
    assert outcome.status == "done" and outcome.record["attempts"][-1]["resumed_from"] == str(spec.checkpoint)
    estimated = outcome.record["attempts"][0]
    assert estimated["wall_s_estimated"] is True and first - 1.0 <= estimated["wall_s"] <= first + 1.0  # to its last file


@pytest.mark.parametrize("change", ["edited config", "failed by itself", "torn checkpoint", "no checkpoint in the spec"])
def test_a_changed_failed_or_unusable_attempt_starts_from_scratch(tmp_path, change):
    spec, config = _fake_fit_spec(tmp_path)
    _interrupt(spec)
    if change == "edited config":  # same command line, other contents: another experiment
        config.write_text("lr: 0.2\n")
    elif change == "failed by itself":  # an exit code of its own: its state may be the cause
        failed = json.loads((spec.run_dir / "failed.json").read_text())
        (spec.run_dir / "failed.json").write_text(json.dumps({**failed, "exit_code": 1, "interrupted": False}))
    elif change == "torn checkpoint":
        spec.checkpoint.write_bytes(spec.checkpoint.read_bytes()[:10])
    else:
        spec = RunSpec(spec.run_dir, spec.argv)
    first_events = sorted(spec.run_dir.glob("events.out.tfevents.*"))
    outcome = execute_run(spec)
    assert outcome.status == "done", outcome.error
    assert "resuming from nothing" in (spec.run_dir / "output.log").read_text()
    assert "interrupted" not in (spec.run_dir / "output.log").read_text()
    assert not any(p.exists() for p in first_events)  # the old attempt's files are gone
    x = outcome.record["scalars"]["val/x"]
    assert (x["count"], x["last"]) == (6, 5.0) and [a["resumed_from"] for a in outcome.record["attempts"]] == [None]


def test_command_identity_covers_the_contents_of_the_files_a_command_names(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    one = command_identity(["fit", "-c", str(config), "--x=1"])
    assert one == command_identity(["fit", "-c", str(config), "--x=1"])
    assert one != command_identity(["fit", "-c", str(config), "--x=2"])
    config.write_text("a: 2\n")
    assert one != command_identity(["fit", "-c", str(config), "--x=1"])
    weights = tmp_path / "w.ckpt"
    weights.write_bytes(b"1")
    two = command_identity([f"--model.weights={weights}"])
    weights.write_bytes(b"2")
    assert two != command_identity([f"--model.weights={weights}"])
    assert command_identity(["-c", "c.yaml"], cwd=tmp_path) == command_identity(["-c", "c.yaml"], cwd=tmp_path)
    assert command_identity(["-c", "c.yaml"], cwd=tmp_path) != command_identity(["-c", "c.yaml"], cwd=tmp_path / "x")


# --------------------------------------------------------------------------- a finished run of an older command
def test_a_finished_run_is_kept_while_its_command_is_unchanged_and_superseded_when_its_config_changes(tmp_path):
    spec, config = _fake_fit_spec(tmp_path)
    first = execute_run(spec)
    assert first.status == "done" and first.superseded is None
    assert stale_reason(spec) is None and execute_run(spec).status == "skipped"  # the same command: never redone
    config.write_text("lr: 0.2\n")  # same command line, other contents: another experiment
    assert stale_reason(spec) == "a file it names (config, weights) changed since it ran"
    second = execute_run(spec)
    assert second.status == "done" and second.superseded is not None
    assert second.stale_reason == "a file it names (config, weights) changed since it ran"
    kept = Path(second.superseded)
    assert kept.parent == spec.run_dir.parent and kept.name.startswith("run.superseded-")
    assert json.loads((kept / "done.json").read_text()) == first.record  # the old result is kept, untouched
    assert second.record["attempts"][0]["started_utc"] != first.record["attempts"][0]["started_utc"]
    assert execute_run(spec).status == "skipped"  # the new result stands for the new config
    longer = dataclasses.replace(spec, argv=[*spec.argv, "--extra"])
    assert stale_reason(longer) == "its arguments changed since it ran"


def test_a_finished_run_recorded_before_content_identities_is_judged_by_its_command_identity(tmp_path):
    spec, config = _fake_fit_spec(tmp_path)
    assert execute_run(spec).status == "done"
    attempt = json.loads((spec.run_dir / "attempt.json").read_text())
    del attempt["content_identity"]  # as attempt.json was written before
    (spec.run_dir / "attempt.json").write_text(json.dumps(attempt))
    assert stale_reason(spec) is None
    config.write_text("lr: 0.3\n")
    assert stale_reason(spec) is not None
    (spec.run_dir / "attempt.json").unlink()  # no record of its command at all: it counts as the same
    assert stale_reason(spec) is None and execute_run(spec).status == "skipped"


def test_content_identity_ignores_where_the_checkout_lives_and_what_the_run_writes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "configs").mkdir(parents=True)
        (root / "configs" / "c.yaml").write_text("lr: 0.1\n")
    argv = lambda root: ["-c", str(root / "configs" / "c.yaml"), f"--save_dir={root / 'runs'}"]  # noqa: E731
    assert content_identity(argv(a), cwd=a) == content_identity(argv(b), cwd=b)  # a moved checkout
    assert command_identity(argv(a), cwd=a) != command_identity(argv(b), cwd=b)
    (b / "configs" / "c.yaml").write_text("lr: 0.2\n")
    assert content_identity(argv(a), cwd=a) != content_identity(argv(b), cwd=b)  # an edited config
    out = a / "runs" / "r"
    out.mkdir(parents=True)
    written = ["--out", str(out / "adapt.json")]
    before = content_identity(written, cwd=a, outputs=out)
    (out / "adapt.json").write_text("{}")  # the run's own output is not an input of the command
    assert content_identity(written, cwd=a, outputs=out) == before
