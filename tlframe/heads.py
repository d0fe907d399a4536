"""Classification head: bottleneck + classifier on top of backbone features."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "TransferHead", "linear_relu_blocks"]


def linear_relu_blocks(in_features: int, width: int, layers: int, batch_norm: bool = True,
                       dropout: float = 0.0, relu: bool = True) -> list[nn.Module]:
    """``layers`` x ``Linear(·, width) -> [BatchNorm1d] -> [ReLU] -> [Dropout]``, the first from ``in_features``:
    the bottleneck's and the domain discriminator's hidden layers. Only parametrised modules shift the
    state-dict indices, so ``relu=False`` keeps the keys of one layer (``0`` Linear, ``1`` BN)."""
    modules: list[nn.Module] = []
    for width_in in [in_features] + [width] * (layers - 1):
        modules.append(nn.Linear(width_in, width))
        if batch_norm:
            modules.append(nn.BatchNorm1d(width))
        if relu:
            modules.append(nn.ReLU(inplace=True))
        if dropout > 0:
            modules.append(nn.Dropout(dropout))
    return modules


class Bottleneck(nn.Sequential):
    """``layers`` x ``Linear(·, dim) -> [BatchNorm1d] -> [ReLU] -> [Dropout]``; shapes ``(N, in) -> (N, dim)``.

    The TLlib default (``dim=256``, one layer, BN, no dropout). The strategies align the last layer's output.
    ``layers=2, dim=100, batch_norm=False`` with the classifier is Ganin & Lempitsky's digit label predictor
    (FC 100 - FC 100 - FC 10). ``relu=False`` with BN and dropout 0.5 is SHOT's ``feat_bootleneck``
    (``type="bn"``: Linear-BN-Dropout, no activation). With one layer the state-dict keys are those of earlier
    tlframe versions.
    """

    def __init__(self, in_features: int, dim: int = 256, batch_norm: bool = True, dropout: float = 0.0,
                 layers: int = 1, relu: bool = True):
        super().__init__(*linear_relu_blocks(in_features, dim, layers, batch_norm, dropout, relu))
        self.out_features = dim


class TransferHead(nn.Module):
    """Bottleneck (optional: ``dim=0`` gives a linear classifier on the backbone features) + classifier.

    ``forward(z) -> (f, logits)`` with ``f`` of shape ``(N, out_features)`` and logits ``(N, num_classes)``.
    ``weight_norm``: the classifier is a weight-normalised linear layer ``w = g v / ||v||`` per class (Salimans &
    Kingma 2016; SHOT's source model), through ``torch.nn.utils.parametrizations.weight_norm``.
    """

    def __init__(self, in_features: int, num_classes: int, dim: int = 256, batch_norm: bool = True,
                 dropout: float = 0.0, weight_norm: bool = False, layers: int = 1, relu: bool = True):
        super().__init__()
        self.bottleneck = Bottleneck(in_features, dim, batch_norm, dropout, layers, relu) if dim > 0 else nn.Identity()
        self.out_features = dim if dim > 0 else in_features
        self.classifier = nn.Linear(self.out_features, num_classes)
        if weight_norm:
            self.classifier = nn.utils.parametrizations.weight_norm(self.classifier, name="weight", dim=0)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.bottleneck(z)
        return f, self.classifier(f)
