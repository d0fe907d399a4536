"""benchmarks/digits/run_validators.py: rank statistics, picks and tables of validators.md (no training)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.common import Cell, RunResult  # noqa: E402
from benchmarks.digits.run_validators import (  # noqa: E402
    POOLINGS, STRATEGIES, TRUTH, VALIDATORS, Candidate, average_ranks, best_is_last, candidates_from_scalars,
    correlations, kendall_tau_b, last_epochs, mean_pool_spearman, oracle, oriented, pick, render, selection,
    spearman, sweep_cells, weighted_kendall_tau,
)

V = {v.tag: v for v in VALIDATORS}


# --------------------------------------------------------------------------- rank statistics
def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    assert average_ranks([3, 3, 3]) == [2, 2, 2]


def test_spearman_hand_computed():
    # no ties: d = [-1, 1, -1, 1, 0], rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # a tie in x: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    # monotone, not linear: still 1; reversed: -1
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1])


def test_kendall_tau_b_hand_computed():
    # 10 pairs, 2 discordant (the swapped neighbours): (8 - 2) / 10
    assert kendall_tau_b([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.6)
    # 6 pairs, one tied in x, the other 5 concordant: 5 / sqrt(5 * 6) (scipy.stats.kendalltau: 0.9128709...)
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9128709291752769)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau_b([1, 2, 3], [5, 5, 5]))


def test_weighted_tau_hand_computed_and_top_heavy():
    assert weighted_kendall_tau([4, 3, 2, 1], [40, 30, 20, 10]) == pytest.approx(1.0)
    assert weighted_kendall_tau([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    # x = [3, 2, 1], y = [3, 1, 2]: by either ranking the concordant pairs weigh 1 + 1/2 and 1 + 1/3, the
    # discordant one 1/2 + 1/3: (3/2 + 4/3 - 5/6) / (3/2 + 4/3 + 5/6) = 6/11
    assert weighted_kendall_tau([3, 2, 1], [3, 1, 2]) == pytest.approx(6 / 11)
    # the same swap costs more at the top than at the bottom; the plain tau cannot tell them apart
    top = weighted_kendall_tau([5, 4, 3, 2, 1], [4, 5, 3, 2, 1])
    bottom = weighted_kendall_tau([5, 4, 3, 2, 1], [5, 4, 3, 1, 2])
    assert top < bottom < 1.0
    assert kendall_tau_b([5, 4, 3, 2, 1], [4, 5, 3, 2, 1]) == kendall_tau_b([5, 4, 3, 2, 1], [5, 4, 3, 1, 2])


# --------------------------------------------------------------------------- candidates and picks
def cand(strategy, seed, epoch, acc, entropy=1.0, snd=1.0, im=-1.0, dev=1.0, source=0.9):
    return Candidate(strategy, seed, epoch, 100 * epoch, {
        TRUTH: acc, "val/target_entropy": entropy, "val/target_snd": snd, "val/target_im": im,
        "val/target_dev": dev, "val/source_acc": source})


def test_validators_never_read_the_ground_truth_and_signs_are_the_documented_ones():
    assert TRUTH not in V
    assert {t: v.sign for t, v in V.items()} == {
        "val/source_acc": 1, "val/target_entropy": -1, "val/target_im": -1, "val/target_snd": 1, "val/target_dev": -1}


def test_pick_follows_the_sign_and_ignores_the_truth():
    a = cand("a", 0, 1, acc=0.9, entropy=0.5, snd=1.0, im=-1.0, dev=0.2, source=0.95)
    b = cand("b", 0, 1, acc=0.7, entropy=0.1, snd=3.0, im=-2.0, dev=0.5, source=0.99)
    c = cand("c", 0, 1, acc=0.8, entropy=0.3, snd=2.0, im=-1.5, dev=math.nan, source=0.90)
    pool = [a, b, c]
    assert pick(pool, V["val/target_entropy"]) is b     # lowest entropy
    assert pick(pool, V["val/target_im"]) is b          # lowest IM
    assert pick(pool, V["val/target_snd"]) is b         # highest SND
    assert pick(pool, V["val/source_acc"]) is b         # highest source accuracy
    assert pick(pool, V["val/target_dev"]) is a         # lowest finite DEV: the NaN candidate is never picked
    assert oracle(pool) is a
    assert oriented(b, V["val/target_entropy"]) == -0.1 and oriented(b, V["val/target_snd"]) == 3.0
    for x in pool:  # changing the truth changes no pick
        x.values[TRUTH] = 1.0 - x.values[TRUTH]
    assert pick(pool, V["val/target_entropy"]) is b and pick(pool, V["val/target_dev"]) is a
    assert oracle(pool) is b


def test_pick_ties_and_missing_values():
    a, b = cand("a", 0, 1, acc=0.5, snd=2.0), cand("b", 0, 1, acc=0.6, snd=2.0)
    assert pick([a, b], V["val/target_snd"]) is a  # tie: the first in pool order
    nan = [cand("a", 0, 1, acc=0.5, dev=math.nan), cand("b", 0, 2, acc=0.6, dev=math.nan)]
    assert pick(nan, V["val/target_dev"]) is None


def synthetic_pool():
    """2 seeds x 2 strategies x 3 epochs; entropy is a perfect (reversed) copy of the truth, SND is
    anti-correlated with it, DEV is missing for the strategy "b"."""
    accs = {("a", 0): [0.50, 0.70, 0.60], ("b", 0): [0.40, 0.60, 0.80],
            ("a", 1): [0.55, 0.65, 0.75], ("b", 1): [0.30, 0.90, 0.85]}
    cands = []
    for (strategy, seed), values in accs.items():
        for epoch, acc in enumerate(values, 1):
            cands.append(cand(strategy, seed, epoch, acc, entropy=1 - acc, snd=-acc, im=-acc,
                              dev=(1 - acc) if strategy == "a" else math.nan, source=0.9))
    return cands


def test_selection_per_run_per_seed_and_whole_pool():
    cands = synthetic_pool()
    per_run = selection(cands, POOLINGS["run"][1])
    assert per_run["pools"] == 4 and per_run["size"] == 3
    # entropy = the truth reversed: it always picks the oracle
    assert per_run["picked"]["val/target_entropy"] == pytest.approx(per_run["oracle"])
    assert per_run["oracle"] == pytest.approx((0.70 + 0.80 + 0.75 + 0.90) / 4)
    assert per_run["last"] == pytest.approx((0.60 + 0.80 + 0.75 + 0.85) / 4)
    assert per_run["random"] == pytest.approx(sum(c.get(TRUTH) for c in cands) / len(cands))
    # SND is anti-correlated: it picks each run's worst epoch
    assert per_run["picked"]["val/target_snd"] == pytest.approx((0.50 + 0.40 + 0.55 + 0.30) / 4)
    # DEV exists only in the runs of "a": 2 pools
    assert per_run["picked_n"]["val/target_dev"] == 2
    assert per_run["picked"]["val/target_dev"] == pytest.approx((0.70 + 0.75) / 2)
    # source accuracy is constant: the first candidate of each pool (epoch 1)
    assert per_run["picked"]["val/source_acc"] == pytest.approx((0.50 + 0.40 + 0.55 + 0.30) / 4)

    per_seed = selection(cands, POOLINGS["seed"][1])
    assert per_seed["pools"] == 2 and per_seed["size"] == 6
    assert per_seed["oracle"] == pytest.approx((0.80 + 0.90) / 2)
    assert per_seed["last"] == pytest.approx(((0.60 + 0.80) / 2 + (0.75 + 0.85) / 2) / 2)
    assert per_seed["picked"]["val/target_dev"] == pytest.approx((0.70 + 0.75) / 2)  # only "a" has DEV

    whole = selection(cands, POOLINGS["all"][1])
    assert whole["pools"] == 1 and whole["oracle"] == pytest.approx(0.90)
    assert whole["picked"]["val/target_im"] == pytest.approx(0.90)


def test_correlations_are_sign_adjusted_and_skip_missing_values():
    cands = synthetic_pool()
    assert correlations(cands, V["val/target_entropy"])["spearman"] == pytest.approx(1.0)
    assert correlations(cands, V["val/target_snd"])["kendall_b"] == pytest.approx(-1.0)
    assert correlations(cands, V["val/target_im"])["weighted_tau"] == pytest.approx(1.0)
    dev = correlations(cands, V["val/target_dev"])
    assert dev["n"] == 6 and dev["spearman"] == pytest.approx(1.0)
    assert math.isnan(correlations(cands, V["val/source_acc"])["spearman"])  # constant
    assert mean_pool_spearman(cands, V["val/target_snd"], POOLINGS["run"][1]) == pytest.approx(-1.0)


def test_last_epochs_and_best_is_last():
    cands = synthetic_pool()
    last = last_epochs(cands)
    assert sorted((c.strategy, c.seed, c.epoch) for c in last) == [("a", 0, 3), ("a", 1, 3), ("b", 0, 3), ("b", 1, 3)]
    assert best_is_last(cands) == (2, 4)  # b/seed0 and a/seed1 peak at their last epoch


def test_candidates_from_scalars_one_per_validation():
    scalars = {TRUTH: [(99, 0.5), (199, 0.7)], "val/target_snd": [(99, 3.0), (199, 3.5)],
               "val/target_dev": [(199, 0.4)], "train/loss": [(49, 1.0)]}
    cands = candidates_from_scalars(scalars, "dann_1.0", 1)
    assert [(c.epoch, c.step) for c in cands] == [(1, 99), (2, 199)]
    assert cands[1].get("val/target_snd") == 3.5 and cands[1].get(TRUTH) == 0.7
    assert math.isnan(cands[0].get("val/target_dev")) and cands[1].get("val/target_dev") == 0.4
    assert math.isnan(cands[0].get("val/target_entropy"))  # not logged at all
    assert all(c.run == ("dann_1.0", 1) for c in cands)
    assert candidates_from_scalars({}, "x", 0) == []


# --------------------------------------------------------------------------- sweep and report
def test_sweep_cells_cover_strategies_and_seeds(tmp_path):
    cells = sweep_cells(list(STRATEGIES), [0, 1], tmp_path, tmp_path / "data", 5, 150, ["--trainer.max_steps=3"])
    assert len(cells) == 10 and len({c.name for c in cells}) == 10
    for c in cells:
        args = " ".join(c.args)
        assert "--data.val_fraction=0.1" in args and "--trainer.max_epochs=5" in args
        assert "--data.iters_per_epoch=150" in args and f"--seed_everything={c.seed}" in args
        assert args.endswith("--trainer.max_steps=3")  # user overrides last
        assert Path(c.args[1]).is_file()
        assert c.env == {"TLFRAME_DATA_ROOT": str(tmp_path / "data")}
    by_name = {c.name: " ".join(c.args) for c in cells}
    assert "dann.yaml" in by_name["mnist2usps/dann_0.3/seed0"] and "trade_off=0.3" in by_name["mnist2usps/dann_0.3/seed0"]
    assert "mmd.yaml" in by_name["mnist2usps/mmd_1.0/seed1"] and "trade_off=1.0" in by_name["mnist2usps/mmd_1.0/seed1"]
    assert "trade_off" not in by_name["mnist2usps/source_only/seed0"]


def test_render_is_complete_on_a_synthetic_sweep(tmp_path):
    cands = [c for c in synthetic_pool()]
    for c in cands:  # real strategy ids for the titles
        c.strategy = {"a": "dann_0.3", "b": "mmd_1.0"}[c.strategy]
    results = [RunResult(Cell(s, "mnist2usps", seed, tmp_path, f"mnist2usps/{s}/seed{seed}", []), "done",
                         {"wall_s": 60.0}) for s in ("dann_0.3", "mmd_1.0") for seed in (0, 1)]
    results.append(RunResult(Cell("source_only", "mnist2usps", 0, tmp_path, "mnist2usps/source_only/seed0", []),
                             "failed", None, "exit code 1"))
    text = render(results, cands, command="python benchmarks/digits/run_validators.py", out=tmp_path, epochs=3,
                  iters=10, seeds=[0, 1], extra=[], machine=["- machine: test"], date="today", total_wall_s=240.0)
    for needle in ("## Rank correlation", "## True target accuracy of the picked candidate", "## Caveats",
                   "## Appendix", "You, Wang, Long, Jordan", "ICML 2019", "Saito", "ICCV 2021", "TLlib",
                   "## Failed runs", "mnist2usps/source_only/seed0", "all seeds", "4.0 min", "- machine: test",
                   "in 2 of 4 runs"):
        assert needle in text, needle
    assert text.count("| DANN λ=0.3, seed 0 |") == 3  # one appendix row per epoch
