"""The DA math against slow, independent float64 implementations and closed-form values."""

import math

import pytest
import torch

from tlframe.losses import domain_adversarial_loss, gradient_reverse, mk_mmd, warm_start_coefficient

ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)


def slow_kernel_matrix(x, alphas):
    m = x.shape[0]
    d2 = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(m)] for i in range(m)]
    mean = sum(map(sum, d2)) / (m * m)
    return [[sum(math.exp(-d2[i][j] / (2 * a * mean)) for a in alphas) for j in range(m)] for i in range(m)]


def slow_estimator(k, n, m, linear, offset):
    """The MMD estimators over a kernel matrix ``k`` of the joint batch (n source rows first, then m target)."""
    if linear:
        v = 0.0
        for i in range(n):
            j = (i + 1) % n
            v += k[i][j] + k[n + i][n + j] - k[i][n + j] - k[j][n + i]
        v /= n
    else:
        ss = sum(k[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        tt = sum(k[n + i][n + j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        st = sum(k[i][n + j] for i in range(n) for j in range(m)) / (n * m)
        v = ss + tt - 2 * st
    return v + (2.0 / (n - 1) if offset else 0.0)


def slow_mmd(s, t, alphas, linear, offset):
    k = slow_kernel_matrix(torch.cat([s, t]).double(), alphas)
    return slow_estimator(k, s.shape[0], t.shape[0], linear, offset)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (1000, 0.46211715726), (2000, 0.76159415595)])
def test_warm_start_coefficient_closed_form(step, expected):
    assert warm_start_coefficient(step) == pytest.approx(expected, abs=1e-9)


def test_warm_start_coefficient_general_formula():
    step, max_steps, alpha, lo, hi = 370, 500, 10.0, 0.2, 0.9
    expected = 2 * (hi - lo) / (1 + math.exp(-alpha * step / max_steps)) - (hi - lo) + lo
    assert warm_start_coefficient(step, max_steps, alpha, lo, hi) == pytest.approx(expected)
    assert warm_start_coefficient(0, lo=0.2, hi=0.9) == pytest.approx(0.2)
    assert warm_start_coefficient(10**9) == pytest.approx(1.0)


def test_gradient_reverse_flips_and_scales_the_gradient():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64)
    (gradient_reverse(x, 0.37) * w).sum().backward()
    assert torch.allclose(x.grad, -0.37 * w.expand(5, 3))
    y = gradient_reverse(x, 0.37)
    assert torch.equal(y, x)


@pytest.mark.parametrize("ns, nt", [(6, 6), (4, 9)])
def test_domain_adversarial_loss_matches_slow_bce(ns, nt):
    g = torch.Generator().manual_seed(0)
    d_s, d_t = torch.randn(ns, 1, generator=g, dtype=torch.float64), torch.randn(nt, generator=g, dtype=torch.float64)
    loss, acc = domain_adversarial_loss(d_s, d_t)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    bce_s = sum(-math.log(sig(float(z))) for z in d_s.flatten()) / ns
    bce_t = sum(-math.log(1 - sig(float(z))) for z in d_t) / nt
    assert float(loss) == pytest.approx(0.5 * (bce_s + bce_t), rel=1e-6)
    acc_s = sum(float(z) >= 0 for z in d_s.flatten()) / ns
    acc_t = sum(float(z) < 0 for z in d_t) / nt
    assert float(acc) == pytest.approx(0.5 * (acc_s + acc_t))


def test_domain_adversarial_loss_at_zero_logits_is_log2_and_extreme_logits_are_finite():
    loss, _ = domain_adversarial_loss(torch.zeros(4), torch.zeros(4))
    assert float(loss) == pytest.approx(math.log(2))
    loss, acc = domain_adversarial_loss(torch.full((3,), 200.0), torch.full((3,), -200.0))
    assert torch.isfinite(loss) and float(loss) < 1e-6 and float(acc) == 1.0


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mk_mmd_matches_slow_reference(linear, offset, dtype):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(7, 5, generator=g, dtype=dtype)
    t = torch.randn(7, 5, generator=g, dtype=dtype) + 0.7
    got = mk_mmd(s, t, ALPHAS, linear=linear, offset=offset)
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert float(got) == pytest.approx(slow_mmd(s, t, ALPHAS, linear, offset), abs=tol)


def test_mk_mmd_unequal_batches_quadratic_and_linear_error():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    assert float(mk_mmd(s, t, offset=False)) == pytest.approx(slow_mmd(s, t, ALPHAS, False, False), abs=1e-10)
    with pytest.raises(ValueError, match="equal batch sizes"):
        mk_mmd(s, t, linear=True)


def test_mk_mmd_offset_value_and_gradient_detached_bandwidth():
    s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64)
    with_offset = mk_mmd(s, t)
    without = mk_mmd(s, t, offset=False)
    assert float((with_offset - without).detach()) == pytest.approx(2 / 5)
    # the bandwidth is detached: the gradient equals the one of the kernel with sigma held fixed
    (grad,) = torch.autograd.grad(without, s)

    def fixed_sigma_mmd(s_):
        x = torch.cat([s_, t])
        d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
        mean = float(((torch.cat([s, t]).detach()[:, None] - torch.cat([s, t]).detach()[None]) ** 2).sum(-1).mean())
        k = sum(torch.exp(-d2 / (2 * a * mean)) for a in ALPHAS)
        n = 6
        off = ~torch.eye(n, dtype=torch.bool)
        return k[:n, :n][off].mean() + k[n:, n:][off].mean() - 2 * k[:n, n:].mean()

    (ref,) = torch.autograd.grad(fixed_sigma_mmd(s), s)
    assert torch.allclose(grad, ref, atol=1e-10)


def test_mk_mmd_near_zero_for_same_distribution_and_large_for_shifted():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    same = float(mk_mmd(a, b, offset=False))
    shifted = float(mk_mmd(a, b + 2.0, offset=False))
    assert abs(same) < 0.05 and shifted > 1.0


def test_losses_are_autocast_safe_on_cpu_bf16():
    s, t = torch.randn(8, 16), torch.randn(8, 16)
    d = torch.nn.Linear(16, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, acc = domain_adversarial_loss(d(s), d(t))
        mmd = mk_mmd(s.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert mmd.dtype == torch.float32 and torch.isfinite(mmd)
