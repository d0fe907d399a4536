"""Regenerate ``benchmarks/results/domain_generalization.md``: DomainBed's RotatedMNIST, leave one domain out.

Every algorithm (``configs/domainbed/rotated_mnist/<algorithm>.yaml``) x held-out domain (0, 15, ..., 75 degrees)
x seed is one ``tlframe fit`` (a :class:`~benchmarks.digits.common.Cell`: resumable, a finished run is not run
again, and its numbers are kept in the committed run ledger ``benchmarks/results/ledger/rotated_mnist/...``, so a
fresh checkout tables them without rerunning). Seed ``s`` is DomainBed's trial seed: it sets
``seed_everything`` (initialisation, batches) and each domain's ``trial_seed`` (its in/out split); the shuffle of
the 70,000 MNIST images (DomainBed's ``--seed``) stays 0.

Model selection as DomainBed (:mod:`tlframe.model_selection`, recorded per run in ``done.json``): the table
reports the held-out domain's ``in``-split accuracy at the evaluation step with the best mean accuracy over the
training domains' ``out`` splits (training-domain validation); the test-domain oracle (the last step) is a second,
labelled table. DomainBed also searches 20 random hyper-parameter settings per algorithm; these runs use its
default hyper-parameters only (one setting), so there is no hyper-parameter selection.

    python benchmarks/domainbed/run_rotated_mnist.py --workers 2                      # DomainBed's budget
    python benchmarks/domainbed/run_rotated_mnist.py --algorithms erm irm --test-domains 0 5 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.common import (  # noqa: E402
    REPO, Cell, RunResult, collect_cells, display_path, failures_section, format_cell, format_wall, ledger_for,
    machine_lines, markdown_table, regen_command, resolve_io, run_cells, today, write_results,
)
from tlframe.data.domainbed import ROTATED_MNIST_ANGLES  # noqa: E402

ALGORITHMS = {"erm": "ERM", "coral": "CORAL", "mmd": "MMD", "dann": "DANN", "cdann": "CDANN", "irm": "IRM",
              "vrex": "VREx", "groupdro": "GroupDRO", "mixstyle": "MixStyle"}
#: run by default: the issue's five first, then the rest of DomainBed's MNIST table (MixStyle: only on request)
DEFAULT_ALGORITHMS = ["erm", "coral", "dann", "irm", "vrex", "mmd", "cdann", "groupdro"]
#: DomainBed's published RotatedMNIST table, training-domain validation (domainbed/results/2020_10_06_7df6f06/
#: results.tex: 20 random hyper-parameter settings x 3 trials, 5,000 steps): per held-out domain, then Avg
REFERENCE = {
    "erm": (95.9, 98.9, 98.8, 98.9, 98.9, 96.4, 98.0), "irm": (95.5, 98.8, 98.7, 98.6, 98.7, 95.9, 97.7),
    "groupdro": (95.6, 98.9, 98.9, 99.0, 98.9, 96.5, 98.0), "coral": (95.8, 98.8, 98.9, 99.0, 98.9, 96.4, 98.0),
    "mmd": (95.6, 98.9, 99.0, 99.0, 98.9, 96.0, 97.9), "dann": (95.0, 98.9, 99.0, 99.0, 98.9, 96.3, 97.8),
    "cdann": (95.7, 98.8, 98.9, 98.9, 98.9, 96.1, 97.9), "vrex": (95.9, 99.0, 98.9, 98.9, 98.7, 96.2, 97.9),
}
EVAL_EVERY = 100  # the configs' iters_per_epoch: one evaluation per 100 steps (DomainBed's checkpoint_freq)
DOMAINBED_STEPS = 5000
DEFAULT_OUT = REPO / "benchmarks" / "runs" / "domainbed"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "domain_generalization.md"
SELECTIONS = {"training_domain_validation": "training-domain validation",
              "test_domain_oracle": "test-domain validation (oracle; reads test-domain labels: not a valid DG result)"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=DEFAULT_ALGORITHMS)
    p.add_argument("--test-domains", nargs="+", type=int, choices=range(len(ROTATED_MNIST_ANGLES)),
                   default=list(range(len(ROTATED_MNIST_ANGLES))), help="held-out domain indices (0 = 0 degrees)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=DOMAINBED_STEPS,
                   help=f"training steps per run, a multiple of {EVAL_EVERY} (default DomainBed's {DOMAINBED_STEPS})")
    p.add_argument("--out", help="output folder of the runs (default benchmarks/runs/domainbed)")
    p.add_argument("--data-root", help="TLFRAME_DATA_ROOT (default ../shared/data)")
    p.add_argument("--extra", action="append", default=[], help="CLI overrides appended to every run")
    p.add_argument("--results", help="markdown file to write (default benchmarks/results/domain_generalization.md)")
    p.add_argument("--workers", type=int, default=1, help="runs at a time")
    p.add_argument("--collect-only", action="store_true", help="start no run: table the finished and recorded ones")
    args = p.parse_args(argv)
    if args.steps < EVAL_EVERY or args.steps % EVAL_EVERY:
        p.error(f"--steps {args.steps} must be a positive multiple of {EVAL_EVERY} (one evaluation per {EVAL_EVERY} steps)")
    return args


def domains_override(trial_seed: int) -> str:
    """``--data.domains=<JSON>``: DomainBed's six RotatedMNIST domains with this trial seed (their in/out split)."""
    domains = [{"class_path": "tlframe.data.RotatedMNISTDomain",
                "init_args": {"angle": a, "seed": 0, "trial_seed": trial_seed}} for a in ROTATED_MNIST_ANGLES]
    return "--data.domains=" + json.dumps(domains, separators=(",", ":"))


def build_cells(algorithms: Sequence[str], test_domains: Sequence[int], seeds: Sequence[int], steps: int, out: Path,
                data_root: Path, extra: Sequence[str]) -> list[Cell]:
    """One cell per (algorithm, held-out domain, seed); the ledger only for the default output folder."""
    return [Cell(row=a, col=str(d), seed=s, out=out, name=f"rotated_mnist/{a}/test{d}/steps{steps}/seed{s}",
                 args=["-c", str(REPO / "configs" / "domainbed" / "rotated_mnist" / f"{a}.yaml"),
                       f"--data.test_domain={d}", f"--seed_everything={s}", domains_override(s),
                       f"--trainer.max_epochs={steps // EVAL_EVERY}", *extra],
                 env={"TLFRAME_DATA_ROOT": str(data_root)}, ledger=ledger_for(out, DEFAULT_OUT, extra))
            for a in algorithms for d in test_domains for s in seeds]


def selected(result: RunResult, method: str) -> Optional[float]:
    chosen = ((result.record or {}).get("selection") or {}).get(method) if result.ok else None
    return None if chosen is None else 100 * float(chosen["test_acc"])


def table(results: Sequence[RunResult], algorithms: Sequence[str], test_domains: Sequence[int], method: str,
          refs: bool) -> str:
    """Algorithms as rows, held-out domains as columns (mean ± std over seeds, n), Avg (the mean over the domains of
    the per-domain means, DomainBed's), and with ``refs`` DomainBed's published Avg and our Avg minus it."""
    header = ["algorithm", *[f"{ROTATED_MNIST_ANGLES[d]}°" for d in test_domains], "Avg"]
    if refs:
        header += ["DomainBed Avg", "Δ Avg"]
    body = []
    for a in algorithms:
        means, line = [], [ALGORITHMS[a]]
        for d in test_domains:
            mine = [r for r in results if r.cell.row == a and r.cell.col == str(d)]
            values = [v for r in sorted(mine, key=lambda r: r.cell.seed) if (v := selected(r, method)) is not None]
            failed = sum(r.failed for r in mine)
            line.append(format_cell([v / 100 for v in values], failed))
            if values:
                means.append(sum(values) / len(values))
        complete = len(means) == len(test_domains) == len(ROTATED_MNIST_ANGLES)
        avg = sum(means) / len(means) if complete else None
        line.append(f"{avg:.1f}" if avg is not None else "–")
        if refs:
            ref = REFERENCE.get(a)
            line += [f"{ref[-1]:.1f}" if ref else "–", f"{avg - ref[-1]:+.1f}" if ref and avg is not None else "–"]
        body.append(line)
    return markdown_table(header, body)


def reference_table(algorithms: Sequence[str]) -> str:
    header = ["algorithm", *[f"{a}°" for a in ROTATED_MNIST_ANGLES], "Avg"]
    return markdown_table(header, [[ALGORITHMS[a], *[f"{v:.1f}" for v in REFERENCE[a]]] for a in algorithms
                                   if a in REFERENCE])


def coverage(results: Sequence[RunResult], args: argparse.Namespace) -> str:
    """What part of the full grid (these algorithms x every held-out domain x 3 seeds at DomainBed's budget) the
    table holds, so that a partial table says what remains."""
    done = sum(r.ok for r in results)
    full = len(args.algorithms) * len(ROTATED_MNIST_ANGLES) * 3
    if done == full and args.steps == DOMAINBED_STEPS:
        return f"Complete: {done} runs ({len(args.algorithms)} algorithms x 6 held-out domains x 3 seeds)."
    return (f"**Partial: {done} finished run(s)** of the {full} of the full grid ({len(args.algorithms)} algorithms x "
            f"6 held-out domains x 3 seeds at {DOMAINBED_STEPS:,} steps); held-out domains here: "
            f"{', '.join(f'{ROTATED_MNIST_ANGLES[d]}°' for d in args.test_domains)}; seeds: "
            f"{', '.join(map(str, args.seeds))}. What remains: the runs not in the table (rerun the command with "
            "the missing `--test-domains` / `--seeds`, and without `--steps` for DomainBed's budget).")


def render(results: Sequence[RunResult], args: argparse.Namespace, command: str, out: Path) -> str:
    partial = args.steps != DOMAINBED_STEPS
    lines = [
        "# Domain generalisation: RotatedMNIST (DomainBed), leave one domain out",
        "",
        f"Generated {today()} by `{command}`. Do not edit by hand; rerun the command (finished runs are reused, "
        "and recorded runs come from the committed ledger `benchmarks/results/ledger/rotated_mnist/`).",
        "",
        f"**Budget: {args.steps:,} steps per run**" + (f" (DomainBed: {DOMAINBED_STEPS:,}): not comparable with "
                                                      "DomainBed's numbers" if partial else ", DomainBed's") + ".",
        "",
        coverage(results, args),
        "",
        "Held-out domain accuracy (%, its `in` split, as DomainBed reports) at the checkpoint chosen by "
        "**training-domain validation** (the evaluation step, one per 100 steps, with the best mean accuracy over "
        "the five training domains' `out` splits), mean ± sample std over seeds (n = finished runs). Avg = the mean "
        "over the six held-out domains of the per-domain means (\"–\" until every domain has a run). No test-domain "
        "label is used for training or selection.",
        "",
        table(results, args.algorithms, args.test_domains, "training_domain_validation", refs=True),
        "",
        "DomainBed's published table (training-domain validation, "
        "`domainbed/results/2020_10_06_7df6f06/results.tex` of facebookresearch/DomainBed; Gulrajani & "
        "Lopez-Paz, ICLR 2021): the best of 20 random hyper-parameter settings per algorithm (chosen on the "
        "training domains' validation accuracy), 3 trials, ± = standard error:",
        "",
        reference_table(args.algorithms),
        "",
        "## Test-domain oracle (not a valid DG result)",
        "",
        "The same runs, the **last** checkpoint (DomainBed's oracle uses test-domain labels only to choose between "
        "hyper-parameter settings, which these runs do not search; with one setting it is the last step).",
        "",
        table(results, args.algorithms, args.test_domains, "test_domain_oracle", refs=False),
        "",
        "## Wall time per run",
        "",
        markdown_table(["algorithm", "mean wall time"], [
            [ALGORITHMS[a], format_wall([float(r.record["wall_s"]) for r in results
                                         if r.cell.row == a and r.ok and r.record and "wall_s" in r.record])]
            for a in args.algorithms]),
        "",
        "## Setup",
        "",
        "- data: DomainBed's RotatedMNIST built in code from `../shared/data` MNIST (`tlframe.data.RotatedMNISTDomain`:"
        " the 70,000 images shuffled with seed 0, domain i = images[i::6] rotated by its angle, bilinear; each "
        "domain split 80/20 into `in`/`out` by `seed_hash(trial_seed, i)`); seed s = trial seed s (the split, the "
        "initialisation and the batches).",
        "- network: DomainBed's `MNIST_CNN` (`domainbed_mnist_cnn`: four 3x3 convolutions with ReLU and GroupNorm, "
        "global average pooling, 128 features) and a linear classifier; Adam lr 1e-3, no weight decay, 64 images "
        "per training domain per step (320), DomainBed's default hyper-parameters of each algorithm "
        "(`configs/domainbed/rotated_mnist/<algorithm>.yaml`).",
        f"- runs under `{display_path(out)}/runs/rotated_mnist/<algorithm>/test<domain>/steps<steps>/seed<s>/`",
        "- differences from DomainBed: one hyper-parameter setting (its defaults) instead of a random search of 20; "
        "the RotatedMNIST shuffle seed is 0 for every run (DomainBed's sweep derives `--seed` from the run's "
        "arguments); one forward pass of the concatenated domains' batch (the same with GroupNorm).",
        *machine_lines(),
        *failures_section(results),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out, data_root, results_path, extra = resolve_io(args, DEFAULT_OUT, DEFAULT_RESULTS)
    cells = build_cells(args.algorithms, args.test_domains, args.seeds, args.steps, out, data_root, extra)
    print(f"run_rotated_mnist: {len(cells)} runs into {out}", flush=True)
    if args.collect_only:
        results = collect_cells(cells)
    else:
        results = run_cells(cells, log=lambda s: print(s, flush=True), workers=args.workers)
    text = render(results, args, regen_command(Path(__file__), argv), out)
    return write_results(results_path, text, results, "run_rotated_mnist")


if __name__ == "__main__":
    raise SystemExit(main())
