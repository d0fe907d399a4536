"""The strategy plug: what is trained, and which losses are added to the classification loss.

A strategy is an ``nn.Module`` (so its extra modules, e.g. a domain discriminator, live in
the LightningModule's ``state_dict``, move to the device and are wrapped by DDP). The
``TransferModule`` calls, in order:

1. ``attach(backbone, head, num_classes)`` once at construction: build extra modules,
   apply permanent freezing (``requires_grad=False``); then ``ddp_ignored()`` once (state that
   DDP must neither broadcast nor synchronise, e.g. L2-SP's starting weights);
2. ``on_setup(stage, datamodule)`` in the module's ``setup`` (e.g. the source class counts of
   class-weighted cross-entropy);
3. ``optimizer_groups(backbone, head)`` (by default one optimizer over ``param_groups(backbone, head)``) once
   in ``configure_optimizers``: one optimizer and LR scheduler per entry;
4. ``on_train_start(progress, trainer)`` when training starts (after a resume's restore);
5. ``on_train_epoch_start(module)`` at every epoch start (e.g. SHOT's pseudo-labels of the whole target split);
6. per step: ``on_train_batch_start(backbone, progress)`` (BN/eval modes of frozen parts),
   the forward pass (:meth:`TransferModule.transfer_step`: source, target and, for ``target_views = 2``, the
   strong target view; nothing of the source for ``uses_source = False``), ``compute(step) -> StrategyOutput``,
   and ``on_before_optimizer_step(backbone, progress)`` (drop gradients of parts frozen now). A strategy with
   ``manual_optimization`` (MCD) replaces the forward, ``compute`` and the step by its own
   ``manual_step(module, batch)``: several forwards, backwards and optimizer steps per batch.

``progress`` is a :class:`Progress` read from the trainer (``global_step``, ``current_epoch``),
never a counter of the strategy's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Optional

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.nn import functional as F

from tlframe.checks import ConfigError, check_number
from tlframe.data.feature_cache import CacheMode
from tlframe.optim import ParamGroup, trainable

__all__ = ["Progress", "TransferStep", "StrategyOutput", "Strategy", "checked_weight_and_name"]


#: A loss term's or regulariser's name: letters, digits and ``_``, starting with a letter.
TERM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def checked_weight_and_name(term: nn.Module, weight: float, name: Optional[str], example: str) -> tuple[float, str]:
    """``(weight, name)`` of a loss term or regulariser, checked: a weight >= 0 and a name of letters, digits and
    ``_`` other than ``cls`` (``None``: the term's ``kind``)."""
    check_number(f"{type(term).__name__}.weight", weight, low=0)
    name = term.kind if name is None else name
    if not isinstance(name, str) or not TERM_NAME.match(name) or name == "cls":
        raise ConfigError(f"{type(term).__name__}.name={name!r} must be a name of letters, digits and '_' "
                          f"starting with a letter, and not 'cls' (the classification loss), e.g. '{example}'")
    return float(weight), name


class Progress(NamedTuple):
    """Where training is: the trainer's ``global_step`` (optimizer steps) and ``current_epoch``, and
    ``total_steps``, the optimizer steps of the whole run (Lightning's ``estimated_stepping_batches``;
    ``None`` outside ``fit`` or for an open-ended run)."""

    step: int
    epoch: int
    total_steps: Optional[int] = None


@dataclass
class TransferStep:
    """One training step's tensors, as a strategy sees them.

    ``z_*``: backbone features ``(N, D)``; ``f_*``: bottleneck features ``(N, d)``;
    ``logits_*``: ``(N, C)``; ``y_s``: source labels ``(N,)``. Target tensors are ``None``
    when the strategy does not use the target domain.

    With two target views (a strategy whose ``target_views`` is 2: FixMatch, Mean Teacher), ``*_t`` are the
    student's outputs on the weak view and ``*_t_strong`` on the strong view of the same images; ``x_t`` is the
    weak view's input batch (e.g. for an EMA teacher). ``y_t``: the target labels, -1 where unlabelled, for
    diagnostics only (e.g. the pseudo-labels' accuracy in the logs): never used in a loss. ``idx_t``: each target
    image's index in the target train split (a strategy with ``target_indices``). A source-free strategy
    (``uses_source = False``) gets ``None`` for every source tensor.
    """

    z_s: torch.Tensor
    f_s: torch.Tensor
    logits_s: torch.Tensor
    y_s: torch.Tensor
    progress: Progress
    z_t: Optional[torch.Tensor] = None
    f_t: Optional[torch.Tensor] = None
    logits_t: Optional[torch.Tensor] = None
    x_t: Optional[torch.Tensor] = None
    y_t: Optional[torch.Tensor] = None
    idx_t: Optional[torch.Tensor] = None
    z_t_strong: Optional[torch.Tensor] = None
    f_t_strong: Optional[torch.Tensor] = None
    logits_t_strong: Optional[torch.Tensor] = None
    d_s: Optional[torch.Tensor] = None
    d_t: Optional[torch.Tensor] = None
    num_source_domains: int = 1
    num_target_domains: int = 1

    def source_domains(self) -> list[torch.Tensor]:
        """Row indices ``(n_i,)`` of the source batch per training domain, in domain order (one entry per domain,
        possibly empty under DDP sharding); a single-source step gives one entry with every row."""
        if self.d_s is None:
            return [torch.arange(self.y_s.shape[0], device=self.y_s.device)]
        return [torch.nonzero(self.d_s == i, as_tuple=True)[0] for i in range(self.num_source_domains)]


@dataclass
class StrategyOutput:
    """Named loss terms, their weights (1.0 when absent) and extra values to log."""

    losses: dict[str, torch.Tensor]
    weights: dict[str, float] = field(default_factory=dict)
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        return sum(self.weights.get(k, 1.0) * v for k, v in self.losses.items())


class Strategy(nn.Module):
    """Base strategy: cross-entropy on labelled source data.

    Args:
        head_lr_mult: LR multiplier of the bottleneck and classifier.
        bn_policy: how source and target go through the network when both are used:
            ``"joint"`` forwards ``cat(x_s, x_t)`` as one batch, so BatchNorm normalises with
            statistics of the mixed batch (reference DANN); ``"separate"`` forwards them as two
            batches, so each domain is normalised with its own batch statistics and the running
            statistics see both in turn (reference DAN).
        label_smoothing: label smoothing of the source cross-entropy.
        class_weights: class-weighted source cross-entropy against a class-imbalanced source:
            ``"none"`` (default), ``"inverse"`` (``w_c ∝ 1 / n_c``) or ``"effective"`` (the inverse
            effective number of samples ``(1 - beta) / (1 - beta ** n_c)``, Cui et al., CVPR 2019),
            from the class counts ``n_c`` of the source *train* split (the data module's
            ``source_class_counts()``, read at ``setup``), normalised to sum to the number of
            classes (:func:`tlframe.label_shift.class_weights`). The loss is Cui et al.'s
            ``1/N sum_i w_{y_i} CE_i`` (a mean over the batch, not PyTorch's ``sum w CE / sum w``;
            ``CE_i`` with ``label_smoothing``). The weights sit in the buffer ``class_weight``
            (in the checkpoint). Target labels are never read.
        class_weight_beta: ``beta`` of ``class_weights: effective``, in ``[0, 1)``.
        label_shift: correct for label shift between the domains (the target's class proportions ``q``
            differ from the source's ``p``): ``"none"`` (default) or ``"bbse"``: importance weights
            ``w = q / p`` estimated by black-box shift estimation (Lipton et al., ICML 2018;
            :func:`tlframe.label_shift.bbse_estimate`) from the *current* model's confusion matrix on the
            source validation split and its predictions on the unlabelled target train split (never a
            target label). Each source sample's cross-entropy is multiplied by ``w[y]`` (times its class
            weight with ``class_weights``), and DANN/CDAN multiply its domain loss by ``w[y]`` too. Before
            the first estimate ``w = 1``. The weights sit in the buffer ``label_shift_weight`` (and the
            epoch of their estimate in ``label_shift_epoch``), so they are in every checkpoint. Needs a
            source validation split (``data.val_fraction > 0``).
        label_shift_start_epoch: the epoch at whose start the first estimate is made (default 1: after one
            epoch of training, so that the classifier is informative; 0: the starting model).
        label_shift_every_epoch: re-estimate at the start of every later epoch (default), or keep the first
            estimate (``false``: Lipton et al.'s fixed-classifier recipe).
        label_shift_ridge: Tikhonov shrinkage of the estimate toward ``w = 1``
            (:func:`tlframe.label_shift.bbse_target_proportions`); 0: none.
    """

    uses_target: bool = False
    #: whether training reads the labelled source (False: source-free adaptation; no source loader is built)
    uses_source: bool = True
    #: the strategy makes its own optimizer steps per batch (Lightning's manual optimization): :meth:`manual_step`
    manual_optimization: bool = False
    #: whether target training batches carry each image's index in the target train split (``step.idx_t``)
    target_indices: bool = False
    #: views of each target training image the strategy needs: 1, or 2 for (weak, strong) (self-training)
    target_views: int = 1
    trains_backbone: bool = True
    #: Serve cached backbone features instead of images (only a strategy that never trains the backbone may set it).
    cache_features: CacheMode = "none"

    def __init__(self, head_lr_mult: float = 1.0, bn_policy: Literal["joint", "separate"] = "joint",
                 label_smoothing: float = 0.0, class_weights: Literal["none", "inverse", "effective"] = "none",
                 class_weight_beta: float = 0.999, label_shift: Literal["none", "bbse"] = "none",
                 label_shift_start_epoch: int = 1, label_shift_every_epoch: bool = True,
                 label_shift_ridge: float = 0.0):
        super().__init__()
        check_number("head_lr_mult", head_lr_mult, low=0)
        check_number("label_smoothing", label_smoothing, low=0, high=1, high_open=True)
        if class_weights not in ("none", "inverse", "effective"):
            raise ConfigError(f"class_weights={class_weights!r} must be 'none', 'inverse' (1 / class count) or "
                              "'effective' (inverse effective number of samples, with class_weight_beta)")
        check_number("class_weight_beta", class_weight_beta, low=0, high=1, high_open=True)
        if label_shift not in ("none", "bbse"):
            raise ConfigError(f"label_shift={label_shift!r} must be 'none' or 'bbse' (black-box shift estimation of "
                              "the target's class proportions)")
        check_number("label_shift_start_epoch", label_shift_start_epoch, low=0, integer=True)
        check_number("label_shift_ridge", label_shift_ridge, low=0)
        self.label_shift = label_shift
        self.label_shift_start_epoch = int(label_shift_start_epoch)
        self.label_shift_every_epoch = bool(label_shift_every_epoch)
        self.label_shift_ridge = float(label_shift_ridge)
        self.head_lr_mult = head_lr_mult
        self.bn_policy = bn_policy
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        self.class_weight_beta = float(class_weight_beta)

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        """Called once with the model parts; build extra modules and apply permanent freezing here.
        Subclasses call ``super().attach(...)`` (the base registers the ``class_weight`` buffer)."""
        if self.class_weights != "none":
            # placeholder values (equal weights) until on_setup reads the source class counts
            self.register_buffer("class_weight", torch.ones(num_classes))
        if self.label_shift != "none":
            self.register_buffer("label_shift_weight", torch.ones(num_classes))  # w = q / p; 1 = no shift
            self.register_buffer("label_shift_epoch", torch.tensor(-1, dtype=torch.long))  # -1: not estimated yet

    def ddp_ignored(self) -> list[str]:
        """Names (relative to the strategy) of parameters and buffers that DDP must neither broadcast nor
        synchronise (frozen copies of the starting model that never change); none by default."""
        return []

    def on_setup(self, stage: str, datamodule: Any) -> None:
        """The module's ``setup(stage)``: with ``class_weights``, read the source train class counts for ``fit``;
        with ``label_shift``, check that the data can feed the estimate."""
        if stage != "fit":
            return
        if self.label_shift != "none" and (datamodule is None or not hasattr(datamodule, "label_shift_loaders")):
            raise ConfigError(f"label_shift: {self.label_shift} estimates the target's class proportions from the "
                              "source validation split and the target train split: train with tlframe's "
                              "TransferDataModule (data: ...) or set label_shift: none")
        if self.label_shift != "none":
            datamodule.check_label_shift_data()
        if self.class_weights == "none":
            return
        if datamodule is None or not hasattr(datamodule, "source_class_counts"):
            raise ConfigError(f"class_weights: {self.class_weights} needs the source class counts: train with "
                              "tlframe's TransferDataModule (data: ...) or set class_weights: none")
        from tlframe.label_shift import class_weights as weights_of

        counts = datamodule.source_class_counts()
        if len(counts) != self.class_weight.numel():
            raise ConfigError(f"class_weights: the data has {len(counts)} classes, the model {self.class_weight.numel()}")
        weights = weights_of(counts, self.class_weights, self.class_weight_beta)
        self.class_weight.copy_(torch.as_tensor(weights, dtype=self.class_weight.dtype))
        rank_zero_info(f"tlframe: class_weights={self.class_weights}: source train counts {list(map(int, counts))} -> "
                       f"weights {[round(float(w), 4) for w in weights]}")

    def wants_label_shift_estimate(self, epoch: int) -> bool:
        """Whether the label-shift weights are (re-)estimated at the start of ``epoch`` (``label_shift``).

        Decided from the buffer ``label_shift_epoch`` (in the checkpoint), so a run resumed in the middle of an
        epoch keeps the weights it trained that epoch with instead of re-estimating them from mid-epoch weights.
        """
        if self.label_shift == "none" or epoch < self.label_shift_start_epoch:
            return False
        last = int(self.label_shift_epoch)
        return last < 0 or (self.label_shift_every_epoch and last != epoch)

    def set_label_shift_weights(self, weights: torch.Tensor, epoch: int) -> None:
        """Store the importance weights ``w = q / p`` ``(C,)`` estimated at the start of ``epoch``."""
        if weights.shape != self.label_shift_weight.shape:
            raise ValueError(f"label-shift weights of shape {tuple(weights.shape)} for "
                             f"{self.label_shift_weight.numel()} classes")
        self.label_shift_weight.copy_(weights.to(self.label_shift_weight))
        self.label_shift_epoch.fill_(int(epoch))

    def source_sample_weight(self, y_s: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample label-shift weights ``w[y_s]`` ``(N,)`` of the source batch, or ``None`` without ``label_shift``."""
        if self.label_shift == "none":
            return None
        return self.label_shift_weight[y_s]

    def on_train_start(self, progress: Progress, trainer: Any) -> None:
        """Training starts (``progress.step == 0`` on a fresh run; after a resume's restore otherwise)."""

    def on_train_epoch_start(self, module: Any) -> None:
        """An epoch starts; ``module`` is the :class:`~tlframe.module.TransferModule`, e.g. for a pass over the
        target data (SHOT's centroid pseudo-labels). Lightning does not call it for the epoch that a mid-epoch
        resume continues: what it computes for an epoch belongs in the checkpoint (``state_dict``/extra state),
        and :meth:`on_train_start` is where to check what came back. Nothing by default."""

    def param_groups(self, backbone: nn.Module, head: nn.Module) -> list[ParamGroup]:
        """Parameter groups with ``lr_mult``; the base trains only the head."""
        return [{"name": "head", "params": trainable(head), "lr_mult": self.head_lr_mult}]

    def optimizer_groups(self, backbone: nn.Module, head: nn.Module) -> list[tuple[str, list[ParamGroup]]]:
        """``[(name, parameter groups)]``: one optimizer (and LR scheduler) is built per entry, each from
        ``model.optimizer`` (or the default SGD) and ``model.scheduler``; a group may override optimizer settings
        (e.g. ``"momentum": 0.0``). Default: one optimizer over :meth:`param_groups`."""
        return [("main", self.param_groups(backbone, head))]

    def manual_step(self, module: Any, batch: dict) -> StrategyOutput:
        """One training batch with the strategy's own forward passes, ``module.manual_backward(loss)`` and optimizer
        steps (``module.optimizers()``, in :meth:`optimizer_groups` order), for ``manual_optimization``
        strategies. Returns the detached losses to log. The module steps the LR schedulers afterwards."""
        raise NotImplementedError(f"{type(self).__name__} sets manual_optimization but has no manual_step")

    def on_train_batch_start(self, backbone: nn.Module, progress: Progress) -> None:
        """Put frozen parts in eval mode (Lightning sets the whole model to train each epoch)."""

    def reset_optimizers_now(self, progress: Progress) -> bool:
        """Whether the module clears every optimizer's state (e.g. Adam's moments) before the batch at ``progress``:
        DomainBed's IRM and V-REx restart their optimizer when the penalty anneals in. Derived from
        ``progress.step`` only (resume-exact). Default: never."""
        return False

    def on_before_optimizer_step(self, backbone: nn.Module, progress: Progress) -> None:
        """Drop gradients of parameters that the schedule freezes at ``progress``."""

    def classification_loss(self, step: TransferStep) -> torch.Tensor:
        """Source cross-entropy (``label_smoothing``), weighted per sample by ``class_weights`` and ``label_shift``:
        ``1/N sum_i c_{y_i} w_{y_i} CE_i``."""
        if self.class_weights == "none" and self.label_shift == "none":
            return F.cross_entropy(step.logits_s, step.y_s, label_smoothing=self.label_smoothing)
        per_sample = F.cross_entropy(step.logits_s.float(), step.y_s, reduction="none",
                                     label_smoothing=self.label_smoothing)
        if self.class_weights != "none":
            per_sample = self.class_weight[step.y_s] * per_sample
        if self.label_shift != "none":
            per_sample = self.label_shift_weight[step.y_s] * per_sample
        return per_sample.mean()

    def compute(self, step: TransferStep) -> StrategyOutput:
        """Loss terms for one step; subclasses add their transfer terms to ``{"cls": ...}``."""
        return StrategyOutput(losses={"cls": self.classification_loss(step)})
