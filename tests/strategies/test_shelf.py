"""The method shelf (CDAN, JAN, MCC, MDD, AFN, CORAL) and composable loss terms.

Each strategy's ``compute`` is checked on fixed tensors against the :mod:`tlframe.losses` function applied by
hand (value, and which parameters the gradients reach, with the reversal's sign and scale); then the YAML
path (a combination parsed by the CLI), short ``python -m tlframe fit`` runs whose TensorBoard scalars hold
every loss term, resume of CDAN's random matrices and bf16 autocast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from tlframe.checks import ConfigError
from tlframe.losses import (adaptive_feature_norm, batch_spectral_penalty, cdan_entropy_weights, coral,
                            domain_adversarial_loss, entropy, joint_mk_mmd, margin_disparity_discrepancy,
                            minimum_class_confusion, mk_mmd, multilinear_map, randomized_multilinear_map,
                            warm_start_coefficient)
from tlframe.module import TransferModule
from tlframe.strategies import (AFN, CDAN, CORAL, DANN, JAN, MCC, MDD, MMD, Adaptation, AFNTerm, BSPTerm, CORALTerm,
                                EntropyTerm, JMMDTerm, L2PreservedDropout, MCCTerm, MMDTerm, Progress, TransferStep)

ROOT = Path(__file__).resolve().parents[2]
N, FEAT, C = 8, 16, 4
STEP = 1000  # warm_start_coefficient(1000) = 0.4621


def attach(strategy, bottleneck_dim: int = FEAT, num_classes: int = C) -> TransferModule:
    """The strategy attached to a small LeNet model (its head, discriminator, adversarial head ... built)."""
    return TransferModule("lenet", num_classes=num_classes, bottleneck_dim=bottleneck_dim, strategy=strategy)


def fixed_step(seed: int = 0, n: int = N, feat: int = FEAT, classes: int = C) -> TransferStep:
    """Leaf tensors (requires_grad) for features and logits of both domains, at optimizer step ``STEP``."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    return TransferStep(z_s=torch.zeros(n, 1), f_s=leaf(n, feat), logits_s=leaf(n, classes),
                        y_s=torch.randint(0, classes, (n,), generator=gen), progress=Progress(STEP, 0, None),
                        z_t=torch.zeros(n, 1), f_t=leaf(n, feat), logits_t=leaf(n, classes))


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)


def close(a, b, **kw):
    return torch.allclose(a, b, **{"atol": 1e-6, "rtol": 1e-5, **kw})


# --------------------------------------------------------------------------------------------- CDAN
@pytest.mark.parametrize("entropy_conditioning", [False, True])
def test_cdan_matches_losses_by_hand_and_reverses_the_feature_gradient(entropy_conditioning):
    strategy = CDAN(entropy_conditioning=entropy_conditioning, hidden=32, trade_off=0.7)
    attach(strategy)
    assert not strategy.use_randomized and strategy.discriminator[0].in_features == FEAT * C
    step = fixed_step()
    out = strategy.compute(step)
    p_s, p_t = step.logits_s.softmax(1).detach(), step.logits_t.softmax(1).detach()
    d = strategy.discriminator(torch.cat([multilinear_map(step.f_s, p_s), multilinear_map(step.f_t, p_t)]))
    w_s, w_t = cdan_entropy_weights(p_s, p_t) if entropy_conditioning else (None, None)
    expected, acc = domain_adversarial_loss(d[:N], d[N:], w_s, w_t)
    coeff = warm_start_coefficient(STEP)
    assert sorted(out.losses) == ["adv", "cls"] and out.weights == {"adv": 0.7}
    assert close(out.losses["adv"], expected) and close(out.losses["cls"], F.cross_entropy(step.logits_s, step.y_s))
    assert out.logs["grl_coeff"] == pytest.approx(coeff) and float(out.logs["domain_acc"]) == float(acc)
    assert ("entropy_weight_t" in out.logs) == entropy_conditioning
    disc = strategy.discriminator[0].weight
    g_f, g_d, g_logits = grads(out.losses["adv"], [step.f_s, disc, step.logits_s])
    plain_f, plain_d = grads(expected, [step.f_s, disc])
    assert close(g_f, -coeff * plain_f, atol=1e-7) and float((g_f * plain_f).sum()) < 0  # reversed for the features
    assert close(g_d, plain_d, atol=1e-7) and float(plain_d.abs().sum()) > 0  # the discriminator is not reversed
    assert g_logits is None  # the conditioning uses the detached predictions


def test_cdan_backbone_gradient_is_reversed_through_the_randomized_map():
    torch.manual_seed(0)
    strategy = CDAN(randomized=True, randomized_dim=32, hidden=32, entropy_conditioning=True)
    model = TransferModule("lenet", num_classes=C, bottleneck_dim=FEAT, strategy=strategy).eval()
    x_s, x_t, y = torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28), torch.zeros(6, dtype=torch.long)
    backbone = list(model.backbone.parameters())

    def step():
        (z_s, f_s, g_s), (z_t, f_t, g_t) = model._forward_domains(x_s, x_t)
        return TransferStep(z_s=z_s, f_s=f_s, logits_s=g_s, y_s=y, progress=Progress(STEP, 0), z_t=z_t, f_t=f_t,
                            logits_t=g_t)

    reversed_grads = grads(strategy.compute(step()).losses["adv"], backbone)
    s = step()
    p_s, p_t = s.logits_s.softmax(1).detach(), s.logits_t.softmax(1).detach()
    h = torch.cat([randomized_multilinear_map(s.f_s, p_s, strategy.random_f, strategy.random_g),
                   randomized_multilinear_map(s.f_t, p_t, strategy.random_f, strategy.random_g)])
    d = strategy.discriminator(h)
    plain, _ = domain_adversarial_loss(d[:6], d[6:], *cdan_entropy_weights(p_s, p_t))
    coeff = warm_start_coefficient(STEP)
    for g_rev, g in zip(reversed_grads, grads(plain, backbone)):
        assert close(g_rev, -coeff * g, atol=1e-8)
    assert any(float(g.abs().sum()) > 0 for g in reversed_grads)


def test_cdan_random_matrices_are_seeded_buffers_in_the_state_dict():
    def build(seed: int, global_seed: int) -> TransferModule:
        torch.manual_seed(global_seed)  # the global RNG must not matter
        return attach(CDAN(randomized=True, randomized_dim=24, randomized_seed=seed, hidden=16))

    a, b, c = build(3, 0), build(3, 99), build(4, 0)
    sd = a.state_dict()
    assert sd["strategy.random_f"].shape == (FEAT, 24) and sd["strategy.random_g"].shape == (C, 24)
    assert torch.equal(sd["strategy.random_f"], b.state_dict()["strategy.random_f"])
    assert torch.equal(sd["strategy.random_g"], b.state_dict()["strategy.random_g"])
    assert not torch.equal(sd["strategy.random_f"], c.state_dict()["strategy.random_f"])
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(sd["strategy.random_f"], torch.randn(FEAT, 24, generator=gen))  # standard normal, as TLlib
    assert a.strategy.discriminator[0].in_features == 24
    # value by hand
    step = fixed_step()
    s = a.strategy
    out = s.compute(step)
    p_s, p_t = step.logits_s.softmax(1).detach(), step.logits_t.softmax(1).detach()
    d = s.discriminator(torch.cat([randomized_multilinear_map(step.f_s, p_s, s.random_f, s.random_g),
                                   randomized_multilinear_map(step.f_t, p_t, s.random_f, s.random_g)]))
    assert close(out.losses["adv"], domain_adversarial_loss(d[:N], d[N:])[0])


def test_cdan_auto_switches_to_the_randomized_map_above_4096_inputs():
    small = attach(CDAN(randomized="auto", hidden=8), bottleneck_dim=16, num_classes=10).strategy  # 160
    large = attach(CDAN(randomized="auto", hidden=8), bottleneck_dim=500, num_classes=10).strategy  # 5000 > 4096
    assert not small.use_randomized and small.discriminator[0].in_features == 160
    assert large.use_randomized and large.discriminator[0].in_features == 1024
    assert CDAN().randomized is False  # TLlib's CDAN example script default
    for bad, match in [({"randomized": "yes"}, "randomized='yes'"), ({"randomized_dim": 0}, "randomized_dim=0"),
                       ({"trade_off": -1.0}, "trade_off=-1"), ({"grl_max_steps": 0}, "grl_max_steps=0")]:
        with pytest.raises(ValueError, match=match):
            CDAN(**bad)


# --------------------------------------------------------------------------------------------- JAN, MCC, CORAL
def test_jan_matches_joint_mk_mmd_with_undetached_probabilities():
    strategy = JAN(trade_off=0.5)
    attach(strategy)
    step = fixed_step()
    out = strategy.compute(step)
    expected = joint_mk_mmd(step.f_s, step.f_t, step.logits_s.softmax(1), step.logits_t.softmax(1))
    assert sorted(out.losses) == ["cls", "jmmd"] and out.weights == {"jmmd": 0.5}
    assert close(out.losses["jmmd"], expected)
    g = grads(out.losses["jmmd"], [step.f_s, step.f_t, step.logits_s, step.logits_t])
    assert all(x is not None and float(x.abs().sum()) > 0 for x in g)  # features and predictions both aligned
    linear = JAN(linear=True, offset=False)
    attach(linear)
    assert close(linear.compute(step).losses["jmmd"],
                 joint_mk_mmd(step.f_s, step.f_t, step.logits_s.softmax(1), step.logits_t.softmax(1), linear=True,
                              offset=False))


def test_mcc_matches_minimum_class_confusion_on_the_target_only():
    strategy = MCC(trade_off=2.0, temperature=3.0)
    attach(strategy)
    step = fixed_step()
    out = strategy.compute(step)
    assert sorted(out.losses) == ["cls", "mcc"] and out.weights == {"mcc": 2.0}
    assert close(out.losses["mcc"], minimum_class_confusion(step.logits_t, 3.0))
    assert float(out.logs["target_entropy"]) == pytest.approx(float(entropy(step.logits_t).detach()))
    g_t, g_s, g_f = grads(out.losses["mcc"], [step.logits_t, step.logits_s, step.f_t])
    assert float(g_t.abs().sum()) > 0 and g_s is None and g_f is None
    assert close(out.total(), out.losses["cls"] + 2.0 * out.losses["mcc"])


@pytest.mark.parametrize("scale", ["tllib", "paper"])
def test_coral_matches_the_loss(scale):
    strategy = CORAL(trade_off=3.0, scale=scale)
    attach(strategy)
    step = fixed_step()
    out = strategy.compute(step)
    assert out.weights == {"coral": 3.0} and close(out.losses["coral"], coral(step.f_s, step.f_t, scale))
    g = grads(out.losses["coral"], [step.f_s, step.f_t, step.logits_s])
    assert float(g[0].abs().sum()) > 0 and float(g[1].abs().sum()) > 0 and g[2] is None
    with pytest.raises(ValueError, match="scale='both'"):
        CORAL(scale="both")


# --------------------------------------------------------------------------------------------- MDD
def test_mdd_has_its_own_heads_and_the_adversarial_head_is_behind_the_reversal():
    strategy = MDD(trade_off=0.5, margin=3.0, head_width=8)
    model = attach(strategy).eval()  # eval: no dropout in the heads, so the by-hand forward is the same
    head = model.head.classifier
    assert isinstance(head, nn.Sequential) and [m.out_features for m in head if isinstance(m, nn.Linear)] == [8, C]
    adv_head = strategy.adversarial_head
    assert [type(m) for m in adv_head] == [type(m) for m in head] and adv_head is not head
    assert float(head[0].weight.std()) == pytest.approx(0.01, rel=0.2) and float(head[0].bias.abs().sum()) == 0
    assert torch.all(model.head.bottleneck[0].bias == 0.1)  # TLlib's MDD bottleneck init
    assert {"strategy.adversarial_head.0.weight", "head.classifier.3.weight"} <= set(model.state_dict())
    groups = {g["name"]: g for g in strategy.param_groups(model.backbone, model.head)}
    assert set(groups["adversarial_head"]["params"]) == set(adv_head.parameters())

    step = fixed_step()
    out = strategy.compute(step)
    adv = adv_head(torch.cat([step.f_s, step.f_t]))
    expected = margin_disparity_discrepancy(step.logits_s, adv[:N], step.logits_t, adv[N:], margin=3.0)
    coeff = 0.1 * warm_start_coefficient(STEP)  # lo=0, hi=0.1
    assert out.logs["grl_coeff"] == pytest.approx(coeff)
    assert sorted(out.losses) == ["cls", "mdd"] and out.weights == {"mdd": -0.5}
    assert close(out.losses["mdd"], expected)
    assert close(out.total(), out.losses["cls"] - 0.5 * out.losses["mdd"])  # loss = cls - trade_off * mdd
    transfer = -0.5 * out.losses["mdd"]
    g_f, g_head, g_logits = grads(transfer, [step.f_t, adv_head[0].weight, step.logits_t])
    plain_f, plain_head = grads(-0.5 * expected, [step.f_t, adv_head[0].weight])
    assert close(g_head, plain_head, atol=1e-8) and float(plain_head.abs().sum()) > 0  # the head maximises mdd
    assert close(g_f, -coeff * plain_f, atol=1e-8) and float((g_f * plain_f).sum()) < 0  # features: reversed
    assert g_logits is None  # the main head only enters through its argmax


def test_mdd_linear_heads_and_validation():
    strategy = MDD(head_width=None, reference_init=False)
    model = attach(strategy)
    assert isinstance(model.head.classifier, nn.Linear) and isinstance(strategy.adversarial_head, nn.Linear)
    assert MDD().coefficient(1000) == pytest.approx(0.04621, abs=1e-5)
    for bad, match in [({"margin": 0.0}, "margin=0"), ({"head_width": 0}, "head_width=0"),
                       ({"head_dropout": 1.0}, "head_dropout=1")]:
        with pytest.raises(ValueError, match=match):
            MDD(**bad)


# --------------------------------------------------------------------------------------------- AFN
def test_afn_loss_dropout_and_momentum_groups():
    strategy = AFN(trade_off=0.05, delta=0.3, dropout=0.5, backbone_momentum=0.0)
    model = attach(strategy)
    bottleneck = model.head.bottleneck
    assert isinstance(bottleneck[-1], L2PreservedDropout) and not any(type(m) is nn.Dropout for m in bottleneck)
    assert strategy.bn_policy == "separate"  # TLlib's AFN forwards the two domains separately
    step = fixed_step()
    out = strategy.compute(step)
    expected = adaptive_feature_norm(step.f_s, 0.3) + adaptive_feature_norm(step.f_t, 0.3)
    assert out.weights == {"afn": 0.05} and close(out.losses["afn"], expected)
    assert float(out.losses["afn"]) == pytest.approx(2 * 0.3 ** 2)
    g_s, g_t = grads(out.losses["afn"], [step.f_s, step.f_t])
    e_s, e_t = grads(expected, [step.f_s, step.f_t])
    assert close(g_s, e_s) and close(g_t, e_t)
    assert float((g_s * step.f_s).sum()) < 0  # a descent step grows the norms
    norms = torch.cat([step.f_s.norm(dim=1), step.f_t.norm(dim=1)])
    assert float(out.logs["feature_norm"]) == pytest.approx(float(norms.mean()), rel=1e-5)
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert {g["name"]: g["momentum"] for g in groups} == {"head": 0.9, "backbone": 0.0}
    assert [type(m) for m in attach(AFN(dropout=None)).head.bottleneck][-1] is nn.ReLU  # bottleneck left as it was


def test_l2_preserved_dropout_scales_by_inverse_sqrt():
    drop = L2PreservedDropout(0.75)
    x = torch.rand(2000) + 1.0
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = y != 0
    assert 0.15 < float(kept.float().mean()) < 0.35
    assert close(y[kept], x[kept] / (0.25 ** 0.5))  # 1 / sqrt(1 - p), not 1 / (1 - p)
    assert torch.equal(drop.eval()(x), x)


# --------------------------------------------------------------------------------------------- terms
def test_dann_plus_terms_gives_every_loss_with_its_weight():
    strategy = DANN(trade_off=0.3, hidden=16, terms=[MCCTerm(weight=0.5, temperature=2.0), BSPTerm(weight=1e-4, k=2),
                                                     EntropyTerm(weight=0.1), AFNTerm(weight=0.05, delta=0.5)])
    model = attach(strategy)
    assert strategy.uses_target and isinstance(strategy.terms, nn.ModuleList)
    step = fixed_step()
    out = strategy.compute(step)
    assert list(out.losses) == ["cls", "adv", "mcc", "bsp", "entropy", "afn"]
    assert out.weights == {"adv": 0.3, "mcc": 0.5, "bsp": 1e-4, "entropy": 0.1, "afn": 0.05}
    assert close(out.losses["mcc"], minimum_class_confusion(step.logits_t, 2.0))
    assert close(out.losses["bsp"], batch_spectral_penalty(step.f_s, step.f_t, k=2))
    assert close(out.losses["entropy"], entropy(step.logits_t))
    assert close(out.losses["afn"], adaptive_feature_norm(step.f_s, 0.5) + adaptive_feature_norm(step.f_t, 0.5))
    assert {"grl_coeff", "domain_acc", "afn_norm_s", "afn_norm_t"} <= set(out.logs)
    total = sum(out.weights.get(k, 1.0) * v for k, v in out.losses.items())
    assert close(out.total(), total)
    assert not [k for k in model.state_dict() if ".terms." in k]  # these terms hold no tensors
    # the other terms, on the same step
    for term, fn in [(MMDTerm(), lambda s: mk_mmd(s.f_s, s.f_t)),
                     (JMMDTerm(), lambda s: joint_mk_mmd(s.f_s, s.f_t, s.logits_s.softmax(1), s.logits_t.softmax(1))),
                     (CORALTerm(scale="paper"), lambda s: coral(s.f_s, s.f_t, "paper"))]:
        loss, _ = term.compute(step)
        assert close(loss, fn(step)), term


def test_adaptation_alone_is_entropy_minimisation_and_baselines_stay_source_only():
    from tlframe.baselines import source_only_config

    strategy = Adaptation(terms=[EntropyTerm(weight=0.2)], backbone_lr_mult=1.0)
    attach(strategy)
    step = fixed_step()
    out = strategy.compute(step)
    assert out.weights == {"entropy": 0.2} and close(out.losses["entropy"], entropy(step.logits_t))
    for path in ("tlframe.strategies.Adaptation", "tlframe.strategies.DANN"):
        config = {"model": {"strategy": {"class_path": path, "init_args": {
            "backbone_lr_mult": 1.0, "terms": [{"class_path": "tlframe.strategies.EntropyTerm"}]}}}}
        baseline = source_only_config(config)["model"]["strategy"]  # terms train on the target: never in source only
        assert baseline == {"class_path": "tlframe.strategies.FineTune", "init_args": {"backbone_lr_mult": 1.0}}


def test_term_names_and_arguments_are_checked():
    with pytest.raises(ConfigError, match="two loss terms are named 'mcc'"):
        DANN(terms=[MCCTerm(), MCCTerm(weight=2.0)])
    DANN(terms=[MCCTerm(), MCCTerm(weight=2.0, name="mcc_t4")])
    with pytest.raises(ConfigError, match=r"'mcc' is taken by MCC's own losses \['cls', 'mcc'\]"):
        MCC(terms=[MCCTerm()])  # at construction, from the strategy's declared own_losses
    MCC(terms=[MCCTerm(name="mcc2")])

    class Undeclared(Adaptation):  # a strategy that does not declare its losses: caught at the first step
        def compute_transfer(self, step):
            out = super().compute_transfer(step)
            out.losses["mcc"] = out.losses["cls"]
            return out

    strategy = Undeclared(terms=[MCCTerm()])
    attach(strategy)
    with pytest.raises(ConfigError, match="'mcc' is taken by Undeclared's own losses"):
        strategy.compute(fixed_step())
    for make, match in [(lambda: MCCTerm(weight=-1.0), r"MCCTerm.weight=-1.0 must be a finite number >= 0"),
                        (lambda: EntropyTerm(name="cls"), "not 'cls'"), (lambda: BSPTerm(k=0), "BSPTerm.k=0"),
                        (lambda: MMDTerm(alphas=[]), "alphas is empty"), (lambda: AFNTerm(delta=0.0), "delta=0"),
                        (lambda: DANN(terms=[nn.Linear(2, 2)]), "terms\\[0\\] is a Linear")]:
        with pytest.raises(ConfigError, match=match):
            make()
    step = fixed_step()
    step.f_t = step.logits_t = None
    with pytest.raises(RuntimeError, match="MCCTerm needs the target batch"):
        MCCTerm().compute(step)


def test_yaml_combination_parses_through_the_cli(tmp_path, capsys):
    from tlframe.cli import main

    combo = tmp_path / "cdan_e_entropy.yaml"
    combo.write_text(yaml.safe_dump({"model": {"strategy": {"class_path": "tlframe.strategies.CDAN", "init_args": {
        "entropy_conditioning": True, "randomized": "auto",
        "terms": [{"class_path": "tlframe.strategies.EntropyTerm", "init_args": {"weight": 0.1}},
                  {"class_path": "tlframe.strategies.BSPTerm", "init_args": {"weight": 1e-4}}]}}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs" / "quickstart.yaml"), "-c", str(combo), "--print_config"])
    assert exit_info.value.code in (0, None)
    strategy = yaml.safe_load(capsys.readouterr().out)["model"]["strategy"]
    init = strategy["init_args"]
    assert strategy["class_path"] == "tlframe.strategies.CDAN" and init["randomized"] == "auto"
    assert [t["class_path"] for t in init["terms"]] == ["tlframe.strategies.EntropyTerm", "tlframe.strategies.BSPTerm"]
    assert init["terms"][0]["init_args"]["weight"] == 0.1 and init["terms"][1]["init_args"]["k"] == 1
    assert {"backbone_lr_mult", "grl_max_steps", "hidden", "bn_policy"} <= set(init)  # FineTune's and DANN's knobs


# --------------------------------------------------------------------------------------------- bf16, resume, CLI runs
@pytest.mark.parametrize("make", [
    lambda: CDAN(randomized=True, randomized_dim=32, entropy_conditioning=True, hidden=16), lambda: JAN(),
    lambda: MCC(), lambda: MDD(head_width=8), lambda: AFN(), lambda: CORAL(),
    lambda: MMD(terms=[BSPTerm(), MCCTerm(), JMMDTerm(), EntropyTerm(), CORALTerm(), AFNTerm()]),
], ids=["cdan", "jan", "mcc", "mdd", "afn", "coral", "mmd_terms"])
def test_bf16_autocast_on_cpu_gives_finite_float32_losses(make):
    torch.manual_seed(0)
    model = attach(make())
    x_s, x_t = torch.randn(N, 1, 28, 28), torch.randn(N, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (z_s, f_s, g_s), (z_t, f_t, g_t) = model._forward_domains(x_s, x_t)
        assert g_s.dtype == torch.bfloat16
        out = model.strategy.compute(TransferStep(z_s=z_s, f_s=f_s, logits_s=g_s, y_s=torch.zeros(N, dtype=torch.long),
                                                  progress=Progress(STEP, 0), z_t=z_t, f_t=f_t, logits_t=g_t))
        total = out.total()
    for name, loss in out.losses.items():
        assert loss.dtype == torch.float32 and bool(torch.isfinite(loss)), name
    total.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


class CoeffRecorder(pl.Callback):
    def __init__(self):
        self.rows = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows[trainer.global_step] = (float(m["train/grl_coeff"]), bool(torch.isfinite(m["train/loss_adv"])))


def test_cdan_randomized_resume_restores_the_matrices_from_the_checkpoint(synthetic_dm, trainer_factory, tmp_path):
    def fit(max_steps, seed, ckpt_path=None):
        model = TransferModule("dtn", num_classes=10, bottleneck_dim=32,
                               strategy=CDAN(randomized=True, randomized_dim=32, randomized_seed=seed, hidden=32,
                                             entropy_conditioning=True, grl_max_steps=4))
        rec = CoeffRecorder()
        trainer = trainer_factory(max_steps=max_steps, callbacks=[rec])
        trainer.fit(model, synthetic_dm(iters_per_epoch=3), ckpt_path=ckpt_path)
        return trainer, model, rec

    first, first_model, _ = fit(3, seed=5)
    matrices = first_model.strategy.random_f.clone(), first_model.strategy.random_g.clone()
    first.save_checkpoint(tmp_path / "epoch.ckpt")
    state = torch.load(tmp_path / "epoch.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["strategy.random_f"], matrices[0]) and torch.equal(state["strategy.random_g"], matrices[1])
    # a model built with another seed resumes with the run's matrices: they are state, not configuration
    _, resumed_model, resumed = fit(6, seed=6, ckpt_path=str(tmp_path / "epoch.ckpt"))
    assert torch.equal(resumed_model.strategy.random_f, matrices[0])
    assert torch.equal(resumed_model.strategy.random_g, matrices[1])
    assert sorted(resumed.rows) == [4, 5, 6]
    for step, (coeff, finite) in resumed.rows.items():  # the schedule continues from global_step
        assert coeff == pytest.approx(warm_start_coefficient(step - 1, 4)) and finite


#: one ``tlframe fit`` per new strategy (and two combinations), with the loss terms and diagnostics it must log
CLI_RUNS = {
    "cdan": ({"class_path": "tlframe.strategies.CDAN", "init_args": {
        "entropy_conditioning": True, "randomized": True, "randomized_dim": 64, "hidden": 64}},
        {"train/loss_cls", "train/loss_adv", "train/grl_coeff", "train/domain_acc", "train/entropy_weight_t"}),
    "jan": ({"class_path": "tlframe.strategies.JAN"}, {"train/loss_cls", "train/loss_jmmd"}),
    "mcc": ({"class_path": "tlframe.strategies.MCC"}, {"train/loss_mcc", "train/target_entropy"}),
    "mdd_mcc": ({"class_path": "tlframe.strategies.MDD", "init_args": {
        "head_width": 32, "terms": [{"class_path": "tlframe.strategies.MCCTerm", "init_args": {"weight": 1.0}}]}},
        {"train/loss_mdd", "train/loss_mcc", "train/grl_coeff", "train/adv_agreement_t"}),
    "afn": ({"class_path": "tlframe.strategies.AFN", "init_args": {
        "delta": 0.3, "backbone_momentum": 0.0, "terms": [{"class_path": "tlframe.strategies.EntropyTerm",
                                                             "init_args": {"weight": 0.03}}]}},
        {"train/loss_afn", "train/loss_entropy", "train/feature_norm", "train/feature_norm_s"}),
    "coral_bsp": ({"class_path": "tlframe.strategies.CORAL", "init_args": {
        "terms": [{"class_path": "tlframe.strategies.BSPTerm", "init_args": {"weight": 1e-4}}]}},
        {"train/loss_coral", "train/loss_bsp"}),
}
QUICK = ["--data.source.init_args.num_train=100", "--data.target.init_args.num_train=100",
         "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32", "--data.batch_size=16",
         "--data.iters_per_epoch=2", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
         "--trainer.log_every_n_steps=1", "--trainer.enable_model_summary=false",
         "--trainer.enable_progress_bar=false", "--insights.a_distance=false", "--insights.projector=false"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every run of :data:`CLI_RUNS` as ``python -m tlframe fit`` subprocesses, two at a time."""
    out = tmp_path_factory.mktemp("shelf_cli")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def run(name: str):
        folder = out / name
        folder.mkdir()
        (folder / "strategy.yaml").write_text(yaml.safe_dump({"model": {"strategy": CLI_RUNS[name][0]}}))
        proc = subprocess.run([sys.executable, "-m", "tlframe", "fit", "-c", str(ROOT / "configs" / "quickstart.yaml"),
                               "-c", str(folder / "strategy.yaml"), *QUICK,
                               f"--trainer.logger.init_args.save_dir={folder / 'runs'}"],
                              capture_output=True, text=True, cwd=folder, env=env, timeout=300)
        return name, (folder / "runs" / "quickstart" / "version_0", proc)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, CLI_RUNS))


@pytest.mark.parametrize("name", list(CLI_RUNS))
def test_cli_fit_logs_every_loss_term(name, cli_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, proc = cli_runs[name]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["strategy"]["class_path"] == CLI_RUNS[name][0]["class_path"]
    tags = set(EventAccumulator(str(run)).Reload().Tags()["scalars"])
    assert CLI_RUNS[name][1] | {"train/loss", "train/loss_cls", "val/target_acc"} <= tags, sorted(tags)
    if name == "cdan":
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        assert state["strategy.random_f"].shape == (256, 64)  # quickstart: bottleneck_dim 256
