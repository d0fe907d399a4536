"""Run by test_adaptation.py as ``python ddp_fit.py STRATEGY OUT_DIR``: a 2-process CPU DDP fit.

Each rank writes ``rank{r}.json`` with its GRL coefficient and LRs per step, a checksum of
every parameter after training and the synced validation metrics, so the test can check
that the ranks agree.
"""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_synthetic_dm  # noqa: E402

from tlframe.callbacks import TransferInsights  # noqa: E402
from tlframe.module import TransferModule  # noqa: E402
from tlframe.strategies import DANN, MMD, FineTune, FrozenFeatures  # noqa: E402

STRATEGIES = {"finetune": FineTune, "frozen": FrozenFeatures, "dann": DANN, "mmd": MMD,
              "frozen_cached": lambda: FrozenFeatures(cache_features="memory")}


class Recorder(pl.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        coeff = trainer.callback_metrics.get("train/grl_coeff")
        self.steps.append({"step": trainer.global_step, "coeff": None if coeff is None else float(coeff),
                           "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups]})


def main(name: str, out: Path) -> None:
    pl.seed_everything(0)
    kwargs = {"grl_max_steps": 4} if name == "dann" else {}
    model = TransferModule("dtn", num_classes=10, strategy=STRATEGIES[name](**kwargs))
    recorder = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder, TransferInsights(max_samples=24)], default_root_dir=str(out))
    dm = make_synthetic_dm(num_train=64, batch_size=8, iters_per_epoch=4)
    trainer.fit(model, dm)
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    trainer.test(model, dm, verbose=False)
    test_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    checksums = {k: float(v.double().sum()) for k, v in model.state_dict().items() if v.is_floating_point()}
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": recorder.steps,
              "checksums": checksums, "val": fit_metrics, "test": test_metrics,
              "train_batches": trainer.num_training_batches}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
