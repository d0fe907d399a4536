"""``benchmarks/digits/run_negative_transfer.py``: its sweep file plans the DANN runs and their shared baselines."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.digits.run_negative_transfer import SWEEP, source_of, target_of
from tlframe.sweep import load_sweep


def test_the_shipped_sweep_plans_each_run_with_both_baselines(tmp_path):
    runs = load_sweep(SWEEP, str(tmp_path)).runs
    dann = [r for r in runs if not r.baseline]
    assert len(dann) == 6 * 3 and all(set(r.baselines) == {"source_only", "target_only"} for r in dann)
    siblings = {r.hash: r for r in runs if r.baseline}
    # one source-only run per task and seed; one target-only run per target and seed, shared by its 3 tasks
    assert sum(r.baseline == "source_only" for r in siblings.values()) == 18
    assert sum(r.baseline == "target_only" for r in siblings.values()) == 6
    for run in dann:
        target_only = siblings[run.baselines["target_only"]]
        assert target_only.seed == run.seed and target_of(run.point["task"]) in target_only.point["task"]
    tasks = [r.point["task"] for r in dann[::3]]
    assert [(source_of(t), target_of(t)) for t in tasks] == [
        ("mnist", "usps"), ("mnistm", "usps"), ("mnist_swapped", "usps"),
        ("mnist", "mnistm"), ("usps", "mnistm"), ("mnist_swapped", "mnistm")]
    swapped = yaml.safe_load((Path(SWEEP).parent / "negative_transfer.yaml").read_text())["grid"]["task"]
    source = swapped["mnist_swapped_to_usps"]["data.source"]
    assert source["class_path"] == "tlframe.data.RelabelledDomain" and source["init_args"]["relabel"] == {3: 5, 5: 3, 4: 9, 9: 4}
