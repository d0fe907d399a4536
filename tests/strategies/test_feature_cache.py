"""FrozenFeatures(cache_features=...): same training as the uncached path, backbone run once, disk reuse, keys."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from tlframe.data import DataError
from tlframe.data.datasets import TransformedDataset
from tlframe.data.feature_cache import FeatureCache
from tlframe.module import TransferModule
from tlframe.strategies import FrozenFeatures


def count_backbone_calls(model: TransferModule) -> list[int]:
    calls = [0]
    model.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def fit(make_trainer, make_dm, cache: str, **trainer_kwargs) -> tuple[TransferModule, pl.Trainer, dict]:
    """A seeded 2-epoch FrozenFeatures fit on an unlabelled target."""
    pl.seed_everything(0, verbose=False)
    model = TransferModule("dtn", num_classes=10, strategy=FrozenFeatures(cache_features=cache), lr=0.05)
    trainer = make_trainer(**{"max_epochs": 2, **trainer_kwargs})
    trainer.fit(model, make_dm(target_labelled=False))
    return model, trainer, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_cached_fit_matches_uncached_fit(trainer_factory, synthetic_dm):
    plain, _, plain_metrics = fit(trainer_factory, synthetic_dm, "none")
    cached, trainer, cached_metrics = fit(trainer_factory, synthetic_dm, "memory")
    for (name, a), b in zip(plain.head.state_dict().items(), cached.head.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    assert plain_metrics.keys() == cached_metrics.keys() and "val/source_acc" in cached_metrics
    for k in plain_metrics:
        assert cached_metrics[k] == pytest.approx(plain_metrics[k], abs=1e-5), k
    assert len(cached.feature_cache.built) == 4  # source train/val, target train/test (validated also when unlabelled)
    assert all(loader.dataset.tensors[0].ndim == 2 for loader in trainer.datamodule.val_dataloader())
    target = trainer.datamodule.predict_dataloader().dataset.tensors[1]
    assert target.dtype == torch.int64 and bool((target == -1).all())  # unlabelled target: -1, as uncached


def test_cached_run_calls_the_backbone_once_per_image_and_checkpoint_is_normal(trainer_factory, synthetic_dm):
    pl.seed_everything(0, verbose=False)
    model = TransferModule("dtn", num_classes=10, strategy=FrozenFeatures(cache_features="memory"), lr=0.05)
    calls = count_backbone_calls(model)
    dm = synthetic_dm(eval_batch_size=16)
    trainer = trainer_factory(max_epochs=2, enable_checkpointing=True)
    trainer.fit(model, dm)
    # 4 splits of 58/6/64/32 images in batches of 16, once, although 2 epochs ran
    assert calls[0] == 4 + 1 + 4 + 2
    cached_test = trainer.test(model, dm, verbose=False)
    assert calls[0] == 4 + 1 + 4 + 2 + 2  # only the source test split was new
    # The checkpoint is an ordinary one: reloaded without the cache, it tests on images.
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    plain = TransferModule.load_from_checkpoint(ckpt, strategy=FrozenFeatures())
    image_test = trainer_factory().test(plain, synthetic_dm(eval_batch_size=16), verbose=False)
    assert image_test[0].keys() == cached_test[0].keys()
    for k, v in cached_test[0].items():
        assert image_test[0][k] == pytest.approx(v, abs=1e-5), k


def test_disk_cache_is_written_once_and_reused(tmp_path, monkeypatch, trainer_factory, synthetic_dm):
    monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
    first, _, _ = fit(trainer_factory, synthetic_dm, "disk", max_steps=1)
    files = sorted((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(files) == 4 and len(first.feature_cache.built) == 4  # the unlabelled target test split is validated too
    assert not list((tmp_path / "cache" / "features").glob(".*"))  # no temporary file left behind
    mtimes = [f.stat().st_mtime_ns for f in files]

    pl.seed_everything(0, verbose=False)
    second = TransferModule("dtn", num_classes=10, strategy=FrozenFeatures(cache_features="disk"), lr=0.05)
    calls = count_backbone_calls(second)
    trainer_factory(max_steps=1).fit(second, synthetic_dm(target_labelled=False))
    assert calls[0] == 0 and second.feature_cache.built == [] and len(second.feature_cache.loaded) == 4
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache" / "features").glob("*.pt"))] == mtimes


def test_cache_key_changes_with_weights_transform_and_data(synthetic_dm):
    dm = synthetic_dm()
    dm.setup("fit")
    model = TransferModule("dtn", num_classes=10, strategy=FrozenFeatures(cache_features="disk"))
    dm.set_data_config(model.data_config)
    cache = model.feature_cache
    data = TransformedDataset(dm.source_train, dm.eval_transform(), dm.image_mode)
    key = cache.key(data, "source train")
    assert cache.key(data, "source train") == key  # deterministic
    other = TransferModule("dtn", num_classes=10, strategy=FrozenFeatures(cache_features="disk"))
    assert other.feature_cache.key(data, "source train") != key  # other (random) weights
    with torch.no_grad():
        model.backbone.stages[0][0].weight[0, 0, 0, 0] += 1e-3
    assert cache.key(data, "source train") != key  # one changed weight
    with torch.no_grad():
        model.backbone.stages[0][0].weight[0, 0, 0, 0] -= 1e-3
    assert cache.key(data, "source train") == key
    assert cache.key(data, "source val") != key
    assert cache.key(TransformedDataset(dm.source_val, data.transform, data.mode), "source train") != key
    dm.image_size = 28
    assert cache.key(TransformedDataset(dm.source_train, dm.eval_transform(), dm.image_mode), "source train") != key


def test_augmentation_with_cache_is_a_clear_error(trainer_factory, synthetic_dm):
    model = TransferModule("dtn", num_classes=10, strategy=FrozenFeatures(cache_features="memory"))
    with pytest.raises(DataError, match=r"train_augmentation='crop_flip' cannot be used with cached features.*"
                                        r"data.train_augmentation: none.*cache_features: none"):
        trainer_factory(max_steps=1).fit(model, synthetic_dm(train_augmentation="crop_flip"))


def test_bad_cache_mode_is_rejected():
    with pytest.raises(ValueError, match="cache_features must be 'none', 'memory' or 'disk'"):
        FrozenFeatures(cache_features="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'memory' or 'disk'"):
        FeatureCache("none", torch.nn.Linear(1, 1), "x")
