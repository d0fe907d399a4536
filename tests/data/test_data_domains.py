"""File-based domains, data-root resolution and error messages."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from tlframe.data import (
    DataError, Domain, ImageFolderDomain, ImageListDomain, MNISTDomain, SVHNDomain,
    SyntheticDomain, TransferDataModule, resolve_data_root,
)
from tlframe.data.datasets import TransformedDataset, convert_mode


# ----------------------------------------------------------------------------- data root
def test_resolve_data_root_precedence(tmp_path, monkeypatch):
    explicit, env, cwd = tmp_path / "explicit", tmp_path / "env", tmp_path / "cwd"
    for p in (explicit, env, cwd / "data"):
        p.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    assert resolve_data_root(None) == (cwd / "data").resolve()
    monkeypatch.setenv("TLFRAME_DATA_ROOT", str(env))
    assert resolve_data_root(None) == env.resolve()
    assert resolve_data_root(str(explicit)) == explicit.resolve()


def test_missing_data_root_message(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"data root .*nope does not exist.*TLFRAME_DATA_ROOT.*root="):
        resolve_data_root(str(missing))
    monkeypatch.chdir(tmp_path)  # no ./data here
    with pytest.raises(DataError, match=r"default \./data"):
        resolve_data_root(None)


@pytest.mark.parametrize("cls", [MNISTDomain, SVHNDomain])
def test_digit_domain_missing_root(cls, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        cls(root=str(tmp_path / "missing"))


def test_svhn_root_without_files(tmp_path):
    with pytest.raises(DataError, match=r"SVHN files .*train_32x32\.mat.*download=True"):
        SVHNDomain(root=str(tmp_path))


def test_domain_is_abstract():
    with pytest.raises(TypeError):
        Domain()  # type: ignore[abstract]
    with pytest.raises(DataError, match="split must be"):
        SyntheticDomain(num_train=10, num_test=10).dataset("val")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- image folders
def test_image_folder_domain(make_folder):
    root = make_folder("office", {"b_cls": 3, "a_cls": 2})
    (root / "a_cls" / "notes.txt").write_text("not an image")
    (root / "a_cls" / "sub").mkdir()
    Image.new("RGB", (5, 5)).save(root / "a_cls" / "sub" / "deep.JPG")  # nested, upper-case ext
    dom = ImageFolderDomain(root=str(root))
    ds = dom.dataset("train")
    assert dom.classes == ["a_cls", "b_cls"] and dom.name == "office"
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    img, label = ds[0]
    assert isinstance(img, Image.Image) and label == 0
    assert dom.dataset("test").samples == ds.samples  # transductive: same images


def test_image_folder_test_root_and_unlabelled(make_folder):
    train = make_folder("train", {"x": 2, "y": 2})
    test = make_folder("test", {"x": 1, "y": 3})
    dom = ImageFolderDomain(root=str(train), test_root=str(test), labelled=False)
    assert len(dom.dataset("test")) == 4
    assert [dom.dataset("test")[i][1] for i in range(4)] == [-1] * 4
    other = make_folder("other", {"x": 1, "z": 1})
    with pytest.raises(DataError, match=r"classes \['x', 'z'\].*\['x', 'y'\]"):
        ImageFolderDomain(root=str(train), test_root=str(other)).dataset("test")


def test_image_folder_relative_to_data_root(make_folder, tmp_path, monkeypatch):
    make_folder("amazon", {"a": 1})
    monkeypatch.setenv("TLFRAME_DATA_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert ImageFolderDomain(root="amazon").root == (tmp_path / "amazon").resolve()


def test_image_folder_errors(tmp_path, make_folder):
    with pytest.raises(DataError, match=r"image folder .*missing does not exist"):
        ImageFolderDomain(root=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"has no class folders.*<root>/<class>/<image>"):
        _ = ImageFolderDomain(root=str(empty)).classes
    root = make_folder("partial", {"good": 2})
    (root / "hollow").mkdir()
    (root / "hollow" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"folder .*hollow has no images \(accepted extensions: .*\.jpg"):
        ImageFolderDomain(root=str(root)).dataset("train")


def test_unreadable_image_names_the_file(make_folder):
    root = make_folder("broken", {"a": 2})
    bad = root / "a" / "zz_bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    dom = ImageFolderDomain(root=str(root))
    ds = dom.dataset("train")
    assert ds[0][0].size == (12, 10)
    with pytest.raises(DataError, match=r"image .*zz_bad\.jpg cannot be read"):
        ds[2]
    # ... also through a data loader
    dm = TransferDataModule(dom, dom, batch_size=1, val_fraction=0.0)
    dm.setup("fit")
    with pytest.raises(DataError, match="zz_bad.jpg"):
        for _ in dm.test_dataloader()[0]:
            pass


# ----------------------------------------------------------------------------- image lists
def test_image_list_domain(tmp_path, image_writer):
    for i in range(4):
        image_writer(tmp_path / "imgs" / f"im {i}.png", seed=i)  # a space in the path
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text(
        "# comment\nimgs/im 0.png 0\nimgs/im 1.png 2\n\nimgs/im 2.png 1\n")
    (tmp_path / "lists" / "test.txt").write_text("imgs/im 3.png 2\n")
    dom = ImageListDomain(list_file=str(tmp_path / "lists" / "train.txt"), root=str(tmp_path),
                          test_list_file=str(tmp_path / "lists" / "test.txt"))
    assert dom.classes == ["class_0", "class_1", "class_2"] and dom.name == "train"
    train = dom.dataset("train")
    assert [train[i][1] for i in range(3)] == [0, 2, 1]
    assert len(dom.dataset("test")) == 1 and dom.dataset("test")[0][1] == 2
    named = ImageListDomain(list_file=str(tmp_path / "lists" / "train.txt"), root=str(tmp_path),
                            classes=["cat", "dog", "eel"], labelled=False)
    assert named.classes == ["cat", "dog", "eel"]
    assert len(named.dataset("test")) == 3 and named.dataset("train")[1][1] == -1
    with pytest.raises(DataError, match=r"uses label 2 but only 2 class names"):
        ImageListDomain(list_file=str(tmp_path / "lists" / "train.txt"), root=str(tmp_path),
                        classes=["cat", "dog"]).dataset("train")


def test_image_list_root_defaults_to_list_folder(tmp_path, image_writer):
    image_writer(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 0\n")
    assert len(ImageListDomain(list_file=str(tmp_path / "list.txt")).dataset("train")) == 1


def test_image_list_errors(tmp_path, image_writer):
    with pytest.raises(DataError, match=r"list file .*nolist\.txt does not exist"):
        ImageListDomain(list_file=str(tmp_path / "nolist.txt"))
    image_writer(tmp_path / "a.png")
    (tmp_path / "bad.txt").write_text("a.png 0\na.png zero\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2: 'a\.png zero'"):
        ImageListDomain(list_file=str(tmp_path / "bad.txt")).dataset("train")
    (tmp_path / "missing.txt").write_text("a.png 0\nb.png 1\n")
    with pytest.raises(DataError, match=r"1 of 2 images listed in .*missing\.txt do not exist .*b\.png"):
        ImageListDomain(list_file=str(tmp_path / "missing.txt")).dataset("train")


# ----------------------------------------------------------------------------- image modes
@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16"])
@pytest.mark.parametrize("target", ["RGB", "L"])
def test_modes_converted_to_channel_count(mode, target, tmp_path, image_writer):
    ext = ".jpg" if mode == "CMYK" else ".png"
    if mode == "I;16":
        path = tmp_path / "c" / "im.png"
        path.parent.mkdir()
        Image.fromarray(np.arange(120, dtype=np.uint16).reshape(10, 12) * 500).save(path)
    else:
        path = image_writer(tmp_path / "c" / f"im{ext}", mode=mode)
    dom = ImageFolderDomain(root=str(tmp_path))
    img, _ = dom.dataset("train")[0]
    assert img.mode == mode
    converted = convert_mode(img, target)
    assert converted.mode == target and converted.size == (12, 10)
    if mode == "I;16":
        assert np.asarray(converted).max() == 255  # rescaled, not clipped
    x, _ = TransformedDataset(dom.dataset("train"), None, target)[0]
    assert len(x.getbands()) == (3 if target == "RGB" else 1)


def test_palette_with_transparency_converts_without_warning(tmp_path, recwarn):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = b"\x00\xff" + b"\xff" * 254
    assert convert_mode(img, "RGB").getpixel((0, 0)) == (255, 0, 0)
    assert not [w for w in recwarn if "Palette" in str(w.message)]


def test_datasets_pickle(make_folder):
    dom = ImageFolderDomain(root=str(make_folder("p", {"a": 2})))
    syn = SyntheticDomain(num_train=20, num_test=10)
    for ds in (dom.dataset("train"), syn.dataset("train")):
        clone = pickle.loads(pickle.dumps(TransformedDataset(ds, None, "RGB")))
        a, b = clone[1][0], TransformedDataset(ds, None, "RGB")[1][0]
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_seeded_items_give_the_same_augmentation_whatever_came_before(make_folder):
    import random

    import torch
    from torchvision import transforms as T

    from tlframe.data.datasets import TransformedDataset

    root = make_folder("aug", {"a": 2})
    ds = TransformedDataset(ImageFolderDomain(root=str(root)).dataset("train"),
                            T.Compose([T.RandomCrop(6), T.RandomHorizontalFlip(), T.ToTensor()]))
    first = ds[(1, 1234)][0]
    torch.rand(7), random.random()  # other draws in between must not matter
    assert torch.equal(ds[(1, 1234)][0], first)
    assert any(not torch.equal(ds[(1, s)][0], first) for s in range(5))  # other seeds: other crops
    state = torch.get_rng_state()
    ds[(0, 99)]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
