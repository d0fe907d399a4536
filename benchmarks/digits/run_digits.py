"""Regenerate ``benchmarks/results/digits.md``: digits domain adaptation from scratch vs the published numbers.

Grid: tasks {mnist2usps, usps2mnist, mnist2mnistm} x methods (source only, DANN, DAN, CDAN, CDAN+E, JAN, MCC,
MDD, AFN, CORAL, BSP+DANN, DANN+MCC, MDD+MCC, FixMatch, Mean Teacher, the SHOT source model, SHOT-IM, SHOT, MCD,
and the test-time adaptations AdaBN and TENT) x seeds (default 0 1 2); SHOT's source model runs before the SHOT runs
that start from it, and AdaBN and TENT adapt it (``tlframe adapt``, :mod:`benchmarks.digits.tta`) after the fit
runs. A cell runs when its config ``configs/digits/<task>/<method>.yaml`` exists (the methods after DAN have
configs for MNIST <-> USPS only), except DAN on MNIST -> MNIST-M, which has a config but no published number (``--all-cells`` runs it too).
Each run is ``tlframe fit -c configs/digits/<task>/<method>.yaml --seed_everything=<seed>`` in a
subprocess, logging to ``<out>/runs/<task>/<method>/seed<seed>/version_0``.
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
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.common import (  # noqa: E402
    ORACLE_NOTE, REPO, STD_NOTE, Cell, RunResult, cell_values, collect_cells, display_path, failures_section,
    format_cell, format_wall, ledger_for, machine_lines, markdown_table, mean_std, regen_command, resolve_io,
    run_cells, today, write_results,
)
from benchmarks.digits.tta import SOURCE_METHOD, TTA_METHODS, failed_exit_code, run_tta, tta_rows  # noqa: E402

TASKS = {"mnist2usps": "MNIST → USPS", "usps2mnist": "USPS → MNIST", "mnist2mnistm": "MNIST → MNIST-M"}
METHODS = {
    "source_only": "source only", "dann": "DANN", "mmd": "DAN (MMD)", "cdan": "CDAN", "cdan_e": "CDAN+E",
    "jan": "JAN", "mcc": "MCC", "mdd": "MDD", "afn": "AFN", "coral": "CORAL", "bsp_dann": "BSP+DANN",
    "dann_mcc": "DANN+MCC", "mdd_mcc": "MDD+MCC", "fixmatch": "FixMatch", "mean_teacher": "Mean Teacher",
    "shot_source": "SHOT source model", "shot_im": "SHOT-IM", "shot": "SHOT", "mcd": "MCD",
}
#: Source-free methods: phase 2 of the same seed starts from this phase-1 method's ``last.ckpt`` (run first).
SOURCE_MODEL = {"shot": "shot_source", "shot_im": "shot_source"}
#: Published accuracies (%): TLlib's digits table (LeNet from scratch, MNIST <-> USPS) and Ganin & Lempitsky
#: 2015, Table 1 (MNIST -> MNIST-M). No published number for DAN on MNIST -> MNIST-M, nor for CDAN+E,
#: CORAL, DANN+MCC and MDD+MCC on digits.
REFERENCE = {
    ("mnist2usps", "source_only"): "82.1", ("mnist2usps", "dann"): "91.7", ("mnist2usps", "mmd"): "86.0",
    ("usps2mnist", "source_only"): "74.6", ("usps2mnist", "dann"): "95.2", ("usps2mnist", "mmd"): "89.5",
    ("mnist2mnistm", "source_only"): "52.25", ("mnist2mnistm", "dann"): "76.66",
    ("mnist2usps", "jan"): "84.0", ("usps2mnist", "jan"): "86.8",
    ("mnist2usps", "cdan"): "96.0", ("usps2mnist", "cdan"): "97.7",
    ("mnist2usps", "mdd"): "94.8", ("usps2mnist", "mdd"): "97.8",
    ("mnist2usps", "mcc"): "95.1", ("usps2mnist", "mcc"): "94.6",
    ("mnist2usps", "afn"): "88.6", ("usps2mnist", "afn"): "97.2",
    ("mnist2usps", "bsp_dann"): "95.7", ("usps2mnist", "bsp_dann"): "97.8",
    ("mnist2usps", "shot"): "98.0", ("usps2mnist", "shot"): "98.4",
    ("mnist2usps", "mcd"): "94.1", ("usps2mnist", "mcd"): "97.6",
}
#: Cells with a config but no published number, run only with ``--all-cells``.
EXTRA_CELLS = {("mnist2mnistm", "mmd")}
#: "Within reach" of a reference: the mean is at most this many points below it.
TOLERANCE = 2.0
#: The configs' training budget (10 epochs x 500 iterations); TLlib's digits scripts: 20 x 2,500 of batch 128.
BUDGET_STEPS = 5000
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "digits"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "digits.md"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=[*METHODS, *TTA_METHODS], default=[*METHODS, *TTA_METHODS],
                   help="fit methods and test-time adaptations (adabn, tent: on the SHOT source model) to table")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", help=f"output folder of the runs (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--data-root", help="TLFRAME_DATA_ROOT of the runs (default ../shared/data from the repository root)")
    p.add_argument("--extra", action="append", default=[], metavar='"--key=value ..."',
                   help="CLI overrides appended to every run (repeatable), e.g. "
                        '--extra="--trainer.max_steps=3 --data.iters_per_epoch=3" for a smoke run')
    p.add_argument("--results", help=f"markdown file to write (default {DEFAULT_RESULTS.relative_to(REPO)})")
    p.add_argument("--all-cells", action="store_true",
                   help="also run DAN on MNIST -> MNIST-M (a config, but no published number); by default every "
                        "other (task, method) with a config is run")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at a time, the CPU cores split between them (default 1)")
    p.add_argument("--collect-only", action="store_true",
                   help="start no run: table the finished and recorded ones (the others show as 'not run'), "
                        "e.g. while a long table is still running elsewhere")
    return p.parse_args(argv)


def config_path(task: str, method: str) -> Path:
    return REPO / "configs" / "digits" / task / f"{method}.yaml"


def has_config(task: str, method: str) -> bool:
    return config_path(task, method).is_file()


def default_cell(task: str, method: str) -> bool:
    """Whether the plain command runs this (task, method): its config exists and it is not an extra cell."""
    return has_config(task, method) and (task, method) not in EXTRA_CELLS


def build_cells(tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int], out: Path, data_root: Path,
                extra: Sequence[str]) -> list[Cell]:
    """One :class:`Cell` per (task, method, seed), in table order (every pair; :func:`main` drops those not run)."""
    cells = []
    for task in tasks:
        for method in methods:
            for seed in seeds:
                cells.append(Cell(
                    row=task, col=method, seed=seed, out=out, name=f"{task}/{method}/seed{seed}",
                    args=["-c", str(config_path(task, method)), f"--seed_everything={seed}",
                          *source_model_args(out, task, method, seed), *extra],
                    env={"TLFRAME_DATA_ROOT": str(data_root)},
                    ledger=ledger_for(out, DEFAULT_OUT, extra),
                ))
    return cells


def source_model_args(out: Path, task: str, method: str, seed: int) -> list[str]:
    """``--model.weights=<phase-1 last.ckpt>`` of a source-free method's run (same task and seed), else nothing."""
    if method not in SOURCE_MODEL:
        return []
    run = out / "runs" / task / SOURCE_MODEL[method] / f"seed{seed}" / "version_0"
    return [f"--model.weights={run / 'checkpoints' / 'last.ckpt'}"]


def run_source_models_first(cells: Sequence[Cell], workers: int) -> list[RunResult]:
    """:func:`run_cells`, the phase-1 source models (SHOT) first, then the runs that start from them."""
    first = [c for c in cells if c.col in SOURCE_MODEL.values()]
    rest = [c for c in cells if c.col not in SOURCE_MODEL.values()]
    return [*run_cells(first, log=lambda s: print(s, flush=True), workers=workers),
            *run_cells(rest, log=lambda s: print(s, flush=True), workers=workers)]


def _ref_float(ref: str) -> float | None:
    try:
        return float(ref)
    except ValueError:
        return None


def delta_cell(values: Sequence[float], ref: str) -> str:
    """``"+0.4 ✓"`` / ``"−3.1 ✗"``: mean (%) minus the reference, ✓ when it is at most :data:`TOLERANCE` points
    below (on the rounded difference shown); ``"–"`` without finished runs or without a reference."""
    r = _ref_float(ref)
    if not values or r is None:
        return "–"
    diff = round(100 * mean_std(values)[0] - r, 1)
    mark = "✓" if diff >= -TOLERANCE else "✗"
    return f"{'+' if diff >= 0 else '−'}{abs(diff):.1f} {mark}"


def _cell_or_dash(results: Sequence[RunResult], task: str, method: str, key: str,
                  fmt: Callable[[list[float], int], str]) -> str:
    """``fmt`` of the cell, or ``"–"`` when the method has no config for the task (and nothing ran there)."""
    values, n_failed = cell_values(results, task, method, key)
    if not values and not n_failed and not has_config(task, method):
        return "–"
    return fmt(values, n_failed)


def steps_cell(results: Sequence[RunResult], method: str, tasks: Sequence[str]) -> str:
    """Optimizer steps of the finished runs of a row: ``"5000"``, ``"3–5000"`` (different runs), ``"–"`` (none).

    ``done.json``'s ``last_step`` is the step of the last ``val/target_acc``; Lightning logs the validation at
    the end of an epoch at the step of the epoch's last batch, ``global_step - 1``, hence the ``+ 1``.
    """
    steps = sorted({int(r.record["last_step"]) + 1 for r in results if r.ok and r.record is not None
                    and r.cell.col == method and r.cell.row in tasks and r.record.get("last_step") is not None})
    if not steps:
        return "–"
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"


def main_table(results: Sequence[RunResult], tasks: Sequence[str], methods: Sequence[str],
               adapted: Sequence[tuple[str, dict[str, tuple[list[float], int]]]] = ()) -> str:
    """Methods as rows; per task: ours (last checkpoint), ref., Δ (ours − ref., ✓ within :data:`TOLERANCE`); steps.
    ``adapted``: the test-time adaptation rows (:func:`~benchmarks.digits.tta.tta_rows`), after the fit methods; a
    task without a SHOT source model config reads "–"."""
    header = ["method"]
    for t in tasks:
        header += [TASKS[t], "ref.", "Δ"]
    header.append("steps")
    body = []
    for m in methods:
        line = [METHODS[m]]
        for t in tasks:
            values, _ = cell_values(results, t, m, "last")
            ref = REFERENCE.get((t, m), "–")
            line += [_cell_or_dash(results, t, m, "last", format_cell), ref, delta_cell(values, ref)]
        line.append(steps_cell(results, m, tasks))
        body.append(line)
    for name, cells in adapted:
        line = [name]
        for t in tasks:
            line += [format_cell(*cells[t]) if has_config(t, SOURCE_METHOD) else "–", "–", "–"]
        body.append([*line, "–"])
    return markdown_table(header, body)


def method_table(results: Sequence[RunResult], tasks: Sequence[str], methods: Sequence[str], key: str,
                 fmt: Callable[[list[float], int], str] = format_cell, refs: bool = False) -> str:
    """Methods as rows, a column per task (``fmt`` of ``key``), each followed by "ref." when ``refs``."""
    header = ["method"]
    for t in tasks:
        header += [TASKS[t], "ref."] if refs else [TASKS[t]]
    body = []
    for m in methods:
        line = [METHODS[m]]
        for t in tasks:
            line.append(_cell_or_dash(results, t, m, key, fmt))
            if refs:
                line.append(REFERENCE.get((t, m), "–"))
        body.append(line)
    return markdown_table(header, body)


def render(results: Sequence[RunResult], tasks: Sequence[str], command: str, out: Path, extra: Sequence[str],
           seeds: Sequence[int], machine: Sequence[str], date: str, methods: Sequence[str] | None = None,
           tta: dict | None = None) -> str:
    """The whole ``digits.md`` (pure: everything it shows is passed in; the config files decide the "–" cells).
    ``tta``: :func:`~benchmarks.digits.tta.run_tta`'s results by ``(task, method, seed)``, tabled for the
    test-time adaptations among ``methods``."""
    asked = [*METHODS, *TTA_METHODS] if methods is None else methods
    methods = [m for m in METHODS if m in asked]
    adapted = tta_rows(tta or {}, tasks, seeds, [m for m in TTA_METHODS if m in asked])
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
        "uses target labels. \"ref.\" is the published number; \"Δ\" is ours − ref. in points, ✓ when ours is "
        f"at most {TOLERANCE:g} points below the reference (or above it), ✗ otherwise. \"steps\": optimizer steps of "
        f"the finished runs of the row (the configs' budget: 10 epochs x 500 iterations = {BUDGET_STEPS:,} steps of "
        "64 source + 64 target images; TLlib's digits scripts: 20 x 2,500 = 50,000 steps of 128 + 128). "
        "\"–\" in a task's first column: no config for that task (the methods after DAN are set up for "
        "MNIST ↔ USPS only); \"not run\": a config, but no finished run in this table.",
        "",
        main_table(results, tasks, methods, adapted),
        "",
        "References: MNIST ↔ USPS: Transfer-Learning-Library (TLlib) digits table, LeNet from scratch "
        "(ERM = source only, DANN, DAN, JAN, CDAN, MDD, MCC, AFN, BSP+DANN; no number for CDAN+E, CORAL, DANN+MCC, "
        "MDD+MCC). MNIST → MNIST-M: Ganin & Lempitsky, ICML 2015, Table 1 (source only 52.25, "
        "DANN 76.66; no DAN number there, hence \"–\"; that cell is run only with `--all-cells`). The reference "
        "MNIST-M target used the full 59,001-image train split; `../shared/data/mnist_m.tar.gz` holds its first "
        "30,000 (the test split is complete).",
        "",
        "Beyond one loss: MCD (several optimizer steps per batch), FixMatch and Mean Teacher (two views of the "
        "target), SHOT and SHOT-IM (source-free: phase 2 sees no source data; the SHOT source model is their "
        "phase 1) and the test-time adaptations AdaBN and TENT (`tlframe adapt` on each seed's SHOT source "
        "model, over the target test split as an unlabelled stream; the source-only LeNet has no BatchNorm to "
        "adapt; TENT \"online\" scores each batch before its update, \"after one pass\" predicts the stream "
        "again). References: TLlib's MCD; SHOT, Liang et al., ICML 2020, digits table (LeNet-style networks, 30 "
        "epochs per phase). The SHOT paper's digits table also has a SHOT-IM row, but no copy of the paper or "
        "of a page quoting that row could be reached from this machine, so its cell shows no reference rather "
        "than a number from memory. FixMatch, Mean Teacher, AdaBN and TENT have no published digits number: "
        "compare them with the source-only row (and AdaBN, TENT, SHOT-IM and SHOT with the SHOT source model). "
        "`digits_beyond_one_loss*.md` (`run_beyond_one_loss.py`) shows these rows with their differences to both.",
        "",
        "## Oracle (not a valid DA result)",
        "",
        f"Same runs; {ORACLE_NOTE}. Shown only to size the gap that model selection could close. TLlib's digits "
        "numbers are selected this way (see \"Selection\" below), so \"ref.\" is repeated here.",
        "",
        method_table(results, tasks, methods, "oracle_max_over_epochs", refs=True),
        "",
        "## Wall time per run",
        "",
        "Mean wall-clock seconds of one run (the `tlframe fit` subprocess, start-up included). With `--workers N` "
        "N runs share the CPU cores (each gets cores / N threads): each run takes longer than it would alone, the "
        "whole table less.",
        "",
        method_table(results, tasks, methods, "wall_s", fmt=lambda v, _n: format_wall(v)),
        "",
        "## Setup",
        "",
        "- configs: `configs/digits/<task>/<method>.yaml` (TLlib's LeNet `lenet_tllib` for MNIST ↔ USPS, Ganin & "
        "Lempitsky's CNN for MNIST → MNIST-M; SGD with momentum, inverse-decay LR; LR, weight decay, LR decay "
        "and the method's hyper-parameters from TLlib's script of the method (its digits line and defaults, "
        "cited in each config), 10 epochs x 500 iterations, batch 64 + 64), each run with "
        "`--seed_everything=<seed>`" + (f" and `{' '.join(extra)}`" if extra else ""),
        f"- runs, logs and `done.json` per run: `{display_path(out)}/runs/<task>/<method>/seed<seed>/version_0/`",
        *machine,
        "",
        "## Differences from the reference setups",
        "",
        f"- **Training budget.** {BUDGET_STEPS:,} SGD steps of 64 source + 64 target images, so that a run takes "
        "minutes on a 2-core CPU. TLlib's digits scripts run 20 epochs x 2,500 iterations of batch 128 (50,000 "
        "steps, 10x the steps and 20x the images); the \"steps\" column shows what the runs of a row did.",
        "- **Preprocessing, as TLlib's scripts** (`--resize-size 28 --norm-mean 0.5 --norm-std 0.5 --no-hflip`): "
        "USPS 16x16 resized to 28x28 (bilinear), grey images normalised with mean 0.5 and std 0.5, no "
        "augmentation. MNIST → MNIST-M: MNIST replicated to 3 channels and both domains at 28x28 with the same "
        "normalisation (Ganin & Lempitsky subtract the mean image); the shared MNIST-M files are 32x32, the 28x28 "
        "digits padded by 2 pixels, and are centre-cropped to 28x28.",
        "- **Network (MNIST ↔ USPS), as TLlib's.** The backbone `lenet_tllib` is TLlib's digits LeNet "
        "(conv 20 - pool - ReLU - conv 50 - 2-d dropout 0.5 - pool - ReLU - FC 500 - ReLU - dropout 0.5; 500 "
        "features), so dropout acts before the bottleneck, inside the backbone. On it, each method's TLlib head: "
        "a 256-unit bottleneck Linear-BN-ReLU **without** dropout and a linear classifier (DANN, CDAN, CDAN+E, "
        "MCC, BSP+DANN; CORAL and DANN+MCC the same); JAN: Linear-BN-ReLU-Dropout 0.5 (256); source only: no "
        "bottleneck, a linear classifier on the 500 features (TLlib's `erm.py`); MDD: its own 1024-unit "
        "bottleneck with dropout 0.5 and two heads of width 1024; AFN: its own 1000-unit bottleneck with "
        "L2-preserving dropout 0.5. Domain discriminators (DANN, CDAN, BSP+DANN, DANN+MCC): 2 hidden layers of "
        "1024, as TLlib's scripts. DAN: TLlib's `dan.py` head, a 256-unit Linear-ReLU-Dropout 0.5 bottleneck "
        "without batch norm (`model.bottleneck_bn: false`). "
        "DAN uses TLlib's default linear-time MK-MMD estimator (`dan.py` without `--non-linear`).",
        "- **Methods.** BSP+DANN starts from scratch (TLlib's `bsp.py` first trains 3 epochs on the source); "
        "DANN+MCC and MDD+MCC have no TLlib script (MCC's defaults on top of the DANN/MDD configs); CORAL has no "
        "TLlib digits script (the DANN digits settings).",
        "- **Network (MNIST → MNIST-M).** Ganin & Lempitsky's feature extractor (conv 32, conv 48, no batch "
        "norm), a 100-unit Linear-ReLU bottleneck without batch norm or dropout and a linear classifier (the "
        "paper's label predictor has two hidden layers of 100); DANN's discriminator reads the 768 convolutional "
        "features, as the paper's, with 2 hidden layers of 500 and batch norm (the paper: one of 100).",
        "- **MNIST-M target**: the first 30,000 of its 59,001 training images (the shared data set); the test "
        "split is complete (9,001).",
        "- **Selection**: here the last checkpoint, no target labels. TLlib's digits scripts validate on the "
        "target test split (`utils.get_dataset`: `val_dataset = test_dataset` for Digits) and report the "
        "checkpoint of the best of their 20 epochs on it: their numbers are selected like the oracle table, "
        "with target test labels. Ganin & Lempitsky's selection protocol is not reproduced either.",
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
    cells = build_cells(args.tasks, [m for m in args.methods if m in METHODS], args.seeds, out, data_root, extra)
    cells = [c for c in cells if has_config(c.row, c.col)]
    adaptations = [m for m in args.methods if m in TTA_METHODS]
    tta_tasks = [t for t in args.tasks if adaptations and has_config(t, SOURCE_METHOD)]
    if not cells and not tta_tasks:
        raise SystemExit("error: no config for the selected (task, method) pairs: the methods after DAN have "
                         "configs for mnist2usps and usps2mnist only (configs/digits/<task>/<method>.yaml)")
    if not args.all_cells:
        cells = [c for c in cells if default_cell(c.row, c.col)]
        if not cells and not tta_tasks:
            raise SystemExit("error: none of the selected cells has a published number: add --all-cells to run them")
    print(f"run_digits: {len(cells)} runs and {len(tta_tasks) * len(adaptations) * len(args.seeds)} test-time "
          f"adaptations into {out} (TLFRAME_DATA_ROOT={data_root})", flush=True)
    if args.collect_only:
        results = collect_cells(cells)
    else:
        results = run_source_models_first(cells, args.workers)
    source_cells = {(c.row, c.seed): c for c in build_cells(tta_tasks, [SOURCE_METHOD], args.seeds, out, data_root,
                                                             extra)}
    tta = {(t, m, s): run_tta(out, data_root, t, m, s, source_cells[(t, s)], collect_only=args.collect_only,
                              log=lambda line: print(line, flush=True))
           for t in tta_tasks for m in adaptations for s in args.seeds}
    text = render(results, args.tasks, regen_command(Path(__file__), argv), out, extra, args.seeds,
                  machine_lines(), today(), methods=args.methods, tta=tta)
    return max(write_results(results_path, text, results, "run_digits"), failed_exit_code(tta, "run_digits"))


if __name__ == "__main__":
    raise SystemExit(main())
