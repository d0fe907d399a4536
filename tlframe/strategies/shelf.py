"""The method shelf: CDAN, JAN, MCC, MDD, AFN and CORAL, each with TLlib's reference semantics.

Every strategy here extends :class:`~tlframe.strategies.terms.Adaptation` (a
:class:`~tlframe.strategies.FineTune`; CDAN through :class:`~tlframe.strategies.DANN`), so backbone LR
multipliers, stage freezing, gradual unfreezing, the BN policy, DDP, bf16 and resume work as for DANN, and
each takes extra loss ``terms`` (BSP, entropy, MCC, ... see :mod:`tlframe.strategies.terms`). The math is
in :mod:`tlframe.losses`; schedules are functions of ``step.progress`` (the trainer's ``global_step``);
everything a run depends on (discriminators, adversarial heads, CDAN's random matrices) is in the
``state_dict``. Shapes: ``f_*`` bottleneck features ``(N, F)``, ``logits_*`` ``(N, C)``.

Reference: Transfer-Learning-Library (TLlib), ``tllib/alignment/{cdan,jan,mdd,afn}.py``,
``tllib/self_training/mcc.py`` and ``examples/domain_adaptation/image_classification/*.py``; every
knowing difference is documented in the class.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from tlframe.checks import ConfigError, check_number
from tlframe.losses import (adaptive_feature_norm, cdan_entropy_weights, coral, domain_adversarial_loss, entropy,
                            gradient_reverse, joint_mk_mmd, margin_disparity_discrepancy, minimum_class_confusion,
                            multilinear_map, randomized_multilinear_map)
from tlframe.optim import ParamGroup
from tlframe.strategies.adaptation import DANN, check_grl_schedule, grl_coefficient
from tlframe.strategies.base import StrategyOutput, TransferStep
from tlframe.strategies.terms import Adaptation, check_alphas, check_source_pairs, mean_over_sources, target_tensors

__all__ = ["CDAN", "JAN", "MCC", "MDD", "AFN", "CORAL", "L2PreservedDropout", "CDAN_RANDOMIZED_ABOVE"]

#: CDAN (Long et al., NeurIPS 2018, Sec. 3.1): the randomized map replaces the full multilinear map when
#: ``F * C`` exceeds 4096 (``randomized: auto``).
CDAN_RANDOMIZED_ABOVE = 4096


def _tllib_linear_init(module: nn.Module, std: float, bias: float) -> None:
    """TLlib's head initialisation: every ``nn.Linear`` in ``module`` gets weights ``N(0, std)`` and a constant bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)


class CDAN(DANN):
    """Conditional domain-adversarial network (Long et al., NeurIPS 2018; TLlib ``ConditionalDomainAdversarialLoss``).

    ``loss = cls + trade_off * adv``, the discriminator on the conditioning map of the bottleneck features
    and the detached predictions ``g = softmax(logits).detach()``, through the gradient reversal (warm-start
    coefficient as DANN: ``lo=0, hi=1, max_iters=1000``)::

        h = T(f, g)          # multilinear_map (N, C*F), or randomized_multilinear_map (N, randomized_dim)
        adv = domain_adversarial_loss(D(grl(h_s)), D(grl(h_t)), w_s, w_t)

    with CDAN+E's weights ``w = cdan_entropy_weights(g_s, g_t)`` (``1 + exp(-H(g))``, normalised over both
    domains) when ``entropy_conditioning``, else none. TLlib takes one weighted mean over the concatenated
    batch; with equal source/target batch sizes (its scripts, and tlframe's data module) it is the same.
    Logs ``grl_coeff``, ``domain_acc`` and, with entropy conditioning, ``entropy_weight_t`` (the mean weight of
    a target sample; the source's is ``2 - entropy_weight_t`` for equal batch sizes).

    Args:
        trade_off: weight of the adversarial loss.
        entropy_conditioning: CDAN+E.
        randomized: the randomized multilinear map (``True``), the full one (``False``, the default of TLlib's
            CDAN example script, also in its digits lines), or ``"auto"``: randomized when ``F * C > 4096`` as
            in the paper (e.g. a 500-wide bottleneck and 10 classes: 5000 > 4096, randomized).
        randomized_dim: output width ``D`` of the randomized map (TLlib: 1024).
        randomized_seed: seed of the generator that draws the fixed random matrices ``rf (F, D)`` and
            ``rg (C, D)`` (standard normal, as TLlib's ``torch.randn``): the same matrices on every DDP rank and
            in every run with this seed, independent of the global RNG. They are buffers (``random_f``,
            ``random_g``) in the ``state_dict``, so resume and evaluation use the matrices of the run.
        hidden, discriminator_layers, discriminator_bn, discriminator_lr_mult, grl_*: as :class:`DANN` (TLlib's CDAN
            discriminator: two BN layers of 1024 hidden units).
        ``**kwargs``: ``terms`` and the :class:`~tlframe.strategies.FineTune` arguments.
    """

    def __init__(self, trade_off: float = 1.0, entropy_conditioning: bool = False,
                 randomized: Union[bool, Literal["auto"]] = False, randomized_dim: int = 1024, randomized_seed: int = 0,
                 **kwargs: Any):
        super().__init__(trade_off=trade_off, **kwargs)
        if self.domain_features != "bottleneck":
            raise ConfigError("CDAN's discriminator reads the map of the bottleneck features and the predictions: "
                              "domain_features is a DANN option; remove it, or use tlframe.strategies.DANN")
        if self.num_domains is not None:
            raise ConfigError("CDAN's discriminator is source vs target: num_domains is a DANN option (multi-source "
                              "DA); remove it, or use tlframe.strategies.DANN")
        if randomized not in (True, False, "auto") or (randomized != "auto" and not isinstance(randomized, bool)):
            raise ConfigError(f"randomized={randomized!r} must be true (randomized multilinear map), false (full "
                              f"map) or 'auto' (randomized when features x classes > {CDAN_RANDOMIZED_ABOVE})")
        check_number("randomized_dim", randomized_dim, low=1, integer=True)
        check_number("randomized_seed", randomized_seed, low=0, integer=True)
        self.entropy_conditioning = bool(entropy_conditioning)
        self.randomized = randomized
        self.randomized_dim = int(randomized_dim)
        self.randomized_seed = int(randomized_seed)
        self.use_randomized: Optional[bool] = None  # decided in attach (needs F and C)

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        features = head.out_features
        self.use_randomized = self.randomized is True or (
            self.randomized == "auto" and features * num_classes > CDAN_RANDOMIZED_ABOVE)
        if self.use_randomized:
            gen = torch.Generator().manual_seed(self.randomized_seed)
            self.register_buffer("random_f", torch.randn(features, self.randomized_dim, generator=gen))
            self.register_buffer("random_g", torch.randn(num_classes, self.randomized_dim, generator=gen))
        super().attach(backbone, head, num_classes)

    def discriminator_in_features(self, head: nn.Module, num_classes: int) -> int:
        return self.randomized_dim if self.use_randomized else head.out_features * num_classes

    def conditioning(self, f: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The (randomized) multilinear map ``T(f, g)`` (float32 under autocast)."""
        if self.use_randomized:
            return randomized_multilinear_map(f, probs, self.random_f, self.random_g)
        return multilinear_map(f, probs)

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        f_t, logits_t = target_tensors(step, "CDAN")
        coeff = self.coefficient(step.progress.step, step.progress.total_steps)
        probs_s = F.softmax(step.logits_s.float(), dim=1).detach()
        probs_t = F.softmax(logits_t.float(), dim=1).detach()
        d_s, d_t = self.discriminate(self.conditioning(step.f_s, probs_s), self.conditioning(f_t, probs_t), coeff)
        logs: dict[str, Any] = {"grl_coeff": coeff}
        w_s = w_t = None
        if self.entropy_conditioning:
            w_s, w_t = cdan_entropy_weights(probs_s, probs_t)
            logs["entropy_weight_t"] = w_t.mean()
        shift = self.source_sample_weight(step.y_s)  # label_shift: w[y_s] on the source half
        if shift is not None:
            w_s = shift if w_s is None else w_s * shift
        adv, logs["domain_acc"] = domain_adversarial_loss(d_s, d_t, w_s, w_t)
        return StrategyOutput(losses={"cls": self.classification_loss(step), "adv": adv},
                              weights={"adv": self.trade_off}, logs=logs)


class JAN(Adaptation):
    """Joint adaptation networks (Long et al., ICML 2017; TLlib ``JointMultipleKernelMaximumMeanDiscrepancy``).

    ``loss = cls + trade_off * jmmd`` with ``jmmd = joint_mk_mmd(f_s, f_t, softmax(logits_s), softmax(logits_t))``
    (the probabilities are *not* detached, as in TLlib's example). This is the non-adversarial JAN, the
    default of TLlib's ``jan.py`` (its ``--adversarial`` variant with learnable ``Theta`` layers, JAN-A, is not
    implemented). Logs ``jmmd``.

    Args:
        trade_off: weight of the joint MMD.
        alphas: bandwidth multipliers of the feature kernels (TLlib: ``2^-3 ... 2^1``).
        prob_sigma: the fixed bandwidth of the Gaussian kernel on the probabilities (TLlib: 0.92).
        linear: linear-time estimator (needs equal batch sizes).
        offset: TLlib's constant ``2/(n-1)`` (value only).
        ``**kwargs``: ``terms`` and the :class:`~tlframe.strategies.FineTune` arguments (``bn_policy`` joint
            by default: TLlib's JAN forwards ``cat(x_s, x_t)``).
    """

    own_losses = ("cls", "jmmd")

    def __init__(self, trade_off: float = 1.0, alphas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0),
                 prob_sigma: float = 0.92, linear: bool = False, offset: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        check_number("trade_off", trade_off, low=0)
        check_number("prob_sigma", prob_sigma, low=0, low_open=True)
        self.trade_off = trade_off
        self.alphas = check_alphas(alphas)
        self.prob_sigma = float(prob_sigma)
        self.linear = linear
        self.offset = offset

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        f_t, logits_t = target_tensors(step, "JAN")
        value = joint_mk_mmd(step.f_s, f_t, F.softmax(step.logits_s.float(), dim=1), F.softmax(logits_t.float(), dim=1),
                             self.alphas, self.prob_sigma, linear=self.linear, offset=self.offset)
        return StrategyOutput(losses={"cls": self.classification_loss(step), "jmmd": value},
                              weights={"jmmd": self.trade_off})


class MCC(Adaptation):
    """Minimum Class Confusion (Jin et al., ECCV 2020; TLlib ``MinimumClassConfusionLoss``).

    ``loss = cls + trade_off * minimum_class_confusion(logits_t, temperature)``. Logs ``mcc`` and
    ``target_entropy`` (mean prediction entropy of the target batch, a diagnostic, not trained on).

    Args:
        trade_off: weight of the MCC loss (TLlib: 1.0).
        temperature: softmax temperature ``T`` (TLlib: 2.5).
        ``**kwargs``: ``terms`` and the :class:`~tlframe.strategies.FineTune` arguments.
    """

    own_losses = ("cls", "mcc")

    def __init__(self, trade_off: float = 1.0, temperature: float = 2.5, **kwargs: Any):
        super().__init__(**kwargs)
        check_number("trade_off", trade_off, low=0)
        check_number("temperature", temperature, low=0, low_open=True)
        self.trade_off = trade_off
        self.temperature = float(temperature)

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        _, logits_t = target_tensors(step, "MCC")
        with torch.no_grad():
            target_entropy = entropy(logits_t)
        return StrategyOutput(losses={"cls": self.classification_loss(step),
                                      "mcc": minimum_class_confusion(logits_t, self.temperature)},
                              weights={"mcc": self.trade_off}, logs={"target_entropy": target_entropy})


class MDD(Adaptation):
    """Margin Disparity Discrepancy (Zhang et al., ICML 2019; TLlib ``alignment/mdd.py`` and ``examples/.../mdd.py``).

    An adversarial classifier head ``h'`` on the bottleneck features, reached through a gradient reversal
    with the warm-start coefficient at ``lo=0, hi=0.1, max_iters=1000`` (TLlib's ``ImageClassifier``)::

        mdd  = margin_disparity_discrepancy(logits_s, h'(grl(f_s)), logits_t, h'(grl(f_t)), margin)
        loss = cls - trade_off * mdd

    so ``h'`` maximises ``mdd`` and the features minimise it (the main head only sees ``cls``: the MDD uses
    its argmax). Logged: ``train/loss_mdd`` (the discrepancy, weight ``-trade_off``), ``grl_coeff`` and
    ``adv_agreement_t`` (how often ``h'`` agrees with the main head on the target batch).

    MDD's own head (TLlib's ``mdd.ImageClassifier``): bottleneck ``Linear(D, B)-BN-ReLU-Dropout(0.5)``, set with
    the module's ``bottleneck_dim: B`` (TLlib: 1024 for digits, its default) and ``bottleneck_dropout: 0.5``;
    main and adversarial heads ``Linear(B, W)-ReLU-Dropout(0.5)-Linear(W, C)`` with ``W = head_width`` (TLlib
    ``width = bottleneck_dim``). With ``head_width`` set, the strategy replaces the module's linear classifier
    by this two-layer head in ``attach`` (checkpoint keys ``head.classifier.0/3.*``); ``head_width: null``
    keeps a linear classifier and makes the adversarial head linear too.

    Args:
        trade_off: weight of the MDD (TLlib: 1.0).
        margin: the margin ``gamma`` (TLlib: 4.0).
        head_width: hidden width ``W`` of the main and adversarial heads, or ``null`` for linear heads.
        head_dropout: dropout in the heads (TLlib: 0.5).
        adversarial_lr_mult: LR multiplier of the adversarial head (TLlib: that of the heads, 1.0).
        reference_init: TLlib's initialisation: head layers ``N(0, 0.01)`` with zero bias, the bottleneck's
            linear layer ``N(0, 0.005)`` with bias 0.1 (else PyTorch's defaults).
        grl_max_steps, grl_alpha, grl_lo, grl_hi: the reversal's warm-start schedule (TLlib's MDD: 1000, 1, 0, 0.1).
        ``**kwargs``: ``terms`` and the :class:`~tlframe.strategies.FineTune` arguments (joint BN by default:
            TLlib's MDD forwards ``cat(x_s, x_t)``).
    """

    own_losses = ("cls", "mdd")

    def __init__(self, trade_off: float = 1.0, margin: float = 4.0, head_width: Optional[int] = 1024,
                 head_dropout: float = 0.5, adversarial_lr_mult: float = 1.0, reference_init: bool = True,
                 grl_max_steps: Union[int, Literal["auto"]] = 1000, grl_alpha: float = 1.0, grl_lo: float = 0.0,
                 grl_hi: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        check_number("trade_off", trade_off, low=0)
        check_number("margin", margin, low=0, low_open=True)
        if head_width is not None:
            check_number("head_width", head_width, low=1, integer=True)
        check_number("head_dropout", head_dropout, low=0, high=1, high_open=True)
        check_number("adversarial_lr_mult", adversarial_lr_mult, low=0)
        check_grl_schedule(grl_max_steps, grl_alpha, grl_lo, grl_hi)
        self.trade_off = trade_off
        self.margin = float(margin)
        self.head_width = None if head_width is None else int(head_width)
        self.head_dropout = float(head_dropout)
        self.adversarial_lr_mult = adversarial_lr_mult
        self.reference_init = reference_init
        self.grl_max_steps = grl_max_steps
        self.grl = dict(alpha=grl_alpha, lo=grl_lo, hi=grl_hi)
        self.adversarial_head: Optional[nn.Module] = None

    def _head(self, in_features: int, num_classes: int) -> nn.Module:
        if self.head_width is None:
            return nn.Linear(in_features, num_classes)
        return nn.Sequential(nn.Linear(in_features, self.head_width), nn.ReLU(inplace=True),
                             nn.Dropout(self.head_dropout), nn.Linear(self.head_width, num_classes))

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        if self.head_width is not None:
            head.classifier = self._head(head.out_features, num_classes)
        self.adversarial_head = self._head(head.out_features, num_classes)
        if self.reference_init:
            _tllib_linear_init(head.classifier, 0.01, 0.0)
            _tllib_linear_init(self.adversarial_head, 0.01, 0.0)
            first = next((m for m in head.bottleneck.modules() if isinstance(m, nn.Linear)), None)
            if first is not None:
                nn.init.normal_(first.weight, 0.0, 0.005)
                nn.init.constant_(first.bias, 0.1)

    def param_groups(self, backbone: nn.Module, head: nn.Module) -> list[ParamGroup]:
        return super().param_groups(backbone, head) + [
            {"name": "adversarial_head", "params": list(self.adversarial_head.parameters()),
             "lr_mult": self.adversarial_lr_mult}]

    def coefficient(self, step: int, total_steps: Optional[int] = None) -> float:
        """GRL coefficient of the adversarial head at optimizer step ``step``."""
        return grl_coefficient(step, total_steps, self.grl_max_steps, **self.grl)

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        f_t, logits_t = target_tensors(step, "MDD")
        coeff = self.coefficient(step.progress.step, step.progress.total_steps)
        n = step.f_s.shape[0]
        adv = self.adversarial_head(gradient_reverse(torch.cat([step.f_s, f_t]), coeff))
        adv_s, adv_t = adv[:n], adv[n:]
        mdd = margin_disparity_discrepancy(step.logits_s, adv_s, logits_t, adv_t, self.margin)
        with torch.no_grad():
            agreement = (adv_t.argmax(dim=1) == logits_t.argmax(dim=1)).float().mean()
        return StrategyOutput(losses={"cls": self.classification_loss(step), "mdd": mdd},
                              weights={"mdd": -self.trade_off},
                              logs={"grl_coeff": coeff, "adv_agreement_t": agreement})


class L2PreservedDropout(nn.Module):
    """AFN's dropout (TLlib ``afn.Block``): ``x * mask / sqrt(1 - p)`` in training (the L2 norm is preserved in
    expectation, where standard dropout's ``1 / (1 - p)`` preserves the mean); identity in eval mode."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        check_number("dropout", p, low=0, high=1, high_open=True)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return F.dropout(x, self.p, training=True) * math.sqrt(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AFN(Adaptation):
    """Stepwise Adaptive Feature Norm (Xu et al., ICCV 2019; TLlib ``alignment/afn.py``, ``examples/.../afn.py``).

    ``loss = cls + trade_off * (adaptive_feature_norm(f_s, delta) + adaptive_feature_norm(f_t, delta))`` on
    the bottleneck features of both domains (as TLlib's example), which end with the paper's dropout
    before the classifier: the strategy puts an :class:`L2PreservedDropout` (``dropout``) at the end of the
    module's bottleneck (replacing its ``bottleneck_dropout``), so ``f`` (seen by the norm loss and the
    classifier) is the dropped-out feature, as in TLlib's ``Block`` (FC-BN-ReLU-Dropout). TLlib's AFN adds
    entropy minimisation on the target with ``--trade-off-entropy`` (0.03 for digits): add an ``EntropyTerm``.
    Logs ``afn`` (always ``2 delta^2`` in value; its gradient grows the norms), ``feature_norm`` (mean L2 norm
    over both domains), ``feature_norm_s`` and ``feature_norm_t``.

    Args:
        trade_off: weight of the norm loss (TLlib ``--trade-off-norm``: 0.05).
        delta: the norm increment ``Delta r`` per step (TLlib: 1.0; digits 0.3 / 0.1).
        dropout: probability of the L2-preserving dropout at the end of the bottleneck (TLlib: 0.5);
            ``null`` keeps the module's bottleneck as configured.
        reference_init: TLlib's initialisation of the bottleneck and classifier (linear weights and biases
            ``N(0, 0.01)``, BN weights ``N(1, 0.01)`` and zero bias).
        backbone_momentum: SGD momentum of the backbone's parameter group(s) (TLlib's AFN: 0, the head 0.9);
            ``null`` keeps the optimizer's. Only the default SGD (and optimizers with a ``momentum`` option)
            uses it.
        ``**kwargs``: ``terms`` and the :class:`~tlframe.strategies.FineTune` arguments; ``bn_policy`` is
            ``separate`` by default (TLlib's AFN forwards the two domains separately).
    """

    own_losses = ("cls", "afn")

    def __init__(self, trade_off: float = 0.05, delta: float = 1.0, dropout: Optional[float] = 0.5,
                 reference_init: bool = True, backbone_momentum: Optional[float] = None,
                 bn_policy: Literal["joint", "separate"] = "separate", **kwargs: Any):
        super().__init__(bn_policy=bn_policy, **kwargs)
        check_number("trade_off", trade_off, low=0)
        check_number("delta", delta, low=0, low_open=True)
        if dropout is not None:
            check_number("dropout", dropout, low=0, high=1, high_open=True)
        if backbone_momentum is not None:
            check_number("backbone_momentum", backbone_momentum, low=0, high=1)
        self.trade_off = trade_off
        self.delta = float(delta)
        self.dropout = None if dropout is None else float(dropout)
        self.reference_init = reference_init
        self.backbone_momentum = backbone_momentum

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        if self.dropout is not None:
            bottleneck = head.bottleneck
            drop = L2PreservedDropout(self.dropout)
            if isinstance(bottleneck, nn.Sequential):
                idx = [i for i, m in enumerate(bottleneck) if isinstance(m, nn.Dropout)]
                if idx:
                    bottleneck[idx[-1]] = drop
                else:
                    bottleneck.append(drop)
            else:  # bottleneck_dim: 0 (identity): the dropout alone, before the classifier
                head.bottleneck = drop
        if self.reference_init:
            for m in [*head.bottleneck.modules(), *head.classifier.modules()]:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, 0.01)
                    nn.init.normal_(m.bias, 0.0, 0.01)
                elif isinstance(m, nn.BatchNorm1d) and m.affine:
                    nn.init.normal_(m.weight, 1.0, 0.01)
                    nn.init.zeros_(m.bias)

    def param_groups(self, backbone: nn.Module, head: nn.Module) -> list[ParamGroup]:
        groups = super().param_groups(backbone, head)
        if self.backbone_momentum is not None:
            for g in groups:
                if g["name"].startswith("backbone"):
                    g["momentum"] = self.backbone_momentum
        return groups

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        f_t, _ = target_tensors(step, "AFN")
        loss = adaptive_feature_norm(step.f_s, self.delta) + adaptive_feature_norm(f_t, self.delta)
        with torch.no_grad():
            norm_s, norm_t = step.f_s.float().norm(dim=1), f_t.float().norm(dim=1)
            logs = {"feature_norm": torch.cat([norm_s, norm_t]).mean(), "feature_norm_s": norm_s.mean(),
                    "feature_norm_t": norm_t.mean()}
        return StrategyOutput(losses={"cls": self.classification_loss(step), "afn": loss},
                              weights={"afn": self.trade_off}, logs=logs)


class CORAL(Adaptation):
    """Deep CORAL (Sun & Saenko, ECCV 2016 workshops; TLlib ``CorrelationAlignmentLoss``).

    ``loss = cls + trade_off * coral(f_s, f_t, scale)`` on the bottleneck features. ``scale="tllib"`` (default):
    mean term plus ``||C_s - C_t||_F^2 / d^2`` as TLlib's code computes it; ``scale="paper"``: the paper's
    ``||C_s - C_t||_F^2 / (4 d^2)`` (see :func:`tlframe.losses.coral`). Logs ``coral``.

    Args:
        trade_off: weight of the CORAL loss.
        scale: ``"tllib"`` or ``"paper"``.
        source_pairs: ``"pooled"`` (default) or ``"each"``: the mean over the source domains of each one's CORAL
            distance to the target (multi-source DA).
        ``**kwargs``: ``terms`` and the :class:`~tlframe.strategies.FineTune` arguments.
    """

    own_losses = ("cls", "coral")

    def __init__(self, trade_off: float = 1.0, scale: Literal["tllib", "paper"] = "tllib",
                 source_pairs: Literal["pooled", "each"] = "pooled", **kwargs: Any):
        super().__init__(**kwargs)
        check_source_pairs(source_pairs)
        self.source_pairs = source_pairs
        check_number("trade_off", trade_off, low=0)
        if scale not in ("tllib", "paper"):
            raise ConfigError(f"scale={scale!r} must be 'tllib' (mean + covariance terms, TLlib's code) or 'paper' "
                              "(||C_s - C_t||_F^2 / (4 d^2))")
        self.trade_off = trade_off
        self.scale = scale

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        f_t, _ = target_tensors(step, "CORAL")
        def distance(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
            return coral(f_s, f_t, self.scale)

        value = mean_over_sources(step, step.f_s, f_t, distance) if self.source_pairs == "each" else distance(step.f_s, f_t)
        return StrategyOutput(losses={"cls": self.classification_loss(step), "coral": value},
                              weights={"coral": self.trade_off})
