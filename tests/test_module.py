"""TransferModule behaviour not tied to one strategy: the non-finite guard, the head's options."""

from __future__ import annotations

import pytest
import torch

from tlframe.module import NonFiniteLossError, TransferModule


def test_infinite_gradient_with_finite_loss_stops_before_the_update(synthetic_dm, trainer_factory):
    model = TransferModule("dtn", num_classes=10)
    model.head.classifier.weight.register_hook(lambda g: g * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"step 0 \(epoch 0\): the gradients \(loss terms finite: "
                                                 r"\{'train/loss_cls': [0-9.]+, 'train/loss': [0-9.]+\}\)"):
        trainer_factory(max_steps=2).fit(model, synthetic_dm())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_the_guard_can_be_turned_off(synthetic_dm, trainer_factory):
    model = TransferModule("dtn", num_classes=10, check_finite_loss=False)
    model.head.classifier.weight.register_hook(lambda g: g * float("inf"))
    trainer_factory(max_steps=1).fit(model, synthetic_dm())
    assert not torch.isfinite(model.head.classifier.weight).all()


def test_checkpoint_of_another_strategy_names_the_extra_tensors():
    from tlframe.module import CheckpointMismatchError
    from tlframe.strategies import DANN

    dann = TransferModule("dtn", num_classes=10, strategy=DANN(hidden=32)).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"unexpected strategy\.discriminator\.0\.weight.*strategy"):
        TransferModule("dtn", num_classes=10).load_state_dict(dann)


def test_accumulated_micro_batches_draw_different_random_numbers(synthetic_dm, trainer_factory):
    import pytorch_lightning as pl

    seeds = []

    class Seeds(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # the seed this batch ran with
            seeds.append((trainer.global_step, torch.initial_seed()))

    pl.seed_everything(0)
    trainer_factory(max_steps=2, accumulate_grad_batches=2, callbacks=[Seeds()]).fit(
        TransferModule("dtn", num_classes=10, bottleneck_dropout=0.5), synthetic_dm())
    assert [step for step, _ in seeds] == [0, 1, 1, 2]  # global_step after each micro-batch
    assert len({seed for _, seed in seeds}) == 4  # one seed per micro-batch, none shared


def test_the_bottleneck_batch_norm_is_optional_as_in_tllibs_dan_head():
    layers = lambda m: [type(x).__name__ for x in m.head.bottleneck]  # noqa: E731
    assert layers(TransferModule("dtn", num_classes=10, bottleneck_dropout=0.5)) == [
        "Linear", "BatchNorm1d", "ReLU", "Dropout"]
    dan = TransferModule("dtn", num_classes=10, bottleneck_dropout=0.5, bottleneck_bn=False)
    assert layers(dan) == ["Linear", "ReLU", "Dropout"]  # tllib/alignment/dan.py ImageClassifier
    f, logits = dan.head(torch.randn(4, dan.backbone.num_features))
    assert f.shape == (4, 256) and logits.shape == (4, 10)


def test_a_two_layer_bottleneck_is_ganin_and_lempitskys_label_predictor():
    """``bottleneck_layers: 2`` stacks Linear-ReLU blocks (FC 100 - FC 100 - FC 10 on the 768 conv features);
    one layer keeps the earlier state-dict keys, so older checkpoints still load."""
    paper = TransferModule("dann_cnn", num_classes=10, bottleneck_dim=100, bottleneck_bn=False, bottleneck_layers=2)
    assert [type(x).__name__ for x in paper.head.bottleneck] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert [(m.in_features, m.out_features) for m in paper.head.modules() if isinstance(m, torch.nn.Linear)] == [
        (768, 100), (100, 100), (100, 10)]
    f, logits = paper.head(torch.randn(3, 768))
    assert f.shape == (3, 100) and logits.shape == (3, 10) and bool((f >= 0).all())
    one = TransferModule("dann_cnn", num_classes=10, bottleneck_dim=100)
    assert sorted(k for k in one.state_dict() if k.startswith("head.")) == [
        "head.bottleneck.0.bias", "head.bottleneck.0.weight", "head.bottleneck.1.bias",
        "head.bottleneck.1.num_batches_tracked", "head.bottleneck.1.running_mean", "head.bottleneck.1.running_var",
        "head.bottleneck.1.weight",
        "head.classifier.bias", "head.classifier.weight"]
    with pytest.raises(ValueError, match="bottleneck_layers"):
        TransferModule("dann_cnn", num_classes=10, bottleneck_layers=0)


def test_bottleneck_without_relu_is_shots_and_loads_a_relu_checkpoint():
    """``bottleneck_relu: false`` + dropout 0.5 is SHOT's Linear-BN-Dropout: features of both signs, the same keys
    as the default head (a checkpoint of either loads into the other)."""
    shot = TransferModule("lenet", num_classes=10, bottleneck_dropout=0.5, bottleneck_relu=False).eval()
    assert [type(x).__name__ for x in shot.head.bottleneck] == ["Linear", "BatchNorm1d", "Dropout"]
    assert shot.backbone.num_features == 800  # SHOT's LeNetBase
    default = TransferModule("lenet", num_classes=10, bottleneck_dropout=0.5).eval()
    assert shot.state_dict().keys() == default.state_dict().keys()
    shot.load_state_dict(default.state_dict())
    x = torch.randn(4, 1, 28, 28)
    f_shot, _ = shot.head(shot.backbone(x))
    f_default, _ = default.head(default.backbone(x))
    assert bool((f_shot < 0).any()) and torch.equal(f_default, f_shot.clamp(min=0))  # the ReLU is all that differs
