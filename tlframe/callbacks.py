"""Callbacks that the CLI adds to every run."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["RunSummary"]


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
