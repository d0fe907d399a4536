"""Shared fixtures: a tiny synthetic source/target pair and a short CPU fit."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from tlframe.data import SyntheticDomain, TransferDataModule


def make_synthetic_dm(num_train: int = 64, batch_size: int = 8, iters_per_epoch: int = 4, image_size: int = 32,
                      target_labelled: bool = True, **kwargs) -> TransferDataModule:
    """A small source/target pair of the synthetic domain (deterministic)."""
    return TransferDataModule(
        source=SyntheticDomain("source", num_train=num_train, num_test=32, image_size=image_size, seed=0),
        target=SyntheticDomain("target", num_train=num_train, num_test=32, image_size=image_size, seed=1,
                               labelled=target_labelled),
        batch_size=batch_size, iters_per_epoch=iters_per_epoch, **kwargs)


def make_trainer(tmp_path, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer writing into ``tmp_path``."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=str(tmp_path), deterministic=True)
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def synthetic_dm():
    return make_synthetic_dm


@pytest.fixture
def trainer_factory(tmp_path):
    return lambda **kw: make_trainer(tmp_path, **kw)
