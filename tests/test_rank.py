"""``tlframe rank``: candidates (tlframe checkpoints, timm backbones with local weights, random init) scored
on the labelled images of a config's data section; the ranked table written as Markdown and CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from tlframe.cli import main as tlframe_main

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["--data.source.init_args.num_train=120", "--data.target.init_args.num_train=120",
             "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32", "--data.batch_size=16"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    tlframe_main(["fit", "-c", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.logger.init_args.save_dir={runs}",
                  *TINY_DATA, "--model.backbone=lenet", "--data.iters_per_epoch=4", "--trainer.max_epochs=1",
                  "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    return runs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


def rank(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        tlframe_main(["rank", "-c", str(ROOT / "configs" / "quickstart.yaml"), *TINY_DATA, *args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_rank_scores_every_candidate_and_writes_the_ranked_table(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
    cands = tmp_path / "candidates.yaml"
    cands.write_text(yaml.safe_dump({"candidates": [
        {"name": "trained", "checkpoint": str(checkpoint)},
        {"name": "same_backbone_weights", "backbone": "lenet", "weights": str(checkpoint)},
        {"name": "random", "backbone": "lenet"},
    ]}))
    code, out, err = rank(capsys, "--candidates", str(cands), "--out", str(tmp_path / "ranking"))
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "ranking" / "ranking.csv").open()))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    logme = [float(r["logme"]) for r in rows]
    assert logme == sorted(logme, reverse=True)  # ranked by LogME, best first
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"trained", "same_backbone_weights", "random"}
    assert all(r["n"] == "108" and r["classes"] == "10" and r["dim"] for r in rows)  # 120 minus the 10 % val split
    # same backbone weights -> same features -> same feature scores; only the checkpoint brings its classifier
    for s in ("logme", "hscore", "reg_hscore"):
        assert float(by_name["trained"][s]) == pytest.approx(float(by_name["same_backbone_weights"][s]))
    assert by_name["trained"]["leep"] and float(by_name["trained"]["leep"]) <= 0
    assert by_name["random"]["leep"] == "" and by_name["random"]["nce"] == ""
    assert float(by_name["trained"]["logme"]) > float(by_name["random"]["logme"])  # training helped
    text = (tmp_path / "ranking" / "ranking.md").read_text()
    assert text.startswith("# Transferability ranking") and "| 1 | trained |" in text.replace(
        "| 1 | same_backbone_weights |", "| 1 | trained |")
    assert "tlframe rank: wrote" in out
    cached = sorted((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(cached) == 2  # one feature set per distinct backbone weights; reused by a rerun ...
    code, _, _ = rank(capsys, "--candidates", str(cands), "--out", str(tmp_path / "again"), "--rank-by", "hscore")
    assert code == 0 and sorted((tmp_path / "cache" / "features").glob("*.pt")) == cached
    again = list(csv.DictReader((tmp_path / "again" / "ranking.csv").open()))
    hs = [float(r["hscore"]) for r in again]
    assert hs == sorted(hs, reverse=True)


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ({"candidates": []}, "give a non-empty list"),
    ({"candidates": [{"name": "a", "backbone": "dtn", "weight": "x"}]}, "entry 0 has unknown key(s) ['weight']"),
    ({"candidates": [{"name": "a"}]}, "needs either 'checkpoint'"),
    ({"candidates": [{"name": "a", "backbone": "dtn"}, {"name": "a", "backbone": "lenet"}]}, "names repeat"),
    ({"candidates": [{"name": "a", "checkpoint": "/nonexistent.ckpt"}]}, "no such file"),
    ({"candidates": [{"name": "a", "backbone": "resnet_50"}]}, "Unknown backbone 'resnet_50'"),
])
def test_bad_candidates_give_one_line_and_exit_2(content, expected, tmp_path, capsys):
    cands = tmp_path / "candidates.yaml"
    if content is not None:
        cands.write_text(yaml.safe_dump(content))
    code, out, err = rank(capsys, "--candidates", str(cands), "--out", str(tmp_path / "r"))
    assert code == 2 and err.startswith("tlframe rank: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_bad_data_options_give_one_line(tmp_path, capsys):
    cands = tmp_path / "c.yaml"
    cands.write_text(yaml.safe_dump([{"name": "a", "backbone": "dtn"}]))
    code, _, err = rank(capsys, "--candidates", str(cands), "--data.batch_sise=3")
    assert code == 2 and "batch_sise" in err and "did you mean" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = rank(capsys, "--candidates", str(cands), "--model.lr=3")
    assert code == 2 and "unknown option --model.lr" in err, err


def test_a_checkpoint_with_a_strategy_built_head_is_scored_with_its_own_classifier(tmp_path, capsys, monkeypatch):
    """MDD replaces the linear classifier by a two-layer head: rank rebuilds the module as it was trained."""
    monkeypatch.setenv("TLFRAME_CACHE_DIR", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    tlframe_main(["fit", "-c", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.logger.init_args.save_dir={runs}",
                  *TINY_DATA, "--model.backbone=lenet", "--data.iters_per_epoch=2", "--trainer.max_epochs=1",
                  "--model.strategy=tlframe.strategies.MDD", "--model.strategy.init_args.head_width=32",
                  "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    ckpt = runs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    head_keys = [k for k in torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"] if k.startswith("head.classifier")]
    assert "head.classifier.weight" not in head_keys and len(head_keys) == 4  # Linear-ReLU-Dropout-Linear
    cands = tmp_path / "candidates.yaml"
    cands.write_text(yaml.safe_dump({"candidates": [{"name": "mdd", "checkpoint": str(ckpt)}]}))
    code, _, err = rank(capsys, "--candidates", str(cands), "--out", str(tmp_path / "ranking"))
    assert code == 0, err
    row = next(csv.DictReader((tmp_path / "ranking" / "ranking.csv").open()))
    assert row["source_classes"] == "10" and float(row["leep"]) <= 0 and row["nce"] != ""
