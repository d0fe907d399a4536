"""The RotatedMNIST domain-generalisation benchmark: cells, tables on hand-made numbers, one shortened real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.digits import common  # noqa: E402
from benchmarks.digits.common import Cell, RunResult  # noqa: E402
from benchmarks.domainbed import run_rotated_mnist as rm  # noqa: E402


def result(algorithm: str, domain: int, seed: int, tdv: float, oracle: float, status: str = "done") -> RunResult:
    cell = Cell(row=algorithm, col=str(domain), seed=seed, out=Path("/x"), name=f"{algorithm}/{domain}/{seed}", args=[])
    record = {"selection": {"training_domain_validation": {"test_acc": tdv}, "test_domain_oracle": {"test_acc": oracle}},
              "wall_s": 10.0}
    return RunResult(cell, status, record if status == "done" else None, "" if status == "done" else "exit code 1")


def test_cells_hold_out_each_domain_with_the_trial_seed_in_every_domain(tmp_path):
    cells = rm.build_cells(["erm", "irm"], [0, 5], [0, 1], 300, tmp_path, tmp_path / "data", [])
    assert len(cells) == 8 and cells[0].ledger is None  # a scratch --out is not recorded in the ledger
    cell = next(c for c in cells if c.row == "irm" and c.col == "5" and c.seed == 1)
    assert cell.name == "rotated_mnist/irm/test5/steps300/seed1"
    assert cell.args[:2] == ["-c", str(ROOT / "configs/domainbed/rotated_mnist/irm.yaml")]
    assert "--data.test_domain=5" in cell.args and "--seed_everything=1" in cell.args
    assert "--trainer.max_epochs=3" in cell.args  # 300 steps = 3 evaluations of 100 steps
    domains = json.loads(next(a for a in cell.args if a.startswith("--data.domains=")).split("=", 1)[1])
    assert [d["init_args"]["angle"] for d in domains] == [0, 15, 30, 45, 60, 75]
    assert {d["init_args"]["trial_seed"] for d in domains} == {1}
    default = rm.build_cells(["erm"], [0], [0], 5000, rm.DEFAULT_OUT, tmp_path, [])
    assert default[0].ledger == common.LEDGER
    # modified runs (--extra, e.g. a smoke run) in the default folder must not replace the recorded numbers
    assert rm.build_cells(["erm"], [0], [0], 5000, rm.DEFAULT_OUT, tmp_path, ["--trainer.max_steps=2"])[0].ledger is None


def test_table_averages_the_domains_and_compares_with_domainbed():
    results = [result("erm", d, s, 0.9 + 0.01 * d + 0.002 * s, 0.5) for d in range(6) for s in (0, 1)]
    results += [result("irm", 0, 0, 0.8, 0.5), result("irm", 1, 0, 0.0, 0.0, status="failed")]
    text = rm.table(results, ["erm", "irm"], list(range(6)), "training_domain_validation", refs=True)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()[2:]}
    assert rows["ERM"][0] == "90.1 ± 0.1 (n=2)" and rows["ERM"][5] == "95.1 ± 0.1 (n=2)"
    assert rows["ERM"][6:] == ["92.6", "98.0", "-5.4"]  # mean of 90.1 .. 95.1; DomainBed's ERM Avg 98.0
    assert rows["IRM"][:2] == ["80.0 (n=1)", "failed (1 run)"] and rows["IRM"][6:] == ["–", "97.7", "–"]
    oracle = rm.table(results, ["erm"], list(range(6)), "test_domain_oracle", refs=False)
    assert oracle.count("50.0 ± 0.0 (n=2)") == 6


def test_steps_must_be_whole_evaluations():
    import pytest

    with pytest.raises(SystemExit):
        rm.parse_args(["--steps", "150"])
    assert rm.parse_args(["--steps", "200"]).steps == 200


def test_one_shortened_real_run_and_its_table(shared_data, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/domainbed/run_rotated_mnist.py"), "--algorithms",
                           "erm", "--test-domains", "5", "--seeds", "0", "--steps", "100", "--out", str(tmp_path),
                           "--results", str(tmp_path / "dg.md"), "--data-root", str(shared_data), "--extra",
                           "--data.iters_per_epoch=2 --trainer.limit_val_batches=2 --data.eval_batch_size=64"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "runs" / "rotated_mnist" / "erm" / "test5" / "steps100" / "seed0" / "version_0"
    done = json.loads((run / "done.json").read_text())
    chosen = done["selection"]["training_domain_validation"]
    assert done["scalars"]["val/target_acc"]["count"] == 1  # one evaluation, after the 2 steps
    assert chosen["step"] == done["scalars"]["val/target_acc"]["step"] and 0.0 <= chosen["test_acc"] <= 1.0
    assert done["selection"]["test_domain_oracle"]["test_acc"] == chosen["test_acc"]  # one evaluation: the same one
    text = (tmp_path / "dg.md").read_text()
    assert "**Budget: 100 steps per run** (DomainBed: 5,000): not comparable" in text
    assert "**Partial: 1 finished run(s)** of the 18 of the full grid (1 algorithms x 6 held-out domains x 3 seeds" \
        in text and "held-out domains here: 75°; seeds: 0." in text  # a partial table says what remains
    assert f"{100 * chosen['test_acc']:.1f} (n=1)" in text
