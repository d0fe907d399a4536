"""Regenerate ``benchmarks/results/multi_source_da.md``: multi-source DA on Office-Caltech-10, sources -> Webcam.

The grid of ``configs/office_caltech/msda_webcam_sweep.yaml`` (Amazon + Caltech + DSLR -> Webcam against each
single source -> Webcam, source only and DANN, seeds 0, 1, 2: 24 runs of 1,000 steps) run as
:class:`~benchmarks.digits.common.Cell` s, with the same arguments as that sweep: resumable (a finished run is not
run again) and every finished run kept in the committed run ledger
``benchmarks/results/ledger/office_caltech/msda_webcam/<setting>/seed<s>.json``, so a fresh checkout tables it
without rerunning and the table fills up over several sessions.

    python benchmarks/office_caltech/run_msda.py --workers 2                 # resumable; 24 runs of ~20-25 min/core
    python benchmarks/office_caltech/run_msda.py --collect-only              # table what is finished or recorded
    python benchmarks/office_caltech/run_msda.py --settings three_dann --seeds 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.common import (  # noqa: E402
    LEDGER, REPO, STD_NOTE, Cell, RunResult, cell_values, collect_cells, display_path, failures_section, format_wall,
    grid_table, ledger_for, machine_lines, markdown_table, mean_std, regen_command, resolve_io, run_cells, today,
    write_results,
)

CONFIGS = REPO / "configs" / "office_caltech"
SWEEP = CONFIGS / "msda_webcam_sweep.yaml"
#: table rows, in table order: the source setting (``configs/office_caltech/webcam_from_<source>.yaml``) and its title
SOURCES = {"three": "Amazon + Caltech + DSLR", "dslr": "DSLR", "caltech10": "Caltech", "amazon": "Amazon"}
SINGLE_SOURCES = ("dslr", "caltech10", "amazon")
#: table columns: the strategy and its overrides of the configs (their default strategy is source only, FineTune)
STRATEGIES = {"source_only": "source only", "dann": "DANN"}
#: the sweep's settings, in its order: ``<source>_<strategy>``
SETTINGS = [f"{source}_{strategy}" for strategy in STRATEGIES for source in ("amazon", "caltech10", "dslr", "three")]
SEEDS = [0, 1, 2]
FULL_GRID = len(SETTINGS) * len(SEEDS)
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "office_caltech"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "multi_source_da.md"
NAME = "office_caltech/msda_webcam"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=SETTINGS,
                   help="<source>_<strategy> settings of the sweep (default all 8)")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--out", help="output folder of the runs (default benchmarks/runs/office_caltech)")
    p.add_argument("--data-root", help="TLFRAME_DATA_ROOT, the folder with office_caltech_10/ (default ../shared/data)")
    p.add_argument("--extra", action="append", default=[], help="CLI overrides appended to every run")
    p.add_argument("--results", help="markdown file to write (default benchmarks/results/multi_source_da.md)")
    p.add_argument("--workers", type=int, default=1, help="runs at a time")
    p.add_argument("--collect-only", action="store_true", help="start no run: table the finished and recorded ones")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    for option, values in (("--settings", args.settings), ("--seeds", args.seeds)):
        if len(set(values)) != len(values):
            p.error(f"{option} repeats a value: {' '.join(map(str, values))}")
    return args


def config_file(source: str) -> Path:
    return CONFIGS / f"webcam_from_{source}.yaml"


def split_setting(setting: str) -> tuple[str, str]:
    """``"three_source_only"`` -> ``("three", "source_only")``."""
    source, strategy = setting.split("_", 1)
    return source, strategy


def strategy_args(source: str, strategy: str) -> list[str]:
    """The sweep's overrides of a setting: DANN replaces the configs' FineTune; with the three sources its
    discriminator has one output per domain (3 sources + Webcam)."""
    if strategy == "source_only":
        return []
    return ["--model.strategy=tlframe.strategies.DANN"] + (
        ["--model.strategy.init_args.num_domains=4"] if source == "three" else [])


def build_cells(settings: Sequence[str], seeds: Sequence[int], out: Path, data_root: Path,
                extra: Sequence[str]) -> list[Cell]:
    """One cell per (setting, seed) with the sweep's arguments; the ledger only for the default output folder."""
    cells = []
    for setting in settings:
        source, strategy = split_setting(setting)
        cells += [Cell(row=source, col=strategy, seed=s, out=out, name=f"{NAME}/{setting}/seed{s}",
                       args=["-c", str(config_file(source)), *strategy_args(source, strategy),
                             f"--seed_everything={s}", *extra],
                       env={"TLFRAME_DATA_ROOT": str(data_root)}, ledger=ledger_for(out, DEFAULT_OUT, extra))
                  for s in seeds]
    return cells


# --------------------------------------------------------------------------- tables (pure)
def mean_target(results: Sequence[RunResult], source: str, strategy: str) -> Optional[float]:
    values, _ = cell_values(results, source, strategy, "last")
    return mean_std(values)[0] if values else None


def best_single_table(results: Sequence[RunResult]) -> str:
    """Per strategy: the single source with the highest mean Webcam accuracy (among those with a finished run),
    the three sources' mean, and the difference three sources minus that best single source (points)."""
    body = []
    for strategy, title in STRATEGIES.items():
        means = {s: m for s in SINGLE_SOURCES if (m := mean_target(results, s, strategy)) is not None}
        three = mean_target(results, "three", strategy)
        best = max(means, key=means.__getitem__) if means else None
        body.append([
            title,
            f"{SOURCES[best]}, {100 * means[best]:.1f} (best of the {len(means)} of {len(SINGLE_SOURCES)} single "
            "sources run)" if best else "–",
            f"{100 * three:.1f}" if three is not None else "–",
            f"{100 * (three - means[best]):+.1f}" if best and three is not None else "–",
        ])
    return markdown_table(["strategy", "best single source (mean)", "Amazon + Caltech + DSLR (mean)",
                           "three − best single (points)"], body)


def budget() -> dict[str, object]:
    """The budget and setup of the runs, read from the three-source config (the four configs share them)."""
    cfg = yaml.safe_load(config_file("three").read_text())
    model, data = cfg["model"], cfg["data"]
    return {"steps": cfg["trainer"]["max_epochs"] * data["iters_per_epoch"], "epochs": cfg["trainer"]["max_epochs"],
            "backbone": model["backbone"], "pretrained": model["pretrained"], "image_size": data["image_size"],
            "batch_size": data["batch_size"], "lr": model["lr"], "weight_decay": model["weight_decay"],
            "bottleneck_dim": model["bottleneck_dim"], "val_fraction": data["val_fraction"],
            "augmentation": data["train_augmentation"]}


def coverage(results: Sequence[RunResult], cells: Sequence[Cell]) -> list[str]:
    """How much of the full grid the table holds, and what remains: the runs of this command without a result
    (listed), the failed ones, and those outside its ``--settings``/``--seeds``."""
    done = sum(r.ok for r in results)
    if done == FULL_GRID:
        return [f"Complete: {done} runs (4 source settings x 2 strategies x 3 seeds)."]
    tried = {r.cell.name for r in results if r.ok or r.failed}
    missing = [c.name for c in cells if c.name not in tried]
    n_failed, outside = sum(r.failed for r in results), FULL_GRID - len(cells)
    remains = [f"{n} {text}" for n, text in (
        (len(missing), "run(s) listed below as not run"), (n_failed, "failed run(s)"),
        (outside, "run(s) outside this command's `--settings`/`--seeds`")) if n]
    lines = [f"**Partial: {done} finished run(s)** of the {FULL_GRID} of the full grid (4 source settings x 2 "
             f"strategies x 3 seeds). What remains: {', '.join(remains)}; rerun "
             "`python benchmarks/office_caltech/run_msda.py --workers 2` (finished and recorded runs are not run "
             "again)."]
    if missing:
        lines += ["", "Not run (no finished run and no ledger record):", "", *[f"- `{name}`" for name in missing]]
    return lines


def render(results: Sequence[RunResult], cells: Sequence[Cell], extra: Sequence[str], command: str,
           out: Path) -> str:
    b = budget()
    rows, cols = list(SOURCES.items()), list(STRATEGIES.items())
    first = "sources → Webcam"
    weights = "from scratch (random init)" if not b["pretrained"] else "pretrained"
    lines = [
        "# Multi-source DA: Office-Caltech-10, sources → Webcam",
        "",
        f"Generated {today()} by `{command}`. Do not edit by hand; rerun the command (finished runs are reused, "
        f"and recorded runs come from the committed ledger `{display_path(LEDGER)}/{NAME}/`).",
        "",
        f"**Budget: {b['steps']:,} steps per run** ({b['epochs']} evaluations, one per {b['steps'] // b['epochs']} "
        f"steps), {b['backbone']} {weights} at {b['image_size']} px."
        + (f" Every run here also had the overrides `{' '.join(extra)}`: the budget above may not hold, and the "
           "numbers are not comparable with runs without them." if extra else ""),
        "",
        *coverage(results, cells),
        "",
        "## Webcam accuracy",
        "",
        f"Webcam accuracy (%, all its 295 images, `val/target_acc`) at the last step, mean ± std over seeds "
        f"(n = finished runs); {STD_NOTE}. No Webcam label is used for training, and the number is the last "
        "step's: no checkpoint selection.",
        "",
        grid_table(results, rows, cols, "last", first=first),
        "",
        "## Three sources against the best single source",
        "",
        "The best single source is the single-source row with the highest mean Webcam accuracy in that column. "
        "Choosing it reads Webcam's labels: it is a reference row (what picking the right single source would "
        "give), not a selection method. Difference = the three sources' mean minus that source's mean, in points.",
        "",
        best_single_table(results),
        "",
        "## Source accuracy",
        "",
        "Accuracy (%) on the sources' held-out split (`val/source_acc`, the last step; with three sources the mean "
        "of the three).",
        "",
        grid_table(results, rows, cols, "source_acc_last", first=first),
        "",
        "## Wall time per run",
        "",
        "Mean wall-clock seconds of one run (the `tlframe fit` subprocess, start-up included); with `--workers N` "
        "N runs share the CPU cores.",
        "",
        grid_table(results, rows, cols, "wall_s", first=first, fmt=lambda v, _n: format_wall(v)),
        "",
        "## Setup",
        "",
        f"- configs: `{display_path(CONFIGS)}/webcam_from_<amazon|caltech10|dslr|three>.yaml`, the settings of "
        f"`{display_path(SWEEP)}`; source only = the configs' strategy (FineTune, the whole network at one LR); "
        "DANN = `--model.strategy=tlframe.strategies.DANN` (its defaults), a source-vs-target discriminator with "
        "one source and a 4-way one (`--model.strategy.init_args.num_domains=4`: the three sources, then Webcam) "
        "with three; seed s = `--seed_everything=s`.",
        f"- network: timm `{b['backbone']}` {weights}, a {b['bottleneck_dim']}-d bottleneck and a linear "
        f"classifier; SGD (Nesterov, momentum 0.9) lr {b['lr']}, weight decay {b['weight_decay']}, inverse-decay "
        f"LR schedule; {b['batch_size']} images per source domain and {b['batch_size']} Webcam images per step; "
        f"{b['image_size']} px, `{b['augmentation']}` augmentation.",
        f"- data: `office_caltech_10/<domain>` of the data root (Amazon 958, Caltech 1,123, DSLR 157, Webcam 295 "
        f"images, 10 classes); {b['val_fraction']:.0%} of each source held out for `val/source_acc`; Webcam "
        "unlabelled for training, all of it the evaluation split (transductive, as usual for Office).",
        f"- runs under `{display_path(out)}/runs/{NAME}/<setting>/seed<s>/version_0/`",
        *machine_lines(),
        *failures_section(results),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out, data_root, results_path, extra = resolve_io(args, DEFAULT_OUT, DEFAULT_RESULTS)
    if not (data_root / "office_caltech_10").is_dir():
        raise SystemExit(f"error: {data_root / 'office_caltech_10'} does not exist: pass --data-root (the folder "
                         "with office_caltech_10/<domain>/<class>/*.jpg)")
    cells = build_cells(args.settings, args.seeds, out, data_root, extra)
    print(f"run_msda: {len(cells)} runs into {out}", flush=True)
    if args.collect_only:
        results = collect_cells(cells)
    else:
        results = run_cells(cells, log=lambda s: print(s, flush=True), workers=args.workers)
    text = render(results, cells, extra, regen_command(Path(__file__), argv), out)
    return write_results(results_path, text, results, "run_msda")


if __name__ == "__main__":
    raise SystemExit(main())
