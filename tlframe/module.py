"""TransferModule: a timm backbone, a bottleneck head and a pluggable adaptation strategy."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from tlframe.atomic import AtomicCheckpointIO
from tlframe.backbones import create_backbone, data_config, load_head_weights, weight_source
from tlframe.checks import ConfigError, check_number
from tlframe.data.feature_cache import FeatureCache
from tlframe.heads import TransferHead
from tlframe.optim import InverseDecayLR, apply_lr_multipliers, nonempty_groups
from tlframe.seeding import run_seed, seed_generators, step_seed
from tlframe.strategies import FineTune, Progress, Strategy, TransferStep
from tlframe.validators import (DeepEmbeddedValidation, InformationMaximization, SoftNeighborhoodDensity,
                                prediction_entropy)

__all__ = ["TransferModule", "NonFiniteLossError", "CheckpointMismatchError"]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stopped before that step's update."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model built from the config."""

_DOMAINS = ("source", "target")


def _merge_domains(batch: dict) -> tuple[dict, dict[str, Any]]:
    """``{"sources": [(x, y), ...], "targets": [...]}`` as ``{"source": (x, y), "target": (x, y)}`` (each role's
    domains concatenated in order) and the :class:`TransferStep` domain fields (``d_s``, ``d_t``, the counts)."""
    merged, fields = {}, {}
    for role, key in (("source", "sources"), ("target", "targets")):
        parts = batch.get(key) or []
        if not parts:
            continue
        xs, ys = [p[0] for p in parts], [p[1] for p in parts]
        merged[role] = (torch.cat(xs), torch.cat(ys))
        fields[f"d_{role[0]}"] = torch.cat([torch.full((len(y),), i, dtype=torch.long, device=y.device)
                                            for i, y in enumerate(ys)])
        fields[f"num_{role}_domains"] = len(parts)
    return merged, fields


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "mean_class_acc": MulticlassAccuracy(num_classes, average="macro"),
    })


class MeanDomainAccuracy(Metric):
    """The mean over domains of each domain's accuracy (DomainBed's training-domain validation accuracy):
    ``1/D sum_d correct_d / total_d`` over the domains with rows; summed over DDP processes."""

    full_state_update = False

    def __init__(self, num_domains: int) -> None:
        super().__init__()
        self.add_state("correct", default=torch.zeros(num_domains, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_domains, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, domain: int) -> None:
        self.correct[domain] += (logits.argmax(dim=1) == labels).sum()
        self.total[domain] += labels.numel()

    def compute(self) -> torch.Tensor:
        seen = self.total > 0
        return (self.correct[seen].double() / self.total[seen]).mean().float()


def _is_source(domain: str) -> bool:
    """Whether an evaluation loader holds source (training-domain) rows: ``source`` or ``source_<name>``."""
    return domain == "source" or domain.startswith("source_")


class TransferModule(pl.LightningModule):
    """Backbone (timm, headless) -> bottleneck -> classifier, trained by a strategy.

    Args:
        backbone: any timm model name (``timm.list_models()``) or ``lenet``/``dtn``/``dann_cnn``.
        num_classes: number of classes; the CLI links it from ``data.num_classes``.
        pretrained: load the hub weights of ``backbone`` (needs internet).
        weights: offline weights for the backbone: a state dict file or a tlframe checkpoint
            (its ``backbone.*`` tensors; the earlier run's head is not used unless ``weights_head``).
        weights_head: also load the bottleneck and classifier (``head.*``) of the ``weights`` checkpoint: start
            from the whole earlier model (source-free adaptation, :class:`~tlframe.strategies.SHOT`).
        backbone_kwargs: extra ``timm.create_model`` arguments (``in_chans``, ``drop_path_rate``, ...).
        strategy: the adaptation strategy (default :class:`~tlframe.strategies.FineTune`).
        bottleneck_dim: width of the bottleneck (``0``: classifier directly on the features).
        bottleneck_dropout: dropout after the bottleneck's ReLU (after its BN when ``bottleneck_relu`` is false).
        bottleneck_layers: number of bottleneck layers of width ``bottleneck_dim`` (2 with the classifier is Ganin
            & Lempitsky's digit label predictor, FC 100 - FC 100 - FC 10).
        bottleneck_bn: batch norm between the bottleneck's Linear and ReLU (TLlib's default head; ``false`` for
            TLlib's DAN head ``Linear-ReLU-Dropout``).
        bottleneck_relu: the bottleneck's ReLU; ``false`` with ``bottleneck_dropout: 0.5`` is SHOT's bottleneck
            ``Linear-BN-Dropout`` (features of either sign, which SHOT's cosine centroids then see).
        weight_norm_classifier: a weight-normalised classifier (SHOT's source model), see
            :class:`~tlframe.heads.TransferHead`.
        lr, momentum, weight_decay, nesterov: the default optimizer, SGD as in the reference
            DA recipe. Each parameter group's LR is ``lr * lr_mult`` of its group.
        optimizer: any other torch optimizer (``class_path``/``init_args``); its own ``lr`` is
            then the base LR that the group multipliers scale.
        scheduler: any torch LR scheduler; default ``InverseDecayLR`` (``lr (1 + 0.001 step)^-0.75``).
        scheduler_interval: step the scheduler every ``"step"`` or every ``"epoch"``.
        check_finite_loss: stop with :class:`NonFiniteLossError` (naming the loss term, the
            step and the last good checkpoint) as soon as a loss term or the gradient is
            NaN/inf, before the optimizer step, so no checkpoint ever holds non-finite
            weights. Costs one device-to-host sync per step (a collective under DDP, so all
            ranks stop together); set ``false`` to skip it.
        channels_last: keep the backbone's weights and its input batches in the ``channels_last``
            (NHWC) memory format: faster convolutions with bf16/fp16 tensor cores on GPUs, usually
            no gain (or a loss) for small fp32 models on CPU. Numerics are unchanged.
        compile: compile the backbone's forward with ``torch.compile`` (``nn.Module.compile``,
            so the module and its ``backbone.*`` checkpoint keys stay as they are). The first
            steps pay the compilation; needs a working C++ compiler on CPU (inductor).
        validator_samples: target evaluation samples (a uniform sample, the same every epoch)
            that the SND validator ``val/target_snd`` uses; it costs ``O(n^2)`` time and
            memory (2000: a 2000 x 2000 similarity matrix, ~16 MB, milliseconds on a GPU).
            The DEV validator ``val/target_dev`` samples at most this many source validation and
            target rows (bottleneck features; a domain classifier fitted on the CPU, ~0.1 s
            for 2000 x 256). ``val/target_entropy`` and ``val/target_im`` always use the whole
            split. See :mod:`tlframe.validators`.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 10,
        pretrained: bool = False,
        weights: Optional[str] = None,
        weights_head: bool = False,
        backbone_kwargs: Optional[dict[str, Any]] = None,
        strategy: Optional[Strategy] = None,
        bottleneck_dim: int = 256,
        bottleneck_dropout: float = 0.0,
        bottleneck_bn: bool = True,
        bottleneck_layers: int = 1,
        bottleneck_relu: bool = True,
        weight_norm_classifier: bool = False,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
        nesterov: bool = True,
        optimizer: Optional[OptimizerCallable] = None,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        check_finite_loss: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        validator_samples: int = 2000,
    ):
        super().__init__()
        check_number("lr", lr, low=0, low_open=True)
        check_number("momentum", momentum, low=0, high=1)
        check_number("weight_decay", weight_decay, low=0)
        check_number("bottleneck_dim", bottleneck_dim, low=0, integer=True)
        check_number("bottleneck_dropout", bottleneck_dropout, low=0, high=1, high_open=True)
        check_number("bottleneck_layers", bottleneck_layers, low=1, integer=True)
        check_number("validator_samples", validator_samples, low=2, integer=True)
        # From the CLI (or load_from_checkpoint of a CLI run) the hparams are the config, where the
        # strategy is its class_path/init_args: keep it, so load_from_checkpoint rebuilds it. Built in
        # code, the strategy/optimizer objects are left out (they would be pickled into every checkpoint).
        from_config = _given_hyperparameters.get() is not None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=[] if from_config else ["strategy", "optimizer", "scheduler"])
        self.backbone_id = f"{backbone} {sorted((backbone_kwargs or {}).items())}"
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights, **(backbone_kwargs or {}))
        #: where the starting weights came from (timm tag, file + hash, checkpoint run): run_info.json records it
        self.weight_source = weight_source(self.backbone, pretrained, weights)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if compile:
            self.backbone.compile()  # compiles __call__ in place: no wrapper module, same state_dict keys
        self.channels_last = channels_last
        self.head = TransferHead(self.backbone.num_features, num_classes, dim=bottleneck_dim, dropout=bottleneck_dropout,
                                 batch_norm=bottleneck_bn, weight_norm=weight_norm_classifier, layers=bottleneck_layers,
                                 relu=bottleneck_relu)
        if weights_head:
            if weights is None:
                raise ConfigError("weights_head: true loads the head of the `weights` checkpoint, but model.weights "
                                  "is not set: give the tlframe checkpoint to start from (e.g. the source run's last.ckpt)")
            load_head_weights(self.head, weights)
        self.strategy = strategy if strategy is not None else FineTune()
        self.strategy.attach(self.backbone, self.head, num_classes)
        # a strategy with several optimizer steps per batch (MCD) makes them itself: Lightning's manual optimization
        self.automatic_optimization = not self.strategy.manual_optimization
        ignored = [f"strategy.{n}" for n in self.strategy.ddp_ignored()]
        if ignored:  # frozen starting state (L2-SP's w0, DELTA's teacher): no DDP broadcast, no gradient sync
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)
        self.feature_cache: Optional[FeatureCache] = None
        if self.strategy.cache_features != "none":
            self.feature_cache = FeatureCache(self.strategy.cache_features, self.backbone, self.backbone_id)
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.metrics = nn.ModuleDict({
            f"{stage}_{domain}": _accuracy_metrics(num_classes) for stage in ("val", "test") for domain in _DOMAINS
        })
        # Label-free validators of the target evaluation split (model selection without target labels).
        self.validators = nn.ModuleDict({stage: nn.ModuleDict({
            "entropy": MeanMetric(), "snd": SoftNeighborhoodDensity(max_samples=validator_samples),
            "im": InformationMaximization(num_classes), "dev": DeepEmbeddedValidation(max_samples=validator_samples),
        }) for stage in ("val", "test")})

    # -- data hand-shake ---------------------------------------------------------------
    @property
    def data_config(self) -> dict:
        """timm input config of the backbone (input size, mean, std, interpolation, crop_pct)."""
        return data_config(self.backbone)

    def setup(self, stage: str) -> None:
        if self._trainer is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_data_config"):
            dm.set_data_config(self.data_config)
        if dm is not None and hasattr(dm, "use_feature_cache"):
            dm.use_feature_cache(self.feature_cache)  # features are built lazily, on this module's device
        if dm is not None and hasattr(dm, "set_target_views"):
            dm.set_target_views(self.strategy.target_views if self.strategy.uses_target else 1)
            dm.set_training_domains(source=self.strategy.uses_source, target_indices=self.strategy.target_indices)
        self.strategy.on_setup(stage, dm)  # e.g. class weights from the source class counts
        self._add_domain_metrics(dm)
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO is kept
            strategy.checkpoint_io = AtomicCheckpointIO()

    def _add_domain_metrics(self, dm: Any) -> None:
        """Accuracy metrics for the data module's other evaluation loaders (several domains: ``source_<name>``,
        ``target_out``, ...) and, with several training domains, the mean of their accuracies (``val/source_acc``)."""
        for stage in ("val", "test"):
            for domain in getattr(dm, f"{stage}_domains", None) or []:
                if f"{stage}_{domain}" not in self.metrics:
                    self.metrics[f"{stage}_{domain}"] = _accuracy_metrics(self.num_classes).to(self.device)
        per_domain = getattr(dm, "source_val_domains", None) or []
        self._source_val_domains = list(per_domain)
        if per_domain and "mean_domain_acc" not in self.metrics:
            self.metrics["mean_domain_acc"] = MeanDomainAccuracy(len(per_domain)).to(self.device)

    # -- forward -----------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``(N, D)`` of images ``(N, C, H, W)``; a ``(N, D)`` input is already
        features (from the feature cache) and is returned as it is."""
        if x.ndim == 2:
            return x
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.strategy.trains_backbone:
            return self.backbone(x)
        with torch.no_grad():
            return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` for images ``(N, C, H, W)`` or cached features ``(N, D)``."""
        return self.head(self.features(x))[1]

    def _forward_domains(self, *batches: Optional[torch.Tensor]) -> list[tuple]:
        """``(z, f, logits)`` of each input batch (source, then target views; ``None`` gives ``(None,) * 3``): one
        forward of the concatenated batches with ``bn_policy: joint`` (BatchNorm statistics of the mixed batch),
        else one per batch."""
        given = [b for b in batches if b is not None]
        if len(given) > 1 and self.strategy.bn_policy == "joint":
            z = self.features(torch.cat(given))
            f, g = self.head(z)
            sizes = [b.shape[0] for b in given]
            parts = iter(zip(z.split(sizes), f.split(sizes), g.split(sizes)))
        else:
            parts = iter([(z, *self.head(z)) for z in map(self.features, given)])
        return [(None, None, None) if b is None else next(parts) for b in batches]

    def transfer_step(self, batch: dict) -> TransferStep:
        """The forward pass of a training batch ``{"source": (x_s, y_s), "target": (x_t, y_t)}`` (``x_t`` a
        ``(weak, strong)`` pair for a strategy with two target views) as the strategy sees it. A batch of several
        domains (``{"sources": [...], "targets": [...]}``, :class:`~tlframe.data.MultiDomainDataModule`) is
        concatenated per role, with each row's domain index in ``d_s`` / ``d_t``."""
        domains: dict[str, Any] = {}
        if "sources" in batch:
            batch, domains = _merge_domains(batch)
        x_s, y_s = batch["source"] if self.strategy.uses_source else (None, None)
        if not self.strategy.uses_target or "target" not in batch:
            ((z_s, f_s, g_s),) = self._forward_domains(x_s)
            return TransferStep(z_s=z_s, f_s=f_s, logits_s=g_s, y_s=y_s, progress=self.progress, **domains)
        x_t, y_t, *idx_t = batch["target"]
        weak, strong = x_t if isinstance(x_t, (tuple, list)) else (x_t, None)
        (z_s, f_s, g_s), (z_t, f_t, g_t), (z_ts, f_ts, g_ts) = self._forward_domains(x_s, weak, strong)
        return TransferStep(z_s=z_s, f_s=f_s, logits_s=g_s, y_s=y_s, progress=self.progress, z_t=z_t, f_t=f_t,
                            logits_t=g_t, x_t=weak, y_t=y_t, idx_t=idx_t[0] if idx_t else None,
                            z_t_strong=z_ts, f_t_strong=f_ts, logits_t_strong=g_ts, **domains)

    @property
    def progress(self) -> Progress:
        return Progress(self.global_step, self.current_epoch, getattr(self, "_total_steps", None))

    def on_train_start(self) -> None:
        # The run's length in optimizer steps, from the trainer's settings (so the same after resume).
        total = self.trainer.estimated_stepping_batches
        self._total_steps = int(total) if math.isfinite(total) else None
        self.strategy.on_train_start(self.progress, self.trainer)

    # -- label shift -------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.strategy.wants_label_shift_estimate(self.current_epoch):
            self._estimate_label_shift()
        self.strategy.on_train_epoch_start(self)

    def _estimate_label_shift(self) -> None:
        """BBSE at the start of an epoch: importance weights ``w = q / p`` into the strategy (``label_shift``)."""
        from tlframe.label_shift import bbse_estimate

        from tlframe.label_shift_counts import label_shift_counts

        confusion, predicted = label_shift_counts(self)
        epoch = self.current_epoch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = bbse_estimate(confusion.cpu().numpy(), predicted.cpu().numpy(), ridge=self.strategy.label_shift_ridge)
        self.strategy.set_label_shift_weights(torch.as_tensor(est.weights), epoch)
        rank_zero_info(f"tlframe: label_shift bbse at the start of epoch {epoch}: target class proportions "
                       f"{[round(float(q), 3) for q in est.q_target]} (source {[round(float(q), 3) for q in est.source_proportions]}), "
                       f"weights {[round(float(w), 3) for w in est.weights]}, condition number {est.condition_number:.3g}"
                       + "".join(f"; {w.message}" for w in caught))
        logs = {f"label_shift/weight_{c}": float(w) for c, w in enumerate(est.weights)}
        logs.update({f"label_shift/target_proportion_{c}": float(q) for c, q in enumerate(est.q_target)})
        logs["label_shift/condition_number"] = min(float(est.condition_number), 1e12)
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=False)

    # -- training ----------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout & co. draw from a generator seeded by (run seed, rank, global_step): resume-exact.
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches  # distinct draws for accumulated batches
        seed_generators(step_seed(run_seed(), self.global_rank, self.global_step, micro_batch), self.device)
        if micro_batch == 0 and self.strategy.reset_optimizers_now(self.progress):
            for optimizer in self.trainer.optimizers:  # e.g. IRM / V-REx: a fresh Adam when the penalty anneals in
                optimizer.state.clear()
        self.strategy.on_train_batch_start(self.backbone, self.progress)

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        if self.strategy.manual_optimization:
            return self._manual_training_step(batch)
        step = self.transfer_step(batch)
        out = self.strategy.compute(step)
        loss = out.total()
        self.record_step_losses(out)
        self._log_step(out, loss, step)
        return loss

    def record_step_losses(self, out: Any) -> None:
        """Keep the loss terms of the coming optimizer step for the non-finite check (``check_finite_loss``)."""
        if self.hparams.check_finite_loss:  # checked with the gradients, before the optimizer step
            self._step_losses = {**{f"train/loss_{k}": v.detach() for k, v in out.losses.items()},
                                 "train/loss": out.total().detach()}

    def _manual_training_step(self, batch: dict) -> None:
        """A ``manual_optimization`` strategy's batch (its own forwards, backwards and optimizer steps), then one
        step of every LR scheduler (``scheduler_interval: step``)."""
        out = self.strategy.manual_step(self, batch)
        if self.hparams.scheduler_interval == "step":
            for scheduler in self._schedulers():
                scheduler.step()
        sources = batch["sources"] if "sources" in batch else [batch["source"]]  # several domains: their batches
        self._log_step(out, out.total().detach(), None, batch_size=sum(int(x.shape[0]) for x, *_ in sources))
        return None

    def _schedulers(self) -> list:
        schedulers = self.lr_schedulers()
        return [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]

    def on_train_epoch_end(self) -> None:
        if self.strategy.manual_optimization and self.hparams.scheduler_interval == "epoch":
            for scheduler in self._schedulers():
                scheduler.step()

    def _log_step(self, out: Any, loss: torch.Tensor, step: Optional[TransferStep], batch_size: int = 0) -> None:
        terms = {f"train/loss_{k}": v.detach() for k, v in out.losses.items()}
        if self._is_logging_step():  # Lightning writes step values only then: skip the per-key cost otherwise
            bs = batch_size or (step.logits_s if step.logits_s is not None else step.logits_t).shape[0]
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
            self.log_dict(terms, batch_size=bs)
            self.log_dict({f"train/{k}": v for k, v in out.logs.items()}, batch_size=bs)
            if step is not None and step.logits_s is not None:
                self.log("train/source_acc", (step.logits_s.argmax(1) == step.y_s).float().mean(), batch_size=bs)

    def _is_logging_step(self) -> bool:
        """Whether the trainer writes step metrics at this step (every ``log_every_n_steps``)."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.hparams.check_finite_loss:
            self._stop_if_not_finite(optimizer)
        self.strategy.on_before_optimizer_step(self.backbone, self.progress)

    def _stop_if_not_finite(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise :class:`NonFiniteLossError` if a loss term or a gradient is NaN/inf (one host sync; a collective under DDP).

        Gradients are not checked under ``16-mixed``, where the gradient scaler expects
        (and skips) steps with infinite gradients.
        """
        losses = getattr(self, "_step_losses", {})
        checked = [losses["train/loss"]] if losses else []  # a NaN/inf term makes the total NaN/inf too
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and self.trainer.precision != "16-mixed":
            checked.append(torch.nn.utils.get_total_norm(grads))
        bad = bool(checked) and not bool(torch.isfinite(torch.stack(checked)).all())
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        values = {k: float(v) for k, v in losses.items()}
        culprits = [f"{k} = {v}" for k, v in values.items() if not math.isfinite(v)] or [
            f"the gradients (loss terms finite: {values})" if len(checked) > 1 else "a loss on another DDP rank"]
        ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
        raise NonFiniteLossError(
            f"non-finite values at step {self.global_step} (epoch {self.current_epoch}): {', '.join(culprits)}. "
            "Training stopped before this step's update, so no checkpoint holds non-finite weights"
            + (f"; the last good checkpoint is {ckpt}" if ckpt else "")
            + ". Fixes: lower the learning rate (model.lr) or the transfer loss weight (model.strategy.trade_off), "
            "check the input data, or use precision bf16-mixed instead of 16-mixed."
        )

    # -- evaluation --------------------------------------------------------------------
    def _domains(self, stage: str) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        return getattr(dm, f"{stage}_domains", None) or (list(_DOMAINS) if stage == "val" else ["target", "source"])

    def _eval_step(self, stage: str, batch: Any, dataloader_idx: int) -> dict[str, Any]:
        """Log accuracy/loss of labelled rows and, on the target, the label-free validators
        (DEV also samples the bottleneck features and per-sample losses of the source rows).

        Returns ``{"domain", "features" (bottleneck, (N, d)), "logits" (N, C), "labels" (N,)}``
        for callbacks (``on_validation_batch_end``), e.g. :class:`tlframe.callbacks.TransferInsights`.
        """
        x, y = batch
        domains = self._domains(stage)
        domain = domains[dataloader_idx]
        features, logits = self.head(self.features(x))
        out = {"domain": domain, "features": features, "logits": logits, "labels": y}
        validators = self.validators[stage]
        labelled = y >= 0
        losses = None
        if bool(labelled.any()):
            losses = nn.functional.cross_entropy(logits[labelled], y[labelled], reduction="none")
        if domain == "target":
            validators["entropy"].update(prediction_entropy(logits.float().softmax(dim=1)))
            validators["snd"].update(logits)
            validators["im"].update(logits)
            validators["dev"].update("target", features)
            for name in ("entropy", "snd", "im"):
                self.log(f"{stage}/target_{name}", validators[name], add_dataloader_idx=False, batch_size=y.shape[0])
        elif _is_source(domain) and losses is not None:
            validators["dev"].update("source", features[labelled], losses.float())
        sources = [d for d in domains if _is_source(d)]
        if sources and "target" in domains and domain == max((sources[-1], "target"), key=domains.index):
            # Lightning computes a logged metric at the end of the loader it is logged in: the later of the two
            self.log(f"{stage}/target_dev", validators["dev"], add_dataloader_idx=False, batch_size=y.shape[0])
        if losses is None:
            return out
        logits, y = logits[labelled], y[labelled]
        metrics = self.metrics[f"{stage}_{domain}"]
        metrics.update(logits, y)
        self.log_dict({f"{stage}/{domain}_{k}": m for k, m in metrics.items()}, add_dataloader_idx=False,
                      batch_size=y.shape[0])
        per_domain = getattr(self, "_source_val_domains", [])
        if stage == "val" and domain in per_domain:  # several training domains: the mean of their accuracies
            mean_acc = self.metrics["mean_domain_acc"]
            mean_acc.update(logits, y, per_domain.index(domain))
            if domain == per_domain[-1]:
                self.log("val/source_acc", mean_acc, add_dataloader_idx=False, batch_size=y.shape[0])
        self.log(f"{stage}/{domain}_loss", losses.mean(), add_dataloader_idx=False, batch_size=y.shape[0],
                 sync_dist=True)
        return out

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step("test", batch, dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """``{"probs": (N, C) softmax, "pred": (N,), "labels": (N,) true labels, -1 when unlabelled}``."""
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) > 1 else (batch, None)
        x = x[0] if isinstance(x, (tuple, list)) else x
        probs = self(x).softmax(dim=1)
        labels = y if isinstance(y, torch.Tensor) else torch.full((len(probs),), -1, device=probs.device)
        return {"probs": probs, "pred": probs.argmax(dim=1), "labels": labels}

    # -- checkpoints -------------------------------------------------------------------
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that names mismatching tensors and the fix instead of a size-mismatch dump."""
        own = self.state_dict()
        # ``*._extra_state`` is a strategy's own record (e.g. SHOT's pseudo-label per target image), sized by the
        # run, not by the model: a fresh model holds an empty one, and its set_extra_state checks what it loads.
        wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state_dict.items() if k in own and not k.endswith("_extra_state")
                 and hasattr(v, "shape") and v.shape != own[k].shape]
        missing = sorted(set(own) - set(state_dict)) if strict else []
        unexpected = sorted(set(state_dict) - set(own)) if strict else []
        if wrong or missing or unexpected:
            detail = "; ".join(wrong[:6] + [f"missing {k}" for k in missing[:6]] + [f"unexpected {k}" for k in unexpected[:6]])
            raise CheckpointMismatchError(
                f"the checkpoint does not fit this model ({detail}): it was trained with another backbone, "
                "num_classes (data classes), bottleneck_dim or strategy. Resume/evaluate with the config of "
                "the run that wrote it, or pass it as model.weights to start a new run from its backbone "
                "(the head is then rebuilt)."
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- optimisation ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """One optimizer and LR scheduler per entry of the strategy's ``optimizer_groups`` (one for most)."""
        built = [self._optimizer_and_scheduler(nonempty_groups(groups))
                 for _, groups in self.strategy.optimizer_groups(self.backbone, self.head)]
        return built[0] if len(built) == 1 else built

    def _optimizer_and_scheduler(self, groups: list) -> dict:
        try:
            if self.optimizer_factory is None:
                optimizer = torch.optim.SGD(groups, lr=self.hparams.lr, momentum=self.hparams.momentum,
                                            weight_decay=self.hparams.weight_decay, nesterov=self.hparams.nesterov)
            else:
                optimizer = self.optimizer_factory(groups)
        except (ValueError, TypeError) as err:  # torch's own checks of the optimizer's arguments
            raise ConfigError(f"model.optimizer: {err}: fix its init_args (or model.lr, model.weight_decay)") from None
        apply_lr_multipliers(optimizer)
        try:
            scheduler = InverseDecayLR(optimizer) if self.scheduler_factory is None else self.scheduler_factory(optimizer)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.scheduler: {err}: fix its init_args") from None
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}
