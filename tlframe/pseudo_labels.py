"""Pseudo-labels of unlabelled target data from class centroids (SHOT, Liang et al., ICML 2020)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["centroid_pseudo_labels"]


@torch.no_grad()
def centroid_pseudo_labels(features: torch.Tensor, probs: torch.Tensor, rounds: int = 1) -> torch.Tensor:
    """SHOT's self-supervised pseudo-labels (its ``obtain_label``): weighted k-means-like centroids, cosine distance.

    ``features`` ``(N, d)`` (SHOT: the bottleneck output), ``probs`` ``(N, C)`` (softmax of the model's
    predictions), both of the whole target train split seen in eval mode. Each feature gets a constant 1
    appended and is L2-normalised (``x_i``). Then

    1. ``c_k = sum_i p_ik x_i / (1e-8 + sum_i p_ik)`` (centroids weighted by the predictions) and
       ``y_i = argmin_k (1 - cos(x_i, c_k))``;
    2. ``rounds`` times: the same with the one-hot ``y`` as weights (SHOT's code: one round).

    Returns the labels ``(N,)`` (int64). Float64 inside, on the inputs' device.
    """
    if features.ndim != 2 or probs.ndim != 2 or len(features) != len(probs):
        raise ValueError(f"centroid_pseudo_labels: features {tuple(features.shape)} and probs {tuple(probs.shape)} "
                         "must be (N, d) and (N, C)")
    x = torch.cat([features.double(), features.new_ones(len(features), 1, dtype=torch.float64)], dim=1)
    x = x / x.norm(dim=1, keepdim=True)
    weights = probs.double()
    labels = torch.empty(0)
    for _ in range(rounds + 1):
        centroids = weights.T @ x / (1e-8 + weights.sum(dim=0)[:, None])
        distance = 1 - F.normalize(x, dim=1) @ F.normalize(centroids, dim=1).T  # scipy's cdist(..., "cosine")
        labels = distance.argmin(dim=1)
        weights = F.one_hot(labels, probs.shape[1]).double()
    return labels
