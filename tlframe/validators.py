"""Label-free model selection and domain-shift diagnostics: pure tensor functions and bounded samplers.

Validators score a model on the **unlabelled** target evaluation split, so a checkpoint can
be chosen without target labels (``--checkpoint.monitor=val/target_snd --checkpoint.mode=max``):

- :func:`prediction_entropy` (``val/target_entropy``, lower is better);
- :func:`soft_neighborhood_density` (``val/target_snd``, higher is better);
- :func:`information_maximization` (``val/target_im``, lower is better);
- :func:`deep_embedded_validation` (``val/target_dev``, lower is better), an importance-weighted
  source validation loss (the only validator that also uses the labelled source split).

Diagnostics (logged by :class:`tlframe.callbacks.TransferInsights`):

- :func:`proxy_a_distance` (``val/a_distance``) between source and target features;
- :func:`confusion_image`, a confusion matrix rendered as an image tensor (no matplotlib).

:class:`RowSample` keeps a uniform, seeded sample of at most ``max_samples`` rows of a stream
of batches (bottom-k sampling), gathered across DDP ranks like any torchmetrics state.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from tlframe.seeding import mix

__all__ = ["prediction_entropy", "soft_neighborhood_density", "information_maximization", "dev_risk",
           "deep_embedded_validation", "proxy_a_distance", "confusion_image", "RowSample", "SoftNeighborhoodDensity",
           "InformationMaximization", "DeepEmbeddedValidation"]


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


def information_maximization(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Information maximisation (IM) validator of target predictions; a scalar, lower is better.

    ``IM = 1/N sum_i H(p_i) - H(1/N sum_i p_i)`` for class probabilities ``p`` of shape
    ``(N, C)`` (:func:`prediction_entropy`, nats): the mean entropy (confidence, lower is
    better, as for ``val/target_entropy``) minus the entropy of the mean prediction
    (diversity: higher diversity lowers IM). It is minus the mutual information between a
    sample and its predicted class, so ``-log C <= IM <= 0``: ``0`` when every row is the same
    (uniform, or confidently one class for all), ``-log C`` for confident one-hot predictions
    spread evenly over all ``C`` classes. This is the sign convention of the IM loss of SHOT
    (Liang, Hu, Feng, ICML 2020; after Krause, Perona, Gomes, NIPS 2010), used as a
    validator by Musgrave, Belongie, Lim, "Benchmarking validation methods for unsupervised
    domain adaptation" (2022). Example: ``[[1, 0], [0, 1]] -> -log 2``.
    """
    probs = probs.float()
    return prediction_entropy(probs, eps).mean() - prediction_entropy(probs.mean(dim=0, keepdim=True), eps)[0]


def dev_risk(weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The control-variate estimate of Deep Embedded Validation from importance weights and losses.

    For ``N`` source validation samples with density ratios ``w_i = p_t(x_i) / p_s(x_i)`` and
    losses ``l_i`` (shapes ``(N,), (N,) -> ()``, float64):

    ``L_i = w_i l_i``, ``eta = -Cov(L, w) / Var(w)`` (unbiased, ``ddof = 1``),
    ``DEV = mean(L) + eta mean(w) - eta``.

    ``mean(L)`` estimates the target risk; ``E[w] = 1`` makes ``eta (mean(w) - 1)`` a
    zero-mean control variate that cancels most of its variance (``get_dev_risk`` of
    github.com/thuml/Deep-Embedded-Validation). Constant weights (``Var(w) = 0`` up to
    rounding) give ``eta = 0``, i.e. ``mean(L)``. Fewer than 2 samples give NaN.
    """
    w, loss = weights.detach().double().flatten(), losses.detach().double().flatten()
    if w.shape != loss.shape:
        raise ValueError(f"dev_risk: {w.shape[0]} weights for {loss.shape[0]} losses.")
    if w.numel() < 2:
        return w.new_full((), float("nan"))
    weighted = w * loss
    cov = ((weighted - weighted.mean()) * (w - w.mean())).sum() / (w.numel() - 1)
    var = w.var()
    eta = torch.where(var > 1e-12 * w.mean().square(), -cov / var, torch.zeros_like(var))
    return weighted.mean() + eta * w.mean() - eta


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int,
                  weight_decay: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit ``P(y = 1 | x) = sigmoid(((x - mean) / std) @ w + b)`` (``mean``/``std`` of ``x``, L2
    ``weight_decay`` on ``w``) full-batch with L-BFGS for ``steps`` iterations in ``x``'s dtype and device,
    with gradients enabled also inside Lightning's inference mode; returns the logit function ``(M, D) -> (M,)``."""
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.to(x.dtype).clone()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - mean) / std
        w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        b = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + weight_decay * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: ((z.to(w.dtype) - mean) / std) @ w + b


def deep_embedded_validation(source_features: torch.Tensor, source_losses: torch.Tensor,
                             target_features: torch.Tensor, steps: int = 100, weight_decay: float = 1e-3,
                             seed: int = 0) -> torch.Tensor:
    """Deep Embedded Validation (DEV): importance-weighted source validation loss; a scalar, lower is better.

    You, Wang, Chen, Long, Wang, "Towards Accurate Model Selection in Deep Unsupervised Domain
    Adaptation", ICML 2019 (github.com/thuml/Deep-Embedded-Validation). Inputs: features
    ``(N_s, D)`` and per-sample losses ``(N_s,)`` (cross-entropy) of labelled source
    validation samples, target features ``(N_t, D)``; output a float64 scalar on the CPU.

    1. A linear domain classifier (logistic regression, source = 1, target = 0 as in the
       reference, L2 ``weight_decay``, standardised features) gives
       ``s(x) = log P(source | x) / P(target | x)``. Two-fold cross-fitting: the source samples
       are split in two seeded halves and each half is weighted by the classifier fitted on the
       other half and all target samples, so no weight comes from a classifier that saw its
       sample (the reference weights held-out source validation features likewise).
    2. Density ratio ``w(x) = p_t(x) / p_s(x) = P(target | x) / P(source | x) * n_s / n_t =
       exp(-s(x)) n_s / n_t`` (``n_s``, ``n_t``: the classifier's training counts), capped at
       ``N_s`` (``E_s[w] = 1``, so one sample cannot stand for more than the whole sample; a
       held-out point far outside the fitted range would otherwise overflow to ``inf``).
    3. :func:`dev_risk` of ``w`` and the losses (control variate).

    Identical domains give ``w ~ 1`` and DEV ~ the mean source loss; source samples that look
    like the target weigh more. Separable domains give extreme weights and a noisy DEV (the
    method's known weakness). Computed in float64 on the CPU (the same on every device);
    cost: ``2 x steps`` L-BFGS iterations over ``(N_s / 2 + N_t) x D`` features. NaN for
    fewer than 2 samples of either domain.
    """
    s = source_features.detach().to("cpu", torch.float64)
    t = target_features.detach().to("cpu", torch.float64)
    n_s, n_t = s.shape[0], t.shape[0]
    if n_s < 2 or n_t < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    fold = torch.randperm(n_s, generator=torch.Generator().manual_seed(seed)) % 2
    log_w = torch.empty(n_s, dtype=torch.float64)
    for k in (0, 1):
        held, fit = fold == k, fold != k
        n_fit = int(fit.sum())
        logit = _fit_logistic(torch.cat([s[fit], t]), torch.cat([torch.ones(n_fit), torch.zeros(n_t)]), steps,
                              weight_decay)
        log_w[held] = -logit(s[held]) + math.log(n_fit / n_t)
    weights = log_w.clamp(max=math.log(n_s)).exp()  # at most n_s: no sample stands for more than the whole sample
    return dev_risk(weights, source_losses.detach().to("cpu", torch.float64))


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
    x = torch.cat([pick(source), pick(target)]).float()
    y = torch.cat([x.new_zeros(n), x.new_ones(n)])
    perm = torch.randperm(2 * n, generator=gen).to(x.device)
    train, test = perm[: n], perm[n:]
    logit = _fit_logistic(x[train], y[train], steps, weight_decay)
    err = ((logit(x[test]) > 0).float() != y[test]).float().mean()
    return 2.0 * (1.0 - 2.0 * err)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _blend(value: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    white, blue = (255, 255, 255), (8, 48, 107)
    return tuple(int(round(w + (b - w) * value)) for w, b in zip(white, blue))  # type: ignore[return-value]


def confusion_image(confmat: torch.Tensor, classes: Optional[Sequence[str]] = None, max_size: int = 480,
                    title: str = "target confusion (row-normalised)") -> torch.Tensor:
    """Render a ``(C, C)`` confusion matrix (rows: true class, columns: predicted) as a labelled ``(3, H, W)`` image in [0, 1].

    Each row is normalised to sum to 1 (per-class recall on the diagonal; an empty row stays 0)
    and drawn as a white-to-dark-blue heatmap with a grey grid; the value is printed in every cell
    that is large enough, the class names (``classes``, else ``0..C-1``) are on
    both axes (a name over 14 characters keeps its first 6 and last 7) with the axis titles "true class" and
    "predicted class", the row's image count is
    beside each name, and a colour bar (0 to 1) is on the right. The matrix is at most
    ``max_size`` pixels wide (cells of 8 to 48 pixels), so the whole image fits a TensorBoard card.
    Drawn with Pillow (no matplotlib).
    """
    from PIL import Image, ImageDraw

    c = confmat.shape[0]
    counts = confmat.long().sum(dim=1).tolist()
    m = confmat.float().cpu()
    m = (m / m.sum(dim=1, keepdim=True).clamp_min(1)).tolist()
    names = [str(n) if len(str(n)) <= 14 else f"{str(n)[:6]}~{str(n)[-7:]}"  # keep distinct endings (class_12)
             for n in (classes if classes is not None and len(classes) == c else range(c))]
    cell = int(min(48, max(8, max_size // max(c, 1))))
    font, small = _font(max(9, min(14, cell // 3 + 2))), _font(11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str, f=font) -> int:
        box = measure.textbbox((0, 0), text, font=f)
        return box[2] - box[0]

    row_labels = [f"{n} ({k})" for n, k in zip(names, counts)]
    left = 24 + max(width(t) for t in row_labels) + 8
    top = 28
    bottom = max(width(n) for n in names) + 30
    bar_w, bar_gap, bar_text = 14, 16, width("1.0", small) + 8
    w = left + c * cell + bar_gap + bar_w + bar_text + 8
    h = top + c * cell + bottom
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 6), title, fill="black", font=small)
    for i in range(c):
        for j in range(c):
            x0, y0 = left + j * cell, top + i * cell
            value = m[i][j]
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=_blend(value), outline=(160, 160, 160))
            if cell >= 28:
                text = f"{value:.2f}"
                draw.text((x0 + (cell - width(text)) / 2, y0 + cell / 2 - 7), text, font=font,
                          fill="white" if value > 0.5 else "black")
        draw.text((left - 6 - width(row_labels[i]), top + i * cell + cell / 2 - 7), row_labels[i], fill="black", font=font)
    # column names, rotated by 90 degrees, below the matrix
    for j, name in enumerate(names):
        label = Image.new("RGB", (width(name) + 4, 18), "white")
        ImageDraw.Draw(label).text((2, 1), name, fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (int(left + j * cell + cell / 2 - label.width / 2), top + c * cell + 4))
    draw.text((left + (c * cell - width("predicted class", small)) / 2, h - 16), "predicted class", fill="black",
              font=small)
    axis = Image.new("RGB", (width("true class", small) + 4, 16), "white")
    ImageDraw.Draw(axis).text((2, 1), "true class", fill="black", font=small)
    axis = axis.rotate(90, expand=True)
    img.paste(axis, (2, int(top + (c * cell - axis.height) / 2)))
    # colour bar: 1 at the top, 0 at the bottom
    bx, span = left + c * cell + bar_gap, c * cell
    for y in range(span):
        draw.line([bx, top + y, bx + bar_w, top + y], fill=_blend(1 - y / max(span - 1, 1)))
    draw.rectangle([bx, top, bx + bar_w, top + span], outline=(120, 120, 120))
    for value, y in ((1.0, top), (0.5, top + span / 2), (0.0, top + span)):
        draw.text((bx + bar_w + 4, y - 6), f"{value:.1f}", fill="black", font=small)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


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



class InformationMaximization(Metric):
    """:func:`information_maximization` of the softmax predictions of all rows passed to
    ``update(logits)`` (``(N, C)`` logits): sums of the probabilities ``(C,)``, of the row
    entropies and the row count, each summed across DDP ranks; ``compute`` gives
    ``sum H(p_i) / N - H(sum p_i / N)`` (NaN before any row)."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("prob_sum", default=torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("entropy_sum", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor) -> None:  # type: ignore[override]
        probs = logits.detach().float().softmax(dim=1)
        self.prob_sum += probs.sum(dim=0)
        self.entropy_sum += prediction_entropy(probs).sum()
        self.count += probs.shape[0]

    def compute(self) -> torch.Tensor:
        if int(self.count) == 0:
            return self.entropy_sum.new_full((), math.nan)
        mean = (self.prob_sum / self.count)[None]
        return self.entropy_sum / self.count - prediction_entropy(mean)[0]


class DeepEmbeddedValidation(Metric):
    """:func:`deep_embedded_validation` of uniform samples (:class:`RowSample`, each at most
    ``max_samples`` rows, gathered across DDP ranks) of the source validation rows
    (``update("source", features, losses)``: ``(N, D)`` features, ``(N,)`` per-sample losses)
    and the target rows (``update("target", features)``). ``compute`` runs on the CPU in
    float64 (NaN until both domains have 2 rows) and returns a float32 scalar on the metric's device."""

    full_state_update = False

    def __init__(self, max_samples: int = 2000, steps: int = 100, weight_decay: float = 1e-3, seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        self.steps, self.weight_decay, self.seed = int(steps), float(weight_decay), int(seed)
        self.source = RowSample(("features", "losses"), max_samples, seed=mix(seed, 0), **kwargs)
        self.target = RowSample(("features",), max_samples, seed=mix(seed, 1), **kwargs)

    def update(self, domain: str, features: torch.Tensor,  # type: ignore[override]
               losses: Optional[torch.Tensor] = None) -> None:
        if domain == "source" and losses is not None:
            self.source.update(features=features.float(), losses=losses.float())
        elif domain == "target":
            self.target.update(features=features.float())
        else:
            raise ValueError(f"DeepEmbeddedValidation.update: domain 'source' (with losses) or 'target', "
                             f"got {domain!r}.")

    def compute(self) -> torch.Tensor:
        nan = torch.tensor(math.nan, device=self.device)
        if not (self.source.update_called and self.target.update_called):
            return nan
        source, target = self.source.compute(), self.target.compute()  # each gathered across ranks
        if not source or not target:
            return nan
        dev = deep_embedded_validation(source["features"], source["losses"], target["features"], steps=self.steps,
                                       weight_decay=self.weight_decay, seed=self.seed)
        return dev.float().to(self.device)

    def reset(self) -> None:
        super().reset()
        self.source.reset()
        self.target.reset()
