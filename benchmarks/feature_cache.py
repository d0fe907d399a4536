"""Per-epoch training time of ``FrozenFeatures`` with and without the feature cache.

Trains the head of a frozen, randomly initialised timm backbone (no download) on the synthetic
source/target pair, once with ``cache_features: none`` (the backbone runs on every batch) and
once with the cache, same seed, same data, same number of steps, validation off. Reports the
median training-epoch time after ``--warmup`` epochs, the one-off cache build time (the
backbone over the source and target train splits, the only splits a fit without validation
serves) and the ratio, and writes them with the machine and the command to ``--results``
(atomically).

    python benchmarks/feature_cache.py                                   # resnet18 at 160 px, 256 images
    python benchmarks/feature_cache.py --backbone resnet50 --image-size 128 --images 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.digits.common import (REPO, display_path, machine_lines, markdown_table, regen_command,  # noqa: E402
                                      resolve_path, today)
from tlframe.atomic import atomic_write_text  # noqa: E402
from tlframe.data import SyntheticDomain, TransferDataModule  # noqa: E402
from tlframe.module import TransferModule  # noqa: E402
from tlframe.strategies import FrozenFeatures  # noqa: E402

DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "feature_cache.md"


class EpochTimer(pl.Callback):
    """Wall time of every training epoch (from ``on_train_epoch_start`` to ``on_train_epoch_end``)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def measure(cache: str, args: argparse.Namespace) -> dict[str, Any]:
    """One seeded fit; per-epoch times, their median after warm-up, and the cache build time."""
    pl.seed_everything(args.seed, verbose=False)
    dm = TransferDataModule(
        source=SyntheticDomain("source", num_train=args.images, num_test=8, image_size=args.image_size, seed=0),
        target=SyntheticDomain("target", num_train=args.images, num_test=8, image_size=args.image_size, seed=1,
                               labelled=False),
        batch_size=args.batch_size, val_fraction=0.0, image_size=args.image_size, num_workers=args.num_workers)
    model = TransferModule(args.backbone, num_classes=10, strategy=FrozenFeatures(cache_features=cache))
    timer = EpochTimer()
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, max_epochs=args.warmup + args.epochs,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(model, dm)
    measured = timer.seconds[args.warmup:]
    return {"epochs": timer.seconds, "median": statistics.median(measured), "steps": dm.num_train_batches(),
            "build": model.feature_cache.build_seconds if model.feature_cache is not None else 0.0}


def report(args: argparse.Namespace, argv: Sequence[str], plain: dict, cached: dict) -> str:
    ratio = plain["median"] / cached["median"]
    verdict = "reached" if ratio >= 100 else "NOT reached"
    per_step = [1000 * r["median"] / r["steps"] for r in (plain, cached)]
    rows = [
        ["uncached (`cache_features: none`)", f"{plain['median']:.3f}", f"{per_step[0]:.1f}", "–",
         ", ".join(f"{s:.3f}" for s in plain["epochs"])],
        [f"cached (`cache_features: {args.cache}`)", f"{cached['median']:.4f}", f"{per_step[1]:.2f}",
         f"{cached['build']:.2f}", ", ".join(f"{s:.4f}" for s in cached["epochs"])],
    ]
    return "\n".join([
        "# FrozenFeatures: feature cache vs recomputing the backbone",
        "",
        f"Generated {today()} by `{regen_command(Path(__file__), argv)}`.",
        "",
        *machine_lines(),
        f"- backbone `{args.backbone}` (random init, frozen), input {args.image_size} px, {args.images} source + "
        f"{args.images} target train images (synthetic), batch {args.batch_size}, {plain['steps']} steps/epoch, "
        f"num_workers {args.num_workers}, {torch.get_num_threads()} torch thread(s), validation off",
        f"- per-epoch time: median of {args.epochs} epochs after {args.warmup} warm-up epoch(s), from "
        "`on_train_epoch_start` to `on_train_epoch_end`",
        "- cache build: one pass of the backbone (eval transform, eval mode, no grad) over the source and target "
        "train splits, before the first epoch",
        "",
        markdown_table(["run", "s/epoch (median)", "ms/step", "cache build (s)", "every epoch (s), warm-up first"], rows),
        "",
        f"**Ratio uncached / cached per epoch: {ratio:.0f}x** (target 100x: {verdict}). The cache pays for itself "
        f"after {cached['build'] / max(plain['median'] - cached['median'], 1e-9):.1f} epoch(s).",
        "",
        "The cached epoch is bounded by Lightning's per-step work (hooks, logging, optimizer step), not by the "
        "head, so the ratio grows with the backbone's cost per image (bigger model, larger input) and shrinks "
        "for small ones. On a shared machine the figures vary from run to run.",
        "",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18", help="timm model name (random init; no download)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--images", type=int, default=256, help="train images per domain")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache", choices=["memory", "disk"], default="memory")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both runs (0: torch's default). 1 by default: on a machine "
                             "shared with other jobs, multi-threaded small ops stall and the cached figure is noise")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, help=f"markdown output (default {display_path(DEFAULT_RESULTS)})")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.warmup < 0:
        parser.error("--epochs must be >= 1 and --warmup >= 0")
    results = resolve_path(args.results, DEFAULT_RESULTS)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plain = measure("none", args)
    cached = measure(args.cache, args)
    text = report(args, argv, plain, cached)
    atomic_write_text(results, text)
    print(text)
    print(f"feature_cache: wrote {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
