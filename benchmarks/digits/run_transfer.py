"""Regenerate ``benchmarks/results/transfer.md``: MNIST -> USPS supervised transfer with 10 / 100 / all labels per class.

Step 1: pretrain a LeNet on MNIST (``benchmarks/digits/configs/pretrain_mnist.yaml``, one run, seed
``--pretrain-seed``) and keep its ``last.ckpt``.
Step 2: on USPS (``benchmarks/digits/configs/transfer_usps.yaml``: source = USPS train reduced to
k images per class, target = USPS evaluated on its test split) compare, per label budget and seed:

- ``scratch``: FineTune from random weights, backbone LR x1.0;
- ``frozen``: FrozenFeatures on the MNIST backbone (``--model.weights=<last.ckpt>``), only the head trains;
- ``finetune``: FineTune from the MNIST backbone, backbone LR x0.1;
- ``finetune_freeze1``: the same with the first stage (conv1) frozen (``freeze_stages: 1``).

Seed s sets ``--seed_everything=s`` and ``--data.split_seed=s`` (a different k-per-class subset per
seed). Resumable like ``run_digits.py``: a run directory with ``done.json`` is not run again.

    python benchmarks/digits/run_transfer.py
    python benchmarks/digits/run_transfer.py --labels 10 --methods finetune --seeds 0 \\
        --extra="--trainer.max_steps=3 --data.iters_per_epoch=3" --out /tmp/smoke --results /tmp/smoke/transfer.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.common import (  # noqa: E402
    ORACLE_NOTE, REPO, STD_NOTE, Cell, RunResult, display_path, failures_section,
    format_wall, grid_table, machine_lines, regen_command, resolve_io, run_cell, run_cells, split_extra, today,
    write_results,
)

HERE = Path(__file__).resolve().parent
PRETRAIN_CONFIG = HERE / "configs" / "pretrain_mnist.yaml"
TRANSFER_CONFIG = HERE / "configs" / "transfer_usps.yaml"
USPS_TRAIN_SIZE = 7291
METHODS = {
    "scratch": "scratch",
    "frozen": "frozen MNIST features",
    "finetune": "fine-tune (backbone LR ×0.1)",
    "finetune_freeze1": "fine-tune, conv1 frozen",
}
#: CLI overrides of each method; "{weights}" is replaced by the pretrained checkpoint.
METHOD_ARGS = {
    "scratch": ["--model.strategy=tlframe.strategies.FineTune", "--model.strategy.backbone_lr_mult=1.0"],
    "frozen": ["--model.strategy=tlframe.strategies.FrozenFeatures", "--model.weights={weights}"],
    "finetune": ["--model.strategy=tlframe.strategies.FineTune", "--model.strategy.backbone_lr_mult=0.1",
                 "--model.weights={weights}"],
    "finetune_freeze1": ["--model.strategy=tlframe.strategies.FineTune", "--model.strategy.backbone_lr_mult=0.1",
                         "--model.strategy.freeze_stages=1", "--model.weights={weights}"],
}
DEFAULT_LABELS = ["10", "100", "all"]
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "transfer"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "transfer.md"


def _labels(value: str) -> str:
    if value == "all" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of labels per class or 'all'")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", nargs="+", type=_labels, default=DEFAULT_LABELS,
                   help="labels per class of the USPS source (numbers or 'all'; default 10 100 all)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of the single MNIST pretraining run (default 0)")
    p.add_argument("--out", help=f"output folder of the runs (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--data-root", help="TLFRAME_DATA_ROOT of the runs (default ../shared/data from the repository root)")
    p.add_argument("--extra", action="append", default=[], metavar='"--key=value ..."',
                   help="CLI overrides appended to every run, the pretraining included (repeatable)")
    p.add_argument("--pretrain-extra", action="append", default=[], metavar='"--key=value ..."',
                   help="CLI overrides appended to the pretraining run only, after --extra")
    p.add_argument("--results", help=f"markdown file to write (default {DEFAULT_RESULTS.relative_to(REPO)})")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at a time, the CPU cores split between them (default 1)")
    return p.parse_args(argv)


def pretrain_cell(seed: int, out: Path, data_root: Path, extra: Sequence[str]) -> Cell:
    """Step 1: the MNIST pretraining run."""
    return Cell(row="pretrain", col="pretrain", seed=seed, out=out, name=f"pretrain_mnist/seed{seed}",
                args=["-c", str(PRETRAIN_CONFIG), f"--seed_everything={seed}", *extra],
                env={"TLFRAME_DATA_ROOT": str(data_root)})


def pretrained_weights(pretrain: Cell) -> Path:
    return pretrain.run_dir / "checkpoints" / "last.ckpt"


def transfer_cells(labels: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out: Path, data_root: Path,
                   weights: Path, extra: Sequence[str]) -> list[Cell]:
    """Step 2: one :class:`Cell` per (labels per class, method, seed), in table order."""
    cells = []
    for k in labels:
        for method in methods:
            method_args = [a.replace("{weights}", str(weights)) for a in METHOD_ARGS[method]]
            needs = [weights] if any("{weights}" in a for a in METHOD_ARGS[method]) else []
            for seed in seeds:
                cells.append(Cell(
                    row=k, col=method, seed=seed, out=out, name=f"usps_{k}/{method}/seed{seed}",
                    args=["-c", str(TRANSFER_CONFIG), f"--seed_everything={seed}", f"--data.split_seed={seed}",
                          f"--data.source_samples_per_class={'null' if k == 'all' else k}", *method_args, *extra],
                    env={"TLFRAME_DATA_ROOT": str(data_root)}, needs=needs,
                ))
    return cells


def row_title(k: str) -> str:
    if k == "all":
        return f"all ({USPS_TRAIN_SIZE:,} images)"
    return f"{k} per class ({int(k) * 10:,} images)"


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def render(pretrain: RunResult, results: Sequence[RunResult], labels: Sequence[str], command: str, out: Path,
           extra: Sequence[str], seeds: Sequence[int], machine: Sequence[str], date: str) -> str:
    """The whole ``transfer.md`` (pure: everything it shows is passed in)."""
    rows = [(k, row_title(k)) for k in labels]
    cols = list(METHODS.items())
    rec = pretrain.record or {}
    pre = (f"MNIST validation accuracy {_pct(rec.get('source_acc_last'))} %, USPS test accuracy without any USPS "
           f"label {_pct(rec.get('last'))} % (one run, seed {pretrain.cell.seed}, {rec.get('wall_s', 0):.0f} s)"
           if pretrain.ok else f"FAILED ({pretrain.error}): the runs that need its weights are reported as failed")
    lines = [
        "# Digits: MNIST-pretrained LeNet transferred to USPS with few labels",
        "",
        f"Produced by `{command}` (run from the repository root) on {date}. Do not edit by hand; rerun the",
        f"command (finished runs under `{display_path(out)}` are reused: a run directory with `done.json` is skipped).",
        "",
    ]
    if extra:
        lines += [f"**Shortened runs** (`--extra {' '.join(extra)}`): smoke-test numbers only.", ""]
    lines += [
        "## USPS test accuracy (last checkpoint)",
        "",
        "USPS test accuracy (%, 2,007 images; `val/target_acc` at the final validation = the last checkpoint), "
        f"mean ± std (n = finished seeds; seeds {' '.join(map(str, seeds))}); {STD_NOTE}. Rows: labelled USPS "
        "training images per class. No model selection: every run trains for the same fixed number of steps.",
        "",
        grid_table(results, rows, cols, "last", first="USPS labels"),
        "",
        f"Step 1, the MNIST pretraining (`{display_path(PRETRAIN_CONFIG)}`): {pre}. Its `last.ckpt` backbone "
        "is the starting point of *frozen*, *fine-tune* and *fine-tune, conv1 frozen*; its head is dropped.",
        "",
        "## Oracle (not a valid result)",
        "",
        f"Same runs; {ORACLE_NOTE}.",
        "",
        grid_table(results, rows, cols, "oracle_max_over_epochs", first="USPS labels"),
        "",
        "## Wall time per run",
        "",
        "Mean wall-clock seconds of one run (the `tlframe fit` subprocess, start-up included). With `--workers N` "
        "N runs share the CPU cores (each gets cores / N threads): each run takes longer than it would alone, the "
        "whole table less.",
        "",
        grid_table(results, rows, cols, "wall_s", first="USPS labels", fmt=lambda v, _n: format_wall(v)),
        "",
        "## Setup",
        "",
        f"- step 2 config: `{display_path(TRANSFER_CONFIG)}`: LeNet, batch 64, 10 epochs x 100 iterations "
        "(1,000 SGD steps for every label budget), inverse-decay LR from 0.01; source = USPS train reduced to k "
        "images per class by `data.source_samples_per_class` (chosen with `data.split_seed`), target = USPS "
        "(only its test split is used, for evaluation; these source-only strategies never forward the target).",
        "- methods: *scratch* = FineTune from random weights, backbone LR ×1.0; *frozen* = FrozenFeatures "
        "(backbone frozen, bottleneck + classifier trained); *fine-tune* = FineTune, backbone LR ×0.1; "
        "*fine-tune, conv1 frozen* = the same with `freeze_stages: 1` (LeNet's stages: conv1, conv2).",
        "- `val_fraction: 0`: all k labels per class train the model (a 10 % hold-out of 10 per class would leave "
        "9 on average and a 10-image validation set). So there is no source validation split, "
        "`checkpoint.monitor: null`, and the reported number is the last checkpoint's: no selection at all.",
        "- seed s: `--seed_everything=s --data.split_seed=s`, so each seed draws its own k-per-class subset. "
        "The MNIST pretraining is one run (seed " + str(pretrain.cell.seed) + "): the ± does not include "
        "pretraining variance.",
        f"- runs, logs and `done.json` per run: `{display_path(out)}/runs/usps_<labels>/<method>/seed<seed>/version_0/`, "
        f"pretraining in `{display_path(out)}/runs/pretrain_mnist/seed<seed>/version_0/`"
        + (f"; every run with `{' '.join(extra)}`" if extra else ""),
        *machine,
        *failures_section([pretrain, *results]),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"error: --workers must be >= 1, got {args.workers}")
    out, data_root, results_path, extra = resolve_io(args, DEFAULT_OUT, DEFAULT_RESULTS)
    log = lambda s: print(s, flush=True)  # noqa: E731
    pre_cell = pretrain_cell(args.pretrain_seed, out, data_root, [*extra, *split_extra(args.pretrain_extra)])
    weights = pretrained_weights(pre_cell)
    cells = transfer_cells(args.labels, args.methods, args.seeds, out, data_root, weights, extra)
    print(f"run_transfer: 1 pretraining + {len(cells)} transfer runs into {out} (TLFRAME_DATA_ROOT={data_root})", flush=True)
    log("[pretrain]")
    pretrain = run_cell(pre_cell, log)
    results = run_cells(cells, log, workers=args.workers)
    text = render(pretrain, results, args.labels, regen_command(Path(__file__), argv), out, extra, args.seeds,
                  machine_lines(), today())
    return write_results(results_path, text, [pretrain, *results], "run_transfer")


if __name__ == "__main__":
    raise SystemExit(main())
