"""The :class:`Domain` contract and the file-based domains (image folders, image lists)."""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
from torch.utils.data import Dataset

from tlframe.data.datasets import ArrayImageDataset, FileImageDataset
from tlframe.data.errors import DataError
from tlframe.data.paths import find_path

Split = Literal["train", "test"]

#: File extensions accepted as images by the folder and list domains (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp",
)


class Domain(abc.ABC):
    """One domain of a transfer task: a set of classes and a train and a test split.

    ``dataset(split)`` returns a ``torch.utils.data.Dataset`` whose items are
    ``(PIL.Image.Image, int)``; images keep their native mode (the data module converts
    them to the backbone's channel count). When the domain is built with
    ``labelled=False`` every label is ``-1``, so the labels can never leak into training.
    Datasets are built on first use and cached on the domain.

    Every domain takes ``class_subset``: keep only the images of these classes, relabelled
    ``0..k-1`` in the order given, with their names kept (``classes`` lists the kept names). An
    entry is a class index of the full domain (an ``int``: ``[5, 6, 7, 8, 9]`` for the digits 5-9)
    or a class name (a ``str``: ``["dog", "cat"]`` for an image folder). A subclass implements
    :attr:`all_classes` (the full list) and ``_build`` (the full split); the subset is applied here.
    """

    def __init__(self, labelled: bool = True, class_subset: Optional[list[Union[int, str]]] = None) -> None:
        self.labelled = bool(labelled)
        self.class_subset = check_class_subset(class_subset)
        self._datasets: dict[str, Dataset] = {}

    @property
    @abc.abstractmethod
    def all_classes(self) -> list[str]:
        """Names of every class of the domain, before ``class_subset``."""

    @property
    def classes(self) -> list[str]:
        """Class names; the label ``i`` means ``classes[i]`` (after ``class_subset``)."""
        names = self.all_classes
        return names if self.class_subset is None else [names[i] for i in self._subset_indices()]

    def _subset_indices(self) -> list[int]:
        """``class_subset`` as indices into :attr:`all_classes` (checked against it)."""
        names = self.all_classes
        indices = []
        for c in self.class_subset or []:
            if isinstance(c, str):
                if c not in names:
                    raise DataError(f"class_subset: {type(self).__name__} has no class {c!r}; its classes are "
                                    f"{names} (give names from that list, or indices 0..{len(names) - 1}).")
                indices.append(names.index(c))
            else:
                if not 0 <= c < len(names):
                    raise DataError(f"class_subset: class index {c} is out of range for {type(self).__name__} "
                                    f"({len(names)} classes, indices 0..{len(names) - 1}).")
                indices.append(c)
        if len(set(indices)) != len(indices):
            raise DataError(f"class_subset {self.class_subset} names a class twice: list each class once.")
        return indices

    @property
    def name(self) -> str:
        """Short human-readable name for logs."""
        return type(self).__name__.removesuffix("Domain").lower()

    @property
    def has_labels(self) -> bool:
        """Whether ``dataset()`` items carry real labels (else every label is -1)."""
        return self.labelled

    def prepare(self) -> None:
        """Download or extract what is needed (called once per node by the data module)."""

    def dataset(self, split: Split) -> Dataset:
        """The ``"train"`` or ``"test"`` split as a dataset of ``(PIL image, label)``."""
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}: use one of those two.")
        if split not in self._datasets:
            data = self._build(split)
            if self.class_subset is not None:
                data = subset_classes(data, self._subset_indices())
            self._datasets[split] = data
        return self._datasets[split]

    @abc.abstractmethod
    def _build(self, split: Split) -> Dataset:
        """Build the dataset of one split (the caller caches it)."""

    def __repr__(self) -> str:
        subset = f", class_subset={self.class_subset}" if self.class_subset is not None else ""
        return f"{type(self).__name__}(name={self.name!r}, labelled={self.labelled}{subset})"


def check_class_subset(class_subset: Optional[list[Union[int, str]]]) -> Optional[list[Union[int, str]]]:
    """Type-check a ``class_subset`` argument (its entries are checked against the classes on first use)."""
    if class_subset is None:
        return None
    if isinstance(class_subset, (str, bytes)) or not hasattr(class_subset, "__iter__"):
        raise DataError(f"class_subset must be a list of class indices or names, got {class_subset!r}.")
    subset = list(class_subset)
    if not subset:
        raise DataError("class_subset is empty: list at least one class (or leave it null for all classes).")
    bad = [c for c in subset if isinstance(c, bool) or not isinstance(c, (int, str))]
    if bad:
        raise DataError(f"class_subset entries must be class indices (int) or names (str), got {bad}.")
    return subset


def subset_classes(data: Dataset, keep: list[int]) -> Dataset:
    """The items of ``data`` whose label is in ``keep``, relabelled ``keep[i] -> i`` (labels read without decoding).

    The real labels are kept by the raw datasets even when the domain is unlabelled, so the subset
    is the same with ``labelled=False`` (whose items still read as ``-1``).
    """
    remap = np.full(max(keep) + 1, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    if isinstance(data, ArrayImageDataset):
        labels = data.labels
        mask = (labels >= 0) & (labels <= max(keep))
        mask[mask] = remap[labels[mask]] >= 0
        return ArrayImageDataset(data.images[mask], remap[labels[mask]], labelled=data.labelled)
    if isinstance(data, FileImageDataset):
        samples = [(p, int(remap[y])) for p, y in data.samples if 0 <= y <= max(keep) and remap[y] >= 0]
        return FileImageDataset(samples, labelled=data.labelled)
    raise DataError(f"class_subset is not supported for datasets of type {type(data).__name__}: the domain must "
                    "build an ArrayImageDataset or a FileImageDataset.")


class RelabelledDomain(Domain):
    """Another domain whose images carry wrong labels on purpose: label noise and mismatched sources.

    Images of class ``i`` of ``base`` are labelled ``relabel[i]`` (classes not in the map keep
    their label); the class list stays ``base.classes``, so the domain still pairs with targets
    of the same classes. Use it to build a source whose label semantics differ from the
    target's (e.g. ``{0: 1, 1: 0, 2: 3, 3: 2}`` swaps two pairs of digits), the textbook setting
    of negative transfer. Keys and values are class indices (after ``base``'s ``class_subset``)
    or class names.

    Args:
        base: the domain whose images are used (any domain kind).
        relabel: ``{class: new label}``.
    """

    def __init__(self, base: Domain, relabel: dict[Union[int, str], Union[int, str]]) -> None:
        super().__init__(base.labelled, None)
        if not isinstance(base, Domain):
            raise DataError(f"RelabelledDomain: base must be a domain (class_path + init_args), got {base!r}.")
        if not isinstance(relabel, dict) or not relabel:
            raise DataError(f"RelabelledDomain: relabel must be a non-empty mapping {{class: new label}}, got {relabel!r}.")
        self.base = base
        self.relabel = dict(relabel)

    def _index(self, c: Union[int, str]) -> int:
        names = self.base.classes
        if isinstance(c, str) and c in names:
            return names.index(c)
        if isinstance(c, str) and c.lstrip("-").isdigit():  # YAML/JSON mapping keys arrive as strings
            c = int(c)
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(names):
            return c
        raise DataError(f"RelabelledDomain: {c!r} is not a class of {self.base.name}; its classes are {names} "
                        f"(give names from that list, or indices 0..{len(names) - 1}).")

    def mapping(self) -> np.ndarray:
        """``remap[i]`` = the label given to images of class ``i``."""
        remap = np.arange(len(self.base.classes), dtype=np.int64)
        for old, new in self.relabel.items():
            remap[self._index(old)] = self._index(new)
        return remap

    @property
    def name(self) -> str:
        return f"{self.base.name}-relabelled"

    @property
    def all_classes(self) -> list[str]:
        return self.base.classes

    def prepare(self) -> None:
        self.base.prepare()

    def _build(self, split: Split) -> Dataset:
        data, remap = self.base.dataset(split), self.mapping()
        if isinstance(data, ArrayImageDataset):
            labels = np.where(data.labels >= 0, remap[np.clip(data.labels, 0, None)], data.labels)
            return ArrayImageDataset(data.images, labels, labelled=data.labelled)
        if isinstance(data, FileImageDataset):
            return FileImageDataset([(p, int(remap[y]) if y >= 0 else y) for p, y in data.samples],
                                    labelled=data.labelled)
        raise DataError(f"RelabelledDomain does not support datasets of type {type(data).__name__}: the base domain "
                        "must build an ArrayImageDataset or a FileImageDataset.")

    def __repr__(self) -> str:
        return f"RelabelledDomain(base={self.base!r}, relabel={self.relabel})"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Scan ``<root>/<class>/**/<image>``; return sorted class names and ``(path, label)``."""
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist or is not a folder: pass the folder that "
            "holds one sub-folder per class."
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class folders: lay the images out as "
            f"<root>/<class>/<image> (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})."
        )
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
        if not found:
            raise DataError(
                f"folder {root / cls} has no images (accepted extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}): add images to it or remove the folder."
            )
        samples.extend((p, label) for p in found)
    return classes, samples


class ImageFolderDomain(Domain):
    """Images laid out as ``<root>/<class>/*.jpg`` (torchvision ImageFolder layout).

    Classes are the sorted sub-folder names; sub-folders of a class folder are searched
    too. Split ``"test"`` reads ``test_root`` when given; otherwise it is the *same
    images* as ``"train"``: the transductive convention of unsupervised domain adaptation,
    where the unlabelled target images are both trained on (without labels) and evaluated.

    Args:
        root: folder with one sub-folder per class. A relative path that does not exist
            is also looked up under the data root (``$TLFRAME_DATA_ROOT`` or ``./data``).
        test_root: optional folder of the same layout for the ``"test"`` split.
        labelled: if False every label is -1.
        class_subset: keep only these classes (indices or folder names), relabelled 0..k-1; see :class:`Domain`.
    """

    def __init__(self, root: str, test_root: Optional[str] = None, labelled: bool = True,
                 class_subset: Optional[list[Union[int, str]]] = None) -> None:
        super().__init__(labelled, class_subset)
        self.root = find_path(root, "image folder")
        self.test_root = find_path(test_root, "test image folder") if test_root else None
        self._scans: dict[Path, tuple[list[str], list[tuple[str, int]]]] = {}

    def _scan(self, root: Path) -> tuple[list[str], list[tuple[str, int]]]:
        if root not in self._scans:
            self._scans[root] = scan_image_folder(root)
        return self._scans[root]

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def all_classes(self) -> list[str]:
        return list(self._scan(self.root)[0])

    def _build(self, split: Split) -> Dataset:
        root = self.test_root if split == "test" and self.test_root is not None else self.root
        classes, samples = self._scan(root)
        if classes != self.all_classes:
            raise DataError(
                f"test folder {root} has classes {classes} but train folder {self.root} has "
                f"{self.all_classes}: make the class folders of both match."
            )
        return FileImageDataset(samples, labelled=self.labelled)


def read_image_list(list_file: Path, root: Path) -> list[tuple[str, int]]:
    """Parse a ``relative/path.jpg <int label>`` list (one image per line).

    Blank lines and lines starting with ``#`` are skipped; the label is the last token, so
    paths may contain spaces.
    """
    samples: list[tuple[str, int]] = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                label = int(parts[1])
                if label < 0:
                    raise ValueError("negative label")
            except ValueError:
                raise DataError(
                    f"{list_file}, line {lineno}: {raw.rstrip()!r} is not "
                    "'<relative/path.jpg> <label>' with an integer label >= 0: fix or delete "
                    "that line."
                ) from None
            samples.append((str(root / parts[0]), label))
    if not samples:
        raise DataError(f"list file {list_file} lists no images: add '<path> <label>' lines.")
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(
            f"{len(missing)} of {len(samples)} images listed in {list_file} do not exist "
            f"({shown}): paths are read relative to {root}; pass root=... pointing at the "
            "folder they are relative to, or fix the list."
        )
    return samples


class ImageListDomain(Domain):
    """Images listed in a text file, one ``relative/path.jpg <int label>`` per line.

    This is the list convention of the Office / TLlib benchmark lists.

    Args:
        list_file: the list of the ``"train"`` split. A relative path that does not exist
            is also looked up under the data root.
        root: folder the listed paths are relative to (default: the list file's folder).
        test_list_file: list for the ``"test"`` split; default: the same list (transductive
            convention, as in :class:`ImageFolderDomain`).
        classes: class names, index = label. Default ``class_0 .. class_{k-1}`` with ``k``
            one more than the largest label in the lists.
        labelled: if False every label is -1.
        class_subset: keep only these classes (label indices or names), relabelled 0..k-1; see :class:`Domain`.
    """

    def __init__(
        self,
        list_file: str,
        root: Optional[str] = None,
        test_list_file: Optional[str] = None,
        classes: Optional[list[str]] = None,
        labelled: bool = True,
        class_subset: Optional[list[Union[int, str]]] = None,
    ) -> None:
        super().__init__(labelled, class_subset)
        self.list_file = find_path(list_file, "list file")
        self.root = find_path(root, "image root") if root else self.list_file.parent
        self.test_list_file = find_path(test_list_file, "test list file") if test_list_file else None
        self._given_classes = list(classes) if classes is not None else None
        self._samples: dict[str, list[tuple[str, int]]] = {}

    def _read(self, split: Split) -> list[tuple[str, int]]:
        if split not in self._samples:
            path = self.test_list_file if split == "test" and self.test_list_file else self.list_file
            self._samples[split] = read_image_list(path, self.root)
        return self._samples[split]

    @property
    def name(self) -> str:
        return self.list_file.stem

    @property
    def all_classes(self) -> list[str]:
        top = max(y for split in ("train", "test") for _, y in self._read(split))
        if self._given_classes is None:
            return [f"class_{i}" for i in range(top + 1)]
        if top >= len(self._given_classes):
            raise DataError(
                f"list {self.list_file} uses label {top} but only {len(self._given_classes)} "
                "class names were given: pass one name per label (classes=[...])."
            )
        return list(self._given_classes)

    def _build(self, split: Split) -> Dataset:
        _ = self.all_classes  # validates the labels against the class names
        return FileImageDataset(self._read(split), labelled=self.labelled)


class ImageFilesDomain(Domain):
    """Every image under a folder (searched recursively, in sorted path order), without labels:
    what ``tlframe predict`` runs on for a folder of new images (``data.predict_domain``).

    Both splits are the same images; every label is -1 and the domain has no classes of its own
    (predictions use the training classes). Accepted extensions: :data:`IMAGE_EXTENSIONS`.

    Args:
        root: the folder. A relative path that does not exist is also looked up under the data root.
    """

    def __init__(self, root: str) -> None:
        super().__init__(labelled=False)
        self.root = find_path(root, "image folder")
        self._samples: Optional[list[tuple[str, int]]] = None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def all_classes(self) -> list[str]:
        return []

    def _build(self, split: Split) -> Dataset:
        if self._samples is None:
            if not self.root.is_dir():
                raise DataError(f"image folder {self.root} does not exist or is not a folder: pass a folder of images.")
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
            if not found:
                raise DataError(f"folder {self.root} holds no images (accepted extensions: "
                                f"{', '.join(IMAGE_EXTENSIONS)}): point root at a folder of images.")
            self._samples = [(p, -1) for p in found]
        return FileImageDataset(self._samples, labelled=False)
