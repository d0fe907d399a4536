"""Shared fixtures: a tiny synthetic source/target pair and a short CPU fit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image

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
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, log_every_n_steps=1,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=str(tmp_path), deterministic=True)
    return pl.Trainer(**{**defaults, **kwargs})


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 10), seed: int = 0) -> Path:
    """Write a small random image in ``mode`` (RGB, L, P, RGBA, ...) to ``path``."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def image_writer():
    """The :func:`write_image` helper, as a fixture."""
    return write_image


@pytest.fixture
def synthetic_dm():
    return make_synthetic_dm


@pytest.fixture
def trainer_factory(tmp_path):
    return lambda **kw: make_trainer(tmp_path, **kw)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only folder of real data sets (``../shared/data`` from the repo root, or
    ``$TLFRAME_TEST_DATA``); skips the test when it is absent."""
    env = os.environ.get("TLFRAME_TEST_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not found (set TLFRAME_TEST_DATA to it)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never write into the user's ~/.cache or pick up their data root during tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLFRAME_CACHE_DIR", str(tmp_path_factory.mktemp("tlframe-cache")))
        mp.delenv("TLFRAME_DATA_ROOT", raising=False)
        yield


@pytest.fixture
def make_folder(tmp_path):
    """Build an ImageFolder tree: ``make_folder("name", {"cls": n_images, ...})`` (image modes cycle through ``modes``)."""

    def make(name: str, counts: dict[str, int], ext: str = ".png", modes: tuple[str, ...] = ("RGB",)) -> Path:
        root = tmp_path / name
        for ci, (cls, n) in enumerate(counts.items()):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(root / cls / f"{i:03d}{ext}", mode=modes[i % len(modes)], seed=100 * ci + i)
        return root

    return make
