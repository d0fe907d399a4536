"""Domains built in code exactly as the DomainBed benchmark defines them (Gulrajani & Lopez-Paz, ICLR 2021;
``domainbed/datasets.py``, ``domainbed/lib/misc.py`` and ``domainbed/scripts/train.py`` of its public code).

**RotatedMNIST**: six domains, MNIST digits rotated by 0, 15, 30, 45, 60 and 75 degrees.

1. The 60,000 training and 10,000 test images of MNIST are concatenated (70,000) and shuffled by
   ``torch.randperm(70000)`` from a generator seeded with ``seed`` (DomainBed: its global RNG after
   ``torch.manual_seed(args.seed)``, ``--seed`` 0 by default).
2. Domain ``i`` (the ``i``-th angle) takes every sixth image from position ``i``: ``images[i::6]``
   (11,667 images for domains 0-3, 11,666 for 4 and 5), each rotated by its angle with
   ``torchvision.transforms.functional.rotate`` (bilinear, fill 0; DomainBed's current code).
3. Each domain is split as DomainBed's ``train.py`` does: ``keys = list(range(n))`` shuffled by
   ``numpy.random.RandomState(seed_hash(trial_seed, i))``; the first ``int(n * holdout_fraction)`` keys are
   the ``out`` split (DomainBed: validation of a training domain), the rest the ``in`` split (training; and,
   for the held-out test domain, the split whose accuracy DomainBed reports).

``dataset("train")`` is the ``in`` split; ``dataset("test")`` is the ``out`` split (``test_split: out``, the
default) or the ``in`` split (``test_split: in``: DomainBed's test-domain number).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Literal, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from tlframe.data.datasets import ArrayImageDataset
from tlframe.data.digits import DIGIT_CLASSES, MNISTDomain
from tlframe.data.domains import Domain, Split
from tlframe.data.errors import DataError

__all__ = ["RotatedMNISTDomain", "ROTATED_MNIST_ANGLES", "seed_hash", "domainbed_split"]

#: DomainBed's RotatedMNIST environments, in order (the domain index is the position here).
ROTATED_MNIST_ANGLES = (0, 15, 30, 45, 60, 75)


def seed_hash(*args: object) -> int:
    """DomainBed's ``misc.seed_hash``: ``int(md5(str(args)).hexdigest(), 16) % 2**31``."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def domainbed_split(n: int, holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(out_keys, in_keys)`` of DomainBed's ``misc.split_dataset(env, int(n * holdout_fraction), seed)``."""
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    n_out = int(n * holdout_fraction)
    return keys[:n_out], keys[n_out:]


@functools.lru_cache(maxsize=2)
def _shuffled_mnist(root: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNIST train + test concatenated and shuffled: ``(images (70000, 28, 28) uint8, labels, original index)``."""
    mnist = MNISTDomain(root=root)
    train, test = mnist.dataset("train"), mnist.dataset("test")
    images = np.concatenate([train.images, test.images])
    labels = np.concatenate([train.labels, test.labels])
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).numpy()
    return images[order], labels[order], order


@functools.lru_cache(maxsize=12)
def _rotated_environment(root: str, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Domain ``index`` of RotatedMNIST: ``(rotated images uint8, labels, original MNIST indices)``."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import rotate

    images, labels, order = _shuffled_mnist(root, seed)
    step = len(ROTATED_MNIST_ANGLES)
    images, labels, order = images[index::step], labels[index::step], order[index::step]
    angle = ROTATED_MNIST_ANGLES[index]
    rotated = np.stack([np.asarray(rotate(Image.fromarray(x), angle, interpolation=InterpolationMode.BILINEAR,
                                          fill=(0,))) for x in images])
    return rotated, labels, order


class RotatedMNISTDomain(Domain):
    """One RotatedMNIST domain of DomainBed (see the module docstring), 28x28 grey, classes ``"0"``-``"9"``.

    Args:
        angle: the domain's rotation, one of 0, 15, 30, 45, 60, 75 (degrees).
        root: data root with ``MNIST/raw/`` (default ``$TLFRAME_DATA_ROOT`` or ``./data``).
        seed: seed of the shuffle of the 70,000 images (DomainBed ``--seed``, default 0). The same for all
            domains of one benchmark, so that they are disjoint.
        trial_seed: DomainBed's ``--trial_seed`` (the in/out split of each domain).
        holdout_fraction: share of each domain in the ``out`` split (DomainBed: 0.2).
        test_split: what ``dataset("test")`` holds: the ``out`` split (default) or the ``in`` split.
        labelled: if False every label is -1.
        class_subset: see :class:`~tlframe.data.domains.Domain`.
    """

    def __init__(self, angle: int = 0, root: Optional[str] = None, seed: int = 0, trial_seed: int = 0,
                 holdout_fraction: float = 0.2, test_split: Literal["out", "in"] = "out", labelled: bool = True,
                 class_subset: Optional[list[Union[int, str]]] = None) -> None:
        super().__init__(labelled, class_subset)
        if angle not in ROTATED_MNIST_ANGLES:
            raise DataError(f"RotatedMNISTDomain angle={angle!r}: DomainBed's domains are rotated by "
                            f"{list(ROTATED_MNIST_ANGLES)} degrees; use one of those.")
        if not 0.0 < float(holdout_fraction) < 1.0:
            raise DataError(f"RotatedMNISTDomain holdout_fraction={holdout_fraction}: give a fraction in (0, 1), "
                            "DomainBed's is 0.2.")
        if test_split not in ("out", "in"):
            raise DataError(f"RotatedMNISTDomain test_split={test_split!r}: use 'out' (the holdout split) or 'in'.")
        self.mnist = MNISTDomain(root=root)  # checks the MNIST files now: a clear error before any run starts
        self.angle, self.seed, self.trial_seed = int(angle), int(seed), int(trial_seed)
        self.holdout_fraction, self.test_split = float(holdout_fraction), test_split

    @property
    def all_classes(self) -> list[str]:
        return list(DIGIT_CLASSES)

    @property
    def name(self) -> str:
        return f"rotated_mnist_{self.angle}"

    @property
    def index(self) -> int:
        """The domain's position in DomainBed's list of environments."""
        return ROTATED_MNIST_ANGLES.index(self.angle)

    def environment(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole domain: ``(images (n, 28, 28) uint8, labels (n,), original MNIST index (n,))``, where the
        original index counts MNIST's 60,000 training images first, then its 10,000 test images."""
        return _rotated_environment(str(self.mnist.root), self.seed, self.index)

    def split_keys(self) -> tuple[list[int], list[int]]:
        """``(out keys, in keys)``: positions in :meth:`environment` of DomainBed's two splits of this domain."""
        n = len(self.environment()[1])
        return domainbed_split(n, self.holdout_fraction, seed_hash(self.trial_seed, self.index))

    def _build(self, split: Split) -> Dataset:
        images, labels, _ = self.environment()
        out_keys, in_keys = self.split_keys()
        keys = in_keys if split == "train" or self.test_split == "in" else out_keys
        return ArrayImageDataset(images[keys], labels[keys], labelled=self.labelled)

    def __repr__(self) -> str:
        return (f"RotatedMNISTDomain(angle={self.angle}, seed={self.seed}, trial_seed={self.trial_seed}, "
                f"holdout_fraction={self.holdout_fraction}, test_split={self.test_split!r}, labelled={self.labelled}"
                + (f", class_subset={self.class_subset})" if self.class_subset is not None else ")"))
