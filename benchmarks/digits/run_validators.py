"""Regenerate ``benchmarks/results/validators.md``: do label-free validators pick good MNIST -> USPS models?

A sweep of candidate models on MNIST -> USPS (LeNet, ``configs/digits/mnist2usps/*.yaml``):

- strategies: source only (FineTune), DANN with ``trade_off`` 0.3 and 1.0, MMD (DAN) with ``trade_off``
  0.3 and 1.0; seeds 0 and 1 (``--seed_everything``; the source train/validation split is the same for all);
- a short budget (default 6 epochs x 200 iterations, batch 64) with ``val_fraction 0.1`` (so DEV has a
  source validation split) and one validation per epoch.

The candidates are all (run, epoch) pairs: every validation of every run. At each validation tlframe logs
the label-free validators of the target evaluation split (USPS test images, labels unused):
``val/target_entropy`` (lower is better), ``val/target_snd`` (higher), ``val/target_im`` (lower),
``val/target_dev`` (lower; uses the labelled source validation split), and ``val/source_acc`` (higher);
and the true ``val/target_acc``, used here **only** as the ground truth the validators are scored against.

Per validator (sign-adjusted so that higher = better): Spearman's rho, Kendall's tau-b and weighted
Kendall's tau (hyperbolic weights) with the true target accuracy over all candidates; and the true target
accuracy of the candidate each validator picks (its best) in per-run pools (epoch selection), per-seed
pools (strategy, trade-off and epoch selection) and the whole pool, against the oracle pick (max true target
accuracy) and the last-epoch models. Resumable: a run directory with ``done.json`` is reused.

    python benchmarks/digits/run_validators.py --workers 1
    python benchmarks/digits/run_validators.py --strategies source_only dann_1.0 --seeds 0 --epochs 2 \\
        --iters 5 --out /tmp/smoke --results /tmp/smoke/validators.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.rank_stats import (  # noqa: E402
    average_ranks, kendall_tau_b, pearson, spearman, weighted_kendall_tau,
)
from benchmarks.digits.common import (  # noqa: E402
    REPO, Cell, RunResult, display_path, failures_section, machine_lines, markdown_table, missing_value,
    read_scalars, regen_command, resolve_io, run_cells, today, write_results,
)

CONFIGS = REPO / "configs" / "digits" / "mnist2usps"
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "validators"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "validators.md"
#: strategy id -> (title, config, CLI overrides)
STRATEGIES: dict[str, tuple[str, Path, list[str]]] = {
    "source_only": ("source only", CONFIGS / "source_only.yaml", []),
    "dann_0.3": ("DANN λ=0.3", CONFIGS / "dann.yaml", ["--model.strategy.trade_off=0.3"]),
    "dann_1.0": ("DANN λ=1.0", CONFIGS / "dann.yaml", ["--model.strategy.trade_off=1.0"]),
    "mmd_0.3": ("MMD λ=0.3", CONFIGS / "mmd.yaml", ["--model.strategy.trade_off=0.3"]),
    "mmd_1.0": ("MMD λ=1.0", CONFIGS / "mmd.yaml", ["--model.strategy.trade_off=1.0"]),
}
#: the ground truth: accuracy on the labelled target test split (never used by a validator's pick)
TRUTH = "val/target_acc"


@dataclass(frozen=True)
class Validator:
    tag: str
    title: str
    sign: int        # +1: higher is better, -1: lower is better
    uses: str        # what it reads


VALIDATORS = (
    Validator("val/source_acc", "source acc", +1, "labelled source validation split"),
    Validator("val/target_entropy", "entropy", -1, "target predictions"),
    Validator("val/target_im", "IM", -1, "target predictions"),
    Validator("val/target_snd", "SND", +1, "target predictions"),
    Validator("val/target_dev", "DEV", -1, "target features + labelled source validation split"),
)
#: a diagnostic shown in the appendix, not a validator: proxy A-distance between source and target features
DIAGNOSTIC = "val/a_distance"
TAGS = (TRUTH, *(v.tag for v in VALIDATORS), DIAGNOSTIC)


# --------------------------------------------------------------------------- candidates and picks (pure)
@dataclass
class Candidate:
    """One (run, epoch) checkpoint: its strategy, seed, 1-based epoch, global step and logged values."""

    strategy: str
    seed: int
    epoch: int
    step: int
    values: dict[str, float] = field(default_factory=dict)

    @property
    def run(self) -> tuple[str, int]:
        return self.strategy, self.seed

    def get(self, tag: str) -> float:
        return self.values.get(tag, math.nan)


def candidates_from_scalars(scalars: dict[str, list[tuple[int, float]]], strategy: str, seed: int,
                            tags: Sequence[str] = TAGS) -> list[Candidate]:
    """A run's candidates: one per validation, i.e. per logged step of :data:`TRUTH`, in order (epoch 1, 2, ...);
    each holds the ``tags`` logged at that step (NaN where a tag is missing)."""
    out = []
    by_tag = {tag: dict(scalars.get(tag, [])) for tag in tags}
    for epoch, (step, _) in enumerate(scalars.get(TRUTH, []), 1):
        out.append(Candidate(strategy, seed, epoch, step,
                             {tag: float(by_tag[tag].get(step, math.nan)) for tag in tags}))
    return out


def oriented(candidate: Candidate, validator: Validator) -> float:
    """The validator's value with its sign applied (higher = better; NaN when not logged)."""
    return validator.sign * candidate.get(validator.tag)


def pick(pool: Sequence[Candidate], validator: Validator) -> Optional[Candidate]:
    """The candidate the validator ranks best (max of :func:`oriented`; on a tie the first in pool order).
    It reads only ``validator.tag``: never the ground truth. ``None`` when no candidate has a finite value."""
    finite = [c for c in pool if math.isfinite(oriented(c, validator))]
    return max(finite, key=lambda c: oriented(c, validator)) if finite else None


def oracle(pool: Sequence[Candidate]) -> Candidate:
    """The candidate with the highest true target accuracy (an upper bound: it uses the target labels)."""
    return max(pool, key=lambda c: c.get(TRUTH))


def last_epochs(pool: Sequence[Candidate]) -> list[Candidate]:
    """The last validation of every run in the pool (what training without model selection returns)."""
    last: dict[tuple[str, int], Candidate] = {}
    for c in pool:
        if c.run not in last or c.epoch > last[c.run].epoch:
            last[c.run] = c
    return list(last.values())


def correlations(cands: Sequence[Candidate], validator: Validator) -> dict[str, float]:
    """Spearman, Kendall tau-b and weighted tau between the oriented validator and the truth, over the
    candidates where both are finite (``n``)."""
    pairs = [(oriented(c, validator), c.get(TRUTH)) for c in cands]
    pairs = [(v, t) for v, t in pairs if math.isfinite(v) and math.isfinite(t)]
    if len(pairs) < 2:
        return {"n": len(pairs), "spearman": math.nan, "kendall_b": math.nan, "weighted_tau": math.nan}
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"n": len(pairs), "spearman": spearman(x, y), "kendall_b": kendall_tau_b(x, y),
            "weighted_tau": weighted_kendall_tau(x, y)}


POOLINGS: dict[str, tuple[str, Callable[[Candidate], object]]] = {
    "run": ("per run (epoch selection)", lambda c: c.run),
    "seed": ("per seed (strategy + λ + epoch)", lambda c: c.seed),
    "all": ("whole pool (all runs)", lambda c: "all"),
}


def pools(cands: Sequence[Candidate], key: Callable[[Candidate], object]) -> list[list[Candidate]]:
    """The candidates grouped by ``key``, in first-appearance order."""
    groups: dict[object, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(key(c), []).append(c)
    return list(groups.values())


def selection(cands: Sequence[Candidate], key: Callable[[Candidate], object],
              validators: Sequence[Validator] = VALIDATORS) -> dict[str, object]:
    """Mean over the pools (``key``) of the true target accuracy of: each validator's pick, the oracle pick,
    the pool's last-epoch models (mean over its runs) and a uniformly random candidate (the pool mean).
    A validator without a finite value in a pool is left out of that pool's mean (``n`` counts the pools)."""
    groups = pools(cands, key)
    picked: dict[str, list[float]] = {v.tag: [] for v in validators}
    for pool in groups:
        for v in validators:
            chosen = pick(pool, v)
            if chosen is not None:
                picked[v.tag].append(chosen.get(TRUTH))
    mean = lambda xs: statistics.fmean(xs) if xs else math.nan  # noqa: E731
    return {
        "pools": len(groups),
        "size": mean([len(p) for p in groups]),
        "picked": {tag: mean(vals) for tag, vals in picked.items()},
        "picked_n": {tag: len(vals) for tag, vals in picked.items()},
        "oracle": mean([oracle(p).get(TRUTH) for p in groups]),
        "last": mean([mean([c.get(TRUTH) for c in last_epochs(p)]) for p in groups]),
        "random": mean([mean([c.get(TRUTH) for c in p]) for p in groups]),
    }


# --------------------------------------------------------------------------- runs
def sweep_cells(strategies: Sequence[str], seeds: Sequence[int], out: Path, data_root: Path, epochs: int, iters: int,
                extra: Sequence[str]) -> list[Cell]:
    """One :class:`Cell` per (strategy, seed), in table order."""
    budget = [f"--trainer.max_epochs={epochs}", f"--data.iters_per_epoch={iters}", "--data.val_fraction=0.1",
              "--trainer.check_val_every_n_epoch=1"]
    cells = []
    for strategy in strategies:
        _, config, overrides = STRATEGIES[strategy]
        for seed in seeds:
            cells.append(Cell(row=strategy, col="mnist2usps", seed=seed, out=out,
                              name=f"mnist2usps/{strategy}/seed{seed}",
                              args=["-c", str(config), f"--seed_everything={seed}", *overrides, *budget, *extra],
                              env={"TLFRAME_DATA_ROOT": str(data_root)}))
    return cells


def collect(results: Sequence[RunResult]) -> list[Candidate]:
    """The candidates of every finished run, read from its TensorBoard events."""
    cands = []
    for r in results:
        if r.ok:
            cands += candidates_from_scalars(read_scalars(r.cell.run_dir), r.cell.row, r.cell.seed)
    return cands


# --------------------------------------------------------------------------- report (pure)
def _pct(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _num(x: float, decimals: int = 2) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{decimals}f}"


def _cand(c: Optional[Candidate]) -> str:
    return "–" if c is None else f"{STRATEGIES.get(c.strategy, (c.strategy,))[0]} s{c.seed} ep{c.epoch}: {_pct(c.get(TRUTH))}"


def mean_pool_spearman(cands: Sequence[Candidate], validator: Validator, key: Callable[[Candidate], object]) -> float:
    """Spearman's rho within each pool (``key``), averaged over the pools where it is defined."""
    rhos = [correlations(pool, validator)["spearman"] for pool in pools(cands, key)]
    rhos = [r for r in rhos if math.isfinite(r)]
    return statistics.fmean(rhos) if rhos else math.nan


def correlation_table(cands: Sequence[Candidate]) -> str:
    rows = []
    for v in VALIDATORS:
        r = correlations(cands, v)
        rows.append([f"{v.title} (`{v.tag}`, {'higher' if v.sign > 0 else 'lower'} better)", str(r["n"]),
                     _num(r["spearman"]), _num(r["kendall_b"]), _num(r["weighted_tau"]),
                     _num(mean_pool_spearman(cands, v, POOLINGS["seed"][1])),
                     _num(mean_pool_spearman(cands, v, POOLINGS["run"][1]))])
    return markdown_table(["validator (sign-adjusted)", "candidates", "Spearman ρ", "Kendall τ-b", "weighted τ",
                           "ρ per seed (mean)", "ρ within run (mean)"], rows)


def best_is_last(cands: Sequence[Candidate]) -> tuple[int, int]:
    """How many runs have their best true target accuracy at their last validation, of how many runs."""
    runs = pools(cands, POOLINGS["run"][1])
    return sum(oracle(r) is last_epochs(r)[0] for r in runs), len(runs)


def selection_table(cands: Sequence[Candidate]) -> str:
    header = ["pools", *[v.title for v in VALIDATORS], "last epoch", "random", "oracle"]
    rows = []
    for name, (title, key) in POOLINGS.items():
        s = selection(cands, key)
        rows.append([f"{title}: {s['pools']} × {s['size']:.0f}",
                     *[_pct(s["picked"][v.tag]) + ("" if s["picked_n"][v.tag] == s["pools"]
                                                   else f" (n={s['picked_n'][v.tag]})") for v in VALIDATORS],
                     _pct(s["last"]), _pct(s["random"]), _pct(s["oracle"])])
    return markdown_table(header, rows)


def picks_table(cands: Sequence[Candidate]) -> str:
    header = ["pool", *[v.title for v in VALIDATORS], "oracle"]
    rows = []
    labelled = [(f"seed {pool[0].seed}", pool) for pool in pools(cands, POOLINGS["seed"][1])]
    if len(labelled) > 1:
        labelled.append(("all seeds", list(cands)))
    for label, pool in labelled:
        rows.append([label, *[_cand(pick(pool, v)) for v in VALIDATORS], _cand(oracle(pool))])
    return markdown_table(header, rows)


def raw_table(cands: Sequence[Candidate]) -> str:
    header = ["run", "epoch", "step", "target acc %", "source acc %", "entropy", "IM", "SND", "DEV", "A-dist."]
    rows = [[f"{STRATEGIES.get(c.strategy, (c.strategy,))[0]}, seed {c.seed}", str(c.epoch), str(c.step),
             _pct(c.get(TRUTH)), _pct(c.get("val/source_acc")), _num(c.get("val/target_entropy"), 4),
             _num(c.get("val/target_im"), 4), _num(c.get("val/target_snd"), 4), _num(c.get("val/target_dev"), 4),
             _num(c.get(DIAGNOSTIC), 2)]
            for c in cands]
    return markdown_table(header, rows, left=1)


def run_table(results: Sequence[RunResult], cands: Sequence[Candidate], seeds: Sequence[int]) -> str:
    header = ["strategy", *[f"seed {s}: last / best epoch" for s in seeds], "wall s (mean)"]
    rows = []
    for strategy in dict.fromkeys(r.cell.row for r in results):
        line = [STRATEGIES[strategy][0]]
        for s in seeds:
            mine = [c for c in cands if c.strategy == strategy and c.seed == s]
            line.append(f"{_pct(mine[-1].get(TRUTH))} / {_pct(oracle(mine).get(TRUTH))}" if mine else missing_value(
                [r for r in results if r.cell.row == strategy and r.cell.seed == s]))
        walls = [r.record["wall_s"] for r in results if r.cell.row == strategy and r.ok and r.record
                 and r.record.get("wall_s") is not None]
        line.append(f"{statistics.fmean(walls):.0f}" if walls else "–")
        rows.append(line)
    return markdown_table(header, rows)


def render(results: Sequence[RunResult], cands: Sequence[Candidate], *, command: str, out: Path, epochs: int,
           iters: int, seeds: Sequence[int], extra: Sequence[str], machine: Sequence[str], date: str,
           total_wall_s: float) -> str:
    """The whole ``validators.md`` (pure: everything it shows is passed in)."""
    n_runs = len({c.run for c in cands})
    n_last, _ = best_is_last(cands)
    n_seeds = len({c.seed for c in cands})
    lines = [
        "# Validators: model selection without target labels on MNIST → USPS",
        "",
        f"Produced by `{command}` (run from the repository root) on {date}. Do not edit by hand; rerun the command "
        f"(finished runs under `{display_path(out)}` are reused: a run directory with `done.json` is skipped).",
        "",
    ]
    if extra:
        lines += [f"**Modified runs** (`--extra {' '.join(extra)}`).", ""]
    lines += [
        "## What was run",
        "",
        f"- {n_runs} runs: {', '.join(STRATEGIES[s][0] for s in dict.fromkeys(r.cell.row for r in results))} "
        f"(configs `{display_path(CONFIGS)}/{{source_only,dann,mmd}}.yaml`: LeNet, bottleneck 500, SGD lr 0.01 "
        f"with inverse decay, batch 64), seeds {' '.join(map(str, seeds))} (`--seed_everything`; the source "
        "train/validation split is the same for every run).",
        f"- budget: {epochs} epochs × {iters} iterations = {epochs * iters:,} SGD steps per run, one validation per "
        "epoch, `data.val_fraction 0.1` (6,000 MNIST training images held out as the source validation split, which "
        "`val/source_acc` and DEV use). The configs' own budget is 10 × 500; the default of this script (6 × 200) "
        "is chosen to fit about 25 minutes of CPU on a 2-core machine, one run at a time.",
        f"- candidates: every validation of every run, {len(cands)} (run, epoch) checkpoints.",
        f"- total wall time of the runs: {total_wall_s / 60:.1f} min (sum of the runs' `wall_s`).",
        "- validators, computed by tlframe at each validation on the USPS **test** images (2,007) without their "
        "labels: " + "; ".join(f"{v.title} = `{v.tag}` ({'higher' if v.sign > 0 else 'lower'} is better; "
                                 f"reads {v.uses})" for v in VALIDATORS) + ". "
        "The ground truth is `val/target_acc`, the accuracy on the same USPS test images with their labels; it is "
        "never used to pick a candidate except by the oracle column.",
        "",
        "## Rank correlation with the true target accuracy (all candidates)",
        "",
        "Each validator is sign-adjusted so that higher = better; 1 means it orders the candidates exactly as their "
        "true USPS test accuracy does. Weighted τ (hyperbolic weights, as `scipy.stats.weightedtau`'s default) "
        "stresses agreement at the top of the rankings, which is what model selection needs. Implemented in "
        "`run_validators.py` (no scipy), checked on hand-computed cases in `tests/benchmarks/test_validators_benchmark.py`.",
        "",
        correlation_table(cands),
        "",
        "*ρ per seed*: Spearman within each seed's candidates, averaged over the seeds; *ρ within run*: Spearman "
        "over the epochs of each run, averaged over the runs (does the validator follow the accuracy along training?).",
        "",
        "## True target accuracy of the picked candidate",
        "",
        "USPS test accuracy (%) of the candidate each validator ranks best, averaged over the pools of each row: "
        "*per run* = choose the epoch of each run (pools of one run's validations; the fair comparison with "
        "*last epoch*); *per seed* = choose strategy, trade-off λ and epoch among the runs of one seed (the "
        "unsupervised hyper-parameter selection that DEV and SND are meant for; the main row); *whole pool* = one "
        "pick among all candidates. *Last epoch* = mean over the pool's runs of their last validation (no "
        "selection); *random* = mean accuracy of the pool's candidates (a uniformly random pick); *oracle* = the "
        "best candidate by true target accuracy (uses the target labels: an upper bound, not a valid result).",
        "",
        selection_table(cands),
        "",
        "Which candidate each validator picks (strategy, seed, epoch: its USPS test accuracy %):",
        "",
        picks_table(cands),
        "",
        "## Runs",
        "",
        "USPS test accuracy (%) of each run's last validation and its best validation (the oracle over epochs):",
        "",
        run_table(results, cands, seeds),
        "",
        "## Caveats",
        "",
        f"- Small pool, one task: {len(cands)} candidates from {n_runs} short runs of one architecture on one "
        "transfer task (MNIST → USPS). The correlations are "
        "computed on candidates that are not independent (consecutive epochs of a run are strongly related), so no "
        "confidence interval is given; a different task, longer training or a wider hyper-parameter range (where "
        f"some DA runs collapse) can change the ordering of the validators. The per-seed means are over {n_seeds} "
        f"pool{'s' if n_seeds != 1 else ''} only.",
        f"- The budget is short: in {n_last} of {n_runs} runs the last validation is also the run's best by true "
        "target accuracy" + (", so epoch selection has little to gain over the last epoch here, and a validator "
                             "that simply tracks training progress looks good within a run." if 2 * n_last >= n_runs
                             else "; longer runs would give the validators more late-epoch candidates to tell apart."),
        "- The validators are computed on the same USPS test images whose labels give the ground truth (without "
        "the labels); in deployment they would be computed on held-out unlabelled target data. SND and DEV use "
        "seeded samples of at most 2,000 rows (`model.validator_samples`).",
        "- DEV is an importance-weighted average: when the domain classifier separates source and target features "
        "almost perfectly (proxy A-distance near 2, last column of the appendix), a few source samples carry most "
        "of the weight and DEV can jump by an order of magnitude between consecutive epochs of a run.",
        "- Entropy and IM reward confident (and, for IM, class-balanced) target predictions; they can prefer a "
        "confidently wrong model, e.g. one that aligned the domains with the classes permuted.",
        "",
        "## Context",
        "",
        "Cited as context only; none of their numbers is compared with ours. Deep Embedded Validation (DEV: You, "
        "Wang, Long, Jordan, \"Towards accurate model selection in deep unsupervised domain adaptation\", ICML 2019) "
        "estimates the target risk by importance-weighting the source validation loss with a domain classifier's "
        "density ratios (plus a control variate). Soft Neighborhood Density (SND: Saito, Kim, Teterwak, Sclaroff, "
        "Darrell, Saenko, \"Tune it the right way: unsupervised validation of domain adaptation via soft neighborhood "
        "density\", ICCV 2021) scores how densely the target predictions cluster. Both papers select hyper-parameters "
        "and checkpoints of DA methods without target labels, on larger benchmarks than this one. TLlib (THUML's "
        "Transfer-Learning-Library, the reference for tlframe's DANN and DAN) publishes DA accuracy tables, "
        "MNIST → USPS among them, and DEV comes from the same group; that is the context of this study, which "
        "asks how much of such an accuracy survives when the model has to be chosen without target labels. "
        "Entropy and IM as validators: Musgrave, Belongie, Lim, \"Benchmarking validation methods for unsupervised "
        "domain adaptation\" (2022).",
        "",
        "## Setup",
        "",
        f"- runs, logs and `done.json` per run: `{display_path(out)}/runs/mnist2usps/<strategy>/seed<seed>/version_0/`; "
        "the per-epoch values are read from each run's TensorBoard events (`tlframe.runs.read_scalars`).",
        "- the ground truth and the validators are logged at the same step (the end of each epoch); a candidate is "
        "the model at that step.",
        "- ties in a validator's pick go to the first candidate in run order; a validator that is NaN for a "
        "candidate (e.g. DEV without a source validation split) never picks it.",
        *machine,
        *failures_section(results),
        "",
        "## Appendix: every candidate",
        "",
        "Accuracies in %, validators as logged (entropy and IM in nats, DEV an importance-weighted cross-entropy); "
        "A-dist. = `val/a_distance`, the proxy A-distance between source and target bottleneck features (2 = "
        "linearly separable), a diagnostic logged by `TransferInsights`, not a validator.",
        "",
        raw_table(cands),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=6, help="epochs per run = validations = candidates per run (default 6)")
    p.add_argument("--iters", type=int, default=200, help="training iterations per epoch (default 200)")
    p.add_argument("--out", help=f"output folder of the runs (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--data-root", help="TLFRAME_DATA_ROOT of the runs (default ../shared/data from the repository root)")
    p.add_argument("--extra", action="append", default=[], metavar='"--key=value ..."',
                   help="CLI overrides appended to every run (repeatable)")
    p.add_argument("--results", help=f"markdown file to write (default {DEFAULT_RESULTS.relative_to(REPO)})")
    p.add_argument("--workers", type=int, default=1, help="runs at a time, the CPU cores split between them (default 1)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.workers < 1 or args.epochs < 1 or args.iters < 1:
        raise SystemExit("error: --workers, --epochs and --iters must be >= 1")
    out, data_root, results_path, extra = resolve_io(args, DEFAULT_OUT, DEFAULT_RESULTS)
    log = lambda s: print(s, flush=True)  # noqa: E731
    cells = sweep_cells(args.strategies, args.seeds, out, data_root, args.epochs, args.iters, extra)
    log(f"run_validators: {len(cells)} runs into {out} (TLFRAME_DATA_ROOT={data_root})")
    results = run_cells(cells, log, workers=args.workers)
    cands = collect(results)
    for v in VALIDATORS:
        r = correlations(cands, v)
        log(f"run_validators: {v.title}: Spearman {_num(r['spearman'])}, Kendall tau-b {_num(r['kendall_b'])}, "
            f"weighted tau {_num(r['weighted_tau'])} (n={r['n']})")
    total = sum(r.record.get("wall_s", 0.0) for r in results if r.ok and r.record)
    text = render(results, cands, command=regen_command(Path(__file__), argv), out=out, epochs=args.epochs,
                  iters=args.iters, seeds=args.seeds, extra=extra, machine=machine_lines(), date=today(),
                  total_wall_s=total)
    return write_results(results_path, text, results, "run_validators")


if __name__ == "__main__":
    raise SystemExit(main())
