"""Domain generalisation (DomainBed's ERM, CORAL, MMD, IRM, V-REx, GroupDRO, DANN/CDANN; MixStyle).

The pure functions of :mod:`tlframe.losses` against slow float64 re-derivations written with loops; each strategy's
loss on a hand-made multi-domain :class:`TransferStep` (rows of three domains interleaved, ``d_s`` set) against the
formula applied domain by domain; one-domain steps (penalties 0), empty domains, the IRM/V-REx anneal switch and
optimizer reset, GroupDRO's weights over steps and through a state-dict round trip, MixStyle's hooks (train/eval,
statistics, deepcopy, pickling, stage resolution) and DomainAdversarial's alternating updates (which parameters each
moves), on a harness and in a short Lightning fit.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch.nn import functional as F

from conftest import make_synthetic_dm, make_trainer
from tlframe.checks import ConfigError
from tlframe.losses import (DOMAINBED_MMD_GAMMAS, coral_domainbed, gaussian_mmd_domainbed, group_dro_weights,
                            irm_penalty, mixstyle, vrex_penalty)
from tlframe.module import TransferModule
from tlframe.strategies.base import Progress, TransferStep
from tlframe.strategies.domain_generalization import (ERM, DomainAdversarial, DomainCORAL, DomainMMD, GroupDRO, IRM,
                                                      MixStyle, MixStyleHook, VREx, feature_stage, feature_stages)
from tlframe.strategies.finetune import FineTune

C, Z, FEAT = 4, 6, 5  # classes, backbone feature width, bottleneck width
DOMAINS = (0, 1, 2, 0, 2, 1, 0, 2, 2, 1, 0, 2)  # the domain of each row: 4, 3 and 5 rows, interleaved


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows_of(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t.detach().double()]


def approx(got, expected, rel=1e-9, abs=1e-11):
    return pytest.approx(expected, rel=rel, abs=abs) == float(got.detach() if torch.is_tensor(got) else got)


# ----------------------------------------------------------------------------- slow re-derivations (float64 loops)
def slow_ce(row: list[float], y: int) -> float:
    top = max(row)
    return math.log(sum(math.exp(v - top) for v in row)) + top - row[y]


def slow_mean(xs):
    return sum(xs) / len(xs)


def slow_coral(a: list[list[float]], b: list[list[float]]) -> float:
    d = len(a[0])

    def stats(x):
        n = len(x)
        mu = [sum(r[j] for r in x) / n for j in range(d)]
        cov = [[sum((r[j] - mu[j]) * (r[k] - mu[k]) for r in x) / (n - 1) for k in range(d)] for j in range(d)]
        return mu, cov

    (mu_a, c_a), (mu_b, c_b) = stats(a), stats(b)
    mean_term = sum((mu_a[j] - mu_b[j]) ** 2 for j in range(d)) / d
    cov_term = sum((c_a[j][k] - c_b[j][k]) ** 2 for j in range(d) for k in range(d)) / (d * d)
    return mean_term + cov_term


def slow_mmd(a, b, gammas=DOMAINBED_MMD_GAMMAS) -> float:
    def k(u, v):
        d2 = max(sum((ui - vi) ** 2 for ui, vi in zip(u, v)), 1e-30)
        return sum(math.exp(-g * d2) for g in gammas)

    def mean_k(x, y):
        return sum(k(u, v) for u in x for v in y) / (len(x) * len(y))

    return mean_k(a, a) + mean_k(b, b) - 2 * mean_k(a, b)


def reference_irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DomainBed's ``_irm_penalty``: gradients through a dummy scale (double backward), float64."""
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    g1 = torch.autograd.grad(F.cross_entropy(logits[::2] * scale, y[::2]), [scale], create_graph=True)[0]
    g2 = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
    return g1 * g2


# ----------------------------------------------------------------------------- pure functions
def test_coral_domainbed_matches_slow_loops():
    a = torch.randn(7, 4, generator=gen(0), dtype=torch.float64)
    b = torch.randn(5, 4, generator=gen(1), dtype=torch.float64) * 2 + 1
    assert approx(coral_domainbed(a, b), slow_coral(rows_of(a), rows_of(b)))
    assert approx(coral_domainbed(a.float(), b.float()), slow_coral(rows_of(a), rows_of(b)), rel=1e-5, abs=1e-6)
    assert float(coral_domainbed(a, a)) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        coral_domainbed(a[:1], b)


def test_gaussian_mmd_domainbed_matches_slow_loops():
    a = torch.randn(6, 3, generator=gen(2), dtype=torch.float64) * 0.3
    b = torch.randn(4, 3, generator=gen(3), dtype=torch.float64) * 0.3 + 0.2
    assert approx(gaussian_mmd_domainbed(a, b), slow_mmd(rows_of(a), rows_of(b)))
    assert approx(gaussian_mmd_domainbed(a, b, (0.5, 2.0)), slow_mmd(rows_of(a), rows_of(b), (0.5, 2.0)))
    assert approx(gaussian_mmd_domainbed(a.float(), b.float()), slow_mmd(rows_of(a), rows_of(b)), rel=1e-4, abs=1e-5)
    assert abs(float(gaussian_mmd_domainbed(a, a))) < 1e-12
    assert approx(gaussian_mmd_domainbed(a[:1], b[:1]), slow_mmd(rows_of(a[:1]), rows_of(b[:1])))  # one row each


def test_irm_penalty_is_domainbeds_dummy_scale_penalty_value_and_gradient():
    logits = (torch.randn(7, C, generator=gen(4), dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, C, (7,), generator=gen(5))
    got, ref = irm_penalty(logits, y), reference_irm_penalty(logits, y)
    assert approx(got, float(ref.detach()))
    (g_got,), (g_ref,) = torch.autograd.grad(got, [logits]), torch.autograd.grad(ref, [logits])
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
    # closed form on a loop: d/dw CE(w z, y) at w = 1 is sum_c softmax(z)_c z_c - z_y, averaged over each half
    z = rows_of(logits)

    def half(k):
        vals = []
        for i in range(k, 7, 2):
            e = [math.exp(v - max(z[i])) for v in z[i]]
            vals.append(sum(ei * zi for ei, zi in zip(e, z[i])) / sum(e) - z[i][int(y[i])])
        return slow_mean(vals)

    assert approx(got, half(0) * half(1))
    assert approx(irm_penalty(logits.float(), y), half(0) * half(1), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        irm_penalty(logits[:1], y[:1])


def test_vrex_penalty_is_the_population_variance():
    losses = torch.tensor([0.3, 1.7, 0.9, 2.2], dtype=torch.float64)
    m = slow_mean(losses.tolist())
    assert approx(vrex_penalty(losses), slow_mean([(v - m) ** 2 for v in losses.tolist()]))
    assert float(vrex_penalty(losses[:1])) == 0.0


def test_group_dro_weights_follow_the_exponentiated_gradient_over_steps():
    q, eta = torch.ones(3, dtype=torch.float64), 0.5
    slow = [1.0, 1.0, 1.0]
    for losses in ([0.2, 1.5, 0.7], [3.0, 0.1, 0.0], [0.4, 0.4, 2.5]):
        q = group_dro_weights(q, torch.tensor(losses, dtype=torch.float64), eta)
        slow = [s * math.exp(eta * l) for s, l in zip(slow, losses)]
        slow = [s / sum(slow) for s in slow]
        torch.testing.assert_close(q, torch.tensor(slow, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert float(q.sum()) == pytest.approx(1.0)
    big = group_dro_weights(torch.full((2,), 0.5), torch.tensor([1e4, 0.0]), 1.0)  # no overflow
    assert torch.isfinite(big).all() and float(big[0]) == pytest.approx(1.0)


def test_mixstyle_matches_slow_per_channel_statistics():
    x = torch.randn(3, 2, 3, 4, generator=gen(6), dtype=torch.float64) * 2 + 1
    lam, perm, eps = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64), torch.tensor([2, 0, 1]), 1e-6
    got = mixstyle(x, lam, perm, eps)

    def stats(n, c):
        vals = [float(v) for v in x[n, c].reshape(-1)]
        mu = slow_mean(vals)
        return mu, math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1) + eps)

    for n in range(3):
        for c in range(2):
            (mu, sig), (mu2, sig2) = stats(n, c), stats(int(perm[n]), c)
            l = float(lam[n])
            mu_mix, sig_mix = l * mu + (1 - l) * mu2, l * sig + (1 - l) * sig2
            for h in range(3):
                for w in range(4):
                    assert approx(got[n, c, h, w], (float(x[n, c, h, w]) - mu) / sig * sig_mix + mu_mix)
    assert torch.equal(mixstyle(x, torch.ones(3, dtype=torch.float64), perm, eps), mixstyle(x, torch.ones(3), perm, eps))
    torch.testing.assert_close(mixstyle(x, torch.ones(3, dtype=torch.float64), perm, eps), x, rtol=1e-6, atol=1e-6)
    assert mixstyle(x.float(), lam.float(), perm).dtype == torch.float32


# ----------------------------------------------------------------------------- strategies on hand-made steps
def attach(strategy, backbone: str = "lenet") -> TransferModule:
    return TransferModule(backbone, num_classes=C, bottleneck_dim=FEAT, strategy=strategy)


def multi_step(seed: int = 0, domains=DOMAINS, num_domains: int = 3, step: int = 0) -> TransferStep:
    g = gen(seed)
    n = len(DOMAINS) if domains is None else len(domains)  # None: one domain (d_s unset)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    return TransferStep(z_s=leaf(n, Z), f_s=leaf(n, FEAT), logits_s=leaf(n, C),
                        y_s=torch.randint(0, C, (n,), generator=g), progress=Progress(step, 0, None),
                        d_s=None if domains is None else torch.tensor(domains),
                        num_source_domains=1 if domains is None else num_domains)


def slow_domain_rows(step: TransferStep) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, d in enumerate(step.d_s.tolist()):
        out.setdefault(d, []).append(i)
    return dict(sorted(out.items()))


def slow_domain_risks(step: TransferStep) -> list[float]:
    logits = rows_of(step.logits_s)
    return [slow_mean([slow_ce(logits[i], int(step.y_s[i])) for i in rows]) for rows in slow_domain_rows(step).values()]


def test_erm_is_finetune_with_the_mean_cross_entropy_of_the_concatenated_batch():
    strategy = ERM()
    attach(strategy)
    assert isinstance(strategy, FineTune) and not strategy.uses_target
    step = multi_step()
    out = strategy.compute(step)
    expected = slow_mean([slow_ce(r, int(y)) for r, y in zip(rows_of(step.logits_s), step.y_s)])
    assert list(out.losses) == ["cls"] and approx(out.total(), expected, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("features", ["backbone", "bottleneck"])
def test_domain_coral_and_mmd_losses_match_the_formula(features):
    step = multi_step(1)
    feats = rows_of(step.z_s if features == "backbone" else step.f_s)
    groups = [[feats[i] for i in rows] for rows in slow_domain_rows(step).values()]
    risk = slow_mean(slow_domain_risks(step))
    for strategy, dist in ((DomainCORAL(mmd_gamma=0.3, features=features), slow_coral),
                           (DomainMMD(mmd_gamma=0.3, features=features), slow_mmd)):
        attach(strategy)
        out = strategy.compute(step)
        penalty = slow_mean([dist(groups[i], groups[j]) for i in range(3) for j in range(i + 1, 3)])
        assert approx(out.losses["cls"], risk, rel=1e-6, abs=1e-7)
        # float32 inside: with gamma = 1000 the rounding of ||a - a||^2 (~1e-7) shows in the 5th digit, as in DomainBed
        assert approx(out.losses["penalty"], penalty, rel=1e-4, abs=1e-6)
        assert out.weights == {"penalty": 0.3}
        assert approx(out.total(), risk + 0.3 * penalty, rel=1e-4, abs=1e-6)
        (grad,) = torch.autograd.grad(out.losses["penalty"], [step.z_s if features == "backbone" else step.f_s])
        assert float(grad.abs().sum()) > 0


def test_coral_and_mmd_skip_domains_without_rows_and_give_zero_for_one_domain():
    # domain 1 has no rows (DDP sharding), domain 2 a single row: CORAL compares 0 with nothing, MMD 0 with 2
    domains = (0, 2, 0, 0, 0)
    step = multi_step(2, domains)
    feats = rows_of(step.z_s)
    coral_out, mmd_out = DomainCORAL().compute(step), DomainMMD().compute(step)
    assert float(coral_out.losses["penalty"]) == 0.0
    assert approx(mmd_out.losses["penalty"], slow_mmd([feats[i] for i in (0, 2, 3, 4)], [feats[1]]), rel=1e-4, abs=1e-6)
    assert approx(mmd_out.losses["cls"], slow_mean(slow_domain_risks(step)), rel=1e-6, abs=1e-7)
    single = multi_step(3, None)
    for strategy in (DomainCORAL(), DomainMMD()):
        out = strategy.compute(single)
        assert float(out.losses["penalty"]) == 0.0
        assert approx(out.losses["cls"], float(F.cross_entropy(single.logits_s, single.y_s)), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", ["irm", "vrex"])
def test_irm_and_vrex_match_the_formula_and_switch_weight_and_reset_at_the_anneal_step(kind):
    build = (lambda **kw: IRM(irm_lambda=100.0, irm_penalty_anneal_iters=500, **kw)) if kind == "irm" else \
        (lambda **kw: VREx(vrex_lambda=10.0, vrex_penalty_anneal_iters=500, **kw))
    lam = 100.0 if kind == "irm" else 10.0
    strategy = build()
    attach(strategy)
    risks = None
    for step_no, weight in ((0, 1.0), (499, 1.0), (500, lam), (501, lam)):
        step = multi_step(4, step=step_no)
        risks = slow_domain_risks(step)
        if kind == "irm":
            rows = slow_domain_rows(step).values()
            penalty = slow_mean([float(reference_irm_penalty(step.logits_s.detach().double()[r], step.y_s[r]))
                                 for r in map(list, rows)])
        else:
            penalty = slow_mean([(r - slow_mean(risks)) ** 2 for r in risks])
        out = strategy.compute(step)
        assert out.logs["penalty_weight"] == weight
        assert approx(out.losses["cls"], slow_mean(risks), rel=1e-6, abs=1e-7)
        assert approx(out.losses["penalty"], penalty, rel=1e-5, abs=1e-6)
        assert approx(out.total(), slow_mean(risks) + weight * penalty, rel=1e-5, abs=1e-6)
    assert [s for s in range(1200) if strategy.reset_optimizers_now(Progress(s, 0))] == [500]
    # DomainBed does not rescale; rescale_loss divides by the weight once it exceeds 1
    rescaled = build(rescale_loss=True)
    out = rescaled.compute(multi_step(4, step=600))
    plain = strategy.compute(multi_step(4, step=600))
    assert approx(out.total(), float(plain.total()) / lam, rel=1e-6)
    assert approx(rescaled.compute(multi_step(4, step=3)).total(), float(strategy.compute(multi_step(4, step=3)).total()))
    never = IRM(irm_penalty_anneal_iters=0) if kind == "irm" else VREx(vrex_penalty_anneal_iters=0)
    assert not any(never.reset_optimizers_now(Progress(s, 0)) for s in range(10))
    assert never.penalty_weight(Progress(0, 0)) == never.penalty_lambda


def test_irm_and_vrex_penalties_are_zero_for_one_domain_and_skip_tiny_domains():
    single = multi_step(5, None, num_domains=1)
    assert float(VREx().compute(single).losses["penalty"]) == 0.0
    irm_single = IRM().compute(single)
    assert approx(irm_single.losses["penalty"], float(reference_irm_penalty(single.logits_s.detach().double(), single.y_s)),
                  rel=1e-5, abs=1e-7)
    # domain 1: no rows; domain 2: one row (in the nll, not in the IRM penalty)
    step = multi_step(6, (0, 0, 2, 0, 0, 0))
    out = IRM().compute(step)
    rows0 = [0, 1, 3, 4, 5]
    assert approx(out.losses["penalty"], float(reference_irm_penalty(step.logits_s.detach().double()[rows0],
                                                                     step.y_s[rows0])), rel=1e-5, abs=1e-7)
    assert approx(out.losses["cls"], slow_mean(slow_domain_risks(step)), rel=1e-6, abs=1e-7)
    risks = slow_domain_risks(step)
    assert approx(VREx().compute(step).losses["penalty"], slow_mean([(r - slow_mean(risks)) ** 2 for r in risks]),
                  rel=1e-5, abs=1e-7)


def test_group_dro_weights_evolve_over_steps_and_round_trip_through_the_state_dict():
    eta = 0.5
    model = attach(GroupDRO(groupdro_eta=eta))
    strategy = model.strategy
    assert strategy.q.numel() == 0
    slow_q = [1.0, 1.0, 1.0]
    for seed in (7, 8, 9):
        step = multi_step(seed)
        risks = slow_domain_risks(step)
        slow_q = [q * math.exp(eta * r) for q, r in zip(slow_q, risks)]
        slow_q = [q / sum(slow_q) for q in slow_q]
        out = strategy.compute(step)
        torch.testing.assert_close(strategy.q.double(), torch.tensor(slow_q, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        assert approx(out.losses["cls"], sum(q * r for q, r in zip(slow_q, risks)), rel=1e-5, abs=1e-6)
        assert out.logs["q_1"] == pytest.approx(slow_q[1], rel=1e-5)
    # a fresh model loads the weights (through TransferModule.load_state_dict's checks) and continues identically
    state = copy.deepcopy(model.state_dict())
    fresh = attach(GroupDRO(groupdro_eta=eta))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.strategy.q, strategy.q)
    nxt = multi_step(10)
    a, b = strategy.compute(nxt), fresh.strategy.compute(nxt)
    assert torch.equal(a.losses["cls"], b.losses["cls"]) and torch.equal(strategy.q, fresh.strategy.q)
    # a domain without rows keeps its unnormalised weight and adds no risk
    before = strategy.q.clone()
    step = multi_step(11, (0, 2, 0, 2, 2))
    out = strategy.compute(step)
    r = slow_domain_risks(step)
    raw = [float(before[0]) * math.exp(eta * r[0]), float(before[1]), float(before[2]) * math.exp(eta * r[1])]
    torch.testing.assert_close(strategy.q.double(), torch.tensor([v / sum(raw) for v in raw], dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    assert approx(out.losses["cls"], float(strategy.q[0]) * r[0] + float(strategy.q[2]) * r[1], rel=1e-5, abs=1e-6)
    with pytest.raises(ConfigError, match="3 entries"):
        strategy.compute(multi_step(12, (0, 1, 0, 1), num_domains=2))


def test_dg_strategies_refuse_bad_arguments():
    with pytest.raises(ConfigError, match="label_shift"):
        VREx(label_shift="bbse")
    with pytest.raises(ConfigError, match="irm_penalty_anneal_iters"):
        IRM(irm_penalty_anneal_iters=-1)
    with pytest.raises(ConfigError, match="gammas"):
        DomainMMD(gammas=[])
    with pytest.raises(ConfigError, match="features"):
        DomainCORAL(features="logits")
    with pytest.raises(ConfigError, match="mlp_depth"):
        DomainAdversarial(mlp_depth=1)
    with pytest.raises(ConfigError, match="mix"):
        MixStyle(mix="shuffle")
    with pytest.raises(ConfigError, match="twice"):
        MixStyle(stages=[1, 1])


# ----------------------------------------------------------------------------- MixStyle
def test_mixstyle_stage_resolution():
    lenet = attach(ERM()).backbone
    assert [n for n, _ in feature_stages(lenet)] == ["stages.0", "stages.1"]
    from tlframe.backbones import create_backbone

    resnet = create_backbone("resnet18")
    assert [n for n, _ in feature_stages(resnet)] == ["layer1", "layer2", "layer3", "layer4"]
    assert feature_stage(resnet, 1)[1] is resnet.layer2
    with pytest.raises(ConfigError, match="stage 2 does not exist.*2 feature stages"):
        feature_stage(lenet, 2)
    with pytest.raises(ConfigError, match="vision transformer"):
        feature_stages(create_backbone("vit_tiny_patch16_224", img_size=32))
    with pytest.raises(ConfigError, match="cannot find"):
        feature_stages(torch.nn.Linear(2, 2))


def test_mixstyle_is_identity_in_eval_mode_and_with_p_zero_and_mixes_in_training():
    x = torch.randn(6, 1, 28, 28, generator=gen(13))
    plain = attach(ERM())
    mixed = attach(MixStyle(stages=[0], p=1.0, alpha=0.1))
    mixed.backbone.load_state_dict(plain.backbone.state_dict())
    zero = attach(MixStyle(stages=[0, 1], p=0.0))
    zero.backbone.load_state_dict(plain.backbone.state_dict())
    for m in (plain, mixed, zero):
        m.backbone.stages[1][1].p = 0.0  # lenet's Dropout2d off: compare the deterministic forward
    plain.eval(), mixed.eval()
    assert torch.equal(plain.backbone(x), mixed.backbone(x))  # eval: untouched
    plain.train(), mixed.train(), zero.train()
    assert torch.equal(plain.backbone(x), zero.backbone(x))  # p = 0: untouched
    # train, p = 1: the first stage's output is mixstyle(x0, lam, perm) with the global generator's draws
    torch.manual_seed(5)
    got = mixed.backbone(x)
    torch.manual_seed(5)
    torch.rand(())
    lam = torch.distributions.Beta(torch.tensor(0.1), torch.tensor(0.1)).sample((6,))
    perm = torch.randperm(6)
    stage0 = plain.backbone.stages[0](x)
    expected_stage0 = mixstyle(stage0, lam, perm, 1e-6)
    expected = torch.flatten(plain.backbone.stages[1](expected_stage0), 1)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, plain.backbone(x))
    # the mixed maps carry the lam-mixed per-channel statistics of the inputs
    mu, sd = stage0.mean(dim=(2, 3)), (stage0.var(dim=(2, 3)) + 1e-6).sqrt()
    l = lam[:, None]
    torch.testing.assert_close(expected_stage0.mean(dim=(2, 3)), l * mu + (1 - l) * mu[perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(expected_stage0.std(dim=(2, 3)), l * sd + (1 - l) * sd[perm], rtol=1e-3, atol=1e-4)


def test_mixstyle_crossdomain_pairs_rows_across_the_halves():
    hook = MixStyleHook(1.0, 0.1, 1e-6, "crossdomain", "test")
    for n in (6, 7):
        torch.manual_seed(n)
        perm = hook.permutation(n).tolist()
        h = n // 2
        assert sorted(perm) == list(range(n))
        assert all(p >= h and p < 2 * h for p in perm[:h]) and all(p < h for p in perm[h:2 * h])
        assert perm[2 * h:] == list(range(2 * h, n))


def test_mixstyle_hooks_survive_deepcopy_and_pickle_and_check_the_stage_output():
    model = attach(MixStyle(stages=[0, 1], p=1.0))
    twin = copy.deepcopy(model.backbone)
    again = pickle.loads(pickle.dumps(model.backbone))
    x = torch.randn(4, 1, 28, 28, generator=gen(14))
    outs = []
    for m in (model.backbone, twin, again):
        m.train()
        m.stages[1][1].p = 0.0
        torch.manual_seed(3)
        outs.append(m(x))
        assert sum(len(s._forward_hooks) for s in m.stages) == 2
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    model.strategy.remove_hooks()
    assert sum(len(s._forward_hooks) for s in model.backbone.stages) == 0
    assert sum(len(s._forward_hooks) for s in twin.stages) == 2  # the copy keeps its own hooks
    tllib = TransferModule("lenet_tllib", num_classes=C, bottleneck_dim=FEAT, strategy=MixStyle(stages=[2]))
    tllib.train()
    with pytest.raises(ConfigError, match=r"stage 2 \(stages.2\).*not feature maps"):
        tllib(x)
    tllib.eval()
    tllib(x)  # evaluation never mixes, so never checks


# ----------------------------------------------------------------------------- DomainAdversarial (DANN / CDANN)
class _Harness(TransferModule):
    """A TransferModule driven by hand: its own plain optimizers, plain backward and a settable global step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_no = 0
        self._opts = None

    @property
    def progress(self) -> Progress:
        return Progress(self.step_no, 0, None)

    def optimizers(self, use_pl_optimizer: bool = True):
        if self._opts is None:
            self._opts = [torch.optim.SGD(groups, lr=0.1) for _, groups in
                          self.strategy.optimizer_groups(self.backbone, self.head)]
        return self._opts

    def manual_backward(self, loss, *args, **kwargs):
        loss.backward()


def _domain_batch(seed: int = 0, sizes=(3, 2, 3)):
    g = gen(seed)
    return {"sources": [(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, C, (n,), generator=g))
                        for n in sizes]}


def _parts(model) -> dict[str, list[torch.Tensor]]:
    disc = list(model.strategy.discriminator.parameters())
    if model.strategy.class_embeddings is not None:
        disc += list(model.strategy.class_embeddings.parameters())
    return {"backbone": list(model.backbone.parameters()), "head": list(model.head.parameters()), "disc": disc}


def _moved(model, batch) -> set[str]:
    before = {k: [p.detach().clone() for p in ps] for k, ps in _parts(model).items()}
    out = model.strategy.manual_step(model, batch)
    moved = {k for k, ps in _parts(model).items() if any(not torch.equal(a, p) for a, p in zip(before[k], ps))}
    return moved, out


@pytest.mark.parametrize("conditional", [False, True])
def test_domain_adversarial_alternates_and_each_step_moves_only_its_part(conditional):
    torch.manual_seed(0)
    model = _Harness("lenet", num_classes=C, bottleneck_dim=FEAT, strategy=DomainAdversarial(
        conditional=conditional, num_domains=3, lambda_=0.7, mlp_width=16))
    model.eval()  # no dropout: the losses below are recomputed from the same forward
    strategy = model.strategy
    groups = dict(strategy.optimizer_groups(model.backbone, model.head))
    assert [g["name"] for g in groups["generator"]] == ["head", "backbone"]
    assert groups["discriminator"][0]["betas"] == (0.5, 0.9) and groups["discriminator"][0]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.5, 0.9) for g in groups["generator"])
    batch = _domain_batch(1)
    schedule = []
    for step_no in range(4):
        model.step_no = step_no
        with torch.no_grad():
            step = model.transfer_step(batch)
            y, d = step.y_s, step.d_s
            h = step.z_s + strategy.class_embeddings(y) if conditional else step.z_s
            logits = rows_of(strategy.discriminator(h))
        ce = [slow_ce(logits[i], int(d[i])) for i in range(len(y))]
        if conditional:
            counts = {c: int((y == c).sum()) for c in set(y.tolist())}
            width = max(y.tolist()) + 1
            disc = sum(ce[i] / (counts[int(y[i])] * width) for i in range(len(y)))
        else:
            disc = slow_mean(ce)
        moved, out = _moved(model, batch)
        assert approx(out.losses["disc"], disc, rel=1e-5, abs=1e-6)
        if out.logs["discriminator_step"]:
            schedule.append("D")
            assert moved == {"disc"} and out.weights.get("disc", 1.0) == 1.0
        else:
            schedule.append("G")
            assert moved == {"backbone", "head"} and out.weights["disc"] == -0.7
            cls = slow_mean([slow_ce(r, int(t)) for r, t in zip(rows_of(step.logits_s), y)])
            assert approx(out.losses["cls"], cls, rel=1e-5, abs=1e-6)
    assert schedule == ["G", "D", "G", "D"]  # DomainBed: update_count 1, 2, 3, 4 with d_steps_per_g_step = 1
    three = DomainAdversarial(d_steps_per_g_step=3, num_domains=2)
    assert [three.is_discriminator_step(Progress(s, 0)) for s in range(8)] == [True, True, False, True] * 2


def test_domain_adversarial_gradient_penalty_matches_autograd():
    torch.manual_seed(1)
    model = _Harness("lenet", num_classes=C, bottleneck_dim=FEAT,
                     strategy=DomainAdversarial(num_domains=3, grad_penalty=0.5, mlp_width=8, features="bottleneck"))
    model.eval()
    step = model.transfer_step(_domain_batch(2))
    losses, _ = model.strategy.discriminator_losses(step)
    h = step.f_s.detach().double().requires_grad_()
    disc = copy.deepcopy(model.strategy.discriminator).double()
    (grad,) = torch.autograd.grad(F.cross_entropy(disc(h), step.d_s, reduction="sum"), [h])
    expected = slow_mean([sum(v * v for v in row) for row in rows_of(grad)])
    assert approx(losses["grad_penalty"], expected, rel=1e-4, abs=1e-6)
    model.step_no = 1
    out = model.strategy.manual_step(model, _domain_batch(2))
    assert out.weights == {"grad_penalty": 0.5} and "grad_penalty" in out.losses


def test_domain_adversarial_knows_its_domains_from_the_data_module():
    strategy = DomainAdversarial()
    attach(strategy)
    assert strategy.discriminator.output is None
    with pytest.raises(ConfigError, match="number of training domains"):
        strategy.optimizer_groups(None, None)

    class Data:
        num_source_domains = 4

    strategy.on_setup("fit", Data())
    assert strategy.discriminator.out_features == 4
    with pytest.raises(ConfigError, match="4 outputs but the data has 2"):
        Data.num_source_domains = 2
        strategy.on_setup("validate", Data())
    with pytest.raises(ConfigError, match="num_domains=3 but the data has 2"):
        given = DomainAdversarial(num_domains=3)
        attach(given)
        given.on_setup("fit", Data())
    with pytest.raises(ConfigError, match="regularization"):
        from tlframe.strategies import L2SP
        DomainAdversarial(regularization=[L2SP()])


class _Recording:
    def __init__(self, name, optimizer, log):
        self.name, self.optimizer, self.log = name, optimizer, log

    def zero_grad(self, *args, **kwargs):
        return self.optimizer.zero_grad(*args, **kwargs)

    def step(self, *args, **kwargs):
        self.log.append(self.name)
        return self.optimizer.step(*args, **kwargs)


class _RecordingModule(TransferModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_log: list = []

    def optimizers(self, use_pl_optimizer: bool = True):
        g, d = super().optimizers(use_pl_optimizer)
        return _Recording("generator", g, self.step_log), _Recording("discriminator", d, self.step_log)


def test_domain_adversarial_in_a_lightning_fit(tmp_path):
    model = _RecordingModule("dtn", num_classes=10, strategy=DomainAdversarial(mlp_width=16))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.fit(model, make_synthetic_dm(iters_per_epoch=4))
    assert model.step_log == ["generator", "discriminator"] * 2 and model.global_step == 4
    assert model.strategy.discriminator.out_features == 1  # one source domain
    assert {"train/loss_disc", "train/domain_acc", "train/discriminator_step"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("strategy", [
    ERM(), DomainCORAL(), DomainMMD(), IRM(irm_penalty_anneal_iters=1), VREx(vrex_penalty_anneal_iters=1),
    GroupDRO(), MixStyle(p=1.0)], ids=lambda s: type(s).__name__)
def test_dg_strategies_train_in_a_single_source_lightning_fit(strategy, tmp_path):
    model = TransferModule("dtn", num_classes=10, strategy=strategy)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(model, make_synthetic_dm(iters_per_epoch=2))
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"]) and "val/target_acc" in logged
    if isinstance(strategy, (IRM, VREx)):
        assert float(logged["train/penalty_weight"]) == strategy.penalty_lambda
        assert float(logged["train/loss_penalty"]) == 0.0 or isinstance(strategy, IRM)
    if isinstance(strategy, GroupDRO):
        assert strategy.q.tolist() == [1.0]


def _three_source_dm():
    from tlframe.data import MultiDomainDataModule, SyntheticDomain

    domains = [SyntheticDomain("source" if i % 2 == 0 else "target", num_train=48, num_test=16, seed=i) for i in range(4)]
    return MultiDomainDataModule(domains=domains, test_domain=3, batch_size=4, iters_per_epoch=4)


@pytest.mark.parametrize("build", [lambda: GroupDRO(groupdro_eta=1.0), lambda: IRM(irm_penalty_anneal_iters=3)],
                         ids=["groupdro", "irm_reset"])
def test_resume_mid_run_matches_the_uninterrupted_run(build, tmp_path):
    """Three training domains, Adam; resumed from the step-2 checkpoint: GroupDRO's q (extra state) and IRM's
    optimizer reset at step 3 come back exactly."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def model():
        return TransferModule("dtn", num_classes=10, strategy=build(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))

    full = model()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    make_trainer(tmp_path, max_steps=5, limit_val_batches=0, enable_checkpointing=True,
                 callbacks=[saver]).fit(full, _three_source_dm())
    resumed = model()
    make_trainer(tmp_path / "resume", max_steps=5, limit_val_batches=0).fit(
        resumed, _three_source_dm(), ckpt_path=str(tmp_path / "step=2.ckpt"))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a.keys() == b.keys()
    if isinstance(full.strategy, GroupDRO):
        assert full.strategy.q.numel() == 3 and torch.equal(full.strategy.q, resumed.strategy.q)


def test_domain_adversarial_with_three_training_domains_alternates_and_discriminates_them(tmp_path):
    model = _RecordingModule("dtn", num_classes=10, strategy=DomainAdversarial(mlp_width=16, conditional=True))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.fit(model, _three_source_dm())
    assert model.step_log == ["generator", "discriminator"] * 2 and model.global_step == 4
    assert model.strategy.discriminator.out_features == 3  # one output per training domain, read from the data
    assert "val/source_acc" in trainer.callback_metrics and "train/loss_disc" in trainer.callback_metrics


@pytest.mark.parametrize("build", [ERM, DomainCORAL, DomainMMD, lambda: IRM(irm_penalty_anneal_iters=1),
                                   lambda: VREx(vrex_penalty_anneal_iters=1), GroupDRO,
                                   lambda: DomainAdversarial(mlp_width=16), lambda: MixStyle(p=1.0)],
                         ids=["erm", "coral", "mmd", "irm", "vrex", "groupdro", "dann", "mixstyle"])
def test_dg_strategies_train_under_bf16_with_three_domains(build, tmp_path):
    model = TransferModule("dtn", num_classes=10, strategy=build())
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1, precision="bf16-mixed")
    trainer.fit(model, _three_source_dm())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
