"""Small digit networks from the domain-adaptation literature, registered in timm.

Registering them with ``timm.models.register_model`` puts them behind the same door as
every other backbone: ``timm.create_model("lenet", num_classes=0)``, ``group_matcher``
for stage freezing, ``pretrained_cfg`` for the input transform.

- ``lenet``: the convolutional part of TLlib's digits LeNet (1x28x28 input, 800 features:
  conv 20 - pool - ReLU - conv 50 - 2-d dropout - pool - ReLU, flattened).
- ``lenet_tllib``: TLlib's digits LeNet in full (``tllib/vision/models/digits.py``, 500 features):
  the two conv stages of ``lenet`` plus a third stage Linear(800, 500) - ReLU - Dropout(0.5), so the
  dropout acts before the bottleneck, as in TLlib's MNIST<->USPS benchmark.
- ``dtn``: the "DTN" network of the ADDA/CyCADA digits experiments
  (3x32x32 input, 4096 features).
- ``dann_cnn``: the small CNN of Ganin & Lempitsky (ICML 2015) for MNIST->MNIST-M
  (3x28x28 input, 768 features).
- ``domainbed_mnist_cnn``: DomainBed's ``MNIST_CNN`` (``domainbed/networks.py``) for RotatedMNIST and
  ColoredMNIST: four 3x3 convolutions (64, 128 stride 2, 128, 128 channels), each followed by ReLU and
  GroupNorm(8 groups), then global average pooling: 128 features. Inputs in [0, 1] (mean 0, std 1), as
  DomainBed feeds them.

No pretrained weights exist for them on any hub; pass ``weights=`` (a tlframe checkpoint
or a state dict) to start from an earlier run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["DigitNet"]


class DigitNet(nn.Module):
    """A sequential conv feature extractor with the timm backbone contract.

    ``stages`` is a list of modules applied in order; ``forward_features`` returns the
    flattened output of the last stage, shape ``(N, num_features)``. The classifier is an
    optional ``Linear(num_features, num_classes)`` (``num_classes=0`` gives identity).
    """

    def __init__(self, stages: list[nn.Module], num_features: int, num_classes: int = 10, in_chans: int = 1,
                 drop_rate: float = 0.0, **_: Any):
        super().__init__()
        self.in_chans = in_chans
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.num_classes = num_classes
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\.0\.", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.stages(x), 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _lenet_stages(in_chans: int) -> tuple[list[nn.Module], int]:
    stages = [
        nn.Sequential(nn.Conv2d(in_chans, 20, kernel_size=5), nn.MaxPool2d(2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(20, 50, kernel_size=5), nn.Dropout2d(0.5), nn.MaxPool2d(2), nn.ReLU()),
    ]
    return stages, 50 * 4 * 4


def _lenet_tllib_stages(in_chans: int) -> tuple[list[nn.Module], int]:
    stages, conv_features = _lenet_stages(in_chans)
    fc = nn.Sequential(nn.Flatten(1), nn.Linear(conv_features, 500), nn.ReLU(), nn.Dropout(0.5))
    return [*stages, fc], 500


def _dtn_stages(in_chans: int) -> tuple[list[nn.Module], int]:
    def block(cin: int, cout: int, p: float) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 5, stride=2, padding=2), nn.BatchNorm2d(cout), nn.Dropout2d(p), nn.ReLU())

    return [block(in_chans, 64, 0.1), block(64, 128, 0.3), block(128, 256, 0.5)], 256 * 4 * 4


def _dann_cnn_stages(in_chans: int) -> tuple[list[nn.Module], int]:
    stages = [
        nn.Sequential(nn.Conv2d(in_chans, 32, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(32, 48, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2)),
    ]
    return stages, 48 * 4 * 4


def _domainbed_mnist_cnn_stages(in_chans: int) -> tuple[list[nn.Module], int]:
    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(), nn.GroupNorm(8, cout))

    stages = [block(in_chans, 64, 1), block(64, 128, 2), block(128, 128, 1),
              nn.Sequential(*block(128, 128, 1), nn.AdaptiveAvgPool2d(1))]
    return stages, 128


_STAGE_BUILDERS = {"domainbed_mnist_cnn": _domainbed_mnist_cnn_stages, "lenet": _lenet_stages, "lenet_tllib": _lenet_tllib_stages, "dtn": _dtn_stages, "dann_cnn": _dann_cnn_stages}


def _cfg(in_chans: int, size: int, mean: float = 0.5, std: float = 0.5) -> dict:
    return dict(
        url="", num_classes=10, input_size=(in_chans, size, size), pool_size=None, crop_pct=1.0,
        interpolation="bilinear", mean=(mean,) * in_chans, std=(std,) * in_chans,
        first_conv="stages.0.0", classifier="fc",
    )


default_cfgs = generate_default_cfgs({
    "lenet": _cfg(1, 28),
    "lenet_tllib": _cfg(1, 28),
    "dtn": _cfg(3, 32),
    "dann_cnn": _cfg(3, 28),
    "domainbed_mnist_cnn": _cfg(1, 28, mean=0.0, std=1.0),
})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> DigitNet:
    kwargs.setdefault("in_chans", default_cfgs[variant].default.input_size[0])

    def build(in_chans: int, **kw: Any) -> DigitNet:
        stages, num_features = _STAGE_BUILDERS[variant](in_chans)
        return DigitNet(stages, num_features, in_chans=in_chans, **kw)

    return build_model_with_cfg(build, variant, pretrained, **kwargs)


@register_model
def lenet(pretrained: bool = False, **kwargs: Any) -> DigitNet:
    """LeNet for 1x28x28 digits (TLlib digits benchmark), 800 features."""
    return _create("lenet", pretrained, **kwargs)


@register_model
def lenet_tllib(pretrained: bool = False, **kwargs: Any) -> DigitNet:
    """TLlib's digits LeNet: ``lenet`` + Linear(800, 500) - ReLU - Dropout(0.5) as a third stage, 500 features."""
    return _create("lenet_tllib", pretrained, **kwargs)


@register_model
def dtn(pretrained: bool = False, **kwargs: Any) -> DigitNet:
    """DTN for 3x32x32 digits (ADDA/CyCADA), 4096 features."""
    return _create("dtn", pretrained, **kwargs)


@register_model
def dann_cnn(pretrained: bool = False, **kwargs: Any) -> DigitNet:
    """Ganin & Lempitsky (2015) MNIST->MNIST-M feature extractor, 3x28x28 input, 768 features."""
    return _create("dann_cnn", pretrained, **kwargs)


@register_model
def domainbed_mnist_cnn(pretrained: bool = False, **kwargs: Any) -> DigitNet:
    """DomainBed's MNIST_CNN (RotatedMNIST / ColoredMNIST), 1x28x28 input in [0, 1], 128 features."""
    return _create("domainbed_mnist_cnn", pretrained, **kwargs)
