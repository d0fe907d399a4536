"""The math of domain adaptation, as pure tensor functions.

Reference semantics are those of the Transfer-Learning-Library (TLlib) DANN and DAN
implementations, so that published numbers can be compared; every knowing difference is an
option and documented here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.nn import functional as F

__all__ = ["gradient_reverse", "warm_start_coefficient", "domain_adversarial_loss", "mk_mmd", "gaussian_kernel_sum"]


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


def domain_adversarial_loss(d_logits_s: torch.Tensor, d_logits_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain discriminator loss on **logits**: ``0.5 * (BCE_mean(d_s, 1) + BCE_mean(d_t, 0))``.

    ``d_logits_s``: ``(N_s,)`` or ``(N_s, 1)``; ``d_logits_t``: ``(N_t,)`` or ``(N_t, 1)``; the
    sizes may differ. Uses ``binary_cross_entropy_with_logits`` (numerically stable, allowed
    under autocast, unlike sigmoid + BCE). Returns ``(loss, accuracy)`` where accuracy is the
    mean of the two per-domain accuracies, a sample counted as source when its logit is >= 0.
    """
    d_s, d_t = d_logits_s.reshape(-1).float(), d_logits_t.reshape(-1).float()
    loss_s = F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s))
    loss_t = F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t))
    with torch.no_grad():
        acc = 0.5 * ((d_s >= 0).float().mean() + (d_t < 0).float().mean())
    return 0.5 * (loss_s + loss_t), acc


def gaussian_kernel_sum(x: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """``sum_k exp(-||x_i - x_j||^2 / (2 sigma_k^2))`` for all pairs: ``(M, D) -> (M, M)``.

    ``sigma_k^2 = alpha_k * mean_ij ||x_i - x_j||^2`` over the whole ``M x M`` matrix (diagonal
    included), detached from the graph (TLlib ``GaussianKernel(track_running_stats=True)``).
    """
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0)
    d2 = d2 - torch.diag_embed(torch.diagonal(d2))  # exact zeros on the diagonal
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
    if n < 2 or m < 2:
        raise ValueError(f"mk_mmd needs at least 2 samples per domain, got {n} source and {m} target")
    if linear and n != m:
        raise ValueError(f"the linear-time MMD estimator needs equal batch sizes, got {n} source and {m} target")
    dtype = torch.float64 if torch.float64 in (f_s.dtype, f_t.dtype) else torch.float32
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        k = gaussian_kernel_sum(torch.cat([f_s, f_t]).to(dtype), alphas)
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
