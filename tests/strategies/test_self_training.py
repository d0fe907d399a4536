"""Self-training on two target views: the FixMatch and Mean Teacher losses, the EMA teacher, the weak/strong
views of the data module, and both strategies trained through Lightning (fp32 and bf16)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from conftest import make_synthetic_dm, make_trainer
from tlframe.checks import ConfigError
from tlframe.data.errors import DataError
from tlframe.losses import consistency_loss, pseudo_label_loss, sigmoid_rampup
from tlframe.module import TransferModule
from tlframe.strategies import (DANN, Adaptation, EMATeacher, FineTune, FixMatch, FixMatchTerm, MeanTeacher,
                                MeanTeacherTerm)


def _logits(n: int = 12, c: int = 5, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# -- the losses ---------------------------------------------------------------------------------------------
def test_pseudo_label_loss_is_fixmatch_eq4_row_by_row():
    strong, weak = _logits(seed=1), _logits(seed=2)
    loss, mask, pseudo = pseudo_label_loss(strong, weak, threshold=0.8, temperature=0.5)
    total = 0.0
    for i in range(len(weak)):
        q = [math.exp(v / 0.5) for v in weak[i].tolist()]
        q = [v / sum(q) for v in q]
        label = max(range(len(q)), key=q.__getitem__)
        assert int(pseudo[i]) == label and bool(mask[i]) == (max(q) >= 0.8)
        if max(q) >= 0.8:
            total += -strong[i, label].item() + math.log(sum(math.exp(v) for v in strong[i].tolist()))
    assert 0 < int(mask.sum()) < len(weak)  # the threshold keeps some rows and drops others
    assert loss.item() == pytest.approx(total / len(weak), rel=1e-12)  # mean over all N rows, masked rows count 0


def test_pseudo_label_loss_has_no_gradient_through_the_weak_view():
    strong, weak = _logits(seed=3).requires_grad_(), _logits(seed=4).requires_grad_()
    loss, _, _ = pseudo_label_loss(strong, weak, threshold=0.0)
    loss.backward()
    assert weak.grad is None and strong.grad is not None and strong.grad.abs().sum() > 0
    zero, mask, _ = pseudo_label_loss(strong, weak, threshold=1.01 - 1e-9)  # nothing is confident enough
    assert zero.item() == 0.0 and not bool(mask.any())


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_consistency_loss_matches_its_formula_and_masks_unconfident_teacher_rows(kind):
    student, teacher = _logits(seed=5).requires_grad_(), _logits(seed=6).requires_grad_()
    p, q = F.softmax(student.detach(), 1), F.softmax(teacher.detach(), 1)
    if kind == "mse":
        rows = ((p - q) ** 2).sum(1) / p.shape[1]
    else:
        rows = (q * (q.log() - p.log())).sum(1)
    loss, mask = consistency_loss(student, teacher, kind)
    assert bool(mask.all()) and loss.item() == pytest.approx(rows.mean().item(), rel=1e-10)
    masked, mask = consistency_loss(student, teacher, kind, threshold=0.9)
    keep = q.max(1).values >= 0.9
    assert torch.equal(mask, keep) and 0 < int(keep.sum()) < len(keep)
    assert masked.item() == pytest.approx((rows * keep).sum().item() / len(keep), rel=1e-10)
    masked.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 0) == 1.0 and sigmoid_rampup(7, 0) == 1.0
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(1000, 100) == 1.0


def test_losses_are_float32_under_bf16_autocast():
    a, b = _logits(seed=7).float().bfloat16(), _logits(seed=8).float().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for value in (pseudo_label_loss(a, b, 0.5)[0], consistency_loss(a, b)[0], consistency_loss(a, b, "kl")[0]):
            assert value.dtype == torch.float32 and torch.isfinite(value)


# -- the EMA teacher ------------------------------------------------------------------------------------------
def test_ema_teacher_follows_tarvainen_formula_step_by_step():
    model = TransferModule("dtn", num_classes=4, bottleneck_dim=8, strategy=MeanTeacher(ema_decay=0.6))
    teacher: EMATeacher = model.strategy.terms[0].teacher
    student_w = model.head.classifier.weight
    teacher_w = teacher.model.head.classifier.weight
    expected = student_w.detach().clone()  # theta_0: the teacher starts as the starting student
    assert torch.equal(teacher_w, expected)
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 7):
        with torch.no_grad():
            student_w.copy_(torch.randn(student_w.shape, generator=gen))
        teacher.follow(n)
        alpha = min(1 - 1 / (n + 1), 0.6)  # 1/2 at n=1 (the mean of theta_0 and theta_1), then the decay 0.6
        expected = alpha * expected + (1 - alpha) * student_w.detach()
        assert torch.allclose(teacher_w, expected, atol=1e-6), n
        assert int(teacher.ema_step) == n
    before = teacher_w.clone()
    teacher.follow(6)  # already applied: nothing changes
    assert torch.equal(teacher_w, before) and not teacher_w.requires_grad


def test_teacher_is_in_the_checkpoint_and_ignored_by_ddp(tmp_path):
    model = TransferModule("dtn", num_classes=10, strategy=MeanTeacher())
    keys = [k for k in model.state_dict() if k.startswith("strategy.terms.0.teacher.")]
    assert "strategy.terms.0.teacher.ema_step" in keys and any(k.endswith("head.classifier.weight") for k in keys)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert set(keys) <= ignored  # nothing of the teacher is broadcast or synchronised by DDP
    assert not any(k.startswith(("backbone.", "head.")) for k in ignored)
    assert all(not p.requires_grad for p in model.strategy.terms[0].teacher.parameters())


# -- the two views --------------------------------------------------------------------------------------------
def _target_batch(dm, views: int):
    dm.setup("fit")
    dm.set_target_views(views)
    return next(iter(dm.train_dataloader()))[0]["target"]


def test_data_module_serves_seeded_weak_and_strong_views():
    dm = make_synthetic_dm()
    (weak, strong), y = _target_batch(dm, 2)
    assert weak.shape == strong.shape == (8, 3, 32, 32) and y.shape == (8,)
    assert not torch.equal(weak, strong)
    (weak2, strong2), y2 = _target_batch(make_synthetic_dm(), 2)
    assert torch.equal(weak, weak2) and torch.equal(strong, strong2) and torch.equal(y, y2)  # seeded per sample
    single, y1 = _target_batch(make_synthetic_dm(), 1)
    assert torch.equal(single, weak) and torch.equal(y1, y)  # the weak view is the usual training image
    other, _ = _target_batch(make_synthetic_dm(strong_magnitude=20, strong_cutout=0.0), 2)
    assert torch.equal(other[0], weak) and not torch.equal(other[1], strong)


def test_bad_strong_augmentation_settings_and_cached_features_are_refused():
    with pytest.raises(DataError, match="strong_magnitude=31"):
        make_synthetic_dm(strong_magnitude=31)
    with pytest.raises(DataError, match="strong_cutout"):
        make_synthetic_dm(strong_cutout=1.5)
    dm = make_synthetic_dm()
    dm.feature_cache = object()  # as use_feature_cache leaves it
    with pytest.raises(DataError, match="cached features"):
        dm.set_target_views(2)


def test_strategies_ask_for_two_views_only_with_a_self_training_term():
    assert FineTune().target_views == DANN().target_views == Adaptation().target_views == 1
    assert FixMatch().target_views == MeanTeacher().target_views == 2
    assert DANN(terms=[FixMatchTerm()]).target_views == 2
    with pytest.raises(ConfigError, match="named 'fixmatch'"):
        FixMatch(terms=[FixMatchTerm()])
    with pytest.raises(ConfigError, match="ema_decay"):
        MeanTeacherTerm(ema_decay=1.0)


# -- training ---------------------------------------------------------------------------------------------------
class _Logged:
    def __init__(self):
        self.values: dict[str, list[float]] = {}


def _fit(strategy, tmp_path, precision="32-true", steps=6):
    import pytorch_lightning as pl

    logged = _Logged()

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for k, v in trainer.callback_metrics.items():
                if k.startswith("train/"):
                    logged.values.setdefault(k, []).append(float(v))

    pl.seed_everything(0)
    model = TransferModule("dtn", num_classes=10, strategy=strategy)
    trainer = make_trainer(tmp_path, max_steps=steps, precision=precision, callbacks=[Keep()], log_every_n_steps=1,
                           limit_val_batches=1)
    trainer.fit(model, make_synthetic_dm(iters_per_epoch=steps))
    return model, logged.values


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fixmatch_trains_on_pseudo_labels_and_logs_their_accuracy(tmp_path, precision):
    model, logs = _fit(FixMatch(threshold=0.0), tmp_path, precision)  # every pseudo-label kept
    assert all(v == 1.0 for v in logs["train/fixmatch_mask_rate"])
    assert all(0.0 <= v <= 1.0 for v in logs["train/fixmatch_pseudo_label_acc"])  # the target carries labels here
    assert all(v > 0 and math.isfinite(v) for v in logs["train/loss_fixmatch"])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_mean_teacher_trains_and_its_teacher_follows_the_student(tmp_path, precision):
    model, logs = _fit(MeanTeacher(rampup_steps=4, ema_decay=0.9), tmp_path, precision, steps=6)
    term = model.strategy.terms[0]
    assert int(term.teacher.ema_step) == 5  # updated before each step's forward: steps 1..5 of 6 applied
    assert logs["train/consistency_rampup"][0] == pytest.approx(math.exp(-5))
    assert logs["train/consistency_rampup"][2] == pytest.approx(math.exp(-5 * (1 - 2 / 4) ** 2))  # step 2 of 4
    assert logs["train/consistency_rampup"][-1] == 1.0
    assert all(math.isfinite(v) for v in logs["train/loss_consistency"])
    assert "train/consistency_teacher_acc" in logs
    student = dict(model.head.named_parameters())
    teacher = dict(term.teacher.model.head.named_parameters())
    assert all(not torch.equal(student[k], teacher[k]) for k in student)  # an average, not a copy
