"""``RelabelledDomain``: a source whose labels are wrong on purpose (label noise, mismatched sources)."""

from __future__ import annotations

import numpy as np
import pytest

from tlframe.data import DataError, ImageFolderDomain, RelabelledDomain, SyntheticDomain, TransferDataModule


def _labels(ds) -> np.ndarray:
    return np.asarray([ds[i][1] for i in range(len(ds))])


def test_swapped_classes_keep_images_and_class_names():
    base = SyntheticDomain("source", num_train=100, num_test=40, seed=0)
    names = base.classes
    swapped = RelabelledDomain(SyntheticDomain("source", num_train=100, num_test=40, seed=0),
                               {0: 1, 1: 0, names[2]: names[5]})  # indices or names; 2 -> 5 merges two classes
    assert swapped.classes == names and swapped.name == "synthetic-source-relabelled"
    for split in ("train", "test"):
        old, new = _labels(base.dataset(split)), _labels(swapped.dataset(split))
        expected = np.array([{0: 1, 1: 0, 2: 5}.get(int(y), int(y)) for y in old])
        assert (new == expected).all() and (old != new).any()
        assert np.array_equal(np.asarray(swapped.dataset(split)[3][0]), np.asarray(base.dataset(split)[3][0]))


def test_yaml_string_keys_and_unlabelled_domains():
    swapped = RelabelledDomain(SyntheticDomain("target", num_train=50, num_test=20, seed=1, labelled=False), {"3": "4"})
    assert swapped.mapping()[3] == 4
    assert set(_labels(swapped.dataset("train"))) == {-1}  # an unlabelled base stays unlabelled


def test_file_domains_are_relabelled_too(make_folder):
    root = make_folder("f", {"ant": 2, "bee": 3})
    swapped = RelabelledDomain(ImageFolderDomain(str(root)), {"ant": "bee", "bee": "ant"})
    assert sorted(_labels(swapped.dataset("train")).tolist()) == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("relabel, message", [
    ({12: 0}, "12 is not a class of synthetic-source"),
    ({0: "zebra"}, "'zebra' is not a class"),
    ({}, "relabel must be a non-empty mapping"),
])
def test_bad_maps_name_the_problem(relabel, message):
    domain = RelabelledDomain(SyntheticDomain("source", num_train=20, num_test=10), relabel) if relabel else None
    with pytest.raises(DataError, match=message):
        if domain is None:
            RelabelledDomain(SyntheticDomain("source", num_train=20, num_test=10), relabel)
        else:
            domain.dataset("train")


def test_a_relabelled_source_pairs_with_a_target_of_the_same_classes():
    dm = TransferDataModule(RelabelledDomain(SyntheticDomain("source", num_train=100, num_test=20), {0: 1, 1: 0}),
                            SyntheticDomain("target", num_train=100, num_test=20, seed=1), batch_size=8)
    dm.setup("fit")
    assert dm.num_classes == 10
