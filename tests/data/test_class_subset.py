"""``class_subset`` on every domain: keep some classes, relabel them 0..k-1, keep their names."""

from __future__ import annotations

import numpy as np
import pytest

from tlframe.data import DataError, ImageFolderDomain, MNISTDomain, SyntheticDomain, TransferDataModule
from tlframe.data.domains import check_class_subset


def _labels(ds) -> np.ndarray:
    return np.asarray([ds[i][1] for i in range(len(ds))])


def test_synthetic_subset_relabels_in_the_given_order_and_keeps_names():
    full = SyntheticDomain("source", num_train=100, num_test=40, seed=0)
    sub = SyntheticDomain("source", num_train=100, num_test=40, seed=0, class_subset=[7, 2, "ring"])
    names = full.classes
    assert sub.all_classes == names and sub.classes == [names[7], names[2], "ring"]
    full_labels = full.dataset("train").labels
    for split in ("train", "test"):
        ds, fl = sub.dataset(split), full.dataset(split).labels
        keep = np.flatnonzero(np.isin(fl, [7, 2, names.index("ring")]))
        assert len(ds) == len(keep) > 0
        expected = np.array([{7: 0, 2: 1, names.index("ring"): 2}[y] for y in fl[keep]])
        assert (_labels(ds) == expected).all()
        assert np.array_equal(np.asarray(ds[0][0]), np.asarray(full.dataset(split)[int(keep[0])][0]))
    assert len(full_labels) == 100


def test_unlabelled_subset_keeps_the_same_images_and_hides_labels():
    sub = SyntheticDomain("target", num_train=60, num_test=20, seed=1, class_subset=[0, 1])
    hidden = SyntheticDomain("target", num_train=60, num_test=20, seed=1, class_subset=[0, 1], labelled=False)
    assert len(hidden.dataset("train")) == len(sub.dataset("train"))
    assert set(_labels(hidden.dataset("train"))) == {-1}


def test_image_folder_subset_by_name(make_folder):
    root = make_folder("f", {"ant": 2, "bee": 3, "cat": 1})
    dom = ImageFolderDomain(str(root), class_subset=["cat", "ant"])
    assert dom.classes == ["cat", "ant"]
    assert sorted(_labels(dom.dataset("train")).tolist()) == [0, 1, 1]


@pytest.mark.parametrize("subset, match", [
    ([], "empty"), ("5", "list"), ([1.5], "indices"), ([True], "indices"),
])
def test_bad_subset_types(subset, match):
    with pytest.raises(DataError, match=match):
        check_class_subset(subset)


@pytest.mark.parametrize("subset, match", [([10], "out of range"), (["nope"], "no class 'nope'"), ([1, 1], "twice")])
def test_bad_subset_values_are_named_on_first_use(subset, match):
    dom = SyntheticDomain("source", num_train=20, num_test=10, class_subset=subset)
    with pytest.raises(DataError, match=match):
        _ = dom.classes


def test_data_module_with_subsets_has_k_classes():
    dm = TransferDataModule(source=SyntheticDomain("source", num_train=80, num_test=20, class_subset=[5, 6, 7]),
                            target=SyntheticDomain("target", num_train=80, num_test=20, seed=1, class_subset=[5, 6, 7]),
                            batch_size=4, iters_per_epoch=2)
    assert dm.num_classes == 3 and dm.classes == SyntheticDomain("source").classes[5:8]
    dm.setup("fit")
    assert set(_labels(dm.source_train).tolist()) == {0, 1, 2} == set(_labels(dm.target_test).tolist())


def test_mnist_digits_5_to_9(shared_data):
    dom = MNISTDomain(str(shared_data), class_subset=[5, 6, 7, 8, 9])
    assert dom.classes == ["5", "6", "7", "8", "9"]
    test = dom.dataset("test")
    full = MNISTDomain(str(shared_data)).dataset("test").labels
    assert len(test) == int((full >= 5).sum()) and sorted(set(test.labels.tolist())) == [0, 1, 2, 3, 4]
    assert np.array_equal(test.labels, full[full >= 5] - 5)
