"""One finished-or-not run as a subprocess, resumably; its final metrics from TensorBoard events.

The contract shared by ``tlframe sweep`` and the benchmark scripts:

- a run lives in its own directory; ``done.json`` there (written atomically, only after the
  process exited with 0 and its metrics were read) means *finished*: the run is never redone **while its
  command still asks for it**: ``attempt.json`` keeps the command's :func:`content_identity` (its arguments and
  the contents of the files it names); once they change (an edited config, other weights), the finished run is
  *stale*: it is kept, renamed ``<run dir>.superseded-<UTC time>``, and the run starts again, so a table never
  shows a result of a command it no longer runs;
- an **interrupted** attempt (killed by a signal, or its process gone with the caller: a crash, ``kill -9``, a
  SLURM time limit or preemption) **resumes from its ``last.ckpt``** (``--ckpt_path``, bit-exact as any tlframe
  resume) when the spec names that checkpoint (:attr:`RunSpec.checkpoint`), the checkpoint is complete and the
  command is the same, including the contents of every file it names (``attempt.json`` keeps that identity);
- any other directory without ``done.json`` (a failed attempt, an edited command or config, no usable
  checkpoint) is cleared and run again from scratch, so a half-finished run is never counted;
- a failed attempt writes ``failed.json`` (exit code, log tail) and the caller moves on;
- the process output goes to ``output.log`` in the run directory;
- a run is **locked** while it runs: ``<run_dir>.lock`` is created exclusively (``O_CREAT | O_EXCL``, which
  also holds on NFS and other shared file systems, so SLURM array tasks and several sweep processes on one
  folder never run the same run twice) and its modification time is refreshed every
  :data:`LOCK_HEARTBEAT_S`; another process finds it held and moves on ("busy"). The lock also names the
  run's process (``child``). A lock whose holder died is taken over: on the same host once the holder's pid
  *and* the run's are gone (a run orphaned by a killed sweep keeps its lock until it ends), from another host
  once nobody refreshed it for :data:`LOCK_STALE_S`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from tlframe.atomic import atomic_write_text

__all__ = ["MetricError", "RunOutcome", "RunLock", "read_scalars", "scalar_stats", "write_json_atomic", "execute_run",
           "DONE", "FAILED", "ATTEMPT", "log_tail", "command_identity", "content_identity", "stale_reason",
           "worker_thread_env"]

DONE, FAILED, ATTEMPT = "done.json", "failed.json", "attempt.json"
#: Seconds between refreshes of a held run lock, and age after which a lock nobody refreshes is stale.
LOCK_HEARTBEAT_S, LOCK_STALE_S = 30.0, 600.0


class MetricError(RuntimeError):
    """A run finished but its events do not hold what the caller needs."""


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard events, ``tag -> [(step, value), ...]`` in logging order.

    Uses TensorBoard's own reader (``EventAccumulator``, all events kept, no sampling), one events file at a
    time in the order they were written (their names start with the creation time). A later file is a resumed
    attempt: where it logs a tag, its points replace the earlier files' points of that tag from its first step
    on (what an interrupted attempt logged after its last checkpoint was trained again).
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    files = sorted(Path(run_dir).glob("events.out.tfevents.*"))
    if not files:
        raise MetricError(f"no TensorBoard events file in {run_dir}")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()[SCALARS]:
            points = [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
            if points:
                scalars[tag] = [p for p in scalars.get(tag, []) if p[0] < points[0][0]] + points
    return scalars


def scalar_stats(scalars: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, dict[str, Any]]:
    """Per tag: ``last`` value (and its ``step``), ``max``, ``min`` over the logged values and their ``count``."""
    out = {}
    for tag, points in sorted(scalars.items()):
        if points:
            values = [v for _, v in points]
            out[tag] = {"last": values[-1], "step": points[-1][0], "max": max(values), "min": min(values),
                        "count": len(values)}
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically (never a half-written file)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_thread_env(workers: int, cpus: Optional[int] = None,
                      environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Environment that splits the CPU cores between ``workers`` concurrent runs.

    Each run's torch would otherwise start one intra-op thread per core, and ``workers`` runs
    oversubscribe the machine. Returns ``{OMP_NUM_THREADS, MKL_NUM_THREADS: max(1, cpus // workers)}``
    when ``workers > 1``; ``{}`` for one worker or when the user already set ``OMP_NUM_THREADS``.
    """
    environ = os.environ if environ is None else environ
    if workers <= 1 or "OMP_NUM_THREADS" in environ:
        return {}
    threads = str(max(1, (cpus or os.cpu_count() or 1) // workers))
    return {var: threads for var in THREAD_VARS}


def _alive(pid: Any) -> bool:
    """Whether a process ``pid`` exists on this host (False for a non-int)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunLock:
    """``<run_dir>.lock``: at most one process runs a run, across processes and hosts sharing the folder.

    ``acquire()`` returns False when another live process holds it (see the module docstring); the holder
    refreshes the file's mtime from a daemon thread and ``release()`` removes it.
    """

    def __init__(self, run_dir: Path, heartbeat_s: float = LOCK_HEARTBEAT_S, stale_s: float = LOCK_STALE_S) -> None:
        self.path = Path(str(run_dir) + ".lock")
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.taken_over: Optional[float] = None  # mtime of the stale lock this one replaced (time.time() scale)

    def holder(self) -> Optional[dict[str, Any]]:
        """Who holds the lock (host, pid, since), or None when it is free."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now: held

    def _stale(self) -> bool:
        holder = self.holder()
        if holder is None:
            return False
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            # this host: stale once the holder and the run it started are both gone, however old
            return not any(_alive(holder.get(k)) for k in ("pid", "child"))
        return age > self.stale_s

    def note_child(self, pid: int) -> None:
        """Record the run's process in the lock: while it lives (an orphan of a killed holder) the lock stays held."""
        holder = self.holder() or {}
        atomic_write_text(self.path, json.dumps({**self.me, "since": holder.get("since", utc_now()), "child": pid}))

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "since": utc_now()}, f)
        return True

    def acquire(self) -> bool:
        if not self._create():
            if not self._stale():
                return False
            try:  # break the stale lock: only one process wins the rename
                self.taken_over = self.path.stat().st_mtime  # the dead holder's last sign of life
                os.rename(self.path, f"{self.path}.stale.{self.me['host']}.{self.me['pid']}")
            except FileNotFoundError:
                return False
            if not self._create():
                return False
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        for stale in self.path.parent.glob(self.path.name + ".stale.*"):
            stale.unlink(missing_ok=True)


@dataclass
class RunOutcome:
    status: str                          # "done" (ran now), "skipped" (done.json found), "failed" or "busy"
                                         # (another process holds the run's lock)
    record: Optional[dict[str, Any]] = None
    error: str = ""
    wall_s: float = 0.0
    superseded: Optional[str] = None     # where a stale finished run was moved before this one ran
    stale_reason: Optional[str] = None   # why it was stale (:func:`stale_reason`)

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")

    @property
    def resumed_from(self) -> Optional[str]:
        """The checkpoint the last attempt resumed from (None: it started from scratch, or nothing ran)."""
        attempts = (self.record or {}).get("attempts") or []
        return attempts[-1].get("resumed_from") if attempts else None


@dataclass
class RunSpec:
    """What :func:`execute_run` needs: where, which command, with which extra environment."""

    run_dir: Path
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    needs: list[Path] = field(default_factory=list)   # files that must exist before starting (e.g. weights)
    cwd: Optional[Path] = None
    header: str = ""                                  # first line of output.log (the command)
    events_dir: Optional[Path] = None                 # where the TensorBoard events are (default run_dir)
    first_files: dict[str, Any] = field(default_factory=dict)  # JSON files written into run_dir before starting
    checkpoint: Optional[Path] = None                 # the run's last.ckpt: an interrupted attempt resumes from it


def default_summary(scalars: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, Any]:
    """``done.json``'s ``scalars`` field (:func:`scalar_stats` of every logged tag) and ``selection``: the checkpoint
    each of DomainBed's model-selection methods picks and its test accuracy
    (:func:`tlframe.model_selection.run_selections`; empty when none applies)."""
    from tlframe.model_selection import run_selections

    return {"scalars": scalar_stats(scalars), "selection": run_selections(scalars)}


def execute_run(spec: RunSpec, extra: Optional[Mapping[str, Any]] = None,
                summarize: Callable[[dict[str, list[tuple[int, float]]]], dict[str, Any]] = default_summary,
                ) -> RunOutcome:
    """Run ``spec.argv`` unless ``done.json`` exists; see the module docstring.

    ``summarize`` turns the run's scalars into ``done.json`` fields (it may raise :class:`MetricError`:
    the run then counts as failed); ``extra`` fields are added to ``done.json`` (and ``failed.json``).
    """
    done = spec.run_dir / DONE
    stale = stale_reason(spec) if done.is_file() else None
    if done.is_file() and stale is None:
        return RunOutcome("skipped", json.loads(done.read_text()))
    missing = [str(p) for p in spec.needs if not Path(p).is_file()]
    if missing:
        return RunOutcome("failed", error=f"not run: {', '.join(missing)} missing")
    lock = RunLock(spec.run_dir)
    if not lock.acquire():
        holder = lock.holder() or {}
        return RunOutcome("busy", error=f"running elsewhere (lock {lock.path} held by {holder.get('host', '?')} "
                                        f"pid {holder.get('pid', '?')} since {holder.get('since', '?')})")
    try:
        superseded = None
        if done.is_file():
            stale = stale or stale_reason(spec)  # done.json may come from the process that held the lock before us
            if stale is None:
                return RunOutcome("skipped", json.loads(done.read_text()))
            superseded = str(_supersede(spec.run_dir))
        return replace(_execute_locked(spec, extra, summarize, lock), superseded=superseded, stale_reason=stale)
    finally:
        lock.release()


def stale_reason(spec: RunSpec) -> Optional[str]:
    """Why the run in ``spec.run_dir`` was made by another command than ``spec.argv`` (None: the same one, or no
    record says: a run from before ``attempt.json`` kept its identity counts as the same).

    Compares :func:`content_identity` (or, for runs recorded before it existed, :func:`command_identity`) with
    what ``attempt.json`` kept."""
    try:
        attempt = json.loads((spec.run_dir / ATTEMPT).read_text())
    except (OSError, ValueError):
        return None
    if "content_identity" in attempt:
        now = content_identity(spec.argv, spec.cwd, outputs=spec.run_dir)
        kept = attempt["content_identity"]
    elif "identity" in attempt:
        now, kept = command_identity(spec.argv, spec.cwd), attempt["identity"]
    else:
        return None
    if now == kept:
        return None
    before = attempt.get("argv")
    changed = "its arguments changed" if before is not None and list(before) != list(spec.argv) else \
        "a file it names (config, weights) changed"
    return f"{changed} since it ran"


def _supersede(run_dir: Path) -> Path:
    """Move a stale finished run out of the way (nothing is deleted): ``<run_dir>.superseded-<UTC time>``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = run_dir.with_name(f"{run_dir.name}.superseded-{stamp}")
    run_dir.rename(target)
    return target


def command_identity(argv: Sequence[str], cwd: Optional[Path] = None) -> str:
    """SHA-256 of a command and of the contents of every existing file it names (``-c FILE``, ``--key=FILE``).

    Two attempts of a run with the same identity train the same thing (up to the installed code), so the
    second may resume from the first's checkpoint; an edited config or weights file changes it.
    """
    return _argv_digest(argv, cwd)


def content_identity(argv: Sequence[str], cwd: Optional[Path] = None, outputs: Optional[Path] = None) -> str:
    """SHA-256 of what a command computes, wherever the checkout lives: every argument with the working folder
    ``cwd`` written as ``<cwd>``, and the contents of every existing file it names (``-c FILE``, ``--key=FILE``)
    except files under ``outputs`` (the run's own folder: what the run writes there is not its input).

    Equal for the same command run from a moved checkout; different after an edit of a config or weights file."""
    return _argv_digest(argv, cwd, portable=True, outputs=outputs)


def _argv_digest(argv: Sequence[str], cwd: Optional[Path], portable: bool = False,
                 outputs: Optional[Path] = None) -> str:
    """The identities' common digest: each argument (``cwd`` as ``<cwd>`` when ``portable``), then the content
    digest of each existing file it names, outside ``outputs``."""
    h = hashlib.sha256()
    root = str(Path(cwd).resolve()) if portable and cwd is not None else None
    out = None if outputs is None else Path(outputs).resolve()
    for arg in argv:
        h.update(b"arg\0" + (arg.replace(root, "<cwd>") if root else arg).encode() + b"\0")
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        path = Path(value) if Path(value).is_absolute() or cwd is None else Path(cwd) / value
        try:
            if value and path.is_file() and (out is None or not path.resolve().is_relative_to(out)):
                h.update(b"file\0" + _file_digest(path))
        except OSError:
            pass
    return h.hexdigest()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def _resume_point(spec: RunSpec, identity: str) -> tuple[Optional[Path], list[dict[str, Any]]]:
    """The checkpoint an interrupted attempt of ``spec`` left (None: start from scratch) and its attempts so far."""
    if spec.checkpoint is None or not spec.run_dir.is_dir():
        return None, []
    try:
        attempt = json.loads((spec.run_dir / ATTEMPT).read_text())
    except (OSError, ValueError):
        return None, []
    try:
        failed = json.loads((spec.run_dir / FAILED).read_text())
    except FileNotFoundError:
        failed = {"interrupted": True}
    except (OSError, ValueError):
        failed = {}
    if (attempt.get("identity") != identity or not failed.get("interrupted")
            or not zipfile.is_zipfile(spec.checkpoint)):  # torch.save writes a zip archive; a torn one is not
        return None, []
    return Path(spec.checkpoint), list(attempt.get("attempts") or [])


def _estimate_wall(attempt: dict[str, Any], run_dir: Path, lock: Optional[RunLock]) -> dict[str, Any]:
    """``attempt`` with ``wall_s`` up to its last sign of life: the newest file it wrote, or the last heartbeat of
    the lock its dead runner held (``wall_s_estimated: true``)."""
    ends = [p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file() and p.name != ATTEMPT]
    if lock is not None and lock.taken_over is not None:
        ends.append(lock.taken_over)
    try:
        start = _dt.datetime.fromisoformat(attempt["started_utc"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return {**attempt, "wall_s": 0.0, "wall_s_estimated": True}
    return {**attempt, "wall_s": round(max([start, *ends]) - start, 2), "wall_s_estimated": True}


def _execute_locked(spec: RunSpec, extra: Optional[Mapping[str, Any]],
                    summarize: Callable[[dict[str, list[tuple[int, float]]]], dict[str, Any]],
                    lock: Optional[RunLock] = None) -> RunOutcome:
    done, failed = spec.run_dir / DONE, spec.run_dir / FAILED
    identity = command_identity(spec.argv, spec.cwd)
    content = content_identity(spec.argv, spec.cwd, outputs=spec.run_dir)
    resume, attempts = _resume_point(spec, identity)
    if attempts and "wall_s" not in attempts[-1]:  # it died with its runner: it ended at the last sign of life
        attempts[-1] = _estimate_wall(attempts[-1], spec.run_dir, lock)
    argv = list(spec.argv) + ([f"--ckpt_path={resume}"] if resume is not None else [])
    if resume is None and spec.run_dir.exists():  # left over from a failed or changed attempt: start clean
        shutil.rmtree(spec.run_dir)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    attempts.append({"started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                     "host": socket.gethostname(),
                     "resumed_from": None if resume is None else str(resume)})
    write_attempts = lambda: write_json_atomic(  # noqa: E731
        spec.run_dir / ATTEMPT, {"identity": identity, "content_identity": content,
                                 "argv": list(spec.argv), "attempts": attempts})
    write_attempts()
    base = {**(extra or {}), "argv": list(spec.argv), "run_dir": str(spec.run_dir), "attempts": attempts}
    for name, obj in spec.first_files.items():
        write_json_atomic(spec.run_dir / name, obj)
    output = spec.run_dir / "output.log"
    start = time.perf_counter()
    with output.open("a" if resume is not None else "w") as f:
        if resume is not None:
            f.write(f"\n\n# {utc_now()}: the attempt above was interrupted; resuming from {resume}\n")
        f.write((spec.header or " ".join(spec.argv)) + (f" --ckpt_path={resume}" if resume is not None else "") + "\n\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **spec.env},
                                cwd=spec.cwd)
        if lock is not None:
            lock.note_child(proc.pid)
        proc.wait()
    wall = time.perf_counter() - start
    attempts[-1]["wall_s"] = round(wall, 2)
    write_attempts()
    total = round(sum(a["wall_s"] for a in attempts), 2)
    error = ""
    record: dict[str, Any] = {}
    if proc.returncode < 0:  # killed by a signal: interrupted, not failed by itself
        error = f"interrupted by signal {-proc.returncode}; see {output}"
    elif proc.returncode != 0:
        error = f"exit code {proc.returncode}; see {output}"
    else:
        try:
            record = summarize(read_scalars(spec.events_dir or spec.run_dir))
        except MetricError as err:
            error = str(err)
    if error:
        write_json_atomic(failed, {**base, "exit_code": proc.returncode, "error": error, "log_tail": log_tail(output),
                                   "interrupted": proc.returncode < 0, "wall_s": total,
                                   "finished_utc": utc_now()})
        return RunOutcome("failed", error=error, wall_s=wall)
    record = {**base, **record, "wall_s": total, "finished_utc": utc_now()}
    write_json_atomic(done, record)
    return RunOutcome("done", record, wall_s=wall)
