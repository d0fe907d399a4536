"""``tlframe sweep``: sweep files, grid expansion and hashing, resume, workers, SLURM, errors; shipped ablations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tlframe import sweep as sw
from tlframe.cli import main as tlframe_main
from tlframe.runs import worker_thread_env

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--data.source.init_args.num_train=100", "--data.target.init_args.num_train=100",
         "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32", "--data.batch_size=16",
         "--data.iters_per_epoch=2", "--trainer.max_epochs=1", "--trainer.enable_model_summary=false"]


def write_sweep(folder: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def quick_spec(out: Path, **extra) -> dict:
    return {"base": str(ROOT / "configs" / "quickstart.yaml"), "out": str(out), "args": QUICK, **extra}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def tlframe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlframe", *args], capture_output=True, text=True, cwd=cwd, env=env(),
                          timeout=600)


# --------------------------------------------------------------------------- expansion and hashing (no runs)
def test_grid_variants_seeds_expand_in_order_with_stable_hashes(tmp_path):
    extra = write_sweep(tmp_path, {"trainer": {"max_epochs": 2}}, "extra.yaml")
    spec = quick_spec(tmp_path / "out", grid={"model.lr": [0.01, 0.1],
                                              "strategy": {"ft": {}, "dann": {"model.strategy": "tlframe.strategies.DANN",
                                                                              "config": extra.name}}},
                      variants=[{"name": "a", "model.bottleneck_dim": 64}, {"name": "b", "model.bottleneck_dim": 128}],
                      seeds=[0, 1], seed_args=["--data.split_seed={seed}"])
    sweep = sw.load_sweep(write_sweep(tmp_path, spec))
    assert sweep.axes == ["model.lr", "strategy", "variant"] and len(sweep.runs) == 2 * 2 * 2 * 2
    first, last = sweep.runs[0], sweep.runs[-1]
    assert first.point == {"model.lr": "0.01", "strategy": "ft", "variant": "a"} and first.seed == 0
    assert last.point == {"model.lr": "0.1", "strategy": "dann", "variant": "b"} and last.seed == 1
    assert last.args[-5:] == ["--model.lr=0.1", "--model.strategy=tlframe.strategies.DANN", "--model.bottleneck_dim=128",
                              "--seed_everything=1", "--data.split_seed=1"]
    assert last.configs == [str(ROOT / "configs" / "quickstart.yaml"), str(extra)]
    argv = last.argv()
    assert argv[:4] == [sys.executable, "-m", "tlframe", "fit"] and argv[4:8] == ["-c", last.configs[0], "-c", str(extra)]
    assert f"--trainer.logger.init_args.save_dir={last.run_dir}" in argv
    # every run its own folder; the same file read again gives the same folders
    hashes = [r.hash for r in sweep.runs]
    assert len(set(hashes)) == len(hashes) and all(len(h) == 12 for h in hashes)
    assert [r.hash for r in sw.load_sweep(tmp_path / "sweep.yaml").runs] == hashes
    assert first.run_dir == tmp_path / "out" / "runs" / first.hash
    # different arguments -> different folder; the output folder and the environment are not hashed
    moved = sw.load_sweep(write_sweep(tmp_path, {**spec, "out": str(tmp_path / "elsewhere"), "env": {"X": "1"}}, "b.yaml"))
    assert [r.hash for r in moved.runs] == hashes
    changed = sw.load_sweep(write_sweep(tmp_path, {**spec, "args": [*QUICK, "--model.lr=0.5"]}, "c.yaml"))
    assert not set(r.hash for r in changed.runs) & set(hashes)
    info = first.info()
    assert info["hash"] == first.hash and info["point"] == first.point and "--seed_everything=0" in info["command_line"]


def test_baselines_are_derived_shared_between_points_and_reuse_planned_runs(tmp_path):
    spec = quick_spec(tmp_path / "out", grid={"model.strategy": ["tlframe.strategies.DANN", "tlframe.strategies.FineTune"]},
                      seeds=[0, 1], baselines={"source_only": {}, "target_only": {"labels_per_class": 5}})
    sweep = sw.load_sweep(write_sweep(tmp_path, spec))
    planned, siblings = sweep.runs[:4], sweep.runs[4:]
    dann = [r for r in planned if r.point["model.strategy"] == "tlframe.strategies.DANN"]
    finetune = [r for r in planned if r.point["model.strategy"] == "tlframe.strategies.FineTune"]
    # DANN's source-only sibling is the FineTune point of the grid (same config): no extra run
    assert [r.baselines["source_only"] for r in dann] == [r.hash for r in finetune]
    assert all("source_only" not in r.baselines for r in finetune)  # FineTune is its own source-only result
    # one target-only run per seed, shared by both points
    assert [(s.baseline, s.seed, s.point) for s in siblings] == [
        ("target_only", seed, {"model.strategy": "*", "baseline": "target_only"}) for seed in (0, 1)]
    assert [r.baselines["target_only"] for r in planned] == [siblings[0].hash, siblings[1].hash] * 2
    assert sweep.axes == ["model.strategy", "baseline"]
    sweep.write_manifest()
    config = yaml.safe_load(Path(siblings[0].configs[0]).read_text())
    assert config["data"]["source"]["init_args"]["style"] == "target" and config["data"]["source_samples_per_class"] == 5
    manifest = json.loads((tmp_path / "out" / "sweep.json").read_text())["runs"]
    assert manifest[0]["baselines"] == planned[0].baselines and manifest[4]["baseline"] == "target_only"
    # the sibling is identified by the content of its config: same hashes when the sweep is loaded again
    assert [r.hash for r in sw.load_sweep(write_sweep(tmp_path, spec)).runs] == [r.hash for r in sweep.runs]


def test_the_hash_covers_config_contents_not_paths(tmp_path):
    """Editing a config makes its runs new runs (never a stale row); moving it changes nothing."""
    extra = write_sweep(tmp_path, {"trainer": {"max_epochs": 2}}, "extra.yaml")
    spec = quick_spec(tmp_path / "out", grid={"config": [extra.name]}, seeds=[0, 1])
    before = [r.hash for r in sw.load_sweep(write_sweep(tmp_path, spec)).runs]
    moved = write_sweep(tmp_path / "elsewhere", {"trainer": {"max_epochs": 2}}, "renamed.yaml")
    assert [r.hash for r in sw.load_sweep(write_sweep(tmp_path, {**spec, "grid": {"config": [str(moved)]}})).runs] == before
    write_sweep(tmp_path, {"trainer": {"max_epochs": 3}}, "extra.yaml")  # edited in place
    after = [r.hash for r in sw.load_sweep(write_sweep(tmp_path, spec)).runs]
    assert not set(after) & set(before)
    assert sw.load_sweep(tmp_path / "sweep.yaml").runs[0].key["configs"][1] == "sha256:" + sw.file_sha256(extra)


@pytest.mark.parametrize("spec, message", [
    ({"bsae": "x.yaml"}, "unknown key(s) ['bsae']"),
    ({"grid": {}}, "grid is empty"),
    ({"grid": {"model.lr": []}}, "grid axis 'model.lr' must be a non-empty list"),
    ({"grid": {"s": {}}}, "grid axis 's' has no values"),
    ({"base": "missing.yaml"}, "config file 'missing.yaml' not found"),
    ({"base": None, "grid": {"model.lr": [0.1]}}, "no config file for the point"),
    ({"seeds": []}, "seeds must be a non-empty list of integers"),
    ({"seeds": [0, 0]}, "seeds repeat"),
    ({"command": "train"}, "command must be one of"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variant names must be unique"),
    ({"grid": {"model.lr": [0.1, "0.1"]}}, "have the same arguments"),
    ({"baselines": ["source_ony"]}, "unknown baseline 'source_ony'; use ['source_only', 'target_only']"),
    ({"baselines": {"target_only": {"labels_per_class": 0}}}, "labels_per_class must be a positive integer or null"),
    ({"baselines": {"source_only": {"labels_per_class": 5}}}, "source_only has unknown option(s) ['labels_per_class']"),
    ({"baselines": ["source_only"], "grid": {"baseline": [1]}}, "rename the grid axis 'baseline'"),
])
def test_bad_sweep_files_exit_2_with_a_clear_message(tmp_path, capsys, spec, message):
    path = write_sweep(tmp_path, {**quick_spec(tmp_path / "out"), **spec})
    with pytest.raises(SystemExit) as exit_info:
        tlframe_main(["sweep", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tlframe sweep: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("grid, message", [
    ({"model.lrr": [0.1]}, "unknown option --model.lrr (on the command line): did you mean --model.lr"),
    ({"model.strategy": ["tlframe.strategies.DAN"]}, "cannot import 'tlframe.strategies.DAN': did you mean "
                                                     "tlframe.strategies.DANN"),
    ({"s": {"dann": {"model.strategy": "tlframe.strategies.DANN", "model.strategy.init_args.trade_of": 0.3}}},
     "DANN (model.strategy) has no argument 'trade_of'"),
])
def test_unknown_grid_keys_and_classes_stop_the_sweep_before_any_run(tmp_path, capsys, grid, message):
    """One line naming the point and the name, exit 2, and no run folder: not N failed runs after a while."""
    path = write_sweep(tmp_path, {**quick_spec(tmp_path / "out"), "grid": grid, "seeds": [0, 1]})
    assert sw.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlframe sweep: error: sweep file ") and "run '" in err and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "runs").exists()


def test_missing_sweep_file_and_bad_yaml_exit_2(tmp_path, capsys):
    assert sw.main([str(tmp_path / "nope.yaml")]) == 2
    (tmp_path / "bad.yaml").write_text("grid: [\n")
    assert sw.main([str(tmp_path / "bad.yaml")]) == 2
    assert sw.main([str(write_sweep(tmp_path, quick_spec(tmp_path / "o"))), "--index", "5"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "not valid YAML" in err and "--index 5 is out of range" in err


def test_slurm_script(tmp_path, capsys):
    path = write_sweep(tmp_path, {**quick_spec(tmp_path / "out"), "grid": {"model.lr": [0.01, 0.1, 1.0]}, "seeds": [0, 1],
                                  "slurm": ["--gres=gpu:1"]})
    assert sw.main([str(path), "--slurm", str(tmp_path / "job.sbatch"), "--slurm-option=--time=01:00:00"]) == 0
    text = (tmp_path / "job.sbatch").read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --array=0-5" in lines
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH --time=01:00:00" in lines
    assert f"#SBATCH --output={tmp_path / 'out' / 'slurm'}/%A_%a.log" in lines and (tmp_path / "out" / "slurm").is_dir()
    assert lines[-1] == (f"{sys.executable} -m tlframe sweep {path} --out {tmp_path / 'out'} "
                         '--index "$SLURM_ARRAY_TASK_ID"')
    assert all(ln.startswith("#") for ln in lines[: lines.index("set -euo pipefail")])  # #SBATCH before any command
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["runs"][5]["index"] == 5
    assert "6 array tasks" in capsys.readouterr().out


def test_gpu_pinning_one_gpu_per_running_run(tmp_path, monkeypatch):
    """Workers take a free GPU id for each run and give it back (a fake run records CUDA_VISIBLE_DEVICES)."""
    sweep = sw.load_sweep(write_sweep(tmp_path, {**quick_spec(tmp_path / "out"), "seeds": [0, 1, 2, 3]}))
    seen, threads = [], []

    def fake_run_one(run):
        seen.append(run.env.get("CUDA_VISIBLE_DEVICES"))
        threads.append(run.env.get("OMP_NUM_THREADS"))
        return sw.RunOutcome("done", {}, wall_s=0.0)

    monkeypatch.setattr(sw, "run_one", fake_run_one)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    outcomes = sw.run_sweep(sweep, workers=2, gpus=["3", "5"], stream=open(os.devnull, "w"))
    assert len(outcomes) == 4 and sorted(set(seen)) == ["3", "5"]
    assert threads == [str(max(1, (os.cpu_count() or 1) // 2))] * 4  # the CPU cores split between the 2 workers
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7")
    assert sw.visible_gpus() == ["2", "7"]


def test_list_tells_an_interrupted_run_from_a_failed_one(tmp_path, capsys):
    path = write_sweep(tmp_path, quick_spec(tmp_path / "out", grid={"model.lr": [0.01, 0.02, 0.03]}))
    interrupted, failed, _ = sw.load_sweep(path).runs
    for run, record in ((interrupted, {"exit_code": -9, "interrupted": True}), (failed, {"exit_code": 1})):
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "failed.json").write_text(json.dumps(record))
    assert sw.main([str(path), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {run.hash: next(ln for ln in lines if run.hash in ln) for run in sw.load_sweep(path).runs}
    assert " unfinished " in status[interrupted.hash] and " failed " in status[failed.hash]
    assert " not run " in status[sw.load_sweep(path).runs[2].hash]


# --------------------------------------------------------------------------- real tiny runs
def test_resume_after_kill_reruns_only_unfinished_runs_and_records_failures(tmp_path):
    spec = quick_spec(tmp_path / "out", grid={"model.lr": [0.01, 0.02, "oops"]})
    path = write_sweep(tmp_path, spec)
    finished, killed, bad = sw.load_sweep(path).runs
    # a run finished earlier (hand-made done.json) and one a SIGKILL cut short (files, no done.json)
    finished.run_dir.mkdir(parents=True)
    (finished.run_dir / "done.json").write_text(json.dumps({"scalars": {"val/target_acc": {"last": 0.5, "max": 0.5}}}))
    stamp = (finished.run_dir / "done.json").stat().st_mtime_ns
    (killed.run_dir / "checkpoints").mkdir(parents=True)
    (killed.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"cut short")
    (killed.run_dir / "events.out.tfevents.0.host").write_bytes(b"partial")
    result = tlframe("sweep", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # one run failed
    out = result.stdout
    assert f"skipped {finished.hash}" in out and f"done {killed.hash}" in out and f"FAILED {bad.hash}" in out
    assert "[3/3]" in out and "1 failed" in out
    assert (finished.run_dir / "done.json").stat().st_mtime_ns == stamp  # not redone
    assert not (killed.run_dir / "events.out.tfevents.0.host").exists()  # restarted from scratch
    done = json.loads((killed.run_dir / "done.json").read_text())
    assert 0.0 <= done["scalars"]["val/target_acc"]["last"] <= done["scalars"]["val/target_acc"]["max"] <= 1.0
    assert done["hash"] == killed.hash and json.loads((killed.run_dir / "args.json").read_text())["seed"] == 0
    failed = json.loads((bad.run_dir / "failed.json").read_text())
    assert failed["exit_code"] == 2 and "oops" in failed["log_tail"] and not (bad.run_dir / "done.json").exists()
    # the sweep again: nothing finished is redone, the failed run is tried again
    stamp = (killed.run_dir / "done.json").stat().st_mtime_ns
    again = tlframe("sweep", str(path), cwd=tmp_path)
    assert again.returncode == 1 and f"skipped {killed.hash}" in again.stdout and f"FAILED {bad.hash}" in again.stdout
    assert (killed.run_dir / "done.json").stat().st_mtime_ns == stamp


def test_a_sweep_killed_mid_run_resumes_that_run_from_its_checkpoint_and_ends_like_an_uninterrupted_one(tmp_path):
    """SIGKILL to the sweep and its run together (a SLURM time limit, a preemption, a closed session) mid-epoch;
    the sweep again resumes the run from ``last.ckpt``: same final weights, same metrics as a run never stopped."""
    import signal
    import time

    import torch

    args = [*QUICK[:5], "--data.iters_per_epoch=6", "--trainer.max_epochs=2", "--trainer.deterministic=true",
            "--checkpoint.every_n_train_steps=4", "--model.strategy=tlframe.strategies.DANN",
            "--model.bottleneck_dropout=0.5", "--data.train_augmentation=crop_flip"]
    whole = write_sweep(tmp_path / "whole", {**quick_spec(tmp_path / "whole" / "out"), "args": args})
    killed = write_sweep(tmp_path / "killed", {**quick_spec(tmp_path / "killed" / "out"), "args": args})
    assert tlframe("sweep", str(whole), cwd=tmp_path).returncode == 0
    run = sw.load_sweep(killed).runs[0]
    last = run.run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "tlframe", "sweep", str(killed)], cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    step, deadline = 0, time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists():
                os.killpg(proc.pid, signal.SIGSTOP)
                step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
                if step % 6:  # mid-epoch: kill the sweep and its run
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        if not step % 6:  # no mid-epoch checkpoint came: stop the sweep, fail below
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and step % 6, "the run ended before a mid-epoch checkpoint"
    assert not (run.run_dir / "done.json").exists() and not (run.run_dir / "failed.json").exists()

    again = tlframe("sweep", str(killed), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"done {run.hash}" in again.stdout and f"(resumed from {last})" in again.stdout
    done = json.loads((run.run_dir / "done.json").read_text())
    assert [a["resumed_from"] for a in done["attempts"]] == [None, str(last)]
    assert done["attempts"][0]["wall_s_estimated"] is True and done["attempts"][0]["wall_s"] > 0  # died with its sweep
    assert done["wall_s"] == pytest.approx(sum(a["wall_s"] for a in done["attempts"]), abs=0.02)
    reference = sw.load_sweep(whole).runs[0].run_dir
    ref_done = json.loads((reference / "done.json").read_text())
    assert done["scalars"] == ref_done["scalars"]  # every tag: last, max, min, step and count of points
    final, ref = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                  for d in (run.run_dir, reference))
    assert final["global_step"] == ref["global_step"] == 12
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key


def test_two_workers_four_runs_of_the_shipped_strategy_axis_then_report(tmp_path):
    """The strategy axis of configs/ablations/strategies_digits.yaml, end to end on tiny synthetic runs, 2 workers."""
    shipped = yaml.safe_load((ROOT / "configs/ablations/strategies_digits.yaml").read_text())
    path = write_sweep(tmp_path, quick_spec(tmp_path / "out", grid={"strategy": shipped["grid"]["strategy"]}))
    result = tlframe("sweep", str(path), "--workers", "2", "--gpus", "none", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 runs (0 already done)" in result.stdout and "2 workers" in result.stdout and "[4/4]" in result.stdout
    assert "ETA" in result.stdout
    runs = sw.load_sweep(path).runs
    assert all((r.run_dir / "done.json").is_file() for r in runs)
    ran = [yaml.safe_load((r.run_dir / "config.yaml").read_text())["model"]["strategy"]["class_path"] for r in runs]
    assert ran == [f"tlframe.strategies.{s}" for s in ("FineTune", "FrozenFeatures", "DANN", "MMD")]
    report = tlframe("report", str(tmp_path / "out"), "--rank-by", "val/source_acc", cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    table = (tmp_path / "out" / "report.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| rank |"))
    assert header.startswith("| rank | strategy | ") and "| val/source_acc |" in header
    assert "| val/target_snd |" in header and "oracle: max val/target_acc" in table  # validators are columns too
    assert table.count("| 1 | 1/1 |") == 4 and "| frozen_random |" in table
    assert "| backbone weights |" in header and table.count(": random init |") == 4  # from each run's run_info.json
    csv_header = (tmp_path / "out" / "report.csv").read_text().splitlines()[0]
    assert csv_header.startswith("strategy,") and "val/source_acc mean,val/source_acc std," in csv_header


def test_two_sweep_processes_on_one_folder_run_each_run_once(tmp_path):
    """Two `tlframe sweep` processes started together on one folder (e.g. two SLURM jobs): the run locks make
    them share the runs, each run is trained exactly once and nothing is cleared under the other's feet."""
    path = write_sweep(tmp_path, quick_spec(tmp_path / "out", seeds=[0, 1, 2]))
    procs = [subprocess.Popen([sys.executable, "-m", "tlframe", "sweep", str(path)], cwd=tmp_path, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = sw.load_sweep(path).runs
    trained = [line for out in outputs for line in out.splitlines() if "] done " in line]
    assert sorted(line.split("] done ")[1].split()[0] for line in trained) == sorted(r.hash for r in runs)
    for run in runs:
        record = json.loads((run.run_dir / "done.json").read_text())
        assert record["scalars"]["val/target_acc"]["count"] >= 1
        assert (run.run_dir / "output.log").read_text().count("tlframe fit") == 1
        assert not Path(str(run.run_dir) + ".lock").exists()


def test_a_sweep_with_baselines_runs_them_and_the_report_compares(tmp_path):
    """The user's path: tlframe sweep with baselines (one DANN point), then tlframe report; open what they wrote."""
    spec = quick_spec(tmp_path / "out", args=[*QUICK, "--model.strategy=tlframe.strategies.DANN"],
                      baselines={"source_only": {}, "target_only": {"labels_per_class": 4}})
    path = write_sweep(tmp_path, spec)
    result = tlframe("sweep", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 runs (0 already done)" in result.stdout and "baseline=target_only" in result.stdout
    runs = sw.load_sweep(path).runs
    configs = [yaml.safe_load((r.run_dir / "config.yaml").read_text()) for r in runs]
    assert [c["model"]["strategy"]["class_path"].rsplit(".", 1)[1] for c in configs] == ["DANN", "FineTune", "FineTune"]
    assert [c["data"]["source"]["init_args"]["style"] for c in configs] == ["source", "source", "target"]
    assert configs[2]["data"]["source_samples_per_class"] == 4 and configs[2]["data"]["target"] == configs[0]["data"]["target"]
    report = tlframe("report", str(tmp_path / "out"), cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| vs source-only | vs target-only |" in table and "## Transfer against its baselines (`val/target_acc`)" in table
    row = next(line for line in table.splitlines() if line.startswith("|  | "))  # the DANN run (baseline axis empty)
    assert row.count("(n=1)") == 2  # one seed: a difference per baseline, no spread


def test_layer_transfer_real_mnist_3_steps(shared_data, tmp_path):
    """The shipped ablation, shortened: pretrain on MNIST 0-4 for 3 steps, then one transfer point of the sweep."""
    common = ["--trainer.max_steps=3", "--data.iters_per_epoch=3", "--trainer.limit_val_batches=2",
              "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    pre = subprocess.run([sys.executable, "-m", "tlframe", "fit", "-c", str(ROOT / "configs/ablations/pretrain_mnist_0to4.yaml"),
                          *common], capture_output=True, text=True, cwd=tmp_path,
                         env={**env(), "TLFRAME_DATA_ROOT": str(shared_data)}, timeout=600)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    assert (tmp_path / "runs/ablations/pretrain_mnist_0to4/version_0/checkpoints/last.ckpt").is_file()
    spec = yaml.safe_load((ROOT / "configs/ablations/layer_transfer.yaml").read_text())
    spec["base"] = str(ROOT / "configs/ablations" / spec["base"])
    spec.update(out=str(tmp_path / "sweep"), args=common, seeds=[0], env={"TLFRAME_DATA_ROOT": str(shared_data)})
    path = write_sweep(tmp_path, spec)
    sweep = sw.load_sweep(path)
    index = next(r.index for r in sweep.runs if r.point == {"init": "pretrained", "model.strategy.init_args.freeze_stages": "1"})
    result = tlframe("sweep", str(path), "--index", str(index), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = sweep.runs[index]
    done = json.loads((run.run_dir / "done.json").read_text())
    assert 0.0 <= done["scalars"]["val/target_acc"]["last"] <= 1.0 and "val/source_acc" not in done["scalars"]
    assert "--model.strategy.init_args.freeze_stages=1" in done["argv"] and "--data.split_seed=0" in done["argv"]
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert config["data"]["source"]["init_args"]["class_subset"] == [5, 6, 7, 8, 9]
    assert config["model"]["weights"].endswith("pretrain_mnist_0to4/version_0/checkpoints/last.ckpt")


# --------------------------------------------------------------------------- shipped ablation sweeps
@pytest.mark.parametrize("name, n_runs", [("strategies_digits", 36), ("layer_transfer", 18)])
def test_shipped_ablation_sweeps_parse(name, n_runs, tmp_path, capsys):
    sweep = sw.load_sweep(ROOT / "configs" / "ablations" / f"{name}.yaml", out=str(tmp_path))
    assert len(sweep.runs) == n_runs and sweep.seeds == [0, 1, 2]
    for run in sweep.runs:
        if run.seed != 0:
            continue
        configs = [a for c in run.configs for a in ("-c", c)]
        with pytest.raises(SystemExit) as exit_info:
            tlframe_main(["fit", *configs, *run.args, "--print_config"])
        assert exit_info.value.code in (0, None)
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert cfg["seed_everything"] == 0
        if name == "strategies_digits":
            strategy = cfg["model"]["strategy"]["class_path"].rsplit(".", 1)[-1]
            assert strategy == {"source_only": "FineTune", "frozen_random": "FrozenFeatures", "dann": "DANN",
                                "mmd": "MMD"}[run.point["strategy"]]
            assert cfg["trainer"]["max_epochs"] == 2
        else:
            assert cfg["model"]["strategy"]["init_args"]["freeze_stages"] == int(run.point["model.strategy.init_args.freeze_stages"])
            assert (cfg["model"]["weights"] is None) == (run.point["init"] == "random")


def test_pretrain_config_parses(capsys):
    with pytest.raises(SystemExit):
        tlframe_main(["fit", "-c", str(ROOT / "configs/ablations/pretrain_mnist_0to4.yaml"), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["source"]["init_args"]["class_subset"] == [0, 1, 2, 3, 4]


def test_worker_thread_env_splits_the_cores_unless_the_user_chose():
    assert worker_thread_env(1, cpus=8, environ={}) == {}
    assert worker_thread_env(2, cpus=8, environ={}) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert worker_thread_env(4, cpus=2, environ={}) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert worker_thread_env(2, cpus=8, environ={"OMP_NUM_THREADS": "3"}) == {}


def test_a_leave_one_domain_out_sweep_and_its_domainbed_table(tmp_path):
    """A sweep over data.test_domain (every held-out domain of configs/quickstart_domains.yaml), then
    ``tlframe report --domains``: a column per held-out domain and DomainBed's Avg, per selection method."""
    domains = [{"class_path": "tlframe.data.SyntheticDomain",
                "init_args": {"style": style, "num_train": 64, "num_test": 24, "seed": seed}}
               for style, seed in (("source", 0), ("source", 2), ("target", 1))]
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"data": {"domains": domains}}))
    spec = {"base": [str(ROOT / "configs" / "quickstart_domains.yaml"), str(small)], "out": str(tmp_path / "out"),
            "args": ["--data.batch_size=8", "--data.iters_per_epoch=2", "--trainer.max_epochs=1",
                     "--trainer.enable_model_summary=false", "--insights.projector=false",
                     "--insights.a_distance=false"],
            "grid": {"data.test_domain": [0, 2]}, "seeds": [0]}
    path = write_sweep(tmp_path, spec)
    result = tlframe("sweep", str(path), "--gpus", "none", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    done = [json.loads((r.run_dir / "done.json").read_text()) for r in sw.load_sweep(path).runs]
    assert len(done) == 2 and all("training_domain_validation" in d["selection"] for d in done)
    report = tlframe("report", str(tmp_path / "out"), "--domains", "data.test_domain", cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## By held-out domain (data.test_domain)" in text and "### target acc, training-domain validation" in text
    header = next(line for line in text.splitlines() if line.startswith("| data.test_domain=0"))
    assert header.split("|")[1:-1] == [" data.test_domain=0 ", " data.test_domain=2 ", " Avg ", " Avg ± over seeds "]
    row = text.splitlines()[text.splitlines().index(header) + 2]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert all(c.endswith("(n=1)") for c in cells[:2] + cells[3:]) and float(cells[2]) >= 0
    bad = tlframe("report", str(tmp_path / "out"), "--domains", "data.nope", cwd=tmp_path)
    assert bad.returncode == 2 and "--domains 'data.nope' is not a grid axis" in bad.stderr


def test_the_shipped_multi_source_sweep_parses(tmp_path, capsys):
    sweep = sw.load_sweep(ROOT / "configs" / "office_caltech" / "msda_webcam_sweep.yaml", out=str(tmp_path))
    assert len(sweep.runs) == 24
    for run in (r for r in sweep.runs if r.seed == 0):
        configs = [a for c in run.configs for a in ("-c", c)]
        with pytest.raises(SystemExit) as exit_info:
            tlframe_main(["fit", *configs, *run.args, "--print_config"])
        assert exit_info.value.code in (0, None)
        cfg = yaml.safe_load(capsys.readouterr().out)
        setting = run.point["setting"]
        strategy = cfg["model"]["strategy"]
        assert strategy["class_path"].endswith("DANN" if setting.endswith("dann") else "FineTune")
        if setting.startswith("three"):
            assert len(cfg["data"]["sources"]) == 3 and cfg["data"]["targets"][0]["init_args"]["root"].endswith("webcam")
            assert strategy["init_args"].get("num_domains") == (4 if setting == "three_dann" else None)
        else:
            assert cfg["data"]["source"]["init_args"]["root"].endswith(setting.split("_")[0])


def test_the_shipped_mcd_budget_sweep_changes_only_the_batch_size_or_the_number_of_batches(tmp_path, capsys):
    sweep = sw.load_sweep(ROOT / "configs" / "digits" / "usps2mnist" / "mcd_budget_sweep.yaml", out=str(tmp_path))
    table = yaml.safe_load((ROOT / "configs" / "digits" / "usps2mnist" / "mcd.yaml").read_text())
    cfgs = {}
    for run in sweep.runs:
        configs = [a for c in run.configs for a in ("-c", c)]
        with pytest.raises(SystemExit) as exit_info:
            tlframe_main(["fit", *configs, *run.args, "--print_config"])
        assert exit_info.value.code in (0, None)
        cfgs[run.point["recipe"]] = yaml.safe_load(capsys.readouterr().out)
    assert sorted(cfgs) == ["batch_128", "batches_50000"] and {r.seed for r in sweep.runs} == {0}
    wide, long = cfgs["batch_128"], cfgs["batches_50000"]
    assert (wide["data"]["batch_size"], wide["trainer"]["max_epochs"]) == (128, table["trainer"]["max_epochs"])
    assert (long["data"]["batch_size"], long["trainer"]["max_epochs"]) == (64, 10 * table["trainer"]["max_epochs"])
    for cfg in (wide, long):
        assert cfg["model"]["strategy"]["class_path"].endswith("MCD") and cfg["data"]["iters_per_epoch"] == 500
        # a fixed learning rate: the long run's state after b batches is the state a b-batch run ends with
        assert cfg["model"]["scheduler"]["init_args"]["gamma"] == 0.0
