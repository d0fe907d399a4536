"""Training-step throughput of every strategy: tlframe (a real Lightning fit) against hand-written loops.

For each strategy (FineTune, FrozenFeatures, DANN, MMD) this measures images per second and
peak memory of training steps in four variants, all in one process, interleaved:

- ``tlframe``: ``TransferModule`` trained by a ``pl.Trainer`` (``max_steps``, TensorBoard logging
  on, checkpointing off, no validation); a callback times the steps after warm-up, so the
  loop, logging, precision plugin and optimizer/scheduler stepping of Lightning are included.
- ``raw``: a hand-written PyTorch loop doing the same computation: the same timm backbone, a
  bottleneck ``Linear-BN-ReLU`` and classifier, the losses of ``tlframe.losses``, SGD (nesterov,
  LR multipliers per group) and the inverse-decay schedule, same precision and memory format.
  ``tlframe / raw`` is the framework-overhead ratio (target >= 0.97).
- ``reference``: the loop as the reference DA code (TLlib/Dassl) writes it: fp32, no
  channels_last, and for DANN a separate discriminator ending in ``Sigmoid`` trained with
  ``binary_cross_entropy`` on probabilities.
- ``tlframe_fast``: tlframe with ``precision="bf16-mixed"`` and ``channels_last=True``
  (in GPU mode this is the ``tlframe`` run itself). ``tlframe_fast / reference`` is the gain of
  the modern settings (target >= 1.3x on a GPU; on CPU without bf16 hardware it is a loss).

Batches are made once, in memory, on the device (data loading is not measured). "img/s" counts
images through the backbone: the source batch, plus the target batch for DANN and MMD.
Each figure is the median over ``--repeats`` runs; a ratio is the median of the per-repeat
ratios of runs made next to each other (the variant order rotates every repeat).

Peak memory of a run, from before its model is built to the end of its timed steps (weights,
gradients, optimizer state, activations): on CUDA the rise of ``torch.cuda.max_memory_allocated``;
on CPU the rise of the process's peak resident set size (``VmHWM`` of ``/proc/self/status``,
reset through ``/proc/self/clear_refs`` after glibc's ``malloc_trim``), which includes allocator
slack; where the reset is not permitted, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (never
reset: a process-wide high-water mark). tracemalloc is not used: it does not see torch's allocations.

    python benchmarks/throughput.py                   # CPU: lenet, 28 px, 32+32 images
    python benchmarks/throughput.py --device cuda --peak-tflops 989   # ResNet-50, 224 px, 64+64, bf16, MFU
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from benchmarks.digits.common import REPO, machine_lines, markdown_table, regen_command, today  # noqa: E402
from tlframe.atomic import atomic_write_text  # noqa: E402
from tlframe.backbones import data_config  # noqa: E402  (also registers the digit networks in timm)
from tlframe.losses import domain_adversarial_loss, gradient_reverse, mk_mmd, warm_start_coefficient  # noqa: E402
from tlframe.module import TransferModule  # noqa: E402
from tlframe.optim import InverseDecayLR  # noqa: E402
from tlframe.strategies import DANN, MMD, FineTune, FrozenFeatures  # noqa: E402

STRATEGIES = {"finetune": FineTune, "frozen": FrozenFeatures, "dann": DANN, "mmd": MMD}
USES_TARGET = {"finetune": False, "frozen": False, "dann": True, "mmd": True}
VARIANTS = ("tlframe", "raw", "reference", "tlframe_fast")
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "throughput.md"
LR, MOMENTUM, WEIGHT_DECAY, BACKBONE_LR_MULT, BOTTLENECK, HIDDEN, GRL_MAX_STEPS = 0.01, 0.9, 1e-3, 0.1, 256, 1024, 1000
MODES = {  # defaults per device
    "cpu": dict(backbone="lenet", image_size=28, batch_size=32, precision="32", channels_last=False,
                warmup=3, steps=8, repeats=5),
    "cuda": dict(backbone="resnet50", image_size=224, batch_size=64, precision="bf16", channels_last=True,
                 warmup=10, steps=30, repeats=5),
}


@dataclass
class Setup:
    device: str
    backbone: str
    image_size: int
    batch_size: int  # per domain
    precision: str  # "32" or "bf16": of the tlframe and raw variants
    channels_last: bool  # of the tlframe and raw variants
    warmup: int
    steps: int
    repeats: int
    strategies: list[str]
    threads: int = 0  # torch intra-op threads (0: torch's default)
    overhead_only: bool = False  # only tlframe and raw (the framework-overhead ratio)
    num_classes: int = 10
    log_every_n_steps: int = 10

    @property
    def fast_is_main(self) -> bool:
        return self.precision == "bf16" and self.channels_last


@dataclass
class Measurement:
    img_s: float
    mem_mib: float


# --------------------------------------------------------------------------- memory and timing
class _Memory:
    """Peak memory over a window: CUDA allocator statistics, or the process's resident set on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda" if device == "cuda" else ("vmhwm" if _can_reset_hwm() else "ru_maxrss")
        self.base = 0.0

    def start(self) -> None:
        """Call before building the model: the peak then covers weights, optimizer state and activations."""
        if self.kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        elif self.kind == "vmhwm":
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_status_kib("VmRSS") / 1024

    def peak_mib(self) -> float:
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        if self.kind == "vmhwm":
            return max(0.0, _proc_status_kib("VmHWM") / 1024 - self.base)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    @property
    def description(self) -> str:
        return {"cuda": "rise of `torch.cuda.max_memory_allocated` from before the model was built to the end of "
                        "the timed steps (MiB): weights, gradients, optimizer state and activations",
                "vmhwm": "rise of the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs "
                         "after `malloc_trim`) from before the model was built to the end of the timed steps (MiB): "
                         "weights, gradients, optimizer state, activations and allocator slack",
                "ru_maxrss": "process-wide peak resident set size (`ru_maxrss`, cannot be reset: a high-water "
                             "mark of the whole run, MiB)"}[self.kind]


def _proc_status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so an earlier run's freed memory does not hide this run's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


class _Window:
    """Wall time of the steps after ``warmup`` (``start`` at the end of step ``warmup``) and peak memory of
    the run (from the window's creation, before the model is built)."""

    def __init__(self, device: str):
        self.device = device
        self.memory = _Memory(device)
        self.memory.start()  # make the window before building the model
        self.t0 = self.t1 = 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        self.t1 = time.perf_counter()
        return self.t1 - self.t0


class StepTimer(pl.Callback):
    """Times steps ``warmup + 1 .. warmup + steps`` of a Lightning fit (end of one batch to end of another)."""

    def __init__(self, device: str, warmup: int, steps: int):
        self.window = _Window(device)
        self.warmup, self.steps = warmup, steps
        self.seconds: Optional[float] = None
        self.mem_mib = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.window.start()
        elif trainer.global_step == self.warmup + self.steps:
            self.seconds = self.window.stop()
            self.mem_mib = self.window.memory.peak_mib()


# --------------------------------------------------------------------------- data
class Batches:
    """``length`` batches ``{"source": (x, y), "target": (x, y)}`` cycling over a few made once on the device.

    ``strategy``: shape the target part as it needs (``((x_weak, x_strong), y)`` for two views, ``(x, y, index)``
    with ``target_indices``), as :class:`~tlframe.data.TransferDataModule` serves it."""

    def __init__(self, setup: Setup, in_chans: int, length: int, distinct: int = 4, strategy: Any = None):
        gen = torch.Generator().manual_seed(0)
        shape = (setup.batch_size, in_chans, setup.image_size, setup.image_size)

        def domain():
            x = torch.randn(shape, generator=gen).to(setup.device)
            return x, torch.randint(0, setup.num_classes, (setup.batch_size,), generator=gen).to(setup.device)

        def target(i: int):
            x, y = domain()
            if getattr(strategy, "target_views", 1) == 2:
                x = (x, torch.randn(shape, generator=gen).to(setup.device))
            if getattr(strategy, "target_indices", False):
                return x, y, torch.arange(i * setup.batch_size, (i + 1) * setup.batch_size, device=setup.device)
            return x, y

        self.batches = [{"source": domain(), "target": target(i)} for i in range(distinct)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.length))


@functools.cache
def _in_chans(backbone: str) -> int:
    return int(data_config(timm.create_model(backbone, pretrained=False, num_classes=0))["input_size"][0])


def _images_per_step(setup: Setup, name: str) -> int:
    return setup.batch_size * (2 if USES_TARGET[name] else 1)


# --------------------------------------------------------------------------- tlframe through Lightning
def run_tlframe(setup: Setup, name: str, bf16: bool, channels_last: bool, compile: bool = False) -> Measurement:
    from pytorch_lightning.loggers import TensorBoardLogger

    timer = StepTimer(setup.device, setup.warmup, setup.steps)
    torch.manual_seed(0)
    model = TransferModule(setup.backbone, num_classes=setup.num_classes, strategy=STRATEGIES[name](),
                           lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, channels_last=channels_last,
                           compile=compile)
    total = setup.warmup + setup.steps
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="gpu" if setup.device == "cuda" else "cpu", devices=1, max_steps=total,
            precision="bf16-mixed" if bf16 else "32-true", logger=TensorBoardLogger(tmp, name="bench"),
            log_every_n_steps=setup.log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
            default_root_dir=tmp)
        trainer.fit(model, train_dataloaders=Batches(setup, _in_chans(setup.backbone), total))
    if timer.seconds is None:
        raise RuntimeError(f"tlframe {name}: the fit stopped before step {total}")
    return Measurement(setup.steps * _images_per_step(setup, name) / timer.seconds, timer.mem_mib)


# --------------------------------------------------------------------------- hand-written loops
class RawNet(nn.Module):
    """Backbone, bottleneck, classifier and (DANN) discriminator, written out as in a plain script."""

    def __init__(self, setup: Setup, name: str, reference: bool):
        super().__init__()
        self.backbone = timm.create_model(setup.backbone, pretrained=False, num_classes=0)
        width = self.backbone.num_features
        self.bottleneck = nn.Sequential(nn.Linear(width, BOTTLENECK), nn.BatchNorm1d(BOTTLENECK), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(BOTTLENECK, setup.num_classes)
        self.discriminator = None
        if name == "dann":
            layers = [nn.Linear(BOTTLENECK, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True),
                      nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, 1)]
            self.discriminator = nn.Sequential(*layers, *([nn.Sigmoid()] if reference else []))


def _raw_optimizer(net: RawNet, frozen: bool):
    head = [*net.bottleneck.parameters(), *net.classifier.parameters()]
    groups = [{"params": head, "lr": LR}]
    if not frozen:
        groups.append({"params": list(net.backbone.parameters()), "lr": LR * BACKBONE_LR_MULT})
    if net.discriminator is not None:
        groups.append({"params": list(net.discriminator.parameters()), "lr": LR})
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True)
    return opt, InverseDecayLR(opt)


def raw_step(net: RawNet, name: str, batch: dict, step: int, reference: bool) -> torch.Tensor:
    """The loss of one training step (forward only), as tlframe's default strategies compute it."""
    (x_s, y_s), (x_t, _) = batch["source"], batch["target"]
    n = x_s.shape[0]
    if name == "frozen":
        with torch.no_grad():
            z = net.backbone(x_s)
        return F.cross_entropy(net.classifier(net.bottleneck(z)), y_s)
    if name == "finetune":
        return F.cross_entropy(net.classifier(net.bottleneck(net.backbone(x_s))), y_s)
    if name == "dann":  # joint batch through backbone, bottleneck and discriminator
        f = net.bottleneck(net.backbone(torch.cat([x_s, x_t])))
        cls = F.cross_entropy(net.classifier(f[:n]), y_s)
        d = net.discriminator(gradient_reverse(f, warm_start_coefficient(step, GRL_MAX_STEPS)))
        if reference:  # TLlib DomainAdversarialLoss: probabilities and BCE
            adv = 0.5 * (F.binary_cross_entropy(d[:n], torch.ones_like(d[:n]))
                         + F.binary_cross_entropy(d[n:], torch.zeros_like(d[n:])))
        else:
            adv = domain_adversarial_loss(d[:n], d[n:])[0]
        return cls + adv
    # mmd: source and target as separate batches (the reference DAN)
    f_s, f_t = net.bottleneck(net.backbone(x_s)), net.bottleneck(net.backbone(x_t))
    return F.cross_entropy(net.classifier(f_s), y_s) + mk_mmd(f_s, f_t)


def run_raw(setup: Setup, name: str, bf16: bool, channels_last: bool, reference: bool = False) -> Measurement:
    window = _Window(setup.device)
    torch.manual_seed(0)
    net = RawNet(setup, name, reference).to(setup.device)
    if channels_last:
        net.backbone.to(memory_format=torch.channels_last)
    net.train()
    if name == "frozen":
        net.backbone.requires_grad_(False).eval()
    opt, sched = _raw_optimizer(net, frozen=name == "frozen")
    autocast = torch.autocast(setup.device, dtype=torch.bfloat16) if bf16 else nullcontext()
    batches = Batches(setup, _in_chans(setup.backbone), setup.warmup + setup.steps)
    for i, batch in enumerate(batches):
        if channels_last:
            batch = {k: (x.contiguous(memory_format=torch.channels_last), y) for k, (x, y) in batch.items()}
        with autocast:
            loss = raw_step(net, name, batch, i, reference)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i + 1 == setup.warmup:
            window.start()
    seconds = window.stop()
    return Measurement(setup.steps * _images_per_step(setup, name) / seconds, window.memory.peak_mib())


def step_flops(setup: Setup, name: str) -> int:
    """FLOPs of one training step (forward + backward) of the raw loop, by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    net = RawNet(setup, name, reference=False).to(setup.device).train()
    if name == "frozen":
        net.backbone.requires_grad_(False).eval()
    batch = next(iter(Batches(setup, _in_chans(setup.backbone), 1, distinct=1)))
    with FlopCounterMode(display=False) as counter:
        raw_step(net, name, batch, 0, reference=False).backward()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- the measurement plan
def measure(setup: Setup, log=print) -> dict:
    """All variants of all strategies, interleaved; returns medians, per-repeat ratios and FLOPs."""
    bf16 = setup.precision == "bf16"
    runners = {
        "tlframe": lambda n: run_tlframe(setup, n, bf16, setup.channels_last),
        "raw": lambda n: run_raw(setup, n, bf16, setup.channels_last),
        "reference": lambda n: run_raw(setup, n, False, False, reference=True),
        "tlframe_fast": lambda n: run_tlframe(setup, n, True, True),
    }
    variants = [v for v in VARIANTS if not (v == "tlframe_fast" and setup.fast_is_main)]
    if setup.overhead_only:
        variants = ["tlframe", "raw"]
    runs: dict[str, dict[str, list[Measurement]]] = {n: {v: [] for v in variants} for n in setup.strategies}
    for r in range(setup.repeats):
        for name in setup.strategies:
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for v in order:
                m = runners[v](name)
                runs[name][v].append(m)
                log(f"repeat {r + 1}/{setup.repeats} {name:8s} {v:12s} {m.img_s:9.1f} img/s {m.mem_mib:8.1f} MiB")
    fast = "tlframe" if setup.fast_is_main else "tlframe_fast"
    out = {}
    for name, by_variant in runs.items():
        med = {v: {"img_s": statistics.median(m.img_s for m in ms), "mem_mib": statistics.median(m.mem_mib for m in ms)}
               for v, ms in by_variant.items()}
        overhead = [t.img_s / r.img_s for t, r in zip(by_variant["tlframe"], by_variant["raw"])]
        gain = [f.img_s / r.img_s for f, r in zip(by_variant.get(fast, []), by_variant.get("reference", []))]
        flops = step_flops(setup, name)
        out[name] = {"variants": med, "runs": {v: [asdict(m) for m in ms] for v, ms in by_variant.items()},
                     "ratio_tlframe_raw": statistics.median(overhead), "ratio_tlframe_raw_all": overhead,
                     "ratio_fast_reference": statistics.median(gain) if gain else math.nan,
                     "ratio_fast_reference_all": gain,
                     "flops_per_step": flops, "images_per_step": _images_per_step(setup, name)}
    return out


def mfu(result: dict, variant: str, peak_tflops: Optional[float]) -> Optional[float]:
    """Model-FLOPs utilisation: achieved FLOP/s of ``variant`` over ``peak_tflops``."""
    if not peak_tflops:
        return None
    steps_s = result["variants"][variant]["img_s"] / result["images_per_step"]
    return result["flops_per_step"] * steps_s / (peak_tflops * 1e12)


# --------------------------------------------------------------------------- report
def render(setup: Setup, results: dict, argv: Sequence[str], peak_tflops: Optional[float], memory: str,
           wall_s: float) -> str:
    fast = "tlframe" if setup.fast_is_main else "tlframe_fast"
    main_prec = ("bf16-mixed" if setup.precision == "bf16" else "fp32") + (" + channels_last" if setup.channels_last else "")
    header = ["strategy", "images/step", f"tlframe ({main_prec})", "raw loop", "tlframe / raw",
              "reference (fp32)", "tlframe bf16 + channels_last", "fast / reference", "GFLOP/step", "TFLOP/s (tlframe)"]
    if peak_tflops:
        header.append("MFU (tlframe)")
    rows = []
    for name, r in results.items():
        v = r["variants"]
        lo_hi = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}"  # noqa: E731
        tflops = r["flops_per_step"] * v["tlframe"]["img_s"] / r["images_per_step"] / 1e12
        row = [name, str(r["images_per_step"]), f"{v['tlframe']['img_s']:.1f}", f"{v['raw']['img_s']:.1f}",
               f"**{r['ratio_tlframe_raw']:.3f}** ({lo_hi(r['ratio_tlframe_raw_all'])})",
               *((f"{v['reference']['img_s']:.1f}", f"{v[fast]['img_s']:.1f}",
                  f"**{r['ratio_fast_reference']:.2f}x** ({lo_hi(r['ratio_fast_reference_all'])})")
                 if r["ratio_fast_reference_all"] else ("not run", "not run", "not run")),
               f"{r['flops_per_step'] / 1e9:.2f}", f"{tflops:.3f}"]
        if peak_tflops:
            row.append(f"{100 * mfu(r, 'tlframe', peak_tflops):.1f}%")
        rows.append(row)
    mem_rows = [[name, *(f"{r['variants'][v]['mem_mib']:.1f}" for v in r["variants"])] for name, r in results.items()]
    mem_header = ["strategy", *next(iter(results.values()))["variants"].keys()]
    cpu = setup.device == "cpu"
    lines = [
        "# Training-step throughput: tlframe against hand-written loops",
        "",
        f"Generated {today()} by `{regen_command(Path(__file__), argv)}` in {wall_s:.0f} s.",
        "",
        *machine_lines(),
        f"- setup: backbone `{setup.backbone}`, {setup.image_size} px, batch {setup.batch_size} source"
        f" + {setup.batch_size} target, device {setup.device}, tlframe/raw in {main_prec}; "
        f"{setup.warmup} warm-up + {setup.steps} timed steps per run, median of {setup.repeats} interleaved runs, "
        f"torch threads: {torch.get_num_threads()}",
        "",
        "img/s counts images through the backbone per second (source batch; + target batch for DANN and MMD).",
        "A ratio is the median of per-repeat ratios of adjacent runs, with its range over the repeats in brackets.",
        "`tlframe / raw`: framework overhead (Lightning fit loop with TensorBoard logging every "
        f"{setup.log_every_n_steps} steps, strategy plug, metrics) against a plain loop of the same math "
        "(target >= 0.97). `fast / reference`: tlframe in bf16-mixed + channels_last against a TLlib/Dassl-style "
        "fp32 loop (DANN: discriminator on sigmoid probabilities with BCE) (target >= 1.3x on a GPU).",
        "",
        markdown_table(header, rows),
        "",
        f"Peak memory per variant ({memory}):",
        "",
        markdown_table(mem_header, mem_rows),
        "",
    ]
    if cpu:
        lines += [
            "## How far to trust these CPU figures",
            "",
            f"- This machine has {__import__('os').cpu_count()} CPU cores shared with other users' jobs: runs are "
            "noisy (the bracketed ranges show by how much), and short runs on a small model weigh the per-step "
            "Python overhead more than a GPU run of ResNet-50 would. Interleaving and medians reduce, not remove, drift.",
            "- bf16 on a CPU without native bf16 matrix units (AVX512-BF16/AMX) is emulated and usually slower than fp32, "
            "and channels_last does not help small fp32 convolutions on CPU: the `fast / reference` column is therefore "
            "expected below 1 here; its 1.3x target is a GPU target (bf16 tensor cores). Run the GPU mode for that figure.",
            "- `tlframe / raw` on a small CPU model: Lightning's per-step fixed costs (loop, hooks, `self.log` per "
            "logged key) are a roughly constant few ms, a visible share of a 10-50 ms step; the ratio approaches 1 "
            "as the step grows.",
            "- Data loading is excluded (batches made once in memory), so the ratios isolate the training step.",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--backbone", help="timm model name (default: dtn on CPU, resnet50 on CUDA)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int, help="images per domain per step")
    p.add_argument("--precision", choices=["32", "bf16"], help="of the tlframe and raw variants")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int, help="timed steps per run")
    p.add_argument("--repeats", type=int)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of " + ",".join(STRATEGIES))
    p.add_argument("--threads", type=int, help="torch intra-op threads (default on CPU: 1, steadier on a shared "
                   "machine than a thread pool that waits for a busy core; on CUDA: torch's default)")
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s of the device in the run's precision, for MFU")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="markdown file to write (atomically)")
    p.add_argument("--json", help="also write the raw figures as JSON here")
    p.add_argument("--overhead-only", action="store_true",
                   help="run only tlframe and the raw loop (the framework-overhead ratio), e.g. for a large CPU step")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    defaults = MODES[device]
    pick = lambda key, value: defaults[key] if value is None else value  # noqa: E731
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"error: unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    setup = Setup(device=device, backbone=pick("backbone", args.backbone), image_size=pick("image_size", args.image_size),
                  batch_size=pick("batch_size", args.batch_size), precision=pick("precision", args.precision),
                  channels_last=pick("channels_last", args.channels_last), warmup=pick("warmup", args.warmup),
                  steps=pick("steps", args.steps), repeats=pick("repeats", args.repeats), strategies=strategies,
                  threads=args.threads or (1 if device == "cpu" else 0), overhead_only=args.overhead_only)
    if setup.warmup < 1 or setup.steps < 1 or setup.repeats < 1:
        raise SystemExit("error: --warmup, --steps and --repeats must be >= 1")
    if setup.threads:
        torch.set_num_threads(setup.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    results = measure(setup, log=lambda s: print(s, flush=True))
    memory = _Memory(device).description
    text = render(setup, results, argv, args.peak_tflops, memory, time.perf_counter() - t0)
    atomic_write_text(Path(args.results), text)
    if args.json:
        record = {"setup": asdict(setup), "peak_tflops": args.peak_tflops, "memory": memory, "results": results,
                  "mfu": {n: mfu(r, "tlframe", args.peak_tflops) for n, r in results.items()}}
        atomic_write_text(Path(args.json), json.dumps(record, indent=1))
    for name, r in results.items():
        gain = "" if math.isnan(r["ratio_fast_reference"]) else f"  fast/reference {r['ratio_fast_reference']:.2f}x"
        print(f"{name:8s} tlframe/raw {r['ratio_tlframe_raw']:.3f}{gain}  tlframe {r['variants']['tlframe']['img_s']:.1f} img/s")
    print(f"throughput: wrote {args.results}")
    return 0 if all(math.isfinite(r["ratio_tlframe_raw"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
