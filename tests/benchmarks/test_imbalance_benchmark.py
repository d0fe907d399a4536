"""``benchmarks/digits/run_imbalance.py``: its sweep plans every (strategy, correction, seed), its base config is the
documented long tail, and the helpers that grade BBSE read the run's own log."""

from __future__ import annotations

import pytest
import yaml

from benchmarks.digits import run_imbalance
from tlframe.label_shift import long_tail_fractions
from tlframe.sweep import load_sweep


def test_the_shipped_sweep_plans_every_strategy_and_correction(tmp_path):
    runs = load_sweep(run_imbalance.SWEEP, str(tmp_path)).runs
    assert len(runs) == 2 * 4 * 3 and len({r.hash for r in runs}) == 24
    points = {(r.point["strategy"], r.point["correction"]) for r in runs}
    assert points == {(s, c) for s in run_imbalance.STRATEGIES for c in run_imbalance.CORRECTIONS}
    args = {(r.point["strategy"], r.point["correction"], r.seed): " ".join(r.args) for r in runs}
    assert "--model.strategy.init_args.label_shift=bbse" in args[("dann", "bbse", 0)]
    assert "--model.strategy=tlframe.strategies.DANN" in args[("dann", "bbse", 0)]
    assert "--data.source_sampler=balanced" in args[("source_only", "balanced", 1)]
    assert "--model.strategy.init_args.class_weights=inverse" in args[("dann", "class_weights", 2)]
    assert "--data.split_seed=2" in args[("dann", "class_weights", 2)]
    base = yaml.safe_load((run_imbalance.SWEEP.parent / "imbalance_base.yaml").read_text())["data"]
    assert base["source_class_fractions"] == pytest.approx(long_tail_fractions(10, 10), abs=1e-4)
    assert base["target_class_fractions"] == pytest.approx(long_tail_fractions(10, 10, reverse=True), abs=1e-4)


def test_bbse_is_graded_against_the_counts_the_run_printed(tmp_path):
    (tmp_path / "output.log").write_text(
        "tlframe: target_class_fractions: the target usps train split keeps 30 of 70 images, per class [10, 20]"
        " (of [35, 35])\ntlframe: source_class_fractions: the source mnist train split keeps 9 of 20 images, per class"
        " [6, 3] (of [10, 10])\n")
    truth = run_imbalance.logged_counts(tmp_path, run_imbalance.TARGET_COUNTS)
    source = run_imbalance.logged_counts(tmp_path, run_imbalance.SOURCE_COUNTS)
    assert truth == [10, 20] and source == [6, 3]
    assert run_imbalance.l1(run_imbalance.proportions(source), run_imbalance.proportions(truth)) == pytest.approx(2 / 3)
    assert run_imbalance.logged_counts(tmp_path / "missing", run_imbalance.TARGET_COUNTS) is None
    assert run_imbalance.delta([0.02, 0.04]) == "+3.0 ± 1.4 * (n=2)" and run_imbalance.delta([]) == "–"
    assert run_imbalance.paired({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.5, 2: 0.6}) == pytest.approx([0.4, 0.1])
