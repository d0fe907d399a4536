"""Source-free adaptation (SHOT): the information-maximisation loss, the centroid pseudo-labels, a run without
source data (no source loader, frozen classifier, labels per epoch in the checkpoint), fp32 and bf16."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from conftest import make_synthetic_dm, make_trainer
from tlframe.backbones import BackboneError
from tlframe.checks import ConfigError
from tlframe.data import SyntheticDomain, TransferDataModule
from tlframe.data.errors import DataError
from tlframe.losses import information_maximization
from tlframe.module import TransferModule
from tlframe.pseudo_labels import centroid_pseudo_labels
from tlframe.strategies import SHOT, FineTune, L2SP


def test_information_maximization_is_mean_entropy_minus_entropy_of_the_mean():
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2

    def h(p):
        return -sum(v * math.log(v + 1e-5) for v in p)

    rows = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in logits.tolist()]
    mean = [sum(r[c] for r in rows) / len(rows) for c in range(4)]
    expected = sum(h(r) for r in rows) / len(rows) - 0.5 * h(mean)
    assert information_maximization(logits, 1e-5, diversity_weight=0.5).item() == pytest.approx(expected, rel=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert information_maximization(logits.float().bfloat16()).dtype == torch.float32


def _cosine_labels(x, centroids):
    def cos(a, b):
        return sum(u * v for u, v in zip(a, b)) / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)) or 1)

    return [min(range(len(centroids)), key=lambda k: 1 - cos(row, centroids[k])) for row in x]


def test_centroid_pseudo_labels_follow_shot_obtain_label():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(30, 3, generator=gen, dtype=torch.float64), dim=1)
    # slow re-derivation: append 1, L2-normalise, soft centroids, cosine argmin, then one hard round
    x = [r + [1.0] for r in features.tolist()]
    x = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in x]
    w = probs.tolist()
    for _ in range(2):
        cents = [[sum(w[i][k] * x[i][j] for i in range(30)) / (1e-8 + sum(w[i][k] for i in range(30)))
                  for j in range(6)] for k in range(3)]
        labels = _cosine_labels(x, cents)
        w = [[1.0 if labels[i] == k else 0.0 for k in range(3)] for i in range(30)]
    assert centroid_pseudo_labels(features, probs, rounds=1).tolist() == labels
    soft_only = centroid_pseudo_labels(features, probs, rounds=0)
    assert soft_only.shape == (30,) and soft_only.dtype == torch.int64


def test_centroids_correct_an_unconfident_classifier():
    """Two well separated clusters whose predictions are only slightly right on average: the labels follow the
    clusters, also for the images the classifier gets wrong."""
    gen = torch.Generator().manual_seed(2)
    features = torch.cat([torch.randn(20, 4, generator=gen) * 0.1 + torch.tensor([3.0, 0, 0, 0]),
                          torch.randn(20, 4, generator=gen) * 0.1 + torch.tensor([0, 3.0, 0, 0])])
    truth = torch.tensor([0] * 20 + [1] * 20)
    probs = torch.full((40, 2), 0.5)
    probs[truth == 0, 0], probs[truth == 1, 1] = 0.6, 0.6
    probs[:5] = torch.tensor([0.4, 0.6])  # five images of cluster 0 predicted as class 1
    probs[truth == 0, 1] = 1 - probs[truth == 0, 0]
    assert (probs.argmax(1) != truth).sum() == 5
    assert torch.equal(centroid_pseudo_labels(features, probs), truth)


# -- runs -----------------------------------------------------------------------------------------------------
def _source_model(tmp_path):
    import pytorch_lightning as pl

    pl.seed_everything(0)
    model = TransferModule("dtn", num_classes=10, weight_norm_classifier=True, strategy=FineTune(label_smoothing=0.1))
    make_trainer(tmp_path / "p1", max_steps=4, limit_val_batches=1).fit(model, make_synthetic_dm())
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    return model, path


class _CountingDM(TransferDataModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaders: list[str] = []

    def _loader(self, ds, transform, batch_size, name, *args, **kwargs):
        self.loaders.append(name)
        return super()._loader(ds, transform, batch_size, name, *args, **kwargs)


def _target_only_dm(**kwargs):
    return _CountingDM(source=None, target=SyntheticDomain("target", num_train=64, num_test=32, seed=1),
                       batch_size=8, **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_shot_adapts_without_source_data_and_keeps_the_classifier(tmp_path, precision):
    source, path = _source_model(tmp_path)
    model = TransferModule("dtn", num_classes=10, weight_norm_classifier=True, weights=str(path), weights_head=True,
                           strategy=SHOT(pseudo_label_weight=0.3))
    for key, value in source.state_dict().items():  # the whole source model, head included
        if key.startswith(("backbone.", "head.")):
            assert torch.equal(model.state_dict()[key], value), key
    classifier = {k: v.clone() for k, v in model.head.classifier.state_dict().items()}
    dm = _target_only_dm()
    trainer = make_trainer(tmp_path / "p2", max_epochs=2, precision=precision, limit_val_batches=1)
    trainer.fit(model, dm)
    assert dm.train_source is False and not any(name.startswith("source") for name in dm.loaders)
    assert dm.val_domains == ["target"] and dm.num_train_batches() == 8  # one pass over the 64 target images
    assert all(torch.equal(v, model.head.classifier.state_dict()[k]) for k, v in classifier.items())  # bit-identical
    assert not any(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items()
                   if k.startswith("backbone.") and k.endswith("weight"))  # the feature extractor did train
    strategy = model.strategy
    assert strategy.pseudo_label_epoch == 1 and strategy.pseudo_labels.shape == (64,)
    metrics = trainer.callback_metrics
    assert {"train/loss_im", "train/loss_pseudo_label", "shot/pseudo_label_acc", "val/target_acc"} <= set(metrics)
    assert "val/source_acc" not in metrics


def test_shot_labels_are_checkpointed_and_shot_im_makes_none(tmp_path):
    shot = SHOT()
    shot.pseudo_labels, shot.pseudo_label_epoch = torch.tensor([3, 1, 4, 1, 5]), 7
    restored = SHOT()
    restored.load_state_dict(shot.state_dict())
    assert restored.pseudo_label_epoch == 7 and torch.equal(restored.pseudo_labels, shot.pseudo_labels)
    im = TransferModule("dtn", num_classes=10, strategy=SHOT(pseudo_label_weight=0.0))
    dm = _target_only_dm()
    make_trainer(tmp_path, max_steps=3, limit_val_batches=1).fit(im, dm)
    assert im.strategy.pseudo_label_epoch == -1 and "target train" in dm.loaders


def test_shot_resumes_mid_epoch_on_the_checkpointed_labels(tmp_path):
    """``fit --ckpt_path`` into a fresh model: its empty label record takes the run's 64 labels (no size error),
    and the resumed epoch trains on them instead of labelling again."""
    _, path = _source_model(tmp_path)

    def shot_model():
        return TransferModule("dtn", num_classes=10, weight_norm_classifier=True, weights=str(path),
                              weights_head=True, strategy=SHOT(pseudo_label_weight=0.3))

    mid = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=10)  # as last.ckpt is written
    make_trainer(tmp_path / "a", max_steps=11, limit_val_batches=1, enable_checkpointing=True,
                 callbacks=[mid]).fit(shot_model(), _target_only_dm())  # step 10: epoch 1, 2 of its 8 steps
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    state = ckpt["state_dict"]["strategy._extra_state"]
    assert int(state[0]) == 1 and state.shape == (65,)  # epoch, then one label per target image
    state[1:] = 3  # labels no labelling pass would give: the resumed run must have read them
    torch.save(ckpt, tmp_path / "mid.ckpt")
    resumed = shot_model()
    assert resumed.strategy.pseudo_labels.shape == (0,)
    make_trainer(tmp_path / "b", max_steps=12, limit_val_batches=1).fit(resumed, _target_only_dm(),
                                                                          ckpt_path=str(tmp_path / "mid.ckpt"))
    assert resumed.global_step == 12 and resumed.strategy.pseudo_label_epoch == 1
    assert torch.equal(resumed.strategy.pseudo_labels, torch.full((64,), 3))
    state = torch.cat([state[:1], state[1:11]])  # labels of another target set: 10 images, not 64
    ckpt["state_dict"]["strategy._extra_state"] = state
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(DataError, match="pseudo-labels for 10 target images, but data.target's train split has 64"):
        make_trainer(tmp_path / "c", max_steps=12, limit_val_batches=1).fit(shot_model(), _target_only_dm(),
                                                                              ckpt_path=str(tmp_path / "other.ckpt"))


def test_source_free_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data.source is null"):  # a source-using strategy on source-free data
        _target_only_dm().set_training_domains(source=True)
    with pytest.raises(ConfigError, match="weights_head"):
        TransferModule("dtn", num_classes=10, weights_head=True)
    with pytest.raises(ConfigError, match="regularization"):
        SHOT(regularization=[L2SP()])
    _, path = _source_model(tmp_path)
    with pytest.raises(BackboneError, match="head"):  # a 10-class source model into a 5-class one
        TransferModule("dtn", num_classes=5, weight_norm_classifier=True, weights=str(path), weights_head=True)
    with pytest.raises(BackboneError, match="weight_norm_classifier"):
        TransferModule("dtn", num_classes=10, weights=str(path), weights_head=True)
