"""The fine-tuning regularisers (L2-SP, BSS, DELTA) against slow float64 re-derivations written with explicit
loops and closed forms, and their properties (TLlib ``tllib/regularization`` semantics)."""

import math

import pytest
import torch
from torch.testing import assert_close

from tlframe.losses import (batch_spectral_shrinkage, delta_channel_attention, delta_feature_map_loss, l2_penalty,
                            l2_sp)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def close(got, expected, dtype=torch.float64):
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(got.double() if torch.is_tensor(got) else torch.tensor(got, dtype=torch.float64),
                 torch.tensor(expected, dtype=torch.float64), **tol)


def params(seed, dtype=torch.float64):
    g = gen(seed)
    return [torch.randn(4, 3, 2, 2, generator=g, dtype=dtype), torch.randn(7, generator=g, dtype=dtype),
            torch.randn(5, 6, generator=g, dtype=dtype)]


# --------------------------------------------------------------------------- L2-SP
def slow_l2_sp(ws, w0s):
    total = 0.0
    for w, w0 in zip(ws, w0s):
        for a, b in zip(w.reshape(-1).tolist(), w0.reshape(-1).tolist()):
            total += (a - b) ** 2
    return 0.5 * total


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_l2_sp_is_half_the_squared_distance_to_the_starting_point(dtype):
    w, w0 = params(0, dtype), params(1, dtype)
    got = l2_sp(w, w0)
    assert got.dtype == dtype
    close(got, slow_l2_sp(w, w0), dtype)
    # TLlib SPRegularization: sum_k 0.5 * torch.norm(w_k - w0_k) ** 2
    close(got, sum(0.5 * torch.norm(a - b) ** 2 for a, b in zip(w, w0)).item(), dtype)


def test_l2_sp_is_zero_at_the_start_with_gradient_w_minus_w0():
    w0 = params(2)
    w = [p.clone().requires_grad_(True) for p in w0]
    loss = l2_sp(w, w0)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in w)  # exact, not 0/0
    moved = [(p.detach() + torch.randn(p.shape, generator=gen(3), dtype=p.dtype)).requires_grad_(True) for p in w0]
    l2_sp(moved, w0).backward()
    for p, p0 in zip(moved, w0):
        assert_close(p.grad, p.detach() - p0, rtol=1e-12, atol=1e-12)


def test_l2_sp_gives_no_gradient_to_the_starting_weights_and_checks_shapes():
    w, w0 = params(4), [p.clone().requires_grad_(True) for p in params(5)]
    assert l2_sp(w, w0).grad_fn is None  # w0 is detached inside (and w needs no grad): no graph at all
    with pytest.raises(ValueError, match="shape"):
        l2_sp(w, w0[::-1])
    with pytest.raises(ValueError, match="3 parameters for 2"):
        l2_sp(w, w0[:2])
    assert l2_sp([], []).item() == 0.0


def test_l2_sp_is_float32_under_autocast():
    w, w0 = params(6, torch.float32), params(7, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = l2_sp([p.bfloat16() for p in w], w0)
    assert got.dtype == torch.float32
    close(got, slow_l2_sp([p.bfloat16().float() for p in w], w0), torch.float32)


def test_l2_penalty_is_half_the_squared_norm():
    w = params(8)
    total = 0.5 * sum(v * v for p in w for v in p.reshape(-1).tolist())
    close(l2_penalty(w), total)
    close(l2_penalty(w), l2_sp(w, [torch.zeros_like(p) for p in w]).item())


# --------------------------------------------------------------------------- BSS
def slow_singular_values_squared(f):
    """Eigenvalues of the Gram matrix F F^T (N <= D) or F^T F, built with explicit loops, by Jacobi rotations."""
    rows = f.double().tolist()
    if len(rows) > len(rows[0]):
        rows = [list(col) for col in zip(*rows)]
    n = len(rows)
    a = [[sum(x * y for x, y in zip(rows[i], rows[j])) for j in range(n)] for i in range(n)]
    for _ in range(100):  # cyclic Jacobi eigenvalue algorithm
        off = sum(a[i][j] ** 2 for i in range(n) for j in range(n) if i != j)
        if off < 1e-26:
            break
        for p in range(n):
            for q in range(p + 1, n):
                if abs(a[p][q]) < 1e-300:
                    continue
                theta = (a[q][q] - a[p][p]) / (2 * a[p][q])
                t = math.copysign(1.0, theta) / (abs(theta) + math.sqrt(theta * theta + 1))
                c = 1 / math.sqrt(t * t + 1)
                s = t * c
                for k in range(n):
                    akp, akq = a[k][p], a[k][q]
                    a[k][p], a[k][q] = c * akp - s * akq, s * akp + c * akq
                for k in range(n):
                    apk, aqk = a[p][k], a[q][k]
                    a[p][k], a[q][k] = c * apk - s * aqk, s * apk + c * aqk
    return sorted(a[i][i] for i in range(n))


@pytest.mark.parametrize("shape, k", [((6, 9), 1), ((6, 9), 3), ((10, 4), 2), ((5, 5), 5)])
def test_bss_is_the_sum_of_the_k_smallest_squared_singular_values(shape, k):
    f = torch.randn(*shape, generator=gen(10), dtype=torch.float64)
    got = batch_spectral_shrinkage(f, k)
    close(got, sum(slow_singular_values_squared(f)[:k]))
    # TLlib: u, s, v = torch.svd(feature.t()); sum_i s[num - 1 - i] ** 2
    s = torch.svd(f.t())[1]
    close(got, sum(s[s.numel() - 1 - i] ** 2 for i in range(k)).item())


def test_bss_of_orthogonal_features_is_the_smallest_scales_squared():
    q, _ = torch.linalg.qr(torch.randn(8, 5, generator=gen(11), dtype=torch.float64))  # orthonormal columns
    scales = torch.tensor([3.0, 0.5, 2.0, 0.25, 1.0], dtype=torch.float64)
    f = q * scales  # (8, 5): singular values are exactly the scales
    close(batch_spectral_shrinkage(f, 1), 0.25 ** 2)
    close(batch_spectral_shrinkage(f, 2), 0.25 ** 2 + 0.5 ** 2)
    close(batch_spectral_shrinkage(f, 5), float((scales ** 2).sum()))  # k = rank: ||F||_F^2
    # the gradient of sigma_min^2 is 2 sigma_min u v^T: it shrinks the weakest direction only
    x = f.clone().requires_grad_(True)
    batch_spectral_shrinkage(x, 1).backward()
    u, v = q[:, 3], torch.eye(5, dtype=torch.float64)[3]
    assert_close(x.grad, 2 * 0.25 * torch.outer(u, v), rtol=1e-9, atol=1e-9)


def test_bss_checks_k_and_is_float32_under_autocast():
    f = torch.randn(6, 4, generator=gen(12))
    with pytest.raises(ValueError, match="k <= min"):
        batch_spectral_shrinkage(f, 5)
    with pytest.raises(ValueError, match="k <= min"):
        batch_spectral_shrinkage(f, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = batch_spectral_shrinkage(f.bfloat16(), 2)
    assert got.dtype == torch.float32
    close(got, sum(slow_singular_values_squared(f.bfloat16().float())[:2]), torch.float32)


# --------------------------------------------------------------------------- DELTA
def maps(seed, shapes=((3, 2, 4, 5), (3, 4, 2, 3)), dtype=torch.float64):
    g = gen(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]


def slow_behavioral(student, teacher):
    """TLlib BehavioralRegularization: sum_j 0.5 * ||FM_j(student) - FM_j(teacher)||_F^2."""
    total = 0.0
    for s, t in zip(student, teacher):
        total += 0.5 * sum((a - b) ** 2 for a, b in zip(s.reshape(-1).tolist(), t.reshape(-1).tolist()))
    return total


def slow_attention_behavioral(student, teacher, attention):
    """TLlib AttentionBehavioralRegularization, with explicit loops over batch, channel and positions."""
    total = 0.0
    for s, t, a in zip(student, teacher, attention):
        b, c, h, w = s.shape
        for i in range(b):
            for ch in range(c):
                dist2 = sum((float(s[i, ch, y, x]) - float(t[i, ch, y, x])) ** 2 for y in range(h) for x in range(w))
                total += 0.5 * c * float(a[ch]) * dist2 / (h * w)
    return total


def test_delta_without_attention_is_tllib_behavioral_regularization():
    s, t = maps(20), maps(21)
    close(delta_feature_map_loss(s, t), slow_behavioral(s, t))
    # any (B, ...) shapes: token maps of a ViT block, pooled features
    s3, t3 = maps(22, ((2, 5, 3), (2, 7))), maps(23, ((2, 5, 3), (2, 7)))
    close(delta_feature_map_loss(s3, t3), slow_behavioral(s3, t3))


def test_delta_with_channel_attention_is_tllib_attention_behavioral_regularization():
    s, t = maps(24), maps(25)
    attention = [torch.softmax(torch.randn(c, generator=gen(26 + c), dtype=torch.float64), 0) for c in (2, 4)]
    close(delta_feature_map_loss(s, t, attention), slow_attention_behavioral(s, t, attention))
    # uniform attention = the attention-free value divided by H_j W_j, layer by layer
    uniform = [torch.full((c,), 1.0 / c, dtype=torch.float64) for c in (2, 4)]
    close(delta_feature_map_loss(s, t, uniform),
          sum(slow_behavioral([a], [b]) / (a.shape[2] * a.shape[3]) for a, b in zip(s, t)))


def test_delta_is_zero_when_student_equals_teacher_and_teacher_gets_no_gradient():
    t = maps(27)
    s = [m.clone().requires_grad_(True) for m in t]
    attention = [torch.full((c,), 1.0 / c, dtype=torch.float64) for c in (2, 4)]
    for a in (None, attention):
        loss = delta_feature_map_loss(s, t, a)
        assert loss.item() == 0.0
    teacher = [m.clone().requires_grad_(True) for m in maps(28)]
    delta_feature_map_loss(s, teacher).backward()
    assert all(m.grad is None for m in teacher)  # detached: the starting model is not trained
    for m, m0 in zip(s, teacher):
        assert_close(m.grad, m.detach() - m0.detach(), rtol=1e-12, atol=1e-12)


def test_delta_checks_its_inputs_and_is_float32_under_autocast():
    s, t = maps(29, dtype=torch.float32), maps(30, dtype=torch.float32)
    with pytest.raises(ValueError, match="same non-zero number"):
        delta_feature_map_loss(s, t[:1])
    with pytest.raises(ValueError, match="channels"):
        delta_feature_map_loss(s, t, [torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        delta_feature_map_loss([torch.ones(2, 3)], [torch.zeros(2, 3)], [torch.ones(3)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = delta_feature_map_loss([m.bfloat16() for m in s], t)
    assert got.dtype == torch.float32
    close(got, slow_behavioral([m.bfloat16().float() for m in s], t), torch.float32)


def test_channel_attention_standardises_the_loss_increase_and_takes_a_tempered_softmax():
    inc = torch.tensor([0.3, -0.1, 0.05, 0.9, 0.0], dtype=torch.float64)
    values = inc.tolist()
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # population std (np.std)
    e = [math.exp((v - mean) / std / 5.0) for v in values]
    expected = [v / sum(e) for v in e]
    got = delta_channel_attention(inc)
    close(got, expected)
    close(got.sum(), 1.0)
    assert int(got.argmax()) == 3  # the channel whose removal hurts most weighs most
    close(delta_channel_attention(inc, temperature=1.0), torch.softmax((inc - mean) / std, 0).tolist())
    close(delta_channel_attention(torch.full((4,), 0.2, dtype=torch.float64)), [0.25] * 4)  # no information: uniform
