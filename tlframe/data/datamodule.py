"""The Lightning data module that pairs a source and a target :class:`Domain`."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Subset

from tlframe.data.datasets import (NO_LABEL, MemoizedDataset, TransformedDataset, WithIndex, held_in_memory,
                                   sample_names)
from tlframe.data.domains import Domain
from tlframe.data.errors import DataError
from tlframe.data.feature_cache import FeatureCache
from tlframe.data.samplers import ClassBalancedSampler, EpochRandomSampler
from tlframe.seeding import mix, run_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Largest split (float32 tensors at the input size) that ``preload_in_memory`` keeps: 2 GiB.
PRELOAD_MAX_BYTES = 2 * 1024**3
_TIMM_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


class TransferDataModule(pl.LightningDataModule):
    """Source and target domains for transfer learning / unsupervised domain adaptation.

    Training batches are ``{"source": (x_s, y_s), "target": (x_t, y_t)}``
    (a ``CombinedLoader`` in ``"min_size"`` mode); ``y_t`` is -1 when the target domain is
    unlabelled, and target labels are never needed for training. Both domains yield exactly
    ``iters_per_epoch`` batches per epoch: each is drawn by an ``EpochRandomSampler`` without
    replacement over ``iters_per_epoch * batch_size`` samples, so the smaller domain runs
    through fresh permutations. (Under DDP, Lightning shards these samplers, so each rank
    gets ``iters_per_epoch / world_size`` batches.) With ``source_sampler: balanced`` the source
    sampler is a :class:`~tlframe.data.samplers.ClassBalancedSampler` (every class equally
    likely) with the same guarantees.

    Splits: the source ``"train"`` split is first reduced to ``source_samples_per_class``
    images per class when that is set (and to ``source_class_fractions`` of each class: a
    simulated imbalanced source), then divided into train and validation parts by
    ``val_fraction`` (both seeded by ``split_seed``); the target ``"train"`` split is the
    unlabelled training data and the target ``"test"`` split is used for evaluation (for
    folder domains without a separate test folder these are the same images: transductive
    DA).

    Evaluation loaders (lists; names in :attr:`val_domains` / :attr:`test_domains`). With
    ``target_val_samples`` the target loader of *validation* serves a fixed class-stratified
    subsample of the target test split (uniform when the target is unlabelled); ``test`` always
    uses the whole split.

    - ``val_dataloader()``: ``[source val, target test]``, names ``["source", "target"]``;
      the source part is left out when ``val_fraction == 0``. The target loader is always
      there, also when the target is unlabelled (labels -1): the module then logs the
      label-free validators (``val/target_entropy``, ``val/target_snd``) but no accuracy.
    - ``test_dataloader()``: ``[target test, source test]``, names ``["target", "source"]``.
      The target loader is returned even when the target is unlabelled; its labels are then
      -1 and the module must skip accuracy for it.
    - ``predict_dataloader()``: the ``predict_split`` of ``predict_domain`` when it is set (any
      folder, image list or data set; :meth:`predict_samples` names each image), else the target
      test split.

    Transforms come from a timm data config given by the LightningModule through
    :meth:`set_data_config` (after ``setup()``, before the dataloaders are built). Every
    image is first converted to the backbone's channel count ("L" for 1 channel, else
    "RGB"), so grey, palette and RGBA images work with any backbone.

    Feature cache: after :meth:`use_feature_cache` (called by the module for
    ``FrozenFeatures(cache_features="memory" | "disk")``), every loader serves
    ``(backbone features (N, D), labels)`` from a :class:`FeatureCache` built from the eval
    transform, instead of images; samplers, batch sizes, pairing and labels are unchanged, and
    such loaders use no worker processes (the batches are slices of tensors in memory).

    Args:
        source: labelled source domain.
        target: target domain (``labelled=False`` for unsupervised DA).
        batch_size: source batch size (and target batch size unless given).
        target_batch_size: target batch size; default ``batch_size``.
        iters_per_epoch: training batches per epoch; default
            ``max(ceil(n_source / batch_size), ceil(n_target / target_batch_size))``.
        val_fraction: fraction of the source train split held out for validation, in [0, 1).
        eval_batch_size: batch size of the evaluation loaders; default ``batch_size``.
        num_workers: DataLoader workers per loader.
        pin_memory: passed to every DataLoader.
        persistent_workers: passed to every DataLoader (only used when num_workers > 0).
        prefetch_factor: batches loaded in advance by each worker (only with num_workers > 0;
            ``None``: torch's default, 2).
        train_augmentation: ``"none"`` (the eval transform), ``"crop_flip"`` (resize to
            ``size / crop_pct``, random crop, horizontal flip) or ``"timm"`` (timm's
            training transform: random resized crop, flip, colour jitter).
        image_size: overrides the backbone's input height and width.
        split_seed: seed of the source train/val split and of the per-class subset.
        source_samples_per_class: keep only this many images of each class of the source
            ``"train"`` split (a "labels per class" budget, e.g. 10 or 100), chosen uniformly at
            random per class with a generator seeded by ``split_seed``, before the train/val
            split (so ``val_fraction`` is taken out of these ``k * num_classes`` images). The
            same seed gives the same images. ``None`` (default) keeps every image. A class
            with fewer images than requested is a :class:`DataError` naming the class and
            its count.
        preload_in_memory: data sets held in memory as arrays (MNIST, USPS, MNIST-M, SVHN,
            synthetic) keep each image's transformed tensor after its first use, so from the
            second epoch on a batch is tensor look-ups with no per-image work (their loaders run
            in-process, ``num_workers`` is not used for them); the training splits only when
            ``train_augmentation`` is ``"none"`` (a random augmentation needs the images).
            Costs ``4 * C * H * W`` bytes per image seen (MNIST train at 28 px: 188 MB); a split
            that would take more than ``PRELOAD_MAX_BYTES`` (2 GiB, e.g. SVHN at 224 px) loads as
            usual. Folder and list domains always decode from disk (with ``num_workers``).
        target_val_samples: validate on at most this many target test images per validation (a
            class-stratified sample drawn once with ``split_seed``: each class keeps its share,
            at least one image; uniform when the target is unlabelled). Makes per-epoch
            validation of a large target cheap; ``tlframe test`` still uses every image.
            ``None`` (default): the whole split.
        predict_domain: the domain ``tlframe predict`` runs on (e.g. an
            :class:`~tlframe.data.ImageFilesDomain` of any folder, or an image list); its classes
            must be the training classes when it is labelled. ``None``: the target test split.
        predict_split: which split of ``predict_domain`` to predict (``"test"`` or ``"train"``).
        source_class_fractions: simulate a class-imbalanced source: keep this fraction of the
            images of each class (one value in [0, 1] per class, in class order) of the source
            ``"train"`` split, after ``source_samples_per_class`` and before the train/val split (so the
            validation part has the same class proportions), chosen at random with ``split_seed``; at
            least one image of a class with a fraction > 0 is kept.
            :func:`tlframe.label_shift.long_tail_fractions` gives the usual exponential long tail
            (``long_tail_fractions(10, 10)`` = imbalance ratio 10, class 0 the head). ``None``: all images.
        target_class_fractions: simulate label shift: the same for both target splits (``"train"``,
            the unlabelled adaptation data, and ``"test"``), each subsampled with its own seed derived
            from ``split_seed``. Building the shifted target reads the target data set's true labels
            (this is constructing the benchmark, like choosing the data set); nothing in training or
            model selection reads them. Needs a target data set that carries labels.
        source_sampler: how source training batches are drawn. ``"random"`` (default):
            :class:`~tlframe.data.samplers.EpochRandomSampler`, successive random permutations of
            the source train split, so each class appears as often as it has images.
            ``"balanced"``: :class:`~tlframe.data.samplers.ClassBalancedSampler`, every class equally
            likely (each epoch cycles through random permutations of the classes, and within a
            class through random permutations of its images), for a long-tailed source. Both are
            exact under resume mid-epoch and DDP (the order of an epoch is a function of the run
            seed and the epoch), and ``iters_per_epoch`` counts the same. The labels are read
            without decoding images. The target is always sampled at random (its labels are never read).
        strong_num_ops, strong_magnitude, strong_cutout: the strong view of a target image for
            self-training strategies (FixMatch, Mean Teacher: their ``target_views`` is 2), whose target
            training batches are then ``((x_weak, x_strong), y_t)``: RandAugment with this number of
            operations and magnitude bin (0-30), then the training transform, then a cutout square of up
            to ``strong_cutout`` of each side (:mod:`tlframe.data.views`). Both views are seeded per
            sample (resume- and DDP-exact). Unused by other strategies.
    """

    def __init__(
        self,
        source: Optional[Domain],
        target: Domain,
        batch_size: int = 32,
        target_batch_size: Optional[int] = None,
        iters_per_epoch: Optional[int] = None,
        val_fraction: float = 0.1,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = None,
        train_augmentation: Literal["none", "crop_flip", "timm"] = "none",
        image_size: Optional[int] = None,
        split_seed: int = 0,
        source_samples_per_class: Optional[int] = None,
        preload_in_memory: bool = True,
        target_val_samples: Optional[int] = None,
        predict_domain: Optional[Domain] = None,
        predict_split: Literal["train", "test"] = "test",
        source_class_fractions: Optional[list[float]] = None,
        target_class_fractions: Optional[list[float]] = None,
        source_sampler: Literal["random", "balanced"] = "random",
        strong_num_ops: int = 2,
        strong_magnitude: int = 10,
        strong_cutout: float = 0.5,
    ) -> None:
        super().__init__()
        for key, value in (("batch_size", batch_size), ("target_batch_size", target_batch_size),
                           ("iters_per_epoch", iters_per_epoch), ("eval_batch_size", eval_batch_size),
                           ("image_size", image_size), ("source_samples_per_class", source_samples_per_class),
                           ("target_val_samples", target_val_samples)):
            if value is not None and int(value) < 1:
                raise DataError(f"{key}={value} must be a positive integer: pass a value >= 1.")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction={val_fraction} must be in [0, 1): e.g. 0.1, or 0 for no source validation.")
        if num_workers < 0:
            raise DataError(f"num_workers={num_workers} must be >= 0.")
        if train_augmentation not in ("none", "crop_flip", "timm"):
            raise DataError(
                f"train_augmentation={train_augmentation!r} is unknown: use 'none', 'crop_flip' or 'timm'."
            )
        if predict_split not in ("train", "test"):
            raise DataError(f"predict_split={predict_split!r} is unknown: use 'test' or 'train'.")
        if source_sampler not in ("random", "balanced"):
            raise DataError(f"source_sampler={source_sampler!r} is unknown: use 'random' (default) or 'balanced' "
                            "(every class equally likely).")
        for key, value, high in (("strong_num_ops", strong_num_ops, None), ("strong_magnitude", strong_magnitude, 30)):
            if int(value) != value or value < 0 or (high is not None and value > high):
                raise DataError(f"{key}={value} must be an integer >= 0" + (f" and <= {high}" if high else "")
                                + " (RandAugment's number of operations / magnitude bin, e.g. 2 and 10).")
        if not 0.0 <= float(strong_cutout) <= 1.0:
            raise DataError(f"strong_cutout={strong_cutout} must be in [0, 1]: the largest cutout square's side as a "
                            "fraction of the image side (0.5 as FixMatch; 0: no cutout).")
        self.strong_num_ops, self.strong_magnitude = int(strong_num_ops), int(strong_magnitude)
        self.strong_cutout = float(strong_cutout)
        #: 1: one view of each target training image; 2: (weak, strong) views (set by the strategy, see set_target_views)
        self.target_views = 1
        #: whether training batches hold the source (False: a source-free strategy) and the target images' indices
        self.train_source, self.target_indices = source is not None, False
        self.source = source
        self.target = target
        self.target_val_samples = None if target_val_samples is None else int(target_val_samples)
        self.predict_domain = predict_domain
        self.predict_split = predict_split
        self.source_sampler = source_sampler
        for key, fractions in (("source_class_fractions", source_class_fractions),
                               ("target_class_fractions", target_class_fractions)):
            if fractions is not None and (len(fractions) == 0 or not all(0.0 <= float(f) <= 1.0 for f in fractions)
                                          or not any(float(f) > 0 for f in fractions)):
                raise DataError(f"{key}={list(fractions)} must list one fraction in [0, 1] per class, not all 0 "
                                "(e.g. tlframe.label_shift.long_tail_fractions(10, 10)).")
        self.source_class_fractions = None if source_class_fractions is None else [float(f) for f in source_class_fractions]
        self.target_class_fractions = None if target_class_fractions is None else [float(f) for f in target_class_fractions]
        self.batch_size = int(batch_size)
        self.target_batch_size = int(target_batch_size or batch_size)
        self.iters_per_epoch = iters_per_epoch
        self.val_fraction = float(val_fraction)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.train_augmentation = train_augmentation
        self.image_size = image_size
        self.split_seed = int(split_seed)
        self.source_samples_per_class = None if source_samples_per_class is None else int(source_samples_per_class)
        self.data_config: Optional[dict[str, Any]] = None
        self.preload_in_memory = bool(preload_in_memory)
        self._preloaded: dict[str, MemoizedDataset] = {}  # transformed splits, filled on first use
        self.feature_cache: Optional[FeatureCache] = None
        # Raw datasets of (PIL image, label), built in setup().
        self.source_train: Optional[Dataset] = None
        self.source_val: Optional[Dataset] = None
        self.source_test: Optional[Dataset] = None
        self.target_train: Optional[Dataset] = None
        self.target_test: Optional[Dataset] = None
        self.target_val: Optional[Dataset] = None
        self.predict_data: Optional[Dataset] = None

    # ----------------------------------------------------------------- description
    @property
    def classes(self) -> list[str]:
        """Class names shared by both domains (the target's in a source-free run)."""
        return (self.source or self.target).classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def val_domains(self) -> list[str]:
        """Names of the loaders returned by :meth:`val_dataloader`, in order."""
        return (["source"] if self.val_fraction > 0 and self.source is not None else []) + ["target"]

    @property
    def test_domains(self) -> list[str]:
        """Names of the loaders returned by :meth:`test_dataloader`, in order."""
        return ["target"] + (["source"] if self.source is not None else [])

    # ----------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Download / extract the domains' files (once per node)."""
        if self.source is not None:
            self.source.prepare()
        self.target.prepare()
        if self.predict_domain is not None:
            self.predict_domain.prepare()

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the raw datasets and check them (idempotent)."""
        if self.target_train is not None:
            return
        if self.source is None:
            self._setup_target_only()
            return
        if not self.source.has_labels:
            raise DataError(
                f"source domain {self.source.name} is unlabelled: the source must be "
                "labelled (set labelled: true on the source domain)."
            )
        if self.source.classes != self.target.classes:
            raise DataError(
                f"source domain {self.source.name} has classes {self.source.classes} but "
                f"target domain {self.target.name} has {self.target.classes}: make the class "
                "folders (or class lists) of both domains match, same names in the same order."
            )
        full = self.source.dataset("train")
        target_train, target_test = self._target_splits()
        datasets = {
            f"source {self.source.name} train": full,
            f"source {self.source.name} test": self.source.dataset("test"),
            f"target {self.target.name} train": target_train,
            f"target {self.target.name} test": target_test,
        }
        for what, ds in datasets.items():
            if len(ds) == 0:  # type: ignore[arg-type]
                raise DataError(f"the {what} split is empty: give that domain some images.")
        # Indices into the full source train split that take part in the train/val split.
        if self.source_samples_per_class is None:
            pool = list(range(len(full)))  # type: ignore[arg-type]
        else:
            pool = self._per_class_subset(full)
        if self.source_class_fractions is not None:
            kept = self._fraction_subset(Subset(full, pool), self.source_class_fractions, mix(self.split_seed, 3),
                                         f"source {self.source.name} train", "source_class_fractions")
            pool = [pool[i] for i in kept.indices]
        n = len(pool)
        n_val = 0 if self.val_fraction == 0 else min(max(1, round(n * self.val_fraction)), n - 1)
        if self.val_fraction > 0 and n_val == 0:
            raise DataError(
                f"the source {self.source.name} train split has only {n} image(s), too few to hold "
                "out a validation part: set val_fraction=0 or give the source more images."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        source_train = Subset(full, sorted(pool[i] for i in perm[n_val:]))
        source_val = Subset(full, sorted(pool[i] for i in perm[:n_val]))
        for role, ds, bs in (("source", source_train, self.batch_size),
                             ("target", target_train, self.target_batch_size)):
            if bs > len(ds):  # type: ignore[arg-type]
                extra = f" after holding out {n_val} images for validation" if role == "source" else ""
                raise DataError(
                    f"{role} batch size {bs} is larger than the {role} train set "
                    f"({len(ds)} images{extra}): lower batch_size"  # type: ignore[arg-type]
                    f"{'' if role == 'source' else ' / target_batch_size'} to at most {len(ds)}."  # type: ignore[arg-type]
                )
        self.source_train, self.source_val = source_train, source_val
        self.source_test = self.source.dataset("test")
        self.target_train, self.target_test = target_train, target_test
        self.target_val = self._target_val_subset(self.target_test)
        self.predict_data = self._predict_data()

    def _target_splits(self) -> tuple[Dataset, Dataset]:
        """The target train and test splits (with ``target_class_fractions`` applied)."""
        target_train, target_test = self.target.dataset("train"), self.target.dataset("test")
        if self.target_class_fractions is not None:
            target_train = self._fraction_subset(target_train, self.target_class_fractions, mix(self.split_seed, 4),
                                                 f"target {self.target.name} train", "target_class_fractions")
            target_test = self._fraction_subset(target_test, self.target_class_fractions, mix(self.split_seed, 5),
                                                f"target {self.target.name} test", "target_class_fractions")
        return target_train, target_test

    def _setup_target_only(self) -> None:
        """``source: null``: a source-free run (e.g. SHOT's adaptation phase) has the target splits only."""
        target_train, target_test = self._target_splits()
        for what, ds in ((f"target {self.target.name} train", target_train), (f"target {self.target.name} test", target_test)):
            if len(ds) == 0:  # type: ignore[arg-type]
                raise DataError(f"the {what} split is empty: give that domain some images.")
        if self.target_batch_size > len(target_train):  # type: ignore[arg-type]
            raise DataError(f"target batch size {self.target_batch_size} is larger than the target train set "
                            f"({len(target_train)} images): lower batch_size / target_batch_size to at most "  # type: ignore[arg-type]
                            f"{len(target_train)}.")  # type: ignore[arg-type]
        self.target_train, self.target_test = target_train, target_test
        self.target_val = self._target_val_subset(self.target_test)
        self.predict_data = self._predict_data()

    def set_training_domains(self, source: bool = True, target_indices: bool = False) -> None:
        """What the training batches hold (the model calls it in ``setup`` from its strategy): the source
        (``source=False``: a source-free strategy; no source loader is built) and, with ``target_indices``, each
        target image's index in the target train split (the batch is then ``(x_t, y_t, idx_t)``)."""
        if source and self.source is None:
            raise DataError("data.source is null (a source-free run), but the strategy trains on the labelled source: "
                            "give data.source, or use a source-free strategy (tlframe.strategies.SHOT).")
        self.train_source, self.target_indices = bool(source), bool(target_indices)

    def target_eval_loader(self) -> DataLoader:
        """The target train split with the eval transform, in order (images ``0 .. n-1``), e.g. for a strategy's
        pass over the unlabelled adaptation data (its labels, if any, must not be read)."""
        self._ensure_setup()
        return self._loader(self.target_train, self.eval_transform(), self.eval_batch_size, "target train")  # type: ignore[arg-type]

    def _target_val_subset(self, test: Dataset) -> Dataset:
        """The target split validated each epoch: ``test`` or its ``target_val_samples`` stratified sample."""
        k = self.target_val_samples
        n = len(test)  # type: ignore[arg-type]
        if k is None or k >= n:
            return test
        generator = torch.Generator().manual_seed(mix(self.split_seed, 1))
        if not self.target.has_labels:
            chosen = torch.randperm(n, generator=generator)[:k].tolist()
        else:
            labels = _labels_of(test)
            counts = np.bincount(labels, minlength=self.num_classes)
            share = np.maximum(1, np.floor(counts * k / n)).astype(int) * (counts > 0)
            chosen = []
            for c in np.flatnonzero(counts):
                idx = torch.from_numpy(np.flatnonzero(labels == c))
                chosen.extend(idx[torch.randperm(len(idx), generator=generator)[:share[c]]].tolist())
        rank_zero_info(f"tlframe: validating on {len(chosen)} of {n} target {self.target.name} test images "
                       f"(data.target_val_samples={k}, {'class-stratified' if self.target.has_labels else 'uniform'}); "
                       "tlframe test uses all of them")
        return Subset(test, sorted(chosen))

    def _predict_data(self) -> Dataset:
        """The raw split that ``tlframe predict`` runs on (``predict_domain`` or the target test split)."""
        domain = self.predict_domain
        if domain is None:
            return self.target_test  # type: ignore[return-value]
        if domain.has_labels and domain.classes != self.classes:
            raise DataError(
                f"predict domain {domain.name} has classes {domain.classes} but the model was trained on "
                f"{self.classes}: give it the same class folders (names and order), or labelled: false "
                "(or an ImageFilesDomain) to predict on images without labels.")
        data = domain.dataset(self.predict_split)
        if len(data) == 0:  # type: ignore[arg-type]
            raise DataError(f"the predict domain {domain.name} {self.predict_split} split is empty: give it some images.")
        return data

    def predict_samples(self) -> list[str]:
        """Per image of the predict split, in order: its file path (folder and list domains) or
        ``"<domain> <split> #<i>"`` (in-memory data sets, ``i`` the index in that split)."""
        self._ensure_setup()
        domain = self.predict_domain or self.target
        split = self.predict_split if self.predict_domain is not None else "test"
        return sample_names(self.predict_data, f"{domain.name} {split}")  # type: ignore[arg-type]

    def _per_class_subset(self, full: Dataset) -> list[int]:
        """Sorted indices of ``source_samples_per_class`` images per class of ``full`` (seeded by ``split_seed``)."""
        k = self.source_samples_per_class
        assert k is not None
        labels = _labels_of(full)
        counts = [int((labels == c).sum()) for c in range(self.num_classes)]
        short = [(self.classes[c], n) for c, n in enumerate(counts) if n < k]
        if short:
            listed = ", ".join(f"class {name!r} has {n}" for name, n in short)
            raise DataError(
                f"source_samples_per_class={k} but the source {self.source.name} train split has fewer "
                f"images in {len(short)} class(es): {listed} (per-class counts: {counts}): lower "
                f"source_samples_per_class to at most {min(counts)} or set it to null for all images."
            )
        generator = torch.Generator().manual_seed(self.split_seed)
        chosen: list[int] = []
        for c in range(self.num_classes):
            idx = torch.from_numpy(np.flatnonzero(labels == c))
            chosen.extend(idx[torch.randperm(len(idx), generator=generator)[:k]].tolist())
        return sorted(chosen)

    def _fraction_subset(self, ds: Dataset, fractions: list[float], seed: int, what: str, key: str) -> Subset:
        """``Subset`` of ``ds`` keeping ``round(fractions[c] * n_c)`` (at least 1 when > 0) random images of each class c."""
        if len(fractions) != self.num_classes:
            raise DataError(f"{key} has {len(fractions)} values but the domains have {self.num_classes} classes: "
                            "give one fraction per class, in class order.")
        labels = _true_labels_of(ds)
        if (labels < 0).any():
            raise DataError(f"{key}: the {what} split carries no labels, so its class proportions cannot be changed: "
                            "use a data set with labels (its labels are read only to build the subset).")
        generator = torch.Generator().manual_seed(seed)
        counts = np.bincount(labels, minlength=self.num_classes)
        chosen: list[int] = []
        for c in range(self.num_classes):
            idx = torch.from_numpy(np.flatnonzero(labels == c))
            keep = 0 if fractions[c] == 0 else max(1, round(fractions[c] * len(idx)))
            chosen.extend(idx[torch.randperm(len(idx), generator=generator)[:keep]].tolist())
        kept = np.bincount(labels[chosen], minlength=self.num_classes)
        rank_zero_info(f"tlframe: {key}: the {what} split keeps {len(chosen)} of {len(labels)} images, per class "
                       f"{kept.tolist()} (of {counts.tolist()})")
        return Subset(ds, sorted(chosen))

    def source_class_counts(self) -> np.ndarray:
        """Images per class of the source train split (after ``source_samples_per_class`` and the validation
        hold-out), ``(num_classes,)`` int64, read without decoding images: the ``counts`` of
        :func:`tlframe.label_shift.class_weights`."""
        self._ensure_setup()
        if self.source_train is None:
            raise DataError("class weights need the source class counts, but data.source is null (a source-free run)")
        return np.bincount(_labels_of(self.source_train), minlength=self.num_classes).astype(np.int64)  # type: ignore[arg-type]

    def source_train_sample(self, num: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` images of the source train split (all when it has fewer), drawn at random with a generator
        seeded by ``seed`` and seen through the *eval* transform: ``(images (n, C, H, W), labels (n,))``, the
        same on every DDP rank and in every run with that seed (e.g. DELTA's channel attention)."""
        self._ensure_setup()
        ds = TransformedDataset(self.source_train, self.eval_transform(), self.image_mode)  # type: ignore[arg-type]
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num].tolist()
        items = [ds[i] for i in order]
        return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])

    def check_label_shift_data(self) -> None:
        """Raise :class:`DataError` unless the data can feed a label-shift estimate (a source validation split)."""
        if self.val_fraction == 0 or self.source is None:
            raise DataError("label_shift: bbse needs a labelled source validation split for the confusion matrix "
                            "(the training split would give an over-confident one): set data.val_fraction > 0 "
                            "(e.g. 0.1) or model.strategy.init_args.label_shift: none.")

    def label_shift_loaders(self, rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
        """The loaders of a label-shift estimate: ``(source validation split, target train split)``, both with the
        eval transform, in order, each rank reading every ``world_size``-th image from ``rank`` (the counts are
        summed over ranks). The target loader's labels, if any, must not be read (it is the unlabelled
        adaptation data)."""
        self._ensure_setup()
        transform = self.eval_transform()
        out = []
        for ds, name in ((self.source_val, "source val"), (self.target_train, "target train")):
            shard = list(range(rank, len(ds), world_size))  # type: ignore[arg-type]
            out.append(self._loader(ds, transform, self.eval_batch_size, name, sampler=shard))  # type: ignore[arg-type]
        return out[0], out[1]

    def _ensure_setup(self) -> None:
        if self.target_train is None:
            self.setup("fit")

    # ----------------------------------------------------------------- transforms
    def set_data_config(self, cfg: dict) -> None:
        """Use a timm data config (``timm.data.resolve_model_data_config(model)``) for the
        transforms; unknown keys are ignored."""
        cfg = {k: cfg[k] for k in _TIMM_KEYS if k in cfg}
        if "input_size" in cfg and len(cfg["input_size"]) != 3:
            raise DataError(f"data config input_size {cfg['input_size']} is not (C, H, W): fix the config.")
        self.data_config = cfg

    def set_target_views(self, views: int) -> None:
        """Serve ``views`` views of each target training image: 1 (the training transform) or 2, a
        ``(weak, strong)`` pair (:mod:`tlframe.data.views`) for self-training strategies; the model calls it in
        ``setup`` from its strategy's ``target_views``."""
        if views not in (1, 2):
            raise ValueError(f"target views must be 1 or 2, got {views}")
        if views == 2 and self.feature_cache is not None:
            raise DataError("a strategy that needs weak and strong views of the target (FixMatch, Mean Teacher) "
                            "cannot train on cached features: use cache_features: none.")
        self.target_views = views

    def strong_transform(self):
        """The strong view: RandAugment(``strong_num_ops``, ``strong_magnitude``), the training transform, a cutout
        of up to ``strong_cutout`` of each side (:func:`tlframe.data.views.strong_transform`)."""
        from tlframe.data.views import strong_transform

        return strong_transform(self.train_transform(), self.strong_num_ops, self.strong_magnitude, self.strong_cutout)

    def use_feature_cache(self, cache: Optional[FeatureCache]) -> None:
        """Serve backbone features from ``cache`` in every loader (``None``: images again).

        Each split's features are computed when its loader is first built (in batches of
        ``eval_batch_size``, with ``num_workers`` workers, eval transform) and reused afterwards.

        Raises:
            DataError: with ``train_augmentation`` other than ``"none"``: a cached feature
                stands for the eval-transformed image, so random augmentation cannot be applied.
        """
        if cache is not None and self.train_augmentation != "none":
            raise DataError(
                f"train_augmentation={self.train_augmentation!r} cannot be used with cached features: the "
                "cache holds one feature vector per image, computed with the eval transform, so nothing "
                "is augmented. Set data.train_augmentation: none, or cache_features: none on the "
                "FrozenFeatures strategy to recompute the backbone on augmented images every epoch."
            )
        self.feature_cache = cache

    def _resolved_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"input_size": (3, 32, 32), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                               "interpolation": "bilinear", "crop_pct": 1.0}
        if self.data_config is not None:
            cfg.update(self.data_config)
        c, h, w = (int(x) for x in cfg["input_size"])
        if self.image_size is not None:
            h = w = int(self.image_size)
        cfg["input_size"] = (c, h, w)
        cfg["mean"] = _per_channel(cfg["mean"], c)
        cfg["std"] = _per_channel(cfg["std"], c)
        if cfg.get("crop_pct") is None:
            cfg["crop_pct"] = 1.0
        return cfg

    @property
    def image_mode(self) -> str:
        """PIL mode every image is converted to: "L" for 1-channel backbones, else "RGB"."""
        return "L" if self._resolved_config()["input_size"][0] == 1 else "RGB"

    def eval_transform(self):
        """timm's evaluation transform for the current data config."""
        from timm.data import create_transform

        return create_transform(**self._resolved_config(), is_training=False)

    def train_transform(self):
        """The training transform selected by ``train_augmentation``."""
        if self.train_augmentation == "none":
            return self.eval_transform()
        cfg = self._resolved_config()
        if self.train_augmentation == "timm":
            from timm.data import create_transform

            return create_transform(**cfg, is_training=True)
        from timm.data.transforms import str_to_interp_mode
        from torchvision import transforms as T

        _, h, w = cfg["input_size"]
        crop_pct = float(cfg["crop_pct"])
        resize = int(h / crop_pct) if h == w else (int(h / crop_pct), int(w / crop_pct))
        return T.Compose([
            T.Resize(resize, interpolation=str_to_interp_mode(cfg["interpolation"])),
            T.RandomCrop((h, w)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=cfg["mean"], std=cfg["std"]),
        ])

    # ----------------------------------------------------------------- loaders
    def _loader(self, ds: Dataset, transform, batch_size: int, name: str, sampler=None,
                drop_last: bool = False, with_index: bool = False) -> DataLoader:
        """A loader of ``ds`` (``name``: role and split, e.g. ``"source val"``), images or cached features."""
        data: Dataset = TransformedDataset(ds, transform, self.image_mode)
        workers = self.num_workers
        if self.feature_cache is not None:
            role = name.split()[0]
            domain = {"source": self.source, "target": self.target, "predict": self.predict_domain}[role]
            identity = f"{domain!r} {name}"
            data = self.feature_cache.dataset(data, identity, self.eval_batch_size, self.num_workers)  # type: ignore[arg-type]
            workers = 0
        elif self._keeps_tensors(ds, name):
            key = f"{name} {transform!r}"
            if key not in self._preloaded:
                self._preloaded[key] = MemoizedDataset(data)
            data, workers = self._preloaded[key], 0
        if with_index:
            data = WithIndex(data)
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def _keeps_tensors(self, ds: Dataset, name: str) -> bool:
        """Whether the split ``name`` keeps its transformed tensors (see ``preload_in_memory``)."""
        if not self.preload_in_memory or not held_in_memory(ds):
            return False
        if name.endswith("train") and self.train_augmentation != "none":
            return False
        if name == "target train" and self.target_views > 1:  # random strong views
            return False
        return len(ds) * math.prod(self._resolved_config()["input_size"]) * 4 <= PRELOAD_MAX_BYTES  # type: ignore[arg-type]

    def num_train_batches(self) -> int:
        """Training batches per epoch (``iters_per_epoch`` or its default)."""
        if self.iters_per_epoch is not None:
            return int(self.iters_per_epoch)
        self._ensure_setup()
        target = math.ceil(len(self.target_train) / self.target_batch_size)  # type: ignore[arg-type]
        if not self.train_source:
            return target
        return max(math.ceil(len(self.source_train) / self.batch_size), target)  # type: ignore[arg-type]

    def train_dataloader(self) -> CombinedLoader:
        self._ensure_setup()
        iters = self.num_train_batches()
        transform = self.train_transform()
        start_epoch = self.trainer.current_epoch if self.trainer is not None else 0
        skip = self._batches_done_in_epoch(iters)
        seed = run_seed()  # set by seed_everything: identical on every DDP rank
        loaders = {}
        for i, (role, ds, bs) in enumerate((("source", self.source_train, self.batch_size),
                                            ("target", self.target_train, self.target_batch_size))):
            if role == "source" and not self.train_source:
                continue  # a source-free strategy: no source loader at all
            views = self.target_views if role == "target" else 1
            common = dict(seed=mix(seed, i), start_epoch=start_epoch, skip=skip * bs,
                          item_seeds=self.train_augmentation != "none" or views > 1)
            if role == "source" and self.source_sampler == "balanced":
                sampler = ClassBalancedSampler(_labels_of(ds), iters * bs, **common)  # type: ignore[arg-type]
            else:
                sampler = EpochRandomSampler(len(ds), iters * bs, **common)  # type: ignore[arg-type]
            view_transform = transform
            if views > 1:
                from tlframe.data.views import TwoViews

                view_transform = TwoViews(transform, self.strong_transform())
            loaders[role] = self._loader(ds, view_transform, bs, f"{role} train", sampler=sampler, drop_last=True,  # type: ignore[arg-type]
                                         with_index=role == "target" and self.target_indices)
        return CombinedLoader(loaders, mode="min_size")

    def _batches_done_in_epoch(self, iters: int) -> int:
        """Batches of the current epoch already trained when the run was resumed mid-epoch (else 0).

        The training loaders then leave them out, so the resumed epoch sees exactly the
        batches an uninterrupted run would. Single process only: under DDP the interrupted
        epoch's order restarts from its beginning (Lightning's distributed sampler wrapper
        re-lists the sampler, so a shortened first pass would shorten the epoch).
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size > 1:
            return 0
        loop = trainer.fit_loop.epoch_loop
        done = loop.batch_progress.current.processed
        return done if loop.restarting and 0 < done < iters else 0

    def val_dataloader(self) -> list[DataLoader]:
        self._ensure_setup()
        transform = self.eval_transform()
        target_split = "test" if self.target_val is self.target_test else "val"  # loader names key the caches
        split = {"source": ("val", self.source_val), "target": (target_split, self.target_val)}
        return [self._loader(split[n][1], transform, self.eval_batch_size, f"{n} {split[n][0]}")  # type: ignore[arg-type]
                for n in self.val_domains]

    def test_dataloader(self) -> list[DataLoader]:
        self._ensure_setup()
        transform = self.eval_transform()
        split = {"source": self.source_test, "target": self.target_test}
        return [self._loader(split[n], transform, self.eval_batch_size, f"{n} test")  # type: ignore[arg-type]
                for n in self.test_domains]

    def predict_dataloader(self) -> DataLoader:
        self._ensure_setup()
        name = "target test" if self.predict_domain is None else f"predict {self.predict_split}"
        return self._loader(self.predict_data, self.eval_transform(), self.eval_batch_size, name)  # type: ignore[arg-type]


def _unwrap(ds: Dataset) -> tuple[Dataset, Optional[np.ndarray]]:
    """The dataset under ``ds``'s ``Subset`` wrappers and the indices into it of ``ds``'s items (None: all, in order)."""
    indices = None
    while isinstance(ds, Subset):
        idx = np.asarray(ds.indices, dtype=np.int64)
        indices = idx if indices is None else idx[indices]
        ds = ds.dataset
    return ds, indices


def _labels_of(ds: Dataset) -> np.ndarray:
    """Labels of a raw dataset, as its items carry them: through ``Subset`` wrappers to the ``labels`` array of
    the dataset below when it has one (no image decoding; ``-1`` everywhere when that dataset is unlabelled),
    else read item by item."""
    base, indices = _unwrap(ds)
    if getattr(base, "labels", None) is None:
        return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)  # type: ignore[arg-type]
    if not getattr(base, "labelled", True):
        return np.full(len(ds), NO_LABEL, dtype=np.int64)  # type: ignore[arg-type]
    return _true_labels_of(ds)


def _true_labels_of(ds: Dataset) -> np.ndarray:
    """The true labels of a raw dataset, also when its domain is unlabelled (the raw ``labels`` array keeps them):
    only to *build* a simulated split (``target_class_fractions``); ``-1`` where no label exists."""
    base, indices = _unwrap(ds)
    labels = getattr(base, "labels", None)
    if labels is None:
        return _labels_of(ds)
    labels = np.asarray(labels, dtype=np.int64)
    return labels if indices is None else labels[indices]


def _per_channel(values, channels: int) -> tuple[float, ...]:
    """Fit a mean/std tuple to the channel count (repeat a single value, average for grey)."""
    values = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else (values,)))
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise DataError(f"data config has {len(values)} mean/std values for {channels} channels: fix the config.")
