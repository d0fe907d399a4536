"""The ``tlframe`` command: quickstart, configs, checkpoints, errors."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
import yaml

from tlframe.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def small_quickstart(tmp_path, *extra: str) -> list[str]:
    return ["-c", str(CONFIGS / "quickstart.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
            "--data.source.init_args.num_train=200", "--data.target.init_args.num_train=200",
            "--data.source.init_args.num_test=64", "--data.target.init_args.num_test=64",
            "--data.batch_size=16", "--data.iters_per_epoch=4", "--trainer.max_epochs=2", *QUIET, *extra]


def test_quickstart_fit_writes_logs_checkpoints_and_prints_results(tmp_path, capsys):
    main(["fit", *small_quickstart(tmp_path)])
    out = capsys.readouterr().out
    assert "val/source_acc" in out and "val/target_acc" in out and "tensorboard --logdir" in out
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    best = glob.glob(str(run / "checkpoints" / "best-epoch*.ckpt"))
    assert len(best) == 1
    assert glob.glob(str(run / "events.out.tfevents.*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["strategy"]["class_path"] == "tlframe.strategies.FineTune"
    ckpt = torch.load(best[0], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["num_classes"] == 10  # linked from the data module
    callbacks = {k: v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")}
    assert [v["monitor"] for v in callbacks.values()] == ["val/source_acc"]  # label-free selection


def test_test_validate_predict_from_checkpoint_and_checkpoint_as_pretrained_backbone(tmp_path, capsys):
    main(["fit", *small_quickstart(tmp_path)])
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    main(["test", *small_quickstart(tmp_path), f"--ckpt_path={last}"])
    assert "test/target_acc" in capsys.readouterr().out
    main(["validate", *small_quickstart(tmp_path), f"--ckpt_path={last}"])
    # transfer: a new run starting from the first run's backbone, with a frozen backbone
    main(["fit", *small_quickstart(tmp_path, f"--model.weights={last}", "--model.strategy=tlframe.strategies.FrozenFeatures",
                                   "--trainer.max_epochs=1")])
    second = tmp_path / "runs" / "quickstart" / "version_3" / "checkpoints" / "last.ckpt"
    a = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(second, map_location="cpu", weights_only=False)["state_dict"]
    backbone = [k for k in a if k.startswith("backbone.")]
    assert backbone and all(torch.equal(a[k], b[k]) for k in backbone)
    assert not torch.equal(a["head.classifier.weight"], b["head.classifier.weight"])
    # predict writes one row per target test image with a probability per class
    main(["predict", *small_quickstart(tmp_path), f"--ckpt_path={last}"])
    rows = (tmp_path / "runs" / "quickstart" / "version_4" / "predictions.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["index", "pred", "confidence"] and len(rows[0].split(",")) == 13
    assert len(rows) == 1 + 64
    probs = [float(v) for v in rows[1].split(",")[3:]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4) and int(rows[1].split(",")[1]) == probs.index(max(probs))


def test_print_config_shows_every_strategy_knob(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONFIGS / "quickstart.yaml"), "--model.strategy=tlframe.strategies.DANN", "--print_config"])
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    init = cfg["model"]["strategy"]["init_args"]
    assert cfg["model"]["strategy"]["class_path"] == "tlframe.strategies.DANN"
    assert {"trade_off", "grl_max_steps", "backbone_lr_mult", "freeze_stages", "bn_policy"} <= set(init)
    assert cfg["checkpoint"]["monitor"] == "val/source_acc"


ALL_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")
                     if "grid" not in (yaml.safe_load(p.read_text()) or {}))  # sweep files: tests/test_sweep.py


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["strategy"]["class_path"].startswith("tlframe.strategies.")


DIGIT_CONFIGS = [c for c in ALL_CONFIGS if c.startswith("digits/")]


@pytest.mark.parametrize("config", DIGIT_CONFIGS)
def test_digit_configs_train_on_the_real_data(config, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLFRAME_DATA_ROOT", str(shared_data))
    main(["fit", "-c", str(CONFIGS / config), f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=3",
          "--data.iters_per_epoch=3", "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu", *QUIET])
    out = capsys.readouterr().out
    assert "val/source_acc" in out and "val/target_acc" in out


def test_cli_checkpoint_reloads_with_its_strategy(tmp_path):
    from tlframe.module import TransferModule
    from tlframe.strategies import DANN

    main(["fit", *small_quickstart(tmp_path, "--model.strategy=tlframe.strategies.DANN", "--model.strategy.hidden=64",
                                   "--trainer.max_epochs=1")])
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    model = TransferModule.load_from_checkpoint(last)
    assert isinstance(model.strategy, DANN) and model.strategy.hidden == 64
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(model.strategy.discriminator[0].weight, state["strategy.discriminator.0.weight"])


def test_same_seed_and_config_give_identical_runs_with_config_versions_and_commit_saved(tmp_path, capsys):
    import json

    outs, states = [], []
    for name in ("a", "b"):
        main(["fit", *small_quickstart(tmp_path / name, "--model.bottleneck_dropout=0.5",
                                       "--data.train_augmentation=crop_flip", "--trainer.deterministic=true")])
        outs.append([line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("val/")])
        run = tmp_path / name / "runs" / "quickstart" / "version_0"
        states.append(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"])
        info = json.loads((run / "run_info.json").read_text())
        assert (run / "config.yaml").is_file() and info["stage"] == "fit" and info["seed"] == 0
        assert info["packages"]["torch"] == torch.__version__.split("+")[0] and info["packages"]["tlframe"]
        git = info["git"]["tlframe"]
        assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))
    assert outs[0] == outs[1] and len(outs[0]) == 9  # accuracy x2, loss x2, mean class acc x2, entropy, SND, A-distance
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_cached_frozen_features_from_yaml_and_augmentation_error(tmp_path, capsys):
    cached = ["--model.strategy=tlframe.strategies.FrozenFeatures", "--model.strategy.cache_features=memory"]
    main(["fit", *small_quickstart(tmp_path, *cached, "--trainer.max_epochs=1")])
    assert "val/source_acc" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *small_quickstart(tmp_path, *cached, "--data.train_augmentation=crop_flip")])
    assert exit_info.value.code == 2
    assert "train_augmentation='crop_flip' cannot be used with cached features" in capsys.readouterr().err
