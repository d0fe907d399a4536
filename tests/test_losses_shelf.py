"""The method-shelf losses (CDAN, JAN, MCC, MDD, BSP, AFN, CORAL, entropy) against slow float64
re-derivations written with explicit loops, closed forms and properties."""

import math

import pytest
import torch
from torch.testing import assert_close

from tests.test_losses import slow_estimator

from tlframe.losses import (adaptive_feature_norm, batch_spectral_penalty, cdan_entropy_weights, coral,
                            domain_adversarial_loss, entropy, joint_mk_mmd, margin_disparity_discrepancy,
                            minimum_class_confusion, mk_mmd, multilinear_map, randomized_multilinear_map)

ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rows(t):
    return [[float(v) for v in row] for row in t.double()]


def slow_softmax(row):
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def slow_entropy(p, eps=0.0):
    return -sum(v * math.log(v + eps) for v in p if v > 0 or eps > 0)


def close(got, expected, dtype=torch.float64):
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_close(got.double() if torch.is_tensor(got) else torch.tensor(got, dtype=torch.float64),
                 torch.tensor(expected, dtype=torch.float64), **tol)


# ---------------------------------------------------------------- entropy


def test_entropy_matches_slow_and_closed_forms():
    logits = torch.randn(6, 5, generator=gen(0), dtype=torch.float64) * 3
    expected = sum(slow_entropy(slow_softmax(r)) for r in rows(logits)) / 6
    close(entropy(logits), expected)
    close(entropy(logits.float()), expected, torch.float32)
    close(entropy(torch.zeros(3, 7)), math.log(7), torch.float32)
    confident = entropy(torch.tensor([[1000.0, 0.0, 0.0], [0.0, -1000.0, 1000.0]]))
    assert torch.isfinite(confident) and float(confident) < 1e-6


# ---------------------------------------------------------------- MCC


def slow_mcc(logits, temperature, eps=1e-5):
    n, c = logits.shape
    p = [slow_softmax([v / temperature for v in r]) for r in rows(logits)]
    w = [1 + math.exp(-slow_entropy(pi, eps)) for pi in p]
    w = [n * wi / sum(w) for wi in w]
    conf = [[sum(w[i] * p[i][a] * p[i][b] for i in range(n)) for b in range(c)] for a in range(c)]
    conf = [[conf[a][b] / sum(conf[a]) for b in range(c)] for a in range(c)]
    return (sum(map(sum, conf)) - sum(conf[a][a] for a in range(c))) / c


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mcc_matches_slow(temperature, dtype):
    logits = torch.randn(9, 4, generator=gen(1), dtype=dtype) * 2
    got = minimum_class_confusion(logits, temperature)
    assert got.dtype == dtype
    close(got, slow_mcc(logits, temperature), dtype)
    close(minimum_class_confusion(logits, temperature, eps=0.0), slow_mcc(logits, temperature, eps=0.0), dtype)


def test_mcc_closed_forms():
    # confident predictions covering every class: no confusion
    labels = torch.tensor([0, 1, 2, 3, 2, 0])
    one_hot = torch.nn.functional.one_hot(labels, 4).double() * 300.0
    assert float(minimum_class_confusion(one_hot)) == pytest.approx(0.0, abs=1e-10)
    # identical predictions: every normalised row is p, so the loss is (C - 1) / C whatever p is
    same = torch.tensor([[0.3, -1.2, 2.0, 0.7, 0.1]], dtype=torch.float64).repeat(7, 1)
    assert float(minimum_class_confusion(same)) == pytest.approx(4 / 5, abs=1e-12)


# ---------------------------------------------------------------- CDAN maps and weights


def test_multilinear_map_layout():
    f = torch.randn(3, 4, generator=gen(2), dtype=torch.float64)
    p = torch.softmax(torch.randn(3, 5, generator=gen(3), dtype=torch.float64), 1)
    out = multilinear_map(f, p)
    assert out.shape == (3, 5 * 4) and out.dtype == torch.float64
    for n in range(3):
        for c in range(5):
            for j in range(4):
                assert float(out[n, c * 4 + j]) == float(p[n, c] * f[n, j])


def test_randomized_multilinear_map_matches_explicit_formula():
    g = gen(4)
    f, p = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.rand(3, 2, generator=g, dtype=torch.float64)
    rf, rg = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    out = randomized_multilinear_map(f, p, rf, rg)
    assert out.shape == (3, 6)
    expected = [[sum(float(f[n, k] * rf[k, d]) for k in range(4)) * sum(float(p[n, c] * rg[c, d]) for c in range(2))
                 / math.sqrt(6) for d in range(6)] for n in range(3)]
    close(out, expected)


def test_cdan_entropy_weights_match_slow_and_sum():
    g = gen(5)
    logits_s = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    logits_t = torch.randn(6, 3, generator=g, dtype=torch.float64) * 3
    p_s, p_t = torch.softmax(logits_s, 1).requires_grad_(), torch.softmax(logits_t, 1)
    w_s, w_t = cdan_entropy_weights(p_s, p_t)
    assert not w_s.requires_grad and w_s.shape == (4,) and w_t.shape == (6,)
    raw = [1 + math.exp(-slow_entropy(r, 1e-5)) for r in rows(torch.cat([p_s.detach(), p_t]))]
    expected = [10 * v / sum(raw) for v in raw]
    close(torch.cat([w_s, w_t]), expected)
    assert float(w_s.sum() + w_t.sum()) == pytest.approx(10.0)
    # a confident sample weighs more than an uncertain one
    w_s, w_t = cdan_entropy_weights(torch.tensor([[0.98, 0.01, 0.01]]), torch.tensor([[1 / 3, 1 / 3, 1 / 3]]))
    assert float(w_s[0]) > float(w_t[0]) and float(w_s[0] + w_t[0]) == pytest.approx(2.0)


# ---------------------------------------------------------------- weighted domain adversarial loss


def slow_weighted_bce(d_s, d_t, w_s, w_t):
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    ls = sum(w * -math.log(sig(z)) for z, w in zip(d_s, w_s)) / len(d_s)
    lt = sum(w * -math.log(1 - sig(z)) for z, w in zip(d_t, w_t)) / len(d_t)
    return 0.5 * (ls + lt)


def test_domain_adversarial_loss_weights():
    g = gen(6)
    d_s, d_t = torch.randn(5, 1, generator=g), torch.randn(7, generator=g)
    w_s, w_t = torch.rand(5, generator=g) * 2, torch.rand(7, 1, generator=g) * 2
    plain, acc = domain_adversarial_loss(d_s, d_t)
    ones, acc1 = domain_adversarial_loss(d_s, d_t, torch.ones(5), torch.ones(7))
    assert_close(ones, plain) and torch.equal(acc, acc1)
    loss, acc2 = domain_adversarial_loss(d_s, d_t, w_s, w_t)
    assert torch.equal(acc, acc2)
    expected = slow_weighted_bce(d_s.flatten().tolist(), d_t.tolist(), w_s.tolist(), w_t.flatten().tolist())
    close(loss, expected, torch.float32)
    only_s, _ = domain_adversarial_loss(d_s, d_t, weight_s=w_s)
    close(only_s, slow_weighted_bce(d_s.flatten().tolist(), d_t.tolist(), w_s.tolist(), [1.0] * 7), torch.float32)
    with pytest.raises(ValueError, match="weight_t"):
        domain_adversarial_loss(d_s, d_t, w_s, torch.ones(3))


def test_cdan_e_equals_tllib_single_weighted_mean_for_equal_batches():
    g = gen(7)
    d = torch.randn(12, 1, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(12, 4, generator=g, dtype=torch.float64) * 2, 1)
    w_s, w_t = cdan_entropy_weights(probs[:6], probs[6:])
    loss, _ = domain_adversarial_loss(d[:6], d[6:], w_s, w_t)
    # TLlib: one binary_cross_entropy(sigmoid(d), labels, weight=w, reduction="mean") on the joint batch
    labels = torch.cat([torch.ones(6, 1), torch.zeros(6, 1)]).double()
    ref = torch.nn.functional.binary_cross_entropy(torch.sigmoid(d), labels, torch.cat([w_s, w_t])[:, None])
    close(loss, float(ref), torch.float32)


# ---------------------------------------------------------------- MDD


def slow_mdd(ys, ys_adv, yt, yt_adv, margin):
    src = []
    for y, ya in zip(rows(ys), rows(ys_adv)):
        a = y.index(max(y))
        src.append(-margin * -math.log(slow_softmax(ya)[a]))
    tgt = []
    for y, ya in zip(rows(yt), rows(yt_adv)):
        a = y.index(max(y))
        tgt.append(math.log(min(1 - slow_softmax(ya)[a] + 1e-6, 1.0)))
    return sum(src) / len(src) + sum(tgt) / len(tgt)


@pytest.mark.parametrize("ns, nt", [(6, 6), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mdd_matches_slow(ns, nt, dtype):
    g = gen(8)
    ys, ys_adv = torch.randn(ns, 5, generator=g, dtype=dtype), torch.randn(ns, 5, generator=g, dtype=dtype)
    yt, yt_adv = torch.randn(nt, 5, generator=g, dtype=dtype), torch.randn(nt, 5, generator=g, dtype=dtype) * 3
    got = margin_disparity_discrepancy(ys, ys_adv, yt, yt_adv, margin=3.0)
    assert got.dtype == dtype
    close(got, slow_mdd(ys, ys_adv, yt, yt_adv, 3.0), dtype)


def test_mdd_closed_form_and_clamp_and_no_gradient_through_argmax():
    ys = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    yt = torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    got = margin_disparity_discrepancy(ys, zeros, yt, zeros)
    assert float(got.detach()) == pytest.approx(-4 * math.log(2) + math.log(0.5 + 1e-6), abs=1e-12)
    got.backward()
    assert ys.grad is None and yt.grad is None and zeros.grad is not None
    # adversarial head sure the target is *not* the predicted class: the shifted log is clamped to 0
    t_part = margin_disparity_discrepancy(ys.detach(), torch.tensor([[0.0, 0.0]]).double(), yt.detach(),
                                          torch.tensor([[0.0, -200.0]]).double(), margin=0.0)
    assert float(t_part) == 0.0


# ---------------------------------------------------------------- JAN


def slow_joint_kernel(f, p, alphas, sigma):
    m = f.shape[0]
    fr, pr = rows(f), rows(p)
    d2 = [[sum((a - b) ** 2 for a, b in zip(fr[i], fr[j])) for j in range(m)] for i in range(m)]
    mean = sum(map(sum, d2)) / (m * m)
    k = [[0.0] * m for _ in range(m)]
    for i in range(m):
        for j in range(m):
            kf = sum(math.exp(-d2[i][j] / (2 * a * mean)) for a in alphas)
            kp = math.exp(-sum((a - b) ** 2 for a, b in zip(pr[i], pr[j])) / (2 * sigma * sigma))
            k[i][j] = kf * kp
    return k


@pytest.mark.parametrize("linear, ns, nt", [(False, 6, 6), (True, 6, 6), (False, 4, 7)])
@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_joint_mk_mmd_matches_slow(linear, ns, nt, offset, dtype):
    g = gen(9)
    f_s, f_t = torch.randn(ns, 5, generator=g, dtype=dtype), torch.randn(nt, 5, generator=g, dtype=dtype) + 0.5
    p_s = torch.softmax(torch.randn(ns, 3, generator=g, dtype=dtype) * 2, 1)
    p_t = torch.softmax(torch.randn(nt, 3, generator=g, dtype=dtype) * 2, 1)
    got = joint_mk_mmd(f_s, f_t, p_s, p_t, ALPHAS, linear=linear, offset=offset)
    assert got.dtype == dtype
    k = slow_joint_kernel(torch.cat([f_s, f_t]), torch.cat([p_s, p_t]), ALPHAS, 0.92)
    close(got, slow_estimator(k, ns, nt, linear, offset), dtype)


@pytest.mark.parametrize("linear", [False, True])
def test_joint_mk_mmd_equals_mk_mmd_when_probabilities_carry_no_information(linear):
    g = gen(10)
    f_s, f_t = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    same = torch.softmax(torch.randn(1, 3, generator=g, dtype=torch.float64), 1)
    ref = mk_mmd(f_s, f_t, ALPHAS, linear=linear)
    assert_close(joint_mk_mmd(f_s, f_t, same.expand(8, 3), same.expand(8, 3), linear=linear), ref)
    # probability kernel identically ~1 (a huge bandwidth): the same value
    p_s, p_t = torch.softmax(torch.randn(8, 3, generator=g), 1), torch.softmax(torch.randn(8, 3, generator=g), 1)
    assert_close(joint_mk_mmd(f_s, f_t, p_s.double(), p_t.double(), prob_sigma=1e6, linear=linear), ref)
    with pytest.raises(ValueError, match="rows"):
        joint_mk_mmd(f_s, f_t, p_s[:5], p_t)


# ---------------------------------------------------------------- BSP


def slow_gram(f):
    r = rows(f)
    d = len(r[0])
    return torch.tensor([[sum(row[a] * row[b] for row in r) for b in range(d)] for a in range(d)], dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_batch_spectral_penalty_matches_eigenvalues_of_the_gram_matrix(k):
    g = gen(11)
    f_s = torch.randn(7, 4, generator=g, dtype=torch.float64)
    f_t = torch.randn(5, 4, generator=g, dtype=torch.float64) + 1
    # sigma_i(F)^2 are the eigenvalues of F^T F
    expected = sum(float(torch.linalg.eigvalsh(slow_gram(x)).flip(0)[:k].sum()) for x in (f_s, f_t))
    close(batch_spectral_penalty(f_s, f_t, k), expected)
    close(batch_spectral_penalty(f_s.float(), f_t.float(), k), expected, torch.float32)


def test_batch_spectral_penalty_orthogonal_features_gives_squared_norms():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(12), dtype=torch.float64))
    f_s = q[:3] * torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)[:, None]  # orthogonal rows, norms 3, 1, 2
    f_t = q[3:5] * torch.tensor([0.5, 1.5], dtype=torch.float64)[:, None]
    close(batch_spectral_penalty(f_s, f_t, 1), 9.0 + 2.25)
    close(batch_spectral_penalty(f_s, f_t, 2), 9.0 + 4.0 + 2.25 + 0.25)
    close(batch_spectral_penalty(f_s, f_t, 10), 14.0 + 2.5)


# ---------------------------------------------------------------- AFN


@pytest.mark.parametrize("delta", [1.0, 0.3])
def test_adaptive_feature_norm_value_and_gradient(delta):
    f = torch.randn(5, 4, generator=gen(13), dtype=torch.float64, requires_grad=True)
    loss = adaptive_feature_norm(f, delta)
    slow = sum((math.sqrt(sum(v * v for v in r)) - (math.sqrt(sum(v * v for v in r)) + delta)) ** 2
               for r in rows(f.detach())) / 5
    close(loss, slow)
    close(loss, delta ** 2)
    (grad,) = torch.autograd.grad(loss, f)
    norms = f.detach().norm(dim=1, keepdim=True)
    assert_close(grad, -2 * delta / 5 * f.detach() / norms)
    stepped = f.detach() - 0.1 * grad
    assert bool((stepped.norm(dim=1) > norms.squeeze(1)).all())


# ---------------------------------------------------------------- CORAL


def slow_coral(f_s, f_t, scale):
    def stats(f):
        r = rows(f)
        n, d = len(r), len(r[0])
        mu = [sum(row[j] for row in r) / n for j in range(d)]
        cov = [[sum((row[a] - mu[a]) * (row[b] - mu[b]) for row in r) / (n - 1) for b in range(d)] for a in range(d)]
        return mu, cov

    (mu_s, c_s), (mu_t, c_t) = stats(f_s), stats(f_t)
    d = len(mu_s)
    fro = sum((c_s[a][b] - c_t[a][b]) ** 2 for a in range(d) for b in range(d))
    if scale == "paper":
        return fro / (4 * d * d)
    return sum((a - b) ** 2 for a, b in zip(mu_s, mu_t)) / d + fro / (d * d)


@pytest.mark.parametrize("scale", ["tllib", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coral_matches_slow(scale, dtype):
    g = gen(14)
    f_s, f_t = torch.randn(8, 3, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype) * 2 + 1
    got = coral(f_s, f_t, scale)
    assert got.dtype == dtype
    close(got, slow_coral(f_s, f_t, scale), dtype)


def test_coral_zero_for_identical_and_scale_relation():
    g = gen(15)
    f = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert float(coral(f, f.clone())) == 0.0 and float(coral(f, f.clone(), "paper")) == 0.0
    # same means: TLlib's value is 4 times the paper's
    f_t = torch.randn(9, 4, generator=g, dtype=torch.float64)
    f_t = f_t - f_t.mean(0) + f.mean(0)
    close(coral(f, f_t), 4 * float(coral(f, f_t, "paper")))
    with pytest.raises(ValueError, match="scale"):
        coral(f, f_t, "both")


# ---------------------------------------------------------------- autocast and gradients


def all_losses(f_s, f_t, y_s, y_t, y_s_adv, y_t_adv, d):
    p_s, p_t = torch.softmax(y_s, 1), torch.softmax(y_t, 1)
    rf, rg = torch.ones(f_s.shape[1], 8), torch.ones(y_s.shape[1], 8)
    h = multilinear_map(torch.cat([f_s, f_t]), torch.cat([p_s, p_t]).detach())
    h_r = randomized_multilinear_map(torch.cat([f_s, f_t]), torch.cat([p_s, p_t]).detach(), rf, rg)
    n = f_s.shape[0]
    logits = d(h)
    w_s, w_t = cdan_entropy_weights(p_s, p_t)
    return {
        "entropy": entropy(y_t),
        "mcc": minimum_class_confusion(y_t),
        "cdan_e": domain_adversarial_loss(logits[:n], logits[n:], w_s, w_t)[0],
        "rmap": h_r.pow(2).mean(),
        "mdd": margin_disparity_discrepancy(y_s, y_s_adv, y_t, y_t_adv),
        "jan": joint_mk_mmd(f_s, f_t, p_s, p_t),
        "bsp": batch_spectral_penalty(f_s, f_t),
        "afn": adaptive_feature_norm(f_s) + adaptive_feature_norm(f_t),
        "coral": coral(f_s, f_t),
    }


def make_inputs(dtype=torch.float32):
    g = gen(16)
    return [torch.randn(8, 6, generator=g, dtype=dtype, requires_grad=True) for _ in range(2)] + \
        [torch.randn(8, 4, generator=g, dtype=dtype, requires_grad=True) for _ in range(4)]


def test_losses_are_float32_and_finite_under_bf16_autocast():
    inputs = make_inputs()
    d = torch.nn.Linear(24, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = all_losses(*[x.bfloat16() for x in inputs], d)
        f, p = inputs[0].bfloat16(), inputs[2].bfloat16()
        maps = [multilinear_map(f, p), randomized_multilinear_map(f, p, torch.ones(6, 8), torch.ones(4, 8))]
    for name, v in values.items():
        assert v.dtype == torch.float32 and bool(torch.isfinite(v)), name
    assert all(m.dtype == torch.float32 for m in maps)


def test_gradients_flow_through_every_loss():
    inputs = make_inputs()
    d = torch.nn.Linear(24, 1)
    values = all_losses(*inputs, d)
    f_s, f_t, y_s, y_t, y_s_adv, y_t_adv = inputs
    wrt = {"entropy": [y_t], "mcc": [y_t], "cdan_e": [f_s, f_t, d.weight], "rmap": [f_s], "mdd": [y_s_adv, y_t_adv],
           "jan": [f_s, f_t, y_s, y_t], "bsp": [f_s, f_t], "afn": [f_s, f_t], "coral": [f_s, f_t]}
    for name, v in values.items():
        grads = torch.autograd.grad(v, wrt[name], retain_graph=True)
        for grad in grads:
            assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, name
