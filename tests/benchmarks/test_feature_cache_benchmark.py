"""benchmarks/feature_cache.py in a tiny mode (dtn, 32 px, 16 images, 1+1 epochs), so the script cannot rot."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import feature_cache  # noqa: E402


def test_feature_cache_benchmark_tiny_run_writes_its_figures(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "results" / "feature_cache.md"
    argv = ["--backbone", "dtn", "--image-size", "32", "--images", "16", "--batch-size", "8", "--epochs", "1",
            "--warmup", "1", "--threads", "0", "--results", str(out)]
    assert feature_cache.main(argv) == 0
    assert torch.get_num_threads() == threads  # --threads 0 leaves the process alone
    text = out.read_text()
    assert "benchmarks/feature_cache.py --backbone dtn --image-size 32" in text and "2 steps/epoch" in text
    assert re.search(r"\| uncached \(`cache_features: none`\) \| \d+\.\d+ \|", text)
    assert re.search(r"\| cached \(`cache_features: memory`\) \| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d+ \|", text)
    assert re.search(r"Ratio uncached / cached per epoch: \d+x", text) and "machine:" in text
    assert not list(out.parent.glob(".*"))  # written atomically: no temporary file left
    assert f"wrote {out}" in capsys.readouterr().out
