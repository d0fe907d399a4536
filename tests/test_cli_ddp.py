"""``tlframe fit|validate|test|predict`` with 2 processes on the CPU, as users start them: Lightning's own
launcher (``--trainer.devices=2 --trainer.strategy=ddp``), ``torchrun`` and SLURM-style environment
variables; and a sweep whose runs use 2 processes each.

Every command runs in a subprocess with a timeout that fails the test (and kills the whole process
group) instead of hanging: a collective reached by one rank only (e.g. ``trainer.log_dir`` read in a
rank-0-only branch) used to hang the CLI forever.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp"]
TINY = ["-c", str(ROOT / "configs" / "quickstart.yaml"),
        "--data.source.init_args.num_train=64", "--data.target.init_args.num_train=64",
        "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=37",  # odd: no padding allowed
        "--data.batch_size=8", "--data.iters_per_epoch=4", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without launcher variables (a pytest run under torchrun/SLURM must not leak them)."""
    drop = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "NODE_RANK",
            "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def start(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen], what: str) -> list[str]:
    """Wait for every process; on timeout kill their process groups and fail (never hang the suite)."""
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            tails = [(p.communicate()[0] or "")[-1500:] for p in procs]
            pytest.fail(f"{what} did not finish in {TIMEOUT_S} s (a hang?); output tails:\n" + "\n---\n".join(tails))
        outputs.append(out)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, f"{what} failed with exit code {proc.returncode}:\n{out[-3000:]}"
    return outputs


def tlframe(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    return finish([start([sys.executable, "-m", "tlframe", *args], cwd, env or clean_env())], f"tlframe {args[0]}")[0]


def files_named(folder: Path, name: str) -> list[Path]:
    return sorted(folder.rglob(name))


def check_one_fit_run(tmp_path: Path, out: str, name: str = "quickstart") -> Path:
    """One run folder with one config.yaml and run_info.json, checkpoints that load, the summary printed once."""
    runs = tmp_path / "runs" / name
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"], "one run folder, not one per rank"
    run = runs / "version_0"
    assert files_named(tmp_path, "config.yaml") == [run / "config.yaml"]
    assert files_named(tmp_path, "run_info.json") == [run / "run_info.json"]
    assert out.count("tlframe: val results") == 1, out[-2000:]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # 4 batches per epoch shared by 2 ranks
    assert json.loads((run / "run_info.json").read_text())["stage"] == "fit"
    return run


@pytest.mark.parametrize("strategy", ["FineTune", "FrozenFeatures", "DANN", "MMD", "CDAN", "MDD"])
def test_fit_with_two_processes_from_the_cli(tmp_path, strategy):
    out = tlframe("fit", *TINY, *DDP, f"--model.strategy=tlframe.strategies.{strategy}",
                  f"--trainer.logger.init_args.save_dir={tmp_path}/runs", cwd=tmp_path)
    run = check_one_fit_run(tmp_path, out)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["strategy"]["class_path"] == f"tlframe.strategies.{strategy}"
    assert str(config["trainer"]["devices"]) == "2" and config["trainer"]["strategy"] == "ddp"


def test_validate_test_predict_with_two_processes_write_once_beside_the_checkpoint(tmp_path):
    tlframe("fit", *TINY, f"--trainer.logger.init_args.save_dir={tmp_path}/runs", cwd=tmp_path)
    run = tmp_path / "runs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    for command, prefix in (("validate", "val"), ("test", "test")):
        out = tlframe(command, *TINY, *DDP, f"--ckpt_path={last}", cwd=tmp_path)
        assert out.count(f"tlframe: {prefix} results") == 1, out[-2000:]
        folder = run / command / "last"
        assert (folder / "config.yaml").is_file() and (folder / "run_info.json").is_file()
        assert json.loads((folder / "run_info.json").read_text())["stage"] == command
    out = tlframe("predict", *TINY, *DDP, f"--ckpt_path={last}", cwd=tmp_path)
    assert out.count("tlframe: wrote 37 predictions") == 1, out[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart").iterdir()) == ["version_0"]  # no new runs
    rows = list(csv.DictReader((run / "predict" / "last" / "predictions.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(37))  # both ranks' shards, in order, none twice
    assert files_named(tmp_path, "predictions.csv") == [run / "predict" / "last" / "predictions.csv"]


def test_fit_under_torchrun(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
            "-m", "tlframe", "fit", *TINY, *DDP, "--model.strategy=tlframe.strategies.DANN",
            f"--trainer.logger.init_args.save_dir={tmp_path}/runs"]
    out = finish([start(argv, tmp_path, clean_env())], "torchrun tlframe fit")[0]
    check_one_fit_run(tmp_path, out)


def test_fit_under_slurm_environment_variables(tmp_path):
    """Two processes started as ``srun --ntasks=2`` would, each told its rank by SLURM's variables."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = clean_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                        SLURM_NODEID="0", SLURM_JOB_ID="4242", SLURM_JOB_NAME="tlframe", SLURM_NODELIST="localhost",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(start([sys.executable, "-m", "tlframe", "fit", *TINY, *DDP, "--model.strategy=tlframe.strategies.MMD",
                            f"--trainer.logger.init_args.save_dir={tmp_path}/runs"], tmp_path, env))
    outputs = finish(procs, "tlframe fit under SLURM variables")
    assert "All distributed processes registered. Starting with 2 processes" in outputs[0]
    check_one_fit_run(tmp_path, "".join(outputs))


def test_sweep_with_one_worker_whose_runs_use_two_processes(tmp_path):
    spec = {"base": str(ROOT / "configs" / "quickstart.yaml"), "out": str(tmp_path / "sweep"),
            "args": [a for a in TINY[2:]] + DDP, "grid": {"model.strategy": ["tlframe.strategies.DANN"]}, "seeds": [0, 1]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tlframe("sweep", str(path), "--workers", "1", cwd=tmp_path)
    done = sorted((tmp_path / "sweep").rglob("done.json"))
    assert len(done) == 2, out[-2000:]
    for d in done:
        assert len(list(d.parent.rglob("config.yaml"))) == 1 and len(list(d.parent.rglob("run_info.json"))) == 1
        assert len(list(d.parent.rglob("last.ckpt"))) == 1
        assert "val/target_acc" in json.loads(d.read_text())["scalars"]
        log = (d.parent / "output.log").read_text()
        assert "Starting with 2 processes" in log and log.count("tlframe: val results") == 1


@pytest.mark.parametrize("strategy", [
    ["--data.adapt_to_test_domain=true", "--model.strategy=tlframe.strategies.DANN", "--model.strategy.num_domains=3"],
    ["--model.strategy=tlframe.strategies.IRM", "--model.strategy.irm_penalty_anneal_iters=1"],
    ["--model.strategy=tlframe.strategies.DomainAdversarial", "--model.strategy.num_domains=2",
     "--model.strategy.mlp_width=16"],
], ids=["msda_dann", "dg_irm", "dg_dann"])
def test_multi_domain_fit_with_two_processes(tmp_path, strategy):
    """Several domains under DDP: each domain's sampler is sharded on its own (every rank gets every domain); a
    multi-source DA strategy and two DG strategies (one with its own alternating optimizer steps)."""
    domains = [{"class_path": "tlframe.data.SyntheticDomain",
                "init_args": {"style": style, "num_train": 64, "num_test": 37, "seed": seed}}
               for style, seed in (("source", 0), ("source", 2), ("target", 1))]
    (tmp_path / "domains.yaml").write_text(yaml.safe_dump({"data": {"domains": domains}}))
    out = tlframe("fit", "-c", str(ROOT / "configs" / "quickstart_domains.yaml"), "-c", str(tmp_path / "domains.yaml"),
                  *strategy, "--data.batch_size=8", "--data.iters_per_epoch=4",
                  "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                  "--trainer.enable_model_summary=false", *DDP, f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
                  cwd=tmp_path)
    run = check_one_fit_run(tmp_path, out, name="quickstart_domains")
    assert "val/source_synthetic_source_0_acc" in out and "val/source_acc" in out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    if "--model.strategy.num_domains=3" in strategy:
        assert ckpt["state_dict"]["strategy.discriminator.6.weight"].shape[0] == 3  # sources and the target
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert f"--model.strategy={config['model']['strategy']['class_path']}" in strategy
