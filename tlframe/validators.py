"""Label-free model selection and domain-shift diagnostics: pure tensor functions and bounded samplers.

Validators score a model on the **unlabelled** target evaluation split, so a checkpoint can
be chosen without target labels (``--checkpoint.monitor=val/target_snd --checkpoint.mode=max``):

- :func:`prediction_entropy` (``val/target_entropy``, lower is better);
- :func:`soft_neighborhood_density` (``val/target_snd``, higher is better).

Diagnostics (logged by :class:`tlframe.callbacks.TransferInsights`):

- :func:`proxy_a_distance` (``val/a_distance``) between source and target features;
- :func:`confusion_image`, a confusion matrix rendered as an image tensor (no matplotlib).

:class:`RowSample` keeps a uniform, seeded sample of at most ``max_samples`` rows of a stream
of batches (bottom-k sampling), gathered across DDP ranks like any torchmetrics state.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from tlframe.seeding import mix

__all__ = ["prediction_entropy", "soft_neighborhood_density", "proxy_a_distance", "confusion_image", "RowSample",
           "SoftNeighborhoodDensity"]


def prediction_entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy (nats) of each row of class probabilities.

    ``H(p_i) = -sum_c p_ic log p_ic``; shapes ``(N, C) -> (N,)``. A confident prediction has
    entropy near 0, a uniform one ``log C``. The mean over the target evaluation split is the
    entropy validator (lower is better), e.g. ``[[1, 0], [0.5, 0.5]] -> [0, log 2]``.
    """
    probs = probs.float()
    return -(probs * probs.clamp_min(eps).log()).sum(dim=1)


def soft_neighborhood_density(probs: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Soft neighbourhood density (SND) of target predictions; a scalar, higher is better.

    Saito, Kim, Teterwak, Sclaroff, Darrell, Saenko, "Tune it the right way: unsupervised
    validation of domain adaptation via soft neighborhood density", ICCV 2021:

    1. ``q_i = p_i / ||p_i||_2`` (rows of the softmax predictions ``p``, shape ``(N, C)``);
    2. ``S = q q^T`` (cosine similarities, ``(N, N)``), self-similarity ``S_ii`` excluded;
    3. ``P_ij = softmax_j(S_ij / temperature)`` over ``j != i`` (``temperature = 0.05``);
    4. ``SND = mean_i H(P_i) = -1/N sum_i sum_{j != i} P_ij log P_ij``.

    Dense neighbourhoods (points sharing their class prediction with many others, a
    clustered target) give high SND. Example: ``N = 2`` gives ``0`` (each row has a single
    neighbour); three identical predictions give ``log 2``. Costs ``O(N^2)`` memory and time:
    pass a sample (see :class:`RowSample`) of at most a few thousand rows.
    """
    n = probs.shape[0]
    if n < 2:
        return probs.new_zeros(())
    q = F.normalize(probs.float(), dim=1)
    sim = q @ q.T / temperature
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), float("-inf"))
    p = sim.softmax(dim=1)
    logp = sim.log_softmax(dim=1).masked_fill(p == 0, 0.0)  # 0 log 0 = 0 (the diagonal)
    return -(p * logp).sum(dim=1).mean()


def proxy_a_distance(source: torch.Tensor, target: torch.Tensor, steps: int = 100, weight_decay: float = 1e-3,
                     seed: int = 0) -> torch.Tensor:
    """Proxy A-distance ``2 (1 - 2 err)`` between two feature samples (Ben-David et al., NIPS 2007 / MLJ 2010).

    A linear domain classifier (logistic regression, L2 ``weight_decay`` on the weights) is
    trained full-batch with L-BFGS for ``steps`` iterations on a seeded random half of
    ``cat(source, target)`` (features standardised with that half's statistics, domains
    balanced by subsampling the larger one) and ``err`` is its error on the other half.
    Shapes ``(N_s, D), (N_t, D) -> ()``. 2 means the domains are linearly separable, 0 that
    the classifier does no better than chance; it is not clipped, so a value slightly below 0
    is chance level too. Runs in float32 with gradients enabled (also inside Lightning's
    inference mode), on the tensors' device. Cost: ``steps`` full passes over
    ``N/2 x D`` features (about 10 ms for 2 x 500 x 256 on one CPU core).
    """
    n = min(source.shape[0], target.shape[0])
    if n < 2:
        return source.new_full((), float("nan"))
    gen = torch.Generator().manual_seed(seed)
    pick = lambda x: x[torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)]  # noqa: E731
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.cat([pick(source), pick(target)]).float().clone()
        y = torch.cat([x.new_zeros(n), x.new_ones(n)])
        perm = torch.randperm(2 * n, generator=gen).to(x.device)
        train, test = perm[: n], perm[n:]
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
        x = (x - mean) / std
        w = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
        b = torch.zeros((), device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x[train] @ w + b, y[train]) + weight_decay * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            err = ((x[test] @ w + b > 0).float() != y[test]).float().mean()
    return 2.0 * (1.0 - 2.0 * err)


def confusion_image(confmat: torch.Tensor, cell: Optional[int] = None, max_size: int = 512) -> torch.Tensor:
    """Render a ``(C, C)`` confusion matrix (rows: true class, columns: predicted) as a ``(3, H, W)`` image in [0, 1].

    Each row is normalised to sum to 1 (per-class recall on the diagonal; an empty row stays
    0) and drawn as a white-to-dark-blue heatmap, each cell ``cell`` pixels wide (default:
    as large as fits in ``max_size``, at least 1) with a 1-pixel grey grid, so the image reads
    at a glance in TensorBoard's Images tab without matplotlib.
    """
    c = confmat.shape[0]
    m = confmat.float().cpu()
    m = m / m.sum(dim=1, keepdim=True).clamp_min(1)
    cell = cell or max(1, max_size // c)
    big = m.repeat_interleave(cell, 0).repeat_interleave(cell, 1)  # (C*cell, C*cell)
    white, blue = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.03, 0.19, 0.42])
    img = white[:, None, None] + (blue - white)[:, None, None] * big[None]
    if cell >= 4:
        grid = torch.zeros(c * cell, dtype=torch.bool)
        grid[::cell] = True
        img[:, grid, :] = 0.6
        img[:, :, grid] = 0.6
    return img.clamp(0, 1)


class RowSample(Metric):
    """A uniform random sample of at most ``max_samples`` rows of everything passed to :meth:`update`.

    Bottom-k sampling: every row gets a random key (a generator seeded by ``seed`` and the
    DDP rank, restarted at each :meth:`reset`), and only the rows with the ``max_samples``
    smallest keys are kept, so memory is bounded by ``2 * max_samples`` rows per rank, and
    the same data in the same order gives the same sample every epoch. Under DDP the keys and
    rows of every rank are gathered (``dist_reduce_fx="cat"``) before the smallest keys are
    chosen, which is again a uniform sample of the union. Columns are named tensors with the
    same first dimension, e.g. ``update(features=f, labels=y)``; :meth:`compute` returns them
    as a dict (rows in key order, i.e. shuffled).
    """

    full_state_update = False

    def __init__(self, columns: tuple[str, ...], max_samples: int = 2000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be >= 1.")
        self.columns, self.max_samples, self.seed = tuple(columns), int(max_samples), int(seed)
        self.add_state("keys", default=[], dist_reduce_fx="cat")
        for name in self.columns:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self._generator: Optional[torch.Generator] = None

    def reset(self) -> None:
        super().reset()
        self._generator = None

    def _keys(self, n: int, device: torch.device) -> torch.Tensor:
        if self._generator is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
            self._generator = torch.Generator().manual_seed(mix(self.seed, 4, rank))
        # int64 keys (no float64: MPS has none), drawn on the CPU for every device alike
        return torch.randint(0, 2**62, (n,), generator=self._generator, dtype=torch.int64).to(device)

    def _smallest(self, keys: torch.Tensor, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keep = keys.argsort()[: self.max_samples]
        return keys[keep], {k: v[keep] for k, v in rows.items()}

    def update(self, **rows: torch.Tensor) -> None:  # type: ignore[override]
        if set(rows) != set(self.columns):
            raise ValueError(f"RowSample.update needs the columns {self.columns}, got {sorted(rows)}.")
        n = next(iter(rows.values())).shape[0]
        self.keys.append(self._keys(n, next(iter(rows.values())).device))
        for name, value in rows.items():
            getattr(self, name).append(value.detach())
        if sum(k.shape[0] for k in self.keys) > 2 * self.max_samples:  # compact: bounded memory
            keys, kept = self._smallest(dim_zero_cat(self.keys), {c: dim_zero_cat(getattr(self, c)) for c in self.columns})
            self.keys = [keys]
            for name, value in kept.items():
                setattr(self, name, [value])

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.keys, list) and not self.keys:  # nothing seen (after a DDP sync the states are tensors)
            return {}
        keys = dim_zero_cat(self.keys)
        if keys.numel() == 0:
            return {}
        _, kept = self._smallest(keys, {c: dim_zero_cat(getattr(self, c)) for c in self.columns})
        return kept


class SoftNeighborhoodDensity(RowSample):
    """:func:`soft_neighborhood_density` of the softmax predictions of a uniform sample of at most
    ``max_samples`` rows (see :class:`RowSample`); ``update(logits)`` with ``(N, C)`` logits."""

    def __init__(self, max_samples: int = 2000, temperature: float = 0.05, seed: int = 0, **kwargs):
        super().__init__(("probs",), max_samples=max_samples, seed=seed, **kwargs)
        self.temperature = float(temperature)

    def update(self, logits: torch.Tensor) -> None:  # type: ignore[override]
        super().update(probs=logits.float().softmax(dim=1))

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        rows = super().compute()
        if not rows:
            return torch.tensor(math.nan)
        return soft_neighborhood_density(rows["probs"], self.temperature)
