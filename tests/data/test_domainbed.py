"""RotatedMNIST built from ../shared/data MNIST exactly as DomainBed defines it (shuffle, slicing, rotation,
in/out split), and trainable as a source/target pair."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import rotate

from conftest import make_trainer
from tlframe.data import DataError, MNISTDomain, RotatedMNISTDomain, TransferDataModule
from tlframe.data.domainbed import ROTATED_MNIST_ANGLES, domainbed_split, seed_hash
from tlframe.module import TransferModule


def test_seed_hash_and_split_are_domainbeds():
    assert seed_hash(0, 3) == int(hashlib.md5(b"(0, 3)").hexdigest(), 16) % 2**31
    out, in_ = domainbed_split(10, 0.2, seed=7)
    keys = list(range(10))
    np.random.RandomState(7).shuffle(keys)
    assert out == keys[:2] and in_ == keys[2:]


def test_rotated_mnist_domains_follow_domainbed(shared_data):
    mnist = MNISTDomain(root=str(shared_data))
    originals = np.concatenate([mnist.dataset("train").images, mnist.dataset("test").images])
    labels = np.concatenate([mnist.dataset("train").labels, mnist.dataset("test").labels])
    order = torch.randperm(70000, generator=torch.Generator().manual_seed(0)).numpy()
    seen = []
    for i, angle in enumerate(ROTATED_MNIST_ANGLES):
        domain = RotatedMNISTDomain(angle, root=str(shared_data))
        images, y, index = domain.environment()
        assert np.array_equal(index, order[i::6]) and np.array_equal(y, labels[index])  # images[i::6] of the shuffle
        assert len(images) == (11667 if i < 4 else 11666)
        for k in (0, 123):  # each image is its MNIST digit rotated by the angle, bilinear, fill 0
            expected = np.asarray(rotate(Image.fromarray(originals[index[k]]), angle,
                                         interpolation=InterpolationMode.BILINEAR, fill=(0,)))
            assert np.array_equal(images[k], expected)
        if angle == 0:
            assert np.array_equal(images, originals[index])
        seen.append(set(index.tolist()))
        out_keys, in_keys = domain.split_keys()
        assert (out_keys, in_keys) == domainbed_split(len(y), 0.2, seed_hash(0, i))
        assert len(domain.dataset("train")) == len(in_keys) and len(domain.dataset("test")) == len(out_keys)
        assert domain.dataset("train")[0][1] == int(y[in_keys[0]])
    assert sum(len(s) for s in seen) == 70000 and len(set.union(*seen)) == 70000  # disjoint, all images used
    in_test = RotatedMNISTDomain(75, root=str(shared_data), test_split="in")
    assert len(in_test.dataset("test")) == len(in_test.dataset("train"))  # DomainBed's test-domain split
    other = RotatedMNISTDomain(15, root=str(shared_data), seed=1).environment()[2]
    assert not np.array_equal(other, RotatedMNISTDomain(15, root=str(shared_data)).environment()[2])


def test_bad_rotated_mnist_arguments_are_clear(shared_data):
    with pytest.raises(DataError, match="rotated by"):
        RotatedMNISTDomain(90, root=str(shared_data))
    with pytest.raises(DataError, match="holdout_fraction"):
        RotatedMNISTDomain(0, root=str(shared_data), holdout_fraction=1.0)


def test_rotated_mnist_pair_trains(shared_data, tmp_path):
    dm = TransferDataModule(RotatedMNISTDomain(0, root=str(shared_data)), RotatedMNISTDomain(75, root=str(shared_data),
                            labelled=False), batch_size=16, iters_per_epoch=2, target_val_samples=64)
    model = TransferModule("lenet", num_classes=10, bottleneck_dim=32)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=2)
    trainer.fit(model, dm)
    assert dm.classes == [str(i) for i in range(10)] and "val/source_acc" in trainer.callback_metrics
