"""Classification head: bottleneck + classifier on top of backbone features."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "TransferHead"]


class Bottleneck(nn.Sequential):
    """``Linear(in_features, dim) -> [BatchNorm1d] -> ReLU -> [Dropout]``; shapes ``(N, in) -> (N, dim)``.

    The TLlib default (``dim=256``, BN, no dropout). The strategies align these features.
    """

    def __init__(self, in_features: int, dim: int = 256, batch_norm: bool = True, dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Linear(in_features, dim)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(dim))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.out_features = dim


class TransferHead(nn.Module):
    """Bottleneck (optional: ``dim=0`` gives a linear classifier on the backbone features) + classifier.

    ``forward(z) -> (f, logits)`` with ``f`` of shape ``(N, out_features)`` and logits ``(N, num_classes)``.
    ``weight_norm``: the classifier is a weight-normalised linear layer ``w = g v / ||v||`` per class (Salimans &
    Kingma 2016; SHOT's source model), through ``torch.nn.utils.parametrizations.weight_norm``.
    """

    def __init__(self, in_features: int, num_classes: int, dim: int = 256, batch_norm: bool = True,
                 dropout: float = 0.0, weight_norm: bool = False):
        super().__init__()
        self.bottleneck = Bottleneck(in_features, dim, batch_norm, dropout) if dim > 0 else nn.Identity()
        self.out_features = dim if dim > 0 else in_features
        self.classifier = nn.Linear(self.out_features, num_classes)
        if weight_norm:
            self.classifier = nn.utils.parametrizations.weight_norm(self.classifier, name="weight", dim=0)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.bottleneck(z)
        return f, self.classifier(f)
