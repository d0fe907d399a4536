"""Fine-tuning regularisers that keep the model near what it transferred: L2-SP, BSS and DELTA.

Design
------
A :class:`Regularizer` is a small ``nn.Module`` given to :class:`~tlframe.strategies.FineTune` (and so to every
adaptation strategy, which are FineTune subclasses) in its ``regularization`` list::

    model:
      strategy:
        class_path: tlframe.strategies.FineTune
        init_args:
          backbone_lr_mult: 0.1
          regularization:
            - class_path: tlframe.strategies.L2SP        # alpha/2 ||w - w0||^2 + beta/2 ||w_head||^2
              init_args: {weight: 0.01, head_weight: 0.01}
            - class_path: tlframe.strategies.BSS         # eta * (smallest singular value of f_s)^2
              init_args: {weight: 0.001, k: 1}

It is bound to the model parts in ``attach`` (after the strategy's permanent freezing), owns its state
(L2-SP's starting weights ``w0`` as buffers, DELTA's frozen starting model), may adjust the strategy's
parameter groups (L2-SP turns the optimizer's weight decay off where it regularises) and adds named, weighted
losses to the step's :class:`~tlframe.strategies.StrategyOutput`, logged as ``train/loss_<name>`` like every
loss (``train/loss_l2sp``, ``train/loss_l2sp_head``, ``train/loss_bss``, ``train/loss_delta``,
``train/loss_delta_head``).

They are part of the **fine-tuning recipe**, not of the adaptation: ``regularization`` is a FineTune argument,
so :mod:`tlframe.baselines` keeps it in a run's source-only (and target-only) baseline, which then differs
from the run by the adaptation alone (a DANN + L2-SP run is compared with FineTune + L2-SP). They act on the
labelled (source) batch only, as in their papers; the target batch of an adaptation strategy is not used.

Starting state, checkpoints and DDP
-----------------------------------
The starting state (``w0``, DELTA's teacher) is copied from the backbone at construction, i.e. after the
``pretrained``/``weights`` loading, and again when a fresh run starts training (``global_step == 0``, after
DDP's initial broadcast of rank 0's weights, so every rank holds rank 0's starting weights). It is in the
``state_dict`` (so in every checkpoint, and a resumed run regularises toward the weights the run *started*
from, never the resumed ones), never in an optimizer (buffers, or parameters with ``requires_grad=False``), and
excluded from DDP (``ddp_ignored``): it has no gradient to synchronise, and DDP does not re-broadcast it
before every forward as it does other buffers (a full copy of the backbone per step otherwise).

Math: :func:`tlframe.losses.l2_sp`, :func:`~tlframe.losses.l2_penalty`,
:func:`~tlframe.losses.batch_spectral_shrinkage`, :func:`~tlframe.losses.delta_feature_map_loss` and
:func:`~tlframe.losses.delta_channel_attention`, with TLlib's ``tllib/regularization`` semantics.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.nn import functional as F

from tlframe.backbones import backbone_stages, data_config
from tlframe.checks import ConfigError, check_number
from tlframe.losses import (batch_spectral_shrinkage, delta_channel_attention, delta_feature_map_loss, l2_penalty,
                            l2_sp)
from tlframe.optim import ParamGroup
from tlframe.strategies.base import Progress, StrategyOutput, TransferStep, checked_weight_and_name

__all__ = ["Regularizer", "L2SP", "BSS", "DELTA", "stage_output_modules"]



def _is_backbone_group(group: ParamGroup) -> bool:
    name = str(group.get("name", ""))
    return name == "backbone" or name.startswith("backbone.")


class Regularizer(nn.Module):
    """One fine-tuning regulariser in a strategy's ``regularization`` list (see the module docstring).

    Args:
        weight: multiplier of the regulariser's main loss (>= 0).
        name: its loss's name in the logs (``train/loss_<name>``); default: the kind (``l2sp``, ``bss``,
            ``delta``). Letters, digits and ``_``; not ``cls``.

    Subclasses set :attr:`kind` and implement :meth:`compute`; :meth:`attach` binds the model parts
    (``self.backbone`` / ``self.head``, kept outside the module tree so they are not registered twice).
    """

    kind: str = "reg"

    def __init__(self, weight: float = 1.0, name: Optional[str] = None):
        super().__init__()
        self.weight, self.name = checked_weight_and_name(self, weight, name, example="l2sp2")
        self._parts: tuple[nn.Module, ...] = ()

    @property
    def backbone(self) -> nn.Module:
        return self._parts[0]

    @property
    def head(self) -> nn.Module:
        return self._parts[1]

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Names of the losses :meth:`compute` returns (checked for clashes at construction)."""
        return (self.name,)

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        """Bind the model parts (after the strategy's permanent freezing) and build the regulariser's state."""
        self._parts = (backbone, head)

    def ddp_ignored(self) -> list[str]:
        """Names (relative to this module) of the state DDP must neither broadcast nor synchronise."""
        return []

    def adjust_param_groups(self, groups: list[ParamGroup]) -> list[ParamGroup]:
        """The strategy's backbone and head groups, adjusted (e.g. weight decay off); unchanged by default."""
        return groups

    def on_train_start(self, progress: Progress, trainer: Any) -> None:
        """Training starts; ``progress.step == 0`` on a fresh run (after DDP's initial broadcast)."""

    def on_train_batch_start(self, progress: Progress) -> None:
        """Before the step's forward pass."""

    def compute(self, step: TransferStep) -> StrategyOutput:
        """The regulariser's losses, their weights and diagnostics for one step."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight:g}"


class _HeadL2:
    """The ``beta/2 ||w_head||^2`` part shared by L2-SP and DELTA (the new head: bottleneck + classifier)."""

    head_weight: float
    name: str
    head: nn.Module

    def head_loss_names(self) -> tuple[str, ...]:
        return (f"{self.name}_head",) if self.head_weight > 0 else ()

    def add_head_loss(self, out: StrategyOutput) -> None:
        if self.head_weight > 0:
            key = f"{self.name}_head"
            out.losses[key] = l2_penalty([p for p in self.head.parameters() if p.requires_grad])
            out.weights[key] = self.head_weight

    def head_without_weight_decay(self, groups: list[ParamGroup]) -> list[ParamGroup]:
        if self.head_weight <= 0:
            return groups
        return [{**g, "weight_decay": 0.0} if g.get("name") == "head" else g for g in groups]


class L2SP(_HeadL2, Regularizer):
    """L2-SP (Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks", ICML 2018; TLlib ``SPRegularization`` + ``L2Regularization``)::

        loss_l2sp      = 0.5 * sum_k ||w_k - w0_k||^2     (weight alpha = ``weight``)
        loss_l2sp_head = 0.5 * sum_k ||v_k||^2            (weight beta = ``head_weight``)

    over the transferred backbone parameters ``w`` (every backbone parameter that trains: those frozen for
    the whole run, ``requires_grad=False``, are left out) and the new head's parameters ``v`` (bottleneck and
    classifier), biases and normalisation parameters included, as in TLlib. ``w0`` are the backbone's weights
    at the start (after ``pretrained``/``weights``): buffers ``w0.<param name with '.' -> '__'>``, in the
    checkpoint, never in the optimizer, excluded from DDP (see the module docstring).

    **Weight decay**: the optimizer's own weight decay pulls ``w`` toward 0, against L2-SP's pull toward
    ``w0``, so L2-SP sets ``weight_decay: 0`` on the backbone parameter group(s); with ``head_weight > 0`` the
    head's group gets ``weight_decay: 0`` too (``beta`` is then the head's L2; with plain SGD
    ``beta/2 ||v||^2`` *is* weight decay ``beta``). Other groups (a discriminator) keep it.

    Args:
        weight: alpha (TLlib's ``trade_off_backbone`` default 0.01).
        head_weight: beta (TLlib's ``trade_off_head`` default 0.01); 0 drops the head term.
        name: loss names ``<name>`` and ``<name>_head`` (default ``l2sp``).
    """

    kind = "l2sp"

    def __init__(self, weight: float = 0.01, head_weight: float = 0.01, name: Optional[str] = None):
        super().__init__(weight, name)
        check_number("L2SP.head_weight", head_weight, low=0)
        self.head_weight = float(head_weight)
        self.w0 = nn.Module()  # the starting weights, buffers named after the parameters
        self._names: list[str] = []

    @property
    def loss_names(self) -> tuple[str, ...]:
        return (self.name, *self.head_loss_names())

    @staticmethod
    def buffer_name(param_name: str) -> str:
        return param_name.replace(".", "__")

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        self._names = [n for n, p in backbone.named_parameters() if p.requires_grad]
        params = dict(backbone.named_parameters())
        for n in self._names:
            self.w0.register_buffer(self.buffer_name(n), params[n].detach().clone())

    def starting_weights(self) -> dict[str, torch.Tensor]:
        """``{backbone parameter name: w0}``."""
        return {n: getattr(self.w0, self.buffer_name(n)) for n in self._names}

    def ddp_ignored(self) -> list[str]:
        return [f"w0.{self.buffer_name(n)}" for n in self._names]

    def adjust_param_groups(self, groups: list[ParamGroup]) -> list[ParamGroup]:
        groups = [{**g, "weight_decay": 0.0} if _is_backbone_group(g) else g for g in groups]
        return self.head_without_weight_decay(groups)

    def on_train_start(self, progress: Progress, trainer: Any) -> None:
        if progress.step == 0:  # a fresh run: the weights DDP's initial broadcast left on this rank
            params = dict(self.backbone.named_parameters())
            with torch.no_grad():
                for n, w0 in self.starting_weights().items():
                    w0.copy_(params[n])

    def compute(self, step: TransferStep) -> StrategyOutput:
        params = dict(self.backbone.named_parameters())
        w0 = self.starting_weights()
        loss = l2_sp([params[n] for n in self._names], [w0[n] for n in self._names]).to(step.logits_s.device)
        out = StrategyOutput(losses={self.name: loss}, weights={self.name: self.weight})
        self.add_head_loss(out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head_weight={self.head_weight:g}, params={len(self._names)}"


class BSS(Regularizer):
    """Batch Spectral Shrinkage (Chen, Wang, Fu, Long and Wang, "Catastrophic Forgetting Meets Negative
    Transfer", NeurIPS 2019; TLlib ``BatchSpectralShrinkage``): ``loss_bss = sum_{i<=k} sigma_{-i}(F)^2``, the
    ``k`` smallest singular values of the source batch's feature matrix ``F`` ``(N, D)``
    (:func:`tlframe.losses.batch_spectral_shrinkage`).

    Args:
        weight: eta (TLlib's example: 0.001).
        k: number of smallest singular values (TLlib: 1); at most ``min(batch size, feature dim)``.
        features: ``"bottleneck"`` (default): the features the classifier sees, TLlib's ``f`` (with
            ``bottleneck_dim: 0`` the backbone's pooled features); ``"backbone"``: the backbone's features.
        name: loss name (default ``bss``).
    """

    kind = "bss"

    def __init__(self, weight: float = 0.001, k: int = 1, features: Literal["bottleneck", "backbone"] = "bottleneck",
                 name: Optional[str] = None):
        super().__init__(weight, name)
        check_number("BSS.k", k, low=1, integer=True)
        if features not in ("bottleneck", "backbone"):
            raise ConfigError(f"BSS.features={features!r} must be 'bottleneck' (the classifier's input, TLlib) "
                              "or 'backbone'")
        self.k = int(k)
        self.features = features

    def compute(self, step: TransferStep) -> StrategyOutput:
        f = step.f_s if self.features == "bottleneck" else step.z_s
        return StrategyOutput(losses={self.name: batch_spectral_shrinkage(f, self.k)}, weights={self.name: self.weight})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, features={self.features!r}"


def stage_output_modules(backbone: nn.Module) -> list[str]:
    """Names of the modules whose outputs are the backbone's stage outputs after the stem: DELTA's default
    layers.

    For each stage of :func:`tlframe.backbones.backbone_stages` but the first (the stem): the module that
    holds all the stage's parameters, widened to its largest ancestor holding parameters of that stage only
    (ResNet ``layer1`` ... ``layer4``, ConvNeXt ``stages.0`` ... ``stages.3``, ViT ``blocks.<i>``, the digit
    networks ``stages.1`` ...). A stage whose parameters sit in several top-level modules is skipped.
    """
    owner_of = {}
    stages = backbone_stages(backbone)
    for i, names in enumerate(stages):
        for n in names:
            owner_of[n] = i
    modules = dict(backbone.named_modules())
    out = []
    for i, names in enumerate(stages[1:], start=1):
        paths = [n.split(".")[:-1] for n in names]
        prefix: list[str] = []
        for comps in zip(*paths):
            if len(set(comps)) != 1:
                break
            prefix.append(comps[0])
        if not prefix:
            continue

        def own(path: list[str]) -> bool:
            mod = modules[".".join(path)]
            return all(owner_of.get(f"{'.'.join(path)}.{n}") == i for n, _ in mod.named_parameters())

        while len(prefix) > 1 and own(prefix[:-1]):
            prefix = prefix[:-1]
        out.append(".".join(prefix))
    return out


class _FrozenCopy(nn.Module):
    """A frozen copy of a model: no gradients, and every forward runs in eval mode (BatchNorm's running
    statistics, no dropout). The modules' ``training`` flags follow the model's (so Lightning does not warn
    about modules left in eval mode); :meth:`forward` switches to eval for the call and back."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model)
        for m in self.model.modules():  # hooks of the original (e.g. DELTA's recorder) are not the copy's
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None  # nn.Module.compile's function would run the original module
        self.model.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.model.training
        self.model.eval()
        try:
            return self.model(x)
        finally:
            self.model.train(mode)


class _Recorder:
    """Records the backbone's input and the outputs of ``layers`` during the first backbone call after
    :meth:`arm` (the source batch, or the joint source+target batch): DELTA's student feature maps."""

    def __init__(self, backbone: nn.Module, layers: dict[str, nn.Module]):
        self.armed = False
        self.recording = False
        self.input: Optional[torch.Tensor] = None
        self.maps: dict[str, torch.Tensor] = {}
        self.handles = [backbone.register_forward_pre_hook(self._pre), backbone.register_forward_hook(self._post)]
        self.handles += [m.register_forward_hook(self._layer(name)) for name, m in layers.items()]

    def arm(self) -> None:
        self.clear()
        self.armed = True

    def clear(self) -> None:
        self.armed = self.recording = False
        self.input, self.maps = None, {}

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self.armed and self.input is None and torch.is_grad_enabled():
            self.input, self.recording = args[0], True

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.recording = False

    def _layer(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.recording and name not in self.maps:
                self.maps[name] = output
        return hook


@contextmanager
def _capture(model: nn.Module, layers: Sequence[str], zero_channel: Optional[tuple[str, int]] = None
             ) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on ``layers`` of ``model`` for one ``with`` block: the outputs land in the yielded dict.
    ``zero_channel=(layer, c)`` also sets channel ``c`` of that layer's output to 0 (a removed channel)."""
    maps: dict[str, torch.Tensor] = {}
    handles = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if zero_channel is not None and zero_channel[0] == name:
                output = output.clone()
                output[:, zero_channel[1]] = 0
            maps[name] = output
            return output
        return hook

    try:
        for name in layers:
            handles.append(model.get_submodule(name).register_forward_hook(record(name)))
        yield maps
    finally:
        for h in handles:
            h.remove()


class DELTA(_HeadL2, Regularizer):
    """DELTA, feature-map regularisation toward the starting model (Li, Xiong, Wang, Huan, Ngiam, Chen and
    Liu, "DELTA: DEep Learning Transfer using Feature Map with Attention for Convolutional Networks", ICLR
    2019; TLlib ``BehavioralRegularization`` / ``AttentionBehavioralRegularization`` + ``L2Regularization``)::

        loss_delta      = delta_feature_map_loss(FM(student, x_s), FM(teacher, x_s), attention)  (weight alpha)
        loss_delta_head = 0.5 * sum_k ||v_k||^2                                                (weight beta)

    ``FM`` are the outputs of ``layers`` of the backbone on the step's source images ``x_s``: the student's from
    the step's own forward pass (forward hooks), the teacher's from a frozen copy of the starting backbone
    (``teacher``: taken after ``pretrained``/``weights``, eval mode, no grad, in the checkpoint, excluded from
    DDP), run on the same images. See :func:`tlframe.losses.delta_feature_map_loss` for both variants' exact
    scaling (summed over the batch, as TLlib).

    **Channel attention**: ``attention: none`` (default) is TLlib's attention-free ``BehavioralRegularization``
    (every channel weighs the same). ``attention: channel_removal`` computes the paper's attention once, when a
    fresh run starts: on ``attention_images`` source train images (a seeded sample, eval transform, the same on
    every rank), a linear probe (softmax regression, L-BFGS) is fitted on the starting backbone's features;
    for every channel ``c`` of every layer, ``L(channel c set to 0) - L`` is the probe's cross-entropy
    increase (averaged over batches of ``attention_batch_size``), and
    ``a = softmax(standardise(increase) / attention_temperature)`` (:func:`tlframe.losses.delta_channel_attention`).
    The weights are the buffers ``attention_<j>`` (in the checkpoint; computed on rank 0 and broadcast).
    **Differences from TLlib's example**: TLlib first trains a whole classifier (backbone included) for 10
    epochs on the task and zeroes the *filter* of a convolution (``layer*.conv3``, before its BatchNorm); here
    the probe is linear on the frozen starting features and the channel is zeroed in the hooked layer's
    output. ``channel_removal`` costs ``sum_j C_j`` forward passes of the starting backbone per batch (about
    4000 for a ResNet-50's four stages), once per run.

    **Layers**: ``layers: null`` hooks the outputs of the backbone's stages after the stem
    (:func:`stage_output_modules`: ResNet ``layer1`` ... ``layer4``); TLlib hooks ``layer1.2.conv3``,
    ``layer2.3.conv3``, ``layer3.5.conv3``, ``layer4.2.conv3`` of a ResNet-50 (give those names for parity).
    Channel attention needs ``(B, C, H, W)`` maps (convolutional layers).

    **Weight decay**: with ``head_weight > 0`` the head group's weight decay is off (beta is its L2); the
    backbone keeps the optimizer's weight decay (TLlib's DELTA script uses ``wd = 0`` everywhere: set
    ``model.weight_decay: 0`` for that).

    Args:
        weight: alpha (TLlib's ``trade_off_backbone`` default 0.01).
        head_weight: beta (TLlib's ``trade_off_head`` default 0.01); 0 drops the head term.
        layers: backbone module names whose outputs are the feature maps; ``null``: the stage outputs.
        attention: ``"none"`` or ``"channel_removal"`` (see above).
        attention_images, attention_batch_size, attention_temperature: the channel-removal sample (TLlib:
            10 batches of 32), batch size and softmax temperature (TLlib: 5).
        name: loss names ``<name>`` and ``<name>_head`` (default ``delta``).
    """

    kind = "delta"

    def __init__(self, weight: float = 0.01, head_weight: float = 0.01, layers: Optional[list[str]] = None,
                 attention: Literal["none", "channel_removal"] = "none", attention_images: int = 320,
                 attention_batch_size: int = 32, attention_temperature: float = 5.0, name: Optional[str] = None):
        super().__init__(weight, name)
        check_number("DELTA.head_weight", head_weight, low=0)
        if attention not in ("none", "channel_removal"):
            raise ConfigError(f"DELTA.attention={attention!r} must be 'none' (TLlib BehavioralRegularization) or "
                              "'channel_removal' (the paper's channel attention)")
        check_number("DELTA.attention_images", attention_images, low=1, integer=True)
        check_number("DELTA.attention_batch_size", attention_batch_size, low=1, integer=True)
        check_number("DELTA.attention_temperature", attention_temperature, low=0, low_open=True)
        if layers is not None and (not layers or not all(isinstance(n, str) for n in layers)):
            raise ConfigError(f"DELTA.layers={layers!r} must be a non-empty list of backbone module names or null")
        self.head_weight = float(head_weight)
        self.layers = list(layers) if layers is not None else None
        self.attention = attention
        self.attention_images = int(attention_images)
        self.attention_batch_size = int(attention_batch_size)
        self.attention_temperature = float(attention_temperature)
        self.teacher: Optional[_FrozenCopy] = None
        self._layers: list[str] = []
        self._num_classes = 0
        self._recorder: Optional[_Recorder] = None

    @property
    def loss_names(self) -> tuple[str, ...]:
        return (self.name, *self.head_loss_names())

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        self._num_classes = num_classes
        self._layers = list(self.layers) if self.layers is not None else stage_output_modules(backbone)
        if not self._layers:
            raise ConfigError("DELTA found no stage modules in this backbone: name the layers to regularise "
                              "(DELTA.layers: [module names of the backbone], e.g. ['layer1', 'layer2'])")
        modules = dict(backbone.named_modules())
        unknown = [n for n in self._layers if n not in modules or n == ""]
        if unknown:
            raise ConfigError(f"DELTA.layers: {unknown} are not modules of the backbone "
                              f"(e.g. {[n for n in modules if n][:8]})")
        self.teacher = _FrozenCopy(backbone)
        self._recorder = _Recorder(backbone, {n: modules[n] for n in self._layers})
        if self.attention != "none":
            for j, c in enumerate(self._channels(backbone)):
                self.register_buffer(f"attention_{j}", torch.full((c,), 1.0 / c))

    def _channels(self, backbone: nn.Module) -> list[int]:
        """Channels of each hooked layer's output, from one forward of the teacher on a blank input."""
        size = data_config(backbone)["input_size"]
        with torch.no_grad(), _capture(self.teacher.model, self._layers) as maps:
            self.teacher(torch.zeros(2, *size, device=next(self.teacher.parameters()).device))
        bad = {n: tuple(m.shape) for n, m in maps.items() if not torch.is_tensor(m) or m.ndim != 4}
        if bad:
            raise ConfigError(f"DELTA.attention: channel_removal needs (B, C, H, W) feature maps, but {bad} are not: "
                              "name convolutional layers (DELTA.layers) or use attention: none")
        return [maps[n].shape[1] for n in self._layers]

    def attention_weights(self) -> Optional[list[torch.Tensor]]:
        if self.attention == "none":
            return None
        return [getattr(self, f"attention_{j}") for j in range(len(self._layers))]

    def ddp_ignored(self) -> list[str]:
        return [f"teacher.{n}" for n, _ in self.teacher.named_parameters()] + [
            f"teacher.{n}" for n, _ in self.teacher.named_buffers()]

    def adjust_param_groups(self, groups: list[ParamGroup]) -> list[ParamGroup]:
        return self.head_without_weight_decay(groups)

    def on_train_start(self, progress: Progress, trainer: Any) -> None:
        if progress.step != 0:
            return  # resumed: teacher and attention come from the checkpoint
        self.teacher.model.load_state_dict(self.backbone.state_dict())
        if self.attention != "none":
            self._compute_attention(trainer)

    def on_train_batch_start(self, progress: Progress) -> None:
        self._recorder.arm()

    def compute(self, step: TransferStep) -> StrategyOutput:
        rec = self._recorder
        if rec.input is None or set(rec.maps) != set(self._layers):
            rec.clear()
            raise RuntimeError(f"DELTA recorded no feature maps of the layers {self._layers} in this step: the "
                               "backbone did not run on the source images under grad (DELTA needs a strategy that "
                               "trains the backbone on images, not cached features)")
        n = step.y_s.shape[0]
        student = [rec.maps[name][:n] for name in self._layers]
        x = rec.input[:n]
        rec.clear()
        with torch.no_grad(), _capture(self.teacher.model, self._layers) as maps:
            self.teacher(x)
        teacher = [maps[name] for name in self._layers]
        loss = delta_feature_map_loss(student, teacher, self.attention_weights())
        out = StrategyOutput(losses={self.name: loss}, weights={self.name: self.weight})
        self.add_head_loss(out)
        return out

    # -- channel attention -------------------------------------------------------------
    def _compute_attention(self, trainer: Any) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "source_train_sample"):
            raise ConfigError("DELTA.attention: channel_removal needs labelled source images: train with tlframe's "
                              "TransferDataModule (data: ...) or use attention: none")
        weights: Optional[list[torch.Tensor]] = None
        if trainer.global_rank == 0:
            x, y = dm.source_train_sample(self.attention_images)
            weights = self.channel_attention(x, y)
        if trainer.world_size > 1:
            weights = trainer.strategy.broadcast(weights, src=0)
        for j, w in enumerate(weights):
            getattr(self, f"attention_{j}").copy_(w)
        rank_zero_info(f"tlframe: DELTA channel attention of {self._layers} from {self.attention_images} source "
                       f"images: max weight x channels {[round(float(w.max() * w.numel()), 3) for w in weights]}")

    @torch.no_grad()
    def channel_attention(self, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """The channel attention of every layer (CPU tensors ``(C_j,)``) from labelled ``images`` ``(N, C, H, W)``
        and ``labels`` ``(N,)``: linear probe on the teacher's features, channel removal, standardise, softmax."""
        device = next(self.teacher.parameters()).device
        teacher = self.teacher
        batches = [(xb.to(device), yb.to(device)) for xb, yb in zip(images.split(self.attention_batch_size),
                                                                    labels.split(self.attention_batch_size))]
        feats = torch.cat([teacher(xb).float() for xb, _ in batches])
        probe = self._fit_probe(feats, labels.to(device), self._num_classes)

        def loss() -> torch.Tensor:
            return torch.stack([F.cross_entropy(probe(teacher(xb).float()), yb) for xb, yb in batches]).mean()

        base = loss()
        channels = [getattr(self, f"attention_{j}").numel() for j in range(len(self._layers))]
        out = []
        for name, c in zip(self._layers, channels):
            increase = torch.empty(c, dtype=torch.float64)
            for ch in range(c):
                with _capture(teacher.model, [name], zero_channel=(name, ch)):
                    increase[ch] = float(loss() - base)
            out.append(delta_channel_attention(increase, self.attention_temperature).float())
        return out

    @staticmethod
    def _fit_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> nn.Linear:
        """Softmax regression on ``feats`` (standardised inside the linear map), 100 L-BFGS iterations, L2 1e-4."""
        probe = nn.Linear(feats.shape[1], num_classes).to(feats.device)
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
        opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            out = F.cross_entropy(probe((feats - mean) / std), labels) + 1e-4 * probe.weight.pow(2).sum()
            out.backward()
            return out

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():  # fold the standardisation into the weights
            probe.weight.div_(std)
            probe.bias.sub_(probe.weight @ mean)
        return probe

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, head_weight={self.head_weight:g}, layers={self._layers or self.layers}, "
                f"attention={self.attention!r}")
