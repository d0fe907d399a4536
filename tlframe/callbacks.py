"""Callbacks that the CLI adds to every run.

The DDP rule (for every callback, the module, the CLI and the sweep hooks): **a collective runs on
every rank or on none.** Under DDP these are collectives, and a rank-0-only branch that reaches one
hangs the job forever (the other ranks never join): ``trainer.log_dir`` (it broadcasts the folder),
``trainer.strategy.broadcast`` / ``barrier`` / ``reduce_boolean_decision``, ``self.log(...,
sync_dist=True)``, a torchmetrics ``compute()`` (it gathers the states), ``torch.distributed.*``.
So read them first, on every rank, then branch: ``log_dir = trainer.log_dir`` then ``if
trainer.is_global_zero: write(log_dir)``. Never call them inside ``@rank_zero_only``.
``tests/test_cli_ddp.py`` runs the CLI as users do (2 processes, torchrun, SLURM variables) to keep it so.
"""

from __future__ import annotations

import csv
import json
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import BasePredictionWriter, EarlyStopping, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torchmetrics.classification import MulticlassConfusionMatrix

from tlframe.atomic import atomic_path, atomic_write_text
from tlframe.seeding import mix, run_seed
from tlframe.validators import RowSample, confusion_image, proxy_a_distance

__all__ = ["TransferCheckpoint", "TransferEarlyStopping", "RunSummary", "PredictionWriter", "RunInfo", "TransferInsights",
           "environment_info", "research_hparams", "uses_target_labels"]

_PACKAGES = ("tlframe", "torch", "torchvision", "pytorch-lightning", "torchmetrics", "timm", "numpy", "pillow",
             "jsonargparse", "tensorboard")


def _git_state(folder: Path) -> Optional[dict[str, Any]]:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder``, or None outside one (or without git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def environment_info() -> dict[str, Any]:
    """What reproduces a run besides its config: versions, git commits, command, machine."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "cwd": str(Path.cwd()),
        "seed": run_seed(),
        "python": platform.python_version(),
        "packages": versions,
        "git": {"tlframe": _git_state(Path(__file__).resolve().parent), "cwd": _git_state(Path.cwd())},
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cuda_devices": cuda,
        "torch_cuda": torch.version.cuda,
    }


class RunInfo(pl.Callback):
    """Save ``run_info.json`` (package versions, git commit and dirty flag of tlframe and of the
    working directory, command line, seed, machine, the backbone's weight source: timm tag, or weights
    file with its SHA-256 and run) into the run directory, next to the
    ``config.yaml`` that the CLI saves; rank 0 only. Written atomically at the start of
    every ``fit``/``validate``/``test``/``predict``.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: read on every rank (see the module docstring)
        if trainer.is_global_zero and log_dir:
            info = {"stage": stage, **environment_info()}
            source = getattr(pl_module, "weight_source", None)
            if source is not None:
                info["backbone"] = {"name": getattr(pl_module.hparams, "backbone", None), "weights": source}
            atomic_write_text(Path(log_dir) / "run_info.json", json.dumps(info, indent=2) + "\n")


class TransferCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the latest state.

    With ``save_last``, ``last.ckpt`` is rewritten at every checkpoint event (the end of each
    validation, or of each training epoch when checkpoints are taken there) and at the end of
    training, whatever the monitored metric did. Lightning's own callback (up to 2.6 at least)
    rewrites it only in a step where a top-k checkpoint was saved, so with a monitor whose best was
    early, ``last.ckpt`` silently kept that older model. Everything else (``monitor``, ``mode``,
    ``save_top_k``, ``filename``, ``every_n_*``) is Lightning's.
    """

    _last_saved_step: Optional[int] = None

    @property
    def state_key(self) -> str:
        # Lightning's key names the class: keep ModelCheckpoint's, so earlier runs' checkpoints resume unchanged.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` unless it already holds this step (same decision on every rank: DDP-safe)."""
        if (self.save_last and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
                and not trainer.fast_dev_run and self._last_saved_step != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)


#: Target metrics that need no target labels: the label-free validators (:mod:`tlframe.validators`).
LABEL_FREE_TARGET_METRICS = ("target_entropy", "target_snd", "target_im", "target_dev")


def uses_target_labels(metric: str) -> bool:
    """Whether a logged metric is computed from target labels: ``val/target_acc``, ``val/target_mean_class_acc``,
    ``val/target_loss``, ... (every ``<stage>/target_*`` except the label-free validators
    ``target_entropy``, ``target_snd``, ``target_im``, ``target_dev``)."""
    name = metric.partition("/")[2] if "/" in metric else metric
    return name.startswith("target_") and name not in LABEL_FREE_TARGET_METRICS


class TransferEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping``, off by default, label-free, recorded, and final across a resume.

    When ``enabled``, training stops once ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` validations in a row (Lightning's rule: checked at the end of every validation, before
    the checkpoints of that validation are written, so ``last.ckpt`` holds the stopped state).

    - **Label-free by default**: ``monitor`` is ``val/source_acc`` (source validation split); the label-free
      target validators (``val/target_snd`` with ``mode: max``, ``val/target_entropy``, ``val/target_im``,
      ``val/target_dev`` with ``mode: min``) work too. A monitor computed from target labels
      (``val/target_acc``, ``val/target_mean_class_acc``, ``val/target_loss``, ...) is refused, as it
      would choose the stopping epoch with the target test labels (an oracle, not an unsupervised result),
      unless ``allow_target_labels: true``, which then warns at the start of the run.
    - **Reported**: the stop (epoch, step, monitor, last and best value, best epoch and step, reason) is
      printed in the run's final summary and written to ``early_stop.json`` in the run folder (rank 0).
    - **Final across a resume**: the stop is part of the callback's state in the checkpoint. ``tlframe fit
      --ckpt_path`` of a run that stopped early ends at once, without a training step, saying so (also
      when early stopping is now disabled), unless ``resume: true``: training then continues (up to
      ``trainer.max_epochs`` / ``max_steps``) with the patience counter reset and the best value kept.
    - The metric must be logged by the run (e.g. ``val/source_acc`` needs ``data.val_fraction > 0``);
      otherwise the first check stops the run with a message listing the logged ones.

    When ``enabled`` is false the callback does nothing but honour a stop recorded in a checkpoint.

    Args:
        enabled: switch early stopping on.
        monitor: the logged metric (``val/...``).
        mode: ``max`` (accuracies, SND) or ``min`` (losses, entropy, IM, DEV).
        patience: validations without improvement before stopping (>= 1).
        min_delta: smallest change that counts as an improvement (>= 0).
        allow_target_labels: accept a monitor computed from target labels (oracle; warned).
        resume: a ``--ckpt_path`` resume of an early-stopped run trains on instead of ending at once.
        stopping_threshold: stop as soon as the monitor is better than this value.
        divergence_threshold: stop as soon as the monitor is worse than this value.
        check_finite: stop when the monitor becomes NaN or infinite.
    """

    def __init__(self, enabled: bool = False, monitor: str = "val/source_acc", mode: Literal["min", "max"] = "max",
                 patience: int = 3, min_delta: float = 0.0, allow_target_labels: bool = False, resume: bool = False,
                 stopping_threshold: Optional[float] = None, divergence_threshold: Optional[float] = None,
                 check_finite: bool = True):
        if int(patience) < 1:
            raise ValueError(f"patience={patience} must be >= 1 (validations without improvement before stopping).")
        if not min_delta >= 0:
            raise ValueError(f"min_delta={min_delta} must be >= 0.")
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} is unknown: use 'max' (accuracy, SND) or 'min' (loss, entropy).")
        if enabled and uses_target_labels(monitor) and not allow_target_labels:
            raise ValueError(
                f"early_stopping.monitor={monitor!r} is computed from target labels, so stopping on it chooses the "
                "model with the target test labels (an oracle). Monitor a label-free metric (val/source_acc, "
                "val/target_snd with mode max, val/target_entropy with mode min), or set "
                "early_stopping.allow_target_labels=true to do it knowingly")
        super().__init__(monitor=monitor, min_delta=float(min_delta), patience=int(patience), mode=mode, strict=True,
                         check_finite=check_finite, stopping_threshold=stopping_threshold,
                         divergence_threshold=divergence_threshold, check_on_train_epoch_end=False)
        self.enabled, self.allow_target_labels, self.resume = bool(enabled), bool(allow_target_labels), bool(resume)
        self.best_epoch: Optional[int] = None
        self.best_step: Optional[int] = None
        #: the stop, once it happened (in this run or in the run of the resumed checkpoint); see :meth:`describe`
        self.stop: Optional[dict[str, Any]] = None
        #: this ``fit`` ended at once because the resumed checkpoint's run had stopped early
        self.ended_on_resume = False
        self._improved = False

    @property
    def state_key(self) -> str:
        # One early stopping per run: a constant key, so that a stop survives a resume with another monitor.
        return "TransferEarlyStopping"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "monitor": self.monitor, "mode": self.mode, "best_epoch": self.best_epoch,
                "best_step": self.best_step, "stop": self.stop}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stop = state_dict.get("stop")
        if state_dict.get("monitor") == self.monitor and state_dict.get("mode") == self.mode:
            patience = self.patience
            super().load_state_dict(state_dict)
            self.patience = patience  # the configured patience, not the checkpoint's
            self.best_epoch, self.best_step = state_dict.get("best_epoch"), state_dict.get("best_step")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.ended_on_resume = False
        if self.enabled and stage == "fit" and uses_target_labels(self.monitor):
            rank_zero_warn(f"tlframe: early stopping monitors {self.monitor}, computed from target labels "
                           "(early_stopping.allow_target_labels=true): the stopping epoch is chosen with the target "
                           "test labels (an oracle), not a label-free unsupervised result.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop is None:
            return
        where = f"epoch {self.stop['epoch']}, step {self.stop['step']}"
        if self.resume:
            self.stop, self.wait_count, self.stopped_epoch = None, 0, 0
            self.stopping_reason, self.stopping_reason_message = EarlyStoppingReason.NOT_STOPPED, None
            if trainer.is_global_zero:
                print(f"tlframe: resuming a run that stopped early at {where} (early_stopping.resume=true): "
                      "training on with the patience counter reset.", flush=True)
            return
        trainer.should_stop = True  # the same decision on every rank: the restored state is the same
        self.ended_on_resume = True
        if trainer.is_global_zero:
            print(f"tlframe: not training further: the run of this checkpoint stopped early at {where} "
                  f"({self.stop['monitor']} did not improve). Pass --early_stopping.resume=true to train on.", flush=True)

    def _should_skip_check(self, trainer: pl.Trainer) -> bool:
        return not self.enabled or super()._should_skip_check(trainer)

    def _validate_condition_metric(self, logs: dict[str, torch.Tensor]) -> bool:
        if self.monitor not in logs:
            from tlframe.checks import ConfigError

            logged = ", ".join(sorted(k for k in logs if k.startswith("val/"))) or "none"
            raise ConfigError(f"early_stopping.monitor={self.monitor!r} is not logged by this run (logged at validation: "
                              f"{logged}): monitor one of those")
        return True

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, Optional[str]]:
        before = self.best_score
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        self._improved = self.best_score is not before
        return should_stop, reason

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        self._improved, previous, self.stopped_epoch = False, self.stopped_epoch, -1
        super()._run_early_stopping_check(trainer)
        stopped = self.stopped_epoch == trainer.current_epoch  # Lightning sets it when this check stops the run
        if not stopped:
            self.stopped_epoch = previous
        if self._improved:
            self.best_epoch, self.best_step = trainer.current_epoch, trainer.global_step
        if stopped and self.stop is None:
            value = trainer.callback_metrics.get(self.monitor)
            self.stop = {
                "monitor": self.monitor, "mode": self.mode, "patience": self.patience,
                "min_delta": abs(float(self.min_delta)), "epoch": trainer.current_epoch, "step": trainer.global_step,
                "value": None if value is None else float(value), "best_value": float(self.best_score),
                "best_epoch": self.best_epoch, "best_step": self.best_step,
                "reason": self.stopping_reason.name.lower(), "message": self.stopping_reason_message,
            }

    def describe(self) -> Optional[str]:
        """One line on the stop (for the run summary), or None when the run did not stop early."""
        stop = self.stop
        if stop is None:
            return None
        best = (f"best {stop['best_value']:.4f} at epoch {stop['best_epoch']}, step {stop['best_step']}"
                if stop.get("best_epoch") is not None else f"best {stop['best_value']:.4f}")
        why = (f"{stop['monitor']} did not improve by more than {stop['min_delta']:g} in {stop['patience']} "
               f"validation(s) ({stop['mode']})" if stop["reason"] == "patience_exhausted" else
               stop.get("message") or stop["reason"])
        where = f"epoch {stop['epoch']}, step {stop['step']}"
        if self.ended_on_resume:
            return (f"not trained further (the resumed run had stopped early at {where}; "
                    f"--early_stopping.resume=true trains on): {why}; {best}")
        return f"stopped at {where}: {why}; {best}"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: read on every rank (see the module docstring)
        if self.stop is None or not trainer.is_global_zero or not log_dir:
            return
        record = {**self.stop, "ended_on_resume": self.ended_on_resume, "global_step_now": trainer.global_step}
        atomic_write_text(Path(log_dir) / "early_stop.json", json.dumps(record, indent=2) + "\n")


class RunSummary(pl.Callback):
    """Print the final validation/test metrics and where the logs and checkpoints are (rank 0 only),
    at the end of ``fit``, ``validate`` and ``test``."""

    def _report(self, trainer: pl.Trainer, prefix: str) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: read on every rank, print on rank 0
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        lines = [f"tlframe: {prefix.rstrip('/')} results"]
        lines += [f"  {k:<32s} {v:.4f}" for k, v in sorted(metrics.items())]
        if log_dir:
            lines.append(f"  logs:        {Path(log_dir).resolve()}  (tensorboard --logdir {Path(log_dir).parent.resolve()})")
        ckpt = trainer.checkpoint_callback
        stopper = next((c for c in trainer.callbacks if isinstance(c, TransferEarlyStopping)), None)
        stop = stopper.describe() if stopper is not None and trainer.state.fn == TrainerFn.FITTING else None
        if stop:
            lines.append(f"  early stop:  {stop}" + (f"  ({Path(log_dir).resolve() / 'early_stop.json'})" if log_dir else ""))
        if isinstance(ckpt, ModelCheckpoint) and trainer.state.fn == TrainerFn.FITTING:
            if ckpt.last_model_path:
                lines.append(f"  last ckpt:   {ckpt.last_model_path}")
            if ckpt.best_model_path:
                lines.append(f"  best ckpt:   {ckpt.best_model_path}  (by {ckpt.monitor}, no target labels used)")
        print("\n".join(lines), flush=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "val/")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # ``tlframe validate`` (fit reports at its end)
            self._report(trainer, "val/")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "test/")


class PredictionWriter(BasePredictionWriter):
    """Write ``tlframe predict`` results to ``predictions.csv``, one row per image of the predict split, in its order.

    Columns: ``index`` (position in the predict split), ``sample`` (the image file's path for
    folder and list domains, ``<domain> <split> #<i>`` for in-memory data sets), ``label`` (the
    true class name, empty when the split is unlabelled), ``pred`` (the predicted class name),
    ``confidence`` (its probability), then ``prob_<class name>`` per class (softmax).

    The predict split is ``data.predict_domain`` when set (any folder, list or data set), else
    the target test split. The file goes to ``output_dir`` when given, else to the run directory
    (for ``tlframe predict --ckpt_path``: ``<checkpoint's run>/predict/<checkpoint name>/``).
    Under DDP every rank predicts its own shard (Lightning's unrepeated distributed sampler: no
    padding), the rows are gathered to rank 0 and written once, in data set order. Written to a
    temporary file and renamed, so an interrupted run never leaves a truncated file.
    """

    def __init__(self, output_dir: Optional[str] = None):
        super().__init__(write_interval="batch_and_epoch")
        self.output_dir = output_dir
        self._rows: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        probs = prediction["probs"].detach().float().cpu()
        labels = prediction.get("labels")
        labels = torch.full((len(probs),), -1) if labels is None else labels.detach().cpu()
        offset = sum(len(r[1]) for r in self._rows)
        indices = list(batch_indices) if batch_indices else list(range(offset, offset + len(probs)))
        self._rows.append((indices, probs, labels))

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        out_dir = Path(self.output_dir or trainer.log_dir or ".")  # log_dir: a collective under DDP, every rank
        parts = [self._rows]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, self._rows)  # every rank takes part; rank 0 writes
        self._rows = []
        if not trainer.is_global_zero:
            return
        rows = [r for part in parts for r in (part or [])]
        if not rows:
            return
        index = torch.tensor([i for r in rows for i in r[0]], dtype=torch.long)
        order = torch.argsort(index)
        index = index[order]
        probs, labels = torch.cat([r[1] for r in rows])[order], torch.cat([r[2] for r in rows])[order]
        dm = getattr(trainer, "datamodule", None)
        classes = list(getattr(dm, "classes", None) or [str(c) for c in range(probs.shape[1])])
        if len(classes) != probs.shape[1]:
            classes = [str(c) for c in range(probs.shape[1])]
        samples = dm.predict_samples() if hasattr(dm, "predict_samples") else None
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "predictions.csv"
        conf, pred = probs.max(dim=1)
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "sample", "label", "pred", "confidence", *[f"prob_{c}" for c in classes]])
            for i, y, p, c, row in zip(index.tolist(), labels.tolist(), pred.tolist(), conf.tolist(), probs.tolist()):
                sample = samples[i] if samples is not None and i < len(samples) else str(i)
                writer.writerow([i, sample, classes[y] if y >= 0 else "", classes[p], f"{c:.6f}",
                                 *[f"{v:.6f}" for v in row]])
        print(f"tlframe: wrote {len(probs)} predictions to {path}", flush=True)


def _hparam_value(value: Any) -> Any:
    """A value the HParams tab shows as written: numbers and strings as they are, booleans and None as words."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "none"
    return value if isinstance(value, (int, float, str)) else str(value)


def _short_class(spec: Any) -> str:
    """``{"class_path": "a.b.C", "init_args": {...}}`` -> ``C(k=v, ...)`` (None-valued arguments left out)."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        return str(spec)
    args = ", ".join(f"{k}={v}" for k, v in (spec.get("init_args") or {}).items() if v is not None)
    return f"{spec['class_path'].rsplit('.', 1)[-1]}({args})"


def research_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters a researcher compares across runs, from a resolved CLI config, in reading order.

    ``backbone``, ``pretrained``, ``weights``, ``strategy`` (class name) and each strategy argument
    (``strategy.trade_off``, ...), the optimisation (``lr``, ``optimizer``, ``scheduler``, ``weight_decay``,
    ``batch_size``, ``max_epochs``/``max_steps``, ``iters_per_epoch``, ``precision``, ``devices``), the data
    (``source``/``target`` as ``Class(args)``, ``source_samples_per_class``, ``train_augmentation``,
    ``image_size``) and the seeds (``seed``, ``split_seed``). Booleans and None read as words.
    """
    model, data, trainer = (config.get(k) or {} for k in ("model", "data", "trainer"))
    strategy = model.get("strategy") or {}
    out: dict[str, Any] = {
        "backbone": model.get("backbone"), "pretrained": model.get("pretrained"),
        "weights": Path(model["weights"]).name if model.get("weights") else None,
        "strategy": str(strategy.get("class_path", strategy)).rsplit(".", 1)[-1] if strategy else "FineTune",
    }
    out.update({f"strategy.{k}": v for k, v in (strategy.get("init_args") or {}).items()
                if isinstance(strategy, dict)})
    out.update({
        "lr": model.get("lr"),
        "optimizer": _short_class(model["optimizer"]) if model.get("optimizer") else "SGD",
        "scheduler": _short_class(model["scheduler"]) if model.get("scheduler") else "InverseDecayLR",
        "weight_decay": model.get("weight_decay"), "bottleneck_dim": model.get("bottleneck_dim"),
        "batch_size": data.get("batch_size"), "max_epochs": trainer.get("max_epochs"),
        "max_steps": trainer.get("max_steps"), "iters_per_epoch": data.get("iters_per_epoch"),
        "precision": trainer.get("precision"), "devices": trainer.get("devices"),
        "source": _short_class(data.get("source")), "target": _short_class(data.get("target")),
        "source_samples_per_class": data.get("source_samples_per_class"), "source_sampler": data.get("source_sampler"),
        "train_augmentation": data.get("train_augmentation"), "image_size": data.get("image_size"),
        "seed": config.get("seed_everything"), "split_seed": data.get("split_seed"),
    })
    return {k: _hparam_value(v) for k, v in out.items()}


def _tensorboard(trainer: pl.Trainer) -> Optional[TensorBoardLogger]:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class TransferInsights(pl.Callback):
    """TensorBoard diagnostics of a transfer run, on top of the scalars the module logs.

    Per validation (not during the sanity check):

    - ``val/a_distance`` (Scalars): proxy A-distance ``2 (1 - 2 err)`` of a linear domain
      classifier between sampled source-validation and target bottleneck features
      (:func:`tlframe.validators.proxy_a_distance`; 0: indistinguishable, 2: separable);
    - ``val/target_confusion`` (Images): row-normalised target confusion matrix, when the
      target has labels (:func:`tlframe.validators.confusion_image`).

    Projector: ``bottleneck_features``, the sampled source and target bottleneck features with
    metadata columns ``domain`` (``source``/``target``, first: the column to colour by to see the
    alignment) and ``class`` (class name, ``unlabelled`` for an unlabelled target), written at the end of ``fit`` and, with
    ``projector_every_n_epochs``, every that many epochs.

    HParams: at the end of ``fit``, the hyperparameters a researcher compares
    (:func:`research_hparams` of the run's resolved ``config.yaml``: backbone, strategy and its
    arguments, LR, optimizer, batch, budget, domains, seeds; not the ~140 logging and checkpoint
    keys) with the final ``val/*`` metrics, so TensorBoard's HParams tab compares the runs of a sweep. Lightning's placeholder metric
    ``hp_metric`` (written at the start with ``default_hp_metric=True``) is switched off, as
    TensorBoard keeps only the first hparams record of a run.

    Cost (bounded; tens of milliseconds per validation on the quickstart, see the README): at most
    ``max_samples`` rows per domain are kept (a uniform seeded sample,
    gathered across DDP ranks); the A-distance is ``a_distance_steps`` L-BFGS iterations of a
    logistic regression on ``max_samples`` rows; the confusion matrix is ``C x C`` counts.

    Args:
        max_samples: sampled rows per domain for the A-distance and the projector.
        a_distance: log ``val/a_distance``.
        a_distance_steps: L-BFGS iterations of the domain classifier.
        confusion_matrix: log the ``val/target_confusion`` image (labelled target only).
        projector: write the embedding projector snapshot at the end of ``fit``.
        projector_every_n_epochs: also write it after every n-th epoch's validation.
        hparams: write the config and final metrics for the HParams tab.
        seed: seed of the row samples (the same rows every epoch).
    """

    def __init__(self, max_samples: int = 500, a_distance: bool = True, a_distance_steps: int = 100,
                 confusion_matrix: bool = True, projector: bool = True, projector_every_n_epochs: Optional[int] = None,
                 hparams: bool = True, seed: int = 0):
        if max_samples < 2:
            raise ValueError(f"max_samples={max_samples} must be >= 2.")
        if projector_every_n_epochs is not None and projector_every_n_epochs < 1:
            raise ValueError(f"projector_every_n_epochs={projector_every_n_epochs} must be >= 1 (or null).")
        self.max_samples, self.a_distance, self.a_distance_steps = int(max_samples), a_distance, int(a_distance_steps)
        self.confusion_matrix, self.projector, self.hparams = confusion_matrix, projector, hparams
        self.projector_every_n_epochs, self.seed = projector_every_n_epochs, int(seed)
        self._samples: dict[str, RowSample] = {}
        self._confusion: Optional[MulticlassConfusionMatrix] = None
        self._last: dict[str, dict[str, torch.Tensor]] = {}
        self._projector_step: Optional[int] = None
        #: seconds spent in the last validation's epoch-end work (gathering, A-distance, image)
        self.last_cost_s = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._samples = {d: RowSample(("features", "labels"), self.max_samples, seed=mix(self.seed, i))
                         for i, d in enumerate(("source", "target"))}
        num_classes = getattr(pl_module, "num_classes", None)
        self._confusion = MulticlassConfusionMatrix(num_classes) if self.confusion_matrix and num_classes else None
        tb = _tensorboard(trainer)
        if self.hparams and tb is not None and stage == "fit":
            tb._default_hp_metric = False  # else Lightning's hp_metric=-1 record would be the one TensorBoard shows

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metric in (*self._samples.values(), self._confusion):
            if metric is not None:
                metric.to(pl_module.device)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, dict) or outputs.get("domain") not in self._samples:
            return
        domain, labels = outputs["domain"], outputs["labels"]
        if self.a_distance or self.projector or self.projector_every_n_epochs:
            self._samples[domain].update(features=outputs["features"].float(), labels=labels)
        labelled = labels >= 0
        if self._confusion is not None and domain == "target" and bool(labelled.any()):
            self._confusion.update(outputs["logits"][labelled].argmax(dim=1), labels[labelled])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        confusion = self._confusion
        samples = {d: m.compute() if m.update_called else {} for d, m in self._samples.items()}  # gathered over ranks
        confmat = confusion.compute() if confusion is not None and confusion.update_called else None
        for metric in (*self._samples.values(), confusion):
            if metric is not None:
                metric.reset()
        if trainer.sanity_checking:
            return
        if self.a_distance and samples["source"] and samples["target"]:
            pl_module.log("val/a_distance", proxy_a_distance(samples["source"]["features"], samples["target"]["features"],
                                                             steps=self.a_distance_steps, seed=self.seed))
        tb = _tensorboard(trainer)
        if confmat is not None and tb is not None and trainer.is_global_zero:
            classes = getattr(getattr(trainer, "datamodule", None), "classes", None)
            tb.experiment.add_image("val/target_confusion", confusion_image(confmat, classes),
                                    global_step=trainer.global_step)
        self._last = {d: {k: v.cpu() for k, v in rows.items()} for d, rows in samples.items() if rows}
        every = self.projector_every_n_epochs
        if every and (trainer.current_epoch + 1) % every == 0:
            self._write_projector(trainer)
        self.last_cost_s = time.perf_counter() - start

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.projector:
            self._write_projector(trainer)
        if self.hparams:
            self._write_hparams(trainer)

    def _write_projector(self, trainer: pl.Trainer) -> None:
        tb = _tensorboard(trainer)
        if tb is None or not trainer.is_global_zero or not self._last or self._projector_step == trainer.global_step:
            return
        classes = getattr(getattr(trainer, "datamodule", None), "classes", None)
        features, metadata = [], []
        for domain, rows in self._last.items():
            features.append(rows["features"])
            metadata += [[domain, (classes[y] if classes else str(y)) if y >= 0 else "unlabelled"]
                         for y in rows["labels"].tolist()]
        tb.experiment.add_embedding(torch.cat(features), metadata=metadata, metadata_header=["domain", "class"],
                                    global_step=trainer.global_step, tag="bottleneck_features")
        self._projector_step = trainer.global_step

    @rank_zero_only
    def _write_hparams(self, trainer: pl.Trainer) -> None:
        from torch.utils.tensorboard.summary import hparams

        tb = _tensorboard(trainer)
        if tb is None:
            return
        config_file = Path(tb.log_dir) / "config.yaml"
        if config_file.is_file():
            config = yaml.safe_load(config_file.read_text()) or {}
        else:
            module, dm = trainer.lightning_module, getattr(trainer, "datamodule", None)
            config = {"model": dict(module.hparams), "data": dict(getattr(dm, "hparams", {}) or {})}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and torch.as_tensor(v).numel() == 1}
        writer = tb.experiment._get_file_writer()
        for summary in hparams(research_hparams(config), metrics):
            writer.add_summary(summary, trainer.global_step)
        writer.flush()
