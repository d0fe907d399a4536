"""``tlframe report SWEEP_DIR``: the final metrics of a sweep's runs as a table, grouped by the grid axes.

Each row is one grid point (every axis but the seed); each metric column is ``mean ± std`` over the
point's finished seeds, where std is the **sample** standard deviation (ddof=1), or with ``--stderr``
the standard error ``std / sqrt(n)``. ``n`` counts finished runs; failed, unfinished and never-run
runs are counted in the ``runs`` column and listed below the table, never dropped silently.

Metrics are read from each run's ``done.json`` (the statistics of every TensorBoard scalar, see
:mod:`tlframe.runs`). A metric is a tag (``val/source_acc``: its **last** logged value) or
``max:<tag>`` / ``min:<tag>`` (the max / min over the logged values). Default: the last value of
every ``val/*`` tag plus ``max:val/target_acc``, the *oracle* column: it selects the epoch with
the target test labels, so it is an upper bound on model selection, not a valid DA result.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tlframe.atomic import atomic_path, atomic_write_text
from tlframe.runs import DONE, FAILED

__all__ = ["mean_std", "format_cell", "markdown_table", "metric_value", "collect", "aggregate", "render_markdown",
           "render_csv", "plot", "main", "ORACLE", "STD_NOTE", "STDERR_NOTE", "ORACLE_NOTE"]

EXIT_OK, EXIT_BAD_INPUT = 0, 2
ORACLE = "max:val/target_acc"
STD_NOTE = "± is the sample standard deviation over seeds (ddof=1)"
STDERR_NOTE = "± is the standard error of the mean over seeds (sample std with ddof=1, divided by sqrt(n))"
ORACLE_NOTE = ("oracle = max over epochs of val/target_acc: it picks the epoch with the target test labels, "
               "so it is an upper bound on model selection, not a valid unsupervised/few-label result")
STATS = ("last", "max", "min")


# --------------------------------------------------------------------------- pure aggregation
def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof=1; ``None`` for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def mean_spread(values: Sequence[float], stderr: bool = False) -> tuple[float, Optional[float]]:
    """Mean and its ± (sample std, or standard error with ``stderr``)."""
    mean, std = mean_std(values)
    if std is not None and stderr:
        std /= math.sqrt(len(values))
    return mean, std


def format_cell(values: Sequence[float], n_failed: int = 0, scale: float = 100.0, decimals: int = 1) -> str:
    """``"mean ± std (n=k)"`` of ``values * scale`` (accuracies in [0, 1] -> percent).

    A single value is ``"m (n=1)"``; failed runs are counted (``"...; 1 failed"``), never dropped
    silently; no values at all is ``"failed (k runs)"`` or ``"not run"``.
    """
    if not values:
        return f"failed ({n_failed} run{'s' if n_failed != 1 else ''})" if n_failed else "not run"
    text = format_stat([v * scale for v in values], decimals=decimals)
    return f"{text} (n={len(values)}{f'; {n_failed} failed' if n_failed else ''})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A GitHub markdown table (the first ``left`` columns left-aligned, the others right-aligned)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(header), "|" + "|".join([":---"] * left + ["---:"] * (len(header) - left)) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def parse_metric(spec: str) -> tuple[str, str]:
    """``"val/x"`` -> ``("last", "val/x")``; ``"max:val/x"`` -> ``("max", "val/x")``."""
    stat, sep, tag = spec.partition(":")
    if sep and stat in STATS and tag:
        return stat, tag
    return "last", spec


#: ``select:<method>``: the test accuracy at the checkpoint a DomainBed selection method picks (done.json ``selection``)
SELECT = "select:"
SELECTION_TITLES = {"training_domain_validation": "training-domain validation",
                    "test_domain_oracle": "test-domain validation (oracle)"}


def metric_title(spec: str) -> str:
    if spec == ORACLE:
        return "oracle: max val/target_acc"
    if spec.startswith(SELECT):
        method = spec[len(SELECT):]
        return f"target acc, {SELECTION_TITLES.get(method, method)}"
    stat, tag = parse_metric(spec)
    return tag if stat == "last" else f"{stat} {tag}"


def metric_value(record: dict[str, Any], spec: str) -> Optional[float]:
    """The value of ``spec`` in a ``done.json`` record (``None`` when the run did not log that tag)."""
    if spec.startswith(SELECT):
        chosen = (record.get("selection") or {}).get(spec[len(SELECT):])
        return None if chosen is None else float(chosen["test_acc"])
    stat, tag = parse_metric(spec)
    entry = (record.get("scalars") or {}).get(tag)
    return None if entry is None else float(entry[stat])


# --------------------------------------------------------------------------- reading a sweep folder
@dataclass
class RunEntry:
    hash: str
    point: dict[str, str]
    seed: int
    status: str                        # done | failed | unfinished | not run
    record: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    weights: str = ""                  # the backbone and its weight source, from the run's run_info.json
    baseline: str = ""                 # a baseline sibling: its kind (source_only, target_only)
    baselines: dict[str, str] = field(default_factory=dict)  # kind -> hash of this run's baseline sibling


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def weights_of_run(run_dir: Path) -> str:
    """``"resnet50: timm resnet50.a1_in1k"`` (or a file and its hash, or random init) from ``run_info.json``."""
    from tlframe.backbones import describe_weight_source

    backbone = (_read_json(run_dir / "run_info.json") or {}).get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("weights"), dict):
        return ""
    return f"{backbone.get('name')}: {describe_weight_source(backbone['weights'])}"


def row_weights(row: "Row") -> str:
    return "; ".join(sorted({e.weights for e in row.entries if e.weights}))


def collect(sweep_dir: Path) -> tuple[list[str], list[RunEntry]]:
    """The axes and every run of a sweep folder, from ``sweep.json`` (the planned runs) or else from the
    ``runs/*/args.json`` files; each run's status from its ``done.json`` / ``failed.json``."""
    sweep_dir = Path(sweep_dir)
    manifest = _read_json(sweep_dir / "sweep.json")
    if manifest is not None:
        planned = manifest["runs"]
        axes = list(manifest["axes"])
    else:
        found = [p for p in sorted(sweep_dir.glob("runs/*/args.json"))
                 if ".superseded-" not in p.parent.name]  # a changed command's finished run: kept, not tabled
        planned = [a for a in (_read_json(p) for p in found) if a]
        axes = list(dict.fromkeys(k for a in planned for k in a.get("point", {})))
    if not planned:
        raise FileNotFoundError(f"{sweep_dir} holds no sweep (no sweep.json and no runs/*/args.json): "
                                "pass the folder given to (or printed by) tlframe sweep")
    entries = []
    for p in planned:
        run_dir = sweep_dir / "runs" / p["hash"]
        done, failed = _read_json(run_dir / DONE), _read_json(run_dir / FAILED)
        if done is not None:
            entry = RunEntry(p["hash"], p["point"], p["seed"], "done", done)
        elif failed is not None and not failed.get("interrupted"):  # an interrupted run resumes: unfinished
            entry = RunEntry(p["hash"], p["point"], p["seed"], "failed", failed, failed.get("error", ""))
        else:
            entry = RunEntry(p["hash"], p["point"], p["seed"], "unfinished" if run_dir.exists() else "not run")
        entry.weights = weights_of_run(run_dir)
        entry.baseline, entry.baselines = p.get("baseline", ""), dict(p.get("baselines") or {})
        entries.append(entry)
    return axes, entries


def logged_tags(entries: Sequence[RunEntry]) -> set[str]:
    """Every scalar tag that a finished run logged."""
    return {t for e in entries if e.status == "done" for t in e.record.get("scalars", {})}


def default_metrics(entries: Sequence[RunEntry]) -> list[str]:
    """The last value of every ``val/*`` tag the finished runs logged, plus the oracle when ``val/target_acc`` is there
    (the ``test/*`` tags for sweeps of ``tlframe test`` runs, which log no ``val/*``)."""
    logged = logged_tags(entries)
    tags = sorted(t for t in logged if t.startswith("val/")) or sorted(t for t in logged if t.startswith("test/"))
    return tags + ([ORACLE] if "val/target_acc" in tags else [])


@dataclass
class Row:
    point: dict[str, str]
    values: dict[str, list[float]]     # metric -> values of the finished runs (seed order)
    counts: dict[str, int]             # status -> number of runs
    entries: list[RunEntry]

    @property
    def n(self) -> int:
        return self.counts.get("done", 0)


def aggregate(axes: Sequence[str], entries: Sequence[RunEntry], metrics: Sequence[str]) -> list[Row]:
    """One :class:`Row` per grid point, in the order the points first appear."""
    groups: dict[tuple, list[RunEntry]] = {}
    for e in entries:
        groups.setdefault(tuple(e.point.get(a, "") for a in axes), []).append(e)
    rows = []
    for key, group in groups.items():
        group = sorted(group, key=lambda e: e.seed)
        values = {m: [v for e in group if e.status == "done" and (v := metric_value(e.record, m)) is not None]
                  for m in metrics}
        counts: dict[str, int] = {}
        for e in group:
            counts[e.status] = counts.get(e.status, 0) + 1
        rows.append(Row(dict(zip(axes, key)), values, counts, group))
    return rows


def rank_rows(rows: list[Row], metric: str, ascending: bool = False) -> list[Row]:
    """Rows sorted by the mean of ``metric`` (best first); rows without a value go last, in their order."""
    scored = [r for r in rows if r.values.get(metric)]
    rest = [r for r in rows if not r.values.get(metric)]
    scored.sort(key=lambda r: statistics.fmean(r.values[metric]), reverse=not ascending)
    return scored + rest


def format_stat(values: Sequence[float], stderr: bool = False, decimals: int = 4) -> str:
    """``"mean ± spread"``, a single value alone, ``"–"`` without values."""
    if not values:
        return "–"
    mean, spread = mean_spread(values, stderr)
    return f"{mean:.{decimals}f}" + (f" ± {spread:.{decimals}f}" if spread is not None else "")


def runs_cell(row: Row) -> str:
    """``"3/3"`` or ``"1/3; 1 failed, 1 not run"``: finished of planned, and what happened to the others."""
    total = sum(row.counts.values())
    others = [f"{row.counts[s]} {s}" for s in ("failed", "unfinished", "not run") if row.counts.get(s)]
    return f"{row.n}/{total}" + (f"; {', '.join(others)}" if others else "")


# --------------------------------------------------------------------------- negative transfer
BASELINE_TITLES = {"source_only": "vs source-only", "target_only": "vs target-only"}
BASELINE_NOTE = ("vs source-only / vs target-only: the mean over seeds of (this run - its baseline run with the same "
                 "seed) in `{metric}`, ± the sample std of those differences; **hurt** when the mean is below 0 "
                 "(transfer did worse than the baseline: negative transfer when the baseline is target-only), "
                 "\"beyond spread\" when the mean difference is larger than the seed spread (the larger sample std "
                 "of the two runs' values over seeds), \"within spread\" otherwise")


@dataclass
class Comparison:
    """A row against one of its baselines, seed by seed."""

    kind: str
    diffs: list[float]                 # this run - baseline run, per seed where both finished
    values: list[float]                # this row's values of those seeds
    baseline_values: list[float]       # the baseline's values of those seeds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.diffs) if len(self.diffs) > 1 else None

    @property
    def hurt(self) -> bool:
        return self.mean < 0

    @property
    def spread(self) -> Optional[float]:
        """The seed spread: the larger sample std of the two sides (``None`` with one seed)."""
        if len(self.diffs) < 2:
            return None
        return max(statistics.stdev(self.values), statistics.stdev(self.baseline_values))

    @property
    def beyond_spread(self) -> Optional[bool]:
        return None if self.spread is None else abs(self.mean) > self.spread

    def cell(self, decimals: int) -> str:
        text = f"{self.mean:+.{decimals}f}" + (f" ± {self.std:.{decimals}f}" if self.std is not None else "")
        text += f" (n={len(self.diffs)})" + (" **hurt**" if self.hurt else "")
        if self.beyond_spread is not None:
            text += ", beyond spread" if self.beyond_spread else ", within spread"
        return text


def baseline_metric(entries: Sequence[RunEntry]) -> Optional[str]:
    """The metric transfer is judged on: ``val/target_acc``, else ``test/target_acc`` (what the runs logged)."""
    logged = logged_tags(entries)
    return next((m for m in ("val/target_acc", "test/target_acc") if m in logged), None)


def compare_to_baselines(rows: Sequence[Row], entries: Sequence[RunEntry],
                         metric: str) -> list[dict[str, Optional[Comparison]]]:
    """Per row, ``kind -> Comparison`` for each baseline its runs declare (``None`` while no seed has both runs
    finished; empty for baseline rows)."""
    by_hash = {e.hash: e for e in entries}
    out = []
    for row in rows:
        found: dict[str, Optional[Comparison]] = {}
        for kind in dict.fromkeys(k for e in row.entries for k in e.baselines):
            comp = Comparison(kind, [], [], [])
            for e in row.entries:
                sibling = by_hash.get(e.baselines.get(kind, ""))
                if e.status != "done" or sibling is None or sibling.status != "done":
                    continue
                a, b = metric_value(e.record, metric), metric_value(sibling.record, metric)
                if a is not None and b is not None:
                    comp.diffs.append(a - b)
                    comp.values.append(a)
                    comp.baseline_values.append(b)
            found[kind] = comp if comp.diffs else None  # declared, but no seed where both runs finished
        out.append(found)
    return out


def baseline_kinds(comparisons: Sequence[dict[str, Optional[Comparison]]]) -> list[str]:
    return [k for k in BASELINE_TITLES if any(k in c for c in comparisons)]


def negative_transfer_lines(rows: Sequence[Row], comparisons: Sequence[dict[str, Optional[Comparison]]],
                            axes: Sequence[str], metric: str, decimals: int) -> list[str]:
    """``## Transfer against its baselines``: every row where transfer hurt, named, with the difference."""
    lines = [f"## Transfer against its baselines (`{metric}`)", ""]
    hurt = []
    for row, comps in zip(rows, comparisons):
        for kind, comp in comps.items():
            if comp is not None and comp.hurt:
                point = " ".join(f"{a}={row.point.get(a, '')}" for a in axes if row.point.get(a, "") != "")
                what = "negative transfer" if kind == "target_only" else "worse than without adaptation"
                spread = ("" if comp.beyond_spread is None else
                          f"; {'beyond' if comp.beyond_spread else 'within'} the seed spread ({comp.spread:.{decimals}f})")
                hurt.append(f"- **{what}**: {point or 'the run'}: {comp.mean:+.{decimals}f} against "
                            f"{kind.replace('_', '-')} (hurt in {sum(d < 0 for d in comp.diffs)}/{len(comp.diffs)} "
                            f"seeds{spread})")
    lines += hurt or ["No run did worse than its baselines."]
    return lines + [""]


def render_markdown(rows: Sequence[Row], axes: Sequence[str], metrics: Sequence[str], stderr: bool = False,
                    decimals: int = 4, title: str = "", rank_by: Optional[str] = None,
                    comparisons: Optional[Sequence[dict[str, Optional[Comparison]]]] = None,
                    compared_on: Optional[str] = None) -> str:
    """The report: notes, the table (axes, metrics, the comparisons with baselines, runs), the rows where transfer
    hurt, then the runs that did not finish."""
    weights = any(row_weights(r) for r in rows)  # runs that recorded their weight source (run_info.json)
    kinds = baseline_kinds(comparisons or [])
    header = ((["rank"] if rank_by else []) + list(axes) + (["backbone weights"] if weights else [])
              + [metric_title(m) for m in metrics] + [BASELINE_TITLES[k] for k in kinds] + ["n", "runs"])
    body = []
    for i, row in enumerate(rows, 1):
        comps = comparisons[i - 1] if comparisons else {}
        body.append(([str(i)] if rank_by else []) + [row.point.get(a, "") for a in axes]
                    + ([row_weights(row)] if weights else [])
                    + [format_stat(row.values[m], stderr, decimals) for m in metrics]
                    + [("" if k not in comps else comps[k].cell(decimals) if comps[k] else "baseline not finished")
                       for k in kinds] + [str(row.n), runs_cell(row)])
    lines = [f"# {title}" if title else "# Sweep report", "",
             f"Mean over seeds, {STDERR_NOTE if stderr else STD_NOTE}; n = finished runs (seeds) of the point. "
             "Metrics are the last logged value unless named `max`/`min` (over the logged values)."]
    if rank_by:
        lines.append(f"Ranked by the mean of `{rank_by}`.")
    if ORACLE in metrics:
        lines.append(f"Not a valid result: the {ORACLE_NOTE}.")
    if kinds:
        lines.append(BASELINE_NOTE.format(metric=compared_on) + ".")
    lines += ["", markdown_table(header, body, left=len(axes) + bool(rank_by) + weights), ""]
    if kinds:
        lines += negative_transfer_lines(rows, comparisons, axes, compared_on, decimals)
    bad = [e for r in rows for e in r.entries if e.status != "done"]
    if bad:
        lines += ["## Runs without a result", ""]
        for e in bad:
            point = " ".join(f"{k}={v}" for k, v in e.point.items() if v != "")
            lines.append(f"- `{e.hash}` ({point} seed={e.seed}): {e.status}" + (f": {e.error}" if e.error else ""))
        lines.append("")
    return "\n".join(lines)


def domain_table(entries: Sequence[RunEntry], axes: Sequence[str], domain_axis: str, metric: str,
                 decimals: int = 1, scale: float = 100.0) -> str:
    """DomainBed's table of a leave-one-domain-out sweep: one row per point of the other axes, one column per held-out
    domain (``domain_axis``: mean ± sample std over seeds, n), then **Avg**: the mean over the domains of the
    per-domain means (DomainBed's "Avg"), "–" until every domain has a finished run; and the spread of that average
    over seeds (the sample std of each seed's mean over the domains, over the seeds finished in every domain)."""
    others = [a for a in axes if a != domain_axis]
    domains = list(dict.fromkeys(e.point.get(domain_axis, "") for e in entries))
    try:
        domains.sort(key=lambda d: float(d))
    except ValueError:
        pass
    groups: dict[tuple, list[RunEntry]] = {}
    for e in entries:
        groups.setdefault(tuple(e.point.get(a, "") for a in others), []).append(e)
    header = [*others, *[f"{domain_axis}={d}" for d in domains], "Avg", "Avg ± over seeds"]
    body = []
    for key, group in groups.items():
        per_domain: dict[str, dict[int, float]] = {d: {} for d in domains}
        failed = {d: 0 for d in domains}
        for e in group:
            v = metric_value(e.record, metric) if e.status == "done" else None
            if v is not None:
                per_domain[e.point.get(domain_axis, "")][e.seed] = v
            failed[e.point.get(domain_axis, "")] += e.status == "failed"
        cells = [format_cell([per_domain[d][s] for s in sorted(per_domain[d])], failed[d], scale=scale,
                             decimals=decimals) for d in domains]
        means = [statistics.fmean(per_domain[d].values()) for d in domains if per_domain[d]]
        avg = f"{scale * statistics.fmean(means):.{decimals}f}" if len(means) == len(domains) and means else "–"
        seeds = set.intersection(*(set(per_domain[d]) for d in domains)) if domains else set()
        per_seed = [statistics.fmean(per_domain[d][s] for d in domains) for s in sorted(seeds)]
        body.append([*key, *cells, avg, format_cell(per_seed, scale=scale, decimals=decimals) if per_seed else "–"])
    return markdown_table(header, body, left=len(others))


def render_csv(rows: Sequence[Row], axes: Sequence[str], metrics: Sequence[str], stderr: bool = False,
               comparisons: Optional[Sequence[dict[str, Optional[Comparison]]]] = None) -> str:
    """One line per grid point: axes, ``<metric> mean``, ``<metric> std`` (or ``stderr``), the comparisons with the
    baselines (``vs_<kind> mean/std/n/hurt/beyond_spread``), n and the other counts."""
    spread = "stderr" if stderr else "std"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    weights = any(row_weights(r) for r in rows)
    kinds = baseline_kinds(comparisons or [])
    writer.writerow([*axes, *(["backbone_weights"] if weights else []), *[f"{m} {s}" for m in metrics
                                                                          for s in ("mean", spread)],
                     *[f"vs_{k} {s}" for k in kinds for s in ("mean", "std", "n", "hurt", "beyond_spread")],
                     "n", "failed", "unfinished", "not_run"])
    for i, row in enumerate(rows):
        cells: list[Any] = [row.point.get(a, "") for a in axes] + ([row_weights(row)] if weights else [])
        for m in metrics:
            if row.values[m]:
                mean, sp = mean_spread(row.values[m], stderr)
                cells += [repr(mean), "" if sp is None else repr(sp)]
            else:
                cells += ["", ""]
        for k in kinds:
            comp = (comparisons[i] if comparisons else {}).get(k)
            cells += ([repr(comp.mean), "" if comp.std is None else repr(comp.std), len(comp.diffs), comp.hurt,
                       "" if comp.beyond_spread is None else comp.beyond_spread] if comp else ["", "", "", "", ""])
        cells += [row.n, row.counts.get("failed", 0), row.counts.get("unfinished", 0), row.counts.get("not run", 0)]
        writer.writerow(cells)
    return buf.getvalue()


def plot(rows: Sequence[Row], axes: Sequence[str], x_axis: str, metric: str, path: Path, stderr: bool = False,
         title: str = "") -> None:
    """A PNG of ``metric`` (mean, error bars = the table's ±) against ``x_axis``, one line per value of the other axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [a for a in axes if a != x_axis]
    lines: dict[str, list[tuple[str, float, float]]] = {}
    for row in rows:
        if not row.values[metric]:
            continue
        mean, spread = mean_spread(row.values[metric], stderr)
        label = ", ".join(f"{a}={row.point[a]}" for a in others) or metric
        lines.setdefault(label, []).append((row.point[x_axis], mean, spread or 0.0))
    xs = list(dict.fromkeys(row.point[x_axis] for row in rows))  # the axis's order in the sweep
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, pts in lines.items():
        pts.sort(key=lambda p: xs.index(p[0]))
        ax.errorbar([xs.index(p[0]) for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=label)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel(x_axis)
    ax.set_ylabel(f"{metric_title(metric)} ({'± stderr' if stderr else '± std'})")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- command line
def render_domain_tables(entries: Sequence[RunEntry], axes: Sequence[str], domain_axis: str) -> str:
    """The ``--domains`` section: :func:`domain_table` of the target accuracy under each selection method the runs
    recorded (training-domain validation first; the oracle labelled as such), else of the last ``val/target_acc``."""
    methods = [m for m in SELECTION_TITLES
               if any((e.record.get("selection") or {}).get(m) for e in entries if e.status == "done")]
    specs = [SELECT + m for m in methods] or ["val/target_acc"]
    lines = [f"## By held-out domain ({domain_axis})", "",
             "Target accuracy (%) per held-out domain: mean ± sample std over seeds (n); Avg = the mean over the "
             "domains of the per-domain means (DomainBed's Avg); \"Avg ± over seeds\" = mean and sample std over the "
             "seeds finished in every domain of each seed's average over the domains.", ""]
    for spec in specs:
        title = metric_title(spec)
        if spec.endswith("test_domain_oracle"):
            title += ": selected with test-domain labels, an upper bound, not a valid DG result"
        lines += [f"### {title}", "", domain_table(entries, axes, domain_axis, spec), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tlframe report", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("sweep_dir", help="the sweep's output folder (holds sweep.json and runs/)")
    p.add_argument("--metric", action="append", dest="metrics", metavar="M",
                   help="a metric column (repeatable): a tag (last value) or max:<tag> / min:<tag>; "
                        "default: every val/* tag plus max:val/target_acc (oracle)")
    p.add_argument("--rank-by", metavar="M", help="sort the rows by the mean of this metric, best first")
    p.add_argument("--ascending", action="store_true", help="with --rank-by: lower is better (e.g. a loss)")
    p.add_argument("--stderr", action="store_true", help="± is the standard error instead of the sample std")
    p.add_argument("--baseline-metric", metavar="M",
                   help="the metric runs are compared with their baselines on (sweeps with baselines; default "
                        "val/target_acc, else test/target_acc)")
    p.add_argument("--domains", metavar="AXIS",
                   help="leave-one-domain-out sweeps: also tabulate by this axis (e.g. data.test_domain) as DomainBed "
                        "does, a column per held-out domain and their average, for each model-selection method")
    p.add_argument("--decimals", type=int, default=4)
    p.add_argument("--out", help="markdown file to write (default <sweep_dir>/report.md); the CSV goes next to it")
    p.add_argument("--plot", metavar="AXIS", help="also write a PNG of a metric against this grid axis next to the table")
    p.add_argument("--plot-metric", metavar="M", help="the plotted metric (default --rank-by, else the first metric)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    sweep_dir = Path(args.sweep_dir).expanduser().resolve()

    def fail(msg: str) -> int:
        print(f"tlframe report: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        axes, entries = collect(sweep_dir)
    except FileNotFoundError as err:
        return fail(str(err))
    metrics = list(dict.fromkeys(args.metrics or default_metrics(entries)))
    if args.rank_by and args.rank_by not in metrics:
        metrics.append(args.rank_by)
    if not metrics:
        return fail(f"no finished run in {sweep_dir} logged a val/* or test/* metric: pass --metric, or finish runs first")
    plot_metric = args.plot_metric or args.rank_by or metrics[0]
    if args.plot and args.plot not in axes:
        return fail(f"--plot {args.plot!r} is not a grid axis of this sweep; axes: {axes}")
    if args.plot and plot_metric not in metrics:
        metrics.append(plot_metric)
    rows = aggregate(axes, entries, metrics)
    if args.rank_by:
        rows = rank_rows(rows, args.rank_by, args.ascending)
    comparisons, compared_on = None, None
    if any(e.baselines for e in entries):
        compared_on = args.baseline_metric or baseline_metric(entries)
        if compared_on is not None:
            comparisons = compare_to_baselines(rows, entries, compared_on)
    elif args.baseline_metric:
        return fail(f"--baseline-metric: the runs of {sweep_dir} declare no baselines: add 'baselines:' to the sweep "
                    "file (see README 'Negative transfer') and run it again")
    out = Path(args.out).expanduser().resolve() if args.out else sweep_dir / "report.md"
    text = render_markdown(rows, axes, metrics, args.stderr, args.decimals, title=f"Sweep {sweep_dir.name}",
                           rank_by=args.rank_by, comparisons=comparisons, compared_on=compared_on)
    if args.domains:
        if args.domains not in axes:
            return fail(f"--domains {args.domains!r} is not a grid axis of this sweep; axes: {axes}")
        text += "\n" + render_domain_tables(entries, axes, args.domains)
    atomic_write_text(out, text)
    atomic_write_text(out.with_suffix(".csv"), render_csv(rows, axes, metrics, args.stderr, comparisons))
    print(text)
    print(f"tlframe report: wrote {out} and {out.with_suffix('.csv')}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return fail("--plot needs matplotlib: pip install 'tlframe[plot]' (or pip install matplotlib)")
        png = out.with_suffix(".png")
        plot(rows, axes, args.plot, plot_metric, png, args.stderr, title=f"Sweep {sweep_dir.name}")
        print(f"tlframe report: wrote {png}")
    return EXIT_OK
