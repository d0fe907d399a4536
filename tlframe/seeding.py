"""Seeds derived from the run's seed and the trainer's position, never from RNG history.

Training randomness (dropout, stochastic depth, data order, augmentation) is re-derived
from ``(run seed, rank, global_step)`` or ``(run seed, epoch, position)``, so a run resumed
from any checkpoint, mid-epoch included, draws exactly what an uninterrupted run draws,
and no random state has to be stored in the checkpoint.
"""

from __future__ import annotations

import os

import torch

__all__ = ["run_seed", "step_seed"]


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``$PL_GLOBAL_SEED``), else torch's initial seed."""
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env is not None else torch.initial_seed()


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the model's random draws at optimizer step ``step`` on DDP rank ``rank``."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % 2**63
