"""Frozen-backbone features of whole datasets, computed once: ``FrozenFeatures(cache_features=...)``.

With a frozen backbone (eval mode, no grad) and no augmentation, the backbone maps each
image to the same feature vector in every epoch, so it needs to run only once per image.
:class:`FeatureCache` turns an image dataset (a :class:`TransformedDataset`, i.e. raw images +
the eval transform) into a ``TensorDataset`` of ``(features (D,), label)``; the data module
then builds its usual loaders (same samplers, batch sizes, pairing and labels) on it, and the
module runs only the head on the feature batches.

- ``"memory"``: features are kept for the life of the module (one build per process).
- ``"disk"``: features are also saved to ``<cache_dir()>/features/<key>.pt`` (atomically: a
  temporary file renamed into place) and memory-mapped on the next run instead of computed.

The key is a hash of the backbone's name and constructor arguments, a hash of every tensor
of its ``state_dict`` (so other weights give another key), the transform's ``repr``, the
image mode and the dataset's identity (domain ``repr``, role and split, length, and a
fingerprint of its content: pixel array or file list, labels, subset indices). Features are
computed on the backbone's current device, in eval mode, without grad, in float32, and under a
forked CPU RNG (building the cache leaves the global random state as it was). Under DDP each
rank computes (or loads) the full cache itself: nothing is gathered or shared.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from tlframe.atomic import atomic_path
from tlframe.data.datasets import ArrayImageDataset, FileImageDataset, TransformedDataset
from tlframe.data.paths import cache_dir

__all__ = ["CacheMode", "FeatureCache", "dataset_fingerprint", "state_dict_hash"]

#: ``"none"``: run the backbone on every batch; ``"memory"``/``"disk"``: see the module docstring.
CacheMode = Literal["none", "memory", "disk"]


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=16)


def _update(h: Any, array: np.ndarray) -> None:
    h.update(str((array.dtype, array.shape)).encode())
    h.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def state_dict_hash(module: nn.Module) -> str:
    """Hash of the names, dtypes, shapes and values of every tensor in ``module.state_dict()``."""
    h = _hasher()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def dataset_fingerprint(ds: Dataset) -> str:
    """Hash of what a raw dataset holds: pixel array or file list, labels, subset indices (cheap: no decoding)."""
    h = _hasher()
    if isinstance(ds, Subset):
        h.update(dataset_fingerprint(ds.dataset).encode())
        _update(h, np.asarray(ds.indices, dtype=np.int64))
    elif isinstance(ds, ArrayImageDataset):
        _update(h, ds.images)
        _update(h, ds.labels)
        h.update(str(ds.labelled).encode())
    elif isinstance(ds, FileImageDataset):
        h.update(repr((ds.samples, ds.labelled)).encode())
    else:  # unknown dataset type: its class and length only (the domain repr is part of the key too)
        h.update(f"{type(ds).__qualname__}:{len(ds)}".encode())  # type: ignore[arg-type]
    return h.hexdigest()


class FeatureCache:
    """Backbone features of datasets, keyed by backbone, weights, transform and data.

    Args:
        mode: ``"memory"`` or ``"disk"`` (see the module docstring).
        backbone: the frozen backbone; called on its current device when a dataset is built.
        backbone_id: its name and constructor arguments, e.g. ``"resnet18 {}"``.

    ``build_seconds`` adds up the time spent running the backbone; ``built`` and ``loaded``
    list the keys computed and read from disk by this object.
    """

    def __init__(self, mode: CacheMode, backbone: nn.Module, backbone_id: str) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"FeatureCache mode must be 'memory' or 'disk', got {mode!r}")
        self.mode = mode
        self.backbone = backbone
        self.backbone_id = backbone_id
        self.build_seconds = 0.0
        self.built: list[str] = []
        self.loaded: list[str] = []
        self._memory: dict[str, TensorDataset] = {}

    def key(self, data: TransformedDataset, identity: str) -> str:
        """The cache key of ``data`` (raw dataset + transform) for the backbone's current weights."""
        parts = [self.backbone_id, state_dict_hash(self.backbone), repr(data.transform), data.mode,
                 identity, str(len(data)), dataset_fingerprint(data.dataset)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    @staticmethod
    def path(key: str) -> Path:
        return cache_dir() / "features" / f"{key}.pt"

    def dataset(self, data: TransformedDataset, identity: str, batch_size: int = 256,
                num_workers: int = 0) -> TensorDataset:
        """``TensorDataset(features (N, D) float32, labels (N,) int64)`` of ``data``, built at most once."""
        key = self.key(data, identity)
        if key in self._memory:
            return self._memory[key]
        path = self.path(key)
        if self.mode == "disk" and path.is_file():
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            features, labels = saved["features"], saved["labels"]
            self.loaded.append(key)
        else:
            features, labels = self._compute(data, batch_size, num_workers)
            self.built.append(key)
            rank_zero_info(f"feature cache: {identity}: {tuple(features.shape)} features computed")
            if self.mode == "disk":
                with atomic_path(path) as tmp:
                    torch.save({"features": features, "labels": labels, "identity": identity}, tmp)
        self._memory[key] = TensorDataset(features, labels)
        return self._memory[key]

    def _compute(self, data: TransformedDataset, batch_size: int, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        device = next(self.backbone.parameters(), torch.empty(0)).device
        was_training = self.backbone.training
        self.backbone.eval()
        features, labels = [], []
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                for x, y in DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers):
                    features.append(self.backbone(x.to(device)).float().cpu())
                    labels.append(torch.as_tensor(y, dtype=torch.int64))
        finally:
            self.backbone.train(was_training)
        self.build_seconds += time.perf_counter() - start
        return torch.cat(features), torch.cat(labels)
