"""Several domains at once: multi-source domain adaptation and domain generalisation (DomainBed's protocol).

:class:`MultiDomainDataModule` turns the one source and one target of :class:`TransferDataModule` into lists:

- ``sources``: labelled training domains; ``targets``: unlabelled training domains (multi-source DA), each also
  evaluated. Zero targets and a ``test_domain`` is domain generalisation: the test domain is never seen in
  training.
- the leave-one-domain-out form: ``domains`` lists every domain of a data set and ``test_domain`` (its index or
  name) picks the held-out one; the others are the sources. ``adapt_to_test_domain: true`` trains on the held-out
  domain's unlabelled train split too (multi-source DA from the same YAML). A sweep over ``data.test_domain``
  runs every held-out domain.

Training batches are ``{"sources": [(x, y), ...], "targets": [(x, y), ...]}``, one batch per domain in list
order (each domain its own sampler, seeded per domain, so every domain contributes the same number of rows and
DDP shards each domain separately); :class:`~tlframe.module.TransferModule` concatenates them and gives the
strategy each row's domain index (``TransferStep.d_s`` / ``d_t``).

Evaluation loaders (names in :attr:`val_domains`, :attr:`test_domains`):

- ``source_<name>``: each source's validation split. ``val_split: holdout`` (default): ``val_fraction`` of the
  source's ``"train"`` split, held out with a seed derived from ``split_seed`` and the domain's position;
  ``val_split: domain_test``: the domain's own ``"test"`` split (with :class:`~tlframe.data.RotatedMNISTDomain`
  that is DomainBed's ``out`` split, so training uses its ``in`` split: DomainBed's protocol). The module logs
  ``val/source_<name>_acc`` and ``val/source_acc``, their **mean over the training domains** (DomainBed's
  training-domain validation accuracy).
- ``target``: the held-out test domain (or the one target); with several targets ``target_<name>`` each. With
  ``val_split: domain_test`` the held-out domain is scored on its ``"train"`` split (DomainBed reports the test
  domain's ``in`` split) and, as ``target_out``, on its ``"test"`` split (the ``out`` split: the signal of
  DomainBed's test-domain oracle selection, :mod:`tlframe.model_selection`).
- ``validation_domain``: a second held-out domain (``validation_domain``), never trained on, scored on its
  ``"train"`` split (``in``): leave-one-domain-out model selection.

A single source and a single target give exactly the batches of :class:`TransferDataModule` (same seeds, same
validation split).
"""

from __future__ import annotations

import math
import re
from typing import Literal, Optional, Union

import torch
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Subset

from tlframe.data.datamodule import TransferDataModule
from tlframe.data.domains import Domain
from tlframe.data.errors import DataError
from tlframe.data.samplers import EpochRandomSampler
from tlframe.seeding import mix, run_seed

__all__ = ["MultiDomainDataModule", "domain_tag"]


def domain_tag(name: str) -> str:
    """A domain name as a metric-tag part: lower case, runs of other characters than letters and digits as ``_``."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", str(name)).strip("_").lower() or "domain"


def _seed_offset(role: str, i: int) -> int:
    """The sampler-seed offset of a training domain: source 0 and target 0 as the two-domain module's."""
    if role == "source":
        return 0 if i == 0 else 100 + i
    return 1 if i == 0 else 200 + i


class MultiDomainDataModule(TransferDataModule):
    """Several labelled source domains and zero or more unlabelled targets (see the module docstring).

    Args:
        sources: labelled training domains (or use ``domains`` + ``test_domain``).
        targets: unlabelled training domains (multi-source DA), each evaluated on its ``"test"`` split.
        domains: every domain of a data set, for the leave-one-domain-out form (with ``test_domain``).
        test_domain: the held-out domain of ``domains``: its index or its ``name`` (only with ``domains``).
        validation_domain: a second held-out domain of ``domains`` (index or name): never trained on, scored as
            ``val/validation_domain_acc`` (leave-one-domain-out selection).
        adapt_to_test_domain: with ``domains``: also train on the held-out domain's unlabelled ``"train"`` split
            (multi-source DA); default False (domain generalisation).
        val_split: ``"holdout"`` (``val_fraction`` of each source's train split) or ``"domain_test"`` (each
            source's own test split: DomainBed's ``out`` split with RotatedMNIST).
        batch_size: images per source domain per step (DomainBed: 64 per domain); with ``split_batch``, the
            total over the sources, split evenly.
        target_batch_size: images per target domain per step; default ``batch_size`` (or the per-source share).
        split_batch: ``batch_size`` is the total of all sources (must be divisible by their number).
        Other arguments: as :class:`TransferDataModule`.
    """

    def __init__(
        self,
        sources: Optional[list[Domain]] = None,
        targets: Optional[list[Domain]] = None,
        domains: Optional[list[Domain]] = None,
        test_domain: Optional[Union[int, str]] = None,
        validation_domain: Optional[Union[int, str]] = None,
        adapt_to_test_domain: bool = False,
        val_split: Literal["holdout", "domain_test"] = "holdout",
        batch_size: int = 32,
        target_batch_size: Optional[int] = None,
        split_batch: bool = False,
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
        preload_in_memory: bool = True,
        target_val_samples: Optional[int] = None,
    ) -> None:
        if val_split not in ("holdout", "domain_test"):
            raise DataError(f"val_split={val_split!r} is unknown: use 'holdout' (val_fraction of each source's train "
                            "split) or 'domain_test' (each source's own test split, DomainBed's protocol).")
        sources, targets, heldout, validation = _resolve_roles(sources, targets, domains, test_domain,
                                                               validation_domain, adapt_to_test_domain)
        if split_batch:
            if int(batch_size) % len(sources):
                raise DataError(f"split_batch: batch_size={batch_size} does not split evenly over {len(sources)} "
                                f"sources: give a multiple of {len(sources)}.")
            batch_size = int(batch_size) // len(sources)
        evaluated = targets + heldout
        super().__init__(source=sources[0], target=evaluated[0], batch_size=batch_size,
                         target_batch_size=target_batch_size, iters_per_epoch=iters_per_epoch,
                         val_fraction=val_fraction, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers,
                         prefetch_factor=prefetch_factor, train_augmentation=train_augmentation,
                         image_size=image_size, split_seed=split_seed, preload_in_memory=preload_in_memory,
                         target_val_samples=target_val_samples)
        if val_split == "domain_test" and len(evaluated) > 1:
            raise DataError("val_split: domain_test scores one held-out domain (its in and out splits): give one "
                            f"test domain or target, not {len(evaluated)}.")
        self.sources, self.targets, self.heldout = sources, targets, heldout
        self.validation = validation
        self.val_split = val_split
        self.train_targets = bool(targets)
        self.source_names = _unique_tags(sources)
        self.target_names = _unique_tags(evaluated)
        self.sources_train: list[Dataset] = []
        self.sources_val: list[Dataset] = []
        self.targets_train: list[Dataset] = []
        self.eval_splits: dict[str, Dataset] = {}

    # ----------------------------------------------------------------- description
    @property
    def num_source_domains(self) -> int:
        return len(self.sources)

    @property
    def num_target_domains(self) -> int:
        return len(self.targets)

    @property
    def source_val_domains(self) -> list[str]:
        """The loader names of the sources' validation splits (empty with ``val_fraction: 0`` in holdout mode)."""
        if self.val_split == "holdout" and self.val_fraction == 0:
            return []
        return [f"source_{n}" for n in self.source_names]

    @property
    def _target_loader_names(self) -> list[str]:
        if len(self.target_names) == 1:
            return ["target"] + (["target_out"] if self.val_split == "domain_test" else [])
        return [f"target_{n}" for n in self.target_names]

    @property
    def val_domains(self) -> list[str]:
        return [*self.source_val_domains, *self._target_loader_names,
                *(["validation_domain"] if self.validation is not None else [])]

    @property
    def test_domains(self) -> list[str]:
        return list(self._target_loader_names)

    # ----------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        for domain in [*self.sources, *self.targets, *self.heldout, *([self.validation] if self.validation else [])]:
            domain.prepare()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.sources_train:
            return
        everything = [*self.sources, *self.targets, *self.heldout, *([self.validation] if self.validation else [])]
        for domain in self.sources:
            if not domain.has_labels:
                raise DataError(f"source domain {domain.name} is unlabelled: every source must be labelled (set "
                                "labelled: true on it, or list it under data.targets).")
        reference = self.sources[0]
        for domain in everything[1:]:
            if domain.classes != reference.classes:
                raise DataError(f"domain {domain.name} has classes {domain.classes} but source domain "
                                f"{reference.name} has {reference.classes}: every domain needs the same class "
                                "folders (or class lists), same names in the same order.")
        for i, (domain, name) in enumerate(zip(self.sources, self.source_names)):
            train, val = self._source_splits(domain, i)
            self.sources_train.append(train)
            self.sources_val.append(val)
            if val is not None:
                self.eval_splits[f"source_{name}"] = val
        for domain in self.targets:
            self.targets_train.append(self._nonempty(domain.dataset("train"), f"target {domain.name} train"))
        evaluated = [*self.targets, *self.heldout]
        names = self._target_loader_names
        if self.val_split == "domain_test":
            domain = evaluated[0]
            self.eval_splits["target"] = self._nonempty(domain.dataset("train"), f"test domain {domain.name} train (in)")
            self.eval_splits["target_out"] = self._nonempty(domain.dataset("test"),
                                                            f"test domain {domain.name} test (out)")
        else:
            for name, domain in zip(names, evaluated):
                self.eval_splits[name] = self._nonempty(domain.dataset("test"), f"domain {domain.name} test")
        if self.validation is not None:
            self.eval_splits["validation_domain"] = self._nonempty(self.validation.dataset("train"),
                                                                   f"validation domain {self.validation.name} train")
        for role, datasets, bs in (("source", self.sources_train, self.batch_size),
                                   ("target", self.targets_train, self.target_batch_size)):
            for domain, ds in zip(self.sources if role == "source" else self.targets, datasets):
                if bs > len(ds):  # type: ignore[arg-type]
                    raise DataError(f"{role} batch size {bs} is larger than the train split of {role} domain "
                                    f"{domain.name} ({len(ds)} images): lower data.batch_size"  # type: ignore[arg-type]
                                    f"{'' if role == 'source' else ' / target_batch_size'} to at most {len(ds)}.")  # type: ignore[arg-type]
        # the two-domain attributes, for what reads them (class counts, sample names, predict)
        self.source_train, self.source_val = self.sources_train[0], self.sources_val[0]
        self.source_test = self.sources[0].dataset("test")
        self.target_train = self.targets_train[0] if self.targets_train else self.eval_splits[names[0]]
        self.target_test = self.target_val = self.eval_splits[names[0]]
        self.predict_data = self.target_test

    @staticmethod
    def _nonempty(ds: Dataset, what: str) -> Dataset:
        if len(ds) == 0:  # type: ignore[arg-type]
            raise DataError(f"the {what} split is empty: give that domain some images.")
        return ds

    def _source_splits(self, domain: Domain, i: int) -> tuple[Dataset, Optional[Dataset]]:
        """``(train, validation)`` of source ``i``: the two-domain module's split for source 0 (same seed)."""
        full = self._nonempty(domain.dataset("train"), f"source {domain.name} train")
        if self.val_split == "domain_test":
            return full, self._nonempty(domain.dataset("test"), f"source {domain.name} test")
        n = len(full)  # type: ignore[arg-type]
        if self.val_fraction == 0:
            return full, None
        n_val = min(max(1, round(n * self.val_fraction)), n - 1)
        if n_val == 0 or n < 2:
            raise DataError(f"the source {domain.name} train split has only {n} image(s), too few to hold out a "
                            "validation part: set val_fraction=0 or give that domain more images.")
        seed = self.split_seed if i == 0 else mix(self.split_seed, 100 + i)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return Subset(full, sorted(perm[n_val:])), Subset(full, sorted(perm[:n_val]))

    def set_training_domains(self, source: bool = True, target_indices: bool = False) -> None:
        if not source or target_indices:
            raise DataError("MultiDomainDataModule trains on its labelled sources: source-free strategies (SHOT) and "
                            "strategies that need target indices take the two-domain TransferDataModule.")

    def set_target_views(self, views: int) -> None:
        if views > 1:
            raise DataError("MultiDomainDataModule serves one view per target image: FixMatch / Mean Teacher take "
                            "the two-domain TransferDataModule.")

    def use_feature_cache(self, cache) -> None:
        if cache is not None:
            raise DataError("MultiDomainDataModule has no feature cache: use FrozenFeatures(cache_features: none).")

    def check_label_shift_data(self) -> None:
        raise DataError("label_shift: bbse estimates one target's class proportions from one source: use the "
                        "two-domain TransferDataModule.")

    # ----------------------------------------------------------------- loaders
    def num_train_batches(self) -> int:
        if self.iters_per_epoch is not None:
            return int(self.iters_per_epoch)
        self._ensure_setup()
        counts = [math.ceil(len(ds) / self.batch_size) for ds in self.sources_train]  # type: ignore[arg-type]
        counts += [math.ceil(len(ds) / self.target_batch_size) for ds in self.targets_train]  # type: ignore[arg-type]
        return max(counts)

    def train_dataloader(self) -> CombinedLoader:
        self._ensure_setup()
        iters = self.num_train_batches()
        transform = self.train_transform()
        start_epoch = self.trainer.current_epoch if self.trainer is not None else 0
        skip = self._batches_done_in_epoch(iters)
        seed = run_seed()
        loaders: dict[str, list[DataLoader]] = {"sources": [], "targets": []}
        for role, datasets, bs in (("source", self.sources_train, self.batch_size),
                                   ("target", self.targets_train, self.target_batch_size)):
            for i, ds in enumerate(datasets):
                sampler = EpochRandomSampler(len(ds), iters * bs, seed=mix(seed, _seed_offset(role, i)),  # type: ignore[arg-type]
                                             start_epoch=start_epoch, skip=skip * bs,
                                             item_seeds=self.train_augmentation != "none")
                loaders[f"{role}s"].append(self._loader(ds, transform, bs, f"{role}{i} train", sampler=sampler,
                                                        drop_last=True))
        if not loaders["targets"]:
            del loaders["targets"]
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self) -> list[DataLoader]:
        self._ensure_setup()
        transform = self.eval_transform()
        return [self._loader(self.eval_splits[n], transform, self.eval_batch_size, f"{n} val") for n in self.val_domains]

    def test_dataloader(self) -> list[DataLoader]:
        self._ensure_setup()
        transform = self.eval_transform()
        return [self._loader(self.eval_splits[n], transform, self.eval_batch_size, f"{n} test")
                for n in self.test_domains]


def _pick(domains: list[Domain], key: Union[int, str], what: str) -> int:
    """The position in ``domains`` of ``key`` (an index or a domain name)."""
    names = [d.name for d in domains]
    if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
        index = int(key)
        if not 0 <= index < len(domains):
            raise DataError(f"{what}={key} is out of range: data.domains has {len(domains)} domains ({names}); give "
                            f"an index 0..{len(domains) - 1} or a name.")
        return index
    if key not in names:
        raise DataError(f"{what}={key!r} is not a domain of data.domains ({names}): give one of those names or an "
                        "index.")
    return names.index(key)


def _resolve_roles(sources, targets, domains, test_domain, validation_domain, adapt_to_test_domain):
    """``(sources, targets, held-out test domains, validation domain)`` from either form of the arguments."""
    if domains is not None:
        if sources is not None or targets is not None:
            raise DataError("give either data.domains with data.test_domain (leave one domain out) or data.sources / "
                            "data.targets, not both.")
        if test_domain is None:
            raise DataError("data.domains needs data.test_domain: the index or name of the held-out domain (a sweep "
                            "over data.test_domain runs every held-out domain).")
        domains = list(domains)
        t = _pick(domains, test_domain, "test_domain")
        held = {t}
        validation = None
        if validation_domain is not None:
            v = _pick(domains, validation_domain, "validation_domain")
            if v == t:
                raise DataError(f"validation_domain and test_domain are both {domains[t].name}: hold out two "
                                "different domains.")
            held.add(v)
            validation = domains[v]
        sources = [d for i, d in enumerate(domains) if i not in held]
        if not sources:
            raise DataError("data.domains leaves no training domain after holding out the test (and validation) "
                            "domain: list more domains.")
        test = domains[t]
        return (sources, [test], [], validation) if adapt_to_test_domain else (sources, [], [test], validation)
    if test_domain is not None or validation_domain is not None or adapt_to_test_domain:
        raise DataError("data.test_domain / validation_domain / adapt_to_test_domain pick from data.domains: give "
                        "data.domains (every domain of the data set), or list data.sources and data.targets.")
    if not sources:
        raise DataError("data.sources is empty: list at least one labelled source domain.")
    targets = list(targets or [])
    if not targets:
        raise DataError("data.targets is empty and there is no held-out domain to test on: give data.targets, or "
                        "data.domains with data.test_domain for domain generalisation.")
    return list(sources), targets, [], None


def _unique_tags(domains: list[Domain]) -> list[str]:
    tags = [domain_tag(d.name) for d in domains]
    return [t if tags.count(t) == 1 else f"{t}_{i}" for i, t in enumerate(tags)]
