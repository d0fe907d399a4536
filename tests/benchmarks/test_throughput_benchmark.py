"""benchmarks/throughput.py in a tiny mode (a couple of steps per variant), so the script cannot rot.

Asserts on the produced numbers and file, never on timing targets (this machine is shared and noisy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["finetune", "frozen", "dann", "mmd"]


def test_throughput_tiny_run_writes_figures_for_every_strategy(tmp_path):
    results, record = tmp_path / "throughput.md", tmp_path / "throughput.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--backbone", "lenet",
           "--image-size", "28", "--batch-size", "4", "--warmup", "1", "--steps", "2", "--repeats", "1",
           "--peak-tflops", "1.0", "--results", str(results), "--json", str(record)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(record.read_text())
    assert data["setup"]["backbone"] == "lenet" and data["setup"]["threads"] == 1
    assert sorted(data["results"]) == sorted(STRATEGIES)
    for name, r in data["results"].items():
        assert set(r["variants"]) == {"tlframe", "raw", "reference", "tlframe_fast"}, name
        for variant, m in r["variants"].items():
            assert m["img_s"] > 0 and m["mem_mib"] >= 0, (name, variant)
        assert r["ratio_tlframe_raw"] > 0 and r["ratio_fast_reference"] > 0
        assert r["images_per_step"] == (8 if name in ("dann", "mmd") else 4)
        assert r["flops_per_step"] > 0
        assert 0 < data["mfu"][name] < 1
    # FrozenFeatures runs no backward through the backbone: fewer FLOPs than fine-tuning
    assert data["results"]["frozen"]["flops_per_step"] < data["results"]["finetune"]["flops_per_step"]
    text = results.read_text()
    assert text.startswith("# Training-step throughput")
    for needle in ("tlframe / raw", "fast / reference", "MFU", "benchmarks/throughput.py", "--batch-size 4", *STRATEGIES):
        assert needle in text, needle
    assert not list(tmp_path.glob(".throughput.md.*"))  # atomic write left no temporary file
