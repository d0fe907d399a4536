"""Seeds derived from the run's seed and the trainer's position, never from RNG history.

Training randomness (dropout, stochastic depth, data order, augmentation) is re-derived
from ``(run seed, rank, global_step)`` or ``(run seed, epoch, position)``, so a run resumed
from any checkpoint, mid-epoch included, draws exactly what an uninterrupted run draws,
and no random state has to be stored in the checkpoint.
"""

from __future__ import annotations

import os

import torch

__all__ = ["mix", "run_seed", "step_seed", "seed_generators"]


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each value): distinct inputs give unrelated seeds.

    Every derived seed in tlframe (data order per role and epoch, augmentation per sample,
    model draws per step) goes through this one function, so no two streams overlap.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``$PL_GLOBAL_SEED``), else torch's initial seed.

    The first call without ``$PL_GLOBAL_SEED`` records torch's initial seed there, so the value
    stays the same for the whole process although the per-step seeding re-seeds torch.
    """
    env = os.environ.get("PL_GLOBAL_SEED")
    if env is None:
        env = os.environ["PL_GLOBAL_SEED"] = str(torch.initial_seed())
    return int(env)


def step_seed(seed: int, rank: int, step: int, micro_batch: int = 0) -> int:
    """Seed of the model's random draws at optimizer step ``step`` (``micro_batch`` under gradient accumulation) on DDP rank ``rank``."""
    return mix(seed, 1, rank, step, micro_batch)


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and, for a CUDA ``device``, that device's generator.

    Cheaper than ``torch.manual_seed`` (which also queues seeding calls for every lazily
    initialised backend, a stack capture each, ~ms per call) for use at every step.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device: the rank's own GPU under Lightning
