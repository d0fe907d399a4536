"""The Office-Caltech-10 multi-source DA benchmark: cells, tables on hand-made numbers, one shortened real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.digits import common  # noqa: E402
from benchmarks.digits.common import Cell, RunResult, ledger_file  # noqa: E402
from benchmarks.office_caltech import run_msda as msda  # noqa: E402
from tlframe.sweep import load_sweep  # noqa: E402


def result(setting: str, seed: int, target: float = 0.0, source: float = 0.9, status: str = "done") -> RunResult:
    source_name, strategy = msda.split_setting(setting)
    cell = Cell(row=source_name, col=strategy, seed=seed, out=Path("/x"), name=f"{msda.NAME}/{setting}/seed{seed}",
                args=[])
    record = {"last": target, "source_acc_last": source, "wall_s": 100.0 + 10 * seed}
    return RunResult(cell, status, record if status == "done" else None, "" if status == "done" else "exit code 1")


def rows(table: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}


def test_cells_carry_the_sweep_overrides_and_the_seed(tmp_path):
    cells = msda.build_cells(["three_dann", "dslr_source_only"], [0, 2], tmp_path, tmp_path / "data", [])
    assert len(cells) == 4 and cells[0].ledger is None  # a scratch --out is not recorded in the ledger
    three = next(c for c in cells if c.row == "three" and c.seed == 2)
    assert (three.col, three.name) == ("dann", "office_caltech/msda_webcam/three_dann/seed2")
    assert three.args == ["-c", str(ROOT / "configs/office_caltech/webcam_from_three.yaml"),
                          "--model.strategy=tlframe.strategies.DANN", "--model.strategy.init_args.num_domains=4",
                          "--seed_everything=2"]
    dslr = next(c for c in cells if c.row == "dslr" and c.seed == 0)
    assert dslr.args == ["-c", str(ROOT / "configs/office_caltech/webcam_from_dslr.yaml"), "--seed_everything=0"]
    assert dslr.env == {"TLFRAME_DATA_ROOT": str(tmp_path / "data")}
    extra = msda.build_cells(["amazon_dann"], [1], tmp_path, tmp_path, ["--trainer.max_steps=2"])[0]
    assert extra.args[-2:] == ["--seed_everything=1", "--trainer.max_steps=2"]
    assert "--model.strategy.init_args.num_domains=4" not in extra.args  # one source: the binary discriminator
    default = msda.build_cells(["three_dann"], [0], msda.DEFAULT_OUT, tmp_path, [])[0]
    assert default.ledger == common.LEDGER
    smoke = msda.build_cells(["three_dann"], [0], msda.DEFAULT_OUT, tmp_path, ["--data.iters_per_epoch=2"])[0]
    assert smoke.ledger is None  # a modified run never replaces the recorded one
    assert ledger_file(default) == ROOT / "benchmarks/results/ledger/office_caltech/msda_webcam/three_dann/seed0.json"


def test_cells_are_the_runs_of_the_sweep_file(tmp_path):
    sweep = load_sweep(msda.SWEEP, out=str(tmp_path))
    cells = {c.name: c for c in msda.build_cells(msda.SETTINGS, msda.SEEDS, tmp_path, tmp_path, [])}
    assert len(sweep.runs) == len(cells) == msda.FULL_GRID == 24
    for run in sweep.runs:
        cell = cells[f"{msda.NAME}/{run.point['setting']}/seed{run.seed}"]
        assert cell.args == [a for c in run.configs for a in ("-c", c)] + run.args


def test_the_four_configs_share_the_budget_the_table_states():
    def shared(source: str) -> dict:
        cfg = yaml.safe_load(msda.config_file(source).read_text())
        del cfg["trainer"]["logger"]
        cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in ("source", "target", "sources", "targets")}
        return cfg

    assert all(shared(s) == shared("three") for s in msda.SOURCES)
    assert msda.budget() == {"steps": 1000, "epochs": 10, "backbone": "resnet10t", "pretrained": False,
                             "image_size": 64, "batch_size": 16, "lr": 0.01, "weight_decay": 0.0005,
                             "bottleneck_dim": 256, "val_fraction": 0.1, "augmentation": "crop_flip"}


def test_tables_best_single_source_and_what_remains():
    results = [result("three_source_only", 0, 0.60, 0.80), result("three_source_only", 1, 0.62, 0.82),
               result("dslr_source_only", 0, 0.42, 1.0), result("caltech10_source_only", 0, 0.30),
               result("dslr_dann", 0, 0.45), result("dslr_dann", 1, 0.47), result("three_dann", 0, status="failed")]
    cells = msda.build_cells(msda.SETTINGS, [0, 1], Path("/x"), Path("/data"), [])
    text = msda.render(results, cells, [], "python benchmarks/office_caltech/run_msda.py", Path("/x"))
    assert "by `python benchmarks/office_caltech/run_msda.py`. Do not edit by hand" in text
    assert "ledger `benchmarks/results/ledger/office_caltech/msda_webcam/`" in text
    assert "**Budget: 1,000 steps per run**" in text and "overrides" not in text.split("## Webcam")[0]
    tables = text.split("\n\n")
    target = rows(next(t for t in tables if t.startswith("| sources → Webcam") and "n=2" in t))
    assert list(target) == ["Amazon + Caltech + DSLR", "DSLR", "Caltech", "Amazon"]
    assert target["Amazon + Caltech + DSLR"] == ["61.0 ± 1.4 (n=2)", "failed (1 run)"]
    assert target["DSLR"] == ["42.0 (n=1)", "46.0 ± 1.4 (n=2)"] and target["Amazon"] == ["not run", "not run"]
    best = rows(next(t for t in tables if t.startswith("| strategy")))
    assert best["source only"] == ["DSLR, 42.0 (best of the 2 of 3 single sources run)", "61.0", "+19.0"]
    assert best["DANN"] == ["DSLR, 46.0 (best of the 1 of 3 single sources run)", "–", "–"]
    assert "Choosing it reads Webcam's labels: it is a reference row" in text
    assert "| Amazon + Caltech + DSLR | 81.0 ± 1.4 (n=2) | failed (1 run) |" in text  # source accuracy
    assert "| DSLR | 100 s | 105 s |" in text  # wall time: the mean over the seeds
    assert "**Partial: 6 finished run(s)** of the 24" in text
    assert "What remains: 9 run(s) listed below as not run, 1 failed run(s), 8 run(s) outside" in text
    assert "- `office_caltech/msda_webcam/amazon_source_only/seed0`" in text
    assert "- `office_caltech/msda_webcam/three_dann/seed0`" not in text.split("## Failed runs")[0]
    assert "## Failed runs" in text and "`office_caltech/msda_webcam/three_dann/seed0`: exit code 1" in text


def test_complete_grid_and_extra_overrides_are_stated():
    results = [result(s, seed, 0.5) for s in msda.SETTINGS for seed in msda.SEEDS]
    cells = msda.build_cells(msda.SETTINGS, msda.SEEDS, Path("/x"), Path("/data"), [])
    text = msda.render(results, cells, ["--trainer.max_steps=2"], "cmd", Path("/x"))
    assert "Complete: 24 runs" in text and "Not run" not in text
    assert "overrides `--trainer.max_steps=2`: the budget above may not hold" in text


@pytest.mark.parametrize("argv", [["--settings", "three_mmd"], ["--workers", "0"], ["--seeds", "0", "0"],
                                  ["--settings", "dslr_dann", "dslr_dann"]])
def test_argument_errors(argv):
    with pytest.raises(SystemExit):
        msda.parse_args(argv)


def test_defaults_are_the_whole_sweep():
    args = msda.parse_args([])
    assert args.settings == msda.SETTINGS and len(set(args.settings)) == 8 and args.seeds == [0, 1, 2]
    assert args.settings[:4] == ["amazon_source_only", "caltech10_source_only", "dslr_source_only",
                                 "three_source_only"]


def test_two_shortened_real_runs_and_their_table(shared_data, tmp_path):
    if not (shared_data / "office_caltech_10").is_dir():
        pytest.skip(f"Office-Caltech-10 not found at {shared_data / 'office_caltech_10'}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/office_caltech/run_msda.py"), "--settings",
                           "dslr_source_only", "three_dann", "--seeds", "0", "--out", str(tmp_path), "--results",
                           str(tmp_path / "msda.md"), "--data-root", str(shared_data), "--extra",
                           "--data.iters_per_epoch=2 --trainer.max_epochs=1 --trainer.limit_val_batches=2 "
                           "--data.eval_batch_size=32"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = tmp_path / "runs" / "office_caltech" / "msda_webcam"
    three = yaml.safe_load((runs / "three_dann" / "seed0" / "version_0" / "config.yaml").read_text())
    assert three["model"]["strategy"]["class_path"] == "tlframe.strategies.DANN"
    assert three["model"]["strategy"]["init_args"]["num_domains"] == 4  # the sweep's override reaches DANN
    done = json.loads((runs / "dslr_source_only" / "seed0" / "version_0" / "done.json").read_text())
    assert done["scalars"]["val/target_acc"]["count"] == 1 and done["source_acc_last"] is not None
    text = (tmp_path / "msda.md").read_text()
    assert "**Partial: 2 finished run(s)** of the 24" in text and "22 run(s) outside" in text
    assert f"| DSLR | {100 * done['last']:.1f} (n=1) | not run |" in text
