"""Regenerate ``benchmarks/results/ranking.md``: do transferability scores rank a model zoo as fine-tuning does?

Step 1, the zoo: Ganin & Lempitsky's CNN (``dann_cnn``) trained from scratch on each of MNIST, MNIST 0-4,
USPS, USPS 0-4, MNIST-M, MNIST-M 0-4 and the synthetic shapes (``benchmarks/digits/configs/zoo_pretrain.yaml``),
plus random init: 8 models.
Step 2, ranking: for each target task (USPS, MNIST-M, MNIST 5-9; 10 labelled images per class), every
candidate is scored on the labelled images (:func:`tlframe.rank.score_candidate`: LogME, H-score, regularised
H-score, LEEP, NCE), per seed (each seed draws its own 10 per class).
Step 3, ground truth: every candidate fine-tuned on every task (``zoo_finetune.yaml``, same recipe for all),
3 seeds; the target test accuracy of the last checkpoint.
Models trained on the task's own data set are not candidates for it (they saw its labels): USPS and USPS 0-4
for USPS, MNIST-M and MNIST-M 0-4 for MNIST-M, MNIST for MNIST 5-9.

The statistic: weighted Kendall's tau (hyperbolic weights, as ``scipy.stats.weightedtau``'s default) between
each score (mean over seeds) and the mean fine-tuned accuracy, per task. Resumable: finished runs are reused.

    python benchmarks/digits/run_ranking.py [--seeds 0 1 2] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.rank_stats import weighted_kendall_tau  # noqa: E402
from benchmarks.digits.common import (  # noqa: E402
    REPO, Cell, RunResult, display_path, failures_section, machine_lines, missing_value, regen_command, resolve_io,
    run_cell, run_cells, today, write_results,
)

HERE = Path(__file__).resolve().parent
ZOO_CONFIG = HERE / "configs" / "zoo_pretrain.yaml"
FINETUNE_CONFIG = HERE / "configs" / "zoo_finetune.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "ranking"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "ranking.md"
LOW, HIGH = "[0,1,2,3,4]", "[5,6,7,8,9]"
#: zoo member -> the data.source overrides of its training run (None: random init, not trained)
ZOO: dict[str, Optional[list[str]]] = {
    "random": None,
    "synthetic": ["--data.source=tlframe.data.SyntheticDomain", "--data.source.init_args.num_train=10000",
                  "--data.source.init_args.image_size=28", "--data.target=tlframe.data.SyntheticDomain",
                  "--data.target.init_args.style=target", "--data.target.init_args.image_size=28"],
    "mnist": ["--data.source=tlframe.data.MNISTDomain"],
    "mnist_0-4": ["--data.source=tlframe.data.MNISTDomain", f"--data.source.init_args.class_subset={LOW}",
                  f"--data.target.init_args.class_subset={LOW}"],
    "usps": ["--data.source=tlframe.data.USPSDomain"],
    "usps_0-4": ["--data.source=tlframe.data.USPSDomain", f"--data.source.init_args.class_subset={LOW}",
                 f"--data.target.init_args.class_subset={LOW}"],
    "mnistm": ["--data.source=tlframe.data.MNISTMDomain"],
    "mnistm_0-4": ["--data.source=tlframe.data.MNISTMDomain", f"--data.source.init_args.class_subset={LOW}",
                   f"--data.target.init_args.class_subset={LOW}"],
}
#: target task -> (its data overrides, zoo members excluded because they were trained on its data set)
TASKS: dict[str, tuple[list[str], set[str]]] = {
    "usps": (["--data.source=tlframe.data.USPSDomain", "--data.target=tlframe.data.USPSDomain"], {"usps", "usps_0-4"}),
    "mnistm": (["--data.source=tlframe.data.MNISTMDomain", "--data.target=tlframe.data.MNISTMDomain"],
               {"mnistm", "mnistm_0-4"}),
    "mnist_5-9": (["--data.source=tlframe.data.MNISTDomain", f"--data.source.init_args.class_subset={HIGH}",
                   "--data.target=tlframe.data.MNISTDomain", f"--data.target.init_args.class_subset={HIGH}"], {"mnist"}),
}
SCORES = ("logme", "leep", "nce", "hscore", "reg_hscore")


def zoo_cells(out: Path, data_root: Path, seed: int, extra: Sequence[str]) -> dict[str, Cell]:
    return {name: Cell(row="zoo", col=name, seed=seed, out=out, name=f"zoo/{name}",
                       args=["-c", str(ZOO_CONFIG), f"--seed_everything={seed}", *src, *extra],
                       env={"TLFRAME_DATA_ROOT": str(data_root)})
            for name, src in ZOO.items() if src is not None}


def weights_of(zoo: dict[str, Cell], name: str) -> Optional[Path]:
    return zoo[name].run_dir / "checkpoints" / "last.ckpt" if name in zoo else None


def finetune_cells(zoo: dict[str, Cell], seeds: Sequence[int], out: Path, data_root: Path,
                   extra: Sequence[str]) -> list[Cell]:
    cells = []
    for task, (task_args, excluded) in TASKS.items():
        for name in ZOO:
            if name in excluded:
                continue
            weights = weights_of(zoo, name)
            for seed in seeds:
                cells.append(Cell(
                    row=task, col=name, seed=seed, out=out, name=f"finetune/{task}/{name}/seed{seed}",
                    args=["-c", str(FINETUNE_CONFIG), *task_args, f"--seed_everything={seed}",
                          f"--data.split_seed={seed}", *([f"--model.weights={weights}"] if weights else []), *extra],
                    env={"TLFRAME_DATA_ROOT": str(data_root)}, needs=[weights] if weights else []))
    return cells


def score_task(task: str, zoo: dict[str, Cell], seed: int, data_root: Path) -> list[dict[str, Any]]:
    """Scores of every candidate of ``task`` on the labelled set of seed ``seed`` (cached in the run folder)."""
    from tlframe.rank import Candidate, data_module, score_candidate

    os.environ["TLFRAME_DATA_ROOT"] = str(data_root)
    task_args, excluded = TASKS[task]
    dm = data_module(str(FINETUNE_CONFIG), [*task_args, f"--data.split_seed={seed}"])
    rows = []
    for name in ZOO:
        if name in excluded:
            continue
        weights = weights_of(zoo, name)
        cand = Candidate(name=name, checkpoint=str(weights)) if weights else Candidate(name=name, backbone="dann_cnn")
        rows.append(score_candidate(cand, dm, "source", "train", cache_mode="memory"))
    return rows


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def render(tasks: dict[str, dict[str, Any]], zoo_results: dict[str, RunResult], seeds: Sequence[int], command: str,
           out: Path, extra: Sequence[str], failures: Sequence[RunResult]) -> str:
    lines = ["# Transferability ranking on a digits model zoo", "",
             f"Produced by `{command}` on {today()}. Do not edit by hand; rerun the command (finished runs under "
             f"`{display_path(out)}` are reused).", ""]
    if extra:
        lines += [f"**Shortened runs** (`--extra {' '.join(extra)}`): smoke-test numbers only.", ""]
    lines += ["## Weighted Kendall's tau between each score and the fine-tuned accuracy", "",
              "Per target task: tau between the candidates' score (mean over the seeds' labelled sets) and their mean "
              "fine-tuned target test accuracy (1 = the score orders the candidates as fine-tuning does; hyperbolic "
              "weights stress the top of the ranking). LEEP and NCE use each model's own 10-class (or 5-class) "
              "classifier, so random init (whose head is untrained) is not scored by them.", "",
              "| task | candidates | " + " | ".join(s for s in ("LogME", "LEEP", "NCE", "H-score", "reg. H-score")) + " |",
              "|---|---:|" + "---:|" * len(SCORES)]
    for task, t in tasks.items():
        lines.append(f"| {task} | {len(t['rows'])} | " + " | ".join(
            "n/a" if t["tau"].get(s) is None or math.isnan(t["tau"][s]) else f"{t['tau'][s]:.2f}" for s in SCORES) + " |")
    taus = {s: [t["tau"][s] for t in tasks.values() if t["tau"].get(s) is not None and not math.isnan(t["tau"][s])]
            for s in SCORES}
    lines.append("| **mean** | | " + " | ".join(f"**{statistics.fmean(v):.2f}**" if v else "n/a" for v in taus.values())
                 + " |")
    lines += ["", "n/a: the score is the same for every candidate. H-score is exactly C - 1 for any model when the "
              "labelled images are fewer than the feature dimensions (here 100 or 50 images, 768-d features: the "
              "feature covariance is singular and its pseudo-inverse cancels the between-class covariance), which is "
              "what the shrinkage of the regularised H-score (Ibrahim et al. 2022) is for."]
    lines += ["", "Published anchors for the same statistic, not the same setting: TLlib's ranking benchmark "
              "(TLlib's ranking README, `tllib/ranking`: 10 ImageNet models x 8 downstream data sets, LogME weighted "
              "tau about 0.5-0.8 depending on the data set) and the SFDA paper (Shao et al., ECCV 2022), whose first "
              "table gives the same statistic for LogME, LEEP, NCE and H-score on 11 classification sets (its figures "
              "are not copied here). Ours differs: 5-7 small CNNs per task that "
              "share one architecture and differ only in their training data, 10 labels per class, a short fine-tune "
              "(300 steps); so few candidates make each tau coarse (one swapped pair moves it by ~0.1-0.4).", ""]
    for task, t in tasks.items():
        lines += [f"## {task}", "", "| candidate | fine-tuned acc % (mean ± std, n) | "
                  + " | ".join(("LogME", "LEEP", "NCE", "H-score", "reg. H-score")) + " |", "|---|---:|" + "---:|" * len(SCORES)]
        for r in sorted(t["rows"], key=lambda r: -(r["acc"] or 0)):
            acc = (f"{100 * r['acc']:.1f} ± {100 * r['acc_std']:.1f} ({r['n']})" if r["acc"] is not None
                   else r["missing"])
            lines.append(f"| {r['name']} | {acc} | " + " | ".join(
                "n/a" if r[s] is None else f"{r[s]:.4f}" for s in SCORES) + " |")
        lines.append("")
    zoo_lines = [f"- {name}: " + (f"source validation accuracy {100 * res.record['source_acc_last']:.1f} %"
                                  if res.ok and res.record and res.record.get("source_acc_last") is not None
                                  else f"FAILED ({res.error})" if res.failed
                                  else "left to another runner (not finished)" if res.status == "busy" else "done")
                 for name, res in zoo_results.items()]
    lines += ["## Setup", "",
              f"- zoo (`{display_path(ZOO_CONFIG)}`): `dann_cnn` trained from scratch, 1,500 SGD steps (batch 64), "
              "one run each (seed 0); random init is the eighth model:", *zoo_lines,
              f"- fine-tuning (`{display_path(FINETUNE_CONFIG)}`): 10 labelled images per class of the task's train "
              f"split (drawn with `data.split_seed` = seed), FineTune with backbone LR x0.1, 300 steps, last checkpoint; "
              f"seeds {' '.join(map(str, seeds))}; accuracy on the task's test split (USPS 2,007, MNIST-M 9,001, "
              "MNIST 5-9 4,861 images). Target test labels are used only for this ground truth, never for ranking.",
              "- scores: `tlframe.rank.score_candidate` on the same labelled images as the fine-tuning (backbone "
              "features, 768-d, eval transform), float64; mean over the seeds.",
              "- models trained on the task's own data set are excluded from its candidates (they saw its labels).",
              *machine_lines(), *failures_section(list(failures)), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--out", help=f"output folder of the runs (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--data-root", help="TLFRAME_DATA_ROOT (default ../shared/data from the repository root)")
    p.add_argument("--extra", action="append", default=[], metavar='"--key=value ..."',
                   help="CLI overrides appended to every run (repeatable)")
    p.add_argument("--results", help=f"markdown file to write (default {DEFAULT_RESULTS.relative_to(REPO)})")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (default 1)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    global TASKS
    TASKS = {k: v for k, v in TASKS.items() if k in args.tasks}
    out, data_root, results_path, extra = resolve_io(args, DEFAULT_OUT, DEFAULT_RESULTS)
    log = lambda s: print(s, flush=True)  # noqa: E731
    zoo = zoo_cells(out, data_root, 0, extra)
    log(f"run_ranking: {len(zoo)} zoo runs into {out}")
    zoo_results = dict(zip(zoo, run_cells(list(zoo.values()), log, workers=args.workers)))
    cells = finetune_cells(zoo, args.seeds, out, data_root, extra)
    log(f"run_ranking: {len(cells)} fine-tuning runs")
    results = run_cells(cells, log, workers=args.workers)
    tasks: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        per_seed = {}
        for seed in args.seeds:
            cache = out / "scores" / f"{task}_seed{seed}.json"
            if cache.is_file():
                per_seed[seed] = json.loads(cache.read_text())
            else:
                per_seed[seed] = score_task(task, zoo, seed, data_root)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(per_seed[seed], indent=1))
            log(f"run_ranking: scored {task} seed {seed}")
        rows = []
        for i, name in enumerate(r["name"] for r in per_seed[args.seeds[0]]):
            mine = [res for res in results if res.cell.row == task and res.cell.col == name]
            accs = [res.record["last"] for res in mine if res.ok]
            row = {"name": name, "acc": _mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   "n": len(accs), "missing": missing_value(mine)}
            row.update({s: _mean([per_seed[seed][i][s] for seed in args.seeds]) for s in SCORES})
            rows.append(row)
        tau = {}
        for s in SCORES:
            pairs = [(r[s], r["acc"]) for r in rows if r[s] is not None and r["acc"] is not None]
            scores = [p[0] for p in pairs]
            if len(pairs) < 2 or max(scores) - min(scores) <= 1e-6 * max(1.0, abs(statistics.fmean(scores))):
                tau[s] = None  # no ranking: too few candidates, or the same value for all (e.g. a saturated score)
            else:
                tau[s] = weighted_kendall_tau(*zip(*pairs))
        tasks[task] = {"rows": rows, "tau": tau}
        log(f"run_ranking: {task}: " + ", ".join(f"{s} tau {v:.2f}" for s, v in tau.items() if v is not None))
    text = render(tasks, zoo_results, args.seeds, regen_command(Path(__file__), argv), out, extra,
                  [*zoo_results.values(), *results])
    return write_results(results_path, text, [*zoo_results.values(), *results], "run_ranking")


if __name__ == "__main__":
    raise SystemExit(main())
