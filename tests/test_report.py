"""``tlframe report``: tables from hand-made sweep folders (values, std/stderr, n, failed/missing, ranking, CSV, plot)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest

from tlframe import report
from tlframe.cli import main as tlframe_main


def _stats(values: list[float]) -> dict:
    return {"last": values[-1], "max": max(values), "min": min(values), "step": len(values), "count": len(values)}


def make_sweep(root: Path) -> Path:
    """Axes method x lr, seeds 0-2. a/0.1: 3 done; a/1.0: 2 done + 1 failed; b/0.1: 1 done, 1 unfinished, 1 not run;
    b/1.0: nothing finished (1 failed, 1 interrupted: unfinished, 1 not run)."""
    curves = {  # (method, lr, seed) -> val/target_acc over epochs; val/source_acc = target + 0.1
        ("a", "0.1", 0): [0.5, 0.7, 0.6], ("a", "0.1", 1): [0.6, 0.8], ("a", "0.1", 2): [0.7, 0.9, 0.8],
        ("a", "1.0", 0): [0.2, 0.3], ("a", "1.0", 1): [0.4, 0.5],
        ("b", "0.1", 2): [0.95, 0.9],
    }
    status = {("a", "1.0", 2): "failed", ("b", "0.1", 0): "unfinished", ("b", "1.0", 0): "failed",
              ("b", "1.0", 1): "interrupted"}
    runs = []
    for method in ("a", "b"):
        for lr in ("0.1", "1.0"):
            for seed in (0, 1, 2):
                h = f"{method}{lr.replace('.', '')}s{seed}"
                runs.append({"hash": h, "index": len(runs), "point": {"method": method, "lr": lr}, "seed": seed})
                run_dir = root / "runs" / h
                key = (method, lr, seed)
                if key in curves:
                    run_dir.mkdir(parents=True)
                    curve = curves[key]
                    (run_dir / "done.json").write_text(json.dumps({"scalars": {
                        "val/target_acc": _stats(curve), "val/source_acc": _stats([v + 0.1 for v in curve]),
                        "train/loss": _stats([1.0, 0.5])}}))
                elif status.get(key) == "failed":
                    run_dir.mkdir(parents=True)
                    (run_dir / "failed.json").write_text(json.dumps({"exit_code": 1, "error": "exit code 1; see log"}))
                elif status.get(key) == "unfinished":
                    run_dir.mkdir(parents=True)
                elif status.get(key) == "interrupted":  # killed by a signal: resumes from last.ckpt next time
                    run_dir.mkdir(parents=True)
                    (run_dir / "failed.json").write_text(json.dumps({"exit_code": -9, "interrupted": True,
                                                                     "error": "interrupted by signal 9; see log"}))
    (root / "sweep.json").write_text(json.dumps({"axes": ["method", "lr"], "seeds": [0, 1, 2], "runs": runs}))
    return root


def test_mean_std_and_stderr():
    assert report.mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(1.2909944487358056))
    assert report.mean_spread([1.0, 2.0, 3.0, 4.0], stderr=True)[1] == pytest.approx(1.2909944487358056 / 2)
    assert report.mean_std([0.7]) == (0.7, None)
    assert report.format_stat([0.6, 0.8, 0.8], decimals=3) == "0.733 ± 0.115"
    assert report.format_stat([0.5]) == "0.5000" and report.format_stat([]) == "–"


def test_metric_specs():
    record = {"scalars": {"val/x": {"last": 0.2, "max": 0.9, "min": 0.1}}}
    assert report.metric_value(record, "val/x") == 0.2 and report.metric_value(record, "max:val/x") == 0.9
    assert report.metric_value(record, "min:val/x") == 0.1 and report.metric_value(record, "val/y") is None
    assert report.parse_metric("weird:tag") == ("last", "weird:tag")


def test_table_values_counts_and_missing_runs(tmp_path):
    sweep = make_sweep(tmp_path)
    axes, entries = report.collect(sweep)
    assert axes == ["method", "lr"] and len(entries) == 12
    assert report.default_metrics(entries) == ["val/source_acc", "val/target_acc", report.ORACLE]
    rows = report.aggregate(axes, entries, ["val/target_acc", report.ORACLE])
    by_point = {(r.point["method"], r.point["lr"]): r for r in rows}
    a01 = by_point[("a", "0.1")]
    assert a01.values["val/target_acc"] == [0.6, 0.8, 0.8] and a01.values[report.ORACLE] == [0.7, 0.8, 0.9]
    assert report.runs_cell(a01) == "3/3"
    assert report.runs_cell(by_point[("a", "1.0")]) == "2/3; 1 failed"
    assert report.runs_cell(by_point[("b", "0.1")]) == "1/3; 1 unfinished, 1 not run"
    assert report.runs_cell(by_point[("b", "1.0")]) == "0/3; 1 failed, 1 unfinished, 1 not run"
    text = report.render_markdown(rows, axes, ["val/target_acc", report.ORACLE])
    lines = text.splitlines()
    assert "| method | lr | val/target_acc | oracle: max val/target_acc | n | runs |" in lines
    std = statistics.stdev([0.6, 0.8, 0.8])
    assert f"| a | 0.1 | 0.7333 ± {std:.4f} | 0.8000 ± 0.1000 | 3 | 3/3 |" in lines
    assert "| a | 1.0 | 0.4000 ± 0.1414 | 0.4000 ± 0.1414 | 2 | 2/3; 1 failed |" in lines
    assert "| b | 0.1 | 0.9000 | 0.9500 | 1 | 1/3; 1 unfinished, 1 not run |" in lines
    assert "| b | 1.0 | – | – | 0 | 0/3; 1 failed, 1 unfinished, 1 not run |" in lines
    assert "sample standard deviation over seeds (ddof=1)" in text and "Not a valid result" in text
    assert "- `a10s2` (method=a lr=1.0 seed=2): failed: exit code 1; see log" in lines
    assert "- `b01s1` (method=b lr=0.1 seed=1): not run" in lines
    stderr_text = report.render_markdown(rows, axes, ["val/target_acc"], stderr=True)
    assert f"| a | 0.1 | 0.7333 ± {std / math.sqrt(3):.4f} | 3 | 3/3 |" in stderr_text.splitlines()
    assert "standard error" in stderr_text and "oracle" not in stderr_text


def test_ranking_and_csv(tmp_path):
    axes, entries = report.collect(make_sweep(tmp_path))
    rows = report.aggregate(axes, entries, ["val/target_acc"])
    ranked = report.rank_rows(rows, "val/target_acc")
    assert [(r.point["method"], r.point["lr"]) for r in ranked] == [("b", "0.1"), ("a", "0.1"), ("a", "1.0"), ("b", "1.0")]
    assert [r.point["lr"] for r in report.rank_rows(rows, "val/target_acc", ascending=True)][:3] == ["1.0", "0.1", "0.1"]
    table = list(csv.reader(io.StringIO(report.render_csv(ranked, axes, ["val/target_acc"]))))
    assert table[0] == ["method", "lr", "val/target_acc mean", "val/target_acc std", "n", "failed", "unfinished", "not_run"]
    assert table[1] == ["b", "0.1", "0.9", "", "1", "0", "1", "1"]
    assert table[2][:2] == ["a", "0.1"] and float(table[2][2]) == pytest.approx(0.7333333) and table[2][4:] == ["3", "0", "0", "0"]
    assert table[4] == ["b", "1.0", "", "", "0", "1", "1", "1"]
    assert report.render_csv(ranked, axes, ["val/target_acc"], stderr=True).startswith(
        "method,lr,val/target_acc mean,val/target_acc stderr,")


def test_report_command_writes_markdown_and_csv(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sw")
    with pytest.raises(SystemExit) as exit_info:
        tlframe_main(["report", str(sweep), "--metric", "val/source_acc", "--rank-by", "max:val/target_acc",
                      "--stderr", "--out", str(tmp_path / "t" / "table.md")])
    assert exit_info.value.code == 0
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| rank | method | lr | val/source_acc | oracle: max val/target_acc | n | runs |" in md
    assert "| 1 | b | 0.1 |" in md and "standard error" in md
    assert (tmp_path / "t" / "table.csv").is_file() and "wrote" in capsys.readouterr().out
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert report.main([str(sweep), "--plot", "nope"]) == 2
    assert "no sweep" in capsys.readouterr().err


def test_report_without_manifest_reads_args_json(tmp_path):
    run = tmp_path / "runs" / "abc"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"hash": "abc", "point": {"x": "1"}, "seed": 0}))
    (run / "done.json").write_text(json.dumps({"scalars": {"val/acc": _stats([0.3])}}))
    old = tmp_path / "runs" / "abc.superseded-20261203T060000.000000Z"  # the run of an earlier config, kept
    old.mkdir()
    (old / "args.json").write_text(json.dumps({"hash": "abc", "point": {"x": "1"}, "seed": 0}))
    axes, entries = report.collect(tmp_path)
    assert axes == ["x"] and [e.status for e in entries] == ["done"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install 'tlframe[plot]')")
    sweep = make_sweep(tmp_path)
    assert report.main([str(sweep), "--metric", "val/target_acc", "--plot", "lr"]) == 0
    png = tmp_path / "report.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def make_baseline_sweep(root: Path) -> Path:
    """Two adapted points (near, far) x seeds 0-2, each with a source-only sibling, and one target-only sibling per
    seed shared by both. val/target_acc: near beats both baselines; far is below target-only on every seed."""
    acc = {"near": [0.90, 0.92, 0.91], "far": [0.60, 0.70, 0.65], "so_near": [0.80, 0.81, 0.79],
           "so_far": [0.62, 0.60, 0.75], "to": [0.85, 0.86, 0.84]}
    runs = []

    def add(name, point, seed, **extra):
        h = f"{name}{seed}"
        runs.append({"hash": h, "index": len(runs), "point": point, "seed": seed, **extra})
        (root / "runs" / h).mkdir(parents=True)
        (root / "runs" / h / "done.json").write_text(json.dumps({"scalars": {"val/target_acc": _stats([acc[name][seed]])}}))

    for task in ("near", "far"):
        for seed in range(3):
            add(task, {"task": task, "baseline": ""}, seed, baselines={"source_only": f"so_{task}{seed}", "target_only": f"to{seed}"})
    for task in ("near", "far"):
        for seed in range(3):
            add(f"so_{task}", {"task": task, "baseline": "source_only"}, seed, baseline="source_only")
    for seed in range(3):
        add("to", {"task": "*", "baseline": "target_only"}, seed, baseline="target_only")
    (root / "sweep.json").write_text(json.dumps({"axes": ["task", "baseline"], "seeds": [0, 1, 2], "runs": runs}))
    return root


def test_runs_are_compared_with_their_baselines_seed_by_seed(tmp_path):
    axes, entries = report.collect(make_baseline_sweep(tmp_path))
    rows = report.aggregate(axes, entries, ["val/target_acc"])
    comps = report.compare_to_baselines(rows, entries, "val/target_acc")
    near, far = comps[0], comps[1]
    assert all(c == {} for c in comps[2:])  # baseline rows compare with nothing
    assert near["source_only"].diffs == pytest.approx([0.10, 0.11, 0.12]) and not near["source_only"].hurt
    assert near["source_only"].beyond_spread  # +0.11 against a seed spread of 0.01
    assert far["target_only"].diffs == pytest.approx([-0.25, -0.16, -0.19]) and far["target_only"].hurt
    assert far["target_only"].beyond_spread  # -0.2 against a spread of 0.05
    assert far["source_only"].mean == pytest.approx(-0.02 / 3) and far["source_only"].hurt
    assert far["source_only"].spread == pytest.approx(statistics.stdev([0.62, 0.60, 0.75]))
    assert far["source_only"].beyond_spread is False  # -0.007 is seed noise here
    assert far["target_only"].std == pytest.approx(statistics.stdev([-0.25, -0.16, -0.19]))


def test_report_flags_negative_transfer(tmp_path, capsys):
    sweep_dir = make_baseline_sweep(tmp_path)
    assert report.main([str(sweep_dir), "--decimals", "3"]) == 0
    text = (sweep_dir / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| task |"))
    assert "| vs source-only | vs target-only |" in header
    far = next(line for line in text.splitlines() if line.startswith("| far |  |"))
    assert "| -0.200 ± 0.046 (n=3) **hurt**, beyond spread |" in far
    assert "**negative transfer**: task=far: -0.200 against target-only (hurt in 3/3 seeds; beyond the seed spread" in text
    assert "**worse than without adaptation**: task=far: -0.007 against source-only (hurt in 2/3 seeds; within" in text
    assert "task=near" not in text.split("## Transfer against its baselines")[1]
    rows = list(csv.DictReader(io.StringIO((sweep_dir / "report.csv").read_text())))
    assert rows[1]["task"] == "far" and rows[1]["vs_target_only hurt"] == "True"
    assert float(rows[1]["vs_target_only mean"]) == pytest.approx(-0.2) and rows[1]["vs_target_only n"] == "3"
    assert rows[0]["vs_source_only beyond_spread"] == "True" and rows[2]["vs_source_only mean"] == ""


def test_baseline_metric_needs_a_sweep_with_baselines(tmp_path, capsys):
    assert report.main([str(make_sweep(tmp_path)), "--baseline-metric", "val/target_acc"]) == 2
    assert "declare no baselines: add 'baselines:' to the sweep file" in capsys.readouterr().err


def test_run_selections_pick_domainbeds_checkpoints_from_the_logged_series():
    from tlframe.model_selection import run_selections

    scalars = {"val/source_acc": [(100, 0.5), (200, 0.7), (300, 0.6)],
               "val/target_acc": [(100, 0.4), (200, 0.8), (300, 0.9)],
               "val/target_out_acc": [(100, 0.3), (200, 0.7), (300, 0.85)]}
    chosen = run_selections(scalars)
    assert chosen["training_domain_validation"] == {"step": 200, "val_acc": 0.7, "test_acc": 0.8,
                                                    "method": "training-domain validation"}
    assert chosen["test_domain_oracle"]["step"] == 300 and chosen["test_domain_oracle"]["test_acc"] == 0.9
    # a two-domain run without the held-out domain's second split: no oracle; no source validation: nothing
    assert list(run_selections({k: v for k, v in scalars.items() if k != "val/target_out_acc"})) == [
        "training_domain_validation"]
    assert run_selections({"val/target_acc": scalars["val/target_acc"]}) == {}


def test_domain_table_averages_the_held_out_domains_as_domainbed():
    from tlframe.report import RunEntry, domain_table, render_domain_tables

    def entry(strategy, domain, seed, tdv, oracle=None, status="done"):
        selection = {"training_domain_validation": {"test_acc": tdv}}
        if oracle is not None:
            selection["test_domain_oracle"] = {"test_acc": oracle}
        return RunEntry(f"{strategy}{domain}{seed}", {"model.strategy": strategy, "data.test_domain": str(domain)}, seed,
                        status, {"selection": selection} if status == "done" else {})

    entries = [entry("ERM", 0, 0, 0.90, 0.91), entry("ERM", 0, 1, 0.92, 0.93), entry("ERM", 1, 0, 0.98, 0.99),
               entry("ERM", 1, 1, 0.96, 0.97), entry("IRM", 0, 0, 0.80), entry("IRM", 1, 0, 0.0, status="failed")]
    table = domain_table(entries, ["model.strategy", "data.test_domain"], "data.test_domain",
                         "select:training_domain_validation")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows["ERM"] == ["91.0 ± 1.4 (n=2)", "97.0 ± 1.4 (n=2)", "94.0", "94.0 ± 0.0 (n=2)"]
    assert rows["IRM"] == ["80.0 (n=1)", "failed (1 run)", "–", "–"]  # a domain without a result: no average
    text = render_domain_tables(entries, ["model.strategy", "data.test_domain"], "data.test_domain")
    assert "### target acc, training-domain validation" in text
    assert "### target acc, test-domain validation (oracle): selected with test-domain labels" in text
