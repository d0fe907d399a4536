"""TransferDataModule(source_samples_per_class=k): a per-class label budget on the source train split."""

from __future__ import annotations

import numpy as np
import pytest

from tlframe.data import DataError, SyntheticDomain, TransferDataModule, USPSDomain
from tlframe.data.datasets import ArrayImageDataset
from tlframe.data.domains import Domain


class _Counted(Domain):
    """A 3-class domain with the given number of train images per class (labels in index order)."""

    def __init__(self, counts: list[int]) -> None:
        super().__init__(labelled=True)
        self.counts = counts

    @property
    def all_classes(self) -> list[str]:
        return ["zero", "one", "two"]

    def _build(self, split):
        counts = self.counts if split == "train" else [2, 2, 2]
        labels = np.repeat(np.arange(3), counts)
        images = np.zeros((len(labels), 8, 8), dtype=np.uint8)
        return ArrayImageDataset(images, labels)


def _source_labels(dm: TransferDataModule, part: str = "train") -> np.ndarray:
    subset = dm.source_train if part == "train" else dm.source_val
    return dm.source.dataset("train").labels[subset.indices]  # type: ignore[union-attr]


def _dm(k, seed=0, val_fraction=0.0, counts=(50, 20, 35), batch_size=2):
    return TransferDataModule(_Counted(list(counts)), _Counted([5, 5, 5]), batch_size=batch_size,
                              val_fraction=val_fraction, split_seed=seed, source_samples_per_class=k)


def test_exact_counts_per_class():
    dm = _dm(7)
    dm.setup("fit")
    assert np.bincount(_source_labels(dm), minlength=3).tolist() == [7, 7, 7]
    assert len(dm.source_val) == 0 and dm.val_domains == ["target"]
    # the test split and the target are untouched
    assert len(dm.source_test) == 6 and len(dm.target_train) == 15
    # k equal to the smallest class takes that whole class
    dm = _dm(20)
    dm.setup("fit")
    labels = _source_labels(dm)
    assert np.bincount(labels, minlength=3).tolist() == [20, 20, 20]
    assert sorted(i for i, y in zip(dm.source_train.indices, labels) if y == 1) == list(range(50, 70))


def test_subset_is_taken_before_the_val_split():
    dm = _dm(10, val_fraction=0.2)
    dm.setup("fit")
    train, val = set(dm.source_train.indices), set(dm.source_val.indices)
    assert len(train) == 24 and len(val) == 6 and not train & val
    both = np.concatenate([_source_labels(dm, "train"), _source_labels(dm, "val")])
    assert np.bincount(both, minlength=3).tolist() == [10, 10, 10]


def test_deterministic_per_seed():
    def chosen(seed):
        dm = _dm(5, seed=seed, val_fraction=0.2)
        dm.setup("fit")
        return list(dm.source_train.indices), list(dm.source_val.indices)

    assert chosen(0) == chosen(0)
    assert chosen(3) == chosen(3)
    assert chosen(0) != chosen(1)
    # the indices point into the full source split (not into an intermediate subset)
    assert max(max(chosen(0)[0]), max(chosen(0)[1])) < 105


def test_none_keeps_every_image():
    dm = _dm(None)
    dm.setup("fit")
    assert len(dm.source_train) == 105
    # same split as before the option existed: val_fraction only
    plain = TransferDataModule(SyntheticDomain("source", num_train=100, num_test=10),
                               SyntheticDomain("target", num_train=100, num_test=10), batch_size=4)
    plain.setup("fit")
    assert len(plain.source_train) == 90 and len(plain.source_val) == 10


def test_too_few_images_names_the_class_and_counts():
    dm = _dm(30)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "source_samples_per_class=30" in msg and "class 'one' has 20" in msg
    assert "'zero'" not in msg.split("(per-class counts")[0] and "'two'" not in msg.split("(per-class counts")[0]
    assert "per-class counts: [50, 20, 35]" in msg and "at most 20" in msg
    with pytest.raises(DataError, match=r"class 'one' has 20, class 'two' has 35"):
        _dm(40).setup("fit")
    with pytest.raises(DataError, match="source_samples_per_class=0 must be a positive integer"):
        _dm(0)


def test_batch_size_is_checked_against_the_reduced_set():
    with pytest.raises(DataError, match=r"source batch size 8 is larger than the source train set \(6 images"):
        _dm(2, batch_size=8).setup("fit")


def test_usps_ten_per_class(shared_data):
    dm = TransferDataModule(USPSDomain(root=str(shared_data)), USPSDomain(root=str(shared_data)), batch_size=64,
                            val_fraction=0.0, source_samples_per_class=10, split_seed=2)
    dm.setup("fit")
    assert np.bincount(_source_labels(dm), minlength=10).tolist() == [10] * 10
    assert len(dm.target_test) == 2007
    with pytest.raises(DataError, match=r"class '8' has 542"):
        TransferDataModule(USPSDomain(root=str(shared_data)), USPSDomain(root=str(shared_data)),
                           source_samples_per_class=600).setup("fit")
