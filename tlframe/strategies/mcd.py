"""Maximum Classifier Discrepancy (Saito et al., CVPR 2018): a feature extractor against two classifiers, three
update steps per batch, each with its own optimizer (TLlib ``examples/.../mcd.py`` semantics).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from tlframe.checks import ConfigError, check_number
from tlframe.losses import classifier_discrepancy, mcd_class_balance
from tlframe.optim import ParamGroup
from tlframe.strategies.base import StrategyOutput
from tlframe.strategies.finetune import FineTune

__all__ = ["MCD", "mcd_classifier"]


def mcd_classifier(in_features: int, num_classes: int, width: int = 1024, dropout: float = 0.5) -> nn.Sequential:
    """TLlib's MCD ``ImageClassifierHead``: ``Dropout-Linear(D, W)-BN-ReLU-Dropout-Linear(W, W)-BN-ReLU-Linear(W, C)``."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Dropout(dropout), nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, num_classes))


class MCD(FineTune):
    """Maximum Classifier Discrepancy: generator ``G`` (the backbone) and classifiers ``F1``, ``F2``.

    Per batch, ``x = cat(x_s, x_t)`` through ``G`` and both classifiers each time (``p = softmax``, ``d`` =
    :func:`tlframe.losses.classifier_discrepancy`, ``B`` = :func:`tlframe.losses.mcd_class_balance`, TLlib's
    "entropy" of MCD: ``-(1/K) sum_k log(mean_i p_ik + 1e-6)``, which spreads the target batch over the classes):

    - **A**: ``CE(F1(x_s)) + CE(F2(x_s)) + balance_weight * (B(p1_t) + B(p2_t))``, a step of both optimizers;
    - **B**: the same ``- trade_off * d(p1_t, p2_t)``, a step of the classifiers' optimizer only (the
      classifiers move apart on the target while staying right on the source);
    - **C**: ``num_k`` times ``trade_off * d(p1_t, p2_t)``, a step of the generator's optimizer only.

    Two optimizers (:meth:`optimizer_groups`): ``generator`` (the backbone; TLlib: SGD without momentum) and
    ``classifiers`` (``F1`` and ``F2``, momentum 0.9), each built from ``model.optimizer``/``model.lr``/
    ``model.weight_decay`` and with its own LR scheduler; all their states are in the checkpoint. The generator's
    gradients are computed in step B (as in TLlib, and so every rank's DDP reduction sees every parameter) but
    never applied there, nor the classifiers' in step C.

    ``F1`` is the model's head (``head.bottleneck`` + ``head.classifier``: evaluation and prediction use it);
    ``F2`` is the strategy's ``classifier_2``. Both are TLlib's ``ImageClassifierHead`` of width
    ``classifier_width`` (:func:`mcd_classifier`), which replaces the module's bottleneck.

    **Steps.** Lightning counts every optimizer step in ``trainer.global_step`` under manual optimization: one
    batch is ``3 + num_k`` of them (A: 2, B: 1, C: ``num_k``). Give the budget with ``max_epochs`` (or
    ``max_steps = batches * (3 + num_k)``). The LR schedulers step once per batch. Logs ``train/loss_cls``
    (step A's cross-entropy of both classifiers), ``train/loss_balance``, ``train/loss_discrepancy_b`` (step B's
    discrepancy, maximised), ``train/loss_discrepancy`` (step C's last), ``train/agreement_t`` (the share of target
    images both classifiers give the same class).

    Args:
        trade_off: weight of the discrepancy (TLlib: 1).
        balance_weight: weight of the class-balance term ``B`` in steps A and B (TLlib ``--trade-off-entropy``:
            0.01; its digits runs 0.03).
        num_k: generator steps per batch (TLlib and the paper's digits runs: 4).
        classifier_width: width ``W`` of both classifiers (TLlib ``--bottleneck-dim``: 1024).
        classifier_dropout: dropout in both classifiers (0.5).
        generator_momentum: momentum of the generator's SGD (TLlib: 0; the classifiers' keeps ``model.momentum``).
        ``**kwargs``: the :class:`FineTune` arguments (``backbone_lr_mult``, freezing, ``label_smoothing``).
    """

    uses_target = True
    manual_optimization = True

    def __init__(self, trade_off: float = 1.0, balance_weight: float = 0.01, num_k: int = 4,
                 classifier_width: int = 1024, classifier_dropout: float = 0.5,
                 generator_momentum: Optional[float] = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        check_number("trade_off", trade_off, low=0)
        check_number("balance_weight", balance_weight, low=0)
        check_number("num_k", num_k, low=1, integer=True)
        check_number("classifier_width", classifier_width, low=1, integer=True)
        check_number("classifier_dropout", classifier_dropout, low=0, high=1, high_open=True)
        if generator_momentum is not None:
            check_number("generator_momentum", generator_momentum, low=0, high=1)
        if len(self.regularization) or self.label_shift != "none" or self.class_weights != "none":
            raise ConfigError("MCD does not take regularization, label_shift or class_weights (its three steps have "
                              "losses of their own): remove them")
        if self.bn_policy != "joint":
            raise ConfigError("MCD forwards cat(x_s, x_t) through G and both classifiers (TLlib's script): "
                              "bn_policy must be joint")
        self.trade_off, self.balance_weight, self.num_k = float(trade_off), float(balance_weight), int(num_k)
        self.classifier_width, self.classifier_dropout = int(classifier_width), float(classifier_dropout)
        self.generator_momentum = generator_momentum
        self.classifier_2: Optional[nn.Module] = None

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        f1 = mcd_classifier(backbone.num_features, num_classes, self.classifier_width, self.classifier_dropout)
        head.bottleneck, head.classifier, head.out_features = f1[:-1], f1[-1], self.classifier_width
        self.classifier_2 = mcd_classifier(backbone.num_features, num_classes, self.classifier_width,
                                           self.classifier_dropout)

    def optimizer_groups(self, backbone: nn.Module, head: nn.Module) -> list[tuple[str, list[ParamGroup]]]:
        groups = self.param_groups(backbone, head)
        generator = [g for g in groups if str(g.get("name", "")).startswith("backbone")]
        if self.generator_momentum is not None:
            generator = [{**g, "momentum": float(self.generator_momentum), "nesterov": False} for g in generator]
        classifiers = [g for g in groups if not str(g.get("name", "")).startswith("backbone")]
        classifiers.append({"name": "classifier_2", "params": list(self.classifier_2.parameters()),
                            "lr_mult": self.head_lr_mult})
        return [("generator", generator), ("classifiers", classifiers)]

    def _forward(self, module: Any, x: torch.Tensor, n_s: int) -> tuple[torch.Tensor, ...]:
        """``(logits1_s, logits2_s, p1_t, p2_t)`` of one pass of ``x = cat(x_s, x_t)``."""
        z = module.features(x)
        y1, y2 = module.head(z)[1], self.classifier_2(z)
        return y1[:n_s], y2[:n_s], F.softmax(y1[n_s:].float(), dim=1), F.softmax(y2[n_s:].float(), dim=1)

    def _source_losses(self, y1_s, y2_s, y_s, p1_t, p2_t) -> dict[str, torch.Tensor]:
        """Steps A and B: both classifiers' source cross-entropy and the class balance of their target predictions."""
        ce = (F.cross_entropy(y1_s.float(), y_s, label_smoothing=self.label_smoothing)
              + F.cross_entropy(y2_s.float(), y_s, label_smoothing=self.label_smoothing))
        return {"cls": ce, "balance": mcd_class_balance(p1_t) + mcd_class_balance(p2_t)}

    def manual_step(self, module: Any, batch: dict) -> StrategyOutput:
        (x_s, y_s), x_t = batch["source"], batch["target"][0]
        x, n_s = torch.cat([x_s, x_t]), x_s.shape[0]
        opt_g, opt_f = module.optimizers()

        def step(out: StrategyOutput, optimizers: list, frozen: Optional[Any]) -> None:
            module.record_step_losses(out)
            for opt in (opt_g, opt_f):
                opt.zero_grad()
            module.manual_backward(out.total())
            if frozen is not None:  # computed (every parameter takes part in each pass) but not applied
                frozen.zero_grad(set_to_none=True)
            for opt in optimizers:
                opt.step()

        # A: everything on the source
        y1_s, y2_s, p1_t, p2_t = self._forward(module, x, n_s)
        a = StrategyOutput(losses=self._source_losses(y1_s, y2_s, y_s, p1_t, p2_t),
                           weights={"balance": self.balance_weight})
        step(a, [opt_g, opt_f], None)
        # B: the classifiers maximise their discrepancy on the target, still right on the source
        y1_s, y2_s, p1_t, p2_t = self._forward(module, x, n_s)
        b = StrategyOutput(losses={**self._source_losses(y1_s, y2_s, y_s, p1_t, p2_t),
                                   "discrepancy_b": classifier_discrepancy(p1_t, p2_t)},
                           weights={"balance": self.balance_weight, "discrepancy_b": -self.trade_off})
        step(b, [opt_f], opt_g)
        # C: the generator minimises it, num_k times
        for _ in range(self.num_k):
            _, _, p1_t, p2_t = self._forward(module, x, n_s)
            c = StrategyOutput(losses={"discrepancy": classifier_discrepancy(p1_t, p2_t)},
                               weights={"discrepancy": self.trade_off})
            step(c, [opt_g], opt_f)
        with torch.no_grad():
            agreement = (p1_t.argmax(dim=1) == p2_t.argmax(dim=1)).float().mean()
        return StrategyOutput(losses={k: v.detach() for k, v in {**a.losses, "discrepancy_b": b.losses["discrepancy_b"],
                                                                  **c.losses}.items()},
                              weights={"balance": self.balance_weight, "discrepancy_b": -self.trade_off,
                                       "discrepancy": self.trade_off},
                              logs={"agreement_t": agreement})
