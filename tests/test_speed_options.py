"""Backbone speed options of TransferModule (channels_last, compile) and reduced precision on CPU."""

from __future__ import annotations

import shutil

import pytest
import pytorch_lightning as pl
import torch

from tlframe.losses import domain_adversarial_loss, gradient_reverse, mk_mmd
from tlframe.module import TransferModule
from tlframe.strategies import DANN


def _fit(channels_last: bool, synthetic_dm, trainer_factory, tmp_path):
    pl.seed_everything(0)
    model = TransferModule("dtn", num_classes=10, strategy=DANN(grl_max_steps=2), channels_last=channels_last)
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = trainer_factory(max_steps=3, callbacks=[Losses()])
    trainer.fit(model, synthetic_dm(iters_per_epoch=3))
    path = tmp_path / f"cl{int(channels_last)}.ckpt"
    trainer.save_checkpoint(path)
    return model, losses, path


def test_channels_last_fit_gives_the_same_losses_and_checkpoint_keys(synthetic_dm, trainer_factory, tmp_path):
    plain, plain_losses, plain_ckpt = _fit(False, synthetic_dm, trainer_factory, tmp_path)
    cl, cl_losses, cl_ckpt = _fit(True, synthetic_dm, trainer_factory, tmp_path)
    conv = next(m for m in cl.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert cl_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5)
    keys = torch.load(plain_ckpt, weights_only=False)["state_dict"].keys()
    assert torch.load(cl_ckpt, weights_only=False)["state_dict"].keys() == keys
    reloaded = TransferModule.load_from_checkpoint(cl_ckpt, strategy=DANN()).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded(x), cl.eval()(x), atol=1e-5)


def _has_c_compiler() -> bool:
    return any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.mark.skipif(not _has_c_compiler(), reason="torch.compile (inductor) on CPU needs a C/C++ compiler; none found")
def test_compile_builds_keeps_checkpoint_keys_and_matches_eager_forward():
    torch.manual_seed(0)
    compiled = TransferModule("lenet", num_classes=10, compile=True).eval()
    eager = TransferModule("lenet", num_classes=10).eval()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no "_orig_mod." in the keys
    eager.load_state_dict(compiled.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(compiled(x), eager(x), atol=1e-5)
    assert compiled.hparams.compile is True


@pytest.mark.filterwarnings("ignore:.*fp16 is not supported on CPU")
def test_16_mixed_on_cpu_falls_back_to_bf16():
    """Lightning accepts ``precision="16-mixed"`` on CPU but runs bf16 (documented: fp16 AMP is CUDA-only)."""
    trainer = pl.Trainer(accelerator="cpu", precision="16-mixed", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision == "bf16-mixed"


def test_losses_are_finite_and_float32_under_fp16_autocast():
    """fp16 autocast (what ``16-mixed`` does on CUDA) on CPU: the DA losses compute in float32 and backprop."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    disc = torch.nn.Linear(8, 1)
    x_s, x_t = torch.randn(6, 16), torch.randn(6, 16) + 1
    with torch.autocast("cpu", dtype=torch.float16):
        f_s, f_t = lin(x_s), lin(x_t)
        assert f_s.dtype == torch.float16
        adv, acc = domain_adversarial_loss(disc(gradient_reverse(f_s, 0.5)), disc(gradient_reverse(f_t, 0.5)))
        mmd = mk_mmd(f_s, f_t)
        mmd_lin = mk_mmd(f_s, f_t, linear=True, offset=False)
    for value in (adv, mmd, mmd_lin):
        assert value.dtype == torch.float32 and torch.isfinite(value)
    with torch.no_grad():
        ref = mk_mmd(lin(x_s), lin(x_t))
    assert float(mmd.detach()) == pytest.approx(float(ref), rel=2e-2, abs=2e-3)
    (adv + mmd).backward()
    assert all(torch.isfinite(p.grad).all() for p in (*lin.parameters(), *disc.parameters()))


def test_train_metrics_are_logged_only_at_logging_steps_with_those_steps_values(synthetic_dm, trainer_factory, tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    losses = {}

    logged_at = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step - 1] = float(outputs["loss"])
            if "train/loss" in trainer.callback_metrics and float(trainer.callback_metrics["train/loss"]) == losses[batch_idx]:
                logged_at.append(batch_idx)  # self.log was called at this step

    logger = TensorBoardLogger(str(tmp_path), name="log")
    trainer = trainer_factory(max_steps=9, log_every_n_steps=3, logger=logger, callbacks=[Losses()])
    trainer.fit(TransferModule("dtn", num_classes=10, strategy=DANN(grl_max_steps=2)), synthetic_dm(iters_per_epoch=9))
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("train/loss", "train/loss_adv", "train/grl_coeff", "train/source_acc"):
        assert [e.step for e in events.Scalars(tag)] == [2, 5, 8], tag
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([losses[2], losses[5], losses[8]], rel=1e-6)
    assert logged_at == [2, 5, 8]  # nothing is computed or logged on the steps in between
