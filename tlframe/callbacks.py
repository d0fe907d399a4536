"""Callbacks that the CLI adds to every run."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["RunSummary", "PredictionWriter"]


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
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "pred", "confidence", *[f"prob_{c}" for c in range(probs.shape[1])]])
            conf, pred = probs.max(dim=1)
            for i, (p, c, row) in enumerate(zip(pred.tolist(), conf.tolist(), probs.tolist())):
                writer.writerow([i, p, f"{c:.6f}", *[f"{v:.6f}" for v in row]])
        os.replace(tmp, path)
        print(f"tlframe: wrote {len(probs)} predictions to {path}", flush=True)
