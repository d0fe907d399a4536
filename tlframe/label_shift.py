"""Class imbalance and label shift: class weights and black-box shift estimation (BBSE), as pure functions.

Everything here is float64 NumPy (inputs may be NumPy arrays, torch tensors or lists; outputs are NumPy
arrays); nothing holds state. The other parts of tlframe turn the results into loss weights.

**Class imbalance of the source** (:func:`class_weights`): per-class weights for the source
cross-entropy, inverse frequency ``1 / n_c`` or the inverse *effective number of samples*
``(1 - beta) / (1 - beta ** n_c)`` (Cui et al., "Class-Balanced Loss Based on Effective Number of
Samples", CVPR 2019), normalised to sum to the number of classes.

**Label shift between the domains** (:func:`bbse_target_proportions`, :func:`importance_weights`):
the target has the source's class-conditional images ``p_t(x | y) = p_s(x | y)`` but other class
proportions ``q(y) != p(y)``. Black Box Shift Estimation (Lipton, Wang and Smola, "Detecting and
Correcting for Label Shift with Black Box Predictors", ICML 2018) estimates ``q`` without a single
target label, from any fixed classifier ``f``:

- on held-out **labelled source** data (the source *validation* split, not the data ``f`` was
  trained on): the joint confusion matrix ``C[i, j] = P_s(f(x) = i, y = j)`` (:func:`confusion_matrix`);
- on **unlabelled target** data: the distribution of the predictions
  ``mu[i] = P_t(f(x) = i)`` (:func:`predicted_proportions`).

Under label shift ``mu = C w`` with ``w[j] = q[j] / p[j]``, so ``w`` solves a ``K x K`` linear system
and ``q = w * p``. The importance weights ``w(y)`` reweight the source loss (per source sample: ``w[y_s]``)
to the target's class proportions. Hard predictions (``f(x)`` a class) give Lipton's BBSE; class
probabilities (``(N, K)`` rows) give the "soft" variant (same estimator with ``P(f(x) = i)`` replaced
by the predicted probability of ``i``); use the same kind for ``C`` and for ``mu``.

No function of this module takes target labels (``tests/test_label_shift.py`` checks the signatures):
the target enters only through the classifier's predictions.

Shapes: ``preds`` ``(N,)`` int class indices or ``(N, K)`` probabilities; ``labels`` ``(N,)`` int in
``[0, K)``; ``C`` ``(K, K)`` rows = predicted class, columns = true class, summing to 1; proportions
``(K,)`` summing to 1.

Example (a 3-class source, balanced; a target with 3x fewer class-0 images)::

    C = confusion_matrix(val_preds, val_labels, 3)              # source validation split
    mu = predicted_proportions(target_preds, 3)                  # target train split, no labels
    q, w = bbse_target_proportions(C, mu)                        # q ~ [0.14, 0.43, 0.43], w ~ [0.43, 1.29, 1.29]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["long_tail_fractions", "class_counts", "class_weights", "confusion_matrix", "predicted_proportions",
           "bbse_target_proportions", "bbse_estimate", "LabelShiftEstimate", "estimate_label_shift",
           "importance_weights"]


def _array(x: Any, dtype=np.float64) -> np.ndarray:
    """``x`` (NumPy, torch, list) as a NumPy array of ``dtype`` (a torch tensor is detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _labels(labels: Any, num_classes: int, what: str) -> np.ndarray:
    y = _array(labels, np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what} must be class indices in [0, {num_classes}); got values in [{y.min()}, {y.max()}] "
                         "(-1 marks an unlabelled sample: BBSE needs the labels of held-out *source* data).")
    return y


def _one_hot_preds(preds: Any, num_classes: int) -> np.ndarray:
    """``(N, K)`` float64: one-hot rows for hard predictions ``(N,)``, the rows themselves for probabilities ``(N, K)``."""
    p = _array(preds)
    if p.ndim == 1:
        idx = _labels(p.astype(np.int64), num_classes, "hard predictions")
        if not np.array_equal(idx, p):
            raise ValueError("hard predictions must be integer class indices; pass (N, K) probabilities for soft BBSE.")
        return np.eye(num_classes, dtype=np.float64)[idx]
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(f"preds must be (N,) class indices or (N, {num_classes}) probabilities, got shape {p.shape}.")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("soft predictions must be probabilities (rows >= 0 summing to 1): apply softmax to the logits.")
    return p


def long_tail_fractions(num_classes: int, imbalance_ratio: float, reverse: bool = False) -> list[float]:
    """Per-class keep fractions of an exponential long tail: ``f_c = imbalance_ratio ** (-c / (K - 1))``.

    Class 0 keeps everything, the last class ``1 / imbalance_ratio`` (the "long-tailed CIFAR" profile of
    Cui et al., CVPR 2019); ``reverse=True`` makes the last class the head (a target whose proportions differ
    from such a source). For ``data.source_class_fractions`` / ``data.target_class_fractions``.

    Example: ``long_tail_fractions(3, 4)`` -> ``[1.0, 0.5, 0.25]``.
    """
    if num_classes < 1 or not imbalance_ratio >= 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1 and imbalance_ratio={imbalance_ratio} >= 1.")
    k = max(num_classes - 1, 1)
    fractions = [float(imbalance_ratio) ** (-c / k) for c in range(num_classes)]
    return fractions[::-1] if reverse else fractions


def class_counts(labels: Any, num_classes: int) -> np.ndarray:
    """Samples per class, ``(num_classes,)`` int64, of labels in ``[0, num_classes)``."""
    return np.bincount(_labels(labels, num_classes, "labels"), minlength=num_classes).astype(np.int64)


def class_weights(counts: Any, kind: Literal["inverse", "effective"] = "inverse", beta: float = 0.999) -> np.ndarray:
    """Per-class loss weights against class imbalance, ``(K,)`` float64 summing to ``K``.

    - ``"inverse"``: ``w_c ∝ 1 / n_c`` (inverse frequency);
    - ``"effective"``: ``w_c ∝ (1 - beta) / (1 - beta ** n_c)``, the inverse of the *effective number of
      samples* ``E_n = (1 - beta ** n) / (1 - beta)`` (Cui et al., CVPR 2019, eq. 3-4). ``beta = 0`` gives equal
      weights, ``beta -> 1`` inverse frequency; the paper uses ``beta`` in {0.9, 0.99, 0.999, 0.9999}.

    Normalised as in the paper so that ``sum_c w_c = K`` (``K = len(counts)``): with balanced classes every
    weight is 1. A class with no samples gets weight 0 (it never appears in the loss) and the others still
    sum to ``K``.

    Args:
        counts: samples per class, e.g. :meth:`TransferDataModule.source_class_counts
            <tlframe.data.TransferDataModule.source_class_counts>` or :func:`class_counts`.
        kind: ``"inverse"`` or ``"effective"``.
        beta: the effective-number hyperparameter, in ``[0, 1)`` (``"effective"`` only).

    Example: ``class_weights([100, 10], "inverse")`` -> ``[0.1818, 1.8182]``.
    """
    n = _array(counts).reshape(-1)
    if n.size == 0 or (n < 0).any() or not np.all(np.isfinite(n)):
        raise ValueError(f"counts must be a non-empty list of non-negative sample counts per class, got {counts!r}.")
    if not (n > 0).any():
        raise ValueError("counts are all 0: no class has a sample to weight.")
    present = n > 0
    raw = np.zeros_like(n)
    if kind == "inverse":
        raw[present] = 1.0 / n[present]
    elif kind == "effective":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta} must be in [0, 1) (the paper uses 0.9 ... 0.9999).")
        raw[present] = (1.0 - beta) / -np.expm1(n[present] * np.log(beta)) if beta > 0 else 1.0
    else:
        raise ValueError(f"kind={kind!r} is unknown: use 'inverse' or 'effective'.")
    return raw * (n.size / raw.sum())


def confusion_matrix(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Joint confusion matrix ``C[i, j] = P(f(x) = i, y = j)`` of held-out labelled **source** data, ``(K, K)`` float64.

    Rows are predicted classes, columns true classes; the entries sum to 1, a column sums to the source
    class proportion ``p[j]`` and a row to the proportion of predictions of ``i``. Estimate it on the source
    *validation* split (not on training data, where ``f`` is over-confident and ``C`` too diagonal).

    Args:
        preds: ``(N,)`` predicted class indices (BBSE) or ``(N, K)`` predicted probabilities (soft BBSE).
        labels: ``(N,)`` true source labels.
        num_classes: ``K``.
    """
    onehot = _one_hot_preds(preds, num_classes)
    y = _labels(labels, num_classes, "source labels")
    if len(y) != len(onehot):
        raise ValueError(f"{len(onehot)} predictions but {len(y)} labels.")
    if len(y) == 0:
        raise ValueError("no samples: the confusion matrix needs held-out labelled source data.")
    joint = onehot.T @ np.eye(num_classes, dtype=np.float64)[y]
    return joint / len(y)


def predicted_proportions(preds: Any, num_classes: int) -> np.ndarray:
    """``mu[i] = P(f(x) = i)`` over (unlabelled) data, ``(K,)`` float64: the share of hard predictions of each class,
    or the mean predicted probability for ``(N, K)`` probabilities. Takes no labels."""
    onehot = _one_hot_preds(preds, num_classes)
    if len(onehot) == 0:
        raise ValueError("no predictions to count.")
    return onehot.mean(axis=0)


@dataclass(frozen=True)
class LabelShiftEstimate:
    """What :func:`estimate_label_shift` found. All arrays ``(K,)`` float64.

    Attributes:
        q_target: estimated target class proportions (sum 1).
        weights: importance weights ``q_target / source_proportions`` (0 for a class absent from the source
            validation data); ``sum_j p[j] w[j] = 1``.
        source_proportions: ``p``, the column sums of the confusion matrix.
        target_pred_proportions: ``mu``, the classifier's prediction shares on the target.
        condition_number: ``sigma_max / sigma_min`` of the confusion matrix with columns scaled by
            ``1 / sqrt(p_j)`` (over the classes present in the source, the matrix that is inverted); large (say
            > 100 for 10 classes) means the estimate is sensitive to sampling noise.
        truncated: singular directions of ``C`` dropped by ``rcond`` (0 when ``C`` is well conditioned).
    """

    q_target: np.ndarray
    weights: np.ndarray
    source_proportions: np.ndarray
    target_pred_proportions: np.ndarray
    condition_number: float
    truncated: int


def _solve(confusion_joint: Any, target_pred_proportions: Any, rcond: float, ridge: float) -> LabelShiftEstimate:
    C = _array(confusion_joint)
    mu = _array(target_pred_proportions).reshape(-1)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"confusion_joint must be a square (K, K) matrix, got shape {C.shape}.")
    k = C.shape[0]
    if mu.shape != (k,):
        raise ValueError(f"target_pred_proportions must have {k} entries (one per class), got {mu.shape[0]}.")
    for name, a in (("confusion_joint", C), ("target_pred_proportions", mu)):
        if (a < 0).any() or not np.all(np.isfinite(a)) or a.sum() <= 0:
            raise ValueError(f"{name} must be finite, non-negative and not all 0.")
    if rcond < 0 or ridge < 0:
        raise ValueError(f"rcond={rcond} and ridge={ridge} must be >= 0.")
    C, mu = C / C.sum(), mu / mu.sum()  # counts are accepted too
    p = C.sum(axis=0)
    seen = p > 0  # a class absent from the source validation data cannot be estimated: w = q = 0 there
    Cs, root_p = C[:, seen], np.sqrt(p[seen])
    # Solve C w = mu for the deviation from "no shift", d = w - 1: C d = mu - C 1, in the variable e = sqrt(p) d
    # (A e = b with A = C diag(p)^-1/2), so that the minimum-norm / ridge solution minimises
    # sum_j p_j d_j^2 = chi^2(q || p): a direction the data cannot pin down (singular value cut by rcond, or
    # damped by ridge) is resolved as "no shift", and indistinguishable classes keep their source ratio.
    A = Cs / root_p
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    keep = s > rcond * s.max()
    gain = np.zeros_like(s)
    gain[keep] = s[keep] / (s[keep] ** 2 + ridge)
    d = (Vt.T @ (gain * (U.T @ (mu - Cs.sum(axis=1))))) / root_p
    w_seen = np.clip(1.0 + d, 0.0, None)
    q = np.zeros(k)
    q[seen] = w_seen * p[seen]
    if q.sum() <= 0:
        raise ValueError("BBSE clipped every class weight to 0: the target predictions are incompatible with this "
                         "confusion matrix (is it the same classifier on the same classes?).")
    q /= q.sum()
    weights = np.zeros(k)
    weights[seen] = q[seen] / p[seen]
    cond = float(s.max() / s.min()) if s.min() > 0 else float("inf")
    truncated = int((~keep).sum())
    if truncated:
        warnings.warn(f"BBSE: the confusion matrix is (nearly) singular (condition number {cond:.3g}): {truncated} "
                      f"direction(s) with singular value <= rcond * max = {rcond:g} * {s.max():.3g} were taken as "
                      "'no shift' (w = 1 there). The classifier cannot tell some classes apart; their target "
                      "proportions are not identifiable from its predictions.", RuntimeWarning, stacklevel=3)
    return LabelShiftEstimate(q, weights, p, mu, cond, truncated)


def bbse_target_proportions(confusion_joint: Any, target_pred_proportions: Any, *, rcond: float = 1e-6,
                            ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """BBSE: target class proportions and importance weights from ``C w = mu``; returns ``(q_target, weights)``.

    ``w`` solves ``C w = mu`` in the least-squares sense, written as the deviation from no shift
    ``w = 1 + d`` and computed in the variable ``e = sqrt(p) * d`` through the SVD
    ``A = C diag(p)^(-1/2) = U S V^T`` (``p``: the column sums of ``C``, the source class proportions):

    ``e = V diag(s / (s^2 + ridge)) U^T (mu - C 1)``, singular values ``s <= rcond * s_max`` dropped,
    ``d = e / sqrt(p)``,

    i.e. the solution minimising ``sum_j p_j d_j^2`` (the chi-square distance of ``q`` from ``p``) among the
    least-squares ones, with the Tikhonov penalty ``ridge * sum_j p_j (w_j - 1)^2``. Then ``w`` is clipped at
    0 (a negative weight is sampling noise), ``q = w * p`` normalised to sum 1, and the returned weights are
    ``q / p`` (so ``sum_j p[j] w[j] = 1``: the reweighted source loss keeps its scale).

    - Default (``ridge=0``, ``rcond=1e-6``): for an invertible ``C`` this is exactly ``w = C^-1 mu``,
      Lipton et al.'s estimator, consistent at rate ``O(1 / (sigma_min(C) sqrt(n)))``.
    - Ill-conditioned ``C`` (the classifier confuses classes): ``sigma_min`` is small and the noise of
      ``mu`` and ``C`` is amplified by ``1 / sigma_min``. Directions with ``s <= rcond * s_max`` (a singular
      ``C``, e.g. two classes always predicted alike) are not identifiable; they are dropped and resolved
      as *no shift* (``w = 1`` along them, not ``w = 0`` as a minimum-norm ``w`` would give: two classes
      the classifier cannot tell apart get the same weight, their total being estimated), with a
      ``RuntimeWarning`` naming the condition number. ``ridge > 0`` shrinks every weakly determined
      direction toward no shift, in the spirit of RLLS (Azizzadenesheli et al., ICLR 2019); useful with a
      small validation split, e.g. ``ridge`` of the order of ``1 / n_val``. :func:`estimate_label_shift`
      reports the condition number (of ``A``).
    - A class absent from the source validation data (a zero column) cannot be estimated: its ``q`` and
      ``w`` are 0.

    Args:
        confusion_joint: ``C``, ``(K, K)`` (:func:`confusion_matrix`; counts are normalised).
        target_pred_proportions: ``mu``, ``(K,)`` (:func:`predicted_proportions` on target data).
        rcond: relative cut-off of the singular values of ``C``.
        ridge: Tikhonov shrinkage toward ``w = 1``; 0: none.
    """
    est = _solve(confusion_joint, target_pred_proportions, rcond, ridge)
    return est.q_target, est.weights


def bbse_estimate(confusion_joint: Any, target_pred_proportions: Any, *, rcond: float = 1e-6,
                  ridge: float = 0.0) -> LabelShiftEstimate:
    """:func:`bbse_target_proportions` with its diagnostics: the whole :class:`LabelShiftEstimate` (from counts or
    proportions, e.g. the confusion counts and prediction counts a training run accumulates)."""
    return _solve(confusion_joint, target_pred_proportions, rcond, ridge)


def estimate_label_shift(source_preds: Any, source_labels: Any, target_preds: Any, num_classes: int, *,
                         rcond: float = 1e-6, ridge: float = 0.0) -> LabelShiftEstimate:
    """BBSE end to end, from a classifier's predictions: the labelled source validation split and the unlabelled target.

    Args:
        source_preds: predictions (``(N_s,)`` classes or ``(N_s, K)`` probabilities) on held-out labelled source data.
        source_labels: its true labels ``(N_s,)``.
        target_preds: predictions of the same kind on target data ``(N_t,)`` / ``(N_t, K)``: no target labels.
        num_classes: ``K``.
        rcond, ridge: see :func:`bbse_target_proportions`.
    """
    C = confusion_matrix(source_preds, source_labels, num_classes)
    if _array(source_preds).ndim != _array(target_preds).ndim:
        raise ValueError("source_preds and target_preds must be the same kind (both class indices or both probabilities).")
    return _solve(C, predicted_proportions(target_preds, num_classes), rcond, ridge)


def importance_weights(source_preds: Any, source_labels: Any, target_preds: Any, num_classes: int, *,
                       rcond: float = 1e-6, ridge: float = 0.0) -> np.ndarray:
    """BBSE class importance weights ``w[y] = q_target[y] / p_source[y]``, ``(K,)`` float64 (no target labels).

    Multiply the source loss of a sample of class ``y`` by ``w[y]`` (per sample: ``w[y_s]``) to train for the
    target's class proportions, e.g. the source cross-entropy and, for DANN/CDAN, the source half of the
    domain loss. Arguments as :func:`estimate_label_shift`.
    """
    return estimate_label_shift(source_preds, source_labels, target_preds, num_classes, rcond=rcond,
                                ridge=ridge).weights
