"""Unsupervised domain adaptation strategies: DANN (adversarial) and MMD (kernel discrepancy).

Both extend :class:`~tlframe.strategies.terms.Adaptation` (a :class:`FineTune`), so backbone LR
multiplier, stage freezing, gradual unfreezing and layer-wise LR decay work with them too, and
both take extra loss ``terms`` (e.g. DANN + ``MCCTerm``, DANN + ``BSPTerm``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from tlframe.checks import ConfigError, check_number
from tlframe.heads import linear_relu_blocks
from tlframe.losses import domain_adversarial_loss, gradient_reverse, mk_mmd, warm_start_coefficient
from tlframe.optim import ParamGroup
from tlframe.strategies.base import StrategyOutput, TransferStep
from tlframe.strategies.terms import Adaptation, check_source_pairs, mean_over_sources

__all__ = ["DomainDiscriminator", "DANN", "MMD", "check_grl_schedule", "grl_coefficient",
           "multi_domain_adversarial_loss"]


def check_grl_schedule(grl_max_steps: Any, grl_alpha: float, grl_lo: float, grl_hi: float) -> None:
    """Check the warm-start GRL schedule arguments of DANN, CDAN and MDD (one clear error per bad value)."""
    if grl_max_steps != "auto" and (isinstance(grl_max_steps, bool) or not isinstance(grl_max_steps, int)
                                    or grl_max_steps < 1):
        raise ValueError(f"grl_max_steps={grl_max_steps!r} must be a positive number of steps or 'auto' "
                         "(the run's total steps).")
    check_number("grl_alpha", grl_alpha, low=0, low_open=True)
    check_number("grl_lo", grl_lo)
    check_number("grl_hi", grl_hi)


def grl_coefficient(step: int, total_steps: Optional[int], max_steps: Union[int, Literal["auto"]], alpha: float,
                    lo: float, hi: float) -> float:
    """:func:`~tlframe.losses.warm_start_coefficient` at optimizer step ``step``; ``max_steps="auto"`` uses the
    run's ``total_steps`` (so ``step / max_steps`` is the training progress ``p``)."""
    if max_steps == "auto":
        if not total_steps:
            raise ValueError("grl_max_steps='auto' needs the run's total steps: set trainer.max_steps or "
                             "trainer.max_epochs (an open-ended run has no training progress p).")
        max_steps = total_steps
    return warm_start_coefficient(step, max_steps, alpha=alpha, lo=lo, hi=hi)


class DomainDiscriminator(nn.Sequential):
    """``layers`` x ``Linear-BN-ReLU`` of width ``hidden``, then ``Linear``: features ``(N, in_features)`` -> domain
    logits ``(N, out_features)`` (1: source vs target; k: one per domain). The default, two BN layers of 1024, is
    TLlib's; Ganin & Lempitsky's digit discriminator is ``hidden=100, layers=1, batch_norm=False``."""

    def __init__(self, in_features: int, hidden: int = 1024, batch_norm: bool = True, out_features: int = 1,
                 layers: int = 2):
        hidden_layers = linear_relu_blocks(in_features, hidden, layers, batch_norm) if layers else []
        super().__init__(*hidden_layers, nn.Linear(hidden if layers else in_features, out_features))


class DANN(Adaptation):
    """Domain-adversarial training (Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016).

    ``loss = cls + trade_off * adv`` with ``adv = domain_adversarial_loss(D(grl(f_s)), D(grl(f_t)))``
    on the bottleneck features ``f``, where ``grl`` reverses gradients scaled by
    ``coeff = warm_start_coefficient(global_step, grl_max_steps, grl_alpha, grl_lo, grl_hi)``.
    One optimizer: the reversal makes the feature extractor maximise what the discriminator
    minimises. Logs ``grl_coeff`` and ``domain_acc`` every step. With ``label_shift: bbse`` each source
    sample's domain loss is weighted by its class's importance weight ``w[y_s]`` (so the discriminator sees the
    source reweighted to the target's class proportions, the importance-weighted DANN of Combes et al.,
    NeurIPS 2020), as is its cross-entropy.

    Args:
        trade_off: weight of the adversarial loss.
        hidden: width of the discriminator's hidden layers.
        discriminator_layers: number of hidden layers (2, TLlib's; Ganin & Lempitsky's digit networks use 1).
        discriminator_bn: batch norm after each hidden layer (TLlib's; the paper's discriminator has none).
        discriminator_lr_mult: LR multiplier of the discriminator's parameter group.
        grl_max_steps, grl_alpha, grl_lo, grl_hi: warm-start schedule of the reversal coefficient.
            ``grl_max_steps`` is TLlib's fixed 1000 steps by default (for parity with its numbers),
            whatever the run's length; ``"auto"`` ties it to the run: ``max_steps`` = the run's
            total optimizer steps, so ``step / max_steps`` is the paper's training progress ``p``
            in [0, 1]. Ganin & Lempitsky's ``lambda_p = 2 / (1 + exp(-10 p)) - 1`` is
            ``grl_max_steps: auto, grl_alpha: 10``.
        domain_features: what the discriminator reads. ``"bottleneck"`` (default, TLlib's): the bottleneck features
            ``f``, so the reversed gradient trains the bottleneck and the backbone. ``"backbone"``: the backbone's
            features ``z`` (Ganin & Lempitsky's split for their digit CNNs: the domain classifier and the label
            predictor both start after the convolutions), so the bottleneck belongs to the label predictor and the
            reversed gradient reaches the backbone only.
        num_domains: ``None`` (default): a source-vs-target discriminator (one logit, binary cross-entropy);
            an integer ``k``: multi-source DA with :class:`~tlframe.data.MultiDomainDataModule`, a discriminator
            with one output per domain (the ``S`` sources, then the ``T`` targets; ``k = S + T``) trained with the
            cross-entropy of each row's domain index, ``adv = mean_i CE(D(grl(f_i)), d_i)`` over all rows.
        ``**kwargs``: ``terms`` (extra loss terms, see :mod:`tlframe.strategies.terms`) and the
            :class:`FineTune` arguments (backbone LR multiplier, freezing, ...).
    """

    uses_target = True
    own_losses = ("cls", "adv")

    def __init__(self, trade_off: float = 1.0, hidden: int = 1024, discriminator_layers: int = 2,
                 discriminator_bn: bool = True, discriminator_lr_mult: float = 1.0,
                 grl_max_steps: Union[int, Literal["auto"]] = 1000, grl_alpha: float = 1.0, grl_lo: float = 0.0, grl_hi: float = 1.0,
                 num_domains: Optional[int] = None, domain_features: Literal["bottleneck", "backbone"] = "bottleneck",
                 **kwargs: Any):
        super().__init__(**kwargs)
        if domain_features not in ("bottleneck", "backbone"):
            raise ConfigError(f"domain_features={domain_features!r} must be 'bottleneck' (the bottleneck features, "
                              "TLlib's) or 'backbone' (the backbone's features, Ganin & Lempitsky's split)")
        self.domain_features = domain_features
        if num_domains is not None:
            check_number("num_domains", num_domains, low=2, integer=True)
        self.num_domains = num_domains
        self.trade_off = trade_off
        self.hidden = hidden
        self.discriminator_lr_mult = discriminator_lr_mult
        check_grl_schedule(grl_max_steps, grl_alpha, grl_lo, grl_hi)
        check_number("trade_off", trade_off, low=0)
        check_number("hidden", hidden, low=1, integer=True)
        check_number("discriminator_layers", discriminator_layers, low=0, integer=True)
        self.discriminator_layers = discriminator_layers
        self.discriminator_bn = discriminator_bn
        check_number("discriminator_lr_mult", discriminator_lr_mult, low=0)
        self.grl_max_steps = grl_max_steps
        self.grl = dict(alpha=grl_alpha, lo=grl_lo, hi=grl_hi)
        self.discriminator: Optional[DomainDiscriminator] = None

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        width = backbone.num_features if self.domain_features == "backbone" else self.discriminator_in_features(
            head, num_classes)
        self.discriminator = DomainDiscriminator(width, self.hidden, batch_norm=self.discriminator_bn,
                                                 out_features=self.num_domains or 1, layers=self.discriminator_layers)

    def on_setup(self, stage: str, datamodule: Any) -> None:
        super().on_setup(stage, datamodule)
        if stage != "fit" or datamodule is None:
            return
        found = getattr(datamodule, "num_source_domains", 1) + getattr(datamodule, "num_target_domains", 1)
        if self.num_domains is not None and self.num_domains != found:
            raise ConfigError(f"num_domains={self.num_domains}, but the data has {found} training domains (sources and "
                              f"targets): set model.strategy.init_args.num_domains: {found}")
        if self.num_domains is None and found > 2:
            rank_zero_info(f"tlframe: {type(self).__name__} with {found} training domains and a source-vs-target "
                           f"discriminator; num_domains: {found} gives one output per domain")

    def discriminator_in_features(self, head: nn.Module, num_classes: int) -> int:
        """Width of the discriminator's input: the bottleneck features (CDAN: their conditioning map)."""
        return head.out_features

    def param_groups(self, backbone: nn.Module, head: nn.Module) -> list[ParamGroup]:
        return super().param_groups(backbone, head) + [
            {"name": "discriminator", "params": list(self.discriminator.parameters()), "lr_mult": self.discriminator_lr_mult}
        ]

    def coefficient(self, step: int, total_steps: Optional[int] = None) -> float:
        """GRL coefficient at optimizer step ``step`` of a run of ``total_steps`` (used with ``grl_max_steps: auto``)."""
        return grl_coefficient(step, total_steps, self.grl_max_steps, **self.grl)

    def discriminate(self, h_s: torch.Tensor, h_t: torch.Tensor, coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Domain logits of ``grl(h_s)`` and ``grl(h_t)``: one batch under ``bn_policy: joint``, two otherwise."""
        if self.bn_policy == "joint":
            d = self.discriminator(gradient_reverse(torch.cat([h_s, h_t]), coeff))
            return d[: h_s.shape[0]], d[h_s.shape[0]:]
        return self.discriminator(gradient_reverse(h_s, coeff)), self.discriminator(gradient_reverse(h_t, coeff))

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        coeff = self.coefficient(step.progress.step, step.progress.total_steps)
        h_s, h_t = (step.z_s, step.z_t) if self.domain_features == "backbone" else (step.f_s, step.f_t)
        d_s, d_t = self.discriminate(h_s, h_t, coeff)
        if self.num_domains is not None:
            adv, domain_acc = multi_domain_adversarial_loss(d_s, d_t, step)
        else:
            adv, domain_acc = domain_adversarial_loss(d_s, d_t, self.source_sample_weight(step.y_s))
        return StrategyOutput(losses={"cls": self.classification_loss(step), "adv": adv},
                              weights={"adv": self.trade_off},
                              logs={"grl_coeff": coeff, "domain_acc": domain_acc})


def multi_domain_adversarial_loss(d_s: torch.Tensor, d_t: torch.Tensor, step: TransferStep) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a ``k``-way domain discriminator's logits ``(N_s, k)``, ``(N_t, k)`` against each row's domain
    (sources ``d_s``, targets ``S + d_t``), mean over all rows; and the discriminator's accuracy."""
    zeros_s = torch.zeros(d_s.shape[0], dtype=torch.long, device=d_s.device)
    zeros_t = torch.zeros(d_t.shape[0], dtype=torch.long, device=d_t.device)
    labels = torch.cat([step.d_s if step.d_s is not None else zeros_s,
                        step.num_source_domains + (step.d_t if step.d_t is not None else zeros_t)])
    logits = torch.cat([d_s, d_t]).float()
    return nn.functional.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean().detach()


class MMD(Adaptation):
    """Deep adaptation by multi-kernel MMD (DAN, Long et al., ICML 2015).

    ``loss = cls + trade_off * mk_mmd(f_s, f_t)`` on the bottleneck features. Logs ``mmd``.
    Under DDP the MMD is computed per rank on the local batches (no gather).

    Args:
        trade_off: weight of the MMD term.
        alphas: bandwidth multipliers of the Gaussian kernels.
        linear: linear-time estimator instead of the quadratic U-statistic.
        offset: add TLlib's constant ``2/(n-1)`` (value only; gradients are the same).
        source_pairs: ``"pooled"`` (default): every source row against the target; ``"each"``: the mean over the
            source domains of each one's MMD to the target (multi-source DA, :func:`mean_over_sources`).
        ``**kwargs``: ``terms`` (extra loss terms) and the :class:`FineTune` arguments. Default
            ``bn_policy`` is ``"separate"``, as in the reference DAN.
    """

    uses_target = True
    own_losses = ("cls", "mmd")

    def __init__(self, trade_off: float = 1.0, alphas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0),
                 linear: bool = False, offset: bool = True, bn_policy: Literal["joint", "separate"] = "separate",
                 source_pairs: Literal["pooled", "each"] = "pooled", **kwargs: Any):
        super().__init__(bn_policy=bn_policy, **kwargs)
        check_source_pairs(source_pairs)
        self.source_pairs = source_pairs
        check_number("trade_off", trade_off, low=0)
        if not alphas:
            raise ValueError("alphas is empty: give at least one kernel bandwidth multiplier, e.g. [0.5, 1.0, 2.0]")
        for a in alphas:
            check_number("alphas[i]", a, low=0, low_open=True)
        self.trade_off = trade_off
        self.alphas = tuple(alphas)
        self.linear = linear
        self.offset = offset

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        def distance(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
            return mk_mmd(f_s, f_t, self.alphas, linear=self.linear, offset=self.offset)

        value = (mean_over_sources(step, step.f_s, step.f_t, distance) if self.source_pairs == "each"
                 else distance(step.f_s, step.f_t))
        return StrategyOutput(losses={"cls": self.classification_loss(step), "mmd": value},
                              weights={"mmd": self.trade_off}, logs={})
