"""benchmarks/digits/run_ranking.py: the weighted Kendall's tau that ranking.md reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.run_ranking import TASKS, ZOO, weighted_kendall_tau  # noqa: E402


def test_weighted_tau_agreement_reversal_and_a_hand_computed_case():
    assert weighted_kendall_tau([4, 3, 2, 1], [40, 30, 20, 10]) == pytest.approx(1.0)
    assert weighted_kendall_tau([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    # x = [3, 2, 1], y = [3, 1, 2]: by either ranking the weights are 1.5 and 4/3 for the agreeing pairs and
    # 5/6 for the swapped one: (1.5 + 4/3 - 5/6) / (1.5 + 4/3 + 5/6) = 6/11
    assert weighted_kendall_tau([3, 2, 1], [3, 1, 2]) == pytest.approx(6 / 11)
    # a swap at the top costs more than the same swap at the bottom (hyperbolic weights)
    top = weighted_kendall_tau([5, 4, 3, 2, 1], [4, 5, 3, 2, 1])
    bottom = weighted_kendall_tau([5, 4, 3, 2, 1], [5, 4, 3, 1, 2])
    assert top < bottom < 1.0
    with pytest.raises(ValueError, match="equal length"):
        weighted_kendall_tau([1, 2], [1])


def test_no_task_ranks_a_model_trained_on_its_own_labels():
    for task, (_, excluded) in TASKS.items():
        assert excluded <= set(ZOO), task
        assert len(set(ZOO) - excluded) >= 5, task
