"""Regenerate ``benchmarks/results/digits.md``: digits domain adaptation from scratch vs the published numbers.

Grid: tasks {mnist2usps, usps2mnist, mnist2mnistm} x methods {source_only, dann, mmd} x seeds
(default 0 1 2), without the cell that has no published number (DAN on MNIST -> MNIST-M; ``--all-cells``
runs it too); each run is ``tlframe fit -c configs/digits/<task>/<method>.yaml
--seed_everything=<seed>`` in a subprocess, logging to ``<out>/runs/<task>/<method>/seed<seed>/version_0``.
Resumable: a run directory with ``done.json`` is not run again; rerunning the same command after
an interruption finishes the grid and rewrites the table.

    python benchmarks/digits/run_digits.py                       # the whole table (hours on a CPU)
    python benchmarks/digits/run_digits.py --tasks mnist2usps --methods dann --seeds 0 \\
        --extra="--trainer.max_steps=3 --data.iters_per_epoch=3" --out /tmp/smoke --results /tmp/smoke/digits.md

Pass ``--extra`` with ``=`` (``--extra="--a=1"``): a value starting with ``--`` and holding no
space is otherwise read as an option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.common import (  # noqa: E402
    ORACLE_NOTE, REPO, STD_NOTE, Cell, RunResult, display_path, failures_section,
    format_wall, grid_table, machine_lines, regen_command, resolve_io, run_cells, today,
    write_results,
)

TASKS = {"mnist2usps": "MNIST → USPS", "usps2mnist": "USPS → MNIST", "mnist2mnistm": "MNIST → MNIST-M"}
METHODS = {"source_only": "source only", "dann": "DANN", "mmd": "DAN (MMD)"}
#: Published accuracies (%): TLlib's digits table (LeNet, MNIST<->USPS) and Ganin & Lempitsky 2015,
#: Table 1 (MNIST -> MNIST-M). No published DAN number for MNIST -> MNIST-M in those sources.
REFERENCE = {
    ("mnist2usps", "source_only"): "82.1", ("mnist2usps", "dann"): "91.7", ("mnist2usps", "mmd"): "86.0",
    ("usps2mnist", "source_only"): "74.6", ("usps2mnist", "dann"): "95.2", ("usps2mnist", "mmd"): "89.5",
    ("mnist2mnistm", "source_only"): "52.25", ("mnist2mnistm", "dann"): "76.66",
}
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "digits"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "digits.md"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", help=f"output folder of the runs (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--data-root", help="TLFRAME_DATA_ROOT of the runs (default ../shared/data from the repository root)")
    p.add_argument("--extra", action="append", default=[], metavar='"--key=value ..."',
                   help="CLI overrides appended to every run (repeatable), e.g. "
                        '--extra="--trainer.max_steps=3 --data.iters_per_epoch=3" for a smoke run')
    p.add_argument("--results", help=f"markdown file to write (default {DEFAULT_RESULTS.relative_to(REPO)})")
    p.add_argument("--all-cells", action="store_true",
                   help="also run the cells without a published number (DAN on MNIST -> MNIST-M); by default "
                        "only the cells that reproduce a reference are run")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at a time, the CPU cores split between them (default 1)")
    return p.parse_args(argv)


def build_cells(tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out: Path, data_root: Path,
                extra: Sequence[str]) -> list[Cell]:
    """One :class:`Cell` per (task, method, seed), in table order."""
    cells = []
    for task in tasks:
        for method in methods:
            for seed in seeds:
                cells.append(Cell(
                    row=task, col=method, seed=seed, out=out, name=f"{task}/{method}/seed{seed}",
                    args=["-c", str(REPO / "configs" / "digits" / task / f"{method}.yaml"), f"--seed_everything={seed}",
                          *extra],
                    env={"TLFRAME_DATA_ROOT": str(data_root)},
                ))
    return cells


def render(results: Sequence[RunResult], tasks: Sequence[str], command: str, out: Path, extra: Sequence[str],
           seeds: Sequence[int], machine: Sequence[str], date: str) -> str:
    """The whole ``digits.md`` (pure: everything it shows is passed in)."""
    rows = [(t, TASKS[t]) for t in tasks]
    cols = list(METHODS.items())
    lines = [
        "# Digits: unsupervised domain adaptation from scratch",
        "",
        f"Produced by `{command}` (run from the repository root) on {date}. Do not edit by hand; rerun the",
        f"command (finished runs under `{display_path(out)}` are reused: a run directory with `done.json` is skipped).",
        "",
    ]
    if extra:
        lines += [f"**Shortened runs** (`--extra {' '.join(extra)}`): smoke-test numbers, not comparable with the "
                  "reference column.", ""]
    lines += [
        "## Target accuracy (last checkpoint)",
        "",
        f"Target test accuracy (%) of the **last** checkpoint (`val/target_acc` at the final validation), "
        f"mean ± std (n = finished seeds; seeds {' '.join(map(str, seeds))}); {STD_NOTE}. No model selection "
        "uses target labels. \"ref.\" is the published number.",
        "",
        grid_table(results, rows, cols, "last", refs=REFERENCE, first="task"),
        "",
        "References: MNIST ↔ USPS: Transfer-Learning-Library (TLlib) digits table, LeNet from scratch "
        "(source only / DANN / DAN). MNIST → MNIST-M: Ganin & Lempitsky, ICML 2015, Table 1 (source only 52.25, "
        "DANN 76.66; no DAN number there, hence \"–\"; that cell is run only with `--all-cells`). The reference MNIST-M target used the full 59,001-image "
        "train split; `../shared/data/mnist_m.tar.gz` holds its first 30,000 (the test split is complete).",
        "",
        "## Oracle (not a valid DA result)",
        "",
        f"Same runs; {ORACLE_NOTE}. Shown only to size the gap that model selection could close.",
        "",
        grid_table(results, rows, cols, "oracle_max_over_epochs", first="task"),
        "",
        "## Wall time per run",
        "",
        "Mean wall-clock seconds of one run (the `tlframe fit` subprocess, start-up included). With `--workers N` "
        "N runs share the CPU cores (each gets cores / N threads): each run takes longer than it would alone, the "
        "whole table less.",
        "",
        grid_table(results, rows, cols, "wall_s", first="task", fmt=lambda v, _n: format_wall(v)),
        "",
        "## Setup",
        "",
        "- configs: `configs/digits/<task>/<method>.yaml` (LeNet for MNIST ↔ USPS, Ganin & Lempitsky's CNN for "
        "MNIST → MNIST-M; SGD with Nesterov momentum, inverse-decay LR from 0.01 (0.1 for USPS → MNIST, as in TLlib), 10 epochs x 500 iterations, batch 64 + 64), each run with "
        "`--seed_everything=<seed>`" + (f" and `{' '.join(extra)}`" if extra else ""),
        f"- runs, logs and `done.json` per run: `{display_path(out)}/runs/<task>/<method>/seed<seed>/version_0/`",
        *machine,
        "",
        "## Differences from the reference setups",
        "",
        "- **Training budget.** 5,000 SGD steps of 64 source + 64 target images, so that a run takes minutes on "
        "a 2-core CPU. TLlib's digits scripts run 20 epochs x 2,500 iterations of batch 128 (50,000 steps, 10x "
        "the steps and 20x the images).",
        "- **Preprocessing, as TLlib's scripts** (`--resize-size 28 --norm-mean 0.5 --norm-std 0.5 --no-hflip`): "
        "USPS 16x16 resized to 28x28 (bilinear), grey images normalised with mean 0.5 and std 0.5, no "
        "augmentation. MNIST → MNIST-M: MNIST replicated to 3 channels and both domains at 28x28 with the same "
        "normalisation (Ganin & Lempitsky subtract the mean image; the shared MNIST-M files are 32x32 and are "
        "resized).",
        "- **Network.** LeNet (conv 20, conv 50 with 2-d dropout, as TLlib's) with a 500-unit bottleneck "
        "(Linear-BN-ReLU-Dropout 0.5) and a linear classifier; TLlib's LeNet has a 500-unit fully connected "
        "layer and a 256-unit bottleneck; so here dropout acts on the features that DANN's discriminator and the "
        "MMD see, in TLlib before its bottleneck. DANN's discriminator: 2 hidden layers of 500 (TLlib: 1024). "
        "Learning rate: TLlib's (0.01, 0.1 for USPS → MNIST), same inverse decay, momentum, weight decay. "
        "MNIST → MNIST-M: Ganin & Lempitsky's feature extractor (conv 32, conv 48, no batch norm), a 100-unit "
        "bottleneck without dropout.",
        "- **MNIST-M target**: the first 30,000 of its 59,001 training images (the shared data set); the test "
        "split is complete (9,001).",
        "- **Selection**: the last checkpoint, no target labels (the references do not all say how they selected).",
        *failures_section(results),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"error: --workers must be >= 1, got {args.workers}")
    out, data_root, results_path, extra = resolve_io(args, DEFAULT_OUT, DEFAULT_RESULTS)
    cells = build_cells(args.tasks, args.methods, args.seeds, out, data_root, extra)
    if not args.all_cells:
        cells = [c for c in cells if (c.row, c.col) in REFERENCE]
        if not cells:
            raise SystemExit("error: none of the selected cells has a published number: add --all-cells to run them")
    print(f"run_digits: {len(cells)} runs into {out} (TLFRAME_DATA_ROOT={data_root})", flush=True)
    results = run_cells(cells, log=lambda s: print(s, flush=True), workers=args.workers)
    text = render(results, args.tasks, regen_command(Path(__file__), argv), out, extra, args.seeds,
                  machine_lines(), today())
    return write_results(results_path, text, results, "run_digits")


if __name__ == "__main__":
    raise SystemExit(main())
