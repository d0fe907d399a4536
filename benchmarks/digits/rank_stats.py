"""Rank statistics of the benchmark tables (no scipy here): Spearman, Kendall tau-b, weighted Kendall tau."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["average_ranks", "pearson", "spearman", "kendall_tau_b", "weighted_kendall_tau"]


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks in increasing order, tied values sharing the mean of their ranks: ``[10, 20, 20, 5] -> [2, 3.5, 3.5, 1]``."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _check_pair(x: Sequence[float], y: Sequence[float], name: str) -> None:
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"{name} needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation; NaN when either sequence is constant."""
    _check_pair(x, y, "pearson")
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (``scipy.stats.spearmanr``'s statistic)."""
    _check_pair(x, y, "spearman")
    return pearson(average_ranks(x), average_ranks(y))


def _sgn(a: float, b: float) -> int:
    return (a > b) - (a < b)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (``scipy.stats.kendalltau``'s default): ``(C - D) / sqrt((n0 - T_x) (n0 - T_y))`` with
    ``n0 = n (n - 1) / 2`` pairs, ``C``/``D`` the concordant/discordant pairs and ``T_x``/``T_y`` the pairs tied
    in ``x``/``y``. NaN when either sequence is constant."""
    _check_pair(x, y, "kendall_tau_b")
    s = untied_x = untied_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            sx, sy = _sgn(x[i], x[j]), _sgn(y[i], y[j])
            s += sx * sy
            untied_x += sx != 0
            untied_y += sy != 0
    return s / math.sqrt(untied_x * untied_y) if untied_x and untied_y else math.nan


def weighted_kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Weighted Kendall's tau (Vigna, WWW 2015) with additive hyperbolic weights, averaged over the rankings
    by ``x`` and by ``y`` (the defaults of ``scipy.stats.weightedtau``).

    For one ranking (0-based rank ``r`` in decreasing order, ties broken by the other sequence):
    ``w_ij = 1 / (r_i + 1) + 1 / (r_j + 1)``,
    ``tau = sum w_ij sgn(x_i - x_j) sgn(y_i - y_j) / sqrt(sum w_ij [x_i != x_j] * sum w_ij [y_i != y_j])``.
    Swaps among the top-ranked elements (the validator's favourites) weigh the most.
    """
    _check_pair(x, y, "weighted_kendall_tau")
    n = len(x)

    def one(primary: Sequence[float], secondary: Sequence[float]) -> float:
        order = sorted(range(n), key=lambda i: (primary[i], secondary[i]), reverse=True)
        rank = {i: r for r, i in enumerate(order)}
        num = dx = dy = 0.0
        for i in range(n):
            for j in range(i + 1, n):
                w = 1 / (rank[i] + 1) + 1 / (rank[j] + 1)
                sx, sy = _sgn(x[i], x[j]), _sgn(y[i], y[j])
                num += w * sx * sy
                dx += w * (sx != 0)
                dy += w * (sy != 0)
        return num / math.sqrt(dx * dy) if dx and dy else math.nan

    return 0.5 * (one(x, y) + one(y, x))
