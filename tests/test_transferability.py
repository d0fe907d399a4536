"""Transferability scores against slow, independent float64 re-derivations, closed-form values and properties."""

import math

import numpy as np
import pytest
import torch

from tlframe.transferability import _ledoit_wolf, h_score, leep, log_me, negative_conditional_entropy, \
    regularized_h_score


# --------------------------------------------------------------------------- data
def clustered(n, d, classes, sep=2.0, seed=0):
    """Features with class centres ``sep`` apart (sep=0: pure noise) and labels covering every class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    centres = rng.normal(size=(classes, d)) * sep
    return centres[labels] + rng.normal(size=(n, d)) + 0.5, labels


def softmax_probs(n, cs, seed=0):
    logits = np.random.default_rng(seed).normal(size=(n, cs)) * 2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- slow re-derivations
def slow_log_me(f, labels):
    """LogME with the D x D posterior matrices A = alpha I + beta F^T F (no SVD)."""
    n, d = f.shape
    classes = sorted(set(labels.tolist()))
    total = 0.0
    for c in classes:
        y = np.array([1.0 if label == c else 0.0 for label in labels])
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t_old = alpha / beta
            a_inv = np.linalg.inv(alpha * np.eye(d) + beta * f.T @ f)
            m = beta * a_inv @ f.T @ y                     # posterior mean of the weights
            gamma = d - alpha * np.trace(a_inv)            # effective number of parameters
            m2 = float(m @ m)
            res2 = float(np.sum((y - f @ m) ** 2))
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t_old) / t_old <= 1e-3:
                break
        _, logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * f.T @ f)
        if n <= d:  # the reference's log|A| runs over the N eigenvalues of the N x N kernel only
            logdet -= (d - n) * math.log(alpha)
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - logdet / 2 - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        total += evidence / n
    return total / len(classes)


def slow_leep(probs, labels):
    n, cs = probs.shape
    classes = sorted(set(labels.tolist()))
    joint = {(y, z): sum(probs[i, z] for i in range(n) if labels[i] == y) / n for y in classes for z in range(cs)}
    p_z = {z: sum(joint[y, z] for y in classes) for z in range(cs)}
    total = 0.0
    for i in range(n):
        total += math.log(sum(joint[labels[i], z] / p_z[z] * probs[i, z] for z in range(cs)))
    return total / n


def slow_nce(source, target):
    n = len(source)
    pairs, zs = {}, {}
    for z, y in zip(source.tolist(), target.tolist()):
        pairs[y, z] = pairs.get((y, z), 0) + 1
        zs[z] = zs.get(z, 0) + 1
    return sum(count / n * math.log(count / zs[z]) for (y, z), count in pairs.items())


def slow_cov(x):
    n = len(x)
    mean = sum(x) / n
    return sum(np.outer(row - mean, row - mean) for row in x) / (n - 1)


def slow_class_means(f, labels):
    means = {c: np.mean([f[i] for i in range(len(f)) if labels[i] == c], axis=0) for c in set(labels.tolist())}
    return np.array([means[label] for label in labels.tolist()])


def slow_h_score(f, labels):
    return float(np.trace(np.linalg.pinv(slow_cov(f)) @ slow_cov(slow_class_means(f, labels))))


def slow_ledoit_wolf(f):
    """Ledoit & Wolf (2004), Lemma 3.2-3.4 with their normalised norm |A|^2 = tr(A A^T) / D, per-sample loop."""
    n, d = f.shape
    x = f - f.mean(axis=0)
    s = sum(np.outer(row, row) for row in x) / n
    mu = np.trace(s) / d
    d2 = np.sum((s - mu * np.eye(d)) ** 2) / d
    b2 = sum(np.sum((np.outer(row, row) - s) ** 2) / d for row in x) / n ** 2
    shrinkage = min(b2, d2) / d2 if d > 1 else 0.0  # scikit-learn does not shrink a single feature
    return shrinkage * mu * np.eye(d) + (1 - shrinkage) * s, shrinkage


def slow_regularized_h_score(f, labels):
    cov, shrinkage = slow_ledoit_wolf(f)
    return float(np.trace(np.linalg.pinv(cov) @ ((1 - shrinkage) * slow_cov(slow_class_means(f, labels)))))


# --------------------------------------------------------------------------- LogME
@pytest.mark.parametrize("n, d, classes, sep, seed", [
    (60, 8, 3, 1.0, 0),    # N > D: Gram-matrix branch
    (200, 5, 4, 0.3, 1),
    (15, 25, 3, 1.0, 2),   # N <= D: thin-SVD branch
    (20, 20, 2, 0.0, 3),
])
def test_log_me_matches_the_slow_derivation(n, d, classes, sep, seed):
    f, y = clustered(n, d, classes, sep, seed)
    assert log_me(f, y) == pytest.approx(slow_log_me(f, y), rel=1e-8, abs=1e-10)


def test_log_me_rank_deficient_features_count_zero_directions():
    f, y = clustered(80, 10, 3, 1.0, seed=4)
    f[:, :3] = 0.0                                   # dead feature channels
    assert log_me(f, y) == pytest.approx(slow_log_me(f, y), rel=1e-8)  # zero directions: log(alpha) each
    mixed = f @ np.random.default_rng(5).normal(size=(10, 10))       # rank 7, no exactly-zero direction
    assert log_me(mixed, y) == pytest.approx(slow_log_me(mixed, y), rel=1e-8)
    # the evidence depends on F F^T only: dead channels do not change it (N > D)
    assert log_me(f, y) == pytest.approx(log_me(f[:, 3:], y), rel=1e-8)


def test_log_me_label_ids_only_partition_and_samples_are_unordered():
    f, y = clustered(50, 6, 3, 1.0, seed=5)
    perm = np.random.default_rng(0).permutation(len(y))
    assert log_me(f[perm], y[perm]) == pytest.approx(log_me(f, y), rel=1e-10)
    assert log_me(f, np.array([3, 7, 11])[y]) == pytest.approx(log_me(f, y), rel=1e-12)


def test_log_me_prefers_features_that_separate_the_classes():
    good, y = clustered(120, 10, 4, sep=3.0, seed=6)
    noise = np.random.default_rng(7).normal(size=good.shape)
    assert log_me(good, y) > log_me(noise, y) + 0.1


# --------------------------------------------------------------------------- LEEP
def test_leep_matches_the_slow_derivation_and_is_at_most_zero():
    probs = softmax_probs(40, 6, seed=1)
    y = np.random.default_rng(2).integers(0, 3, 40)
    value = leep(probs, y)
    assert value == pytest.approx(slow_leep(probs, y), rel=1e-12)
    assert value <= 0


def test_leep_hand_computed():
    # P(y|z=0) = (1, 0), P(y|z=1) = (1/2, 1/2): sample terms log 1, log 1/2, log 1/2
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert leep(probs, np.array([0, 0, 1])) == pytest.approx(-2 / 3 * math.log(2), rel=1e-14)
    assert leep(np.full((4, 3), 1 / 3), np.array([0, 1, 0, 1])) == pytest.approx(math.log(0.5), rel=1e-14)
    assert leep(np.eye(3), np.array([0, 1, 2])) == 0.0  # source classes determine the target


def test_leep_source_class_never_predicted_is_ignored():
    probs = np.array([[0.7, 0.3, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]])
    y = np.array([0, 1, 1])
    assert leep(probs, y) == pytest.approx(leep(probs[:, :2], y), rel=1e-14)


# --------------------------------------------------------------------------- NCE
def test_nce_matches_counts():
    rng = np.random.default_rng(3)
    z, y = rng.integers(0, 7, 200), rng.integers(0, 4, 200)
    assert negative_conditional_entropy(z, y) == pytest.approx(slow_nce(z, y), rel=1e-12)


def test_nce_closed_forms():
    z = np.arange(60) % 6
    assert negative_conditional_entropy(z, z // 2) == 0.0             # z determines y
    grid_z, grid_y = np.meshgrid(np.arange(5), np.arange(4))           # every (y, z) pair equally often
    z, y = np.tile(grid_z.ravel(), 3), np.tile(grid_y.ravel(), 3)
    assert negative_conditional_entropy(z, y) == pytest.approx(-math.log(4), rel=1e-14)


# --------------------------------------------------------------------------- H-scores
@pytest.mark.parametrize("n, d, classes, seed", [(50, 6, 3, 0), (80, 12, 5, 1), (30, 1, 2, 2)])
def test_h_scores_match_the_slow_derivations(n, d, classes, seed):
    f, y = clustered(n, d, classes, 1.0, seed)
    assert h_score(f, y) == pytest.approx(slow_h_score(f, y), rel=1e-9)
    assert regularized_h_score(f, y) == pytest.approx(slow_regularized_h_score(f, y), rel=1e-9)


def test_ledoit_wolf_matches_scikit_learn_documented_example():
    np.random.seed(0)
    x = np.random.multivariate_normal(mean=[0, 0], cov=[[0.4, 0.2], [0.2, 0.8]], size=50)
    if not np.allclose(x.mean(axis=0), [0.0595348, -0.0075680], atol=1e-6):
        pytest.skip("this numpy draws other samples than scikit-learn's LedoitWolf docstring example")
    cov, _ = _ledoit_wolf(x)
    assert cov == pytest.approx(np.array([[0.4406, 0.1616], [0.1616, 0.8022]]), abs=1e-4)


def test_h_score_properties():
    f, y = clustered(100, 8, 4, 2.0, seed=8)
    perm = np.random.default_rng(1).permutation(len(y))
    assert h_score(f[perm], y[perm]) == pytest.approx(h_score(f, y), rel=1e-9)
    noise = np.random.default_rng(9).normal(size=f.shape)
    assert h_score(f, y) > h_score(noise, y) + 1.0
    assert regularized_h_score(f, y) > regularized_h_score(noise, y) + 1.0


def test_regularized_h_score_approaches_h_score_for_many_samples():
    f, y = clustered(4000, 4, 3, 1.0, seed=10)
    assert regularized_h_score(f, y) == pytest.approx(h_score(f, y), rel=1e-2)


# --------------------------------------------------------------------------- inputs
def test_numpy_and_torch_inputs_agree():
    f, y = clustered(40, 5, 3, 1.0, seed=11)
    probs = softmax_probs(40, 4, seed=12)
    tf, ty, tp = torch.from_numpy(f), torch.from_numpy(y), torch.from_numpy(probs)
    for fn in (log_me, h_score, regularized_h_score):
        value = fn(tf, ty)
        assert isinstance(value, float) and value == fn(f, y)
        assert fn(tf.float(), ty) == pytest.approx(fn(f.astype(np.float32), y), rel=1e-12)
    assert leep(tp, ty) == leep(probs, y)
    assert negative_conditional_entropy(tp.argmax(dim=1), ty) == negative_conditional_entropy(probs.argmax(1), y)


@pytest.mark.parametrize("call, match", [
    (lambda f, y, p: log_me(f[:, 0], y), "must be 2-D"),
    (lambda f, y, p: h_score(f, y[:-1]), "one label per sample"),
    (lambda f, y, p: regularized_h_score(f, np.zeros(len(f), int)), "at least 2"),
    (lambda f, y, p: log_me(f, y + 0.5), "integer class indices"),
    (lambda f, y, p: log_me(np.zeros_like(f), y), "all zero"),
    (lambda f, y, p: h_score(np.where(f > 0, np.nan, f), y), "NaN"),
    (lambda f, y, p: leep(np.log(p), y), "softmax"),
    (lambda f, y, p: leep(p, y[:, None]), "1-D"),
    (lambda f, y, p: negative_conditional_entropy(p, y), r"argmax"),
    (lambda f, y, p: negative_conditional_entropy(p.argmax(1), y[:5]), "one label per sample"),
])
def test_bad_inputs_raise_value_errors(call, match):
    f, y = clustered(20, 3, 2, 1.0, seed=13)
    with pytest.raises(ValueError, match=match):
        call(f, y, softmax_probs(20, 3, seed=14))
