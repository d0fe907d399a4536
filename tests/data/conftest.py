"""Fixtures for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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
def make_folder(tmp_path):
    """Build an ImageFolder tree: ``make_folder("name", {"cls": n_images, ...})``."""

    def make(name: str, counts: dict[str, int], ext: str = ".png") -> Path:
        root = tmp_path / name
        for ci, (cls, n) in enumerate(counts.items()):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(root / cls / f"{i:03d}{ext}", seed=100 * ci + i)
        return root

    return make
