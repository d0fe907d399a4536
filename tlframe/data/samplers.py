"""Samplers for the training loaders."""

from __future__ import annotations

import math
from typing import Iterator, Union

import torch
from torch.utils.data import Sampler

from tlframe.seeding import mix

__all__ = ["EpochRandomSampler", "item_seed"]


def item_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the ``position``-th sample of ``epoch``: a pure function, so augmentation is reproducible."""
    return mix(seed, 2, epoch, position)


class EpochRandomSampler(Sampler):
    """``num_samples`` indices drawn from successive random permutations of ``range(size)``.

    A domain smaller than ``num_samples`` is cycled through fresh permutations. The order
    of epoch ``e`` is a pure function of ``(seed, e)``: Lightning calls :meth:`set_epoch`
    each epoch (without DDP), and the epoch otherwise counts on from ``start_epoch`` (the
    trainer's epoch when the loader was built, so a resumed run continues the sequence).
    Every DDP rank therefore produces the same order, which Lightning's
    ``DistributedSamplerWrapper`` then shards without duplicates. (A plain ``RandomSampler``
    would be replaced by Lightning's ``DistributedSampler`` under DDP, losing ``num_samples``.)

    Args:
        skip: samples of the first epoch iterated that are left out (a run resumed
            mid-epoch continues with the same samples an uninterrupted run would see);
            later epochs are complete. ``len()`` stays ``num_samples``.
        item_seeds: yield ``(index, item_seed(seed, epoch, position))`` pairs instead of
            indices; :class:`~tlframe.data.datasets.TransformedDataset` then seeds the random
            augmentation of that sample with it, so augmentation is a function of
            ``(seed, epoch, position)`` alone: the same after a resume and for any number of
            loader workers.
    """

    def __init__(self, size: int, num_samples: int, seed: int = 0, start_epoch: int = 0, skip: int = 0,
                 item_seeds: bool = False):
        self.size = size
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = start_epoch
        self.skip = skip
        self.item_seeds = item_seeds

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[Union[int, tuple[int, int]]]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        gen = torch.Generator().manual_seed(mix(self.seed, 3, epoch))
        reps = math.ceil(self.num_samples / self.size)
        order = torch.cat([torch.randperm(self.size, generator=gen) for _ in range(reps)])[: self.num_samples].tolist()
        if not self.item_seeds:
            return iter(order[skip:])
        return iter([(idx, item_seed(self.seed, epoch, pos)) for pos, idx in enumerate(order)][skip:])
