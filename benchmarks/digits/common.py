"""Shared machinery of the digit benchmark scripts (``run_digits.py``, ``run_transfer.py``).

- :func:`run_cell`: run one ``tlframe fit`` as a subprocess, resumably, with the run contract of
  ``tlframe sweep`` (:func:`tlframe.runs.execute_run`): a run directory that holds ``done.json``
  is skipped, unless its config or arguments changed since (then it is kept as ``<run dir>.superseded-<time>``
  and the cell runs again); a successful run writes ``done.json`` atomically; a failed run writes ``failed.json``
  (exit code, log tail), no ``done.json``, so it is retried next time, and is reported as failed; an
  interrupted run (killed, or its runner gone) resumes from its ``last.ckpt`` when its command is unchanged.
- the **run ledger** (:data:`LEDGER`, committed with the results): every finished cell's ``done.json`` record,
  keyed by the cell's name and its identity (:func:`cell_identity`: the content of its config files and its
  arguments). Run folders live under the git-ignored ``benchmarks/runs/`` and do not survive a fresh checkout;
  a cell whose run folder is gone but whose ledger record matches its identity is *recorded* (its numbers are
  tabled, it is not run again). Change a config and the identity changes: the cell runs again.
- :func:`summarize_scalars`: the benchmark tables' numbers from a run's TensorBoard events
  (read by :func:`tlframe.runs.read_scalars`).
- :func:`format_wall`, :func:`cell_values`, :func:`grid_table`: the benchmark tables, built on
  :func:`tlframe.report.mean_std`, :func:`~tlframe.report.format_cell` and
  :func:`~tlframe.report.markdown_table` (tested on hand-made numbers in
  ``tests/benchmarks/test_digits_benchmark.py``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from tlframe.atomic import atomic_write_text
from tlframe.report import ORACLE_NOTE, STD_NOTE, format_cell, markdown_table, mean_std  # noqa: F401 (re-exported)
from tlframe.runs import (  # noqa: F401 (re-exported)
    MetricError, RunSpec, default_summary, execute_run, log_tail, read_scalars, stale_reason, worker_thread_env,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[2]
#: The committed record of every finished benchmark run: ``<LEDGER>/<cell name>.json`` (see the module docstring).
LEDGER = REPO / "benchmarks" / "results" / "ledger"
#: Metric reported in the tables: accuracy on the target test split, logged at every validation.
TARGET_METRIC = "val/target_acc"
SOURCE_METRIC = "val/source_acc"


def default_data_root() -> Path:
    """``../shared/data`` relative to the repository root."""
    return REPO.parent / "shared" / "data"


def resolve_path(value: Optional[str], default: Path) -> Path:
    """A user-given path (relative to the current directory) or ``default``; always absolute."""
    return Path(value).expanduser().resolve() if value else default.resolve()


def run_sweep(sweep: Path, args, default_out: Path, default_results: Path) -> tuple[Path, Path, dict[str, str], int]:
    """A sweep-based benchmark's first step: resolve ``args.out``/``args.results``/``args.data_root`` (exit with a
    message when the data root is missing) and run ``tlframe sweep <sweep> --out <out> --workers <args.workers>``
    from the repository root. Returns ``(out, results, env of the runs, the sweep's exit code)``."""
    out, results = resolve_path(args.out, default_out), resolve_path(args.results, default_results)
    data_root = resolve_path(args.data_root, default_data_root())
    if not data_root.is_dir():
        raise SystemExit(f"error: data root {data_root} does not exist: pass --data-root")
    env = {**os.environ, "TLFRAME_DATA_ROOT": str(data_root)}
    proc = subprocess.run([sys.executable, "-m", "tlframe", "sweep", str(sweep), "--out", str(out),
                           "--workers", str(args.workers)], cwd=REPO, env=env)
    return out, results, env, proc.returncode


def display_path(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it (shorter, machine-independent), else absolute."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def split_extra(extra: Optional[Sequence[str]]) -> list[str]:
    """``--extra`` values (each a shell-quoted string of CLI overrides) as one argument list."""
    return [arg for chunk in (extra or []) for arg in shlex.split(chunk)]


# --------------------------------------------------------------------------- runs
@dataclass
class Cell:
    """One run of the grid: ``row``/``col`` place it in the tables, ``seed`` is the repetition."""

    row: str
    col: str
    seed: int
    out: Path                  # the benchmark's output folder; the run lives in <out>/runs/<name>/version_0
    name: str                  # logger name, e.g. "mnist2usps/dann/seed0"
    args: list[str]            # tlframe arguments after "fit" (config, overrides); logger args are added
    env: dict[str, str] = field(default_factory=dict)
    needs: list[Path] = field(default_factory=list)  # files that must exist (e.g. a pretrained checkpoint)
    ledger: Optional[Path] = None  # the run ledger this cell is recorded in (None: none, e.g. a scratch --out)

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.name / "version_0"

    @property
    def done_file(self) -> Path:
        return self.run_dir / "done.json"

    @property
    def label(self) -> str:
        return self.name

    def argv(self) -> list[str]:
        """The full command: ``python -m tlframe fit <args> <logger/progress-bar overrides>``."""
        return [sys.executable, "-m", "tlframe", "fit", *self.args,
                f"--trainer.logger.init_args.save_dir={self.out / 'runs'}",
                f"--trainer.logger.init_args.name={self.name}",
                "--trainer.logger.init_args.version=0",
                "--trainer.enable_progress_bar=false"]

    def command(self) -> str:
        """The command as one shell line, with the environment it needs."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv())


@dataclass
class RunResult:
    """One cell's outcome. ``status``: "done" (ran now), "skipped" (done.json found), "recorded" (ledger),
    "failed", or "busy" (another process runs it: neither finished nor failed, tabled as "not run")."""
    cell: Cell
    status: str
    record: Optional[dict[str, Any]] = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped", "recorded")

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def cell_identity(cell: Cell) -> str:
    """What makes a cell's result: the content of its ``-c`` config files and its other arguments (the output folder
    written as ``<out>``, so moving it changes nothing), as a sha256."""
    h = hashlib.sha256()
    args = iter(cell.args)
    for arg in args:
        if arg in ("-c", "--config"):
            path = Path(next(args))
            h.update(b"config\0" + (path.read_bytes() if path.is_file() else str(path).encode()))
        else:
            h.update(b"arg\0" + arg.replace(str(cell.out), "<out>").encode())
    return h.hexdigest()


def ledger_for(out: Path, default_out: Path, extra: Sequence[str]) -> Optional[Path]:
    """The ledger a runner's cells are recorded in: :data:`LEDGER` for runs in the benchmark's default output folder
    without ``--extra`` overrides; ``None`` otherwise, so that a scratch folder or a modified run (a smoke run with
    fewer steps) never replaces a recorded run's numbers."""
    return LEDGER if out == default_out and not extra else None


def ledger_file(cell: Cell, ledger: Path = LEDGER) -> Path:
    return ledger / f"{cell.name}.json"


def read_ledger(path: Path, identity: str) -> Optional[dict[str, Any]]:
    """The record kept at ``path`` when it was written for ``identity`` (else None: absent, unreadable or stale)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry.get("record") if entry.get("identity") == identity else None


def keep_in_ledger(path: Path, identity: str, record: dict[str, Any]) -> None:
    """Write ``record`` at ``path`` for ``identity`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"identity": identity, "record": record}, indent=1, sort_keys=True) + "\n")


def ledger_record(cell: Cell, ledger: Path = LEDGER) -> Optional[dict[str, Any]]:
    """The cell's ledger record when its identity matches the cell's current one (else None)."""
    return read_ledger(ledger_file(cell, ledger), cell_identity(cell))


def run_spec(cell: Cell) -> RunSpec:
    """How :func:`tlframe.runs.execute_run` runs the cell (and tells whether its finished run is stale)."""
    return RunSpec(cell.run_dir, cell.argv(), env=cell.env, needs=cell.needs, cwd=REPO, header=cell.command(),
                   checkpoint=cell.run_dir / "checkpoints" / "last.ckpt")


def collect_cell(cell: Cell) -> Optional[RunResult]:
    """A finished cell without running anything: its ``done.json`` (kept in the ledger too; not when it was made by
    an older command, :func:`tlframe.runs.stale_reason`) or its ledger record."""
    if cell.done_file.is_file() and stale_reason(run_spec(cell)) is None:
        record = json.loads(cell.done_file.read_text())
        if cell.ledger is not None and ledger_record(cell, cell.ledger) is None:
            write_ledger(cell, record, cell.ledger)
        return RunResult(cell, "skipped", record)
    record = None if cell.ledger is None else ledger_record(cell, cell.ledger)
    return None if record is None else RunResult(cell, "recorded", record)


def collect_cells(cells: Sequence[Cell]) -> list[RunResult]:
    """``--collect-only``: the finished or recorded cells among ``cells`` (:func:`collect_cell`), running nothing."""
    return [r for c in cells if (r := collect_cell(c)) is not None]


def write_ledger(cell: Cell, record: dict[str, Any], ledger: Path = LEDGER) -> None:
    """Keep a finished cell's record (numbers, command, wall time; each tag's statistics of ``val/*`` only)."""
    kept = {**record, "scalars": {k: v for k, v in (record.get("scalars") or {}).items() if k.startswith("val/")}}
    keep_in_ledger(ledger_file(cell, ledger), cell_identity(cell), kept)


def summarize_scalars(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """The numbers of ``done.json`` from a run's scalars.

    ``last``: the last logged ``val/target_acc`` (the model of ``last.ckpt``); ``oracle_max_over_epochs``:
    its maximum over the validations (uses target labels for selection, see :data:`ORACLE_NOTE`);
    ``source_acc_last``: the last ``val/source_acc`` (``None`` without a source validation split);
    ``scalars``: every tag's statistics (:func:`tlframe.runs.scalar_stats`, what ``tlframe report`` reads).
    """
    target = scalars.get(TARGET_METRIC) or []
    if not target:
        raise MetricError(f"the events hold no {TARGET_METRIC} scalar (tags: {sorted(scalars)})")
    source = scalars.get(SOURCE_METRIC) or []
    return {
        "metric": TARGET_METRIC,
        "last": target[-1][1],
        "last_step": target[-1][0],
        "oracle_max_over_epochs": max(v for _, v in target),
        "oracle_note": ORACLE_NOTE,
        "num_validations": len(target),
        "source_acc_last": source[-1][1] if source else None,
        **default_summary(scalars),
    }


def run_cell(cell: Cell, log: Callable[[str], None] = print) -> RunResult:
    """Run one cell unless its ``done.json`` exists (:func:`tlframe.runs.execute_run`) or its ledger
    (``cell.ledger``) holds its record; see the module docstring."""
    ledger = cell.ledger
    recorded = None if ledger is None or cell.done_file.is_file() else ledger_record(cell, ledger)
    if recorded is not None:
        log(f"  {cell.label}: recorded in the ledger ({display_path(ledger_file(cell, ledger))}), "
            f"{TARGET_METRIC} last {recorded['last']:.4f}")
        return RunResult(cell, "recorded", recorded)
    if not cell.done_file.is_file() and all(p.is_file() for p in cell.needs):
        log(f"  {cell.label}: running ...")
    outcome = execute_run(run_spec(cell), extra={"row": cell.row, "col": cell.col, "seed": cell.seed,
                                                 "command": cell.command()}, summarize=summarize_scalars)
    if outcome.superseded:
        log(f"  {cell.label}: its finished run is stale ({outcome.stale_reason}): kept at "
            f"{display_path(Path(outcome.superseded))}")
    if outcome.status == "busy":
        log(f"  {cell.label}: left to the process that runs it ({outcome.error})")
    elif outcome.status == "skipped":
        log(f"  {cell.label}: skipped (done.json found), {TARGET_METRIC} last {outcome.record['last']:.4f}")
    elif outcome.ok:
        resumed = " (resumed from last.ckpt)" if outcome.resumed_from else ""
        log(f"  {cell.label}: done in {outcome.wall_s:.0f} s{resumed}, {TARGET_METRIC} last {outcome.record['last']:.4f}")
    else:
        tail = log_tail(cell.run_dir / "output.log") if outcome.error.startswith("exit code") else ""
        log(f"  {cell.label}: FAILED ({outcome.error})" + (f"\n{tail}" if tail else ""))
    if outcome.ok and ledger is not None and outcome.record is not None and ledger_record(cell, ledger) is None:
        write_ledger(cell, outcome.record, ledger)
    return RunResult(cell, outcome.status, outcome.record, outcome.error)


def run_cells(cells: Sequence[Cell], log: Callable[[str], None] = print, workers: int = 1) -> list[RunResult]:
    """Run ``cells`` in order, ``workers`` at a time (the CPU cores split between them:
    :func:`tlframe.runs.worker_thread_env`); the results in the order of ``cells``."""
    threads = worker_thread_env(workers)
    numbered = [(i, replace(c, env={**threads, **c.env})) for i, c in enumerate(cells, 1)]

    def work(item: tuple[int, Cell]) -> RunResult:
        i, cell = item
        log(f"[{i}/{len(cells)}] {cell.label}")
        return run_cell(cell, log)

    if workers <= 1:
        return [work(item) for item in numbered]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(work, numbered))


# --------------------------------------------------------------------------- aggregation (pure)
def format_wall(values: Sequence[float]) -> str:
    """Mean wall time in seconds, ``"123 s"`` (``"–"`` without finished runs)."""
    return f"{statistics.fmean(values):.0f} s" if values else "–"


def cell_values(results: Iterable[RunResult], row: str, col: str, key: str) -> tuple[list[float], int]:
    """The ``done.json`` field ``key`` of the finished runs of one cell (in seed order), and the number of failed runs."""
    mine = sorted((r for r in results if r.cell.row == row and r.cell.col == col), key=lambda r: r.cell.seed)
    values = [float(r.record[key]) for r in mine if r.ok and r.record is not None and r.record.get(key) is not None]
    return values, sum(1 for r in mine if r.failed)


def grid_table(results: Sequence[RunResult], rows: Sequence[tuple[str, str]], cols: Sequence[tuple[str, str]],
               key: str, refs: Optional[dict[tuple[str, str], str]] = None, first: str = "",
               fmt: Callable[[list[float], int], str] = format_cell) -> str:
    """One table: a row per ``(row id, row title)``, a column per ``(col id, col title)``, each cell
    ``fmt(values of key, n_failed)``; with ``refs`` every column is followed by a "ref." column
    (``refs[(row, col)]``, ``"–"`` when absent)."""
    header = [first]
    for _, title in cols:
        header += [title, "ref."] if refs is not None else [title]
    body = []
    for row, row_title in rows:
        line = [row_title]
        for col, _ in cols:
            line.append(fmt(*cell_values(results, row, col, key)))
            if refs is not None:
                line.append(refs.get((row, col), "–"))
        body.append(line)
    return markdown_table(header, body)


# --------------------------------------------------------------------------- report
def machine_lines() -> list[str]:
    """Where the numbers were produced: platform, CPU count, Python, torch, device."""
    import torch

    device = f"CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only (no CUDA device)"
    return [
        f"- machine: `{platform.platform()}`, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {device}",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
    ]


def regen_command(script: Path, argv: Sequence[str]) -> str:
    """The command line that regenerates a results file, relative to the repository root (without
    ``--collect-only``: the table's command is the one that runs what it shows)."""
    argv = [a for a in argv if a != "--collect-only"]
    try:
        rel = script.resolve().relative_to(REPO)
    except ValueError:
        rel = script.resolve()
    return shlex.join(["python", str(rel), *argv])


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def missing_value(results: Sequence[RunResult]) -> str:
    """What a table shows for a cell with no finished run: "failed" when one of ``results`` (the cell's runs)
    failed, else "not run" (not started yet, or left to another runner that holds it)."""
    return "failed" if any(r.failed for r in results) else "not run"


def failures_section(results: Sequence[RunResult]) -> list[str]:
    failed = [r for r in results if r.failed]
    if not failed:
        return []
    return ["", "## Failed runs", "", *[f"- `{r.cell.label}`: {r.error}" for r in failed]]


def check_data_root(root: Path) -> None:
    if not root.is_dir():
        raise SystemExit(f"error: data root {root} does not exist: pass --data-root (the folder with MNIST/raw, "
                         "usps/usps.h5 and mnist_m.tar.gz)")


def resolve_io(args, default_out: Path, default_results: Path) -> tuple[Path, Path, Path, list[str]]:
    """The run folder, the checked data root, the results file and the extra CLI overrides of a benchmark's arguments."""
    data_root = resolve_path(args.data_root, default_data_root())
    check_data_root(data_root)
    return (resolve_path(args.out, default_out), data_root, resolve_path(args.results, default_results),
            split_extra(args.extra))


def write_results(path: Path, text: str, results: Sequence[RunResult], name: str) -> int:
    """Write the table atomically, say how many runs finished and failed; the exit code (1 if any failed)."""
    atomic_write_text(path, text)
    n_failed, n_busy = sum(r.failed for r in results), sum(r.status == "busy" for r in results)
    busy = f", {n_busy} left to another process" if n_busy else ""
    print(f"{name}: wrote {path} ({sum(r.ok for r in results)} runs finished, {n_failed} failed{busy})")
    return 1 if n_failed else 0
