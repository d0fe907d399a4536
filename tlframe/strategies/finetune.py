"""Fine-tuning and frozen-feature (linear probe) strategies."""

from __future__ import annotations

from typing import Any, Literal, Optional

from torch import nn

from tlframe.backbones import backbone_stages
from tlframe.checks import ConfigError, check_number
from tlframe.data.feature_cache import CacheMode
from tlframe.optim import ParamGroup, frozen_stage_count, stage_lr_multipliers
from tlframe.strategies.base import Progress, Strategy, StrategyOutput, TransferStep
from tlframe.strategies.regularization import Regularizer

__all__ = ["FineTune", "FrozenFeatures"]


def _stage_modules(backbone: nn.Module, stages: list[list[str]]) -> list[list[nn.Module]]:
    """Modules whose parameters all belong to one stage (convs, norms), per stage."""
    owner = {name: i for i, names in enumerate(stages) for name in names}
    out: list[list[nn.Module]] = [[] for _ in stages]
    for mod_name, mod in backbone.named_modules():
        names = [f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False)]
        idx = {owner.get(n) for n in names}
        if names and len(idx) == 1 and None not in idx:
            out[idx.pop()].append(mod)
    return out


class FineTune(Strategy):
    """Train backbone and head; optionally freeze the first stages, unfreeze them gradually, decay LRs by depth.

    Stages come from the backbone's timm ``group_matcher(coarse=True)``: stage 0 is the stem,
    then the blocks/stages in forward order (see ``tlframe.backbones.backbone_stages``), so
    the same setting works for ResNet, ConvNeXt, ViT, EfficientNet and the digit networks.

    Args:
        backbone_lr_mult: LR multiplier of the backbone (0.1 is the usual choice for a
            pretrained backbone; use 1.0 when training from scratch).
        freeze_stages: number of leading stages frozen at the start (``-1``: the whole
            backbone). Frozen parameters get no update, no weight decay and no momentum, and
            with ``freeze_bn_stats`` their BatchNorm running statistics stay untouched.
        unfreeze_every: release the deepest frozen stage every this many ``unfreeze_unit``
            (gradual unfreezing, top-down). ``None``: frozen stages stay frozen for the run
            (then they get ``requires_grad=False`` and cost no backward pass).
        unfreeze_unit: ``"epoch"`` (``current_epoch``) or ``"step"`` (``global_step``).
        layer_decay: layer-wise LR decay: stage ``i`` of ``S`` gets
            ``backbone_lr_mult * layer_decay ** (S - 1 - i)``.
        freeze_bn_stats: keep normalisation layers of frozen stages in eval mode.
        regularization: fine-tuning regularisers that keep the model near its starting point
            (``class_path``/``init_args`` in YAML): :class:`~tlframe.strategies.L2SP`,
            :class:`~tlframe.strategies.BSS`, :class:`~tlframe.strategies.DELTA` (see
            :mod:`tlframe.strategies.regularization`). Each adds its weighted losses (``train/loss_<name>``);
            L2-SP turns the optimizer's weight decay off for the backbone group(s). Part of the fine-tuning
            recipe: a run's source-only baseline keeps them.
        head_lr_mult, bn_policy, label_smoothing, class_weights, class_weight_beta, label_shift,
            label_shift_start_epoch, label_shift_every_epoch, label_shift_ridge: see :class:`Strategy`.
    """

    def __init__(self, backbone_lr_mult: float = 0.1, freeze_stages: int = 0, unfreeze_every: Optional[int] = None,
                 unfreeze_unit: Literal["epoch", "step"] = "epoch", layer_decay: Optional[float] = None,
                 freeze_bn_stats: bool = True, regularization: Optional[list[Regularizer]] = None,
                 head_lr_mult: float = 1.0, bn_policy: Literal["joint", "separate"] = "joint",
                 label_smoothing: float = 0.0, class_weights: Literal["none", "inverse", "effective"] = "none",
                 class_weight_beta: float = 0.999, label_shift: Literal["none", "bbse"] = "none",
                 label_shift_start_epoch: int = 1, label_shift_every_epoch: bool = True,
                 label_shift_ridge: float = 0.0):
        super().__init__(head_lr_mult=head_lr_mult, bn_policy=bn_policy, label_smoothing=label_smoothing,
                         class_weights=class_weights, class_weight_beta=class_weight_beta, label_shift=label_shift,
                         label_shift_start_epoch=label_shift_start_epoch,
                         label_shift_every_epoch=label_shift_every_epoch, label_shift_ridge=label_shift_ridge)
        if unfreeze_every is not None and unfreeze_every <= 0:
            raise ValueError(f"unfreeze_every must be a positive number of {unfreeze_unit}s or null, got {unfreeze_every}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        check_number("backbone_lr_mult", backbone_lr_mult, low=0)
        check_number("freeze_stages", freeze_stages, low=0, integer=True)
        self.backbone_lr_mult = backbone_lr_mult
        self.freeze_stages = freeze_stages
        self.unfreeze_every = unfreeze_every
        self.unfreeze_unit = unfreeze_unit
        self.layer_decay = layer_decay
        self.freeze_bn_stats = freeze_bn_stats
        self._stage_names: list[list[str]] = []  # derived from the backbone in attach()
        self.regularization = nn.ModuleList(self._checked_regularization(regularization))

    def _checked_regularization(self, regularization: Optional[list[Regularizer]]) -> list[Regularizer]:
        regs = list(regularization or [])
        for i, reg in enumerate(regs):
            if not isinstance(reg, Regularizer):
                raise ConfigError(f"regularization[{i}] is a {type(reg).__name__}, not a regulariser: give class_path: "
                                  "tlframe.strategies.L2SP, BSS or DELTA with its init_args")
        names = [n for reg in regs for n in reg.loss_names]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"two regularisers' losses are named {dup[0]!r}: give one of them another name "
                              f"(init_args: {{name: {dup[0]}2}})")
        own = getattr(self, "own_losses", ("cls",))
        for reg in regs:
            for n in reg.loss_names:
                if n in own:
                    raise ConfigError(f"the regulariser loss name {n!r} is taken by {type(self).__name__}'s own "
                                      f"losses {list(own)}: give the {type(reg).__name__} another name "
                                      f"(init_args: {{name: {reg.name}2}})")
        return regs

    @property
    def regularization_loss_names(self) -> list[str]:
        """Names of the losses the regularisers add."""
        return [n for reg in self.regularization for n in reg.loss_names]

    # -- structure -------------------------------------------------------------------
    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        self._stage_names = backbone_stages(backbone)
        if self.unfreeze_every is None:
            params = dict(backbone.named_parameters())
            for names in self._stage_names[: self.frozen_stages(Progress(0, 0))]:
                for n in names:
                    params[n].requires_grad_(False)
        for reg in self.regularization:  # after the freezing: they regularise what trains
            reg.attach(backbone, head, num_classes)

    def ddp_ignored(self) -> list[str]:
        return super().ddp_ignored() + [f"regularization.{i}.{n}" for i, reg in enumerate(self.regularization)
                                        for n in reg.ddp_ignored()]

    @property
    def num_stages(self) -> int:
        return len(self._stage_names)

    def frozen_stages(self, progress: Progress) -> int:
        """Number of leading stages frozen at ``progress`` (a pure function of step/epoch)."""
        unit = progress.epoch if self.unfreeze_unit == "epoch" else progress.step
        return frozen_stage_count(self.freeze_stages, self.num_stages, self.unfreeze_every, unit)

    def param_groups(self, backbone: nn.Module, head: nn.Module) -> list[ParamGroup]:
        params = dict(backbone.named_parameters())
        mults = stage_lr_multipliers(self.num_stages, self.backbone_lr_mult, self.layer_decay)
        groups = super().param_groups(backbone, head)
        if self.layer_decay is None:
            groups.append({"name": "backbone", "lr_mult": self.backbone_lr_mult,
                           "params": [params[n] for names in self._stage_names for n in names if params[n].requires_grad]})
        else:
            for i, (names, mult) in enumerate(zip(self._stage_names, mults)):
                groups.append({"name": f"backbone.stage{i}", "lr_mult": mult,
                               "params": [params[n] for n in names if params[n].requires_grad]})
        for reg in self.regularization:
            groups = reg.adjust_param_groups(groups)
        return [g for g in groups if g["params"]]

    # -- losses ----------------------------------------------------------------------
    def compute(self, step: TransferStep) -> StrategyOutput:
        out = super().compute(step)
        self.add_regularization(out, step)
        return out

    def add_regularization(self, out: StrategyOutput, step: TransferStep) -> None:
        """Add every regulariser's losses, weights and logs to ``out``."""
        for reg in self.regularization:
            extra = reg.compute(step)
            clash = sorted(set(extra.losses) & set(out.losses))
            if clash:
                raise ConfigError(f"the regulariser loss name {clash[0]!r} is taken by {type(self).__name__}'s "
                                  f"losses {sorted(out.losses)}: give the {type(reg).__name__} another name "
                                  f"(init_args: {{name: {reg.name}2}})")
            out.losses.update(extra.losses)
            out.weights.update(extra.weights)
            out.logs.update(extra.logs)

    # -- schedule --------------------------------------------------------------------
    def on_train_start(self, progress: Progress, trainer: Any) -> None:
        super().on_train_start(progress, trainer)
        for reg in self.regularization:
            reg.on_train_start(progress, trainer)

    def on_train_batch_start(self, backbone: nn.Module, progress: Progress) -> None:
        for reg in self.regularization:
            reg.on_train_batch_start(progress)
        frozen = self.frozen_stages(progress)
        if not self.freeze_bn_stats or frozen == 0:
            return
        for mods in _stage_modules(backbone, self._stage_names[:frozen]):
            for m in mods:
                m.eval()

    def on_before_optimizer_step(self, backbone: nn.Module, progress: Progress) -> None:
        if self.unfreeze_every is None:
            return  # permanently frozen stages have requires_grad=False
        params = dict(backbone.named_parameters())
        for names in self._stage_names[: self.frozen_stages(progress)]:
            for n in names:
                params[n].grad = None


class FrozenFeatures(Strategy):
    """Linear probe / feature extraction: the backbone is frozen (no grad, eval mode, BN stats untouched), only the head trains.

    Set the module's ``bottleneck_dim: 0`` for a pure linear classifier on the features.

    Args:
        cache_features: ``"none"`` (default) runs the backbone on every batch. ``"memory"``
            runs it once per image of every split the data module serves (source train/val/test,
            target train/test), with the eval transform, and then trains and evaluates the head
            on those features (see :mod:`tlframe.data.feature_cache`); ``"disk"`` also saves them
            under ``$TLFRAME_CACHE_DIR/features`` and reuses them in later runs with the same
            backbone, weights, transform and data. The trade-off: a cached image is always
            seen through the eval transform, so ``train_augmentation`` must be ``"none"`` (any
            other value is an error), and under AMP the cache is float32 while the uncached
            path computes features under autocast. Sampling, pairing, labels and checkpoints
            are those of the uncached path. Needs a :class:`~tlframe.data.TransferDataModule`;
            with plain dataloaders images go through the backbone as usual.
        head_lr_mult, bn_policy, label_smoothing, class_weights, class_weight_beta, label_shift,
            label_shift_start_epoch, label_shift_every_epoch, label_shift_ridge: see :class:`Strategy`.
    """

    trains_backbone = False

    def __init__(self, head_lr_mult: float = 1.0, bn_policy: Literal["joint", "separate"] = "joint",
                 label_smoothing: float = 0.0, cache_features: CacheMode = "none",
                 class_weights: Literal["none", "inverse", "effective"] = "none", class_weight_beta: float = 0.999,
                 label_shift: Literal["none", "bbse"] = "none", label_shift_start_epoch: int = 1,
                 label_shift_every_epoch: bool = True, label_shift_ridge: float = 0.0):
        super().__init__(head_lr_mult=head_lr_mult, bn_policy=bn_policy, label_smoothing=label_smoothing,
                         class_weights=class_weights, class_weight_beta=class_weight_beta, label_shift=label_shift,
                         label_shift_start_epoch=label_shift_start_epoch,
                         label_shift_every_epoch=label_shift_every_epoch, label_shift_ridge=label_shift_ridge)
        if cache_features not in ("none", "memory", "disk"):
            raise ValueError(f"cache_features must be 'none', 'memory' or 'disk', got {cache_features!r}")
        self.cache_features = cache_features

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        backbone.requires_grad_(False)

    def on_train_batch_start(self, backbone: nn.Module, progress: Progress) -> None:
        backbone.eval()
