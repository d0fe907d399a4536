"""Callbacks that the CLI adds to every run."""

from __future__ import annotations

import csv
import json
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from tlframe.atomic import atomic_path, atomic_write_text
from tlframe.seeding import run_seed

__all__ = ["RunSummary", "PredictionWriter", "RunInfo", "environment_info"]

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
    working directory, command line, seed, machine) into the run directory, next to the
    ``config.yaml`` that the CLI saves; rank 0 only. Written atomically at the start of
    every ``fit``/``validate``/``test``/``predict``.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and trainer.log_dir:
            info = {"stage": stage, **environment_info()}
            atomic_write_text(Path(trainer.log_dir) / "run_info.json", json.dumps(info, indent=2) + "\n")


class RunSummary(pl.Callback):
    """Print the final validation/test metrics and where the logs and checkpoints are (rank 0 only)."""

    @rank_zero_only
    def _report(self, trainer: pl.Trainer, prefix: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        lines = [f"tlframe: {prefix.rstrip('/')} results"]
        lines += [f"  {k:<32s} {v:.4f}" for k, v in sorted(metrics.items())]
        log_dir = trainer.log_dir
        if log_dir:
            lines.append(f"  logs:        {Path(log_dir).resolve()}  (tensorboard --logdir {Path(log_dir).parent.resolve()})")
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and prefix == "val/":
            if ckpt.last_model_path:
                lines.append(f"  last ckpt:   {ckpt.last_model_path}")
            if ckpt.best_model_path:
                lines.append(f"  best ckpt:   {ckpt.best_model_path}  (by {ckpt.monitor}, no target labels used)")
        print("\n".join(lines), flush=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "val/")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "test/")


class PredictionWriter(BasePredictionWriter):
    """Write ``tlframe predict`` results to ``<run dir>/predictions.csv``: ``index,pred,confidence,prob_0..prob_{C-1}``.

    ``index`` is the position in the predict split (the target test split). Written to a
    temporary file and renamed, so an interrupted run never leaves a truncated file.
    Single-process only: under DDP every rank would hold a part (run predict on one device).
    """

    def __init__(self, output_dir: Optional[str] = None):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        if not trainer.is_global_zero or not predictions:
            return
        batches = predictions[0] if isinstance(predictions[0], list) else predictions
        probs = torch.cat([b["probs"] for b in batches]).float()
        out_dir = Path(self.output_dir or trainer.log_dir or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "predictions.csv"
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "pred", "confidence", *[f"prob_{c}" for c in range(probs.shape[1])]])
            conf, pred = probs.max(dim=1)
            for i, (p, c, row) in enumerate(zip(pred.tolist(), conf.tolist(), probs.tolist())):
                writer.writerow([i, p, f"{c:.6f}", *[f"{v:.6f}" for v in row]])
        print(f"tlframe: wrote {len(probs)} predictions to {path}", flush=True)
