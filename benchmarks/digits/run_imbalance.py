"""Class imbalance and label shift on MNIST -> USPS: what balanced sampling, class weights and BBSE buy.

One command::

    python benchmarks/digits/run_imbalance.py [--workers 2] [--data-root ../shared/data]

1. runs the sweep ``benchmarks/digits/configs/imbalance.yaml`` with ``tlframe sweep`` (source-only FineTune and
   DANN x {no correction, class-balanced sampling, class weights, BBSE} x 3 seeds; finished runs are reused, so an
   interrupted benchmark resumes);
2. writes ``benchmarks/results/imbalance.md``: target test accuracy and mean-class accuracy per cell, and how
   close BBSE's estimate of the target's class proportions came to the truth.

The true target proportions are read from the run's own log (the per-class counts the data module printed when
it built the shifted target); they are used here to *grade* the estimate, never by the runs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.digits.common import (  # noqa: E402
    REPO, display_path, machine_lines, markdown_table, regen_command, run_sweep, today,
)
from tlframe.atomic import atomic_write_text  # noqa: E402

SWEEP = HERE / "configs" / "imbalance.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "imbalance"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "imbalance.md"
STRATEGIES = {"source_only": "source-only (FineTune)", "dann": "DANN"}
CORRECTIONS = {"none": "no correction", "balanced": "class-balanced sampling",
               "class_weights": "class weights (inverse frequency)", "bbse": "BBSE importance weights"}
TARGET_COUNTS = re.compile(r"the target \S+ train split keeps \d+ of \d+ images, per class \[([\d, ]+)\]")
SOURCE_COUNTS = re.compile(r"the source \S+ train split keeps \d+ of \d+ images, per class \[([\d, ]+)\]")


def last(record: dict[str, Any], tag: str) -> Optional[float]:
    entry = (record.get("scalars") or {}).get(tag)
    return None if entry is None else float(entry["last"])


def logged_counts(run_dir: Path, pattern: re.Pattern) -> Optional[list[int]]:
    """The per-class counts the run's data module printed (``output.log``), or None."""
    log = run_dir / "output.log"
    match = pattern.search(log.read_text(errors="replace")) if log.is_file() else None
    return None if match is None else [int(x) for x in match.group(1).split(",")]


def proportions(counts: Sequence[float]) -> list[float]:
    total = float(sum(counts))
    return [c / total for c in counts]


def l1(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b))


def fmt(values: Sequence[float], scale: float = 100.0, decimals: int = 1) -> str:
    if not values:
        return "not run"
    text = f"{scale * statistics.fmean(values):.{decimals}f}"
    if len(values) > 1:
        text += f" ± {scale * statistics.stdev(values):.{decimals}f}"
    return text + f" (n={len(values)})"


def paired(values: dict[int, float], base: dict[int, float]) -> list[float]:
    return [values[s] - base[s] for s in sorted(values) if s in base]


def delta(diffs: Sequence[float]) -> str:
    if not diffs:
        return "–"
    mean = 100 * statistics.fmean(diffs)
    if len(diffs) == 1:
        return f"{mean:+.1f} (n=1)"
    std = 100 * statistics.stdev(diffs)
    return f"{mean:+.1f} ± {std:.1f}{' *' if abs(mean) > std else ''} (n={len(diffs)})"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help=f"sweep folder (default {display_path(DEFAULT_OUT)})")
    p.add_argument("--results", help=f"results file (default {display_path(DEFAULT_RESULTS)})")
    p.add_argument("--data-root", help="folder with MNIST/raw and usps/usps.h5 (default ../shared/data)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--sweep", default=str(SWEEP), help="sweep file (default the benchmark's; tests pass a short one)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out, results, env, sweep_code = run_sweep(Path(args.sweep), args, DEFAULT_OUT, DEFAULT_RESULTS)

    from tlframe.report import collect
    from tlframe.sweep import load_sweep

    runs = load_sweep(Path(args.sweep), str(out)).runs
    _, entries = collect(out)
    records = {e.hash: e.record for e in entries if e.status == "done"}

    def by_seed(strategy: str, correction: str, tag: str) -> dict[int, float]:
        vals = {}
        for r in runs:
            if r.point.get("strategy") == strategy and r.point.get("correction") == correction:
                v = last(records.get(r.hash, {}), tag)
                if v is not None:
                    vals[r.seed] = v
        return vals

    acc_rows, mca_rows = [], []
    for corr, corr_title in CORRECTIONS.items():
        acc_rows.append([corr_title, *(fmt(list(by_seed(s, corr, "val/target_acc").values())) for s in STRATEGIES),
                         *("–" if corr == "none" else
                           delta(paired(by_seed(s, corr, "val/target_acc"), by_seed(s, "none", "val/target_acc")))
                           for s in STRATEGIES)])
        mca_rows.append([corr_title, *(fmt(list(by_seed(s, corr, "val/target_mean_class_acc").values()))
                                       for s in STRATEGIES)])

    # BBSE: the final estimate of the target train proportions against the truth (graded here, never used by the runs)
    est_rows = []
    for strategy, title in STRATEGIES.items():
        errors, no_fix = [], []
        for r in runs:
            if r.point.get("strategy") != strategy or r.point.get("correction") != "bbse" or r.hash not in records:
                continue
            record = records[r.hash]
            q_hat = [last(record, f"label_shift/target_proportion_{c}") for c in range(10)]
            truth, source = logged_counts(r.run_dir, TARGET_COUNTS), logged_counts(r.run_dir, SOURCE_COUNTS)
            if truth is None or source is None or any(q is None for q in q_hat):
                continue
            errors.append(l1(q_hat, proportions(truth)))  # type: ignore[arg-type]
            no_fix.append(l1(proportions(source), proportions(truth)))
        est_rows.append([title, fmt(errors, scale=1.0, decimals=3), fmt(no_fix, scale=1.0, decimals=3)])

    header = ["correction", *STRATEGIES.values(), *(f"Δ vs no correction, {t}" for t in STRATEGIES.values())]
    lines = [
        "# Class imbalance and label shift: MNIST → USPS with a long-tailed source and a shifted target", "",
        f"Produced by `{regen_command(Path(__file__), argv)}` on {today()}. Do not edit by hand; rerun the command "
        f"(finished runs under `{display_path(out)}` are reused).", "",
        "**Setup.** The source (MNIST train) keeps an exponential long tail of imbalance ratio 10 (digit 0 all its "
        "images, digit 9 10 %: `data.source_class_fractions`); the target (USPS, both the unlabelled train split and "
        "the test split) has the reversed tail (digit 9 the head: `data.target_class_fractions`), so the target's "
        "class proportions differ from the source's (label shift) on top of the domain shift. Target test accuracy "
        "(%, the shifted USPS test split) of the last checkpoint, mean ± sample std over seeds (n); no target label "
        "is used for training or selection. Δ: per seed, the corrected run minus the uncorrected one with the same "
        "seed (same subsets), in points; `*` = the mean difference is larger than its seed spread.", "",
        "## Target test accuracy", "",
        markdown_table(header, acc_rows), "",
        "## Target mean-class accuracy", "",
        "The mean over classes of the per-class recall on the same split (`val/target_mean_class_acc`): the head "
        "classes of the target (the source's tail) weigh as much as the others.", "",
        markdown_table(["correction", *STRATEGIES.values()], mca_rows), "",
        "## How well BBSE estimated the target's class proportions", "",
        "L1 distance between the last BBSE estimate of the target train split's class proportions (logged as "
        "`label_shift/target_proportion_<c>`) and the true proportions (the counts the data module printed when "
        "it built the shifted split; used here only to grade the estimate), against the L1 distance of the "
        "source's proportions (what an uncorrected model implicitly assumes). 0 = exact, 2 = disjoint.", "",
        markdown_table(["strategy", "L1(BBSE estimate, truth)", "L1(source proportions, truth)"], est_rows), "",
        "## What each correction does", "",
        "- **class-balanced sampling** (`data.source_sampler: balanced`): every source class equally likely in a "
        "batch. It corrects the source's imbalance toward a *uniform* class prior, not toward the target's.",
        "- **class weights** (`model.strategy.init_args.class_weights: inverse`): the source cross-entropy weighted by "
        "`1 / n_c` (normalised), the same uniform prior through the loss.",
        "- **BBSE** (`model.strategy.init_args.label_shift: bbse`): importance weights `w = q / p` toward the "
        "*estimated target* proportions (Lipton et al., ICML 2018), re-estimated at the start of every epoch from "
        "epoch 1 with the current model (confusion matrix on the source validation split, predictions on the "
        "unlabelled target train split); they weight the source cross-entropy and, for DANN, the source half of "
        "the domain loss.",
        "",
        "## Setup", "",
        f"- sweep: `{display_path(Path(args.sweep))}` (base `imbalance_base.yaml`): TLlib's digits LeNet "
        "(`lenet_tllib`) from scratch, 256-d bottleneck, 2,000 SGD steps (4 epochs x 500) of 64 source + 64 target "
        "images, lr 0.01 inverse decay, momentum 0.9, weight decay 1e-3; DANN with TLlib's digits settings "
        "(trade-off 1, discriminator 1024 wide). Seed s also sets `data.split_seed=s` (the subsets of both domains).",
        f"- runs: `{display_path(out)}/runs/<hash>/` (`tlframe sweep {display_path(Path(args.sweep))} --list` maps "
        f"points to hashes); `tlframe report {display_path(out)}` gives every metric of every run.",
        *machine_lines(), "",
    ]
    atomic_write_text(results, "\n".join(lines))
    print(f"run_imbalance: wrote {results}")
    return 0 if sweep_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
