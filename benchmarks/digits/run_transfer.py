"""Regenerate ``benchmarks/results/transfer.md``: MNIST -> USPS supervised transfer with 10 / 100 / all labels per class.

Step 1: pretrain a LeNet on MNIST (``benchmarks/digits/configs/pretrain_mnist.yaml``, one run, seed
``--pretrain-seed``) and keep its ``last.ckpt``.
Step 2: on USPS (``benchmarks/digits/configs/transfer_usps.yaml``: source = USPS train reduced to
k images per class, target = USPS evaluated on its test split) compare, per label budget and seed:

- ``scratch``: FineTune from random weights, backbone LR x1.0;
- ``frozen``: FrozenFeatures on the MNIST backbone (``--model.weights=<last.ckpt>``), only the head trains;
- ``finetune``: FineTune from the MNIST backbone, backbone LR x0.1;
- ``finetune_freeze1``: the same with the first stage (conv1) frozen (``freeze_stages: 1``);
- ``finetune_l2sp`` / ``finetune_bss`` / ``finetune_delta``: ``finetune`` plus one fine-tuning regulariser
  (``tlframe.strategies.L2SP`` / ``BSS`` / ``DELTA`` with TLlib's default weights).

The harder pair (``--harder-source mnistm``, default): the same LeNet pretrained on MNIST-M (grey, digits on
photo patches; ``benchmarks/digits/configs/pretrain_mnistm.yaml``), then transferred to USPS with
``--harder-labels`` labels per class (default 10 and 100) by every method that starts from the pretrained
weights (``scratch`` does not, and is the same run as in the MNIST table). ``--harder-source none`` skips it.

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
    ORACLE_NOTE, REPO, STD_NOTE, Cell, RunResult, cell_values, display_path, failures_section, format_cell,
    format_wall, grid_table, machine_lines, markdown_table, mean_std, regen_command, resolve_io, run_cells,
    split_extra, today, write_results,
)

HERE = Path(__file__).resolve().parent
PRETRAIN_CONFIG = HERE / "configs" / "pretrain_mnist.yaml"
#: Pretraining config per source domain: MNIST (the main table) and MNIST-M (the harder pair).
PRETRAIN_CONFIGS = {"mnist": PRETRAIN_CONFIG, "mnistm": HERE / "configs" / "pretrain_mnistm.yaml"}
SOURCE_TITLES = {"mnist": "MNIST", "mnistm": "MNIST-M"}
TRANSFER_CONFIG = HERE / "configs" / "transfer_usps.yaml"
USPS_TRAIN_SIZE = 7291
METHODS = {
    "scratch": "scratch",
    "frozen": "frozen MNIST features",
    "finetune": "fine-tune (backbone LR ×0.1)",
    "finetune_freeze1": "fine-tune, conv1 frozen",
    "finetune_l2sp": "fine-tune + L2-SP",
    "finetune_bss": "fine-tune + BSS",
    "finetune_delta": "fine-tune + DELTA",
}
#: CLI overrides of each method; "{weights}" is replaced by the pretrained checkpoint.
METHOD_ARGS = {
    "scratch": ["--model.strategy=tlframe.strategies.FineTune", "--model.strategy.backbone_lr_mult=1.0"],
    "frozen": ["--model.strategy=tlframe.strategies.FrozenFeatures", "--model.weights={weights}"],
    "finetune": ["--model.strategy=tlframe.strategies.FineTune", "--model.strategy.backbone_lr_mult=0.1",
                 "--model.weights={weights}"],
    "finetune_freeze1": ["--model.strategy=tlframe.strategies.FineTune", "--model.strategy.backbone_lr_mult=0.1",
                         "--model.strategy.freeze_stages=1", "--model.weights={weights}"],
    **{f"finetune_{reg.lower().replace('-', '')}": [
        "--model.strategy=tlframe.strategies.FineTune", "--model.strategy.backbone_lr_mult=0.1",
        f"--model.strategy.regularization+=tlframe.strategies.{reg}", "--model.weights={weights}"]
       for reg in ("L2SP", "BSS", "DELTA")},
}
#: Methods that start from the pretrained weights (the harder pair runs these only).
PRETRAINED_METHODS = [m for m, margs in METHOD_ARGS.items() if any("{weights}" in a for a in margs)]
DEFAULT_LABELS = ["10", "100", "all"]
DEFAULT_HARDER_LABELS = ["10", "100"]
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
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of the single pretraining run per source (default 0)")
    p.add_argument("--harder-source", choices=["mnistm", "none"], default="mnistm",
                   help="the harder pair's pretraining domain (default mnistm; none: MNIST table only)")
    p.add_argument("--harder-labels", nargs="+", type=_labels, default=DEFAULT_HARDER_LABELS,
                   help="labels per class of the harder pair (default 10 100)")
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


def pretrain_cell(seed: int, out: Path, data_root: Path, extra: Sequence[str], source: str = "mnist") -> Cell:
    """Step 1: the pretraining run on ``source`` (``mnist`` or ``mnistm``)."""
    return Cell(row="pretrain", col=source, seed=seed, out=out, name=f"pretrain_{source}/seed{seed}",
                args=["-c", str(PRETRAIN_CONFIGS[source]), f"--seed_everything={seed}", *extra],
                env={"TLFRAME_DATA_ROOT": str(data_root)})


def pretrained_weights(pretrain: Cell) -> Path:
    return pretrain.run_dir / "checkpoints" / "last.ckpt"


def transfer_cells(labels: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out: Path, data_root: Path,
                   weights: Path, extra: Sequence[str], source: str = "mnist") -> list[Cell]:
    """Step 2: one :class:`Cell` per (labels per class, method, seed), in table order.

    From MNIST (the main table) a cell's row is ``k`` and its name ``usps_<k>/<method>/seed<s>``; from another
    source the row is ``<source>:<k>``, the name ``<source>_usps_<k>/...``, and only :data:`PRETRAINED_METHODS` run.
    """
    cells = []
    for k in labels:
        row, prefix = (k, f"usps_{k}") if source == "mnist" else (f"{source}:{k}", f"{source}_usps_{k}")
        for method in methods:
            if source != "mnist" and method not in PRETRAINED_METHODS:
                continue
            method_args = [a.replace("{weights}", str(weights)) for a in METHOD_ARGS[method]]
            needs = [weights] if any("{weights}" in a for a in METHOD_ARGS[method]) else []
            for seed in seeds:
                cells.append(Cell(
                    row=row, col=method, seed=seed, out=out, name=f"{prefix}/{method}/seed{seed}",
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


def _pretrain_line(pretrain: RunResult) -> str:
    rec = pretrain.record or {}
    source = SOURCE_TITLES.get(pretrain.cell.col, pretrain.cell.col)
    if not pretrain.ok:
        return f"FAILED ({pretrain.error}): the runs that need its weights are reported as failed"
    return (f"{source} validation accuracy {_pct(rec.get('source_acc_last'))} %, USPS test accuracy without any USPS "
            f"label {_pct(rec.get('last'))} % (one run, seed {pretrain.cell.seed}, {rec.get('wall_s', 0):.0f} s)")


def paired_differences(results: Sequence[RunResult], row: str, col: str, base_row: str, base_col: str,
                       key: str = "last") -> list[float]:
    """``col - base_col`` of the seeds finished in both cells (accuracy points in [0, 1]), in seed order."""
    def by_seed(r_id: str, c_id: str) -> dict[int, float]:
        return {r.cell.seed: float(r.record[key]) for r in results
                if r.cell.row == r_id and r.cell.col == c_id and r.ok and r.record and r.record.get(key) is not None}
    mine, base = by_seed(row, col), by_seed(base_row, base_col)
    return [mine[s] - base[s] for s in sorted(mine) if s in base]


def _delta_cell(diffs: Sequence[float]) -> str:
    if not diffs:
        return "–"
    mean, std = mean_std([100 * d for d in diffs])
    spread = "" if std is None else f" ± {std:.1f}"
    beyond = " *" if std is not None and abs(mean) > std else ""
    return f"{mean:+.1f}{spread}{beyond} (n={len(diffs)})"


REGULARIZED = ["finetune_l2sp", "finetune_bss", "finetune_delta"]


def render(pretrains: Sequence[RunResult], results: Sequence[RunResult], labels: Sequence[str], command: str,
           out: Path, extra: Sequence[str], seeds: Sequence[int], machine: Sequence[str], date: str,
           harder_labels: Sequence[str] = ()) -> str:
    """The whole ``transfer.md`` (pure: everything it shows is passed in). ``pretrains[0]`` is the MNIST
    pretraining; a second one (MNIST-M) adds the harder pair's table for ``harder_labels``."""
    pretrain, harder = pretrains[0], (pretrains[1] if len(pretrains) > 1 else None)
    rows = [(k, row_title(k)) for k in labels]
    cols = list(METHODS.items())
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
        f"Step 1, the MNIST pretraining (`{display_path(PRETRAIN_CONFIGS['mnist'])}`): {_pretrain_line(pretrain)}. "
        "Its `last.ckpt` backbone is the starting point of every column but *scratch*; its head is dropped.",
        "",
    ]
    delta_rows = [(k, k, row_title(k), "MNIST") for k in labels]
    if harder is not None:
        hcols = [("frozen", "frozen MNIST-M features"), ("finetune", METHODS["finetune"]),
                 *((m, METHODS[m]) for m in REGULARIZED)]
        header = ["USPS labels", "scratch (no pretraining)", *(title for _, title in hcols)]
        body = [[row_title(k), format_cell(*cell_values(results, k, "scratch", "last")),
                 *(format_cell(*cell_values(results, f"mnistm:{k}", c, "last")) for c, _ in hcols)]
                for k in harder_labels]
        lines += [
            "## The harder pair: MNIST-M-pretrained LeNet to USPS",
            "",
            "The same LeNet pretrained on MNIST-M instead (converted to grey: digits on photo patches, a source "
            "further from USPS than MNIST), then the same step 2. USPS test accuracy (%), last checkpoint, as above; "
            "*scratch* is the same runs as in the table above (it uses no pretrained weights).",
            "",
            markdown_table(header, body),
            "",
            f"Step 1, the MNIST-M pretraining (`{display_path(PRETRAIN_CONFIGS['mnistm'])}`): {_pretrain_line(harder)}.",
            "",
        ]
        delta_rows += [(f"mnistm:{k}", k, row_title(k), "MNIST-M") for k in harder_labels]
    lines += [
        "## What each regulariser changes",
        "",
        "Per seed, the regularised fine-tune minus the plain fine-tune (*fine-tune (backbone LR ×0.1)*, same seed, "
        "same labelled subset), in accuracy points: mean ± std over seeds (n = seeds finished in both); `*` marks a "
        "mean difference larger than its seed spread. Negative = the regulariser hurt.",
        "",
        markdown_table(["pretrained on", "USPS labels", *(METHODS[m] for m in REGULARIZED)],
                       [[src, title, *(_delta_cell(paired_differences(results, row, m, row, "finetune"))
                                       for m in REGULARIZED)]
                        for row, _k, title, src in delta_rows], left=2),
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
        "*fine-tune, conv1 frozen* = the same with `freeze_stages: 1` (LeNet's stages: conv1, conv2); "
        "*+ L2-SP / + BSS / + DELTA* = *fine-tune* with `regularization: [tlframe.strategies.L2SP]` (alpha = beta "
        "= 0.01; the backbone's and the head's weight decay off), `[BSS]` (eta = 0.001, k = 1) or `[DELTA]` "
        "(weight 0.01 on the feature maps of conv1 and conv2 against the frozen starting LeNet, head 0.01, no "
        "channel attention), TLlib's defaults, not tuned here.",
        "- `val_fraction: 0`: all k labels per class train the model (a 10 % hold-out of 10 per class would leave "
        "9 on average and a 10-image validation set). So there is no source validation split, "
        "`checkpoint.monitor: null`, and the reported number is the last checkpoint's: no selection at all.",
        "- seed s: `--seed_everything=s --data.split_seed=s`, so each seed draws its own k-per-class subset. "
        "Each pretraining is one run (seed " + str(pretrain.cell.seed) + "): the ± does not include "
        "pretraining variance.",
        f"- runs, logs and `done.json` per run: `{display_path(out)}/runs/usps_<labels>/<method>/seed<seed>/version_0/` "
        f"(harder pair: `mnistm_usps_<labels>/...`), pretraining in "
        f"`{display_path(out)}/runs/pretrain_<source>/seed<seed>/version_0/`"
        + (f"; every run with `{' '.join(extra)}`" if extra else ""),
        *machine,
        *failures_section([*pretrains, *results]),
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
    sources = ["mnist"] if args.harder_source == "none" else ["mnist", args.harder_source]
    pre_extra = [*extra, *split_extra(args.pretrain_extra)]
    pre_cells = [pretrain_cell(args.pretrain_seed, out, data_root, pre_extra, source) for source in sources]
    cells = []
    for source, pre_cell in zip(sources, pre_cells):
        labels = args.labels if source == "mnist" else args.harder_labels
        cells += transfer_cells(labels, args.methods, args.seeds, out, data_root, pretrained_weights(pre_cell), extra,
                                source)
    print(f"run_transfer: {len(pre_cells)} pretraining + {len(cells)} transfer runs into {out} "
          f"(TLFRAME_DATA_ROOT={data_root})", flush=True)
    log("[pretrain]")
    pretrains = run_cells(pre_cells, log, workers=args.workers)
    results = run_cells(cells, log, workers=args.workers)
    text = render(pretrains, results, args.labels, regen_command(Path(__file__), argv), out, extra, args.seeds,
                  machine_lines(), today(), harder_labels=args.harder_labels if len(sources) > 1 else ())
    return write_results(results_path, text, [*pretrains, *results], "run_transfer")


if __name__ == "__main__":
    raise SystemExit(main())
