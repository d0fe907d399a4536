"""``tlframe.runs``: the run lock that keeps two processes (or SLURM tasks) from running one run twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tlframe.runs import RunLock, RunSpec, execute_run


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
