"""Digit domains: MNIST, USPS, MNIST-M and SVHN (classes ``"0"`` .. ``"9"`` in all four).

The small sets are decoded once into memory as uint8 arrays; MNIST-M is decoded lazily
from its PNG files. Nothing is written into the data root; archives are extracted into the
cache folder (:func:`tlframe.data.paths.cache_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from torch.utils.data import Dataset

from tlframe.data.datasets import ArrayImageDataset, FileImageDataset
from tlframe.data.domains import Domain, Split
from tlframe.data.errors import DataError
from tlframe.data.paths import DATA_ROOT_ENV, candidate_data_root, extract_tar_once, resolve_data_root

DIGIT_CLASSES: list[str] = [str(i) for i in range(10)]


def _root(root: Optional[str], download: bool) -> Path:
    """Resolve the data root; with ``download=True`` a missing root is created."""
    if download:
        path = candidate_data_root(root)
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve()
    return resolve_data_root(root)


class _DigitDomain(Domain):
    @property
    def all_classes(self) -> list[str]:
        return list(DIGIT_CLASSES)


class MNISTDomain(_DigitDomain):
    """MNIST (60,000 train / 10,000 test, 28x28 grey) via ``torchvision.datasets.MNIST``.

    Reads the raw IDX files at ``<root>/MNIST/raw/`` (read-only roots work).

    Args:
        root: data root (default ``$TLFRAME_DATA_ROOT`` or ``./data``).
        download: let torchvision download the files into ``<root>/MNIST/raw`` if missing.
        labelled: if False every label is -1.
        class_subset: keep only these digits (e.g. ``[5, 6, 7, 8, 9]``), relabelled 0..k-1 with their
            names kept (``classes == ["5", ..., "9"]``); see :class:`~tlframe.data.domains.Domain`.
    """

    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def __init__(self, root: Optional[str] = None, download: bool = False, labelled: bool = True,
                 class_subset: Optional[list[Union[int, str]]] = None) -> None:
        super().__init__(labelled, class_subset)
        self.root = _root(root, download)
        self.download = download
        if not download:
            self._check()

    def _check(self) -> None:
        raw = self.root / "MNIST" / "raw"
        missing = [f for f in self.FILES if not (raw / f).is_file()]
        if missing:
            raise DataError(
                f"MNIST files {missing} are missing from {raw}: point root= (or "
                f"${DATA_ROOT_ENV}) at the folder that contains MNIST/raw/ with the four "
                "uncompressed IDX files, or pass download=True."
            )

    @property
    def name(self) -> str:
        return "mnist"

    def prepare(self) -> None:
        if self.download:
            from torchvision.datasets import MNIST

            for train in (True, False):
                MNIST(str(self.root), train=train, download=True)

    def _build(self, split: Split) -> Dataset:
        from torchvision.datasets import MNIST

        try:
            ds = MNIST(str(self.root), train=split == "train", download=self.download)
        except RuntimeError as e:
            self._check()
            raise DataError(f"MNIST at {self.root} cannot be loaded ({e}): check the IDX files.") from e
        return ArrayImageDataset(ds.data.numpy(), ds.targets.numpy(), labelled=self.labelled)


class USPSDomain(_DigitDomain):
    """USPS (7,291 train / 2,007 test, 16x16 grey).

    Reads ``<root>/usps/usps.h5`` (``train/data`` rows of 256 floats in [0, 1] and
    ``train/target``; same for ``test/``) when present, else torchvision's LIBSVM files
    ``<root>/usps.bz2`` and ``<root>/usps.t.bz2`` via ``torchvision.datasets.USPS``.

    Args:
        root: data root (default ``$TLFRAME_DATA_ROOT`` or ``./data``).
        download: let torchvision download the bz2 files into ``<root>`` if neither
            format is present.
        labelled: if False every label is -1.
        class_subset: keep only these digits (e.g. ``[5, 6, 7, 8, 9]``), relabelled 0..k-1 with their
            names kept (``classes == ["5", ..., "9"]``); see :class:`~tlframe.data.domains.Domain`.
    """

    def __init__(self, root: Optional[str] = None, download: bool = False, labelled: bool = True,
                 class_subset: Optional[list[Union[int, str]]] = None) -> None:
        super().__init__(labelled, class_subset)
        self.root = _root(root, download)
        self.download = download
        if not download and not self._h5.is_file() and not self._has_bz2():
            raise DataError(
                f"USPS not found under {self.root}: expected {self._h5} or torchvision's "
                f"{self.root / 'usps.bz2'} and {self.root / 'usps.t.bz2'}; point root= (or "
                f"${DATA_ROOT_ENV}) at the folder that holds them, or pass download=True."
            )

    @property
    def _h5(self) -> Path:
        return self.root / "usps" / "usps.h5"

    def _has_bz2(self) -> bool:
        return (self.root / "usps.bz2").is_file() and (self.root / "usps.t.bz2").is_file()

    @property
    def name(self) -> str:
        return "usps"

    def prepare(self) -> None:
        if self.download and not self._h5.is_file():
            from torchvision.datasets import USPS

            for train in (True, False):
                USPS(str(self.root), train=train, download=True)

    def _build(self, split: Split) -> Dataset:
        if self._h5.is_file():
            import h5py

            try:
                with h5py.File(self._h5, "r") as f:
                    data = np.asarray(f[f"{split}/data"], dtype=np.float32)
                    target = np.asarray(f[f"{split}/target"], dtype=np.int64)
            except (OSError, KeyError) as e:
                raise DataError(
                    f"USPS file {self._h5} cannot be read ({e}): it must hold train/data, "
                    "train/target, test/data and test/target; replace the file."
                ) from e
            images = np.round(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(-1, 16, 16)
            return ArrayImageDataset(images, target, labelled=self.labelled)
        from torchvision.datasets import USPS

        try:
            ds = USPS(str(self.root), train=split == "train", download=self.download)
        except (RuntimeError, OSError, ValueError, IndexError) as e:
            raise DataError(
                f"USPS cannot be loaded from {self.root} ({e}): provide usps/usps.h5 or the "
                "bz2 files, or pass download=True."
            ) from e
        return ArrayImageDataset(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets), self.labelled)


def _read_label_file(path: Path, folder: Path) -> list[tuple[str, int]]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(
                    f"{path}, line {lineno}: {line.rstrip()!r} is not '<file.png> <label>': "
                    "restore the original MNIST-M label file."
                )
            samples.append((str(folder / parts[0]), int(parts[1])))
    return samples


class MNISTMDomain(_DigitDomain):
    """MNIST-M (Ganin et al.): MNIST digits blended with colour photo patches, 32x32 RGB.

    Looks for an extracted ``<root>/mnist_m/`` folder (``mnist_m_train/*.png`` +
    ``mnist_m_train_labels.txt``, same for ``test``) and otherwise extracts
    ``<root>/mnist_m.tar.gz`` once into the cache folder (``$TLFRAME_CACHE_DIR`` or
    ``~/.cache/tlframe``). The train split is whatever the label file lists; images are
    decoded lazily, one PNG per item.

    Args:
        root: data root (default ``$TLFRAME_DATA_ROOT`` or ``./data``).
        labelled: if False every label is -1.
        class_subset: keep only these digits (e.g. ``[5, 6, 7, 8, 9]``), relabelled 0..k-1 with their
            names kept (``classes == ["5", ..., "9"]``); see :class:`~tlframe.data.domains.Domain`.
        center_crop: keep the central ``center_crop`` x ``center_crop`` pixels of each 32x32 image before any
            transform. The distributed PNGs are the 28x28 MNIST digits padded by 2 pixels on each side (an
            MNIST-M image's edges line up best with its MNIST digit placed at offset 2, unscaled), so ``28``
            gives MNIST's geometry (Ganin et al.'s 28x28 MNIST-M); ``None`` (default) keeps the 32x32 image,
            which a 28x28 network then sees resized (digits ~12 % smaller than MNIST's).
    """

    def __init__(self, root: Optional[str] = None, labelled: bool = True,
                 class_subset: Optional[list[Union[int, str]]] = None, center_crop: Optional[int] = None) -> None:
        super().__init__(labelled, class_subset)
        if center_crop is not None and not 1 <= int(center_crop) <= 32:
            raise DataError(f"center_crop={center_crop} must be a size in [1, 32] (MNIST-M images are 32x32): 28 "
                            "gives MNIST's geometry, null keeps the whole image")
        self.center_crop = None if center_crop is None else int(center_crop)
        self.root = resolve_data_root(root)
        self._folder: Optional[Path] = None
        if not self._extracted(self.root / "mnist_m") and not self._archive.is_file():
            raise DataError(
                f"MNIST-M not found under {self.root}: expected the folder "
                f"{self.root / 'mnist_m'} (with mnist_m_train/ and mnist_m_train_labels.txt) "
                f"or the archive {self._archive}; point root= (or ${DATA_ROOT_ENV}) at the "
                "folder that holds either."
            )

    @property
    def _archive(self) -> Path:
        return self.root / "mnist_m.tar.gz"

    @staticmethod
    def _extracted(folder: Path) -> bool:
        return all((folder / f"mnist_m_{s}_labels.txt").is_file() for s in ("train", "test"))

    @property
    def name(self) -> str:
        return "mnist_m"

    @property
    def folder(self) -> Path:
        """The extracted ``mnist_m`` folder (extracting the archive on first use)."""
        if self._folder is None:
            if self._extracted(self.root / "mnist_m"):
                self._folder = self.root / "mnist_m"
            else:
                folder = extract_tar_once(self._archive, "mnist_m") / "mnist_m"
                if not self._extracted(folder):
                    raise DataError(
                        f"archive {self._archive} does not hold mnist_m/mnist_m_train_labels.txt "
                        "and mnist_m/mnist_m_test_labels.txt: use the original MNIST-M archive."
                    )
                self._folder = folder
        return self._folder

    def prepare(self) -> None:
        _ = self.folder

    def _build(self, split: Split) -> Dataset:
        folder = self.folder
        samples = _read_label_file(folder / f"mnist_m_{split}_labels.txt", folder / f"mnist_m_{split}")
        missing = [p for p, _ in samples if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"{len(missing)} MNIST-M {split} images listed in the label file are missing "
                f"(e.g. {missing[0]}): re-extract the archive (delete {folder.parent} if it "
                "is in the cache)."
            )
        return FileImageDataset(samples, labelled=self.labelled, center_crop=self.center_crop)


class SVHNDomain(_DigitDomain):
    """SVHN (73,257 train / 26,032 test, 32x32 RGB) via ``torchvision.datasets.SVHN``.

    The ``.mat`` files (``train_32x32.mat``, ``test_32x32.mat``) are read from ``<root>/svhn/``,
    or from ``<root>`` itself if they are there; downloads go to ``<root>/svhn/``.
    Reading them needs scipy.

    Args:
        root: data root (default ``$TLFRAME_DATA_ROOT`` or ``./data``).
        download: let torchvision download the files if missing.
        labelled: if False every label is -1.
        class_subset: keep only these digits (e.g. ``[5, 6, 7, 8, 9]``), relabelled 0..k-1 with their
            names kept (``classes == ["5", ..., "9"]``); see :class:`~tlframe.data.domains.Domain`.
    """

    FILES = ("train_32x32.mat", "test_32x32.mat")

    def __init__(self, root: Optional[str] = None, download: bool = False, labelled: bool = True,
                 class_subset: Optional[list[Union[int, str]]] = None) -> None:
        super().__init__(labelled, class_subset)
        self.root = _root(root, download)
        self.download = download
        if not download and self._folder() is None:
            raise DataError(
                f"SVHN files {list(self.FILES)} not found in {self.root / 'svhn'} or "
                f"{self.root}: put them there, point root= (or ${DATA_ROOT_ENV}) at the "
                "right folder, or pass download=True."
            )

    def _folder(self) -> Optional[Path]:
        for folder in (self.root / "svhn", self.root):
            if all((folder / f).is_file() for f in self.FILES):
                return folder
        return None

    @property
    def name(self) -> str:
        return "svhn"

    def prepare(self) -> None:
        if self.download and self._folder() is None:
            from torchvision.datasets import SVHN

            for split in ("train", "test"):
                SVHN(str(self.root / "svhn"), split=split, download=True)

    def _build(self, split: Split) -> Dataset:
        from torchvision.datasets import SVHN

        self.prepare()
        folder = self._folder() or self.root / "svhn"
        try:
            ds = SVHN(str(folder), split=split, download=False)
        except (RuntimeError, ImportError, OSError, ValueError) as e:
            raise DataError(
                f"SVHN cannot be loaded from {folder} ({e}): check the .mat files (and that "
                "scipy is installed), or pass download=True."
            ) from e
        images = np.ascontiguousarray(np.transpose(ds.data, (0, 2, 3, 1)))
        return ArrayImageDataset(images, np.asarray(ds.labels), labelled=self.labelled)
