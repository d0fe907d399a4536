"""Raw datasets (items are ``(PIL.Image, int)``) and the transform wrapper.

Everything here is a plain picklable class so that DataLoader workers (fork or spawn)
work; no lambdas or closures.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from tlframe.data.errors import DataError

#: Label returned for every item of an unlabelled domain.
NO_LABEL = -1


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB).

    Each item is converted to a PIL image on access, so the memory cost is one byte per
    pixel and indexing is cheap.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, labelled: bool = True) -> None:
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise TypeError(f"images must be uint8 (N,H,W[,3]), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(self.images[index])
        return img, int(self.labels[index]) if self.labelled else NO_LABEL


class FileImageDataset(Dataset):
    """Images decoded from files on access; ``samples`` is a list of ``(path, label)``; ``center_crop``: keep the
    central ``center_crop x center_crop`` pixels of every image (``None``: the whole image)."""

    def __init__(self, samples: Sequence[tuple[str, int]], labelled: bool = True,
                 center_crop: Optional[int] = None) -> None:
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.labelled = labelled
        self.center_crop = center_crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        img = load_image(path)
        if self.center_crop is not None:
            w, h = img.size
            c = self.center_crop
            left, top = (w - c) // 2, (h - c) // 2
            img = img.crop((left, top, left + c, top + c))
        return img, label if self.labelled else NO_LABEL

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([y for _, y in self.samples], dtype=np.int64)


def load_image(path: str) -> Image.Image:
    """Open and fully decode an image, raising :class:`DataError` naming the file on failure."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(
            f"image {path} cannot be read ({type(e).__name__}: {e}): replace or delete the "
            "file (and remove it from any list file) and run again."
        ) from e
    return img


def convert_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert ``img`` to ``mode`` ("L" or "RGB"), going through RGBA for palette images with
    transparency so PIL does not warn."""
    if img.mode == mode:
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bit instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        img = Image.fromarray(np.round(arr / hi * 255).astype(np.uint8))
    return img.convert(mode)


class TransformedDataset(Dataset):
    """Wraps a raw dataset: converts each image to ``mode`` then applies ``transform``.

    An index may be an ``(index, seed)`` pair (from ``EpochRandomSampler(item_seeds=True)``):
    the transform then runs with torch's and Python's random generators seeded by ``seed``
    (and restored afterwards), so a random augmentation depends on the seed alone.
    """

    def __init__(self, dataset: Dataset, transform: Optional[Callable], mode: str = "RGB") -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        self.dataset = dataset
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: Union[int, tuple[int, int]]):
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        img, label = self.dataset[index]
        img = convert_mode(img, self.mode)
        if self.transform is None:
            return img, label
        if seed is None:
            return self.transform(img), label
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: restored afterwards
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            img = self.transform(img)
        random.setstate(py_state)
        return img, label


def sample_names(ds: Dataset, name: str) -> list[str]:
    """Per item of ``ds``: the image file's path (a :class:`FileImageDataset`, through ``Subset``
    wrappers) or ``"<name> #<i>"`` with ``i`` the item's index in the split (in-memory data sets)."""
    indices = list(range(len(ds)))  # type: ignore[arg-type]
    while isinstance(ds, Subset):
        indices = [int(ds.indices[i]) for i in indices]
        ds = ds.dataset
    if isinstance(ds, FileImageDataset):
        return [ds.samples[i][0] for i in indices]
    return [f"{name} #{i}" for i in indices]


def held_in_memory(ds: Dataset) -> bool:
    """Whether ``ds`` (or the dataset under its ``Subset`` wrappers) is an :class:`ArrayImageDataset`."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return isinstance(ds, ArrayImageDataset)


class MemoizedDataset(Dataset):
    """``data[i]`` computed on first access and kept: later epochs are tensor look-ups, no image work.

    Only for a deterministic transform (the same tensor every epoch) and in-process loading
    (``num_workers=0``: worker processes would each fill a copy of their own).
    Costs ``4 * C * H * W`` bytes per image: the ``(image, label)`` items are kept in **one** preallocated tensor
    per split (allocated at the first item, ``(N, C, H, W)``, plus the labels), not as ``N`` small tensors, so the
    cache adds no per-image allocation and does not fragment the heap between the training step's large
    short-lived tensors. Items of another form (or of varying shapes) are kept as they are.
    """

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self.n = len(data)  # type: ignore[arg-type]
        self.images: Optional[torch.Tensor] = None  # (N, *image shape), filled on first access
        self.labels: Optional[torch.Tensor] = None
        self.filled: Optional[torch.Tensor] = None
        self.items: Optional[list] = None  # fallback for items that are not (same-shape tensor, int label)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if self.items is not None:
            item = self.items[index]
            if item is None:
                item = self.items[index] = self.data[index]
            return item
        if self.filled is not None and bool(self.filled[index]):
            return self.images[index], int(self.labels[index])  # type: ignore[index]
        item = self.data[index]
        if not self._store(index, item):
            self.items = [None] * self.n
            self.items[index] = item
        return item

    def _store(self, index: int, item: Any) -> bool:
        """Keep ``item`` in the preallocated tensors; False when it does not fit them (then nothing is stored)."""
        if not (isinstance(item, tuple) and len(item) == 2 and torch.is_tensor(item[0])
                and isinstance(item[1], (int, np.integer))):
            return False
        x, y = item
        if self.images is None:
            self.images = torch.empty((self.n, *x.shape), dtype=x.dtype)
            self.labels = torch.empty(self.n, dtype=torch.long)
            self.filled = torch.zeros(self.n, dtype=torch.bool)
        if x.shape != self.images.shape[1:] or x.dtype != self.images.dtype:
            return False
        self.images[index] = x
        self.labels[index] = int(y)  # type: ignore[index]
        self.filled[index] = True  # type: ignore[index]
        return True


class WithIndex(Dataset):
    """``data[i] + (i,)``: each item followed by its index in ``data`` (an ``(index, seed)`` request gives ``index``)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: Union[int, tuple[int, int]]):
        i = index[0] if isinstance(index, tuple) else index
        return (*self.data[index], int(i))
