"""The ``tlframe`` command: quickstart, configs, checkpoints, errors."""

from __future__ import annotations

import csv
import glob
from pathlib import Path

import pytest
import torch
import yaml

from tlframe.cli import main
from tlframe.data.synthetic import SHAPES

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


def test_test_validate_predict_from_checkpoint_and_checkpoint_as_pretrained_backbone(tmp_path, capsys, monkeypatch):
    main(["fit", *small_quickstart(tmp_path)])
    run = tmp_path / "runs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    main(["test", *small_quickstart(tmp_path), f"--ckpt_path={last}"])
    out = capsys.readouterr().out
    assert "test/target_acc" in out and "tlframe: test results" in out
    main(["validate", *small_quickstart(tmp_path), f"--ckpt_path={last}"])
    assert "tlframe: val results" in capsys.readouterr().out
    # evaluations log beside the checkpoint's run, not as new runs with only hp_metric
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart").iterdir()) == ["version_0"]
    test_events = list((run / "test" / "last").glob("events.out.tfevents.*"))
    assert len(test_events) == 1 and (run / "test" / "last" / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(run / "test" / "last")).Reload().Tags()["scalars"]
    assert "test/target_acc" in tags and "hp_metric" not in tags
    # without a logger the run's record still goes beside the checkpoint, never into the current directory
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    main(["validate", *small_quickstart(tmp_path), f"--ckpt_path={last}", "--trainer.logger=false"])
    assert "tlframe: val results" in capsys.readouterr().out and list(cwd.iterdir()) == []
    assert (run / "validate" / "last" / "config.yaml").is_file() and (run / "validate" / "last" / "run_info.json").is_file()
    # transfer: a new run starting from the first run's backbone, with a frozen backbone
    main(["fit", *small_quickstart(tmp_path, f"--model.weights={last}", "--model.strategy=tlframe.strategies.FrozenFeatures",
                                   "--trainer.max_epochs=1")])
    second = tmp_path / "runs" / "quickstart" / "version_1" / "checkpoints" / "last.ckpt"
    a = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(second, map_location="cpu", weights_only=False)["state_dict"]
    backbone = [k for k in a if k.startswith("backbone.")]
    assert backbone and all(torch.equal(a[k], b[k]) for k in backbone)
    assert not torch.equal(a["head.classifier.weight"], b["head.classifier.weight"])


def test_predict_writes_one_named_row_per_image_with_class_names_and_labels(tmp_path, capsys):
    main(["fit", *small_quickstart(tmp_path, "--trainer.max_epochs=1")])
    run = tmp_path / "runs" / "quickstart" / "version_0"
    main(["predict", *small_quickstart(tmp_path), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    path = run / "predict" / "last" / "predictions.csv"
    assert "tlframe: wrote 64 predictions to" in capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 64 and [int(r["index"]) for r in rows] == list(range(64))
    header = list(rows[0])
    assert header[:5] == ["index", "sample", "label", "pred", "confidence"]
    assert header[5:] == [f"prob_{name}" for name in SHAPES]  # one column per class name
    assert rows[3]["sample"] == "synthetic-target test #3"  # in-memory set: split and index
    assert {r["label"] for r in rows} <= set(SHAPES) and len({r["label"] for r in rows}) > 1  # labelled target
    for r in rows:
        probs = [float(r[f"prob_{name}"]) for name in SHAPES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert r["pred"] == SHAPES[probs.index(max(probs))] and float(r["confidence"]) == pytest.approx(max(probs), abs=1e-6)


def test_predict_on_any_folder_of_images_names_the_files(tmp_path, image_writer):
    main(["fit", *small_quickstart(tmp_path, "--trainer.max_epochs=1")])
    run = tmp_path / "runs" / "quickstart" / "version_0"
    files = [image_writer(tmp_path / "new" / name, size=(40, 30), seed=i)
             for i, name in enumerate(["b.png", "a.jpg", "sub/c.png"])]
    (tmp_path / "new" / "notes.txt").write_text("not an image")
    out = tmp_path / "preds"
    main(["predict", *small_quickstart(tmp_path), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
          "--data.predict_domain=tlframe.data.ImageFilesDomain", f"--data.predict_domain.root={tmp_path / 'new'}",
          f"--predictions.output_dir={out}"])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["sample"] for r in rows] == sorted(str(f) for f in files)  # every image, by path, none else
    assert all(r["label"] == "" and r["pred"] in SHAPES for r in rows)
    # a labelled folder whose classes differ from the training classes is refused, naming both
    (tmp_path / "wrong" / "cat").mkdir(parents=True)
    image_writer(tmp_path / "wrong" / "cat" / "0.png")
    with pytest.raises(SystemExit) as err:
        main(["predict", *small_quickstart(tmp_path), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
              "--data.predict_domain=tlframe.data.ImageFolderDomain", f"--data.predict_domain.root={tmp_path / 'wrong'}"])
    assert err.value.code == 2


def test_last_ckpt_is_the_final_state_when_the_last_epoch_is_not_the_best(tmp_path, capsys):
    # monitor "epoch" with mode min: epoch 0 is the best and no later epoch saves a top-k checkpoint
    main(["fit", *small_quickstart(tmp_path, "--trainer.max_epochs=3", "--checkpoint.monitor=epoch",
                                   "--checkpoint.mode=min")])
    ckpts = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints"
    best = torch.load(next(ckpts.glob("best-*.ckpt")), map_location="cpu", weights_only=False)
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == 4 and last["global_step"] == 12 and last["epoch"] == 2
    assert not torch.equal(best["state_dict"]["head.classifier.weight"], last["state_dict"]["head.classifier.weight"])
    # resuming from it continues after the final step (and the callback state resumes under its old key)
    assert any(k.startswith("ModelCheckpoint{") for k in last["callbacks"])
    main(["fit", *small_quickstart(tmp_path, "--trainer.max_epochs=4", "--checkpoint.monitor=epoch",
                                   "--checkpoint.mode=min"), f"--ckpt_path={ckpts / 'last.ckpt'}"])
    resumed = tmp_path / "runs" / "quickstart" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=False)["global_step"] == 16


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


def _structure(node: object) -> object:
    """A config section with its values replaced by their types (class paths kept): what code it runs."""
    if isinstance(node, dict):
        return {k: v if k == "class_path" else _structure(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_structure(v) for v in node]
    return type(node).__name__


def _trains_new_code(config: str) -> bool:
    """Every MNIST -> USPS method config and every task's source-only config; another task's method config only
    when its model section differs from the MNIST -> USPS one of the same name in more than values (another
    class, another key): the others run the same code with other numbers (each is still parsed above)."""
    path = CONFIGS / config
    reference = CONFIGS / "digits" / "mnist2usps" / path.name
    if path.parent.name == "mnist2usps" or path.stem == "source_only" or not reference.is_file():
        return True
    model = yaml.safe_load(path.read_text())["model"]
    return _structure(model) != _structure(yaml.safe_load(reference.read_text())["model"])


DIGIT_CONFIGS = [c for c in ALL_CONFIGS if c.startswith("digits/") and _trains_new_code(c)]


def test_the_digit_configs_trained_below_cover_every_task_and_method():
    tasks = {c.split("/")[1] for c in ALL_CONFIGS if c.startswith("digits/")}
    methods = {Path(c).stem for c in ALL_CONFIGS if c.startswith("digits/")}
    assert {c.split("/")[1] for c in DIGIT_CONFIGS} == tasks and {Path(c).stem for c in DIGIT_CONFIGS} == methods


@pytest.mark.parametrize("config", DIGIT_CONFIGS)
def test_digit_configs_train_on_the_real_data(config, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLFRAME_DATA_ROOT", str(shared_data))
    short = ["--trainer.max_steps=-1", "--trainer.max_epochs=1", "--data.iters_per_epoch=3",  # one epoch of 3 batches
             "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu", *QUIET]
    source_free = yaml.safe_load((CONFIGS / config).read_text())["data"].get("source", 0) is None
    extra = []
    if source_free:  # SHOT phase 2: first its phase-1 source model (the sibling shot_source.yaml), as the README says
        main(["fit", "-c", str(CONFIGS / config).replace(Path(config).name, "shot_source.yaml"),
              f"--trainer.logger.init_args.save_dir={tmp_path}/source", *short])
        extra = [f"--model.weights={next((tmp_path / 'source').rglob('last.ckpt'))}"]
        capsys.readouterr()
    main(["fit", "-c", str(CONFIGS / config), f"--trainer.logger.init_args.save_dir={tmp_path}", *short, *extra])
    out = capsys.readouterr().out
    assert "val/target_acc" in out and ("val/source_acc" in out) != source_free
    if source_free:  # no val/source_acc: the best checkpoint by the label-free IM loss, lower is better
        assert "(by val/target_im, no target labels used)" in out
        saved = yaml.safe_load(next(tmp_path.glob("digits/*/*/version_0/config.yaml")).read_text())
        assert saved["checkpoint"]["monitor"] == "val/target_im" and saved["checkpoint"]["mode"] == "min"


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
        assert info["backbone"] == {"name": "dtn", "weights": {"kind": "random"}}  # the exact weight source
        assert info["packages"]["torch"] == torch.__version__.split("+")[0] and info["packages"]["tlframe"]
        git = info["git"]["tlframe"]
        assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))
    assert outs[0] == outs[1] and len(outs[0]) == 11  # accuracy x2, loss x2, mean class acc x2, entropy, SND, IM, DEV, A-distance
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_cached_frozen_features_from_yaml_and_augmentation_error(tmp_path, capsys):
    cached = ["--model.strategy=tlframe.strategies.FrozenFeatures", "--model.strategy.cache_features=memory"]
    main(["fit", *small_quickstart(tmp_path, *cached, "--trainer.max_epochs=1")])
    assert "val/source_acc" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *small_quickstart(tmp_path, *cached, "--data.train_augmentation=crop_flip")])
    assert exit_info.value.code == 2
    assert "train_augmentation='crop_flip' cannot be used with cached features" in capsys.readouterr().err


def small_domains(tmp_path, *extra: str) -> list[str]:
    """quickstart_domains.yaml with small domains (a second config file: a list is replaced as a whole)."""
    domains = [{"class_path": "tlframe.data.SyntheticDomain",
                "init_args": {"style": style, "num_train": 96, "num_test": 40, "seed": seed}}
               for style, seed in (("source", 0), ("source", 2), ("target", 1))]
    tmp_path.mkdir(parents=True, exist_ok=True)
    small = tmp_path / "small_domains.yaml"
    small.write_text(yaml.safe_dump({"data": {"domains": domains}}))
    return ["-c", str(CONFIGS / "quickstart_domains.yaml"), "-c", str(small),
            f"--trainer.logger.init_args.save_dir={tmp_path}/runs", "--data.batch_size=8", "--data.iters_per_epoch=3",
            "--trainer.max_epochs=2", *QUIET, *extra]


def test_leave_one_domain_out_logs_each_training_domain_and_their_mean(tmp_path, capsys):
    from tlframe.runs import read_scalars

    main(["fit", *small_domains(tmp_path)])
    run = tmp_path / "runs" / "quickstart_domains" / "version_0"
    scalars = read_scalars(run)
    per_domain = [scalars[f"val/source_synthetic_source_{i}_acc"] for i in range(2)]
    assert len(scalars["val/source_acc"]) == 2 == len(per_domain[0])  # one per epoch
    for k, (step, mean) in enumerate(scalars["val/source_acc"]):  # DomainBed's training-domain validation accuracy
        assert mean == pytest.approx((per_domain[0][k][1] + per_domain[1][k][1]) / 2, abs=1e-6)
    assert "val/target_acc" in scalars and not any(t.startswith("val/source_synthetic_target") for t in scalars)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["test_domain"] == 2 and len(config["data"]["domains"]) == 3
    # the saved config runs again as it is (the data module is chosen from its keys), e.g. to test the checkpoint
    capsys.readouterr()
    main(["test", "-c", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *QUIET])
    assert "test/target_acc" in capsys.readouterr().out


def test_multi_source_dann_with_a_discriminator_per_domain(tmp_path):
    from tlframe.runs import read_scalars

    main(["fit", *small_domains(tmp_path, "--data.adapt_to_test_domain=true", "--model.strategy=tlframe.strategies.DANN",
                                "--model.strategy.num_domains=3", "--model.strategy.hidden=32",
                                "--trainer.log_every_n_steps=1")])
    run = tmp_path / "runs" / "quickstart_domains" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]["strategy.discriminator.6.weight"].shape == (3, 32)  # one logit per domain
    assert "train/loss_adv" in read_scalars(run)
    with pytest.raises(SystemExit):
        main(["fit", *small_domains(tmp_path / "bad", "--data.adapt_to_test_domain=true",
                                    "--model.strategy=tlframe.strategies.DANN", "--model.strategy.num_domains=2")])
