"""A deterministic 10-class synthetic shape domain with a real source/target shift.

Images are rasterised in numpy from signed distance functions of ten shapes, with a random
position, scale, rotation (within +-20 degrees, so "cross" and "x", or horizontal and
vertical bars, stay distinct) and stroke width per image.

- ``style="source"``: light grey shapes on a dark plain background, slightly noisy.
- ``style="target"``: MNIST-M-like: a colourful random texture background, the shape drawn
  as ``|background - colour|`` (a colour-inverting blend) with thinner strokes.

Determinism: only ``Generator.random`` (uniform doubles) is drawn from a numpy RNG seeded
with ``(seed, style, split)``, and the image math uses only +, -, *, /, sqrt, abs, min, max
and rounding (no transcendental functions whose last bit may differ between CPUs), so the
same arguments give the same bytes on every machine. Train and test use different streams.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import numpy as np
from torch.utils.data import Dataset

from tlframe.data.datasets import ArrayImageDataset
from tlframe.data.domains import Domain, Split
from tlframe.data.errors import DataError

SHAPES: list[str] = [
    "disc", "ring", "square", "triangle", "cross", "x", "hbars", "vbars", "diagonal", "l_shape",
]

_STYLE_CODE = {"source": 0, "target": 1}
_SPLIT_CODE = {"train": 0, "test": 1}
_SQRT_HALF = np.float32(0.7071067811865476)


def _box(a: np.ndarray, b: np.ndarray, ha, hb) -> np.ndarray:
    """Approximate signed distance to an axis-aligned box with half sizes ``ha`` x ``hb``."""
    return np.maximum(np.abs(a) - ha, np.abs(b) - hb)


def _sdf(k: int, u: np.ndarray, v: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Signed distance (normalised units, negative inside) of shape ``k`` at points (u, v);
    ``t`` is the stroke half-width, broadcast per image."""
    if k == 0:  # disc
        return np.sqrt(u * u + v * v) - 0.75
    if k == 1:  # ring
        return np.abs(np.sqrt(u * u + v * v) - 0.72) - t
    if k == 2:  # square outline
        return np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.68) - t
    if k == 3:  # filled triangle pointing up (v grows downwards)
        a = 0.866025 * u
        return np.maximum(v, np.maximum(a - 0.5 * v, -a - 0.5 * v)) - 0.45
    if k == 4:  # plus
        return np.minimum(_box(u, v, t, 0.8), _box(u, v, 0.8, t))
    if k == 5:  # x: the plus rotated by 45 degrees
        a, b = (u + v) * _SQRT_HALF, (v - u) * _SQRT_HALF
        return np.minimum(_box(a, b, t, 0.85), _box(a, b, 0.85, t))
    if k == 6:  # three horizontal bars
        return np.minimum(np.minimum(_box(u, v + 0.6, 0.8, t), _box(u, v, 0.8, t)), _box(u, v - 0.6, 0.8, t))
    if k == 7:  # three vertical bars
        return np.minimum(np.minimum(_box(u + 0.6, v, t, 0.8), _box(u, v, t, 0.8)), _box(u - 0.6, v, t, 0.8))
    if k == 8:  # one thick diagonal stripe, top-left to bottom-right
        a, b = (u + v) * _SQRT_HALF, (v - u) * _SQRT_HALF
        return _box(a, b, 0.95, 1.6 * t)
    if k == 9:  # L
        return np.minimum(_box(u + 0.45, v, t, 0.8), _box(u - 0.1, v - 0.8 + t, 0.55 + t, t))
    raise ValueError(k)


def _value_noise(uniform: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsample a random grid ``(N, C, g, g)`` to ``(N, C, size, size)``."""
    g = uniform.shape[-1]
    pos = (np.arange(size, dtype=np.float32) + 0.5) * np.float32((g - 1) / size)
    i0 = np.minimum(pos.astype(np.int64), g - 2)
    w = (pos - i0).astype(np.float32)
    rows = uniform[..., i0, :] * (1 - w)[:, None] + uniform[..., i0 + 1, :] * w[:, None]
    return rows[..., i0] * (1 - w) + rows[..., i0 + 1] * w


def generate_shapes(
    n: int, style: Literal["source", "target"] = "source", image_size: int = 32, seed: int = 0,
    split: Split = "train",
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` images ``(n, S, S, 3)`` uint8 and balanced labels ``(n,)`` int64."""
    S = int(image_size)
    rng = np.random.default_rng([int(seed), _STYLE_CODE[style], _SPLIT_CODE[split]])

    def uni(lo: float, hi: float, *shape: int) -> np.ndarray:
        return (lo + (hi - lo) * rng.random((n, *shape))).astype(np.float32)

    labels = (np.arange(n) % len(SHAPES))[np.argsort(rng.random(n), kind="stable")]
    r = uni(0.27, 0.40) * S  # shape radius in pixels
    cx = S / 2 + uni(-0.8, 0.8) * (S / 2 - r)
    cy = S / 2 + uni(-0.8, 0.8) * (S / 2 - r)
    tan = uni(-0.17, 0.17)  # tan(theta / 2): |theta| < ~19.3 degrees without calling cos/sin
    cos, sin = (1 - tan * tan) / (1 + tan * tan), 2 * tan / (1 + tan * tan)
    t = uni(0.14, 0.22) if style == "source" else uni(0.08, 0.13)

    grid = np.arange(S, dtype=np.float32) + 0.5
    px = (grid[None, None, :] - cx[:, None, None]) / r[:, None, None]
    py = (grid[None, :, None] - cy[:, None, None]) / r[:, None, None]
    u = cos[:, None, None] * px + sin[:, None, None] * py
    v = cos[:, None, None] * py - sin[:, None, None] * px
    alpha = np.empty((n, S, S), dtype=np.float32)
    for k in range(len(SHAPES)):
        idx = np.flatnonzero(labels == k)
        if len(idx):
            d = _sdf(k, u[idx], v[idx], t[idx, None, None])
            alpha[idx] = np.clip(0.5 - d * r[idx, None, None], 0.0, 1.0)  # ~1 px anti-aliasing
    alpha = alpha[..., None]  # (n, S, S, 1)

    if style == "source":
        bg = uni(0.0, 0.2)[:, None, None, None]
        fg = uni(0.7, 1.0)[:, None, None, None]
        noise = uni(-0.04, 0.04, S, S)[..., None]
        img = np.broadcast_to(bg + alpha * (fg - bg) + noise, (n, S, S, 3))
    else:
        base = uni(0.1, 0.9, 1, 1, 3)
        tex = (0.45 * (_value_noise(uni(-1, 1, 3, 3, 3), S) )
               + 0.25 * _value_noise(uni(-1, 1, 3, 6, 6), S)
               + 0.15 * _value_noise(uni(-1, 1, 3, 12, 12), S))
        bg = np.clip(base + tex.transpose(0, 2, 3, 1), 0.0, 1.0)
        colour = uni(0.55, 1.0, 1, 1, 3)
        img = np.abs(bg - alpha * colour)
    images = (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(images), labels.astype(np.int64)


class SyntheticDomain(Domain):
    """Ten procedurally drawn shapes (see :data:`SHAPES`), generated in code, RGB.

    For quick starts and tests: no files, same pixels on every machine. ``"source"`` and
    ``"target"`` styles form a transfer task with a real domain shift (plain grey vs.
    textured colour backgrounds, thick vs. thin strokes).

    Args:
        style: ``"source"`` (light shapes on dark plain background) or ``"target"``
            (colour-inverted shapes on colourful texture).
        num_train: number of train images (classes balanced).
        num_test: number of test images.
        image_size: side length in pixels.
        seed: RNG seed; train and test use different streams derived from it.
        labelled: if False every label is -1.
        class_subset: keep only these shapes (indices or names), relabelled 0..k-1; see :class:`Domain`.
    """

    def __init__(
        self,
        style: Literal["source", "target"] = "source",
        num_train: int = 2000,
        num_test: int = 1000,
        image_size: int = 32,
        seed: int = 0,
        labelled: bool = True,
        class_subset: Optional[list[Union[int, str]]] = None,
    ) -> None:
        super().__init__(labelled, class_subset)
        if style not in _STYLE_CODE:
            raise DataError(f"style must be 'source' or 'target', got {style!r}: use one of those.")
        if num_train < 1 or num_test < 1:
            raise DataError(
                f"num_train={num_train} and num_test={num_test} must both be >= 1: raise them."
            )
        if image_size < 8:
            raise DataError(f"image_size={image_size} is too small to draw shapes: use >= 8.")
        self.style = style
        self.num_train = int(num_train)
        self.num_test = int(num_test)
        self.image_size = int(image_size)
        self.seed = int(seed)

    @property
    def name(self) -> str:
        return f"synthetic-{self.style}"

    @property
    def all_classes(self) -> list[str]:
        return list(SHAPES)

    def _build(self, split: Split) -> Dataset:
        n = self.num_train if split == "train" else self.num_test
        images, labels = generate_shapes(n, self.style, self.image_size, self.seed, split)
        return ArrayImageDataset(images, labels, labelled=self.labelled)
