"""Transferability scores: how well a pre-trained model suits a labelled target task, before fine-tuning.

Pure functions of features (or source-model predictions) and target labels. Inputs may be numpy arrays or
torch tensors (any device or dtype); the math runs in float64 numpy and every function returns a Python float.
Higher is better for all five scores.

Reference semantics are those of the authors' code (LogME: ``thuml/LogME``; LEEP, NCE, H-score and the
regularised H-score: TLlib ``tllib/ranking``), so that published numbers can be compared. Where this module
differs (only in cases where the reference is undefined or degenerate) the docstring says so.

Classes are the distinct label values present: with labels ``0..C-1`` all present this is the references'
``range(labels.max() + 1)``; a label id that never occurs is not a class here (the references would score an
all-zero LogME target for it, or divide by an empty class).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["log_me", "leep", "negative_conditional_entropy", "h_score", "regularized_h_score"]


# --------------------------------------------------------------------------- input checks
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # bfloat16/half have no numpy dtype
        return x.numpy()
    return np.asarray(x)


def _features(x: Any, name: str = "features") -> np.ndarray:
    f = _to_numpy(x)
    if f.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N samples, D dims), got shape {tuple(f.shape)}; "
                         f"flatten each sample's {name} into one row, e.g. x.reshape(len(x), -1)")
    if not (np.issubdtype(f.dtype, np.number) or f.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {f.dtype}")
    f = f.astype(np.float64)
    if not np.isfinite(f).all():
        raise ValueError(f"{name} contain NaN or infinite values; remove or fix those samples first")
    return f


def _labels(y: Any, n: int | None, name: str = "labels", min_classes: int = 2) -> np.ndarray:
    """Class indices ``0..C-1`` (the rank of each label among the distinct labels present)."""
    y = _to_numpy(y)
    if y.ndim != 1:
        hint = " (for predictions pass probs.argmax(axis=1))" if y.ndim == 2 else ""
        raise ValueError(f"{name} must be 1-D (N,) class indices, got shape {tuple(y.shape)}{hint}")
    if n is not None and len(y) != n:
        raise ValueError(f"{name} has {len(y)} entries but there are {n} samples; pass one label per sample "
                         "(the rows of features/probs and the labels must come from the same images, in order)")
    if y.dtype != bool and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}; "
                             f"convert them with labels.astype(int) (or map class names to ids)")
    classes, idx = np.unique(y, return_inverse=True)
    if len(classes) < min_classes:
        raise ValueError(f"{name} contain {len(classes)} distinct class(es); a transferability score needs at "
                         f"least {min_classes}: use a labelled set covering several classes")
    return idx.reshape(-1)


def _one_hot(idx: np.ndarray) -> np.ndarray:
    out = np.zeros((len(idx), int(idx.max()) + 1))
    out[np.arange(len(idx)), idx] = 1.0
    return out


# --------------------------------------------------------------------------- LogME
def _logme_evidence(sigma: np.ndarray, x2: np.ndarray, res_x2: float, n: int, d: int) -> float:
    """Maximum log evidence / N of one regression target, from the squared singular values ``sigma`` of
    the features and the target's squared coordinates ``x2`` in the left singular vectors."""
    alpha = beta = 1.0
    for _ in range(11):
        t = alpha / beta
        gamma = np.sum(sigma / (sigma + t))
        m2 = np.sum(sigma * x2 / (sigma + t) ** 2)                   # |m|^2
        res2 = np.sum(x2 * (t / (sigma + t)) ** 2) + res_x2          # |y - f m|^2
        alpha = gamma / (m2 + 1e-5)
        beta = (n - gamma) / (res2 + 1e-5)
        if abs(alpha / beta - t) / t <= 1e-3:
            break
    # As the reference: the last alpha, beta with the m2, res2 of the previous step.
    evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
                - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi))
    return float(evidence / n)


def log_me(features: Any, labels: Any) -> float:
    r"""LogME, the log maximum evidence of a Bayesian linear model on the features (You et al., "LogME:
    Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021; code: thuml/LogME,
    ``LogME.fit``, the fixed-point version).

    Each class ``c`` is a regression target ``y = [labels == c]`` with prior ``w ~ N(0, I/alpha)`` and noise
    ``N(0, 1/beta)``. With ``sigma_j`` the squared singular values of ``features`` (``F``, N x D) and ``x = U^T y``,
    ``t = alpha / beta`` is found by at most 11 fixed-point steps (stop when it moves by <= 1e-3 relative)::

        gamma = sum sigma/(sigma+t),  m2 = sum sigma x^2/(sigma+t)^2,  res2 = |y|^2 - |x|^2 + sum x^2 t^2/(sigma+t)^2
        alpha = gamma/(m2 + 1e-5),    beta = (N - gamma)/(res2 + 1e-5)
        L_c = [D/2 log alpha + N/2 log beta - 1/2 sum_j log(alpha + beta sigma_j)
               - beta/2 res2 - alpha/2 m2 - N/2 log(2 pi)] / N

    Score: the mean of ``L_c`` over the classes. As the reference, the ``log|A|`` term runs over the
    ``min(N, D)`` singular values, so for N <= D the score exceeds the textbook evidence by
    ``(D - N) log(alpha) / (2N)``. For rank-deficient features with N > D, singular values below round-off
    (``sigma <= max(sigma) D eps``) count as zeros, a ``log(alpha)`` term each (the textbook evidence, which
    depends on ``F F^T`` only: all-zero "dead" feature columns do not change it). The reference's value there
    depends on round-off: it keeps such values as computed (then it agrees with this one) but drops them when
    its Gram-matrix SVD returns exact zeros (then it is higher by ``(D - rank) log(alpha) / (2N)``).

    Shapes: ``features`` (N, D) float, ``labels`` (N,) integer class ids (at least two classes).
    """
    f = _features(features)
    y = _one_hot(_labels(labels, len(f)))
    if not f.any():
        raise ValueError("features are all zero, LogME is undefined for them; check that the backbone "
                         "produces features (e.g. not a dead or untrained layer)")
    n, d = f.shape
    if n > d:  # eigen-decomposition of the D x D Gram matrix (cheaper than the SVD of f)
        lam, v = np.linalg.eigh(f.T @ f)
        # Directions of (numerically) zero variance: sigma = 0 and x = 0 (their part of y stays in res_x2).
        zero = lam <= max(lam.max(), 0.0) * d * np.finfo(np.float64).eps
        sigma = np.where(zero, 0.0, lam)
        x = (v.T @ (f.T @ y)) / np.sqrt(np.where(zero, 1.0, sigma))[:, None]   # = U^T y with U = f V / s
        x[zero] = 0.0
    else:  # thin SVD: min(N, D) = N singular values
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        sigma, x = s ** 2, u.T @ y
    x2 = x ** 2
    res_x2 = np.sum(y ** 2, axis=0) - np.sum(x2, axis=0)
    return float(np.mean([_logme_evidence(sigma, x2[:, c], res_x2[c], n, d) for c in range(y.shape[1])]))


# --------------------------------------------------------------------------- LEEP and NCE
def leep(probs: Any, labels: Any) -> float:
    r"""LEEP, log expected empirical prediction (Nguyen et al., "LEEP: A New Measure to Evaluate
    Transferability of Learned Representations", ICML 2020; as TLlib ``log_expected_empirical_prediction``).

    With ``theta_i = probs[i]`` the source model's softmax output on target image ``i``::

        P(y, z) = 1/N sum_{i: y_i = y} theta_i[z],   P(y | z) = P(y, z) / P(z)
        LEEP    = 1/N sum_i log sum_z P(y_i | z) theta_i[z]          (<= 0)

    A source class with ``P(z) = 0`` contributes nothing (the reference would give NaN).

    Shapes: ``probs`` (N, Cs) rows of probabilities (softmax, not logits), ``labels`` (N,) target class ids.
    """
    p = _features(probs, "probs")
    y = _labels(labels, len(p))
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, rtol=0.0, atol=1e-3):
        raise ValueError("probs must be rows of probabilities (non-negative, each row summing to 1); "
                         "pass the source model's softmax output, e.g. logits.softmax(dim=1), not its logits")
    joint = _one_hot(y).T @ p / len(p)                      # (Ct, Cs)
    p_z = joint.sum(axis=0)
    cond = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)   # P(y | z)
    eep = np.sum(p * cond[y], axis=1)                         # sum_z P(y_i | z) theta_i[z]
    return float(np.mean(np.log(eep)))


def negative_conditional_entropy(source_labels: Any, target_labels: Any) -> float:
    r"""NCE, negative conditional entropy (Tran et al., "Transferability and Hardness of Supervised
    Classification Tasks", ICCV 2019; as TLlib ``negative_conditional_entropy``).

    With the empirical joint ``P(y, z)`` of target label ``y`` and source label ``z`` (natural log)::

        NCE = -H(Y | Z) = sum_{y, z} P(y, z) log( P(y, z) / P(z) )      (<= 0; 0 when z determines y)

    Shapes: ``source_labels`` (N,) source class ids (e.g. ``probs.argmax(axis=1)``), ``target_labels`` (N,).
    """
    z = _labels(source_labels, None, "source_labels", min_classes=1)
    y = _labels(target_labels, len(z), "target_labels")
    joint = np.zeros((y.max() + 1, z.max() + 1))
    np.add.at(joint, (y, z), 1.0 / len(y))
    cond = joint / joint.sum(axis=0, keepdims=True)           # every column occurs: P(z) > 0
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(cond[nz])))


# --------------------------------------------------------------------------- H-scores
def _class_means(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row of ``f`` replaced by the mean of its class: E[f | y]."""
    onehot = _one_hot(y)
    means = (onehot.T @ f) / onehot.sum(axis=0)[:, None]
    return means[y]


def _cov(x: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.cov(x, rowvar=False))  # unbiased (N - 1), as np.cov in the references


def h_score(features: Any, labels: Any) -> float:
    r"""H-score (Bao et al., "An Information-theoretic Approach to Transferability in Task Transfer
    Learning", ICIP 2019; as TLlib ``h_score``)::

        H = tr( cov(f)^+ cov(E[f | y]) )

    ``cov`` is the unbiased covariance of the centred rows, ``^+`` the pseudo-inverse (``rcond=1e-15``, the
    numpy default) and ``E[f | y]`` replaces each row by the mean of its class.

    Shapes: ``features`` (N, D) float, ``labels`` (N,) integer class ids (at least two classes).
    """
    f = _features(features)
    y = _labels(labels, len(f))
    cov_f, cov_g = _cov(f), _cov(_class_means(f, y))
    return float(np.sum(np.linalg.pinv(cov_f, rcond=1e-15) * cov_g.T))   # trace of the product


def _ledoit_wolf(f: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance and shrinkage of the rows of ``f`` (as ``sklearn.covariance.ledoit_wolf``,
    ``assume_centered=False``): ``(1 - a) S + a mu I`` with ``S`` the biased (1/N) covariance and
    ``mu = tr(S) / D``."""
    x = f - f.mean(axis=0)
    n, d = x.shape
    s = x.T @ x / n
    if d == 1:
        return s, 0.0
    mu = np.trace(s) / d
    frob_s = np.sum(s ** 2)
    # b^2: how noisy S is, (mean_n |x_n|^4 - |S|_F^2) / (N D); d^2 = |S - mu I|_F^2 / D.
    b2 = (np.mean(np.sum(x ** 2, axis=1) ** 2) - frob_s) / (n * d)
    d2 = (frob_s - 2.0 * mu * np.trace(s) + d * mu ** 2) / d
    b2 = min(b2, d2)
    shrinkage = 0.0 if b2 == 0 else b2 / d2
    return (1.0 - shrinkage) * s + shrinkage * mu * np.eye(d), float(shrinkage)


def regularized_h_score(features: Any, labels: Any) -> float:
    r"""Regularised (shrinkage) H-score (Ibrahim, Ponomareva & Mazumder, "Newer is not always better:
    Rethinking transferability metrics, their peculiarities, stability and performance", 2022,
    https://openreview.net/forum?id=iz_Wwmfquno; as TLlib ``regularized_h_score``)::

        H_a = tr( cov_a(f)^+ (1 - a) cov(E[f | y]) )

    ``cov_a(f) = (1 - a) S + a tr(S)/D I`` is the Ledoit-Wolf estimate (``S`` the biased 1/N covariance,
    shrinkage ``a`` by the Ledoit-Wolf formula, as scikit-learn's ``LedoitWolf``); ``cov(E[f | y])`` the
    unbiased (N - 1) covariance of the class means, exactly as the reference mixes them.

    Shapes: ``features`` (N, D) float, ``labels`` (N,) integer class ids (at least two classes).
    """
    f = _features(features)
    y = _labels(labels, len(f))
    f = f - f.mean(axis=0)
    cov_a, a = _ledoit_wolf(f)
    cov_g = (1.0 - a) * _cov(_class_means(f, y))
    return float(np.sum(np.linalg.pinv(cov_a, rcond=1e-15) * cov_g.T))
