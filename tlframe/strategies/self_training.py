"""Self-training on two views of each target image: FixMatch-style pseudo-labels and Mean Teacher.

Both need a weak and a strong view of the same unlabelled target image (``target_views = 2``): the data module
then serves target batches ``((x_weak, x_strong), y_t)`` (:mod:`tlframe.data.views`), and the model forwards
source, weak and strong views (one joint batch with ``bn_policy: joint``) into a :class:`TransferStep` whose
``logits_t`` is the weak view and ``logits_t_strong`` the strong view. Every other loss of the strategy (DANN's
domain loss, a term) sees the weak view as "the target batch".

Each is a :class:`~tlframe.strategies.LossTerm` (add it to any adaptation strategy: DANN + FixMatchTerm, ...)
and a strategy of its own (:class:`FixMatch`, :class:`MeanTeacher`: :class:`~tlframe.strategies.Adaptation`
with that term first), so ``class_path: tlframe.strategies.FixMatch`` is the method and its name in reports.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from tlframe.checks import ConfigError, check_number
from tlframe.losses import consistency_loss, pseudo_label_loss, sigmoid_rampup
from tlframe.strategies.base import Progress, TransferStep
from tlframe.strategies.terms import Adaptation, LossTerm

__all__ = ["FixMatchTerm", "MeanTeacherTerm", "FixMatch", "MeanTeacher", "EMATeacher"]


def _strong_view(step: TransferStep, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits_t weak, logits_t_strong)`` of ``step``; a clear error when the views were not forwarded."""
    if step.logits_t is None or step.logits_t_strong is None:
        raise RuntimeError(f"{who} needs a weak and a strong view of each target image, but the step has "
                           f"{'no target batch' if step.logits_t is None else 'one view'}: train with tlframe's "
                           "TransferDataModule (it serves both views when the strategy's target_views is 2)")
    return step.logits_t, step.logits_t_strong


def _labelled_accuracy(pred: torch.Tensor, y_t: Optional[torch.Tensor], rows: torch.Tensor) -> Optional[torch.Tensor]:
    """Accuracy of ``pred`` on the ``rows`` whose target label is known (diagnostic only; ``None`` if none)."""
    if y_t is None:
        return None
    known = rows & (y_t >= 0)
    if not bool(known.any()):
        return None
    return (pred[known] == y_t[known]).float().mean()


class FixMatchTerm(LossTerm):
    """FixMatch-style pseudo-labels (Sohn et al., NeurIPS 2020) on the target: the weak view's confident
    predictions are the labels of the strong view, :func:`tlframe.losses.pseudo_label_loss`::

        loss = 1/N sum_i 1[max softmax(g(weak_i) / T) >= threshold] * CE(g(strong_i), argmax g(weak_i))

    The pseudo-labels carry no gradient; the student itself (no EMA copy) makes them, as in FixMatch.
    Logs ``<name>_mask_rate`` (share of target rows above the threshold) and, when the target data carries
    labels (never used in a loss), ``<name>_pseudo_label_acc`` (accuracy of the kept pseudo-labels).

    Args:
        weight: lambda_u (FixMatch: 1).
        threshold: tau, the confidence a pseudo-label needs (FixMatch: 0.95).
        temperature: of the weak view's softmax (1: FixMatch).
        name: default ``fixmatch``.
    """

    kind = "fixmatch"
    target_views = 2

    def __init__(self, weight: float = 1.0, threshold: float = 0.95, temperature: float = 1.0,
                 name: Optional[str] = None):
        super().__init__(weight, name)
        check_number("FixMatchTerm.threshold", threshold, low=0, high=1)
        check_number("FixMatchTerm.temperature", temperature, low=0, low_open=True)
        self.threshold = float(threshold)
        self.temperature = float(temperature)

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        weak, strong = _strong_view(step, type(self).__name__)
        loss, mask, pseudo = pseudo_label_loss(strong, weak, self.threshold, self.temperature)
        logs: dict[str, Any] = {"mask_rate": mask.float().mean()}
        acc = _labelled_accuracy(pseudo, step.y_t, mask)
        if acc is not None:
            logs["pseudo_label_acc"] = acc
        return loss, logs

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}"


class _Classifier(nn.Module):
    """``x -> head(backbone(x))`` logits: the student's parts as one module (for the EMA copy)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # cached features
            return self.head(x)[1]
        return self.head(self.backbone(x))[1]


class EMATeacher(nn.Module):
    """An exponential moving average of the student's backbone and head (timm's ``ModelEmaV3``).

    The teacher starts as the student's starting weights ``theta_0`` (:meth:`reset`, at the start of a fresh
    run). After the student's optimizer step ``n`` (``n = 1, 2, ...``), every parameter and floating buffer
    becomes ``theta' <- alpha_n theta' + (1 - alpha_n) theta_n`` with ``alpha_n = min(1 - 1 / (n + 1), decay)``
    (Tarvainen & Valpola 2017, ``update_ema_variables``: the true average of ``theta_0 .. theta_n`` until the
    exponential average takes over). :meth:`follow` applies the updates not yet applied: the step of the last
    one is the buffer ``ema_step`` (in the checkpoint), so a resumed run continues exactly. Float32 state.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, decay: float):
        super().__init__()
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(_Classifier(backbone, head), decay=decay, use_warmup=True, warmup_gamma=1.0,
                              warmup_power=1.0)
        for m in self.ema.module.modules():  # hooks and compiled calls of the student are not the teacher's
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None
        self.ema.module.requires_grad_(False)
        self.register_buffer("ema_step", torch.tensor(0, dtype=torch.long))
        self._student: tuple[nn.Module, ...] = (backbone, head)  # outside the module tree: not registered twice

    @property
    def model(self) -> nn.Module:
        return self.ema.module

    @torch.no_grad()
    def reset(self) -> None:
        """Teacher := the student's current weights, no update applied yet (``ema_step = 0``)."""
        self.ema.set(_Classifier(*self._student))
        self.ema_step.zero_()

    @torch.no_grad()
    def follow(self, step: int) -> None:
        """Apply the EMA updates for the student's optimizer steps ``ema_step + 1 .. step`` (with the student's
        current weights: called before the forward of each step, the student then holds step ``step``'s weights)."""
        done = int(self.ema_step)
        if step <= done:
            return
        student = _Classifier(*self._student)
        for n in range(done + 1, step + 1):
            self.ema.update(student, step=n + 1)  # timm: decay(n + 1) = min(1 - 1 / (n + 1), decay)
        self.ema_step.fill_(step)

    def forward(self, x: torch.Tensor, batch_norm: Literal["batch", "running"] = "batch") -> torch.Tensor:
        """Teacher logits, no gradient; ``batch_norm="batch"``: train mode (batch statistics and dropout, as
        the Mean Teacher code), ``"running"``: eval mode."""
        model = self.ema.module
        mode = model.training
        model.train(batch_norm == "batch")
        try:
            with torch.no_grad():
                return model(x)
        finally:
            model.train(mode)


class MeanTeacherTerm(LossTerm):
    """Mean Teacher consistency (Tarvainen & Valpola, NeurIPS 2017; for domain adaptation: French et al.,
    ICLR 2018): an EMA copy of the model (:class:`EMATeacher`) predicts the weak view of each target image,
    and the student's prediction on the strong view is pulled toward it, :func:`tlframe.losses.consistency_loss`::

        loss = rampup(step) * 1/N sum_i [max q_i >= threshold] * d(softmax(g(strong_i)), q_i),  q = softmax(teacher(weak))

    ``d``: ``mse`` (``1/C ||p - q||^2``, default) or ``kl``; ``rampup`` is :func:`tlframe.losses.sigmoid_rampup`
    over ``rampup_steps`` optimizer steps (derived from ``global_step``). The teacher is updated after every
    optimizer step of the student (applied before the next step's forward) and sits in the checkpoint.
    Evaluation uses the student. Logs ``<name>_rampup``, ``<name>_mask_rate`` (with a threshold) and, when the
    target carries labels (never used in a loss), ``<name>_teacher_acc``.

    Args:
        weight: the consistency weight's maximum.
        ema_decay: alpha's ceiling (0.999 as the paper's CIFAR runs; French et al. 0.99).
        rampup_steps: steps of the sigmoid ramp-up of the weight (0: none).
        distance: ``mse`` or ``kl``.
        confidence_threshold: French et al.'s confidence thresholding (0.968 in their paper); ``null``: none.
        teacher_batch_norm: ``batch`` (teacher in train mode: batch statistics of the weak target batch, and
            dropout) or ``running`` (eval mode).
        name: default ``consistency``.
    """

    kind = "consistency"
    target_views = 2

    def __init__(self, weight: float = 1.0, ema_decay: float = 0.999, rampup_steps: int = 0,
                 distance: Literal["mse", "kl"] = "mse", confidence_threshold: Optional[float] = None,
                 teacher_batch_norm: Literal["batch", "running"] = "batch", name: Optional[str] = None):
        super().__init__(weight, name)
        check_number("MeanTeacherTerm.ema_decay", ema_decay, low=0, high=1, high_open=True)
        check_number("MeanTeacherTerm.rampup_steps", rampup_steps, low=0, integer=True)
        if distance not in ("mse", "kl"):
            raise ConfigError(f"MeanTeacherTerm.distance={distance!r} must be 'mse' or 'kl'")
        if confidence_threshold is not None:
            check_number("MeanTeacherTerm.confidence_threshold", confidence_threshold, low=0, high=1)
        if teacher_batch_norm not in ("batch", "running"):
            raise ConfigError(f"MeanTeacherTerm.teacher_batch_norm={teacher_batch_norm!r} must be 'batch' "
                              "(train mode) or 'running' (eval mode)")
        self.ema_decay = float(ema_decay)
        self.rampup_steps = int(rampup_steps)
        self.distance = distance
        self.confidence_threshold = None if confidence_threshold is None else float(confidence_threshold)
        self.teacher_batch_norm = teacher_batch_norm
        self.teacher: Optional[EMATeacher] = None

    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        self.teacher = EMATeacher(backbone, head, self.ema_decay)

    def ddp_ignored(self) -> list[str]:
        # every rank applies the same update to the same (synchronised) student weights: nothing to broadcast
        return [f"teacher.{n}" for n, _ in self.teacher.named_parameters()] + [
            f"teacher.{n}" for n, _ in self.teacher.named_buffers()]

    def on_train_start(self, progress: Progress, trainer: Any) -> None:
        if progress.step == 0:  # a fresh run: the starting weights DDP's initial broadcast left on every rank
            self.teacher.reset()

    def on_train_batch_start(self, progress: Progress) -> None:
        self.teacher.follow(progress.step)

    def compute(self, step: TransferStep) -> tuple[torch.Tensor, dict[str, Any]]:
        _, strong = _strong_view(step, type(self).__name__)
        teacher_logits = self.teacher(step.x_t, self.teacher_batch_norm)
        value, mask = consistency_loss(strong, teacher_logits, self.distance, self.confidence_threshold)
        ramp = sigmoid_rampup(step.progress.step, self.rampup_steps)
        logs: dict[str, Any] = {"rampup": ramp}
        if self.confidence_threshold is not None:
            logs["mask_rate"] = mask.float().mean()
        acc = _labelled_accuracy(teacher_logits.argmax(dim=1), step.y_t, torch.ones_like(mask))
        if acc is not None:
            logs["teacher_acc"] = acc
        return ramp * value, logs

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ema_decay={self.ema_decay:g}, distance={self.distance!r}"


class FixMatch(Adaptation):
    """FixMatch-style self-training for domain adaptation: source cross-entropy plus :class:`FixMatchTerm` on the
    target (``loss = cls + trade_off * fixmatch``). Takes further ``terms`` and the FineTune arguments.

    Args:
        trade_off: lambda_u.
        threshold: tau (0.95).
        temperature: of the weak view's softmax.
        ``**kwargs``: ``terms`` (added after the FixMatch term) and the :class:`~tlframe.strategies.FineTune`
            arguments (``bn_policy: joint`` by default: source, weak and strong views in one batch, as FixMatch).
    """

    def __init__(self, trade_off: float = 1.0, threshold: float = 0.95, temperature: float = 1.0,
                 terms: Optional[list[LossTerm]] = None, **kwargs: Any):
        super().__init__(terms=[FixMatchTerm(trade_off, threshold, temperature), *(terms or [])], **kwargs)
        self.trade_off, self.threshold, self.temperature = float(trade_off), float(threshold), float(temperature)


class MeanTeacher(Adaptation):
    """Mean Teacher for domain adaptation: source cross-entropy plus :class:`MeanTeacherTerm`
    (``loss = cls + trade_off * rampup * consistency``). Takes further ``terms`` and the FineTune arguments.

    Args:
        trade_off, ema_decay, rampup_steps, distance, confidence_threshold, teacher_batch_norm: of
            :class:`MeanTeacherTerm`.
        ``**kwargs``: ``terms`` (added after the consistency term) and the FineTune arguments.
    """

    def __init__(self, trade_off: float = 1.0, ema_decay: float = 0.999, rampup_steps: int = 0,
                 distance: Literal["mse", "kl"] = "mse", confidence_threshold: Optional[float] = None,
                 teacher_batch_norm: Literal["batch", "running"] = "batch",
                 terms: Optional[list[LossTerm]] = None, **kwargs: Any):
        term = MeanTeacherTerm(trade_off, ema_decay, rampup_steps, distance, confidence_threshold, teacher_batch_norm)
        super().__init__(terms=[term, *(terms or [])], **kwargs)
        self.trade_off, self.ema_decay, self.rampup_steps = float(trade_off), float(ema_decay), int(rampup_steps)
