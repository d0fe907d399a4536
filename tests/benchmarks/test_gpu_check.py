"""benchmarks/gpu_check.py: its CPU dry run (every part's code path, tiny sizes) and the unattended mode
(a failing or overrunning part is recorded and the others still run), so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    results = tmp_path / "gpu.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--results", str(results), *args], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=env)
    return proc, json.loads((tmp_path / "gpu.json").read_text()), results.read_text()


def test_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    proc, data, text = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = data["parts"]
    assert list(parts) == list(gpu_check.PARTS) and all(p["status"] == "ok" for p in parts.values()), parts
    assert data["dry_run"] and data["device"]["torch"]
    tp = parts["throughput"]["record"]["results"]
    assert sorted(tp) == ["dann", "finetune"]
    for name, r in tp.items():
        assert r["flops_per_step"] > 0 and r["images_per_step"] == (8 if name == "dann" else 4)
        assert {"tlframe fp32", "raw fp32", "reference fp32", "tlframe bf16", "tlframe bf16 + channels_last",
                "raw bf16 + channels_last"} == set(r["variants"]), name
        assert all(m["img_s"] > 0 for m in r["variants"].values())
        derived = data["derived"][name]
        assert derived["tlframe / raw (fp32)"] == pytest.approx(
            r["variants"]["tlframe fp32"]["img_s"] / r["variants"]["raw fp32"]["img_s"])
    amp = parts["amp"]["record"]["results"]
    assert sorted(amp) == sorted(gpu_check.strategy_classes())  # every strategy tlframe ships
    for name, row in amp.items():
        assert set(row) == {"32-true", "bf16-mixed"}
        assert len(row["32-true"]["losses"]) == 4 and row["bf16-mixed"]["finite"], name
        assert row["bf16-mixed"]["within_tolerance"], (name, row)
    ddp = parts["ddp"]["record"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo" and ddp["global_step"] == 2
    assert ddp["max_param_diff_between_ranks"] == 0.0 and ddp["run_folders"] == ["version_0"]
    assert ddp["event_writer_pids"] == [ddp["rank0_pid"]] and "test/target_acc" in ddp["test_metrics"]
    assert data["derived"]["ddp_ok"] and data["derived"]["amp_all_within_tolerance"]
    assert parts["data"]["record"]["img_s"] > 0 and data["derived"]["data_over_compute"] > 0
    assert text.startswith("# tlframe on a GPU") and "DRY RUN on CPU" in text
    for heading in ("## 1. Throughput and MFU", "## 2. Mixed precision", "## 3. DDP", "## 4. Data pipeline", "**pass**"):
        assert heading in text, heading


def test_a_failing_part_and_an_overrunning_part_are_recorded_and_the_file_is_still_written(tmp_path):
    proc, data, text = run_check(tmp_path, "--parts", "amp,data", "--inject-failure", "amp", "--budget", "data=0.5")
    assert proc.returncode == 1
    amp, dat = data["parts"]["amp"], data["parts"]["data"]
    assert amp["status"] == "failed (exit code 1)" and "failure injected into part 'amp'" in amp["error"]
    assert dat["status"].startswith("timed out after 0 s") or dat["status"].startswith("timed out after 1 s"), dat
    assert "| amp | failed (exit code 1) |" in text and "## Failures" in text and "timed out" in text


def test_scaler_skips_and_tolerance():
    assert gpu_check.skipped_steps([65536.0, 65536.0, 32768.0, 32768.0, 16384.0, 32768.0]) == 2
    assert gpu_check.skipped_steps([]) == 0
    ok, worst = gpu_check.within_tolerance([1.0, 2.02], [1.0, 2.0], atol=0.0, rtol=0.02)
    assert ok and worst == pytest.approx(0.5)
    assert not gpu_check.within_tolerance([1.0, float("nan")], [1.0, 2.0], 0.05, 0.05)[0]
    assert not gpu_check.within_tolerance([1.0], [1.0, 2.0], 0.05, 0.05)[0]  # a run that stopped early fails


def test_peak_is_known_for_h100_and_h200_and_given_otherwise():
    info = {"gpus": [{"name": "NVIDIA H200"}]}
    assert gpu_check.peak_tflops(info, None) == 989.0 and gpu_check.peak_tflops(info, 500.0) == 500.0
    assert gpu_check.peak_tflops({"gpus": [{"name": "Some GPU"}]}, None) is None
