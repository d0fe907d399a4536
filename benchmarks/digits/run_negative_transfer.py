"""When does transfer hurt, and can the source be chosen beforehand? DANN from near, far and mismatched sources.

One command::

    python benchmarks/digits/run_negative_transfer.py [--workers 2] [--data-root ../shared/data]

1. runs the sweep ``benchmarks/digits/configs/negative_transfer.yaml`` with ``tlframe sweep`` (6 source->target
   tasks x 3 seeds, DANN, each with the source-only and target-only baselines the sweep adds; finished runs are
   reused, so an interrupted benchmark resumes);
2. writes its ``tlframe report`` (the adapted runs against their baselines, negative transfer flagged);
3. ranks the sources of each target before any adaptation: every source-only model (seed 0) is scored with
   ``tlframe rank`` on the target's labelled few-shot set (10 train images per class: the target-only baseline's
   training set), and by the label-free validators its run logged on the target (entropy, IM); each ranking is
   compared with the DANN-adapted target accuracy of that source;
4. writes ``benchmarks/results/negative_transfer.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.digits.common import (  # noqa: E402
    REPO, display_path, machine_lines, regen_command, run_sweep, today,
)
from benchmarks.digits.rank_stats import kendall_tau_b, weighted_kendall_tau  # noqa: E402
from tlframe.atomic import atomic_write_text  # noqa: E402

SWEEP = HERE / "configs" / "negative_transfer.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "negative_transfer"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "negative_transfer.md"
METRIC = "val/target_acc"
#: Source rankers: (column title, where the value comes from, sign that makes "higher = better").
RANKERS = [("LogME", "rank:logme", 1), ("LEEP", "rank:leep", 1), ("NCE", "rank:nce", 1),
           ("reg. H-score", "rank:reg_hscore", 1), ("- entropy", "run:val/target_entropy", -1),
           ("- IM", "run:val/target_im", -1)]


def tlframe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tlframe", *args], cwd=REPO, env=env, text=True,
                            capture_output=True)
    if result.returncode not in (0, 1):
        raise SystemExit(f"tlframe {args[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def target_of(task: str) -> str:
    return task.rsplit("_to_", 1)[1]


def source_of(task: str) -> str:
    return task.rsplit("_to_", 1)[0]


def metric(record: dict[str, Any], tag: str) -> Optional[float]:
    entry = (record.get("scalars") or {}).get(tag)
    return None if entry is None else float(entry["last"])


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "–"
    text = f"{100 * statistics.fmean(values):.1f}"
    return text + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "") + f" ({len(values)})"


def score_sources(target: str, tasks: list[str], runs: list, records: dict[str, dict], out: Path,
                  env: dict[str, str]) -> dict[str, dict[str, Optional[float]]]:
    """Per source task: the transferability scores of its source-only model (seed 0) on the target's labelled
    set, and the label-free validators that run logged on the target."""
    by_hash = {r.hash: r for r in runs}
    first = {t: next(r for r in runs if r.point.get("task") == t and not r.baseline and r.seed == runs[0].seed)
             for t in tasks}
    labelled_set = by_hash[first[tasks[0]].baselines["target_only"]].configs[0]  # FineTune on 10 target labels/class
    candidates, values = [], {}
    for task in tasks:
        source_only = by_hash[first[task].baselines["source_only"]]
        ckpt = source_only.run_dir / "checkpoints" / "last.ckpt"
        candidates.append({"name": task, "checkpoint": str(ckpt)})
        values[task] = {f"run:{tag}": metric(records.get(source_only.hash, {}), tag)
                        for tag in ("val/target_entropy", "val/target_im")}
    folder = out / f"ranking_{target}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "candidates.yaml").write_text(json.dumps({"candidates": candidates}))
    tlframe("rank", "-c", labelled_set, "--candidates", str(folder / "candidates.yaml"), "--out", str(folder), env=env)
    with open(folder / "ranking.csv") as f:
        for row in csv.DictReader(f):
            values[row["name"]].update({f"rank:{k}": (float(row[k]) if row[k] not in ("", "nan") else None)
                                        for k in ("logme", "leep", "nce", "reg_hscore")})
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help=f"sweep folder (default {display_path(DEFAULT_OUT)})")
    p.add_argument("--results", help=f"results file (default {display_path(DEFAULT_RESULTS)})")
    p.add_argument("--data-root", help="folder with MNIST/raw, usps/usps.h5 and mnist_m.tar.gz (default ../shared/data)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out, results, env, sweep_code = run_sweep(SWEEP, args, DEFAULT_OUT, DEFAULT_RESULTS)
    tlframe("report", str(out), "--metric", METRIC, "--metric", "val/source_acc", "--decimals", "3",
            "--out", str(out / "report.md"), env=env)

    from tlframe.report import collect
    from tlframe.sweep import load_sweep

    runs = load_sweep(SWEEP, str(out)).runs
    _, entries = collect(out)
    records = {e.hash: e.record for e in entries if e.status == "done"}
    tasks = list(dict.fromkeys(r.point["task"] for r in runs if not r.baseline))
    by_hash = {r.hash: r for r in runs}

    def accs(task: str, kind: Optional[str]) -> list[float]:
        vals = []
        for r in runs:
            if r.baseline or r.point["task"] != task:
                continue
            h = r.hash if kind is None else r.baselines.get(kind)
            v = metric(records.get(h, {}), METRIC) if h else None
            if v is not None:
                vals.append(v)
        return vals

    lines = ["# Negative transfer: DANN from near, far and mismatched sources, against its baselines", "",
             f"Produced by `{regen_command(Path(__file__), argv)}` on {today()}. Do not edit by hand; rerun the "
             f"command (finished runs under `{display_path(out)}` are reused).", "",
             "Each DANN run is compared, seed by seed, with its two baselines, which `baselines:` in the sweep file "
             "(`benchmarks/digits/configs/negative_transfer.yaml`) adds: **source-only** (the same run with FineTune: "
             "no adaptation) and **target-only** (FineTune on 10 labelled target *train* images per class, nothing "
             "from the source; the formal yardstick of negative transfer, Wang et al., CVPR 2019). Target test "
             "accuracy % (mean ± sample std over seeds, n), last checkpoint, no target label used for training or "
             "selection by the adapted and source-only runs.", "",
             "| task | source | target | DANN | source-only | target-only (10/class) | DANN - target-only | verdict |",
             "|:---|:---|:---|---:|---:|---:|---:|:---|"]
    for task in tasks:
        dann, so, to = accs(task, None), accs(task, "source_only"), accs(task, "target_only")
        diffs = [a - b for a, b in zip(dann, to)] if len(dann) == len(to) else []
        verdict = "–"
        if diffs and len(diffs) > 1:
            spread = max(statistics.stdev(dann), statistics.stdev(to))
            mean = statistics.fmean(diffs)
            verdict = ("**negative transfer**" if mean < 0 else "positive transfer") + (
                " (beyond seed spread)" if abs(mean) > spread else " (within seed spread)")
        lines.append(f"| {task} | {source_of(task)} | {target_of(task)} | {fmt(dann)} | {fmt(so)} | {fmt(to)} | "
                     + (f"{100 * statistics.fmean(diffs):+.1f}" if diffs else "–") + f" | {verdict} |")
    report_md = (out / "report.md").read_text()
    flagged = report_md.split("## Transfer against its baselines", 1)[1].split("\n## ", 1)[0] if (
        "## Transfer against its baselines" in report_md) else ""
    lines += ["", "What `tlframe report` printed for this sweep (fractions, not %), the rows where transfer hurt:", "",
              "```", "## Transfer against its baselines" + flagged.rstrip(), "```", "",
              f"The full report (every run, both baselines): `tlframe report {display_path(out)}`.", ""]

    # -------- source ranking
    lines += ["## Ranking the sources before adapting", "",
              "For each target, every source's source-only model (seed 0, trained on the source alone) is scored "
              "without adapting: by `tlframe rank` on the target's labelled few-shot set (the 10 train images per "
              "class the target-only baseline trains on; LogME, LEEP, NCE, regularised H-score) and by the label-free "
              "validators its run logged on the unlabelled target (prediction entropy, IM; negated so higher = "
              "better). Each score's ordering of the sources is compared with the DANN-adapted target accuracy "
              "(mean over seeds): Kendall's tau-b and weighted tau (3 sources per target: one swapped pair moves tau "
              "by 0.67, so read the picks as much as the taus).", ""]
    taus: dict[str, list[tuple[float, float, bool]]] = {name: [] for name, _, _ in RANKERS}
    for target in dict.fromkeys(target_of(t) for t in tasks):
        group = [t for t in tasks if target_of(t) == target]
        adapted = {t: statistics.fmean(accs(t, None)) for t in group if accs(t, None)}
        if len(adapted) != len(group):
            lines += [f"{target}: not every task finished; no ranking.", ""]
            continue
        values = score_sources(target, group, runs, records, out, env)
        best = max(group, key=adapted.get)
        header = "| source | DANN acc % | " + " | ".join(n for n, _, _ in RANKERS) + " |"
        lines += [f"### target {target}", "", header, "|:---|---:|" + "---:|" * len(RANKERS)]
        for t in sorted(group, key=adapted.get, reverse=True):
            cells = [("–" if values[t].get(key) is None else f"{sign * values[t][key]:.4f}") for _, key, sign in RANKERS]
            lines.append(f"| {source_of(t)} | {100 * adapted[t]:.1f} | " + " | ".join(cells) + " |")
        tau_cells, pick_cells = [], []
        for name, key, sign in RANKERS:
            xs = [values[t].get(key) for t in group]
            if any(x is None for x in xs):
                tau_cells.append("–")
                pick_cells.append("–")
                continue
            xs = [sign * x for x in xs]
            ys = [adapted[t] for t in group]
            tb, wt = kendall_tau_b(xs, ys), weighted_kendall_tau(xs, ys)
            pick = group[max(range(len(group)), key=lambda i: xs[i])]
            taus[name].append((tb, wt, pick == best))
            tau_cells.append(f"{tb:+.2f} / {wt:+.2f}")
            pick_cells.append(source_of(pick) + (" ✓" if pick == best else ""))
        lines += ["| **tau-b / weighted tau** | | " + " | ".join(tau_cells) + " |",
                  "| **top pick** (✓ = best for DANN) | " + source_of(best) + " | " + " | ".join(pick_cells) + " |", ""]
    lines += ["Mean over targets (tau-b / weighted tau; top picks right):", "",
              "| score | tau-b | weighted tau | top pick right |", "|:---|---:|---:|---:|"]
    for name, vals in taus.items():
        if vals:
            lines.append(f"| {name} | {statistics.fmean(v[0] for v in vals):+.2f} | "
                         f"{statistics.fmean(v[1] for v in vals):+.2f} | {sum(v[2] for v in vals)}/{len(vals)} |")
    lines += ["", "## Setup", "",
              f"- sweep: `{display_path(SWEEP)}` (base `negative_transfer_base.yaml`): `dann_cnn` (Ganin & Lempitsky's "
              "CNN, 3x28x28) from scratch, 1,000 SGD steps, batch 64 + 64, lr 0.01, DANN trade-off 1 with the "
              "paper's GRL schedule over the run; baselines with the same budget, seed and optimizer.",
              "- mismatched source `mnist_swapped`: MNIST with the labels of 3<->5 and 4<->9 swapped "
              "(`tlframe.data.RelabelledDomain`), so four of the ten classes mean something else than on the target.",
              "- ranking: `tlframe rank` on the target-only baseline's labelled set of seed 0 (10 train images per class "
              "drawn with split seed 0, less its validation share), the source-only checkpoints of seed 0; "
              "validators: the last validation of those source-only runs.",
              *machine_lines(), ""]
    atomic_write_text(results, "\n".join(lines))
    print(f"run_negative_transfer: wrote {results}")
    return 0 if sweep_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
