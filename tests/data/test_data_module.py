"""TransferDataModule: splits, loaders, transforms and errors."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
from pytorch_lightning.utilities.combined_loader import CombinedLoader

from tlframe.data import DataError, ImageFolderDomain, SyntheticDomain, TransferDataModule


def synth(style: str = "source", n: int = 300, n_test: int = 60, labelled: bool = True, size: int = 32):
    return SyntheticDomain(style, num_train=n, num_test=n_test, image_size=size, labelled=labelled)  # type: ignore[arg-type]


def test_class_mismatch(make_folder):
    a = ImageFolderDomain(root=str(make_folder("a", {"cat": 1, "dog": 1})))
    b = ImageFolderDomain(root=str(make_folder("b", {"cat": 1, "eel": 1})))
    dm = TransferDataModule(a, b, batch_size=1)
    with pytest.raises(DataError, match=r"classes \['cat', 'dog'\] but target .*\['cat', 'eel'\].*make the class folders"):
        dm.setup("fit")
    with pytest.raises(DataError, match="classes"):
        TransferDataModule(synth(), a, batch_size=1).setup("fit")


def test_batch_size_larger_than_domain():
    dm = TransferDataModule(synth(n=40), synth("target", n=100), batch_size=37)
    with pytest.raises(DataError, match=r"source batch size 37 is larger than the source train set \(36 images after holding out 4"):
        dm.setup("fit")
    dm = TransferDataModule(synth(n=100), synth("target", n=20), batch_size=16, target_batch_size=21)
    with pytest.raises(DataError, match=r"target batch size 21 .* \(20 images\)"):
        dm.setup("fit")


def test_bad_arguments():
    with pytest.raises(DataError, match="val_fraction"):
        TransferDataModule(synth(), synth("target"), val_fraction=1.0)
    with pytest.raises(DataError, match="batch_size=0"):
        TransferDataModule(synth(), synth("target"), batch_size=0)
    with pytest.raises(DataError, match="train_augmentation"):
        TransferDataModule(synth(), synth("target"), train_augmentation="bogus")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="source must be labelled"):
        TransferDataModule(synth(labelled=False), synth("target"), batch_size=4).setup("fit")


def test_train_loader_exact_iterations_unequal_domains():
    dm = TransferDataModule(synth(n=300), synth("target", n=100, labelled=False),
                            batch_size=32, target_batch_size=16)
    dm.setup("fit")
    assert len(dm.source_train) == 270 and len(dm.target_train) == 100
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    batches = [batch for batch, _, _ in loader]
    assert len(batches) == 9 == dm.num_train_batches()  # max(ceil(270/32), ceil(100/16))
    for batch in batches:
        x_s, y_s = batch["source"]
        x_t, y_t = batch["target"]
        assert x_s.shape == (32, 3, 32, 32) and y_s.shape == (32,) and y_s.dtype == torch.int64
        assert x_t.shape == (16, 3, 32, 32) and bool((y_t == -1).all())
        assert y_s.min() >= 0 and y_s.max() < 10


def test_iters_per_epoch_cycles_fresh_permutations():
    dm = TransferDataModule(synth(n=200), synth("target", n=50), batch_size=10, iters_per_epoch=20)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert sum(1 for _ in loader) == 20
    loaders = loader.flattened
    target_idx = list(loaders[1].sampler)
    assert len(target_idx) == 200
    assert np.bincount(target_idx, minlength=50).tolist() == [4] * 50  # 4 full permutations
    source_idx = list(loaders[0].sampler)
    assert len(source_idx) == 200 and len(set(source_idx)) == 180  # one permutation + 20 more


def test_val_split_deterministic_and_disjoint():
    def split(seed):
        dm = TransferDataModule(synth(n=300), synth("target"), batch_size=8, val_fraction=0.2, split_seed=seed)
        dm.setup("fit")
        return set(dm.source_train.indices), set(dm.source_val.indices)

    train, val = split(0)
    assert len(val) == 60 and len(train) == 240
    assert not train & val and train | val == set(range(300))
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_eval_loaders_and_names():
    dm = TransferDataModule(synth(n=100, n_test=30), synth("target", n=80, n_test=20), batch_size=8,
                            eval_batch_size=7)
    dm.setup("fit")
    assert dm.val_domains == ["source", "target"] and dm.test_domains == ["target", "source"]
    assert dm.num_classes == 10 and dm.classes[0] == "disc"
    val = dm.val_dataloader()
    assert [len(dl.dataset) for dl in val] == [10, 20]
    x, y = next(iter(val[0]))
    assert x.shape == (7, 3, 32, 32) and (y >= 0).all()
    assert [len(dl.dataset) for dl in dm.test_dataloader()] == [20, 30]
    assert len(dm.predict_dataloader().dataset) == 20
    # an unlabelled target is still validated (for the label-free validators), tested and predicted (labels -1)
    dm = TransferDataModule(synth(n=100), synth("target", n=80, n_test=20, labelled=False), batch_size=8)
    dm.setup("fit")
    assert dm.val_domains == ["source", "target"] and len(dm.val_dataloader()) == 2
    assert bool((next(iter(dm.val_dataloader()[1]))[1] == -1).all())
    test_target = dm.test_dataloader()[0]
    assert bool((next(iter(test_target))[1] == -1).all())
    dm = TransferDataModule(synth(n=100), synth("target"), batch_size=8, val_fraction=0.0)
    dm.setup("fit")
    assert dm.val_domains == ["target"] and len(dm.source_train) == 100


def test_default_transform_without_data_config():
    dm = TransferDataModule(synth(size=20), synth("target", size=20), batch_size=4)
    dm.setup("fit")
    x, _ = next(iter(dm.val_dataloader()[0]))
    assert x.shape == (4, 3, 32, 32)
    assert x.min() < -1.0  # ImageNet-normalised: the dark background falls well below 0
    dm = TransferDataModule(synth(size=20), synth("target", size=20), batch_size=4, image_size=24)
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()[0]))[0].shape == (4, 3, 24, 24)


@pytest.mark.parametrize("augmentation", ["none", "crop_flip", "timm"])
def test_transforms_from_timm_data_config(augmentation):
    cfg = timm.data.resolve_model_data_config(timm.create_model("resnet18", pretrained=False))
    dm = TransferDataModule(synth(n=40, n_test=8), synth("target", n=40, n_test=8), batch_size=4,
                            train_augmentation=augmentation)
    dm.setup("fit")
    dm.set_data_config(cfg)
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["source"][0].shape == (4, 3, 224, 224) and batch["target"][0].shape == (4, 3, 224, 224)
    x, _ = next(iter(dm.test_dataloader()[0]))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    # mean/std from the config are applied: a constant image of the mean maps to ~0
    img = np.full((8, 8, 3), np.round(np.array(cfg["mean"]) * 255), dtype=np.uint8)
    from PIL import Image
    out = dm.eval_transform()(Image.fromarray(img))
    assert out.abs().max() < 0.02


def test_single_channel_backbone_gets_grey_images():
    dm = TransferDataModule(synth(n=40, n_test=8), synth("target", n=40, n_test=8), batch_size=4,
                            train_augmentation="crop_flip")
    dm.setup("fit")
    dm.set_data_config({"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,),
                        "interpolation": "bilinear", "crop_pct": 1.0})
    assert dm.image_mode == "L"
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["target"][0].shape == (4, 1, 28, 28)
    x, _ = next(iter(dm.val_dataloader()[1]))
    assert x.shape == (4, 1, 28, 28) and -1.0 <= x.min() and x.max() <= 1.0


def test_worker_processes():
    dm = TransferDataModule(synth(n=64, n_test=16), synth("target", n=64, n_test=16), batch_size=8,
                            iters_per_epoch=3, num_workers=2, persistent_workers=True, pin_memory=False,
                            prefetch_factor=3, preload_in_memory=False)  # in-memory sets kept as tensors load in-process
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.flattened[0].num_workers == 2 and loader.flattened[0].persistent_workers
    assert loader.flattened[0].prefetch_factor == 3
    assert sum(1 for _ in loader) == 3
    assert sum(len(y) for _, y in dm.test_dataloader()[0]) == 16


class _TinyModule(pl.LightningModule):
    """Records what the trainer feeds it."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3 * 16 * 16, 10)
        self.seen: dict[str, list] = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        (x_s, y_s), (x_t, y_t) = batch["source"], batch["target"]
        self.seen["train"].append((x_s.shape[0], x_t.shape[0], int(y_t.max())))
        return torch.nn.functional.cross_entropy(self.net(x_s.flatten(1)), y_s) + 0 * self.net(x_t.flatten(1)).sum()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen["val"].append((dataloader_idx, batch[0].shape[0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_fit_with_lightning_trainer():
    dm = TransferDataModule(synth(n=50, n_test=12), synth("target", n=30, n_test=12, labelled=False),
                            batch_size=8, iters_per_epoch=4, image_size=16)
    model = _TinyModule()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert model.seen["train"] == [(8, 8, -1)] * 8
    assert {idx for idx, _ in model.seen["val"]} == {0, 1}  # an unlabelled target is validated too
    assert sum(n for idx, n in model.seen["val"] if idx == 0) == 2 * 5
    assert sum(n for idx, n in model.seen["val"] if idx == 1) == 2 * 12


def test_built_from_yaml_config_with_jsonargparse(tmp_path):
    """LightningCLI builds the data module from typed __init__ arguments and class_path domains."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TransferDataModule, "data")
    cfg = parser.parse_string("""
data:
  source: {class_path: tlframe.data.SyntheticDomain, init_args: {style: source, num_train: 40, num_test: 8}}
  target:
    class_path: tlframe.data.SyntheticDomain
    init_args: {style: target, num_train: 40, num_test: 8, labelled: false}
  batch_size: 4
  train_augmentation: crop_flip
""")
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, TransferDataModule) and dm.train_augmentation == "crop_flip"
    assert isinstance(dm.target, SyntheticDomain) and not dm.target.has_labels
    assert dm.num_classes == 10
    with pytest.raises(Exception, match="train_augmentation"):
        parser.parse_string("data: {source: {class_path: tlframe.data.SyntheticDomain}, "
                            "target: {class_path: tlframe.data.SyntheticDomain}, train_augmentation: bogus}")


def test_in_memory_sets_keep_their_transformed_tensors_and_give_the_same_batches():
    from tlframe.data.datasets import MemoizedDataset

    def batches(**kwargs):
        dm = TransferDataModule(synth(n=40), synth("target", n=40), batch_size=8, iters_per_epoch=3, **kwargs)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return dm, [list(loader) for _ in range(2)]  # two epochs

    dm, cached = batches()
    _, plain = batches(preload_in_memory=False)
    for (b_cached, _, _), (b_plain, _, _) in zip(sum(cached, []), sum(plain, [])):
        for role in ("source", "target"):
            assert torch.equal(b_cached[role][0], b_plain[role][0]) and torch.equal(b_cached[role][1], b_plain[role][1])
    memo = {k: v for k, v in dm._preloaded.items() if k.startswith("source train")}
    assert len(memo) == 1 and isinstance(next(iter(memo.values())), MemoizedDataset)
    kept = next(iter(memo.values()))
    assert kept.items is None and kept.images.shape == (36, 3, 32, 32)  # one contiguous tensor for the split
    assert int(kept.filled.sum()) > 0  # filled by the first epoch
    augmenting, _ = batches(train_augmentation="crop_flip")
    assert not any(k.endswith("train") or " train " in k for k in augmenting._preloaded)  # random crops: never kept


def test_memoized_items_live_in_one_tensor_and_other_items_are_kept_as_they_are():
    from tlframe.data.datasets import MemoizedDataset

    calls = []

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            calls.append(i)
            return torch.full((1, 2, 2), float(i)), i % 3

    memo = MemoizedDataset(Images())
    first = [memo[i] for i in (4, 0, 4)]
    assert calls == [4, 0] and memo.images.shape == (5, 1, 2, 2) and memo.filled.tolist() == [1, 0, 0, 0, 1]
    assert torch.equal(first[2][0], torch.full((1, 2, 2), 4.0)) and first[2][1] == 1 and isinstance(first[2][1], int)

    class Odd(torch.utils.data.Dataset):  # varying shapes: kept item by item
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(i + 1), i

    odd = MemoizedDataset(Odd())
    assert [odd[i][0].shape[0] for i in (0, 1, 2, 1)] == [1, 2, 3, 2] and odd.items is not None


def test_splits_too_large_for_memory_load_as_usual(monkeypatch):
    from tlframe.data import datamodule

    monkeypatch.setattr(datamodule, "PRELOAD_MAX_BYTES", 40 * 3 * 32 * 32 * 4 - 1)  # just under the source train split
    dm = TransferDataModule(synth(n=50), synth("target", n=30), batch_size=8, iters_per_epoch=2, val_fraction=0.2)
    dm.setup("fit")
    dm.train_dataloader()
    assert sorted(k.split(" Compose")[0] for k in dm._preloaded) == ["target train"]  # 30 images fit, 40 do not


def test_target_val_samples_is_a_fixed_stratified_subsample_and_test_keeps_every_image(capsys):
    from tlframe.data.datamodule import _labels_of

    dm = TransferDataModule(synth(n=100), synth("target", n=80, n_test=200), batch_size=8, target_val_samples=50)
    dm.setup("fit")
    val_target = dm.val_dataloader()[1].dataset
    assert len(val_target) == len(dm.target_val) and 40 <= len(val_target) <= 60
    labels = _labels_of(dm.target_val)
    full = _labels_of(dm.target_test)
    share = np.bincount(labels, minlength=10) / len(labels)
    assert np.abs(share - np.bincount(full, minlength=10) / len(full)).max() < 0.05  # each class keeps its share
    assert len(dm.test_dataloader()[0].dataset) == 200 and len(dm.predict_dataloader().dataset) == 200
    again = TransferDataModule(synth(n=100), synth("target", n=80, n_test=200), batch_size=8, target_val_samples=50)
    again.setup("fit")
    assert again.target_val.indices == dm.target_val.indices  # the same images every run (split_seed)
    # unlabelled target: a uniform sample of exactly that size
    dm = TransferDataModule(synth(n=100), synth("target", n=80, n_test=200, labelled=False), batch_size=8,
                            target_val_samples=50)
    dm.setup("fit")
    assert len(dm.val_dataloader()[1].dataset) == 50
    with pytest.raises(DataError, match="target_val_samples=0 must be a positive integer"):
        TransferDataModule(synth(n=100), synth("target"), target_val_samples=0)
