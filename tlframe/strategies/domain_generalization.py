"""Domain generalisation: DomainBed's algorithms as tlframe strategies.

Reference: Gulrajani & Lopez-Paz, *In Search of Lost Domain Generalization*, ICLR 2021, and its code
(``facebookresearch/DomainBed``: ``domainbed/algorithms.py`` for the semantics, ``domainbed/hparams_registry.py``
for the defaults, which every class below takes as its own). MixStyle follows Zhou et al., ICLR 2021
(``KaiyangZhou/mixstyle-release``).

**Batches.** DomainBed gives each update one minibatch per training domain. In tlframe the source tensors of a
:class:`~tlframe.strategies.TransferStep` hold the training domains' rows concatenated (one forward pass), with
``step.d_s`` each row's domain index (``None``: one domain) and ``step.source_domains()`` the rows of each domain.
Per-domain quantities are computed over those rows; a domain without rows in a batch (possible under DDP
sharding) is left out of the per-domain means and penalties. A single-source run is one domain: the penalties
that compare domains are then 0 and each method is ERM.

**Differences from DomainBed** (each also noted in its class):

- One forward pass of the concatenated batch. DomainBed's MMD, CORAL and GroupDRO run the featurizer once per
  domain; the two agree unless the network has BatchNorm in training mode (DomainBed's ResNets freeze BN, its
  MNIST CNN uses GroupNorm), where tlframe normalises with the statistics of the joint batch.
- The classification loss honours ``label_smoothing`` and ``class_weights`` (defaults: off, DomainBed's plain
  cross-entropy). ``label_shift`` needs target data and is refused.
- Every schedule (IRM/V-REx annealing, DANN's alternation) is a function of the trainer's ``global_step`` (the
  number of optimizer updates done, DomainBed's ``update_count``), so it survives resume; there is no counter
  buffer. IRM/V-REx restart the optimizer through :meth:`~tlframe.strategies.Strategy.reset_optimizers_now`.
- The optimizer is ``model.optimizer`` (DomainBed: Adam, ``lr`` 1e-3 on the small images, 5e-5 on the others,
  ``weight_decay`` 0; tlframe's default is SGD): set ``model.optimizer: torch.optim.Adam`` for parity.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from tlframe.checks import ConfigError, check_number
from tlframe.losses import (DOMAINBED_MMD_GAMMAS, coral_domainbed, gaussian_mmd_domainbed, group_dro_weights,
                            irm_penalty, mixstyle, vrex_penalty)
from tlframe.optim import ParamGroup
from tlframe.strategies.base import Progress, StrategyOutput, TransferStep
from tlframe.strategies.finetune import FineTune

__all__ = ["ERM", "DomainCORAL", "DomainMMD", "IRM", "VREx", "GroupDRO", "DomainAdversarial", "DomainBedMLP",
           "MixStyle", "MixStyleHook", "feature_stages", "feature_stage"]

FeatureKind = Literal["backbone", "bottleneck"]


def _features(step: TransferStep, kind: str) -> torch.Tensor:
    """The features a DG penalty reads: the backbone's ``z_s`` (DomainBed's featurizer output) or the
    bottleneck's ``f_s``."""
    return step.z_s if kind == "backbone" else step.f_s


def _check_features(kind: str) -> None:
    if kind not in ("backbone", "bottleneck"):
        raise ConfigError(f"features={kind!r} must be 'backbone' (the backbone output z, DomainBed's featurizer "
                          "features) or 'bottleneck' (the bottleneck features f)")


class ERM(FineTune):
    """Empirical risk minimisation (Vapnik 1998; DomainBed's ``ERM``): the mean cross-entropy over the
    concatenated training domains' batch, ``1/N sum_i CE(logits_i, y_i)``.

    DomainBed's baseline, and exactly :class:`FineTune` (this class adds nothing: it names the baseline in a DG
    table). Every :class:`FineTune` argument applies (``backbone_lr_mult`` is 0.1 by default; DomainBed trains the
    whole network with one learning rate: set ``backbone_lr_mult: 1.0`` for parity).
    """


class _DomainwiseRisk(FineTune):
    """Shared parts of the DG strategies that compare the training domains: per-domain risks, the refusal of
    ``label_shift``, the regularisers' losses. ``**kwargs``: the :class:`FineTune` arguments."""

    own_losses: tuple[str, ...] = ("cls", "penalty")

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.label_shift != "none":
            raise ConfigError(f"{type(self).__name__} trains on the source domains only: label_shift: "
                              f"{self.label_shift} needs target data; set label_shift: none")

    def per_sample_loss(self, step: TransferStep) -> torch.Tensor:
        """Cross-entropy of every source row ``(N,)``, float32 (``label_smoothing``; times ``class_weights``)."""
        ce = F.cross_entropy(step.logits_s.float(), step.y_s, reduction="none", label_smoothing=self.label_smoothing)
        if self.class_weights != "none":
            ce = self.class_weight[step.y_s] * ce
        return ce

    @staticmethod
    def present_domains(step: TransferStep, min_rows: int = 1) -> list[tuple[int, torch.Tensor]]:
        """``[(domain index, row indices)]`` of the domains with at least ``min_rows`` rows in this batch."""
        return [(i, rows) for i, rows in enumerate(step.source_domains()) if rows.numel() >= min_rows]

    def domain_risks(self, step: TransferStep) -> torch.Tensor:
        """Each present domain's mean loss ``(P,)`` (DomainBed's per-minibatch ``F.cross_entropy``)."""
        ce = self.per_sample_loss(step)
        return torch.stack([ce[rows].mean() for _, rows in self.present_domains(step)])

    def finish(self, out: StrategyOutput, step: TransferStep) -> StrategyOutput:
        self.add_regularization(out, step)
        return out


# --------------------------------------------------------------------------------------------- CORAL / MMD
class _PairwiseAlignment(_DomainwiseRisk):
    """DomainBed's ``AbstractMMD``: ``loss = mean_m CE_m + mmd_gamma * mean_{i<j} dist(phi_i, phi_j)``."""

    #: domains with fewer rows than this are left out of the penalty
    min_rows: int = 1

    def __init__(self, mmd_gamma: float = 1.0, features: FeatureKind = "backbone", **kwargs: Any):
        super().__init__(**kwargs)
        check_number("mmd_gamma", mmd_gamma, low=0)
        _check_features(features)
        self.mmd_gamma = float(mmd_gamma)
        self.features = features

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, step: TransferStep) -> StrategyOutput:
        feats = _features(step, self.features)
        groups = [feats[rows] for _, rows in self.present_domains(step, self.min_rows)]
        pairs = [self.distance(groups[i], groups[j]) for i in range(len(groups)) for j in range(i + 1, len(groups))]
        penalty = torch.stack(pairs).mean() if pairs else feats.new_zeros((), dtype=torch.float32)
        out = StrategyOutput(losses={"cls": self.domain_risks(step).mean(), "penalty": penalty},
                             weights={"penalty": self.mmd_gamma})
        return self.finish(out, step)


class DomainCORAL(_PairwiseAlignment):
    """Deep CORAL across the training domains (Sun & Saenko, ECCV-W 2016; DomainBed's ``CORAL``).

    ``loss = 1/M sum_m CE_m + mmd_gamma * 2/(M(M-1)) sum_{i<j} coral(phi_i, phi_j)`` with ``CE_m`` the mean
    cross-entropy of domain ``m``'s rows, ``phi_m`` its features (``(n_m, D)``) and
    :func:`~tlframe.losses.coral_domainbed` ``= mean_j (mu_i - mu_j)^2 + mean_jk (C_i - C_j)^2`` (unbiased
    covariances ``C = (phi - mu)^T (phi - mu) / (n - 1)``). Logs ``train/loss_penalty`` (the mean pairwise
    distance) and ``train/loss_cls`` (the mean of the domains' risks).

    A domain with fewer than 2 rows in the batch has no covariance and is left out of the penalty (DomainBed
    would divide by zero); fewer than 2 such domains (one source) give a penalty of 0.

    Args:
        mmd_gamma: penalty weight (DomainBed ``mmd_gamma``: 1.0).
        features: ``"backbone"`` (default; ``z``, DomainBed's featurizer output) or ``"bottleneck"`` (``f``).
        ``**kwargs``: the :class:`FineTune` arguments.
    """

    min_rows = 2

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return coral_domainbed(x, y)


class DomainMMD(_PairwiseAlignment):
    """MMD across the training domains (Li et al., CVPR 2018, MMD-AAE's penalty; DomainBed's ``MMD``).

    ``loss = 1/M sum_m CE_m + mmd_gamma * 2/(M(M-1)) sum_{i<j} MMD^2(phi_i, phi_j)`` with
    :func:`~tlframe.losses.gaussian_mmd_domainbed`: the biased estimate with the kernel
    ``sum_g exp(-g ||a - b||^2)``, ``g`` in ``gammas`` (DomainBed: 0.001, 0.01, ..., 1000). Logs
    ``train/loss_penalty`` and ``train/loss_cls`` as :class:`DomainCORAL`. One source: penalty 0.

    Args:
        mmd_gamma: penalty weight (DomainBed ``mmd_gamma``: 1.0).
        gammas: the kernel bandwidths (DomainBed's fixed list by default).
        features: ``"backbone"`` (default; DomainBed's featurizer output) or ``"bottleneck"``.
        ``**kwargs``: the :class:`FineTune` arguments.
    """

    def __init__(self, mmd_gamma: float = 1.0, gammas: Sequence[float] = DOMAINBED_MMD_GAMMAS,
                 features: FeatureKind = "backbone", **kwargs: Any):
        super().__init__(mmd_gamma=mmd_gamma, features=features, **kwargs)
        gammas = tuple(gammas)
        if not gammas:
            raise ConfigError("gammas must list at least one kernel bandwidth, e.g. [0.001, 0.01, 0.1, 1, 10, 100, 1000]")
        for i, g in enumerate(gammas):
            check_number(f"gammas[{i}]", g, low=0, low_open=True)
        self.gammas = tuple(float(g) for g in gammas)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gaussian_mmd_domainbed(x, y, self.gammas)


# --------------------------------------------------------------------------------------------- IRM / V-REx
class _AnnealedPenalty(_DomainwiseRisk):
    """``loss = risk + w(step) * penalty`` with ``w = penalty_lambda`` from ``anneal_iters`` updates on, 1 before,
    and a fresh optimizer state exactly when the weight switches (DomainBed's IRM and V-REx)."""

    def __init__(self, penalty_lambda: float, anneal_iters: int, rescale_loss: bool, names: tuple[str, str],
                 **kwargs: Any):
        super().__init__(**kwargs)
        check_number(names[0], penalty_lambda, low=0)
        check_number(names[1], anneal_iters, low=0, integer=True)
        self.penalty_lambda = float(penalty_lambda)
        self.anneal_iters = int(anneal_iters)
        self.rescale_loss = bool(rescale_loss)

    def penalty_weight(self, progress: Progress) -> float:
        """``penalty_lambda`` once ``progress.step`` (updates done) reaches ``anneal_iters``, else 1.0."""
        return self.penalty_lambda if progress.step >= self.anneal_iters else 1.0

    def reset_optimizers_now(self, progress: Progress) -> bool:
        """True exactly at ``progress.step == anneal_iters`` (> 0): DomainBed builds a new Adam there."""
        return self.anneal_iters > 0 and progress.step == self.anneal_iters

    def output(self, risk: torch.Tensor, penalty: torch.Tensor, step: TransferStep) -> StrategyOutput:
        w = self.penalty_weight(step.progress)
        scale = 1.0 / w if self.rescale_loss and w > 1.0 else 1.0
        out = StrategyOutput(losses={"cls": risk, "penalty": penalty}, weights={"cls": scale, "penalty": w * scale},
                             logs={"penalty_weight": w})
        return self.finish(out, step)


class IRM(_AnnealedPenalty):
    """Invariant risk minimisation, IRMv1 (Arjovsky et al. 2019; DomainBed's ``IRM``).

    Per present domain ``m``: ``CE_m`` (mean cross-entropy of its rows) and ``P_m`` =
    :func:`~tlframe.losses.irm_penalty` (the product of the gradients of the cross-entropy w.r.t. a dummy
    classifier scale at 1.0 on the domain's even and odd rows)::

        loss = 1/M sum_m CE_m + w * 1/M sum_m P_m,   w = irm_lambda if global_step >= irm_penalty_anneal_iters else 1

    ``global_step`` is the number of updates done (DomainBed's ``update_count``). The optimizer state is cleared
    before the update at ``global_step == irm_penalty_anneal_iters`` (DomainBed builds a new Adam there). Logs
    ``train/loss_cls`` (the nll), ``train/loss_penalty`` and ``train/penalty_weight``.

    A domain with a single row in the batch has no second half: it counts in the nll, not in the penalty. The
    penalty uses the plain cross-entropy (no label smoothing or class weights, as DomainBed).

    Args:
        irm_lambda: penalty weight after the annealing (DomainBed: 100).
        irm_penalty_anneal_iters: updates with weight 1 first (DomainBed: 500).
        rescale_loss: divide the loss by ``w`` when ``w > 1`` (the IRM authors' ColoredMNIST script keeps
            gradients in range so). Off by default: DomainBed does not rescale.
        ``**kwargs``: the :class:`FineTune` arguments.
    """

    def __init__(self, irm_lambda: float = 100.0, irm_penalty_anneal_iters: int = 500, rescale_loss: bool = False,
                 **kwargs: Any):
        super().__init__(irm_lambda, irm_penalty_anneal_iters, rescale_loss,
                         ("irm_lambda", "irm_penalty_anneal_iters"), **kwargs)

    def compute(self, step: TransferStep) -> StrategyOutput:
        logits = step.logits_s
        penalties = [irm_penalty(logits[rows], step.y_s[rows]) for _, rows in self.present_domains(step, 2)]
        penalty = torch.stack(penalties).mean() if penalties else logits.new_zeros((), dtype=torch.float32)
        return self.output(self.domain_risks(step).mean(), penalty, step)


class VREx(_AnnealedPenalty):
    """Variance risk extrapolation, V-REx (Krueger et al., ICML 2021; DomainBed's ``VREx``).

    With ``L = (CE_1, ..., CE_M)`` the present domains' mean cross-entropies::

        loss = mean(L) + w * mean((L - mean(L))^2),   w = vrex_lambda if global_step >= vrex_penalty_anneal_iters else 1

    (:func:`~tlframe.losses.vrex_penalty`); the optimizer state is cleared at the switch, as for :class:`IRM`.
    Logs ``train/loss_cls`` (the mean risk), ``train/loss_penalty`` and ``train/penalty_weight``. One domain:
    penalty 0.

    Args:
        vrex_lambda: penalty weight after the annealing (DomainBed: 10).
        vrex_penalty_anneal_iters: updates with weight 1 first (DomainBed: 500).
        rescale_loss: divide the loss by ``w`` when ``w > 1``; off by default (DomainBed does not).
        ``**kwargs``: the :class:`FineTune` arguments.
    """

    def __init__(self, vrex_lambda: float = 10.0, vrex_penalty_anneal_iters: int = 500, rescale_loss: bool = False,
                 **kwargs: Any):
        super().__init__(vrex_lambda, vrex_penalty_anneal_iters, rescale_loss,
                         ("vrex_lambda", "vrex_penalty_anneal_iters"), **kwargs)

    def compute(self, step: TransferStep) -> StrategyOutput:
        risks = self.domain_risks(step)
        return self.output(risks.mean(), vrex_penalty(risks), step)


# --------------------------------------------------------------------------------------------- Group DRO
class GroupDRO(_DomainwiseRisk):
    """Group distributionally robust optimisation (Sagawa et al., ICLR 2020, Algorithm 1; DomainBed's ``GroupDRO``).

    Weights ``q`` over the ``M`` training domains, ones before the first update; each update first moves them,
    then weights the risks (DomainBed's order)::

        q_m <- q_m exp(groupdro_eta * CE_m),  q <- q / sum(q)        (tlframe.losses.group_dro_weights)
        loss = sum_m q_m CE_m

    A domain without rows in the batch keeps its unnormalised weight and adds no risk. Logs ``train/loss_cls``
    (the weighted risk) and ``train/q_<m>`` per domain.

    ``q`` is a buffer sized at the first update from ``step.num_source_domains`` and saved as the strategy's
    extra state (``strategy._extra_state`` in the state dict: a size-free entry, so a fresh model loads a run's
    weights before it has seen a batch), so resume continues with the run's weights exactly.

    **DDP.** DomainBed runs in one process. Under DDP the per-domain risks of the ``q`` update are all-reduced
    (summed cross-entropies and row counts over the ranks), so every rank makes the same update, the one of the
    global batch; the loss weights each rank's own per-domain risks by that ``q``.

    Args:
        groupdro_eta: step size of the weights (DomainBed: 0.01).
        ``**kwargs``: the :class:`FineTune` arguments.
    """

    own_losses = ("cls",)

    def __init__(self, groupdro_eta: float = 1e-2, **kwargs: Any):
        super().__init__(**kwargs)
        check_number("groupdro_eta", groupdro_eta, low=0)
        self.groupdro_eta = float(groupdro_eta)
        self.register_buffer("q", torch.ones(0), persistent=False)

    def get_extra_state(self) -> dict:
        return {"q": self.q.detach().cpu().clone()}

    def set_extra_state(self, state: Any) -> None:
        q = state.get("q") if isinstance(state, dict) else None
        if not isinstance(q, torch.Tensor) or q.ndim != 1:
            raise ValueError(f"GroupDRO: the checkpoint's extra state {state!r} holds no weight vector 'q'")
        with torch.no_grad():
            self.q.resize_(q.shape).copy_(q)

    def compute(self, step: TransferStep) -> StrategyOutput:
        m = step.num_source_domains if step.d_s is not None else 1
        if self.q.numel() == 0:
            with torch.no_grad():
                self.q.resize_(m).fill_(1.0)
        elif self.q.numel() != m:
            raise ConfigError(f"GroupDRO: the run has {m} training domains but the weights q have {self.q.numel()} "
                              "entries (a checkpoint of another data set?): resume with the data of the run")
        ce = self.per_sample_loss(step)
        domains = step.source_domains()
        risks = torch.stack([ce[rows].mean() if rows.numel() else ce.new_zeros(()) for rows in domains])
        with torch.no_grad():
            sums = torch.stack([ce[rows].sum() for rows in domains]).detach()
            counts = torch.tensor([float(rows.numel()) for rows in domains], device=ce.device, dtype=ce.dtype)
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                both = torch.stack([sums, counts])
                torch.distributed.all_reduce(both)
                sums, counts = both[0], both[1]
            global_risks = torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))
            self.q.copy_(group_dro_weights(self.q, global_risks, self.groupdro_eta).to(self.q.dtype))
        out = StrategyOutput(losses={"cls": (self.q.to(risks.dtype) * risks).sum()},
                             logs={f"q_{i}": float(v) for i, v in enumerate(self.q.tolist())})
        return self.finish(out, step)


# --------------------------------------------------------------------------------------------- DANN / CDANN
class DomainBedMLP(nn.Module):
    """DomainBed's ``networks.MLP``: ``Linear(D, W) - Dropout - ReLU``, ``depth - 2`` times
    ``Linear(W, W) - Dropout - ReLU``, then ``Linear(W, out)``; ``(N, D) -> (N, out)``.

    ``out_features=None`` leaves the output layer to :meth:`build_output` (its width, the number of training
    domains, may be known only when the data is set up)."""

    def __init__(self, in_features: int, out_features: Optional[int], width: int = 256, depth: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        self.input = nn.Linear(in_features, width)
        self.dropout = nn.Dropout(dropout)
        self.hiddens = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 2)])
        self.output: Optional[nn.Linear] = None
        if out_features is not None:
            self.build_output(out_features)

    def build_output(self, out_features: int) -> None:
        self.output = nn.Linear(self.input.out_features, out_features).to(self.input.weight.device)

    @property
    def out_features(self) -> Optional[int]:
        return None if self.output is None else self.output.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dropout(self.input(x)))
        for hidden in self.hiddens:
            x = F.relu(self.dropout(hidden(x)))
        return self.output(x)


class DomainAdversarial(FineTune):
    """Domain-adversarial training across the training domains: DomainBed's ``DANN`` (Ganin et al., JMLR 2016)
    and, with ``conditional: true``, ``CDANN`` (Li et al., ECCV 2018).

    A discriminator :class:`DomainBedMLP` ``D`` classifies each row's training domain ``d_i`` from its features
    ``phi_i`` (the backbone output ``z``, DomainBed's featurizer features, or the bottleneck's ``f``); CDANN adds a
    learned class embedding, ``D(phi_i + E[y_i])``, and weights the rows by ``1 / (n_{y_i} K)`` (``n_c`` the rows
    of class ``c`` in the batch, ``K`` = the largest label in the batch + 1, DomainBed's ``one_hot`` width)::

        disc = mean_i CE(D(h_i), d_i)          (CDANN: sum_i CE(D(h_i), d_i) / (n_{y_i} K))
             + grad_penalty * mean_i ||d/dh_i sum_j CE(D(h_j), d_j)||^2
        update u = global_step + 1 (DomainBed's update_count, incremented before its test):
          u % (1 + d_steps_per_g_step) < d_steps_per_g_step:  discriminator step on  disc
          otherwise:                                          generator step on  CE_cls - lambda_ * disc

    ``CE_cls`` is the mean cross-entropy of the concatenated batch. Alternating updates, no gradient reversal:
    Lightning's manual optimization with two optimizers (:meth:`optimizer_groups`), ``generator`` (backbone and
    head) and ``discriminator`` (``D`` and ``E``), one of them stepping per batch. Each batch is one optimizer step,
    so ``global_step`` is the number of batches done and the alternation survives resume. The first update is a
    generator step (``u = 1``), as in DomainBed. Both optimizers are built from ``model.optimizer``; DomainBed's
    Adam has ``betas = (beta1, 0.9)`` in both (set here as group overrides, ignored by optimizers without betas),
    ``lr_d = lr_g = lr`` and ``weight_decay_d = weight_decay_g = 0`` (the generator's weight decay is
    ``model.weight_decay``: set it to 0 for parity). Logs ``train/loss_disc`` (the discriminator's loss without the
    gradient penalty), ``train/loss_cls`` (generator steps), ``train/loss_grad_penalty`` (if ``grad_penalty > 0``),
    ``train/domain_acc`` and ``train/discriminator_step`` (1 or 0).

    As in DomainBed both backward passes reach every parameter (the discriminator step computes, but does not
    apply, the generator's gradients; the head enters it with weight 0), so DDP needs no
    ``find_unused_parameters``.

    Args:
        conditional: CDANN (class-conditional discriminator input, class-balanced discriminator loss).
        lambda_: weight of the adversarial term in the generator's loss (DomainBed ``lambda``: 1.0).
        d_steps_per_g_step: discriminator updates per generator update (DomainBed: 1).
        grad_penalty: weight of the gradient penalty on the discriminator's input (DomainBed: 0).
        mlp_width, mlp_depth, mlp_dropout: the discriminator (DomainBed: 256, 3, 0.0).
        beta1: first Adam beta of both optimizers (DomainBed: 0.5; second beta 0.9); ``None`` keeps the
            optimizer's own betas.
        weight_decay_d: the discriminator's weight decay (DomainBed: 0); ``None``: ``model.weight_decay``.
        discriminator_lr_mult: the discriminator's LR multiplier (DomainBed's ``lr_d / lr``: 1).
        features: ``"backbone"`` (default, DomainBed) or ``"bottleneck"``.
        num_domains: the number of training domains (the discriminator's outputs). ``None`` (default): read at
            setup from the data module's ``num_source_domains`` (one domain if it has none). Give it to load a
            checkpoint without a data module (``TransferModule.load_from_checkpoint``).
        ``**kwargs``: the :class:`FineTune` arguments (not ``regularization`` or ``label_shift``).
    """

    manual_optimization = True

    def __init__(self, conditional: bool = False, lambda_: float = 1.0, d_steps_per_g_step: int = 1,
                 grad_penalty: float = 0.0, mlp_width: int = 256, mlp_depth: int = 3, mlp_dropout: float = 0.0,
                 beta1: Optional[float] = 0.5, weight_decay_d: Optional[float] = 0.0,
                 discriminator_lr_mult: float = 1.0, features: FeatureKind = "backbone",
                 num_domains: Optional[int] = None, **kwargs: Any):
        super().__init__(**kwargs)
        check_number("lambda_", lambda_, low=0)
        check_number("d_steps_per_g_step", d_steps_per_g_step, low=1, integer=True)
        check_number("grad_penalty", grad_penalty, low=0)
        check_number("mlp_width", mlp_width, low=1, integer=True)
        check_number("mlp_depth", mlp_depth, low=2, integer=True)
        check_number("mlp_dropout", mlp_dropout, low=0, high=1, high_open=True)
        if beta1 is not None:
            check_number("beta1", beta1, low=0, high=1, high_open=True)
        if weight_decay_d is not None:
            check_number("weight_decay_d", weight_decay_d, low=0)
        check_number("discriminator_lr_mult", discriminator_lr_mult, low=0)
        _check_features(features)
        if num_domains is not None:
            check_number("num_domains", num_domains, low=1, integer=True)
        if len(self.regularization) or self.label_shift != "none":
            raise ConfigError("DomainAdversarial makes its own updates (discriminator and generator steps) and trains "
                              "on the source domains only: remove regularization and set label_shift: none")
        self.conditional = bool(conditional)
        self.lambda_ = float(lambda_)
        self.d_steps_per_g_step = int(d_steps_per_g_step)
        self.grad_penalty = float(grad_penalty)
        self.mlp_width, self.mlp_depth, self.mlp_dropout = int(mlp_width), int(mlp_depth), float(mlp_dropout)
        self.beta1 = None if beta1 is None else float(beta1)
        self.weight_decay_d = None if weight_decay_d is None else float(weight_decay_d)
        self.discriminator_lr_mult = float(discriminator_lr_mult)
        self.features = features
        self.num_domains = None if num_domains is None else int(num_domains)
        self.discriminator: Optional[DomainBedMLP] = None
        self.class_embeddings: Optional[nn.Embedding] = None

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        dim = backbone.num_features if self.features == "backbone" else head.out_features
        self.discriminator = DomainBedMLP(dim, self.num_domains, self.mlp_width, self.mlp_depth, self.mlp_dropout)
        if self.conditional:
            self.class_embeddings = nn.Embedding(num_classes, dim)

    def on_setup(self, stage: str, datamodule: Any) -> None:
        super().on_setup(stage, datamodule)
        count = getattr(datamodule, "num_source_domains", None)
        count = count() if callable(count) else count
        have = self.discriminator.out_features
        if count is not None and self.num_domains is not None and int(count) != self.num_domains:
            raise ConfigError(f"DomainAdversarial.num_domains={self.num_domains} but the data has {count} training "
                              "domains: set num_domains to the number of sources (or leave it unset)")
        if have is None:
            self.discriminator.build_output(int(count) if count is not None else 1)
        elif count is not None and int(count) != have:
            raise ConfigError(f"DomainAdversarial's discriminator has {have} outputs but the data has {count} "
                              "training domains: train, resume and evaluate with the same domains")

    def optimizer_groups(self, backbone: nn.Module, head: nn.Module) -> list[tuple[str, list[ParamGroup]]]:
        if self.discriminator.output is None:
            raise ConfigError("DomainAdversarial does not know the number of training domains yet: set num_domains, "
                              "or train with a data module (MultiDomainDataModule gives num_source_domains)")
        betas = {} if self.beta1 is None else {"betas": (self.beta1, 0.9)}
        generator = [{**g, **betas} for g in self.param_groups(backbone, head)]
        params = list(self.discriminator.parameters())
        if self.class_embeddings is not None:
            params += list(self.class_embeddings.parameters())
        disc = {"name": "discriminator", "params": params, "lr_mult": self.discriminator_lr_mult, **betas}
        if self.weight_decay_d is not None:
            disc["weight_decay"] = self.weight_decay_d
        return [("generator", generator), ("discriminator", [disc])]

    def is_discriminator_step(self, progress: Progress) -> bool:
        """Whether the update at ``progress`` trains the discriminator: DomainBed's
        ``update_count % (1 + d_steps_per_g_step) < d_steps_per_g_step`` with ``update_count = global_step + 1``."""
        return (progress.step + 1) % (1 + self.d_steps_per_g_step) < self.d_steps_per_g_step

    def discriminator_losses(self, step: TransferStep) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({"disc": ..., ["grad_penalty": ...]}, domain accuracy)`` of one batch."""
        feats = _features(step, self.features)
        labels = step.d_s if step.d_s is not None else torch.zeros_like(step.y_s)
        width = self.discriminator.out_features
        if step.num_source_domains > width or (labels.numel() and int(labels.max()) >= width):
            raise ConfigError(f"DomainAdversarial's discriminator has {width} outputs but the batch has "
                              f"{step.num_source_domains} training domains: set num_domains to the number of sources")
        disc_input = feats + self.class_embeddings(step.y_s) if self.conditional else feats
        disc_out = self.discriminator(disc_input).float()
        ce = F.cross_entropy(disc_out, labels, reduction="none")
        if self.conditional:
            counts = torch.bincount(step.y_s)
            disc = (ce / (counts[step.y_s] * counts.numel()).float()).sum()
        else:
            disc = ce.mean()
        losses = {"disc": disc}
        if self.grad_penalty > 0:
            (grad,) = torch.autograd.grad(ce.sum(), [disc_input], create_graph=True)
            losses["grad_penalty"] = (grad.float() ** 2).sum(dim=1).mean()
        with torch.no_grad():
            acc = (disc_out.argmax(dim=1) == labels).float().mean()
        return losses, acc

    def manual_step(self, module: Any, batch: dict) -> StrategyOutput:
        step = module.transfer_step(batch)
        opt_g, opt_d = module.optimizers()
        losses, acc = self.discriminator_losses(step)
        gp = {"grad_penalty": self.grad_penalty} if "grad_penalty" in losses else {}
        if self.is_discriminator_step(step.progress):
            out = StrategyOutput(losses=losses, weights=dict(gp), logs={"domain_acc": acc, "discriminator_step": 1.0})
            stepped, idle = opt_d, opt_g
            loss = out.total() + 0.0 * step.logits_s.sum()  # the head takes part too (DDP: every parameter used)
        else:
            out = StrategyOutput(losses={"cls": self.classification_loss(step), **losses},
                                 weights={"disc": -self.lambda_, **{k: -self.lambda_ * w for k, w in gp.items()}},
                                 logs={"domain_acc": acc, "discriminator_step": 0.0})
            stepped, idle = opt_g, opt_d
            loss = out.total()
        module.record_step_losses(out)
        opt_g.zero_grad()
        opt_d.zero_grad()
        module.manual_backward(loss)
        idle.zero_grad(set_to_none=True)  # computed (as DomainBed's backward does) but not applied
        stepped.step()
        return StrategyOutput(losses={k: v.detach() for k, v in out.losses.items()}, weights=out.weights,
                              logs=out.logs)


# --------------------------------------------------------------------------------------------- MixStyle
def feature_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's feature stages in forward order, ``[(name, module)]``: ``stages[i]`` (tlframe's digit
    networks, ConvNeXt, CSPNet, NFNet, ...), ``layer1 ... layer4`` (ResNet, ResNeXt, Res2Net, ...), ``s1 ... s4``
    (RegNet) or ``blocks[i]`` (EfficientNet, MobileNet). Raises :class:`ConfigError` for a model whose stages
    produce no feature maps (vision transformers) or whose stages it cannot find."""
    name = type(backbone).__name__
    if hasattr(backbone, "patch_embed"):
        raise ConfigError(f"MixStyle mixes the channel statistics of (N, C, H, W) feature maps; the backbone {name} "
                          "is a vision transformer (token sequences): use a convolutional backbone")
    stages = getattr(backbone, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages):
        return [(f"stages.{i}", m) for i, m in enumerate(stages)]
    for prefix, start in (("layer", 1), ("s", 1)):
        found = []
        while isinstance(getattr(backbone, f"{prefix}{start + len(found)}", None), nn.Module):
            found.append((f"{prefix}{start + len(found)}", getattr(backbone, f"{prefix}{start + len(found)}")))
        if found:
            return found
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        return [(f"blocks.{i}", m) for i, m in enumerate(blocks)]
    raise ConfigError(f"MixStyle cannot find the feature stages of the backbone {name} (no 'stages', 'layer1', 's1' "
                      "or 'blocks'): use a ResNet-, ConvNeXt-, EfficientNet-style or tlframe digit backbone")


def feature_stage(backbone: nn.Module, index: int) -> tuple[str, nn.Module]:
    """``(name, module)`` of the ``index``-th feature stage (:func:`feature_stages`; 0 is the first stage after the
    stem for timm models, ``stages[0]`` for the digit networks)."""
    stages = feature_stages(backbone)
    if not 0 <= index < len(stages):
        raise ConfigError(f"MixStyle stage {index} does not exist: the backbone {type(backbone).__name__} has "
                          f"{len(stages)} feature stages ({', '.join(n for n, _ in stages)}), numbered 0 to "
                          f"{len(stages) - 1}")
    return stages[index]


class MixStyleHook:
    """A forward hook that applies MixStyle to a stage's output (see :class:`MixStyle`).

    A plain picklable object holding only its settings (no reference to the strategy or the model), so a model
    with these hooks survives ``copy.deepcopy`` (timm's ``ModelEmaV3``) and pickling. Draws from torch's global
    CPU generator (which the module reseeds every step): ``u ~ U[0, 1)`` (mix iff ``u < p``), ``lam ~ Beta(alpha,
    alpha)`` per row, then the permutation.
    """

    def __init__(self, p: float, alpha: float, eps: float, mix: str, where: str):
        self.p, self.alpha, self.eps, self.mix, self.where = float(p), float(alpha), float(eps), mix, where

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not module.training or self.p <= 0:
            return None
        if not isinstance(output, torch.Tensor) or output.ndim != 4 or output.shape[2] * output.shape[3] < 2:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ConfigError(f"MixStyle at {self.where}: the stage gives {shape}, not feature maps (N, C, H, W) with "
                              "at least 2 positions: choose earlier stages (MixStyle.stages)")
        if float(torch.rand(())) >= self.p:
            return None
        n = output.shape[0]
        lam = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha)).sample((n,))
        perm = self.permutation(n)
        return mixstyle(output, lam, perm, self.eps)

    def permutation(self, n: int) -> torch.Tensor:
        """``random``: a random permutation of the rows; ``crossdomain``: the rows of each half of the batch get
        partners from the other half, shuffled within it (the reference's ``MixStyle2``; an odd last row keeps
        its own statistics)."""
        if self.mix == "random":
            return torch.randperm(n)
        h = n // 2
        first = torch.arange(h, 2 * h)[torch.randperm(h)]   # partners of rows 0 .. h-1
        second = torch.arange(0, h)[torch.randperm(h)]      # partners of rows h .. 2h-1
        return torch.cat([first, second, torch.arange(2 * h, n)])


class MixStyle(FineTune):
    """MixStyle (Zhou et al., ICLR 2021): ERM with the feature statistics of the training rows mixed after chosen
    backbone stages.

    After each stage in ``stages``, in training mode and with probability ``p`` per forward pass, the output
    ``x (N, C, H, W)`` becomes :func:`~tlframe.losses.mixstyle` ``(x, lam, perm)``: instance-normalised with its own
    (detached) per-channel mean and ``sqrt(var + eps)`` over ``H, W``, re-scaled with
    ``lam mu + (1 - lam) mu[perm]`` and ``lam sig + (1 - lam) sig[perm]``, ``lam ~ Beta(alpha, alpha)`` per row.
    ``perm``: ``"random"`` (any row) or ``"crossdomain"`` (the two halves of the batch swap, each shuffled: with
    two training domains of equal batch size, as tlframe's multi-domain batches are, each row mixes with the other
    domain; with more domains the halves are the first and last domains' rows). Evaluation is untouched. The
    loss is ERM's (:class:`ERM`).

    Stages are numbered by :func:`feature_stages`: ``stages[i]`` of tlframe's digit networks and ConvNeXt,
    ``layer{i+1}`` of a ResNet, ``blocks[i]`` of an EfficientNet (not the ``group_matcher`` numbering of
    ``FineTune.freeze_stages``, where 0 is the stem). The paper's ResNet setting (after ``layer1`` and ``layer2``)
    is the default ``[0, 1]``. The layers are forward hooks (:class:`MixStyleHook`): the state dict is unchanged.
    Random draws come from torch's global generator, reseeded by the module every step (resume-exact).

    Args:
        stages: feature stages after which to mix (default ``[0, 1]``).
        p: probability of mixing at each stage and forward pass (paper: 0.5).
        alpha: ``Beta(alpha, alpha)`` of the mixing weights (paper: 0.1).
        eps: added to the variance (1e-6).
        mix: ``"random"`` (default) or ``"crossdomain"``.
        ``**kwargs``: the :class:`FineTune` arguments.
    """

    def __init__(self, stages: Optional[list[int]] = None, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6,
                 mix: Literal["random", "crossdomain"] = "random", **kwargs: Any):
        super().__init__(**kwargs)
        stages = [0, 1] if stages is None else list(stages)
        if not stages:
            raise ConfigError("MixStyle.stages is empty: name at least one feature stage, e.g. [0, 1]")
        for i, s in enumerate(stages):
            check_number(f"stages[{i}]", s, low=0, integer=True)
        if len(set(stages)) != len(stages):
            raise ConfigError(f"MixStyle.stages={stages} names a stage twice")
        check_number("p", p, low=0, high=1)
        check_number("alpha", alpha, low=0, low_open=True)
        check_number("eps", eps, low=0, low_open=True)
        if mix not in ("random", "crossdomain"):
            raise ConfigError(f"MixStyle.mix={mix!r} must be 'random' or 'crossdomain'")
        self.stages = [int(s) for s in stages]
        self.p, self.alpha, self.eps, self.mix = float(p), float(alpha), float(eps), mix
        self._hook_handles: list = []

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        for index in self.stages:
            name, stage = feature_stage(backbone, index)
            hook = MixStyleHook(self.p, self.alpha, self.eps, self.mix, f"stage {index} ({name})")
            self._hook_handles.append(stage.register_forward_hook(hook))

    def remove_hooks(self) -> None:
        """Take the MixStyle hooks off the backbone (the model is then plain ERM)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
