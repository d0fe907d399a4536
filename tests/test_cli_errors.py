"""Bad input through the real CLI: non-zero exit, one message naming the problem and the fix, no traceback,
and the outputs of an earlier run left untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tlframe.cli import EXIT_BAD_INPUT, EXIT_NON_FINITE, main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
CLASSES = {"cat": 8, "dog": 8, "owl": 8}


def synthetic_args(runs: Path, *extra: str) -> list[str]:
    return ["-c", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.logger.init_args.save_dir={runs}",
            "--data.source.init_args.num_train=120", "--data.target.init_args.num_train=120",
            "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32",
            "--data.batch_size=16", "--data.iters_per_epoch=3", "--trainer.max_epochs=1", *QUIET, *extra]


def folder_args(runs: Path, source: Path, target: Path, *extra: str) -> list[str]:
    return synthetic_args(runs, "--data.source=tlframe.data.ImageFolderDomain", f"--data.source.init_args.root={source}",
                          "--data.target=tlframe.data.ImageFolderDomain", f"--data.target.init_args.root={target}",
                          "--data.batch_size=4", *extra)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A finished run whose files every bad invocation below must leave as they are."""
    runs = tmp_path_factory.mktemp("runs")
    main(["fit", *synthetic_args(runs)])
    return runs


def run_bad(capsys, args: list[str], code: int = EXIT_BAD_INPUT) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def tlframe_error(err: str) -> str:
    """The one error line; it must be a single paragraph."""
    lines = [line for line in err.splitlines() if line.startswith("tlframe: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def folder_cases(make_folder, tmp_path):
    good = make_folder("good", CLASSES)
    empty = tmp_path / "empty"
    empty.mkdir()
    hollow = make_folder("hollow", CLASSES)
    for f in (hollow / "owl").iterdir():
        f.unlink()
    other = make_folder("other", {"cat": 8, "dog": 8, "fox": 8})
    corrupt = make_folder("corrupt", CLASSES)
    (corrupt / "dog" / "zz_broken.png").write_bytes(b"\x89PNG but not really")
    return {
        "missing data root": (tmp_path / "nowhere", good, ["nowhere does not exist", "pass an existing path"]),
        "empty domain folder": (empty, good, ["has no class folders", "<root>/<class>/<image>"]),
        "class folder without images": (hollow, good, ["owl has no images", "accepted extensions"]),
        "different class sets": (good, other, ["has classes ['cat', 'dog', 'owl']", "['cat', 'dog', 'fox']",
                                               "make the class folders"]),
        "corrupt image": (corrupt, good, ["zz_broken.png cannot be read", "replace or delete the file"]),
    }


@pytest.mark.parametrize("case, workers", [
    ("missing data root", 0), ("empty domain folder", 0), ("class folder without images", 0),
    ("different class sets", 0), ("corrupt image", 0), ("corrupt image", 2),  # decoded in loader workers too
])
def test_bad_data_folders(case, workers, earlier_run, make_folder, tmp_path, capsys):
    before = snapshot(earlier_run)
    source, target, expected = folder_cases(make_folder, tmp_path)[case]
    err = run_bad(capsys, ["fit", *folder_args(earlier_run, source, target, f"--data.num_workers={workers}")])
    line = tlframe_error(err)
    assert all(text in line for text in expected), line
    assert {k: v for k, v in snapshot(earlier_run).items() if k in before} == before


def test_grey_palette_and_rgba_images_just_work(make_folder, tmp_path, capsys):
    source = make_folder("mixed_s", CLASSES, modes=("RGB", "L", "P", "RGBA"))
    target = make_folder("mixed_t", CLASSES, modes=("P", "RGBA", "L", "RGB"))
    main(["fit", *folder_args(tmp_path / "runs", source, target)])
    assert "val/target_acc" in capsys.readouterr().out


def _last_ckpt(runs: Path) -> Path:
    return runs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


def test_bad_arguments_models_and_checkpoints(earlier_run, make_folder, tmp_path, capsys):
    """Each case: (extra CLI arguments, texts the message must contain)."""
    before = snapshot(earlier_run)
    ckpt = _last_ckpt(earlier_run)
    not_a_ckpt = tmp_path / "notes.pth"
    not_a_ckpt.write_text("not a checkpoint")
    three = make_folder("three", CLASSES)
    cases = [
        (["--model.backbone=resnet_50"], ["Unknown backbone 'resnet_50'", "Close matches: resnet50"]),
        (["--model.weights=/nonexistent/w.pth"], ["weights file /nonexistent/w.pth does not exist", "tlframe checkpoint"]),
        ([f"--model.weights={not_a_ckpt}"], [str(not_a_ckpt)]),
        ([f"--model.weights={ckpt}", "--model.backbone=lenet"], [str(ckpt)]),  # another architecture's weights
        (["--data.batch_size=500"], ["source batch size 500 is larger than the source train set", "lower batch_size"]),
        ([f"--ckpt_path={tmp_path / 'none.ckpt'}"], ["none.ckpt", "pass an existing checkpoint"]),
        # resuming a 10-class run on 3-class data: the head does not fit
        (["--data.source=tlframe.data.ImageFolderDomain", f"--data.source.init_args.root={three}",
          "--data.target=tlframe.data.ImageFolderDomain", f"--data.target.init_args.root={three}", "--data.batch_size=4",
          f"--ckpt_path={ckpt}"], ["head.classifier.weight: checkpoint (10, 256) vs model (3, 256)", "num_classes"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--trainer.accelerator=gpu"], ["No CUDA GPU is visible", "--trainer.accelerator=cpu"]))
    for extra, expected in cases:
        line = tlframe_error(run_bad(capsys, ["fit", *synthetic_args(earlier_run, *extra)]))
        assert all(text in line for text in expected), (extra, line)
    assert {k: v for k, v in snapshot(earlier_run).items() if k in before} == before


def test_misspelled_config_key_names_the_key(earlier_run, capsys):  # the one-line form: test_config_and_option_typos...
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *synthetic_args(earlier_run, "--model.bakbone=resnet18")])
    assert exit_info.value.code != 0
    assert "bakbone" in capsys.readouterr().err


def test_non_finite_loss_stops_naming_the_term_and_keeps_the_last_good_checkpoint(earlier_run, tmp_path, capsys):
    before = snapshot(earlier_run)
    runs = tmp_path / "runs"
    # epoch 0 trains normally (last.ckpt at step 3); then StepLR multiplies the LR by 1e30: the weights blow up
    err = run_bad(capsys, ["fit", *synthetic_args(runs, "--trainer.max_epochs=3", "--checkpoint.every_n_train_steps=1",
                                                  "--model.scheduler=torch.optim.lr_scheduler.StepLR",
                                                  "--model.scheduler.step_size=3", "--model.scheduler.gamma=1e30")],
                  code=EXIT_NON_FINITE)
    line = tlframe_error(err)
    assert "non-finite values at step 4 (epoch 1)" in line and "train/loss_cls = nan" in line, line
    assert "lower the learning rate" in line
    last = _last_ckpt(runs)
    assert f"the last good checkpoint is {last}" in line
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4  # saved after the 4th update; the next loss (at step 4) was the first NaN ...
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())  # ... so it is finite
    assert {k: v for k, v in snapshot(earlier_run).items() if k in before} == before


def test_config_and_option_typos_give_one_line_with_where_and_the_closest_names(earlier_run, tmp_path, capsys):
    """Typos in keys, nested class_path arguments, class names, values and YAML: one line, exit 2, no usage text."""
    nested_yaml = tmp_path / "dann.yaml"
    nested_yaml.write_text("model:\n  strategy:\n    class_path: tlframe.strategies.DANN\n    init_args:\n"
                           "      trade_of: 0.3\n")
    top_yaml = tmp_path / "top.yaml"
    top_yaml.write_text("data:\n  batch_sise: 8\n")
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("model:\n  lr: [0.1\n  backbone: dtn\n")
    cases = [
        (["--model.strategy.trade_of=0.3"], ["FineTune (model.strategy) has no argument 'trade_of' (on the command line)",
                                             "trade_off is an argument of DANN, MMD"]),
        (["--model.strategy=tlframe.strategies.DANN", "--model.strategy.trade_of=0.3"], ["did you mean trade_off?"]),
        (["-c", str(nested_yaml)], [f"has no argument 'trade_of' (in {nested_yaml}, line 5)", "did you mean trade_off?"]),
        (["--data.batch_sise=8"], ["unknown option --data.batch_sise (on the command line)", "did you mean --data.batch_size"]),
        (["-c", str(top_yaml)], [f"unknown key 'data.batch_sise' (in {top_yaml}, line 2)", "did you mean data.batch_size"]),
        (["--trainer.max_epoch=3"], ["unknown option --trainer.max_epoch", "--trainer.max_epochs"]),  # no silent abbreviation
        (["--data.source.init_args.num_trian=3"], ["SyntheticDomain (data.source) has no argument 'num_trian'",
                                                   "did you mean num_train?"]),
        (["--model.strategy=tlframe.strategies.DAN"], ["cannot import 'tlframe.strategies.DAN'",
                                                       "did you mean tlframe.strategies.DANN"]),
        (["--model.lr=abc"], ["model.lr must be a float, got 'abc'"]),
        (["-c", str(broken_yaml)], [f"YAML syntax error in {broken_yaml}, line 3"]),
        (["-c", str(tmp_path / "absent.yaml")], ["absent.yaml does not exist", "check the path given to -c"]),
    ]
    for extra, expected in cases:
        err = run_bad(capsys, ["fit", *synthetic_args(earlier_run, *extra)])
        assert len(err.strip().splitlines()) == 1 and "usage:" not in err, (extra, err)
        line = tlframe_error(err)
        assert all(text in line for text in expected), (extra, line)


def test_a_run_rejected_for_bad_input_leaves_no_run_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    run_bad(capsys, ["fit", *synthetic_args(runs, "--data.batch_size=500")])  # rejected in the data module's setup
    assert not list(runs.rglob("version_*")), list(runs.rglob("*"))
    main(["fit", *synthetic_args(runs)])  # a good run then gets version_0 ...
    run_bad(capsys, ["fit", *synthetic_args(runs, "--data.batch_size=500")])
    assert sorted(p.name for p in (runs / "quickstart").iterdir()) == ["version_0"]  # ... and keeps it
    assert (runs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_commands_print_no_advertising_or_lightning_deprecation(tmp_path, capfd):
    main(["fit", *synthetic_args(tmp_path / "runs")])
    out = capfd.readouterr()
    text = out.out + out.err
    assert "tlframe: val results" in text
    assert "Tip:" not in text and "litlogger" not in text and "LeafSpec" not in text and "dirpath has changed" not in text


def test_checkpoint_files_that_are_not_usable_give_one_line_for_ckpt_path_and_weights(earlier_run, tmp_path, capsys):
    """Truncated copy, text file, plain state dict, another project's Lightning checkpoint: named, exit 2."""
    before = snapshot(earlier_run)
    ckpt = _last_ckpt(earlier_run)
    truncated = tmp_path / "partial.ckpt"
    data = ckpt.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "readme.ckpt"
    text.write_text("this is not a checkpoint\n")
    plain = tmp_path / "plain.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, plain)
    foreign = tmp_path / "other_project.ckpt"
    torch.save({"state_dict": {"encoder.layer1.weight": torch.zeros(2)}, "pytorch-lightning_version": "2.0.0",
                "epoch": 3, "global_step": 10}, foreign)
    ckpt_cases = [
        (truncated, ["--ckpt_path", "partial.ckpt cannot be read as a checkpoint", "truncated", "copy it again"]),
        (text, ["readme.ckpt cannot be read as a checkpoint"]),
        (plain, ["plain.pth is not a Lightning checkpoint", "a plain state dict of tensors", f"--model.weights={plain}"]),
        (foreign, ["other_project.ckpt was not written by tlframe", "'encoder.layer1.weight'"]),
    ]
    for command in ("fit", "validate", "test", "predict"):
        for path, expected in ckpt_cases:
            line = tlframe_error(run_bad(capsys, [command, *synthetic_args(earlier_run, f"--ckpt_path={path}")]))
            assert all(text in line for text in expected), (command, path, line)
    for path in (truncated, text, foreign):
        line = tlframe_error(run_bad(capsys, ["fit", *synthetic_args(earlier_run, f"--model.weights={path}")]))
        assert str(path) in line and "weights" in line, line
    assert {k: v for k, v in snapshot(earlier_run).items() if k in before} == before


@pytest.mark.parametrize("extra, expected", [
    (["--model.lr=-1"], "lr=-1.0 must be a finite number > 0"),
    (["--model.lr=nan"], "model.lr must be a float, got 'nan'"),  # the command line has no NaN ...
    (["-c", "{nan_yaml}"], "lr=nan must be a finite number > 0"),  # ... but YAML has
    (["--model.lr=1e400"], "lr=inf must be a finite number > 0"),
    (["--model.weight_decay=-0.1"], "weight_decay=-0.1 must be a finite number >= 0"),
    (["--model.strategy=tlframe.strategies.DANN", "--model.strategy.trade_off=-1"], "trade_off=-1.0 must be"),
    (["--model.strategy=tlframe.strategies.MMD", "--model.strategy.alphas=[1.0,-2.0]"], "alphas[i]=-2.0 must be"),
    (["--model.strategy.layer_decay=2"], "layer_decay must be in (0, 1], got 2"),
    (["--model.strategy.label_smoothing=1.5"], "label_smoothing=1.5 must be a finite number >= 0 and < 1"),
    (["--model.optimizer=torch.optim.Adam", "--model.optimizer.betas=[2.0,0.999]"], "Invalid beta parameter"),
    (["--insights.max_samples=1"], "max_samples"),
    (["--data.batch_size=0"], "batch_size=0 must be a positive integer"),
    (["--data.image_size=0"], "image_size=0 must be a positive integer"),
    (["--data.iters_per_epoch=0"], "iters_per_epoch=0 must be a positive integer"),
    (["--trainer.accelerator=cpu", "--trainer.devices=1000000000"], "trainer.devices=1000000000: this run is on the CPU"),
    (["--seed_everything=-3"], "seed_everything=-3 is out of range: give an integer in [0, 4294967295]"),
    (["--model.strategy.label_shift=ipw"], "label_shift"),
])
def test_values_out_of_range_are_one_line_naming_the_class_and_value(extra, expected, tmp_path, capsys):
    runs = tmp_path / "runs"
    (tmp_path / "nan.yaml").write_text("model:\n  lr: .nan\n")
    extra = [a.format(nan_yaml=tmp_path / "nan.yaml") for a in extra]
    line = tlframe_error(run_bad(capsys, ["fit", *synthetic_args(runs, *extra)]))
    assert expected in line, line
    assert not list(runs.rglob("version_*"))  # rejected before anything was written


def test_unwritable_output_folders_are_refused_before_anything_is_written(earlier_run, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me\n")
    line = tlframe_error(run_bad(capsys, ["fit", *synthetic_args(a_file / "runs")]))
    assert f"{a_file} is a file, not a folder" in line and "choose another folder" in line, line
    ckpt = _last_ckpt(earlier_run)
    line = tlframe_error(run_bad(capsys, ["predict", *synthetic_args(earlier_run, f"--ckpt_path={ckpt}",
                                                                      f"--predictions.output_dir={a_file / 'p'}")]))
    assert "predictions.output_dir" in line and "is a file, not a folder" in line, line
    assert a_file.read_text() == "keep me\n"
