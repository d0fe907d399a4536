"""The strategy plug: what is trained, and which losses are added to the classification loss.

A strategy is an ``nn.Module`` (so its extra modules, e.g. a domain discriminator, live in
the LightningModule's ``state_dict``, move to the device and are wrapped by DDP). The
``TransferModule`` calls, in order:

1. ``attach(backbone, head, num_classes)`` once at construction: build extra modules,
   apply permanent freezing (``requires_grad=False``);
2. ``param_groups(backbone, head)`` once in ``configure_optimizers``;
3. per step: ``on_train_batch_start(backbone, progress)`` (BN/eval modes of frozen parts),
   the forward pass, ``compute(step) -> StrategyOutput``, and
   ``on_before_optimizer_step(backbone, progress)`` (drop gradients of parts frozen now).

``progress`` is a :class:`Progress` read from the trainer (``global_step``, ``current_epoch``),
never a counter of the strategy's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from tlframe.checks import check_number
from tlframe.data.feature_cache import CacheMode
from tlframe.optim import ParamGroup, trainable

__all__ = ["Progress", "TransferStep", "StrategyOutput", "Strategy"]


class Progress(NamedTuple):
    """Where training is: the trainer's ``global_step`` (optimizer steps) and ``current_epoch``, and
    ``total_steps``, the optimizer steps of the whole run (Lightning's ``estimated_stepping_batches``;
    ``None`` outside ``fit`` or for an open-ended run)."""

    step: int
    epoch: int
    total_steps: Optional[int] = None


@dataclass
class TransferStep:
    """One training step's tensors, as a strategy sees them.

    ``z_*``: backbone features ``(N, D)``; ``f_*``: bottleneck features ``(N, d)``;
    ``logits_*``: ``(N, C)``; ``y_s``: source labels ``(N,)``. Target tensors are ``None``
    when the strategy does not use the target domain; ``y_t`` is never used for training.
    """

    z_s: torch.Tensor
    f_s: torch.Tensor
    logits_s: torch.Tensor
    y_s: torch.Tensor
    progress: Progress
    z_t: Optional[torch.Tensor] = None
    f_t: Optional[torch.Tensor] = None
    logits_t: Optional[torch.Tensor] = None


@dataclass
class StrategyOutput:
    """Named loss terms, their weights (1.0 when absent) and extra values to log."""

    losses: dict[str, torch.Tensor]
    weights: dict[str, float] = field(default_factory=dict)
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        return sum(self.weights.get(k, 1.0) * v for k, v in self.losses.items())


class Strategy(nn.Module):
    """Base strategy: cross-entropy on labelled source data.

    Args:
        head_lr_mult: LR multiplier of the bottleneck and classifier.
        bn_policy: how source and target go through the network when both are used:
            ``"joint"`` forwards ``cat(x_s, x_t)`` as one batch, so BatchNorm normalises with
            statistics of the mixed batch (reference DANN); ``"separate"`` forwards them as two
            batches, so each domain is normalised with its own batch statistics and the running
            statistics see both in turn (reference DAN).
        label_smoothing: label smoothing of the source cross-entropy.
    """

    uses_target: bool = False
    trains_backbone: bool = True
    #: Serve cached backbone features instead of images (only a strategy that never trains the backbone may set it).
    cache_features: CacheMode = "none"

    def __init__(self, head_lr_mult: float = 1.0, bn_policy: Literal["joint", "separate"] = "joint",
                 label_smoothing: float = 0.0):
        super().__init__()
        check_number("head_lr_mult", head_lr_mult, low=0)
        check_number("label_smoothing", label_smoothing, low=0, high=1, high_open=True)
        self.head_lr_mult = head_lr_mult
        self.bn_policy = bn_policy
        self.label_smoothing = label_smoothing

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        """Called once with the model parts; build extra modules and apply permanent freezing here."""

    def param_groups(self, backbone: nn.Module, head: nn.Module) -> list[ParamGroup]:
        """Parameter groups with ``lr_mult``; the base trains only the head."""
        return [{"name": "head", "params": trainable(head), "lr_mult": self.head_lr_mult}]

    def on_train_batch_start(self, backbone: nn.Module, progress: Progress) -> None:
        """Put frozen parts in eval mode (Lightning sets the whole model to train each epoch)."""

    def on_before_optimizer_step(self, backbone: nn.Module, progress: Progress) -> None:
        """Drop gradients of parameters that the schedule freezes at ``progress``."""

    def classification_loss(self, step: TransferStep) -> torch.Tensor:
        return F.cross_entropy(step.logits_s, step.y_s, label_smoothing=self.label_smoothing)

    def compute(self, step: TransferStep) -> StrategyOutput:
        """Loss terms for one step; subclasses add their transfer terms to ``{"cls": ...}``."""
        return StrategyOutput(losses={"cls": self.classification_loss(step)})
