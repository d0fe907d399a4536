"""One rank of a 2-process CPU DDP run: ``python ddp_fit.py OUT_DIR NAME...`` (NAME: a strategy or ``syncbn``).

test_adaptation.py starts the two ranks itself (``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT`` in
the environment, as a cluster launcher would), so one pair of processes runs every NAME in turn
and pays the start-up and process-group set-up once.

A strategy NAME: fit (2 epochs, TensorBoard logger and ModelCheckpoint writing into
``OUT_DIR/NAME``), then validate and test. Each rank writes ``NAME/rank{r}.json`` with its GRL
coefficient and LRs per step, the training sample indices it drew from each domain per epoch, a
checksum of every parameter after training and the synced validate/test metrics, so the test
can check that the ranks agree, never saw the same sample in an epoch, and that only rank 0
wrote files.

``syncbn`` (run it last): a short FineTune fit with ``sync_batchnorm=True``; writes whether torch supports
SyncBatchNorm on CPU/gloo and, if it does, the BatchNorm running statistics.
"""

import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, before any installed tlframe
from conftest import make_synthetic_dm  # noqa: E402

import tlframe  # noqa: E402
from tlframe.data import TransferDataModule  # noqa: E402
from tlframe.callbacks import TransferInsights  # noqa: E402
from tlframe.module import TransferModule  # noqa: E402
from tlframe.strategies import DANN, MCD, MMD, SHOT, FineTune, FixMatch, FrozenFeatures, MeanTeacher  # noqa: E402

STRATEGIES = {"finetune": FineTune, "frozen": FrozenFeatures, "dann": DANN, "mmd": MMD,
              "frozen_cached": lambda: FrozenFeatures(cache_features="memory"),
              # BBSE re-estimated at the start of epoch 1 from both ranks' shards (counts summed over ranks)
              "dann_bbse": lambda: DANN(label_shift="bbse", label_shift_start_epoch=1),
              # two views of each target image; every pseudo-label kept, so the loss is active
              "fixmatch": lambda: FixMatch(threshold=0.0),
              # the EMA teacher (state of its own, ignored by DDP) follows the synchronised student on both ranks
              "mean_teacher": lambda: MeanTeacher(ema_decay=0.9),
              # source-free: every rank labels the whole target split (the same labels), then trains on its shard
              "shot": lambda: SHOT(pseudo_label_weight=0.3),
              # manual optimization: 3 + num_k optimizer steps per batch, several backward passes per training_step
              "mcd": lambda: MCD(classifier_width=64)}


class IndexLog(Dataset):
    """A dataset that records every index it is asked for (num_workers=0: in this process)."""

    def __init__(self, ds: Dataset, log: list[int]):
        self.ds, self.log = ds, log

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        self.log.append(int(i))
        return self.ds[i]


class RecordingDataModule(TransferDataModule):
    """The synthetic pair with its two training sets wrapped in :class:`IndexLog`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn: dict[str, list[int]] = {"source": [], "target": []}

    def setup(self, stage=None) -> None:
        super().setup(stage)
        if not isinstance(self.source_train, IndexLog):
            self.source_train = IndexLog(self.source_train, self.drawn["source"])
            self.target_train = IndexLog(self.target_train, self.drawn["target"])


class Recorder(pl.Callback):
    def __init__(self, dm: RecordingDataModule):
        self.dm = dm
        self.steps = []
        self.epochs = []  # per epoch: {"source": [indices], "target": [indices]}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        coeff = trainer.callback_metrics.get("train/grl_coeff")
        self.steps.append({"step": trainer.global_step, "coeff": None if coeff is None else float(coeff),
                           "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups]})

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: list(v) for k, v in self.dm.drawn.items()})
        for v in self.dm.drawn.values():
            v.clear()


def quiet_trainer(out: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(**{**dict(accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False, log_every_n_steps=1,
                                enable_model_summary=False, default_root_dir=str(out)), **kwargs})


def metrics(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def run_strategy(name: str, out: Path) -> None:
    pl.seed_everything(0)
    kwargs = {"grl_max_steps": 4} if name == "dann" else {}
    model = TransferModule("dtn", num_classes=10, strategy=STRATEGIES[name](**kwargs))
    dm = _recording_dm()
    recorder = Recorder(dm)
    trainer = quiet_trainer(out, max_epochs=2, logger=TensorBoardLogger(str(out / "tb"), name="run"),
                            callbacks=[recorder, TransferInsights(max_samples=24), ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True)],
                            limit_val_batches=2)
    trainer.fit(model, dm)
    fit_metrics = metrics(trainer, "val/")
    checksums = {k: float(v.double().sum()) for k, v in model.state_dict().items() if v.is_floating_point()}
    validate_metrics = {k: v for per_loader in trainer.validate(model, dm, verbose=False) for k, v in per_loader.items()}
    trainer.test(model, dm, verbose=False)
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": recorder.steps,
              "epochs": recorder.epochs, "checksums": checksums, "val": fit_metrics, "validate": validate_metrics,
              "test": metrics(trainer, "test/"), "train_batches": trainer.num_training_batches,
              "tlframe_file": tlframe.__file__, "pid": os.getpid(),
              "label_shift_weight": getattr(model.strategy, "label_shift_weight", torch.zeros(0)).tolist(),
              "label_shift_epoch": int(getattr(model.strategy, "label_shift_epoch", torch.tensor(-1))),
              "ema_step": int(model.strategy.terms[0].teacher.ema_step) if name == "mean_teacher" else None,
              "pseudo_labels": model.strategy.pseudo_labels.tolist() if name == "shot" else None}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _recording_dm() -> RecordingDataModule:
    base = make_synthetic_dm(num_train=64, batch_size=8, iters_per_epoch=4)
    return RecordingDataModule(source=base.source, target=base.target, batch_size=8, iters_per_epoch=4)


def run_sync_batchnorm(out: Path) -> None:
    pl.seed_everything(0)
    model = TransferModule("dtn", num_classes=10, strategy=FineTune())
    trainer = quiet_trainer(out, max_steps=2, sync_batchnorm=True, logger=False, enable_checkpointing=False,
                            limit_val_batches=0)
    record: dict = {"rank": None}
    try:
        trainer.fit(model, make_synthetic_dm(num_train=64, batch_size=8, iters_per_epoch=4))
        record["supported"] = True
        record["bn"] = {k: v.tolist() for k, v in model.state_dict().items() if "running_mean" in k}
        record["sync_bn_modules"] = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.lightning_module.modules())
    except ValueError as err:  # torch 2.14 DDP on CPU: "SyncBatchNorm layers only work with GPU modules"
        record["supported"] = False
        record["error"] = str(err)
    record["rank"] = trainer.global_rank
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for what in sys.argv[2:]:
        (root / what).mkdir(parents=True, exist_ok=True)
        run_sync_batchnorm(root / what) if what == "syncbn" else run_strategy(what, root / what)
