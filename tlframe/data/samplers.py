"""Samplers for the training loaders."""

from __future__ import annotations

import math
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Sampler

from tlframe.seeding import mix

__all__ = ["EpochRandomSampler", "ClassBalancedSampler", "item_seed"]


def item_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the ``position``-th sample of ``epoch``: a pure function, so augmentation is reproducible."""
    return mix(seed, 2, epoch, position)


def _cycled_permutations(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """The first ``length`` entries of successive random permutations of ``range(n)`` drawn from ``gen``."""
    reps = math.ceil(length / n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:length]


class _EpochSampler(Sampler):
    """``num_samples`` indices per epoch whose order is a pure function of ``(seed, epoch)`` (see subclasses)."""

    def __init__(self, num_samples: int, seed: int = 0, start_epoch: int = 0, skip: int = 0, item_seeds: bool = False):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = start_epoch
        self.skip = skip
        self.item_seeds = item_seeds

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> list[int]:
        """The ``num_samples`` dataset indices of ``epoch``, in order (no ``skip``)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Union[int, tuple[int, int]]]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        order = self.order(epoch)
        if not self.item_seeds:
            return iter(order[skip:])
        return iter([(idx, item_seed(self.seed, epoch, pos)) for pos, idx in enumerate(order)][skip:])


class EpochRandomSampler(_EpochSampler):
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
        super().__init__(num_samples, seed=seed, start_epoch=start_epoch, skip=skip, item_seeds=item_seeds)
        self.size = size

    def order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(mix(self.seed, 3, epoch))
        return _cycled_permutations(self.size, self.num_samples, gen).tolist()


class ClassBalancedSampler(_EpochSampler):
    """``num_samples`` indices per epoch with every class equally likely (class-balanced source sampling).

    Epoch ``e`` is drawn in two stages from one generator seeded by ``(seed, e)``:

    1. the class of each position: successive random permutations of the classes present in
       ``labels`` (``K`` of them), so an epoch holds ``floor`` or ``ceil`` of
       ``num_samples / K`` draws of every class, and any ``K`` consecutive positions starting at
       a multiple of ``K`` hold each class once;
    2. the samples of class ``c``, in the order its positions come: successive random
       permutations of that class's indices, so no sample of a class repeats before every
       sample of the class has been drawn in this epoch (a tail class of 5 images is cycled, a
       head class of 5000 contributes a fresh random subset each epoch).

    Everything else is :class:`EpochRandomSampler`'s contract: the order of epoch ``e`` is a
    pure function of ``(seed, e)`` (identical on every DDP rank, so Lightning's
    ``DistributedSamplerWrapper`` shards it without duplicates; a resumed run continues the
    sequence from ``start_epoch``), ``skip`` leaves out the first samples of the first epoch
    (resume mid-epoch), ``item_seeds`` yields ``(index, item_seed(seed, epoch, position))``
    pairs, and ``len()`` is ``num_samples``.

    Args:
        labels: the class of every sample of the dataset (``labels[i]`` for index ``i``), read
            without decoding images; negative labels (unlabelled) are not allowed.
    """

    def __init__(self, labels: Sequence[int], num_samples: int, seed: int = 0, start_epoch: int = 0, skip: int = 0,
                 item_seeds: bool = False):
        super().__init__(num_samples, seed=seed, start_epoch=start_epoch, skip=skip, item_seeds=item_seeds)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size == 0:
            raise ValueError("ClassBalancedSampler needs at least one labelled sample.")
        if labels.min() < 0:
            raise ValueError("ClassBalancedSampler needs labelled samples (labels >= 0); got label -1 (unlabelled).")
        self.classes = np.unique(labels)  # sorted class ids present
        self.members = [torch.from_numpy(np.flatnonzero(labels == c)) for c in self.classes]

    def order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(mix(self.seed, 5, epoch))
        slots = _cycled_permutations(len(self.classes), self.num_samples, gen)  # class slot of every position
        out = torch.empty(self.num_samples, dtype=torch.long)
        for k, members in enumerate(self.members):
            where = torch.nonzero(slots == k).flatten()
            if len(where):
                out[where] = members[_cycled_permutations(len(members), len(where), gen)]
        return out.tolist()
