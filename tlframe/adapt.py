"""``tlframe adapt``: test-time adaptation of a trained checkpoint on the unlabelled target stream (TENT, AdaBN).

Usage::

    tlframe adapt --checkpoint RUN/checkpoints/last.ckpt --method tent [-c RUN/config.yaml] [--out DIR]
                  [--lr 0.001] [--batch-size 64] [--seed 0] [--precision 32|bf16] [--device auto] [--data.* ...]

The stream is the **target test split** of the config's ``data`` section (by default the ``config.yaml`` the
run saved beside its ``checkpoints/`` folder), in an order drawn with ``--seed``; its labels are read only to
score the predictions, never to adapt. Methods:

- ``none``: the checkpoint as it is (the reference every adapted number is compared with).
- ``adabn`` (Li et al., "Revisiting batch normalization for practical domain adaptation", 2016): every
  BatchNorm layer's running statistics are recomputed on the target stream (one pass, no gradient, the
  cumulative average over batches: ``momentum=None``); nothing else changes. The model is then evaluated in
  eval mode.
- ``tent`` (Wang et al., "Tent: fully test-time adaptation by entropy minimization", ICLR 2021): BatchNorm
  layers normalise with the statistics of the current batch (their running statistics are neither used nor
  updated), and only their affine parameters (``weight``, ``bias``) are trained, by Adam (``--lr``, betas
  0.9/0.999, the paper's optimiser for its small-image benchmarks) on the mean prediction entropy of each
  batch, one step per batch. **Online accuracy**: each batch is predicted *before* the step it triggers, as in
  the paper. **After one pass**: the adapted model (still with batch statistics) predicts the whole stream
  again, in the same batches.

Writes ``<out>/adapt.json`` (accuracies, mean entropies, the parameters updated, the settings) and, for
``adabn``/``tent``, ``<out>/adapted.ckpt``: the checkpoint with the adapted weights, usable by ``tlframe test``
(``--ckpt_path``) and ``load_from_checkpoint``. A checkpoint is evaluated in eval mode, with running statistics,
so for ``tent`` its running statistics are recomputed on the stream as AdaBN does (TENT's own protocol uses
batch statistics instead; ``adapt.json`` has both numbers).
Bad input ends with one ``tlframe adapt: error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from tlframe.checks import ConfigError, check_checkpoint_file

__all__ = ["METHODS", "batchnorm_layers", "configure_adabn", "configure_tent", "adabn", "tent", "evaluate",
           "AdaptResult", "main"]

METHODS = ("none", "adabn", "tent")
EXIT_OK, EXIT_BAD_INPUT = 0, 2
_BN = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (1-d, 2-d, 3-d, SyncBatchNorm) of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _BN)]


def _need_bn(model: nn.Module, method: str) -> list[nn.Module]:
    layers = batchnorm_layers(model)
    if not layers:
        raise ConfigError(f"{method} adapts BatchNorm layers and this model has none: use a backbone with "
                          "BatchNorm (or a head with a bottleneck, model.bottleneck_dim > 0)")
    return layers


def configure_adabn(model: nn.Module) -> list[nn.Module]:
    """AdaBN: eval mode except BatchNorm, whose running statistics are reset and then accumulated as a cumulative
    average (``momentum=None``) by the next forward passes. Returns the BatchNorm layers."""
    layers = _need_bn(model, "AdaBN")
    model.eval()
    model.requires_grad_(False)
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    return layers


def configure_tent(model: nn.Module) -> list[nn.Parameter]:
    """TENT: eval mode except BatchNorm, which normalises with batch statistics and keeps its running statistics
    untouched (``track_running_stats=False`` in train mode); only BatchNorm's affine parameters require a gradient.
    Returns those parameters (what the optimizer updates)."""
    layers = _need_bn(model, "TENT")
    model.eval()
    model.requires_grad_(False)
    params = []
    for m in layers:
        m.train()
        m.track_running_stats = False  # batch statistics; the buffers stay in the state_dict, unchanged
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    if not params:
        raise ConfigError("TENT trains the BatchNorm affine parameters and this model's BatchNorm layers have "
                          "none (affine=False)")
    return params


def _mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``1/N sum_i H(softmax(logits_i))``, float32 (:func:`tlframe.losses.entropy`)."""
    from tlframe.losses import entropy

    return entropy(logits)


@dataclass
class _Tally:
    correct: int = 0
    labelled: int = 0
    images: int = 0
    entropy_sum: float = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(logits.device)
        mask = labels >= 0
        self.correct += int((logits.argmax(1)[mask] == labels[mask]).sum())
        self.labelled += int(mask.sum())
        self.images += int(logits.shape[0])
        self.entropy_sum += float(_mean_entropy(logits.detach())) * int(logits.shape[0])

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.labelled if self.labelled else None

    @property
    def entropy(self) -> Optional[float]:
        return self.entropy_sum / self.images if self.images else None


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, precision: str = "32") -> _Tally:
    """Accuracy (labelled rows) and mean entropy of ``model``'s predictions over ``batches`` in its current modes."""
    tally = _Tally()
    for x, y in batches:
        with _autocast(device, precision):
            logits = model(x.to(device))
        tally.add(logits.float(), y)
    return tally


@torch.no_grad()
def adabn(model: nn.Module, batches: Iterable, device: torch.device, precision: str = "32") -> None:
    """Recompute every BatchNorm layer's running statistics on ``batches`` (one pass), then put the model in eval mode."""
    configure_adabn(model)
    for x, _ in batches:
        with _autocast(device, precision):
            model(x.to(device))
    model.eval()


def tent(model: nn.Module, batches: Iterable, device: torch.device, lr: float = 1e-3,
         precision: str = "32") -> _Tally:
    """One TENT pass: per batch, predict (scored online), then one Adam step on the mean entropy of that batch's
    predictions, updating only the BatchNorm affine parameters. Returns the online tally."""
    params = configure_tent(model)
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    tally = _Tally()
    for x, y in batches:
        with _autocast(device, precision):
            logits = model(x.to(device))
        tally.add(logits.float(), y)  # the prediction the stream gets: before this batch's update
        loss = _mean_entropy(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return tally


@dataclass
class AdaptResult:
    method: str
    checkpoint: str
    images: int
    labelled: int
    source_acc: Optional[float]
    source_entropy: Optional[float]
    online_acc: Optional[float] = None
    after_acc: Optional[float] = None
    after_entropy: Optional[float] = None
    checkpoint_acc: Optional[float] = None
    updated: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0


def _stream(dm, batch_size: int, seed: int):
    """The target test split as fixed batches, in an order drawn with ``seed`` (eval transform); a list, so every
    pass sees the same batches."""
    dm.setup("fit")
    order = torch.randperm(len(dm.target_test), generator=torch.Generator().manual_seed(seed)).tolist()
    loader = dm._loader(dm.target_test, dm.eval_transform(), batch_size, "target test", sampler=order)
    return [(x, y) for x, y in loader]


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if k in before and not torch.equal(before[k], v.detach().cpu())]


def adapt(checkpoint: str, config: Optional[str], method: str, overrides: Sequence[str], lr: float, batch_size: int,
          seed: int, precision: str, device_name: str) -> tuple[AdaptResult, Optional[dict]]:
    """Run ``method`` on the stream; returns the result and, for adabn/tent, the adapted checkpoint dict."""
    from tlframe.backbones import data_config
    from tlframe.module import TransferModule
    from tlframe.rank import data_module

    check_checkpoint_file(checkpoint, "--checkpoint")
    config = config or str(Path(checkpoint).resolve().parents[1] / "config.yaml")
    if not Path(config).is_file():
        raise ConfigError(f"no config for the stream: {config} does not exist; pass -c with the run's config "
                          "(its data section gives the target)")
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                          ("cpu" if device_name == "auto" else device_name))
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = TransferModule.load_from_checkpoint(checkpoint, map_location="cpu").to(device).eval()
    dm = data_module(config, overrides, "tlframe adapt", "--checkpoint, -c, --method, --out, --lr, --batch-size, "
                     "--seed, --precision, --device")
    dm.set_data_config(data_config(model.backbone))
    batches = _stream(dm, batch_size, seed)
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    source = evaluate(model, batches, device, precision)
    result = AdaptResult(method=method, checkpoint=str(checkpoint), images=source.images, labelled=source.labelled,
                         source_acc=source.accuracy, source_entropy=source.entropy,
                         settings={"config": str(config), "batch_size": batch_size, "seed": seed,
                                   "precision": precision, "device": str(device), "overrides": list(overrides),
                                   **({"lr": lr, "optimizer": "Adam(betas=(0.9, 0.999))"} if method == "tent" else {})})
    if method == "none":
        result.seconds = time.perf_counter() - start
        return result, None
    if method == "adabn":
        adabn(model, batches, device, precision)
    else:
        result.online_acc = tent(model, batches, device, lr, precision).accuracy
    after = evaluate(model, batches, device, precision)  # tent: batch statistics, as the paper evaluates
    result.after_acc, result.after_entropy = after.accuracy, after.entropy
    if method == "tent":  # the checkpoint is evaluated in eval mode: give it the stream's running statistics
        for m in batchnorm_layers(model):
            m.track_running_stats = True
        adabn(model, batches, device, precision)
        result.checkpoint_acc = evaluate(model, batches, device, precision).accuracy
    else:
        result.checkpoint_acc = result.after_acc
    model.requires_grad_(True)
    result.updated = _changed(before, model)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ckpt["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt["tlframe_adapt"] = {"method": method, "from": str(checkpoint), **result.settings}
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        ckpt.pop(key, None)  # evaluation only: resuming training from an adapted checkpoint is not meaningful
    result.seconds = time.perf_counter() - start
    return result, ckpt


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="tlframe adapt", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a tlframe checkpoint (e.g. RUN/checkpoints/last.ckpt)")
    p.add_argument("-c", "--config", help="a tlframe config whose data section gives the target "
                                          "(default: the run's config.yaml beside its checkpoints/ folder)")
    p.add_argument("--method", choices=METHODS, default="tent", help="tent (default), adabn or none")
    p.add_argument("--out", help="folder for adapt.json and adapted.ckpt (default: <run>/adapt/<method>)")
    p.add_argument("--lr", type=float, default=1e-3, help="TENT's Adam learning rate (default 0.001)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch of the stream (default 64)")
    p.add_argument("--seed", type=int, default=0, help="order of the stream (default 0)")
    p.add_argument("--precision", choices=["32", "bf16"], default="32", help="32 (default) or bf16 autocast")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda[:i]")
    return p.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    from tlframe.atomic import atomic_write_text
    from tlframe.backbones import BackboneError
    from tlframe.checks import check_writable_folder
    from tlframe.data import DataError

    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parents[1] / "adapt" / args.method
    try:
        if args.lr <= 0 or args.batch_size < 1:
            raise ConfigError(f"--lr ({args.lr}) must be > 0 and --batch-size ({args.batch_size}) >= 1")
        check_writable_folder(str(out), "--out")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result, ckpt = adapt(args.checkpoint, args.config, args.method, overrides, args.lr, args.batch_size,
                                 args.seed, args.precision, args.device)
    except (ConfigError, DataError, BackboneError) as err:
        print(f"tlframe adapt: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        tmp = out / "adapted.ckpt.tmp"
        torch.save(ckpt, tmp)
        tmp.replace(out / "adapted.ckpt")
    atomic_write_text(out / "adapt.json", json.dumps(asdict(result), indent=2) + "\n")
    print(f"tlframe adapt: {args.method} on {result.images} target images: no adaptation {_pct(result.source_acc)}"
          + (f", online {_pct(result.online_acc)}" if result.online_acc is not None else "")
          + (f", after one pass {_pct(result.after_acc)}" if args.method != "none" else "")
          + (f", adapted checkpoint (eval mode) {_pct(result.checkpoint_acc)}" if args.method == "tent" else ""))
    print(f"tlframe adapt: wrote {out / 'adapt.json'}" + (f" and {out / 'adapted.ckpt'}" if ckpt is not None else ""))
    return EXIT_OK
