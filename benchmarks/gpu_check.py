"""Every GPU figure of tlframe from one unattended command: throughput/MFU, mixed precision, NCCL DDP, data pipeline.

    python benchmarks/gpu_check.py              # on a CUDA machine: at most ~8 minutes, writes benchmarks/results/gpu.md + .json
    python benchmarks/gpu_check.py --dry-run    # CPU, tiny sizes, about a minute: every part's code path (a CI test)

Each part runs in its own process with its own time budget (``--budget PART=SECONDS`` overrides one);
a part that fails or runs out of time is recorded in the results with its error or "timed out", and
the others still run. The results file is rewritten after every part, so it exists whatever happens.

Parts:

1. ``throughput``: ResNet-50 at 224 px, source-only (``finetune``, 64 images/step) and DANN (64 + 64),
   tlframe in fp32, bf16-mixed, bf16-mixed + channels_last and + ``compile`` (last, inside the budget),
   the hand-written loop of the same math (``raw``) and the TLlib-style fp32 loop (``reference``)
   from ``benchmarks/throughput.py``; img/s, TFLOP/s, MFU against the dense bf16 peak of the device,
   ``tlframe / raw`` (target >= 0.97) and ``tlframe fast / reference`` (target >= 1.3x), peak memory.
2. ``amp``: every strategy trained a few seeded steps under ``32-true``, ``bf16-mixed`` and ``16-mixed``
   from the same initial weights on the same batches; the losses must be finite and within
   ``|l - l32| <= ATOL + RTOL * |l32|`` of fp32 at every step; the fp16 gradient scaler's skipped
   steps are counted (a skip shows as a drop of its scale).
3. ``ddp``: ``Trainer(strategy="ddp", sync_batchnorm=True)`` on every visible GPU (NCCL; one GPU still
   runs the NCCL path), DANN on the synthetic domains, fit + test; checks that the parameters are
   identical on all ranks after training, that BatchNorm layers became SyncBatchNorm, and that one
   run folder was written, its event files all by rank 0. (The dry run: 2 CPU processes, gloo, no
   SyncBatchNorm, which is CUDA only.)
4. ``data``: an image folder of JPEGs decoded and augmented (``crop_flip``, 224 px) in loader workers with
   ``pin_memory``, copied to the GPU: img/s against part 1's pure-compute figure of the same step, so a
   user knows whether the input pipeline is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "gpu.md"
PARTS = ("throughput", "amp", "ddp", "data")
BUDGET_S = {"throughput": 240, "amp": 80, "ddp": 80, "data": 50}  # 7.5 min in all, start-up of each part included
DRY_BUDGET_S = {"throughput": 120, "amp": 120, "ddp": 180, "data": 60}
#: dense bf16 peak TFLOP/s (no sparsity) by device-name fragment, from the vendors' data sheets (SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
#: loss tolerance of mixed precision against fp32, per step: |l - l32| <= atol + rtol * |l32|
AMP_TOLERANCE = {"bf16-mixed": (0.05, 0.05), "16-mixed": (0.02, 0.02)}
ANCHOR = ("NVIDIA's published ResNet-50 v1.5 training throughput: about 2,500 img/s on one A100 80GB with AMP "
          "(NVIDIA Deep Learning Examples, batch 256, DALI); an H100/H200 is expected at roughly 1.5-2x that")


# --------------------------------------------------------------------------- sizes
def sizes(dry: bool) -> dict[str, Any]:
    if dry:
        return dict(device="cpu", backbone="lenet", image_size=28, batch_size=4, warmup=1, steps=2,
                    amp_backbone="lenet", amp_image_size=28, amp_batch=8, amp_steps=4,
                    amp_precisions=["32-true", "bf16-mixed"], ddp_backbone="lenet", ddp_image_size=28, ddp_devices=2, ddp_iters=4,
                    ddp_batch=8, data_images=48, data_size=40, data_crop=28, data_batch=8, data_batches=4,
                    data_workers=2, compile=False)
    return dict(device="cuda", backbone="resnet50", image_size=224, batch_size=64, warmup=10, steps=30,
                amp_backbone="resnet18", amp_image_size=112, amp_batch=32, amp_steps=12,
                amp_precisions=["32-true", "bf16-mixed", "16-mixed"], ddp_backbone="resnet18", ddp_image_size=64,
                ddp_devices=max(1, _cuda_count()), ddp_iters=16, ddp_batch=32, data_images=1536, data_size=256,
                data_crop=224, data_batch=64, data_batches=24, data_workers=max(1, min(14, (os.cpu_count() or 2) - 2)),
                compile=True)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _write_json(path: Path, data: dict) -> None:
    from tlframe.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, default=str))


# --------------------------------------------------------------------------- part 1: throughput and MFU
def part_throughput(cfg: dict, out: Path, record: dict) -> None:
    import torch

    from benchmarks import throughput as tp

    tp.torch.backends.cudnn.benchmark = cfg["device"] == "cuda"
    setup = tp.Setup(device=cfg["device"], backbone=cfg["backbone"], image_size=cfg["image_size"],
                     batch_size=cfg["batch_size"], precision="32", channels_last=False, warmup=cfg["warmup"],
                     steps=cfg["steps"], repeats=1, strategies=["finetune", "dann"],
                     threads=1 if cfg["device"] == "cpu" else 0)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    variants: list[tuple[str, Callable]] = [
        ("tlframe fp32", lambda n: tp.run_tlframe(setup, n, False, False)),
        ("raw fp32", lambda n: tp.run_raw(setup, n, False, False)),
        ("reference fp32", lambda n: tp.run_raw(setup, n, False, False, reference=True)),
        ("tlframe bf16", lambda n: tp.run_tlframe(setup, n, True, False)),
        ("tlframe bf16 + channels_last", lambda n: tp.run_tlframe(setup, n, True, True)),
        ("raw bf16 + channels_last", lambda n: tp.run_raw(setup, n, True, True)),
    ]
    if cfg["compile"]:
        variants.append(("tlframe bf16 + channels_last + compile", lambda n: tp.run_tlframe(setup, n, True, True, True)))
    record.update(setup={k: v for k, v in vars(setup).items()}, results={})
    for name in setup.strategies:
        record["results"][name] = {"images_per_step": tp._images_per_step(setup, name),
                                   "flops_per_step": tp.step_flops(setup, name), "variants": {}}
        _write_json(out, record)
    for label, run in variants:  # variant-major: the slow compile variant comes last for every strategy
        for name in setup.strategies:
            if cfg["device"] == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            m = run(name)
            record["results"][name]["variants"][label] = {"img_s": m.img_s, "mem_mib": m.mem_mib,
                                                          "wall_s": time.perf_counter() - t0}
            print(f"throughput {name:8s} {label:40s} {m.img_s:9.1f} img/s {m.mem_mib:9.1f} MiB", flush=True)
            _write_json(out, record)


# --------------------------------------------------------------------------- part 2: mixed precision
def strategy_classes() -> dict[str, type]:
    """Every strategy tlframe ships (``tlframe.strategies.__all__``), by name."""
    import tlframe.strategies as S

    return {n: getattr(S, n) for n in S.__all__ if isinstance(getattr(S, n), type)
            and issubclass(getattr(S, n), S.Strategy) and getattr(S, n) is not S.Strategy}


#: Constructor arguments of a strategy under the AMP check, which trains on synthetic batches without a data module:
#: SHOT's centroid pseudo-labels need a pass over a target data set, so the check runs SHOT-IM (the same
#: forward and loss code, information maximisation only).
AMP_STRATEGY_KWARGS = {"SHOT": {"pseudo_label_weight": 0.0}}


def scaler_of(trainer) -> Any:
    plugin = getattr(trainer.strategy, "precision_plugin", None) or getattr(trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None)


def skipped_steps(scales: Sequence[float]) -> int:
    """Optimizer steps the fp16 gradient scaler skipped: each skip (inf/NaN gradients) lowers its scale."""
    return sum(1 for a, b in zip(scales, scales[1:]) if b < a)


def within_tolerance(losses: Sequence[float], reference: Sequence[float], atol: float, rtol: float) -> tuple[bool, float]:
    """(every step within ``atol + rtol * |ref|``, the largest ``|l - ref| / (atol + rtol * |ref|)``)."""
    worst = max((abs(a - b) / (atol + rtol * abs(b)) for a, b in zip(losses, reference)), default=math.inf)
    return len(losses) == len(reference) and all(math.isfinite(x) for x in losses) and worst <= 1.0, worst


def part_amp(cfg: dict, out: Path, record: dict) -> None:
    import pytorch_lightning as pl
    import torch

    from benchmarks import throughput as tp
    from tlframe.module import TransferModule

    class Recorder(pl.Callback):
        def __init__(self):
            self.losses: list[float] = []
            self.scales: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is None:  # a manual-optimization strategy (MCD) returns nothing: its last step's loss
                loss = pl_module._step_losses["train/loss"]
            self.losses.append(float(loss.detach().float()))
            scaler = scaler_of(trainer)
            if scaler is not None:
                self.scales.append(float(scaler.get_scale()))

    setup = tp.Setup(device=cfg["device"], backbone=cfg["amp_backbone"], image_size=cfg["amp_image_size"],
                     batch_size=cfg["amp_batch"], precision="32", channels_last=False, warmup=0,
                     steps=cfg["amp_steps"], repeats=1, strategies=[])
    record.update(steps=cfg["amp_steps"], backbone=setup.backbone, image_size=setup.image_size,
                  batch=setup.batch_size, tolerance=AMP_TOLERANCE, results={})
    for sname, cls in strategy_classes().items():
        row: dict[str, Any] = {}
        for precision in cfg["amp_precisions"]:
            torch.manual_seed(0)
            strategy = cls(**AMP_STRATEGY_KWARGS.get(sname, {}))
            model = TransferModule(setup.backbone, num_classes=setup.num_classes, strategy=strategy, lr=0.01)
            rec = Recorder()
            with tempfile.TemporaryDirectory() as tmp:
                trainer = pl.Trainer(accelerator="gpu" if cfg["device"] == "cuda" else "cpu", devices=1,
                                     max_epochs=1, precision=precision, logger=False, callbacks=[rec],  # steps batches
                                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                     num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp)
                trainer.fit(model, train_dataloaders=tp.Batches(setup, tp._in_chans(setup.backbone), setup.steps,
                                                                strategy=strategy))
            entry: dict[str, Any] = {"losses": rec.losses, "finite": all(math.isfinite(x) for x in rec.losses)}
            if precision == "16-mixed":
                entry["scaler_skipped_steps"] = skipped_steps(rec.scales)
                entry["final_scale"] = rec.scales[-1] if rec.scales else None
            if precision != "32-true":
                atol, rtol = AMP_TOLERANCE[precision]
                ok, worst = within_tolerance(rec.losses, row["32-true"]["losses"], atol, rtol)
                entry.update(within_tolerance=ok, worst_ratio=worst)
            row[precision] = entry
            print(f"amp {sname:15s} {precision:10s} losses {['%.4f' % x for x in rec.losses[:4]]}...", flush=True)
        record["results"][sname] = row
        _write_json(out, record)


# --------------------------------------------------------------------------- part 3: DDP
def part_ddp(cfg: dict, out: Path, record: dict) -> None:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from tlframe.data import SyntheticDomain, TransferDataModule
    from tlframe.module import TransferModule
    from tlframe.strategies import DANN

    class RankCheck(pl.Callback):
        """After training: the largest parameter difference between ranks, and the SyncBatchNorm count."""

        def on_train_end(self, trainer, pl_module):
            flat = torch.cat([p.detach().float().flatten() for p in pl_module.parameters()])
            gathered = pl_module.all_gather(flat)  # (world, P), or (P,) on one process
            gathered = gathered.reshape(-1, flat.numel())
            self.max_diff = float((gathered - gathered[0]).abs().max())
            self.sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules())
            self.bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in pl_module.modules())

    cuda = cfg["device"] == "cuda"
    pl.seed_everything(0, workers=True)
    root = Path(os.environ.get("TLFRAME_GPU_CHECK_DDP_DIR") or tempfile.mkdtemp(prefix="gpu_check_ddp_"))
    os.environ["TLFRAME_GPU_CHECK_DDP_DIR"] = str(root)  # the ranks Lightning launches inherit the same folder
    n = cfg["ddp_batch"] * cfg["ddp_iters"]
    dm = TransferDataModule(SyntheticDomain("source", num_train=n, num_test=64, image_size=cfg["ddp_image_size"]),
                            SyntheticDomain("target", num_train=n, num_test=64, image_size=cfg["ddp_image_size"]),
                            batch_size=cfg["ddp_batch"], iters_per_epoch=cfg["ddp_iters"])
    model = TransferModule(cfg["ddp_backbone"], num_classes=10, strategy=DANN(), lr=0.01)
    check = RankCheck()
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=cfg["ddp_devices"], strategy="ddp",
                         sync_batchnorm=cuda, max_epochs=1, logger=TensorBoardLogger(str(root), name="ddp"),
                         callbacks=[check], enable_checkpointing=True, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    tested = trainer.test(model, datamodule=dm, verbose=False)
    if trainer.global_rank != 0:
        return
    versions = sorted(p.name for p in (root / "ddp").iterdir())
    events = sorted(str(p.relative_to(root)) for p in (root / "ddp").rglob("events.out.tfevents.*"))
    writers = sorted({Path(e).name.split(".")[-2] for e in events})  # events.out.tfevents.<time>.<host>.<pid>.<n>
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    record.update(world_size=trainer.world_size, backend=backend, devices=cfg["ddp_devices"], fit_s=fit_s,
                  global_step=trainer.global_step, max_param_diff_between_ranks=check.max_diff,
                  sync_batchnorm_layers=check.sync_bn, batchnorm_layers=check.bn, run_folders=versions,
                  event_files=events, event_writer_pids=writers, rank0_pid=str(os.getpid()), test_metrics={k: float(v) for k, v in (tested[0] if tested else {}).items()},
                  sync_batchnorm_requested=cuda)
    _write_json(out, record)


# --------------------------------------------------------------------------- part 4: data pipeline
def make_image_folder(root: Path, n: int, size: int, classes: int = 10) -> Path:
    """``n`` JPEG images ``size`` x ``size`` (smooth gradients plus noise, like photos to a decoder) in class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx + 30, b * yy + 30, c * (xx + yy) / 2 + 30], -1) + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def part_data(cfg: dict, out: Path, record: dict) -> None:
    import pytorch_lightning as pl
    import timm
    import torch

    from tlframe.backbones import data_config
    from tlframe.data import ImageFolderDomain, TransferDataModule

    cuda = cfg["device"] == "cuda"
    pl.seed_everything(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = make_image_folder(Path(tmp) / "images", cfg["data_images"], cfg["data_size"])
        make_s = time.perf_counter() - t0
        warmup, timed = 3, cfg["data_batches"]
        dm = TransferDataModule(ImageFolderDomain(str(folder)), ImageFolderDomain(str(folder)),
                                batch_size=cfg["data_batch"], iters_per_epoch=warmup + timed, val_fraction=0.0,
                                num_workers=cfg["data_workers"], pin_memory=cuda, persistent_workers=False,
                                train_augmentation="crop_flip", image_size=cfg["data_crop"])
        dm.setup("fit")
        dm.set_data_config(data_config(timm.create_model(cfg["backbone"], pretrained=False, num_classes=0)))
        loader = dm.train_dataloader()
        device = torch.device("cuda" if cuda else "cpu")
        images, t_start = 0, None
        for i, batch in enumerate(iter(loader)):
            batch = batch[0] if isinstance(batch, tuple) else batch
            for x, y in batch.values():
                x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if i >= warmup:
                    images += x.shape[0]
            if cuda:
                torch.cuda.synchronize()
            if i + 1 == warmup:
                t_start = time.perf_counter()
        seconds = time.perf_counter() - t_start
    record.update(images_in_folder=cfg["data_images"], jpeg_size=cfg["data_size"], crop=cfg["data_crop"],
                  batch_per_domain=cfg["data_batch"], workers=cfg["data_workers"], pin_memory=cuda,
                  timed_batches=timed, img_s=images / seconds, folder_written_s=make_s)
    _write_json(out, record)


PART_FUNCTIONS = {"throughput": part_throughput, "amp": part_amp, "ddp": part_ddp, "data": part_data}


def run_part(name: str, dry: bool, out: Path, fail: bool) -> int:
    """The body of one part's process: its record goes to ``out`` (rewritten as it grows)."""
    _quiet()
    record: dict[str, Any] = {}
    if fail:
        raise RuntimeError(f"failure injected into part {name!r} (--inject-failure)")
    PART_FUNCTIONS[name](sizes(dry), out, record)
    return 0


# --------------------------------------------------------------------------- the orchestrator
def device_info() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpus": os.cpu_count(), "platform": platform.platform(), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count})
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown (nvidia-smi not available)"
    return info


def peak_tflops(info: dict, given: Optional[float]) -> Optional[float]:
    if given:
        return given
    name = info["gpus"][0]["name"] if info["gpus"] else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def launch(name: str, args: argparse.Namespace, budget: float, folder: Path) -> dict[str, Any]:
    """Run one part in its own process group; kill it at ``budget`` seconds. Returns its record and status."""
    out = folder / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(out)]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--inject-failure", name] if name in args.inject_failure else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("TLFRAME_GPU_CHECK_DDP_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=folder)
    try:
        log, _ = proc.communicate(timeout=budget)
        status = "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log = proc.communicate()[0] or ""
        status = f"timed out after {budget:.0f} s (what it measured before is kept)"
    try:
        record = json.loads(out.read_text())
    except (OSError, ValueError):
        record = {}
    error = ""
    if status != "ok":
        lines = [ln for ln in (log or "").splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    sys.stdout.write(log or "")
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "budget_s": budget, "error": error.strip(),
            "log_tail": "\n".join((log or "").splitlines()[-25:]) if status != "ok" else "", "record": record}


def verdicts(results: dict, peak: Optional[float]) -> dict[str, Any]:
    """The derived figures: ratios, TFLOP/s and MFU per strategy; AMP and DDP pass/fail; the data-pipeline verdict."""
    v: dict[str, Any] = {}
    tp = results.get("throughput", {}).get("record", {}).get("results", {})
    for name, r in tp.items():
        var = r.get("variants", {})
        img = {k: x["img_s"] for k, x in var.items()}
        d: dict[str, Any] = {}
        if "tlframe fp32" in img and "raw fp32" in img:
            d["tlframe / raw (fp32)"] = img["tlframe fp32"] / img["raw fp32"]
        if "tlframe bf16 + channels_last" in img and "raw bf16 + channels_last" in img:
            d["tlframe / raw (bf16 + channels_last)"] = img["tlframe bf16 + channels_last"] / img["raw bf16 + channels_last"]
        if "tlframe bf16 + channels_last" in img and "reference fp32" in img:
            d["tlframe fast / reference"] = img["tlframe bf16 + channels_last"] / img["reference fp32"]
        d["tflops"] = {k: r["flops_per_step"] * x / r["images_per_step"] / 1e12 for k, x in img.items()}
        d["mfu"] = {k: t / peak for k, t in d["tflops"].items()} if peak else {}
        v[name] = d
    amp = results.get("amp", {}).get("record", {}).get("results", {})
    if amp:
        v["amp_all_within_tolerance"] = all(e.get("finite") and e.get("within_tolerance", True)
                                            for row in amp.values() for e in row.values())
    ddp = results.get("ddp", {}).get("record", {})
    if ddp:
        v["ddp_ok"] = (ddp.get("max_param_diff_between_ranks") == 0.0 and len(ddp.get("run_folders", [])) == 1
                       and ddp.get("event_writer_pids") == [ddp.get("rank0_pid")]
                       and (not ddp.get("sync_batchnorm_requested") or ddp.get("sync_batchnorm_layers", 0) > 0))
    data = results.get("data", {}).get("record", {})
    compute = tp.get("dann", {}).get("variants", {}).get("tlframe bf16 + channels_last", {}).get("img_s")
    if data.get("img_s") and compute:
        v["data_over_compute"] = data["img_s"] / compute
    return v


def _fmt(x: Any, spec: str = ".1f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def render(info: dict, results: dict, derived: dict, peak: Optional[float], argv: Sequence[str], dry: bool,
           wall_s: float) -> str:
    from benchmarks.digits.common import markdown_table, regen_command, today

    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in info["gpus"]) or "none (CPU)"
    lines = ["# tlframe on a GPU: throughput, mixed precision, DDP, data pipeline", ""]
    if dry:
        lines += ["**DRY RUN on CPU (tiny sizes): these figures only prove that every part's code runs; they say "
                  "nothing about GPU performance.**", ""]
    lines += [f"Generated {today()} by `{regen_command(Path(__file__), argv)}` in {wall_s:.0f} s.", "",
              f"- device: {gpus}; driver {info.get('driver', 'n/a')}; {info['cpus']} CPUs; `{info['platform']}`",
              f"- torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, Python {info['python']}",
              f"- MFU against a dense bf16 peak of {_fmt(peak, '.0f')} TFLOP/s" if peak else
              "- MFU: no peak known for this device (pass --peak-tflops)", "",
              markdown_table(["part", "status", "seconds", "budget s", "error"],
                             [[p, r["status"], _fmt(r["seconds"]), _fmt(r["budget_s"], ".0f"), r["error"] or ""]
                              for p, r in results.items()]), ""]
    tp = results.get("throughput", {}).get("record", {})
    if tp.get("results"):
        s = tp["setup"]
        lines += ["## 1. Throughput and MFU", "",
                  f"`{s['backbone']}` at {s['image_size']} px, {s['batch_size']} source (+ {s['batch_size']} target for "
                  f"DANN) images per step, {s['warmup']} warm-up + {s['steps']} timed steps per run, one run each "
                  "(batches in device memory: no data loading). img/s counts images through the backbone.", ""]
        rows = []
        for name, r in tp["results"].items():
            d = derived.get(name, {})
            for label, m in r["variants"].items():
                rows.append([name, label, _fmt(m["img_s"]), _fmt(d.get("tflops", {}).get(label), ".2f"),
                             _fmt(100 * d["mfu"][label]) + "%" if d.get("mfu", {}).get(label) else "n/a",
                             _fmt(m["mem_mib"], ".0f")])
        lines += [markdown_table(["strategy", "variant", "img/s", "TFLOP/s", "MFU", "peak MiB"], rows), ""]
        ratio_rows = [[n, *(_fmt(derived.get(n, {}).get(k), ".3f") for k in
                            ("tlframe / raw (fp32)", "tlframe / raw (bf16 + channels_last)", "tlframe fast / reference"))]
                      for n in tp["results"]]
        lines += [markdown_table(["strategy", "tlframe / raw, fp32 (target >= 0.97)",
                                  "tlframe / raw, bf16 + channels_last (>= 0.97)",
                                  "tlframe fast / TLlib-style fp32 loop (>= 1.3x)"], ratio_rows), "",
                  f"Anchor: {ANCHOR}.", ""]
    amp = results.get("amp", {}).get("record", {})
    if amp.get("results"):
        lines += ["## 2. Mixed precision against fp32", "",
                  f"`{amp['backbone']}` at {amp['image_size']} px, batch {amp['batch']}, {amp['steps']} seeded steps, "
                  "same initial weights and batches; tolerance per step `|l - l32| <= atol + rtol * |l32|` with "
                  + ", ".join(f"{k}: atol {a}, rtol {r}" for k, (a, r) in amp["tolerance"].items())
                  + "; worst = the largest ratio of the difference to its tolerance (<= 1 passes).", ""]
        rows = []
        for sname, row in amp["results"].items():
            for prec, e in row.items():
                rows.append([sname, prec, "yes" if e["finite"] else "NO", _fmt(e["losses"][0], ".4f") if e["losses"] else "",
                             _fmt(e["losses"][-1], ".4f") if e["losses"] else "",
                             "-" if prec == "32-true" else ("yes" if e.get("within_tolerance") else "NO"),
                             _fmt(e.get("worst_ratio"), ".3f") if prec != "32-true" else "-",
                             str(e.get("scaler_skipped_steps", "-"))])
        lines += [markdown_table(["strategy", "precision", "finite", "first loss", "last loss", "within tolerance",
                                  "worst", "scaler skipped steps"], rows), ""]
    ddp = results.get("ddp", {}).get("record", {})
    if ddp:
        lines += ["## 3. DDP", "",
                  f"- world size {ddp['world_size']}, backend `{ddp['backend']}`, SyncBatchNorm "
                  f"{'on' if ddp['sync_batchnorm_requested'] else 'off (CPU: CUDA only)'}: "
                  f"{ddp['sync_batchnorm_layers']} of {ddp['batchnorm_layers']} BatchNorm layers synchronised",
                  f"- fit {ddp['global_step']} steps in {_fmt(ddp['fit_s'])} s, then test: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in ddp["test_metrics"].items()),
                  f"- largest parameter difference between ranks after training: {ddp['max_param_diff_between_ranks']}",
                  f"- run folders {ddp['run_folders']}, {len(ddp['event_files'])} event files (fit, test) all written "
                  f"by process(es) {ddp['event_writer_pids']} (rank 0 is {ddp['rank0_pid']}): "
                  f"**{'pass' if derived.get('ddp_ok') else 'FAIL'}**", ""]
    data = results.get("data", {}).get("record", {})
    if data:
        ratio = derived.get("data_over_compute")
        verdict = ("" if ratio is None else
                   f"; against the DANN bf16 + channels_last step ({_fmt(ratio, '.2f')}x its img/s): the input pipeline "
                   + ("keeps up" if ratio >= 1 else "is the bottleneck: add workers, lower JPEG decode cost (smaller "
                      "stored images) or preload"))
        lines += ["## 4. Data pipeline", "",
                  f"{data['images_in_folder']} JPEGs of {data['jpeg_size']} px, `crop_flip` to {data['crop']} px, "
                  f"{data['batch_per_domain']} + {data['batch_per_domain']} images per batch, {data['workers']} workers, "
                  f"pin_memory {data['pin_memory']}, copied to the device: **{_fmt(data['img_s'])} img/s** over "
                  f"{data['timed_batches']} batches{verdict}.", ""]
    failed = {p: r for p, r in results.items() if r["status"] != "ok" and r["log_tail"]}
    if failed:
        lines += ["## Failures", ""]
        for p, r in failed.items():
            lines += [f"### {p}: {r['status']}", "", "```", r["log_tail"], "```", ""]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: run every part's code path in seconds")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="time budget of one part")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak TFLOP/s of the device (default: known devices)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="markdown file (the JSON goes beside it)")
    p.add_argument("--inject-failure", action="append", default=[], metavar="PART",
                   help="make PART raise (to test that a failing part is recorded and the others still run)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    budgets = dict(DRY_BUDGET_S if args.dry_run else BUDGET_S)
    for item in args.budget:
        name, _, value = item.partition("=")
        if name not in PARTS or not value:
            p.error(f"--budget {item}: use PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(value)
    args.budgets = budgets
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.part:
        return run_part(args.part, args.dry_run, Path(args.part_out), args.part in args.inject_failure)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run with --dry-run for the CPU code-path check", file=sys.stderr)
        return 2
    from tlframe.atomic import atomic_write_text

    results_md = Path(args.results)
    info = device_info()
    peak = peak_tflops(info, args.peak_tflops)
    results: dict[str, Any] = {p: {"status": "not run yet", "seconds": 0.0, "budget_s": args.budgets[p], "error": "",
                                   "log_tail": "", "record": {}} for p in args.parts}
    t0 = time.perf_counter()

    def save() -> None:
        derived = verdicts(results, peak)
        atomic_write_text(results_md, render(info, results, derived, peak, argv, args.dry_run, time.perf_counter() - t0))
        _write_json(results_md.with_suffix(".json"), {"device": info, "peak_tflops": peak, "dry_run": args.dry_run,
                                                     "parts": results, "derived": derived})

    save()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in args.parts:
            print(f"gpu_check: part {name} (budget {args.budgets[name]:.0f} s)", flush=True)
            try:
                results[name] = launch(name, args, args.budgets[name], Path(tmp))
            except Exception as err:  # noqa: BLE001 - record it and go on with the next part
                results[name].update(status="failed (launcher)", error=f"{type(err).__name__}: {err}",
                                     log_tail=traceback.format_exc())
            print(f"gpu_check: part {name}: {results[name]['status']} in {results[name]['seconds']} s", flush=True)
            save()
    print(f"gpu_check: wrote {results_md} and {results_md.with_suffix('.json')}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
