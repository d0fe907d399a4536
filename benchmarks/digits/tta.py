"""Test-time adaptation cells of the digits tables: ``tlframe adapt`` (AdaBN, TENT) on each seed's SHOT source model.

The digits source-only network has no BatchNorm, so AdaBN and TENT adapt the SHOT source model (phase 1 of SHOT,
a bottleneck with BN). One cell = ``(task, method, seed)``; it writes
``<out>/tta/<task>/<method>/seed<s>/adapt.json`` and, for the default output folder, the run ledger
(``benchmarks/results/ledger/tta/<task>/<method>/seed<s>.json``, keyed by the identity of the SHOT source
model's cell: a changed ``shot_source`` config makes the recorded result stale). An ``adapt.json`` older than the checkpoint it adapted
(the source model was run again since) is stale too: it is kept as ``adapt.superseded-<time>.json`` and the cell
runs again. Used by ``run_digits.py`` (rows of ``digits.md``) and ``run_beyond_one_loss.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from benchmarks.digits.common import REPO, Cell, cell_identity, keep_in_ledger, read_ledger

#: ``tlframe adapt --method`` -> the row label.
TTA_METHODS = {"adabn": "AdaBN (SHOT source model)", "tent": "TENT (SHOT source model)"}
#: The fit method whose ``last.ckpt`` the adaptation starts from.
SOURCE_METHOD = "shot_source"


def tta_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "tta" / task / method / f"seed{seed}"


def source_checkpoint(out: Path, task: str, seed: int) -> Path:
    return out / "runs" / task / SOURCE_METHOD / f"seed{seed}" / "version_0" / "checkpoints" / "last.ckpt"


def _ledger(task: str, method: str, seed: int, source_cell: Cell) -> Optional[Path]:
    """``<ledger>/tta/<task>/<method>/seed<s>.json`` in the source model's cell's ledger (None: not recorded)."""
    return None if source_cell.ledger is None else source_cell.ledger / "tta" / task / method / f"seed{seed}.json"


def _recorded(ledger: Optional[Path], source_cell: Cell) -> Optional[dict[str, Any]]:
    return None if ledger is None else read_ledger(ledger, cell_identity(source_cell))


def _keep(record: dict[str, Any], ledger: Optional[Path], source_cell: Cell) -> dict[str, Any]:
    """Write an adapt run's result to the ledger (identity: its SHOT source model's cell); return it."""
    if ledger is not None and _recorded(ledger, source_cell) is None:
        keep_in_ledger(ledger, cell_identity(source_cell), record)
    return record


def _fresh_result(result: Path, ckpt: Path, collect_only: bool) -> bool:
    """Whether ``adapt.json`` exists and is not older than the checkpoint it adapted; a stale one is moved aside
    (unless ``collect_only``, which changes nothing on disk)."""
    if not result.is_file():
        return False
    if not ckpt.is_file() or ckpt.stat().st_mtime <= result.stat().st_mtime:
        return True
    if not collect_only:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        result.rename(result.with_name(f"adapt.superseded-{stamp}.json"))
    return False


def run_tta(out: Path, data_root: Path, task: str, method: str, seed: int, source_cell: Cell,
            collect_only: bool = False, log=print) -> Optional[dict[str, Any]]:
    """``tlframe adapt --method <method>`` on the seed's SHOT source model, unless its result is there already.

    Returns the ``adapt.json`` record, ``{}`` when not run (no SHOT source model yet, or ``collect_only`` and no
    result), ``None`` when the adaptation failed.
    """
    name = f"tta {task}/{method}/seed{seed}"
    folder = tta_dir(out, task, method, seed)
    result, ckpt = folder / "adapt.json", source_checkpoint(out, task, seed)
    ledger = _ledger(task, method, seed, source_cell)
    if _fresh_result(result, ckpt, collect_only):
        log(f"  {name}: skipped (adapt.json found)")
        return _keep(json.loads(result.read_text()), ledger, source_cell)
    recorded = _recorded(ledger, source_cell)
    if recorded is not None:  # e.g. a fresh checkout: the ledger kept the result of the same source model's cell
        log(f"  {name}: recorded in the ledger")
        return recorded
    if collect_only or not ckpt.is_file():
        log(f"  {name}: not run" + ("" if collect_only else f", no SHOT source model at {ckpt}"))
        return {}
    proc = subprocess.run([sys.executable, "-m", "tlframe", "adapt", "--checkpoint", str(ckpt), "--method", method,
                           "--out", str(folder), "--seed", str(seed)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TLFRAME_DATA_ROOT": str(data_root)})
    log(f"  {name}: exit {proc.returncode} {proc.stdout.strip().splitlines()[:1]}")
    if proc.returncode != 0 or not result.is_file():
        log(proc.stderr[-2000:])
        return None
    return _keep(json.loads(result.read_text()), ledger, source_cell)


def tta_rows(tta: Mapping[tuple[str, str, int], Optional[dict[str, Any]]], tasks: Sequence[str],
             seeds: Sequence[int], methods: Sequence[str] = tuple(TTA_METHODS),
             ) -> list[tuple[str, dict[str, tuple[list[float], int]]]]:
    """The table rows of the adaptations: ``(label, {task: (accuracies, failed runs)})``, AdaBN after its pass,
    TENT online (each batch scored before its update) and after one pass. ``tta`` maps ``(task, method, seed)`` to
    :func:`run_tta`'s result (a missing key or ``{}``: not run; ``None``: failed)."""
    rows = []
    for method in (m for m in TTA_METHODS if m in methods):
        label = TTA_METHODS[method]
        keys = [("after_acc", label)] if method == "adabn" else [("online_acc", f"{label}, online"),
                                                                ("after_acc", f"{label}, after one pass")]
        for key, name in keys:
            cells = {}
            for t in tasks:
                records = [tta.get((t, method, s), {}) for s in seeds]
                cells[t] = ([r[key] for r in records if r and r.get(key) is not None],
                            sum(1 for r in records if r is None))
            rows.append((name, cells))
    return rows


def failed_exit_code(tta: Mapping[tuple[str, str, int], Optional[dict[str, Any]]], name: str) -> int:
    """1 (and a line naming them) when an adaptation failed, else 0: a runner's exit code counts them too."""
    failed = sorted(f"{t}/{m}/seed{s}" for (t, m, s), r in tta.items() if r is None)
    if failed:
        print(f"{name}: {len(failed)} test-time adaptation(s) failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0
