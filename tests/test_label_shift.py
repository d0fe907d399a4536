"""Class weights and black-box shift estimation (tlframe.label_shift) against closed forms and simulations."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch

import tlframe.label_shift as ls
from tlframe.label_shift import (bbse_target_proportions, class_counts, class_weights, confusion_matrix,
                                 estimate_label_shift, importance_weights, long_tail_fractions, predicted_proportions)

# A 4-class classifier with a known conditional confusion M[i, j] = P(f(x) = i | y = j) (columns sum to 1).
M = np.array([[0.70, 0.10, 0.05, 0.10],
              [0.15, 0.75, 0.10, 0.05],
              [0.10, 0.10, 0.80, 0.15],
              [0.05, 0.05, 0.05, 0.70]])
P_SOURCE = np.array([0.4, 0.3, 0.2, 0.1])      # long-tailed source
Q_TARGET = np.array([0.1, 0.2, 0.3, 0.4])      # reversed on the target


def simulate(n: int, proportions: np.ndarray, rng: np.random.Generator, soft: bool = False):
    """Labels drawn from ``proportions`` and predictions of the classifier M (hard, or noisy probabilities)."""
    y = rng.choice(len(proportions), size=n, p=proportions)
    u = rng.random(n)[:, None]
    preds = (u > np.cumsum(M[:, y].T, axis=1)).sum(axis=1)
    if not soft:
        return preds, y
    probs = 0.6 * np.eye(4)[preds] + 0.4 * M[:, y].T  # calibrated in expectation: E[probs | y] = M[:, y]
    return probs, y


# ----------------------------------------------------------------------------- class weights
def test_class_weights_closed_forms():
    np.testing.assert_allclose(class_weights([100, 10]), [2 * 10 / 110, 2 * 100 / 110])
    np.testing.assert_allclose(class_weights([7, 7, 7]), [1, 1, 1])
    beta, n = 0.99, np.array([500, 50, 5])
    raw = (1 - beta) / (1 - beta ** n)  # Cui et al. eq. 4, written out
    np.testing.assert_allclose(class_weights(n, "effective", beta), raw * 3 / raw.sum(), rtol=1e-12)
    for kind in ("inverse", "effective"):
        w = class_weights(n, kind, 0.999)
        assert w.dtype == np.float64 and w.sum() == pytest.approx(3) and np.all(np.diff(w) > 0)
    np.testing.assert_allclose(class_weights(n, "effective", 0.0), [1, 1, 1])  # beta = 0: no re-weighting
    np.testing.assert_allclose(class_weights(n, "effective", 1 - 1e-12), class_weights(n, "inverse"), rtol=1e-6)
    # huge counts do not underflow: 1 - beta ** n -> 1
    np.testing.assert_allclose(class_weights([10 ** 7, 10 ** 7], "effective", 0.999), [1, 1])
    # a class without samples gets 0, the others still sum to K
    np.testing.assert_allclose(class_weights([5, 0, 5]), [1.5, 0, 1.5])
    np.testing.assert_allclose(class_weights(torch.tensor([100, 10])), class_weights([100, 10]))
    np.testing.assert_array_equal(class_counts(torch.tensor([0, 2, 2, 1, 2]), 4), [1, 1, 3, 0])


def test_class_weights_refuse_bad_input():
    with pytest.raises(ValueError, match="kind='bogus'"):
        class_weights([1, 2], "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta=1"):
        class_weights([1, 2], "effective", 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        class_weights([1, -2])
    with pytest.raises(ValueError, match="all 0"):
        class_weights([0, 0])


def test_long_tail_fractions():
    assert long_tail_fractions(3, 4) == [1.0, 0.5, 0.25]
    f = long_tail_fractions(10, 10)
    assert f[0] == 1 and f[-1] == pytest.approx(0.1) and f[0] / f[-1] == pytest.approx(10)
    assert long_tail_fractions(10, 10, reverse=True) == f[::-1]


# ----------------------------------------------------------------------------- BBSE
def test_confusion_matrix_and_predicted_proportions():
    preds, labels = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 2, 2, 0])
    C = confusion_matrix(preds, labels, 3)
    expected = np.zeros((3, 3))
    for p, y in zip(preds, labels):
        expected[p, y] += 1 / 6  # joint P(f = i, y = j): rows predictions, columns labels
    np.testing.assert_allclose(C, expected)
    assert C.dtype == np.float64 and C.sum() == pytest.approx(1)
    np.testing.assert_allclose(C.sum(axis=0), [2 / 6, 1 / 6, 3 / 6])  # source class proportions
    np.testing.assert_allclose(predicted_proportions(preds, 3), [1 / 6, 2 / 6, 3 / 6])
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(confusion_matrix(probs, torch.tensor([0, 2]), 3), [[0.25, 0, 0], [0.25, 0, 0], [0, 0, 0.5]])
    np.testing.assert_allclose(predicted_proportions(probs, 3), [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="unlabelled"):
        confusion_matrix(preds, np.array([0, 1, -1, 2, 2, 0]), 3)
    with pytest.raises(ValueError, match="softmax"):
        predicted_proportions(torch.tensor([[2.0, -1.0, 0.0]]), 3)


def test_bbse_is_exact_on_the_population():
    C = M * P_SOURCE  # C[i, j] = P(f = i | y = j) p(j)
    mu = M @ Q_TARGET  # what the classifier predicts on the target
    q, w = bbse_target_proportions(C, mu)
    np.testing.assert_allclose(q, Q_TARGET, atol=1e-12)
    np.testing.assert_allclose(w, Q_TARGET / P_SOURCE, atol=1e-12)
    assert P_SOURCE @ w == pytest.approx(1.0)
    # the naive estimate (the classifier's prediction shares) is biased toward the source; BBSE is not
    assert np.abs(mu - Q_TARGET).max() > 0.05
    # counts instead of proportions give the same answer; no shift gives w = 1
    np.testing.assert_allclose(bbse_target_proportions(C * 1000, mu * 50)[0], Q_TARGET, atol=1e-12)
    np.testing.assert_allclose(bbse_target_proportions(C, M @ P_SOURCE)[1], np.ones(4), atol=1e-12)


@pytest.mark.parametrize("soft", [False, True])
def test_bbse_converges_to_the_true_target_proportions(soft):
    """The estimate from finite samples approaches q as the sample sizes grow (error ~ 1/sqrt(n)); only the
    *source* labels and the target *predictions* are passed: the target labels stay in the simulator."""
    errors = []
    for n in (1_000, 10_000, 200_000):
        err = []
        for seed in range(4):
            rng = np.random.default_rng(seed)
            val_preds, val_labels = simulate(n, P_SOURCE, rng, soft)
            target_preds, _target_labels_never_passed = simulate(n, Q_TARGET, rng, soft)
            est = estimate_label_shift(val_preds, val_labels, target_preds, 4)
            err.append(np.abs(est.q_target - Q_TARGET).max())
            np.testing.assert_allclose(est.weights, importance_weights(val_preds, val_labels, target_preds, 4))
            assert est.q_target.sum() == pytest.approx(1) and (est.weights >= 0).all()
        errors.append(float(np.mean(err)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_no_function_takes_target_labels():
    public = [getattr(ls, name) for name in ls.__all__ if inspect.isfunction(getattr(ls, name))]
    assert bbse_target_proportions in public and importance_weights in public
    for fn in public:
        params = list(inspect.signature(fn).parameters)
        leaks = [p for p in params if "target" in p and ("label" in p or p in ("y_t", "target_y"))]
        assert not leaks, f"{fn.__name__} takes target labels: {leaks}"
    # the end-to-end estimators see the target only through predictions
    assert list(inspect.signature(estimate_label_shift).parameters)[:4] == ["source_preds", "source_labels",
                                                                           "target_preds", "num_classes"]
    assert list(inspect.signature(bbse_target_proportions).parameters)[:2] == ["confusion_joint",
                                                                              "target_pred_proportions"]


def test_ill_conditioned_confusion_falls_back_to_no_shift_and_warns():
    # classes 2 and 3 are predicted identically: their split in the target is not identifiable
    Mbad = M.copy()
    Mbad[:, 3] = Mbad[:, 2]
    C, mu = Mbad * P_SOURCE, Mbad @ Q_TARGET
    with pytest.warns(RuntimeWarning, match="nearly\\) singular"):
        est = ls._solve(C, mu, rcond=1e-6, ridge=0.0)
    assert est.truncated == 1 and est.condition_number > 1e6
    q, w = est.q_target, est.weights
    assert np.all(np.isfinite(w)) and (w >= 0).all() and q.sum() == pytest.approx(1)
    # identifiable: classes 0, 1 and the total of 2 + 3; the unidentifiable direction is resolved as "no shift"
    np.testing.assert_allclose(q[:2], Q_TARGET[:2], atol=1e-9)
    assert q[2] + q[3] == pytest.approx(Q_TARGET[2] + Q_TARGET[3])
    assert w[2] == pytest.approx(w[3])  # the same ratio to the source for both indistinguishable classes


def test_ridge_shrinks_toward_no_shift_and_clipping_keeps_weights_non_negative():
    C, mu = M * P_SOURCE, M @ Q_TARGET
    w0 = bbse_target_proportions(C, mu)[1]
    w1 = bbse_target_proportions(C, mu, ridge=1e-3)[1]
    w2 = bbse_target_proportions(C, mu, ridge=1.0)[1]
    assert np.abs(w2 - 1).max() < np.abs(w1 - 1).max() < np.abs(w0 - 1).max()
    # a target that predicts class 0 less often than the classifier's errors alone explain: w[0] < 0 -> clipped
    mu_extreme = np.array([0.0, 0.3, 0.3, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # well conditioned: no warning
        q, w = bbse_target_proportions(C, mu_extreme)
    assert w[0] == 0 and q[0] == 0 and (w >= 0).all() and q.sum() == pytest.approx(1)
    # a class absent from the source validation data cannot be estimated: 0, no division by zero
    C_missing = C.copy()
    C_missing[:, 1] = 0
    q, w = bbse_target_proportions(C_missing, mu)
    assert q[1] == 0 and w[1] == 0 and np.all(np.isfinite(w))


def test_bbse_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="4 entries"):
        bbse_target_proportions(M * P_SOURCE, [0.5, 0.5])
    with pytest.raises(ValueError, match="square"):
        bbse_target_proportions(np.ones((2, 3)), [0.5, 0.5])
    with pytest.raises(ValueError, match="same kind"):
        estimate_label_shift(np.array([0, 1]), np.array([0, 1]), np.eye(2), 2)
