"""The math of domain adaptation, as pure tensor functions.

Reference semantics are those of the Transfer-Learning-Library (TLlib): DANN, DAN, CDAN, JAN,
MDD, MCC, BSP, AFN and CORAL, and the fine-tuning regularisers of ``tllib/regularization`` (L2-SP,
BSS, DELTA), so that published numbers can be compared; every knowing
difference is an option and documented here. Every loss is computed in float32 (float64 stays
float64), also under autocast, and is vectorised over the batch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

__all__ = [
    "gradient_reverse", "warm_start_coefficient", "domain_adversarial_loss", "mk_mmd", "gaussian_kernel_sum",
    "entropy", "minimum_class_confusion", "multilinear_map", "randomized_multilinear_map", "cdan_entropy_weights",
    "margin_disparity_discrepancy", "joint_mk_mmd", "batch_spectral_penalty", "adaptive_feature_norm", "coral",
    "l2_sp", "l2_penalty", "batch_spectral_shrinkage", "delta_feature_map_loss", "delta_channel_attention",
    "pseudo_label_loss", "consistency_loss", "sigmoid_rampup", "information_maximization", "classifier_discrepancy",
    "mcd_class_balance",
]

#: TLlib's ``entropy`` helper computes ``-sum_c p_c log(p_c + 1e-5)``; its MCC and CDAN+E weights use it.
TLLIB_ENTROPY_EPS = 1e-5


def _loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (bf16/fp16 inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _prob_entropy(p: torch.Tensor, eps: float) -> torch.Tensor:
    """Row entropies ``-sum_c p_c log(p_c + eps)`` of probabilities ``(N, C) -> (N,)``; exact for ``eps=0``."""
    if eps > 0:
        return -(p * torch.log(p + eps)).sum(dim=1)
    return -torch.special.xlogy(p, p).sum(dim=1)


class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def gradient_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer (Ganin & Lempitsky, 2015): identity forward, ``-coeff * grad`` backward.

    Any shape; ``coeff`` is a Python float (compute it from the global step with
    :func:`warm_start_coefficient`).
    """
    return _GradientReverse.apply(x, float(coeff))


def warm_start_coefficient(step: int, max_steps: int = 1000, alpha: float = 1.0, lo: float = 0.0,
                           hi: float = 1.0) -> float:
    """GRL warm-start schedule ``2 (hi - lo) / (1 + exp(-alpha * step / max_steps)) - (hi - lo) + lo``.

    0 at step 0 (for ``lo=0``), about 0.4621 at ``step=max_steps``, 0.7616 at ``2 * max_steps``,
    tending to ``hi``. TLlib's ``WarmStartGradientReverseLayer`` defaults. Pass the trainer's
    ``global_step``: the value is then identical after resume and on every DDP rank.
    """
    return float(2.0 * (hi - lo) / (1.0 + math.exp(-alpha * step / max_steps)) - (hi - lo) + lo)


def domain_adversarial_loss(d_logits_s: torch.Tensor, d_logits_t: torch.Tensor,
                            weight_s: torch.Tensor | None = None,
                            weight_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain discriminator loss on **logits**: ``0.5 * (BCE_mean(d_s, 1) + BCE_mean(d_t, 0))``.

    ``d_logits_s``: ``(N_s,)`` or ``(N_s, 1)``; ``d_logits_t``: ``(N_t,)`` or ``(N_t, 1)``; the
    sizes may differ. Uses ``binary_cross_entropy_with_logits`` (numerically stable, allowed
    under autocast, unlike sigmoid + BCE). Returns ``(loss, accuracy)`` where accuracy is the
    mean of the two per-domain accuracies, a sample counted as source when its logit is >= 0.

    Optional per-sample weights ``weight_s`` ``(N_s,)`` / ``weight_t`` ``(N_t,)`` (any shape with
    that many elements) make each domain's term the weighted mean ``1/N sum_i w_i bce_i`` (TLlib
    ``DomainAdversarialLoss(w_s, w_t)``: ``F.binary_cross_entropy(weight=w, reduction="mean")``);
    they are used as given (not detached here, not renormalised). ``None`` is weight 1. The
    accuracy is never weighted. CDAN+E: weights from :func:`cdan_entropy_weights`; TLlib's CDAN
    takes one weighted mean over the concatenated batch, ``sum_all w_i bce_i / (N_s + N_t)``,
    which equals this 0.5-average when ``N_s == N_t`` (its example scripts' case).
    """
    d_s, d_t = d_logits_s.reshape(-1).float(), d_logits_t.reshape(-1).float()
    w_s = _bce_weight(weight_s, d_s, "weight_s")
    w_t = _bce_weight(weight_t, d_t, "weight_t")
    loss_s = F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s), weight=w_s)
    loss_t = F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t), weight=w_t)
    with torch.no_grad():
        acc = 0.5 * ((d_s >= 0).float().mean() + (d_t < 0).float().mean())
    return 0.5 * (loss_s + loss_t), acc


def _bce_weight(weight: torch.Tensor | None, d: torch.Tensor, name: str) -> torch.Tensor | None:
    if weight is None:
        return None
    if weight.numel() != d.numel():
        raise ValueError(f"{name} has {weight.numel()} elements for {d.numel()} discriminator logits")
    return weight.reshape(-1).to(d.dtype)


def _pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j||^2`` for all pairs, ``(M, D) -> (M, M)``, exact zeros on the diagonal."""
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0)
    return d2 - torch.diag_embed(torch.diagonal(d2))


def gaussian_kernel_sum(x: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """``sum_k exp(-||x_i - x_j||^2 / (2 sigma_k^2))`` for all pairs: ``(M, D) -> (M, M)``.

    ``sigma_k^2 = alpha_k * mean_ij ||x_i - x_j||^2`` over the whole ``M x M`` matrix (diagonal
    included), detached from the graph (TLlib ``GaussianKernel(track_running_stats=True)``).
    """
    d2 = _pairwise_sq_dists(x)
    mean_d2 = d2.detach().mean()
    return sum(torch.exp(-d2 / (2.0 * alpha * mean_d2)) for alpha in alphas)


def mk_mmd(f_s: torch.Tensor, f_t: torch.Tensor, alphas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0),
           linear: bool = False, offset: bool = True) -> torch.Tensor:
    """Multi-kernel MMD^2 between source ``(N, D)`` and target ``(M, D)`` features (DAN, Long et al. 2015).

    Kernels: :func:`gaussian_kernel_sum` over the joint batch ``cat(f_s, f_t)``.

    - ``linear=False``: unbiased quadratic estimator (U-statistic)
      ``mean_{i!=j} k(s_i, s_j) + mean_{i!=j} k(t_i, t_j) - 2 mean_{i,j} k(s_i, t_j)``.
    - ``linear=True``: linear-time estimator over consecutive pairs ``(i, i+1 mod N)``
      ``1/N sum_i [k(s_i, s_i') + k(t_i, t_i') - k(s_i, t_i') - k(s_i', t_i)]`` (needs ``N == M``).
    - ``offset=True`` adds the constant ``2 / (N - 1)`` that TLlib's DAN adds to both
      estimators (it shifts the value, not the gradient); ``offset=False`` gives the textbook
      estimators, whose expectation is 0 when the two distributions are equal.

    Computed in float32 (float64 stays float64), also under autocast. Returns a scalar.
    """
    n, m = f_s.shape[0], f_t.shape[0]
    _check_mmd_sizes("mk_mmd", n, m, linear)
    dtype = torch.float64 if torch.float64 in (f_s.dtype, f_t.dtype) else torch.float32
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        k = gaussian_kernel_sum(torch.cat([f_s, f_t]).to(dtype), alphas)
        return _mmd_from_kernel(k, n, m, linear, offset)


def _check_mmd_sizes(name: str, n: int, m: int, linear: bool) -> None:
    if n < 2 or m < 2:
        raise ValueError(f"{name} needs at least 2 samples per domain, got {n} source and {m} target")
    if linear and n != m:
        raise ValueError(f"the linear-time MMD estimator needs equal batch sizes, got {n} source and {m} target")


def _mmd_from_kernel(k: torch.Tensor, n: int, m: int, linear: bool, offset: bool) -> torch.Tensor:
    """The MMD^2 estimators of :func:`mk_mmd` from the joint ``(n + m, n + m)`` kernel matrix."""
    k_ss, k_tt, k_st = k[:n, :n], k[n:, n:], k[:n, n:]
    if linear:
        nxt = torch.roll(torch.arange(n, device=k.device), -1)
        idx = torch.arange(n, device=k.device)
        value = (k_ss[idx, nxt] + k_tt[idx, nxt] - k_st[idx, nxt] - k_st[nxt, idx]).mean()
    else:
        value = ((k_ss.sum() - k_ss.diagonal().sum()) / (n * (n - 1))
                 + (k_tt.sum() - k_tt.diagonal().sum()) / (m * (m - 1))
                 - 2.0 * k_st.mean())
    return value + 2.0 / (n - 1) if offset else value


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy ``1/N sum_i H(softmax(logits_i))``, ``H(p) = -sum_c p_c log p_c``.

    ``logits``: ``(N, C)``; returns a scalar (entropy minimisation: add ``+ weight * entropy``).
    Exact, from ``log_softmax`` (finite for any finite logits). TLlib's ``entropy`` helper works on
    probabilities with a shift, ``-sum_c p_c log(p_c + 1e-5)`` (smaller by up to about ``C * 1e-5``);
    the MCC and CDAN+E weights below use that shifted form, as TLlib does.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_p = F.log_softmax(logits.to(_loss_dtype(logits)), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1).mean()


def minimum_class_confusion(logits: torch.Tensor, temperature: float = 2.5, *,
                            eps: float = TLLIB_ENTROPY_EPS) -> torch.Tensor:
    """Minimum Class Confusion loss (Jin et al., ECCV 2020; TLlib ``MinimumClassConfusionLoss``).

    ``logits``: target logits ``(N, C)``; returns a scalar in ``[0, (C - 1) / C]``.

    - ``p_i = softmax(logits_i / T)``;
    - ``w_i = 1 + exp(-H(p_i))`` with TLlib's shifted entropy ``H(p) = -sum_c p_c log(p_c + eps)``,
      detached, rescaled to ``N w_i / sum_j w_j`` (the weights sum to ``N``);
    - ``Conf = sum_i w_i p_i p_i^T`` ``(C, C)``, each row divided by its row sum;
    - loss ``(sum(Conf) - trace(Conf)) / C``.

    TLlib writes ``Conf / Conf.sum(dim=1)``, which by broadcasting divides *columns*; ``Conf`` is
    symmetric, so the loss (``1 - sum_c Conf_cc / r_c / C``) is the same function either way.
    ``eps=0`` uses the exact entropy in the weights.
    """
    n, c = logits.shape
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = F.softmax(logits.to(_loss_dtype(logits)) / temperature, dim=1)
        w = 1.0 + torch.exp(-_prob_entropy(p.detach(), eps))
        w = n * w / w.sum()
        conf = (p * w[:, None]).T @ p
        conf = conf / conf.sum(dim=1, keepdim=True)
        return (conf.sum() - torch.trace(conf)) / c


def multilinear_map(f: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """CDAN's multilinear conditioning ``T(f, g) = g (x) f``: ``(N, F), (N, C) -> (N, C * F)``.

    Element ``[n, c * F + j] = probs[n, c] * f[n, j]`` (class-major flattening of the outer
    product, TLlib ``MultiLinearMap``). Pass ``softmax(logits).detach()`` as ``probs`` as CDAN does.
    Computed in float32 (float64 stays float64), also under autocast.
    """
    if f.shape[0] != probs.shape[0]:
        raise ValueError(f"multilinear_map: {f.shape[0]} feature rows for {probs.shape[0]} probability rows")
    with torch.autocast(device_type=f.device.type, enabled=False):
        dtype = _loss_dtype(f, probs)
        return (probs.to(dtype)[:, :, None] * f.to(dtype)[:, None, :]).reshape(f.shape[0], -1)


def randomized_multilinear_map(f: torch.Tensor, probs: torch.Tensor, rf: torch.Tensor,
                               rg: torch.Tensor) -> torch.Tensor:
    """CDAN's randomized multilinear map ``(f @ rf) * (probs @ rg) / sqrt(D)``: ``-> (N, D)``.

    ``f`` ``(N, F)``, ``probs`` ``(N, C)``; ``rf`` ``(F, D)`` and ``rg`` ``(C, D)`` are fixed random
    matrices drawn once (TLlib: standard normal, ``D = 1024``) and kept with the model.
    Computed in float32 (float64 stays float64), also under autocast.
    """
    if rf.shape[1] != rg.shape[1]:
        raise ValueError(f"randomized_multilinear_map: rf has {rf.shape[1]} columns and rg {rg.shape[1]}")
    with torch.autocast(device_type=f.device.type, enabled=False):
        dtype = _loss_dtype(f, probs, rf, rg)
        return (f.to(dtype) @ rf.to(dtype)) * (probs.to(dtype) @ rg.to(dtype)) / math.sqrt(rf.shape[1])


def cdan_entropy_weights(probs_s: torch.Tensor, probs_t: torch.Tensor, *,
                         eps: float = TLLIB_ENTROPY_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """CDAN+E entropy conditioning: per-sample weights ``(N_s,), (N_t,)`` for :func:`domain_adversarial_loss`.

    ``w_i = 1 + exp(-H(p_i))`` on the concatenated batch, ``H(p) = -sum_c p_c log(p_c + eps)``
    (TLlib's shifted entropy), detached, then ``w * (N_s + N_t) / sum(w)``: the weights of both
    domains *together* sum to ``N_s + N_t`` (TLlib ``ConditionalDomainAdversarialLoss``).
    ``probs``: softmax probabilities ``(N, C)``. Confident samples weigh more (up to 2 before the
    rescaling). ``eps=0`` uses the exact entropy.
    """
    n_s = probs_s.shape[0]
    with torch.autocast(device_type=probs_s.device.type, enabled=False):
        p = torch.cat([probs_s, probs_t]).detach().to(_loss_dtype(probs_s, probs_t))
        w = 1.0 + torch.exp(-_prob_entropy(p, eps))
        w = w / w.sum() * p.shape[0]
        return w[:n_s], w[n_s:]


def margin_disparity_discrepancy(logits_s: torch.Tensor, logits_s_adv: torch.Tensor, logits_t: torch.Tensor,
                                 logits_t_adv: torch.Tensor, margin: float = 4.0) -> torch.Tensor:
    """Margin Disparity Discrepancy for classification (Zhang et al., ICML 2019; TLlib
    ``ClassificationMarginDisparityDiscrepancy``, ``reduction="mean"``).

    With ``a_s = argmax(logits_s)``, ``a_t = argmax(logits_t)`` (no gradient) and the adversarial
    head's logits ``(N_s, C)`` / ``(N_t, C)``::

        mdd = mean_i[-margin * CE(logits_s_adv_i, a_s_i)]
              + mean_j[log(min(1 - softmax(logits_t_adv_j)[a_t_j] + 1e-6, 1))]

    Sign convention (TLlib's example): the training loss is ``cls - trade_off * mdd``, with the
    adversarial head behind a gradient reversal, so the head maximises ``mdd`` and the features
    minimise it. TLlib averages ``source_i + target_i`` elementwise, which needs ``N_s == N_t``
    and then equals the sum of the two means taken here; the two means also allow ``N_s != N_t``.
    """
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        dtype = _loss_dtype(logits_s_adv, logits_t_adv)
        a_s = logits_s.detach().argmax(dim=1)
        a_t = logits_t.detach().argmax(dim=1)
        source = -margin * F.cross_entropy(logits_s_adv.to(dtype), a_s)
        p_t = F.softmax(logits_t_adv.to(dtype), dim=1).gather(1, a_t[:, None]).squeeze(1)
        target = torch.log(torch.clamp(1.0 - p_t + 1e-6, max=1.0)).mean()
        return source + target


def joint_mk_mmd(f_s: torch.Tensor, f_t: torch.Tensor, probs_s: torch.Tensor, probs_t: torch.Tensor,
                 alphas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0), prob_sigma: float = 0.92,
                 linear: bool = False, offset: bool = True) -> torch.Tensor:
    """Joint MMD^2 of JAN (Long et al., ICML 2017; TLlib ``JointMultipleKernelMaximumMeanDiscrepancy``).

    ``f_s`` ``(N, D)``, ``f_t`` ``(M, D)``, ``probs_s`` ``(N, C)``, ``probs_t`` ``(M, C)`` (softmax
    probabilities, not detached in TLlib's example). Joint kernel on the concatenated batch::

        k((f, p), (f', p')) = gaussian_kernel_sum(f, alphas) * exp(-||p - p'||^2 / (2 prob_sigma^2))

    the feature bandwidths as :func:`mk_mmd` (``alpha * mean ||f_i - f_j||^2``, detached), the
    probability kernel with the fixed ``sigma = 0.92`` (TLlib ``GaussianKernel(sigma=0.92,
    track_running_stats=False)``). Estimators (``linear``) and the ``2 / (N - 1)`` ``offset`` exactly
    as :func:`mk_mmd`, which it equals when all probabilities are equal. Returns a scalar.
    """
    n, m = f_s.shape[0], f_t.shape[0]
    _check_mmd_sizes("joint_mk_mmd", n, m, linear)
    if probs_s.shape[0] != n or probs_t.shape[0] != m:
        raise ValueError(f"joint_mk_mmd: probabilities have {probs_s.shape[0]} and {probs_t.shape[0]} rows, "
                         f"features {n} and {m}")
    dtype = _loss_dtype(f_s, f_t, probs_s, probs_t)
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        k = gaussian_kernel_sum(torch.cat([f_s, f_t]).to(dtype), alphas)
        d2_p = _pairwise_sq_dists(torch.cat([probs_s, probs_t]).to(dtype))
        k = k * torch.exp(-d2_p / (2.0 * prob_sigma * prob_sigma))
        return _mmd_from_kernel(k, n, m, linear, offset)


def batch_spectral_penalty(f_s: torch.Tensor, f_t: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Batch Spectral Penalization (Chen et al., ICML 2019; TLlib ``BatchSpectralPenalizationLoss``).

    ``sum_{i<=k} sigma_i(f_s)^2 + sum_{i<=k} sigma_i(f_t)^2``, the k largest singular values of
    each domain's raw (uncentred) feature matrix ``(N, D)``. TLlib hard-codes ``k = 1``.
    """
    if k < 1:
        raise ValueError(f"batch_spectral_penalty needs k >= 1, got {k}")
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        dtype = _loss_dtype(f_s, f_t)
        sv_s = torch.linalg.svdvals(f_s.to(dtype))
        sv_t = torch.linalg.svdvals(f_t.to(dtype))
        return (sv_s[:k] ** 2).sum() + (sv_t[:k] ** 2).sum()


def adaptive_feature_norm(f: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Stepwise Adaptive Feature Norm (Xu et al., ICCV 2019; TLlib ``AdaptiveFeatureNorm``).

    ``mean_i (||f_i|| - (||f_i||.detach() + delta))^2`` for features ``(N, D)`` (L2 norm over
    dim 1). The value is always ``delta^2``; the gradient ``-2 delta / N * f_i / ||f_i||`` makes a
    descent step grow every norm. Apply to each domain's features (TLlib sums the two).
    """
    with torch.autocast(device_type=f.device.type, enabled=False):
        norm = torch.linalg.vector_norm(f.to(_loss_dtype(f)), ord=2, dim=1)
        return ((norm - (norm.detach() + delta)) ** 2).mean()


def coral(f_s: torch.Tensor, f_t: torch.Tensor, scale: str = "tllib") -> torch.Tensor:
    """Deep CORAL (Sun & Saenko, ECCV 2016 workshops) between ``f_s`` ``(N, D)`` and ``f_t`` ``(M, D)``.

    Unbiased covariances ``C = (f - mean)^T (f - mean) / (n - 1)`` of each domain.

    - ``scale="tllib"`` (TLlib ``CorrelationAlignmentLoss``, as its code computes it):
      ``mean_j (mu_s - mu_t)_j^2 + mean_jk (C_s - C_t)_jk^2``, i.e. a mean term plus
      ``||C_s - C_t||_F^2 / D^2`` (TLlib's docstring states the paper's formula; its code does this).
    - ``scale="paper"``: the paper's ``||C_s - C_t||_F^2 / (4 D^2)``, covariances only, a quarter of
      TLlib's covariance term.
    """
    if scale not in ("tllib", "paper"):
        raise ValueError(f"coral: scale must be 'tllib' or 'paper', got {scale!r}")
    n, m = f_s.shape[0], f_t.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"coral needs at least 2 samples per domain, got {n} source and {m} target")
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        dtype = _loss_dtype(f_s, f_t)
        xs, xt = f_s.to(dtype), f_t.to(dtype)
        mean_s, mean_t = xs.mean(dim=0, keepdim=True), xt.mean(dim=0, keepdim=True)
        cs, ct = xs - mean_s, xt - mean_t
        cov_diff = cs.T @ cs / (n - 1) - ct.T @ ct / (m - 1)
        if scale == "paper":
            d = xs.shape[1]
            return (cov_diff ** 2).sum() / (4.0 * d * d)
        return ((mean_s - mean_t) ** 2).mean() + (cov_diff ** 2).mean()


# --------------------------------------------------------------------------- fine-tuning regularisers
def l2_sp(params: Sequence[torch.Tensor], source_params: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2-SP, the starting-point penalty (Li, Grandvalet and Davoine, ICML 2018; TLlib ``SPRegularization``).

    ``0.5 * sum_k ||w_k - w0_k||^2`` (squared Frobenius norms, summed over the tensors ``k``, no mean), for
    ``params`` ``w_k`` of any shapes and the starting weights ``source_params`` ``w0_k`` of the same shapes,
    in the same order. The gradient w.r.t. ``w_k`` is ``w_k - w0_k``; ``w0`` gets none (use buffers or
    detached tensors). TLlib writes ``0.5 * torch.norm(w - w0) ** 2`` per tensor: the same value, and here the
    gradient is also exact at ``w == w0`` (0, where a norm's gradient is 0/0). The paper's penalty is
    ``alpha/2 ||w - w0||^2``: multiply by ``alpha``. Computed in float32 (float64 stays float64), also under
    autocast. Returns a scalar (0 for empty lists).
    """
    params, source_params = list(params), list(source_params)
    if len(params) != len(source_params):
        raise ValueError(f"l2_sp: {len(params)} parameters for {len(source_params)} starting weights")
    for i, (w, w0) in enumerate(zip(params, source_params)):
        if w.shape != w0.shape:
            raise ValueError(f"l2_sp: parameter {i} has shape {tuple(w.shape)}, its starting weights {tuple(w0.shape)}")
    dtype = _loss_dtype(*params, *source_params)
    if not params:
        return torch.zeros((), dtype=dtype)
    with torch.autocast(device_type=params[0].device.type, enabled=False):
        total = torch.zeros((), dtype=dtype, device=params[0].device)
        for w, w0 in zip(params, source_params):
            d = w.to(dtype) - w0.detach().to(dtype)
            total = total + (d * d).sum()
        return 0.5 * total


def l2_penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``0.5 * sum_k ||w_k||^2`` (TLlib ``L2Regularization``): L2-SP's and DELTA's penalty on the new head
    (weight ``beta``), i.e. :func:`l2_sp` towards zero. Float32 (float64 stays float64); scalar."""
    params = list(params)
    dtype = _loss_dtype(*params)
    if not params:
        return torch.zeros((), dtype=dtype)
    with torch.autocast(device_type=params[0].device.type, enabled=False):
        total = torch.zeros((), dtype=dtype, device=params[0].device)
        for w in params:
            w = w.to(dtype)
            total = total + (w * w).sum()
        return 0.5 * total


def batch_spectral_shrinkage(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Batch Spectral Shrinkage (Chen et al., NeurIPS 2019; TLlib ``BatchSpectralShrinkage``).

    ``sum_{i=1..k} sigma_{-i}^2``: the squares of the ``k`` *smallest* singular values of the batch feature
    matrix ``features`` ``(N, D)`` (raw, not centred; ``min(N, D)`` singular values). Shrinking them
    suppresses the weak spectral components, which the paper links to negative transfer and
    catastrophic forgetting in fine-tuning. TLlib takes ``svd(features.T)``: the same singular values.
    TLlib's example weight is ``0.001`` with ``k = 1``. Needs ``1 <= k <= min(N, D)`` (TLlib would wrap
    around to the largest values). Float32 (float64 stays float64), also under autocast; scalar.
    """
    if features.ndim != 2:
        raise ValueError(f"batch_spectral_shrinkage: features must be (N, D), got shape {tuple(features.shape)}")
    if not 1 <= k <= min(features.shape):
        raise ValueError(f"batch_spectral_shrinkage needs 1 <= k <= min(N, D) = {min(features.shape)}, got k={k}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        sv = torch.linalg.svdvals(features.to(_loss_dtype(features)))  # descending
        return (sv[-k:] ** 2).sum()


def delta_feature_map_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                           attention: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """DELTA's behavioural (feature-map) regulariser (Li et al., ICLR 2019), TLlib's two variants.

    ``student[j]`` / ``teacher[j]``: the feature maps of layer ``j`` of the model being fine-tuned and of
    the frozen starting model on the same images, ``(B, C_j, H_j, W_j)`` (the teacher's are detached here).

    - ``attention=None`` (TLlib ``BehavioralRegularization``)::

          sum_j 0.5 * ||FM_j(student) - FM_j(teacher)||_F^2

      summed over batch, channels and positions (no mean); any shapes ``(B, ...)``.
    - ``attention[j]`` ``(C_j,)``, channel weights summing to 1 (:func:`delta_channel_attention`; TLlib
      ``AttentionBehavioralRegularization``)::

          sum_j 0.5 * sum_{b, c} C_j * a_{j,c} * ||FM_{j,b,c}(student) - FM_{j,b,c}(teacher)||^2 / (H_j W_j)

      (``||.||`` over the ``H_j W_j`` positions): uniform weights ``a = 1/C`` give the attention-free value
      divided by ``H_j W_j``, so the two variants want different weights, as in TLlib.

    Both sum over the batch (the value grows with the batch size), as TLlib does. Float32 (float64 stays
    float64), also under autocast; scalar.
    """
    student, teacher = list(student), list(teacher)
    if len(student) != len(teacher) or not student:
        raise ValueError(f"delta_feature_map_loss: {len(student)} student and {len(teacher)} teacher feature maps "
                         "(need the same non-zero number)")
    if attention is not None and len(attention) != len(student):
        raise ValueError(f"delta_feature_map_loss: {len(attention)} attention vectors for {len(student)} layers")
    with torch.autocast(device_type=student[0].device.type, enabled=False):
        dtype = _loss_dtype(*student, *teacher)
        total = torch.zeros((), dtype=dtype, device=student[0].device)
        for j, (s, t) in enumerate(zip(student, teacher)):
            if s.shape != t.shape:
                raise ValueError(f"delta_feature_map_loss: layer {j}: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
            d = s.to(dtype) - t.detach().to(dtype)
            if attention is None:
                total = total + 0.5 * (d * d).sum()
                continue
            if d.ndim != 4:
                raise ValueError(f"delta_feature_map_loss: channel attention needs (B, C, H, W) maps; layer {j} "
                                 f"has shape {tuple(d.shape)}")
            b, c, h, w = d.shape
            a = attention[j].to(device=d.device, dtype=dtype).reshape(-1)
            if a.numel() != c:
                raise ValueError(f"delta_feature_map_loss: layer {j} has {c} channels, its attention {a.numel()}")
            per_channel = (d * d).sum(dim=(2, 3))  # (B, C): ||FM_bc(student) - FM_bc(teacher)||^2
            total = total + 0.5 * (c * a * per_channel / (h * w)).sum()
        return total


def delta_channel_attention(loss_increase: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """DELTA's channel attention of one layer from the loss increase when each channel is removed.

    ``loss_increase`` ``(C,)``: ``L(model without channel c) - L(model)`` of the starting model (with a
    classifier for the task) on labelled batches. Standardised (``(x - mean) / std``, population std) and
    ``softmax(z / temperature)`` (TLlib's example: ``temperature = 5``): ``(C,)`` weights summing to 1, a
    channel whose removal hurts more weighs more. All-equal increases give uniform weights ``1/C``.
    Float32 (float64 stays float64).
    """
    x = loss_increase.reshape(-1).to(_loss_dtype(loss_increase))
    std = x.std(unbiased=False) if x.numel() > 1 else x.new_zeros(())
    z = (x - x.mean()) / std if float(std) > 0 else torch.zeros_like(x)
    return torch.softmax(z / temperature, dim=0)


def pseudo_label_loss(logits_strong: torch.Tensor, logits_weak: torch.Tensor, threshold: float = 0.95,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled loss (Sohn et al., NeurIPS 2020, eq. 4):
    ``1/N sum_i 1[max_c q_ic >= threshold] CE(logits_strong_i, argmax_c q_ic)`` with
    ``q = softmax(logits_weak / temperature)``, no gradient through ``q``.

    ``logits_strong``, ``logits_weak``: ``(N, C)``, the strong and the weak view of the same ``N`` images. The
    mean runs over all ``N`` rows (masked rows count as 0), as the paper's ``1 / (mu B)``. Returns
    ``(loss, mask (N,) bool, pseudo_labels (N,))``. Float32 inside under autocast.
    """
    if logits_strong.shape != logits_weak.shape or logits_strong.ndim != 2:
        raise ValueError(f"pseudo_label_loss: logits {tuple(logits_strong.shape)} (strong) and "
                         f"{tuple(logits_weak.shape)} (weak) must both be (N, C)")
    with torch.autocast(device_type=logits_strong.device.type, enabled=False):
        dtype = _loss_dtype(logits_strong, logits_weak)
        q = torch.softmax(logits_weak.detach().to(dtype) / temperature, dim=1)
        confidence, pseudo = q.max(dim=1)
        mask = confidence >= threshold
        ce = F.cross_entropy(logits_strong.to(dtype), pseudo, reduction="none")
        return (ce * mask.to(dtype)).mean(), mask, pseudo


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "mse",
                     threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Teacher's consistency cost between the student's and the (EMA) teacher's predictions
    (Tarvainen & Valpola, NeurIPS 2017), no gradient through the teacher.

    With ``p = softmax(student_logits)``, ``q = softmax(teacher_logits)`` ``(N, C)``:

    - ``kind="mse"``: ``1/N sum_i 1/C ||p_i - q_i||^2`` (their ``softmax_mse_loss / C``, per image);
    - ``kind="kl"``: ``1/N sum_i KL(q_i || p_i)``.

    ``threshold``: count only rows whose teacher confidence ``max_c q_ic`` is at least this (French et al.,
    ICLR 2018, self-ensembling for domain adaptation); the mean still runs over all ``N`` rows. Returns
    ``(loss, mask (N,) bool)``. Float32 inside under autocast.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"consistency_loss: logits {tuple(student_logits.shape)} (student) and "
                         f"{tuple(teacher_logits.shape)} (teacher) must both be (N, C)")
    if kind not in ("mse", "kl"):
        raise ValueError(f"consistency_loss: kind={kind!r} must be 'mse' or 'kl'")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        dtype = _loss_dtype(student_logits, teacher_logits)
        log_p = F.log_softmax(student_logits.to(dtype), dim=1)
        log_q = F.log_softmax(teacher_logits.detach().to(dtype), dim=1)
        q = log_q.exp()
        if kind == "mse":
            per_row = ((log_p.exp() - q) ** 2).mean(dim=1)
        else:
            per_row = (q * (log_q - log_p)).sum(dim=1)
        mask = torch.ones_like(per_row, dtype=torch.bool) if threshold is None else q.max(dim=1).values >= threshold
        return (per_row * mask.to(dtype)).mean(), mask


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """Mean Teacher's consistency-weight ramp-up ``exp(-5 (1 - t)^2)``, ``t = min(step / rampup_steps, 1)``
    (Laine & Aila, ICLR 2017; Tarvainen & Valpola 2017); 1 throughout when ``rampup_steps == 0``."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step, 0) / rampup_steps, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def information_maximization(logits: torch.Tensor, eps: float = 1e-5, diversity_weight: float = 1.0) -> torch.Tensor:
    """SHOT's information maximisation loss (Liang et al., ICML 2020, eq. 2; ``Entropy`` of its code):
    ``1/N sum_i H(p_i) - diversity_weight * H(mean_i p_i)`` with ``p = softmax(logits)`` ``(N, C)`` and
    ``H(p) = -sum_c p_c log(p_c + eps)``: confident predictions (first term) that still cover every class
    (second). Float32 inside under autocast; a scalar."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.softmax(logits.to(_loss_dtype(logits)), dim=1)
        return _prob_entropy(p, eps).mean() - diversity_weight * _prob_entropy(p.mean(dim=0, keepdim=True), eps)[0]


def classifier_discrepancy(probs_1: torch.Tensor, probs_2: torch.Tensor) -> torch.Tensor:
    """MCD's discrepancy of two classifiers (Saito et al., CVPR 2018, eq. 1; TLlib ``classifier_discrepancy``):
    ``1/(N K) sum_i sum_k |p1_ik - p2_ik|`` for probabilities ``(N, K)`` (softmax outputs). Float32 inside."""
    if probs_1.shape != probs_2.shape or probs_1.ndim != 2:
        raise ValueError(f"classifier_discrepancy: {tuple(probs_1.shape)} and {tuple(probs_2.shape)} must both be (N, K)")
    with torch.autocast(device_type=probs_1.device.type, enabled=False):
        dtype = _loss_dtype(probs_1, probs_2)
        return (probs_1.to(dtype) - probs_2.to(dtype)).abs().mean()


def mcd_class_balance(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The target term of TLlib's MCD script (``tllib/alignment/mcd.py`` ``entropy``, weighted by
    ``--trade-off-entropy``): ``-(1/K) sum_k log(mean_i p_ik + eps)`` for probabilities ``(N, K) -> ()``.

    Despite TLlib's name it is **not** the prediction entropy: it is the cross-entropy of the uniform distribution
    against the batch's mean prediction. Minimising it spreads the batch's predictions over all classes (minimum
    ``-log(1/K + eps) ~ log K`` when every class gets the same mean probability; large when the batch collapses onto
    a few classes), it does not make single predictions confident. Float32 inside (float64 stays float64)."""
    if probs.ndim != 2:
        raise ValueError(f"mcd_class_balance: probabilities must be (N, K), got {tuple(probs.shape)}")
    with torch.autocast(device_type=probs.device.type, enabled=False):
        mean = probs.to(_loss_dtype(probs)).mean(dim=0)
        return -torch.log(mean + eps).mean()


# =========================================================================== domain generalisation (DomainBed)
# The penalties of DomainBed's algorithms (Gulrajani & Lopez-Paz, ICLR 2021, ``domainbed/algorithms.py``) and
# MixStyle's feature-statistics mixing, used by :mod:`tlframe.strategies.domain_generalization`. Same conventions
# as above: pure functions, float32 inside (float64 stays float64), also under autocast.

__all__ += ["DOMAINBED_MMD_GAMMAS", "coral_domainbed", "gaussian_mmd_domainbed", "irm_penalty", "vrex_penalty",
            "group_dro_weights", "mixstyle"]

#: DomainBed's ``AbstractMMD.gaussian_kernel`` bandwidths: ``k(a, b) = sum_g exp(-g ||a - b||^2)``.
DOMAINBED_MMD_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def coral_domainbed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DomainBed's ``CORAL`` distance between the features of two domains, ``x (n, D)`` and ``y (m, D)``::

        mean_j (mu_x - mu_y)_j^2 + mean_jk (C_x - C_y)_jk^2,    C = (f - mu)^T (f - mu) / (rows - 1)

    (``AbstractMMD.mmd`` with ``gaussian=False``: unbiased covariances, both terms averaged over their entries).
    This is the formula of :func:`coral` with ``scale="tllib"``; needs ``n, m >= 2``. A scalar.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"coral_domainbed: features {tuple(x.shape)} and {tuple(y.shape)} must be (n, D) and (m, D)")
    return coral(x, y, scale="tllib")


def _domainbed_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DomainBed's ``my_cdist``: squared distances ``||a_i||^2 + ||b_j||^2 - 2 <a_i, b_j>`` ``(n, m)``, clamped
    below at ``1e-30`` (so the diagonal of ``a`` against itself is ``1e-30`` up to rounding, never negative)."""
    sq_a = (a * a).sum(dim=1, keepdim=True)
    sq_b = (b * b).sum(dim=1, keepdim=True)
    return (sq_a + sq_b.T - 2.0 * (a @ b.T)).clamp_min(1e-30)


def gaussian_mmd_domainbed(x: torch.Tensor, y: torch.Tensor,
                           gammas: Sequence[float] = DOMAINBED_MMD_GAMMAS) -> torch.Tensor:
    """DomainBed's ``MMD`` distance (biased MMD^2 with a sum of Gaussian kernels) between ``x (n, D)`` and ``y (m, D)``::

        k(a, b) = sum_g exp(-g * d(a, b)),   d = max(||a - b||^2, 1e-30)
        MMD^2   = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)

    with fixed bandwidths ``gammas`` (DomainBed: 0.001 ... 1000, :data:`DOMAINBED_MMD_GAMMAS`; no data-driven
    bandwidth, unlike :func:`mk_mmd`). Means include the diagonals (the V-statistic). ``n, m >= 1``. A scalar.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"gaussian_mmd_domainbed: features {tuple(x.shape)} and {tuple(y.shape)} must be (n, D) "
                         "and (m, D)")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError(f"gaussian_mmd_domainbed needs at least one row per domain, got {x.shape[0]} and {y.shape[0]}")
    if not gammas:
        raise ValueError("gaussian_mmd_domainbed: gammas must name at least one bandwidth")
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = _loss_dtype(x, y)
        a, b = x.to(dtype), y.to(dtype)

        def kernel_mean(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            d = _domainbed_sq_dists(u, v)
            return sum(torch.exp(-float(g) * d) for g in gammas).mean()

        return kernel_mean(a, a) + kernel_mean(b, b) - 2.0 * kernel_mean(a, b)


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IRMv1's penalty of one domain (Arjovsky et al. 2019; DomainBed ``IRM._irm_penalty``), ``(N, C), (N,) -> ()``.

    With a dummy classifier scale ``w`` at 1, ``g_k = d/dw CE(w * logits[k::2], y[k::2])`` on the even (k=0) and
    odd (k=1) rows, and the penalty is ``g_0 * g_1`` (an unbiased estimate of the squared gradient norm). Computed
    in closed form, ``d/dw CE(w z, y)|_{w=1} = mean_i (sum_c softmax(z_i)_c z_ic - z_{i y_i})``, which is what the
    reference's double backward through the dummy scale evaluates; the result stays differentiable in ``logits``.
    Needs ``N >= 2``.
    """
    if logits.ndim != 2 or y.shape != logits.shape[:1]:
        raise ValueError(f"irm_penalty: logits {tuple(logits.shape)} and labels {tuple(y.shape)} must be (N, C) and (N,)")
    if logits.shape[0] < 2:
        raise ValueError(f"irm_penalty needs at least 2 rows (one per half), got {logits.shape[0]}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(_loss_dtype(logits))

        def scale_grad(zk: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
            expected = (torch.softmax(zk, dim=1) * zk).sum(dim=1)
            return (expected - zk.gather(1, yk[:, None]).squeeze(1)).mean()

        return scale_grad(z[0::2], y[0::2]) * scale_grad(z[1::2], y[1::2])


def vrex_penalty(losses: torch.Tensor) -> torch.Tensor:
    """V-REx's penalty (Krueger et al., ICML 2021; DomainBed ``VREx``): the variance of the per-domain risks,
    ``mean_m (L_m - mean(L))^2`` (population variance), ``(M,) -> ()``; 0 for one domain."""
    if losses.ndim != 1 or losses.numel() < 1:
        raise ValueError(f"vrex_penalty: losses must be a non-empty vector (M,), got shape {tuple(losses.shape)}")
    with torch.autocast(device_type=losses.device.type, enabled=False):
        risks = losses.to(_loss_dtype(losses))
        return ((risks - risks.mean()) ** 2).mean()


def group_dro_weights(q: torch.Tensor, losses: torch.Tensor, eta: float) -> torch.Tensor:
    """Group DRO's exponentiated-gradient step on the group weights (Sagawa et al., ICLR 2020, Algorithm 1;
    DomainBed ``GroupDRO``): ``q'_m = q_m exp(eta L_m) / sum_k q_k exp(eta L_k)``, ``(M,), (M,) -> (M,)``.

    Pure (returns the new weights); the losses are detached. A group whose loss is given as 0 keeps its
    unnormalised weight (how :class:`~tlframe.strategies.GroupDRO` skips a domain without rows in a batch).
    Computed as ``q exp(eta L - max(eta L))`` before the normalisation: the same value without overflow.
    """
    if q.ndim != 1 or q.shape != losses.shape:
        raise ValueError(f"group_dro_weights: q {tuple(q.shape)} and losses {tuple(losses.shape)} must be the same (M,)")
    with torch.autocast(device_type=q.device.type, enabled=False):
        dtype = _loss_dtype(q, losses)
        step = float(eta) * losses.detach().to(dtype)
        new = q.detach().to(dtype) * torch.exp(step - step.max())
        return new / new.sum()


def mixstyle(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MixStyle (Zhou et al., ICLR 2021): re-style feature maps ``x (N, C, H, W)`` with mixed instance statistics.

    ``mu, sig``: per-sample, per-channel mean and ``sqrt(var + eps)`` over ``H, W`` (unbiased variance, as the
    reference code), both detached; ``lam (N,)`` mixing weights (``Beta(alpha, alpha)`` draws), ``perm (N,)`` the
    partner of each row::

        mu_mix  = lam mu  + (1 - lam) mu[perm]
        sig_mix = lam sig + (1 - lam) sig[perm]
        out     = (x - mu) / sig * sig_mix + mu_mix

    Computed in float32 (float64 stays float64) and returned in ``x``'s dtype; needs ``H * W >= 2``.
    """
    if x.ndim != 4:
        raise ValueError(f"mixstyle: x must be feature maps (N, C, H, W), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if lam.shape != (n,) or perm.shape != (n,):
        raise ValueError(f"mixstyle: lam {tuple(lam.shape)} and perm {tuple(perm.shape)} must both be ({n},)")
    if x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"mixstyle needs at least 2 spatial positions per map, got {tuple(x.shape[2:])}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = _loss_dtype(x)
        xf = x.to(dtype)
        mu = xf.mean(dim=(2, 3), keepdim=True).detach()
        sig = (xf.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
        w = lam.to(device=x.device, dtype=dtype).view(n, 1, 1, 1)
        idx = perm.to(device=x.device, dtype=torch.long)
        mu_mix = w * mu + (1.0 - w) * mu[idx]
        sig_mix = w * sig + (1.0 - w) * sig[idx]
        return ((xf - mu) / sig * sig_mix + mu_mix).to(x.dtype)
