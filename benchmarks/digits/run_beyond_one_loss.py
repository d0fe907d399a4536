"""Regenerate ``benchmarks/results/digits_beyond_one_loss.md``: the methods beyond one loss on the digits tasks.

Rows: source only (the reference row), MCD (several optimizer steps per batch), FixMatch, Mean Teacher (self-training on two target views), the SHOT source
model (phase 1), SHOT-IM and SHOT (phase 2, source-free), and AdaBN and TENT applied to the SHOT source model
with ``tlframe adapt`` (test-time adaptation: the digits source-only network has no BatchNorm, the SHOT source
model has one in its bottleneck). Columns: MNIST -> USPS and USPS -> MNIST, 3 seeds, last checkpoint, no target
label for training or selection.

The ``tlframe fit`` runs are :mod:`run_digits` cells (``benchmarks/runs/digits/runs/<task>/<method>/seed<s>``,
shared with ``digits.md``: a finished run is not run again); the ``tlframe adapt`` runs write
``benchmarks/runs/digits/tta/<task>/<method>/seed<s>/adapt.json`` (skipped when present). Resumable.

    python benchmarks/digits/run_beyond_one_loss.py --workers 2
    python benchmarks/digits/run_beyond_one_loss.py --tasks mnist2usps --seeds 0 --results /tmp/x.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits import run_digits  # noqa: E402
from benchmarks.digits.common import (  # noqa: E402
    REPO, RunResult, cell_values, collect_cells, display_path, failures_section, format_cell, machine_lines,
    markdown_table, mean_std, regen_command, resolve_io, today, write_results,
)
from benchmarks.digits.tta import TTA_METHODS, failed_exit_code, run_tta, tta_rows  # noqa: E402

TASKS = {"mnist2usps": "MNIST → USPS", "usps2mnist": "USPS → MNIST"}
FIT_METHODS = ["source_only", "mcd", "fixmatch", "mean_teacher", "shot_source", "shot_im", "shot"]
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "digits_beyond_one_loss.md"
# run order: the cheap runs first, so an interrupted run of the script leaves the most rows filled
# (measured wall time per run, 2 workers: SHOT phases 3-6 min, FixMatch 10, Mean Teacher 16, MCD 41)
RUN_ORDER = ["source_only", "shot_source", "shot_im", "shot", "fixmatch", "mean_teacher", "mcd"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", help="output folder of the runs (default benchmarks/runs/digits)")
    p.add_argument("--data-root", help="TLFRAME_DATA_ROOT (default ../shared/data)")
    p.add_argument("--extra", action="append", default=[], help="CLI overrides appended to every fit run")
    p.add_argument("--results", help=f"markdown file to write (default {DEFAULT_RESULTS.relative_to(REPO)})")
    p.add_argument("--workers", type=int, default=1, help="fit runs at a time")
    p.add_argument("--collect-only", action="store_true",
                   help="start no fit run: table the finished ones (the others show as 'not run'); adapt runs still run")
    return p.parse_args(argv)


def render(results: Sequence[RunResult], tta: dict, tasks: Sequence[str], seeds: Sequence[int], command: str,
           out: Path) -> str:
    """The results file (pure: everything shown is passed in)."""
    header = ["method", *[f"{TASKS[t]}" for t in tasks], *[f"Δ vs source only ({TASKS[t]})" for t in tasks],
              *[f"Δ vs its start ({TASKS[t]})" for t in tasks], *[f"ref. ({TASKS[t]})" for t in tasks]]

    def fit_values(task: str, method: str) -> tuple[list[float], int]:
        return cell_values(results, task, method, "last")

    def delta(values: list[float], task: str, baseline: str = "source_only") -> str:
        base, _ = fit_values(task, baseline)
        if not values or not base:
            return "–"
        return f"{100 * (mean_std(values)[0] - mean_std(base)[0]):+.1f}"

    rows = []
    for method in FIT_METHODS:
        cells = [fit_values(t, method) for t in tasks]
        rows.append([run_digits.METHODS[method], *[format_cell(v, n) for v, n in cells],
                     *["" if method == "source_only" else delta(v, t) for (v, _), t in zip(cells, tasks)],
                     *[delta(v, t, "shot_source") if method in run_digits.SOURCE_MODEL else ""
                       for (v, _), t in zip(cells, tasks)],
                     *[run_digits.REFERENCE.get((t, method), "–") for t in tasks]])
    for name, cells in tta_rows(tta, tasks, seeds):
        rows.append([name, *[format_cell(*cells[t]) for t in tasks], *[delta(cells[t][0], t) for t in tasks],
                     *[delta(cells[t][0], t, "shot_source") for t in tasks], *["–" for _ in tasks]])
    none = {t: [r["source_acc"] for s in seeds if (r := tta.get((t, "adabn", s)))] for t in tasks}
    lines = [
        "# Digits: self-training, source-free and test-time adaptation",
        "",
        f"Generated {today()} by `{command}`.",
        "",
        "Target test accuracy (%), mean ± sample std over seeds (n = finished runs), **last checkpoint**, no "
        "target label used for training or model selection. \"Δ vs source only\" is the difference of the means "
        "to the source-only row (TLlib's digits LeNet without a bottleneck, `source_only.yaml`); \"Δ vs its start\" "
        "compares SHOT-IM, SHOT, AdaBN and TENT with the SHOT source model they adapt (same seed's phase-1 run).",
        "",
        markdown_table(header, rows),
        "",
        "SHOT source model before any adaptation, as `tlframe adapt` measured it on the target test split: "
        + ", ".join(f"{TASKS[t]} {format_cell(none[t])}" for t in tasks) + ".",
        "",
        "## Setup",
        "",
        f"- seeds {', '.join(map(str, seeds))}; runs under `{display_path(out)}/runs/<task>/<method>/seed<s>/` "
        f"and `{display_path(out)}/tta/<task>/<method>/seed<s>/adapt.json`",
        "- network: TLlib's digits LeNet `lenet_tllib` (500 features). FixMatch and Mean Teacher: the DANN "
        "configs' head (256-unit Linear-BN-ReLU bottleneck, linear classifier), 5,000 steps of 64 source + "
        "64 target images (two views each). SHOT: a 256-unit bottleneck with BN and dropout 0.5 and a "
        "weight-normalised classifier; phase 1 5,000 steps of 64 source images with label smoothing 0.1, "
        "phase 2 5,000 steps of 64 target images, no source data; SGD 0.01, LR (1 + 0.002 step)^-0.75.",
        "- MCD: TLlib's `mcd.sh` Digits settings (fixed LR 0.01 / 0.1, trade-off 0.3, class-balance weight 0.03 "
        "(its `--trade-off-entropy`; the term is `tllib/alignment/mcd.py`'s `entropy`, "
        "`tlframe.losses.mcd_class_balance`), num_k 4, "
        "two classifiers of width 1024), 5,000 batches of 64 + 64 (35,000 optimizer steps); TLlib's 94.1 / 97.6 "
        "are the best of 20 epochs of 2,500 batches of 128 on the target test set.",
        "- FixMatch: threshold 0.95, weight 1, RandAugment 2 ops at magnitude 10 + cutout 0.5 for the strong "
        "view; Mean Teacher: EMA decay 0.99, confidence threshold 0.968, weight 30 on the class-mean squared "
        "difference (French et al.'s 3 on the class sum); SHOT: pseudo-label weight 0.1 (SHOT's digits "
        "command), SHOT-IM 0.",
        "- AdaBN and TENT: `tlframe adapt` on each seed's SHOT source model, over the target test split as an "
        "unlabelled stream (TENT: Adam 1e-3 on the BN affine parameters, batch 64; \"online\" scores each batch "
        "before its update, \"after one pass\" predicts the stream again).",
        "- references: MCD 94.1 (MNIST → USPS) and 97.6 (USPS → MNIST), TLlib's digits table; SHOT 98.0 (MNIST → USPS) and 98.4 (USPS → MNIST), Liang et al., ICML 2020, digits table "
        "(LeNet-style networks, 30 epochs per phase, the best of their settings); that table's SHOT-IM row could "
        "not be retrieved on this machine (no copy of the paper reachable), so SHOT-IM shows no reference. FixMatch, Mean Teacher, AdaBN "
        "and TENT have no published digits number for these tasks: compare them with the source-only row.",
        *machine_lines(),
        *failures_section(results),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out, data_root, results_path, extra = resolve_io(args, run_digits.DEFAULT_OUT, DEFAULT_RESULTS)
    cells = run_digits.build_cells(args.tasks, FIT_METHODS, args.seeds, out, data_root, extra)
    print(f"run_beyond_one_loss: {len(cells)} fit runs and {len(args.tasks) * len(args.seeds) * len(TTA_METHODS)} "
          f"adapt runs into {out}", flush=True)
    if args.collect_only:
        results = collect_cells(cells)
    else:
        ordered = sorted(cells, key=lambda c: (RUN_ORDER.index(c.col), c.row, c.seed))
        results = run_digits.run_source_models_first(ordered, args.workers)
    source_cells = {(c.row, c.seed): c for c in cells if c.col == "shot_source"}
    tta = {(t, m, s): run_tta(out, data_root, t, m, s, source_cells[(t, s)], collect_only=args.collect_only,
                              log=lambda line: print(line, flush=True))
           for t in args.tasks for m in TTA_METHODS for s in args.seeds}
    text = render(results, tta, args.tasks, args.seeds, regen_command(Path(__file__), argv), out)
    return max(write_results(results_path, text, results, "run_beyond_one_loss"),
               failed_exit_code(tta, "run_beyond_one_loss"))


if __name__ == "__main__":
    raise SystemExit(main())
