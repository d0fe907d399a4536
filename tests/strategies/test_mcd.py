"""MCD: the discrepancy, the class-balance term, the three steps per batch with their own optimizers (which
parts each step moves), the heads, the checkpointed optimizer and scheduler states, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from conftest import make_synthetic_dm, make_trainer
from tlframe.checks import ConfigError
import math

from tlframe.losses import classifier_discrepancy, mcd_class_balance
from tlframe.module import TransferModule
from tlframe.strategies import MCD, L2SP


def test_classifier_discrepancy_is_the_mean_absolute_difference():
    gen = torch.Generator().manual_seed(0)
    p1 = torch.softmax(torch.randn(6, 4, generator=gen, dtype=torch.float64), 1)
    p2 = torch.softmax(torch.randn(6, 4, generator=gen, dtype=torch.float64), 1)
    expected = sum(abs(a - b) for r1, r2 in zip(p1.tolist(), p2.tolist()) for a, b in zip(r1, r2)) / 24
    assert classifier_discrepancy(p1, p2).item() == pytest.approx(expected, rel=1e-12)
    assert classifier_discrepancy(p1, p1).item() == 0.0


def test_class_balance_is_tllibs_mcd_entropy_not_the_prediction_entropy():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(7, 5, generator=gen, dtype=torch.float64), 1)
    mean = [sum(row[k] for row in p.tolist()) / 7 for k in range(5)]
    expected = -sum(math.log(m + 1e-6) for m in mean) / 5  # tllib/alignment/mcd.py `entropy`, re-derived
    assert mcd_class_balance(p).item() == pytest.approx(expected, rel=1e-12)
    # confident but balanced predictions (each class once) score the minimum, like uniform ones: it rewards the
    # batch's spread over the classes, not confidence (the prediction entropy would be 0 and log 5)
    balanced, uniform = torch.eye(5, dtype=torch.float64), torch.full((5, 5), 0.2, dtype=torch.float64)
    minimum = -math.log(0.2 + 1e-6)
    assert mcd_class_balance(balanced).item() == pytest.approx(minimum, rel=1e-12)
    assert mcd_class_balance(uniform).item() == pytest.approx(minimum, rel=1e-12)
    collapsed = torch.zeros(5, 5, dtype=torch.float64)
    collapsed[:, 0] = 1.0  # every image predicted as class 0
    assert mcd_class_balance(collapsed).item() == pytest.approx(-(math.log(1 + 1e-6) + 4 * math.log(1e-6)) / 5)
    assert mcd_class_balance(torch.softmax(torch.randn(4, 3), 1).to(torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        mcd_class_balance(torch.ones(3))


def test_steps_a_and_b_weigh_the_class_balance_of_both_classifiers():
    gen = torch.Generator().manual_seed(2)
    y1_s, y2_s = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    y_s = torch.tensor([0, 1, 2, 1])
    p1_t, p2_t = (torch.softmax(torch.randn(4, 3, generator=gen), 1) for _ in range(2))
    losses = MCD(balance_weight=0.03)._source_losses(y1_s, y2_s, y_s, p1_t, p2_t)
    assert set(losses) == {"cls", "balance"}
    assert losses["balance"].item() == pytest.approx((mcd_class_balance(p1_t) + mcd_class_balance(p2_t)).item())
    ce = torch.nn.functional.cross_entropy
    assert losses["cls"].item() == pytest.approx((ce(y1_s, y_s) + ce(y2_s, y_s)).item())


class _Recording:
    """Wraps one of the module's optimizers: records, at every step, which model parts the step changed."""

    def __init__(self, name, optimizer, parts, log):
        self.name, self.optimizer, self.parts, self.log = name, optimizer, parts, log

    def zero_grad(self, *args, **kwargs):
        return self.optimizer.zero_grad(*args, **kwargs)

    def step(self, *args, **kwargs):
        before = {k: [p.detach().clone() for p in ps] for k, ps in self.parts.items()}
        out = self.optimizer.step(*args, **kwargs)
        changed = {k for k, ps in self.parts.items() if any(not torch.equal(a, p) for a, p in zip(before[k], ps))}
        self.log.append((self.name, changed))
        return out


class _RecordingModule(TransferModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_log: list = []

    def optimizers(self, use_pl_optimizer: bool = True):
        g, f = super().optimizers(use_pl_optimizer)
        parts = {"G": list(self.backbone.parameters()),
                 "F": list(self.head.parameters()) + list(self.strategy.classifier_2.parameters())}
        return _Recording("generator", g, parts, self.step_log), _Recording("classifiers", f, parts, self.step_log)


def test_each_step_moves_only_its_part(tmp_path):
    model = _RecordingModule("dtn", num_classes=10, strategy=MCD(num_k=3, classifier_width=32))
    make_trainer(tmp_path, max_epochs=1, limit_val_batches=1).fit(model, make_synthetic_dm(iters_per_epoch=2))
    per_batch = [("generator", {"G"}), ("classifiers", {"F"}),  # A: both optimizers
                 ("classifiers", {"F"}),                          # B: the classifiers only
                 *[("generator", {"G"})] * 3]                     # C: the generator only, num_k times
    assert model.step_log == per_batch * 2
    assert model.global_step == 2 * (3 + 3)  # Lightning counts every optimizer step


def test_heads_optimizers_and_checkpoint(tmp_path):
    model = TransferModule("dtn", num_classes=10, strategy=MCD(classifier_width=48))
    assert model.head.out_features == 48 and model.head.classifier.out_features == 10
    assert [type(m).__name__ for m in model.strategy.classifier_2] == [
        "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.fit(model, make_synthetic_dm(iters_per_epoch=3))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 * (3 + 4) and len(ckpt["optimizer_states"]) == 2
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [3, 3]  # each scheduler stepped once per batch
    generator, classifiers = (o["param_groups"] for o in ckpt["optimizer_states"])
    assert [g["name"] for g in generator] == ["backbone"] and generator[0]["momentum"] == 0.0  # TLlib: no momentum
    assert [g["name"] for g in classifiers] == ["head", "classifier_2"] and classifiers[0]["momentum"] == 0.9
    assert any(k.startswith("strategy.classifier_2.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_mcd_trains_and_logs_every_step(tmp_path, precision):
    model = TransferModule("dtn", num_classes=10, strategy=MCD(classifier_width=32, num_k=2))
    trainer = make_trainer(tmp_path, max_epochs=1, precision=precision, log_every_n_steps=1, limit_val_batches=1)
    trainer.fit(model, make_synthetic_dm(iters_per_epoch=2))
    logged = trainer.callback_metrics
    assert {"train/loss_cls", "train/loss_balance", "train/loss_discrepancy_b", "train/loss_discrepancy",
            "train/agreement_t", "val/target_acc"} <= set(logged)
    assert all(torch.isfinite(logged[k]) for k in logged if k.startswith("train/"))


def test_mcd_refuses_what_it_cannot_combine():
    with pytest.raises(ConfigError, match="regularization"):
        MCD(regularization=[L2SP()])
    with pytest.raises(ConfigError, match="bn_policy"):
        MCD(bn_policy="separate")
    with pytest.raises(ConfigError, match="num_k"):
        MCD(num_k=0)
