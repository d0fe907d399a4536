"""Seeds derived from the run's seed and the trainer's position, never from RNG history.

Training randomness (dropout, stochastic depth, data order, augmentation) is re-derived
from ``(run seed, rank, global_step)`` or ``(run seed, epoch, position)``, so a run resumed
from any checkpoint, mid-epoch included, draws exactly what an uninterrupted run draws,
and no random state has to be stored in the checkpoint.
"""

from __future__ import annotations

import os

import torch

__all__ = ["run_seed", "step_seed", "seed_generators"]


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``$PL_GLOBAL_SEED``), else torch's initial seed."""
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env is not None else torch.initial_seed()


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the model's random draws at optimizer step ``step`` on DDP rank ``rank``."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % 2**63


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and, for a CUDA ``device``, that device's generator.

    Cheaper than ``torch.manual_seed`` (which also queues seeding calls for every lazily
    initialised backend, a stack capture each, ~ms per call) for use at every step.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device: the rank's own GPU under Lightning
