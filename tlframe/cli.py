"""``tlframe fit | validate | test | predict -c config.yaml`` (LightningCLI)."""

from __future__ import annotations

import sys
from typing import Optional

from jsonargparse import lazy_instance
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from tlframe.backbones import BackboneError
from tlframe.callbacks import PredictionWriter, RunSummary
from tlframe.data import DataError, TransferDataModule
from tlframe.module import TransferModule

__all__ = ["TLFrameCLI", "main"]


class TLFrameCLI(LightningCLI):
    """LightningCLI with tlframe's defaults.

    - ``model.num_classes`` is linked from ``data.num_classes``;
    - TensorBoard logger under ``runs/<name>/version_N`` (the resolved config is saved there);
    - checkpoints: ``last.ckpt`` and the best by source validation accuracy (``checkpoint.*``),
      never by target labels;
    - per-parameter-group learning rates logged (``lr_monitor.*``);
    - ``tlframe predict`` writes ``predictions.csv`` into the run directory (``predictions.*``).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/source_acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:03d}-step{step:06d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults({"trainer.logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="tlframe")})


def main(args: Optional[list[str]] = None) -> None:
    """Run the CLI; bad input (data, backbone, weights) ends with its message and exit code 2, not a traceback."""
    try:
        TLFrameCLI(TransferModule, TransferDataModule, seed_everything_default=0,
                   save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False)
    except (DataError, BackboneError) as err:
        print(f"tlframe: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
