"""Composable loss terms: add entropy, MCC, BSP, MMD, JMMD, CORAL or AFN to any adaptation strategy in YAML.

Design
------
A :class:`LossTerm` is a small ``nn.Module`` with a ``weight`` and a ``name``; ``compute(step)`` returns its
loss (a scalar tensor) and a dict of diagnostics. :class:`Adaptation` (the base of every strategy that trains
on the target: DANN, MMD, CDAN, JAN, MCC, MDD, AFN, CORAL) takes ``terms: list[LossTerm]`` and keeps them in
an ``nn.ModuleList`` (so they move to the device, sit in the ``state_dict`` and are wrapped by DDP with the
strategy). Its ``compute(step)`` is the strategy's own ``compute_transfer(step)`` (``cls`` plus the method's
losses) with every term added::

    StrategyOutput.losses[term.name]  = term loss         (logged as train/loss_<name>)
    StrategyOutput.weights[term.name] = term.weight       (total = sum weight * loss)
    StrategyOutput.logs[f"{term.name}_{k}"] = diagnostic  (logged as train/<name>_<k>)

so a combination from the literature is one YAML file, each term with its weight, and no new class::

    model:
      strategy:
        class_path: tlframe.strategies.DANN          # DANN + MCC
        init_args:
          trade_off: 1.0
          terms:
            - class_path: tlframe.strategies.MCCTerm
              init_args: {weight: 1.0, temperature: 2.5}

The same with ``CDAN`` + ``BSPTerm`` (CDAN+BSP), ``MDD`` + ``MCCTerm``, ``CDAN(entropy_conditioning: true)`` +
``EntropyTerm`` (CDAN+E+entropy), or :class:`Adaptation` alone + ``EntropyTerm`` (entropy minimisation on top
of fine-tuning). A term's name defaults to its kind (``mcc``, ``entropy``, ``bsp``, ...); a name that another
term or the strategy already uses is an error that names the clash (give one of them ``name: ...``).

Only :class:`Adaptation` strategies take terms: :class:`~tlframe.strategies.FineTune` stays the source-only
recipe (``tlframe.baselines`` derives a run's source-only baseline by keeping FineTune's arguments, so terms
must not be one of them). Every term here uses the target batch, so the strategy forwards it
(``uses_target``). A term with modules of its own builds them in ``attach`` and returns their parameter
groups from ``param_groups``; the loss math lives in :mod:`tlframe.losses`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from torch import nn

from tlframe.checks import ConfigError, check_number
from tlframe.losses import (adaptive_feature_norm, batch_spectral_penalty, coral, entropy, joint_mk_mmd,
                            minimum_class_confusion, mk_mmd)
from tlframe.optim import ParamGroup
from tlframe.strategies.base import Progress, StrategyOutput, TransferStep, checked_weight_and_name
from tlframe.strategies.finetune import FineTune

__all__ = ["LossTerm", "Adaptation", "EntropyTerm", "MCCTerm", "BSPTerm", "MMDTerm", "JMMDTerm", "CORALTerm",
           "AFNTerm", "check_alphas", "target_tensors"]



def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    """The Gaussian-kernel bandwidth multipliers of (J)MMD, checked: a non-empty list of positive numbers."""
    if not alphas:
        raise ConfigError("alphas is empty: give at least one kernel bandwidth multiplier, e.g. [0.5, 1.0, 2.0]")
    for a in alphas:
        check_number("alphas[i]", a, low=0, low_open=True)
    return tuple(float(a) for a in alphas)


def target_tensors(step: TransferStep, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f_t, logits_t)`` of ``step``; a clear error when the target batch was not forwarded."""
    if step.f_t is None or step.logits_t is None:
        raise RuntimeError(f"{who} needs the target batch, but the step has none: use it inside a strategy that "
                           "trains on the target (uses_target), e.g. tlframe.strategies.Adaptation")
    return step.f_t, step.logits_t


def mean_over_sources(step: TransferStep, f_s: torch.Tensor, f_t: torch.Tensor, distance) -> torch.Tensor:
    """Multi-source DA: ``1/S sum_i distance(f_s[d_s == i], f_t)``, the mean over the training domains (with rows in
    this batch) of each one's distance to the (pooled) target features; with one source, ``distance(f_s, f_t)``."""
    parts = [rows for rows in step.source_domains() if rows.numel() > 1]
    if len(parts) <= 1:
        return distance(f_s, f_t)
    return torch.stack([distance(f_s[rows], f_t) for rows in parts]).mean()


def check_source_pairs(source_pairs: str) -> None:
    if source_pairs not in ("pooled", "each"):
        raise ConfigError(f"source_pairs={source_pairs!r} must be 'pooled' (all source rows against the target) or "
                          "'each' (the mean over the source domains of each one against the target: multi-source DA)")


class LossTerm(nn.Module):
    """One weighted loss added to a strategy's losses (see the module docstring).

    Args:
        weight: multiplier of the loss in the total (>= 0).
        name: the loss's name in the logs (``train/loss_<name>``) and in ``StrategyOutput``; default: the
            term's kind (:attr:`kind`). Letters, digits and ``_``; not ``cls``.

    Subclasses set :attr:`kind` and implement :meth:`compute`.
    """

    #: default name of the term's loss
    kind: str = "term"
    #: whether the term needs the target batch (all terms here do)
    uses_target: bool = True
    #: views of each target image the term needs: 1, or 2 (weak, strong) for self-training terms
    target_views: int = 1

    def __init__(self, weight: float = 1.0, name: Optional[str] = None):
        super().__init__()
        self.weight, self.name = checked_weight_and_name(self, weight, name, example="mcc2")

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        """Build the term's own modules (none by default)."""

    def param_groups(self) -> list[ParamGroup]:
        """Parameter groups of the term's own modules (none by default)."""
        return []

    def ddp_ignored(self) -> list[str]:
        """Names (relative to the term) of state DDP must neither broadcast nor synchronise (none by default)."""
        return []

    def on_train_start(self, progress: Progress, trainer: Any) -> None:
        """Training starts (``progress.step == 0`` on a fresh run)."""

    def on_train_batch_start(self, progress: Progress) -> None:
        """Before the step's forward pass (e.g. an EMA teacher follows the student's last optimizer step)."""

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(loss, logs)`` for one step: a scalar tensor and diagnostics (floats or 0-d tensors)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight:g}"


class Adaptation(FineTune):
    """Fine-tuning on the labelled source plus weighted loss terms on both domains: the base of the
    adaptation strategies, and on its own the composition root (e.g. entropy minimisation).

    ``loss = cls + sum_k weight_k * term_k`` where ``cls`` is the source cross-entropy. Subclasses implement
    :meth:`compute_transfer` (their own losses, ``cls`` included) and name those losses in :attr:`own_losses`
    (so a clashing term name is refused at construction); :meth:`compute` adds the terms. Always forwards the
    target batch (``uses_target``).

    Args:
        terms: extra :class:`LossTerm` objects (``class_path``/``init_args`` in YAML), each with its weight.
        ``**kwargs``: the :class:`FineTune` arguments (backbone LR multiplier, freezing, BN policy, the
            fine-tuning ``regularization``, ``class_weights``, ...).
    """

    uses_target = True
    #: names of the strategy's own losses (``compute_transfer``), checked against the terms' names at construction
    own_losses: tuple[str, ...] = ("cls",)

    def __init__(self, terms: Optional[list[LossTerm]] = None, **kwargs: Any):
        super().__init__(**kwargs)
        terms = list(terms or [])
        for i, term in enumerate(terms):
            if not isinstance(term, LossTerm):
                raise ConfigError(f"terms[{i}] is a {type(term).__name__}, not a loss term: give class_path: "
                                  "tlframe.strategies.<X>Term (EntropyTerm, MCCTerm, BSPTerm, MMDTerm, JMMDTerm, "
                                  "CORALTerm, AFNTerm, FixMatchTerm, MeanTeacherTerm) with its init_args")
        names = [t.name for t in terms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"two loss terms are named {dup[0]!r}: give one of them another name "
                              f"(init_args: {{name: {dup[0]}2}})")
        for term in terms:
            if term.name in self.regularization_loss_names:
                raise ConfigError(f"the loss term name {term.name!r} is taken by a regulariser "
                                  f"{self.regularization_loss_names}: give the {type(term).__name__} another name "
                                  f"(init_args: {{name: {term.name}2}})")
            if term.name in self.own_losses:
                raise ConfigError(f"the loss term name {term.name!r} is taken by {type(self).__name__}'s own losses "
                                  f"{list(self.own_losses)}: give the {type(term).__name__} another name "
                                  f"(init_args: {{name: {term.name}2}})")
        self.terms = nn.ModuleList(terms)

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        for term in self.terms:
            term.attach(backbone, head, num_classes)

    def param_groups(self, backbone: nn.Module, head: nn.Module) -> list[ParamGroup]:
        groups = super().param_groups(backbone, head)
        for term in self.terms:
            groups += [{**g, "name": f"{term.name}.{g.get('name', 'params')}"} for g in term.param_groups()]
        return groups

    @property
    def target_views(self) -> int:  # type: ignore[override]
        """2 when a term needs a weak and a strong view of each target image (self-training), else 1."""
        return max([1, *(t.target_views for t in self.terms)])

    def ddp_ignored(self) -> list[str]:
        return super().ddp_ignored() + [f"terms.{i}.{n}" for i, t in enumerate(self.terms) for n in t.ddp_ignored()]

    def on_train_start(self, progress: Progress, trainer: Any) -> None:
        super().on_train_start(progress, trainer)
        for term in self.terms:
            term.on_train_start(progress, trainer)

    def on_train_batch_start(self, backbone: nn.Module, progress: Progress) -> None:
        super().on_train_batch_start(backbone, progress)
        for term in self.terms:
            term.on_train_batch_start(progress)

    def compute_transfer(self, step: TransferStep) -> StrategyOutput:
        """The strategy's own losses (``cls`` and the method's terms); the base has ``cls`` only."""
        return StrategyOutput(losses={"cls": self.classification_loss(step)})

    def compute(self, step: TransferStep) -> StrategyOutput:
        out = self.compute_transfer(step)
        for term in self.terms:
            if term.name in out.losses:
                raise ConfigError(f"the loss term name {term.name!r} is taken by {type(self).__name__}'s own "
                                  f"losses {sorted(out.losses)}: give the {type(term).__name__} another name "
                                  f"(init_args: {{name: {term.name}2}})")
            loss, logs = term.compute(step)
            out.losses[term.name] = loss
            out.weights[term.name] = term.weight
            out.logs.update({f"{term.name}_{k}": v for k, v in logs.items()})
        self.add_regularization(out, step)
        return out


class EntropyTerm(LossTerm):
    """Entropy minimisation on the target predictions: ``entropy(logits_t)`` (mean row entropy, exact,
    :func:`tlframe.losses.entropy`; TLlib's AFN/MCC scripts use the ``-sum p log(p + 1e-5)`` form, smaller by at
    most about ``C * 1e-5``). Name ``entropy``."""

    kind = "entropy"

    def __init__(self, weight: float = 1.0, name: Optional[str] = None):
        super().__init__(weight, name)

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        _, logits_t = target_tensors(step, "EntropyTerm")
        return entropy(logits_t), {}


class MCCTerm(LossTerm):
    """Minimum Class Confusion on the target logits (Jin et al., ECCV 2020):
    :func:`tlframe.losses.minimum_class_confusion` with ``temperature``. Name ``mcc``."""

    kind = "mcc"

    def __init__(self, weight: float = 1.0, temperature: float = 2.5, name: Optional[str] = None):
        super().__init__(weight, name)
        check_number("MCCTerm.temperature", temperature, low=0, low_open=True)
        self.temperature = float(temperature)

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        _, logits_t = target_tensors(step, "MCCTerm")
        return minimum_class_confusion(logits_t, self.temperature), {}


class BSPTerm(LossTerm):
    """Batch Spectral Penalization (Chen et al., ICML 2019) of the bottleneck features of both domains:
    :func:`tlframe.losses.batch_spectral_penalty` (sum of the ``k`` largest squared singular values per domain).
    TLlib's BSP = DANN + this term with weight ``2e-4`` (``1e-4`` in its digits scripts). Name ``bsp``."""

    kind = "bsp"

    def __init__(self, weight: float = 2e-4, k: int = 1, name: Optional[str] = None):
        super().__init__(weight, name)
        check_number("BSPTerm.k", k, low=1, integer=True)
        self.k = int(k)

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        f_t, _ = target_tensors(step, "BSPTerm")
        return batch_spectral_penalty(step.f_s, f_t, self.k), {}


class MMDTerm(LossTerm):
    """Multi-kernel MMD of the bottleneck features (DAN): :func:`tlframe.losses.mk_mmd`. Name ``mmd``."""

    kind = "mmd"

    def __init__(self, weight: float = 1.0, alphas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0),
                 linear: bool = False, offset: bool = True, name: Optional[str] = None):
        super().__init__(weight, name)
        self.alphas = check_alphas(alphas)
        self.linear = linear
        self.offset = offset

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        f_t, _ = target_tensors(step, "MMDTerm")
        return mk_mmd(step.f_s, f_t, self.alphas, linear=self.linear, offset=self.offset), {}


class JMMDTerm(LossTerm):
    """Joint MMD of (bottleneck features, softmax predictions) (JAN): :func:`tlframe.losses.joint_mk_mmd`.
    Name ``jmmd``."""

    kind = "jmmd"

    def __init__(self, weight: float = 1.0, alphas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0),
                 prob_sigma: float = 0.92, linear: bool = False, offset: bool = True, name: Optional[str] = None):
        super().__init__(weight, name)
        self.alphas = check_alphas(alphas)
        check_number("JMMDTerm.prob_sigma", prob_sigma, low=0, low_open=True)
        self.prob_sigma = float(prob_sigma)
        self.linear = linear
        self.offset = offset

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        f_t, logits_t = target_tensors(step, "JMMDTerm")
        probs_s, probs_t = step.logits_s.float().softmax(dim=1), logits_t.float().softmax(dim=1)
        return joint_mk_mmd(step.f_s, f_t, probs_s, probs_t, self.alphas, self.prob_sigma, linear=self.linear,
                            offset=self.offset), {}


class CORALTerm(LossTerm):
    """Deep CORAL of the bottleneck features: :func:`tlframe.losses.coral` (``scale`` ``"tllib"`` or
    ``"paper"``). Name ``coral``."""

    kind = "coral"

    def __init__(self, weight: float = 1.0, scale: Literal["tllib", "paper"] = "tllib", name: Optional[str] = None):
        super().__init__(weight, name)
        if scale not in ("tllib", "paper"):
            raise ConfigError(f"CORALTerm.scale={scale!r} must be 'tllib' (mean + covariance terms, TLlib's code) "
                              "or 'paper' (||C_s - C_t||_F^2 / (4 d^2))")
        self.scale = scale

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        f_t, _ = target_tensors(step, "CORALTerm")
        return coral(step.f_s, f_t, self.scale), {}


class AFNTerm(LossTerm):
    """Stepwise Adaptive Feature Norm of the bottleneck features of both domains (Xu et al., ICCV 2019):
    ``adaptive_feature_norm(f_s, delta) + adaptive_feature_norm(f_t, delta)`` (as TLlib's example). Logs
    ``afn_norm_s`` / ``afn_norm_t``, the mean feature norms. The :class:`~tlframe.strategies.AFN` strategy also
    puts the paper's dropout in the bottleneck; this term alone does not. Name ``afn``."""

    kind = "afn"

    def __init__(self, weight: float = 0.05, delta: float = 1.0, name: Optional[str] = None):
        super().__init__(weight, name)
        check_number("AFNTerm.delta", delta, low=0, low_open=True)
        self.delta = float(delta)

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        f_t, _ = target_tensors(step, "AFNTerm")
        loss = adaptive_feature_norm(step.f_s, self.delta) + adaptive_feature_norm(f_t, self.delta)
        with torch.no_grad():
            norms = {"norm_s": step.f_s.float().norm(dim=1).mean(), "norm_t": f_t.float().norm(dim=1).mean()}
        return loss, norms
