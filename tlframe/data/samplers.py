"""Samplers for the training loaders."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochRandomSampler"]


class EpochRandomSampler(Sampler[int]):
    """``num_samples`` indices drawn from successive random permutations of ``range(size)``.

    A domain smaller than ``num_samples`` is cycled through fresh permutations. The order
    of epoch ``e`` is a pure function of ``(seed, e)``: Lightning calls :meth:`set_epoch`
    each epoch (without DDP), and the epoch otherwise counts on from ``start_epoch`` (the
    trainer's epoch when the loader was built, so a resumed run continues the sequence).
    Every DDP rank therefore produces the same order, which Lightning's
    ``DistributedSamplerWrapper`` then shards without duplicates. (A plain ``RandomSampler``
    would be replaced by Lightning's ``DistributedSampler`` under DDP, losing ``num_samples``.)
    """

    def __init__(self, size: int, num_samples: int, seed: int = 0, start_epoch: int = 0):
        self.size = size
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = start_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        self.epoch += 1
        reps = math.ceil(self.num_samples / self.size)
        order = torch.cat([torch.randperm(self.size, generator=gen) for _ in range(reps)])[: self.num_samples]
        return iter(order.tolist())
