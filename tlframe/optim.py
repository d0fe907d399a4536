"""Parameter groups, LR multipliers and step-derived schedules.

Groups are built once, before training, and never change: freezing and unfreezing work
by dropping the gradients of frozen groups (the optimizer then skips them: no update, no
weight decay, no momentum), never by adding groups mid-run. Every schedule is a pure
function of ``global_step`` or ``current_epoch``, so it is identical after a resume, on
every DDP rank and with any LR scheduler.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["ParamGroup", "stage_lr_multipliers", "frozen_stage_count", "apply_lr_multipliers", "nonempty_groups", "trainable", "InverseDecayLR"]

ParamGroup = dict  # {"name": str, "params": list[nn.Parameter], "lr_mult": float}


def stage_lr_multipliers(num_stages: int, base_mult: float, layer_decay: Optional[float]) -> list[float]:
    """LR multiplier of each backbone stage (stem first).

    Without layer decay every stage gets ``base_mult``; with decay ``d`` stage ``i`` of ``S``
    gets ``base_mult * d ** (S - 1 - i)`` (the last stage ``base_mult``, the stem the smallest),
    as in BEiT/timm layer-wise LR decay — but applied as plain group LRs, so every torch and
    Lightning scheduler respects it.
    """
    if layer_decay is None:
        return [base_mult] * num_stages
    return [base_mult * layer_decay ** (num_stages - 1 - i) for i in range(num_stages)]


def frozen_stage_count(freeze_stages: int, num_stages: int, unfreeze_every: Optional[int], progress: int) -> int:
    """How many leading backbone stages are frozen after ``progress`` steps or epochs.

    ``freeze_stages`` stages (``-1``: all) are frozen at the start; with ``unfreeze_every=k``
    the deepest frozen stage is released every ``k`` units (gradual, top-down unfreezing):
    ``max(0, n0 - progress // k)``.
    """
    n0 = num_stages if freeze_stages < 0 else min(freeze_stages, num_stages)
    if unfreeze_every is None:
        return n0
    if unfreeze_every <= 0:
        raise ValueError(f"unfreeze_every must be a positive number of steps or epochs, got {unfreeze_every}")
    return max(0, n0 - progress // unfreeze_every)


def apply_lr_multipliers(optimizer: torch.optim.Optimizer) -> None:
    """Set each group's LR to the optimizer's default LR times the group's ``lr_mult``."""
    base = optimizer.defaults["lr"]
    for group in optimizer.param_groups:
        group["lr"] = base * group.get("lr_mult", 1.0)


def nonempty_groups(groups: Iterable[ParamGroup]) -> list[ParamGroup]:
    """Drop empty groups and groups without trainable parameters."""
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            out.append({**g, "params": params})
    return out


class InverseDecayLR(LRScheduler):
    """``lr = base_lr * (1 + gamma * step) ** -power``, stepped every optimizer step.

    The DANN/TLlib schedule (gamma=0.001, power=0.75). ``step`` is the scheduler's own
    ``last_epoch``, saved in its ``state_dict``, so resume continues exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = 0.001, power: float = 0.75,
                 last_epoch: int = -1):
        self.gamma = gamma
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = (1.0 + self.gamma * self.last_epoch) ** (-self.power)
        return [base * factor for base in self.base_lrs]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
