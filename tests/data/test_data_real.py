"""Domains on the real data sets in ../shared/data (skipped when that folder is absent)."""

from __future__ import annotations

import bz2
import os
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tlframe.data import (
    DataError, ImageFolderDomain, MNISTDomain, MNISTMDomain, TransferDataModule, USPSDomain,
)
from tlframe.data.datasets import TransformedDataset

OFFICE_CLASSES = ["backpack", "bike", "calculator", "headphones", "keyboard", "laptop",
                  "monitor", "mouse", "mug", "projector"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: to prove nothing was written there."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def counts(labels) -> list[int]:
    return np.bincount(np.asarray(labels), minlength=10).tolist()


def test_mnist(shared_data):
    before = snapshot(shared_data / "MNIST")
    dom = MNISTDomain(root=str(shared_data))
    train, test = dom.dataset("train"), dom.dataset("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert dom.classes == [str(i) for i in range(10)] and dom.name == "mnist"
    assert counts(train.labels) == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert counts(test.labels) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    img, label = train[0]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
    assert label == 5  # the famous first MNIST digit
    assert np.asarray(img).max() == 255
    assert snapshot(shared_data / "MNIST") == before  # read-only root: nothing processed/ written
    assert not (shared_data / "MNIST" / "processed").exists()


def test_mnist_unlabelled_hides_labels(shared_data):
    dom = MNISTDomain(root=str(shared_data), labelled=False)
    assert not dom.has_labels
    assert {dom.dataset("test")[i][1] for i in range(50)} == {-1}


def test_mnist_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"MNIST.*missing.*download=True"):
        MNISTDomain(root=str(tmp_path))


def test_usps_h5(shared_data):
    dom = USPSDomain(root=str(shared_data))
    train, test = dom.dataset("train"), dom.dataset("test")
    assert (len(train), len(test)) == (7291, 2007)
    assert counts(train.labels) == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    assert counts(test.labels) == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
    with h5py.File(shared_data / "usps" / "usps.h5", "r") as f:
        raw = np.asarray(f["train/data"][:5])
        target = np.asarray(f["train/target"][:5])
    for i in range(5):
        img, label = train[i]
        assert img.mode == "L" and img.size == (16, 16)
        assert label == target[i]
        np.testing.assert_array_equal(np.asarray(img), np.round(raw[i] * 255).reshape(16, 16))
    assert train.images.min() == 0 and train.images.max() == 255


def test_usps_bz2_fallback(shared_data, tmp_path):
    """Without usps/usps.h5 the torchvision LIBSVM bz2 files are read."""
    with h5py.File(shared_data / "usps" / "usps.h5", "r") as f:
        rows = {s: (np.asarray(f[f"{s}/data"][:7]), np.asarray(f[f"{s}/target"][:7])) for s in ("train", "test")}
    for split, name in (("train", "usps.bz2"), ("test", "usps.t.bz2")):
        data, target = rows[split]
        lines = [f"{y + 1} " + " ".join(f"{j + 1}:{2 * v - 1:.6f}" for j, v in enumerate(x))
                 for x, y in zip(data, target)]
        with bz2.open(tmp_path / name, "wt") as fp:
            fp.write("\n".join(lines) + "\n")
    dom = USPSDomain(root=str(tmp_path))
    train = dom.dataset("train")
    assert len(train) == 7 and len(dom.dataset("test")) == 7
    assert train.labels.tolist() == rows["train"][1].tolist()
    expected = np.round(rows["train"][0][0] * 255).reshape(16, 16)
    assert np.abs(np.asarray(train[0][0], dtype=int) - expected).max() <= 1


def test_usps_missing(tmp_path):
    with pytest.raises(DataError, match=r"USPS not found.*usps\.h5.*download=True"):
        USPSDomain(root=str(tmp_path))


@pytest.fixture(scope="module")
def mnist_m_cache(shared_data, tmp_path_factory):
    """Extract MNIST-M once for this module into a fresh cache folder."""
    cache = tmp_path_factory.mktemp("mnist_m_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLFRAME_CACHE_DIR", str(cache))
        before = snapshot(shared_data)
        dom = MNISTMDomain(root=str(shared_data))
        test = dom.dataset("test")
        yield cache, dom, test
        assert snapshot(shared_data) == before  # nothing written into the data root


def test_mnist_m_extracted_into_cache(mnist_m_cache):
    cache, dom, test = mnist_m_cache
    assert len(test) == 9001
    assert counts(test.labels) == [878, 1016, 933, 908, 890, 807, 856, 914, 880, 919]
    assert len(dom.dataset("train")) == 30000
    entries = os.listdir(cache)
    assert len(entries) == 1 and entries[0].startswith("mnist_m-")  # no temp folder left over
    assert dom.folder.is_relative_to(cache)
    img, label = test[0]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 7


def test_mnist_m_reuses_cache(mnist_m_cache, shared_data, monkeypatch):
    cache, dom, _ = mnist_m_cache
    monkeypatch.setenv("TLFRAME_CACHE_DIR", str(cache))

    def no_extract(*args, **kwargs):
        raise AssertionError("archive extracted twice")

    monkeypatch.setattr(tarfile, "open", no_extract)
    again = MNISTMDomain(root=str(shared_data))
    assert again.folder == dom.folder and len(again.dataset("test")) == 9001


def test_mnist_m_extracted_folder_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"MNIST-M not found.*mnist_m\.tar\.gz"):
        MNISTMDomain(root=str(tmp_path))
    # An already-extracted folder is used in place.
    for split, n in (("train", 3), ("test", 2)):
        folder = tmp_path / "mnist_m" / f"mnist_m_{split}"
        folder.mkdir(parents=True)
        lines = []
        for i in range(n):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i:08d}.png")
            lines.append(f"{i:08d}.png {i}")
        (tmp_path / "mnist_m" / f"mnist_m_{split}_labels.txt").write_text("\n".join(lines) + "\n")
    dom = MNISTMDomain(root=str(tmp_path))
    assert dom.folder == tmp_path / "mnist_m"
    assert dom.dataset("train").labels.tolist() == [0, 1, 2]
    assert not (tmp_path / "cache").exists()


def test_mnist_m_center_crop_gives_the_central_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
    for split in ("train", "test"):
        folder = tmp_path / "mnist_m" / f"mnist_m_{split}"
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "00000000.png")
        (tmp_path / "mnist_m" / f"mnist_m_{split}_labels.txt").write_text("00000000.png 3\n")
    whole, label = MNISTMDomain(root=str(tmp_path)).dataset("test")[0]
    cropped, same = MNISTMDomain(root=str(tmp_path), center_crop=28).dataset("test")[0]
    assert whole.size == (32, 32) and cropped.size == (28, 28) and label == same == 3
    assert np.array_equal(np.asarray(cropped), np.asarray(whole)[2:30, 2:30])  # 2 pixels off every side
    with pytest.raises(DataError, match="center_crop=40 must be a size in"):
        MNISTMDomain(root=str(tmp_path), center_crop=40)


def test_corrupt_archive_leaves_no_partial_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "mnist_m.tar.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    dom = MNISTMDomain(root=str(tmp_path / "root"))
    with pytest.raises(DataError, match="cannot be extracted"):
        dom.dataset("test")
    assert os.listdir(tmp_path / "cache") == []


def test_office_caltech_amazon(shared_data):
    dom = ImageFolderDomain(root=str(shared_data / "office_caltech_10" / "amazon"))
    ds = dom.dataset("train")
    assert dom.name == "amazon" and dom.classes == OFFICE_CLASSES
    assert len(ds) == 958
    assert counts(ds.labels) == [92, 82, 94, 99, 100, 100, 99, 100, 94, 98]
    assert len(dom.dataset("test")) == 958  # transductive: test = the same images
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (300, 300) and label == 0


def test_office_caltech_greyscale_images_become_rgb(shared_data):
    dom = ImageFolderDomain(root=str(shared_data / "office_caltech_10" / "caltech10"))
    ds = dom.dataset("train")
    assert len(ds) == 1123
    grey = []
    for i, (path, _) in enumerate(ds.samples):
        with Image.open(path) as img:  # header only
            if img.mode != "RGB":
                grey.append(i)
    assert len(grey) == 4
    dm = TransferDataModule(dom, dom, batch_size=4, image_size=48)
    wrapped = TransformedDataset(ds, dm.eval_transform(), dm.image_mode)
    for i in grey:
        x, _ = wrapped[i]
        assert tuple(x.shape) == (3, 48, 48)
