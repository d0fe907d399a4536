"""What a CLI run writes for TensorBoard, read back with TensorBoard's own event reader."""

from __future__ import annotations

import glob
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.test_cli import CONFIGS, QUIET
from tlframe.cli import main
from tlframe.data.synthetic import SHAPES

VALIDATORS = {"val/source_acc", "val/target_entropy", "val/target_snd", "val/a_distance"}


def tiny_quickstart(tmp_path, *extra: str) -> list[str]:
    """The quickstart config cut down to seconds: 2 steps per epoch, 20 source val and 32 target test images."""
    return ["-c", str(CONFIGS / "quickstart.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
            "--data.source.init_args.num_train=200", "--data.target.init_args.num_train=200",
            "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32",
            "--data.batch_size=16", "--data.iters_per_epoch=2", "--trainer.max_epochs=1",
            "--trainer.num_sanity_val_steps=0", *QUIET, *extra]


def read_events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run), size_guidance={k: 0 for k in ("scalars", "images", "tensors", "histograms",
                                                                      "compressedHistograms", "audio")})
    events.Reload()
    return events


def test_fit_writes_validators_a_distance_confusion_hparams_and_projector(tmp_path):
    main(["fit", *tiny_quickstart(tmp_path, "--trainer.max_epochs=2", "--insights.max_samples=16",
                                  "--insights.projector_every_n_epochs=1")])
    run = tmp_path / "runs" / "quickstart" / "version_0"
    events = read_events(run)
    tags = events.Tags()
    assert VALIDATORS | {"val/target_acc", "val/target_mean_class_acc"} <= set(tags["scalars"])
    assert "hp_metric" not in tags["scalars"]
    for tag in VALIDATORS:
        assert len(events.Scalars(tag)) == 2, tag  # every validation
    assert -2.5 <= events.Scalars("val/a_distance")[-1].value <= 2.0
    assert 0.0 <= events.Scalars("val/target_entropy")[-1].value <= torch.log(torch.tensor(10.0)).item() + 1e-4
    assert tags["images"] == ["val/target_confusion"] and len(events.Images("val/target_confusion")) == 2
    image = events.Images("val/target_confusion")[-1]
    assert 480 <= image.width <= 700 and image.height <= 700  # 10 labelled 48-pixel rows and columns, a colour bar

    # HParams tab: the hyperparameters a researcher compares (not the ~140 config keys) and the final val/* metrics
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["backbone"].string_value == "dtn"
    assert start.hparams["strategy"].string_value == "FineTune"
    assert start.hparams["strategy.backbone_lr_mult"].number_value == 1.0
    assert start.hparams["batch_size"].number_value == 16 and start.hparams["lr"].number_value == 0.01
    assert start.hparams["pretrained"].string_value == "false"  # booleans as words, not 0.0000/1.0000
    assert start.hparams["source"].string_value.startswith("SyntheticDomain(style=source")
    assert start.hparams["seed"].number_value == 0
    assert len(start.hparams) < 40 and not any(k.startswith(("checkpoint", "insights", "trainer.")) for k in start.hparams)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert VALIDATORS | {"val/target_acc"} <= {m.name.tag for m in experiment.metric_infos}

    # Projector: one snapshot per epoch (the end-of-fit one is the last of them, not written twice)
    config = (run / "projector_config.pbtxt").read_text()
    assert config.count("embeddings {") == 2
    for step in ("00002", "00004"):
        folder = run / step / "bottleneck_features"
        assert f'tensor_path: "{step}/bottleneck_features/tensors.tsv"' in config
        rows = [line.split("\t") for line in (folder / "metadata.tsv").read_text().splitlines()]
        assert rows[0] == ["domain", "class"] and len(rows) == 1 + 2 * 16  # 16 sampled rows per domain
        assert {r[0] for r in rows[1:]} == {"source", "target"}
        assert {r[1] for r in rows[1:]} <= set(SHAPES) and len({r[1] for r in rows[1:]}) > 1  # class names
        tensors = (folder / "tensors.tsv").read_text().splitlines()
        assert len(tensors) == 2 * 16 and len(tensors[0].split("\t")) == 256  # bottleneck_dim


def test_unlabelled_target_is_validated_and_can_select_the_checkpoint_by_snd(tmp_path, capsys):
    main(["fit", *tiny_quickstart(tmp_path, "--data.target.init_args.labelled=false",
                                  "--checkpoint.monitor=val/target_snd", "--checkpoint.mode=max")])
    out = capsys.readouterr().out
    assert "val/target_snd" in out and "val/target_entropy" in out and "val/target_acc" not in out
    run = tmp_path / "runs" / "quickstart" / "version_0"
    tags = read_events(run).Tags()
    assert VALIDATORS <= set(tags["scalars"])
    assert not [t for t in tags["scalars"] if t.startswith("val/target_") and "acc" in t or t == "val/target_loss"]
    assert tags["images"] == []  # no confusion matrix without target labels
    best = glob.glob(str(run / "checkpoints" / "best-epoch*.ckpt"))
    assert len(best) == 1
    ckpt = torch.load(best[0], map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["monitor"] == "val/target_snd" and torch.isfinite(torch.as_tensor(state["best_model_score"]))
    metadata = (run / "00002" / "bottleneck_features" / "metadata.tsv").read_text().splitlines()
    assert len(metadata) == 1 + 20 + 32 and "target\tunlabelled" in metadata  # all 20 source val + 32 target rows
