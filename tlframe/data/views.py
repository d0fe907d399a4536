"""Two views of one target image: the weak and the strong augmentation of self-training.

FixMatch (Sohn et al., NeurIPS 2020) and Mean Teacher / self-ensembling (Tarvainen & Valpola, NeurIPS 2017;
French et al., ICLR 2018) compare a model's prediction on a weakly augmented view of an unlabelled image with
its (or an EMA teacher's) prediction on a strongly augmented view of the *same* image.

- weak view: the training transform (``data.train_augmentation``: none, crop_flip or timm);
- strong view: torchvision's ``RandAugment(num_ops, magnitude)`` on the image, then the same training
  transform, then a cutout (``RandomErasing`` of one square of area up to ``cutout**2`` of the image, filled
  with 0 = the normalised mean), FixMatch's RandAugment + Cutout.

Both views of a sample are drawn from one per-sample seed (``EpochRandomSampler(item_seeds=True)``), weak then
strong, so they depend on ``(run seed, epoch, position)`` alone: resume, DDP and ``num_workers`` do not change
them.
"""

from __future__ import annotations

from typing import Callable

from PIL import Image

__all__ = ["TwoViews", "strong_transform"]


class TwoViews:
    """``img -> (weak(img), strong(img))`` (a picklable transform, for DataLoader workers)."""

    def __init__(self, weak: Callable, strong: Callable) -> None:
        self.weak = weak
        self.strong = strong

    def __call__(self, img: Image.Image):
        return self.weak(img), self.strong(img)

    def __repr__(self) -> str:
        return f"TwoViews(weak={self.weak!r}, strong={self.strong!r})"


def strong_transform(weak: Callable, num_ops: int, magnitude: int, cutout: float) -> Callable:
    """RandAugment(``num_ops``, ``magnitude``) -> ``weak`` (to a normalised tensor) -> cutout (square, up to
    ``cutout`` of each side; 0: none)."""
    from torchvision import transforms as T

    steps: list[Callable] = [T.RandAugment(num_ops=num_ops, magnitude=magnitude), weak]
    if cutout > 0:
        steps.append(T.RandomErasing(p=1.0, scale=(0.01 * cutout**2, cutout**2), ratio=(1.0, 1.0), value=0))
    return T.Compose(steps)
