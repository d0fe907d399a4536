"""Every run records where its backbone's starting weights came from (run_info.json, tlframe report)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch

from tlframe.backbones import create_backbone, describe_weight_source, weight_source


def test_a_weights_file_is_recorded_with_its_hash_and_the_run_it_comes_from(tmp_path):
    run = tmp_path / "runs" / "pretrain" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    file = run / "checkpoints" / "last.ckpt"
    model = create_backbone("lenet")
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, file)
    source = weight_source(create_backbone("lenet", weights=str(file)), weights=str(file))
    assert source == {"kind": "file", "path": str(file.resolve()), "bytes": file.stat().st_size,
                      "sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "run": str(run.resolve())}
    assert describe_weight_source(source) == f"run version_3/.../last.ckpt (sha256 {source['sha256'][:12]})"
    other = tmp_path / "w.pth"
    torch.save(model.state_dict(), other)
    plain = weight_source(model, weights=str(other))
    assert "run" not in plain and describe_weight_source(plain).startswith("w.pth (sha256 ")


def test_hub_weights_are_recorded_by_their_timm_tag_and_random_init_says_so():
    fake = SimpleNamespace(pretrained_cfg={"architecture": "resnet50", "tag": "a1_in1k", "hf_hub_id": "timm/resnet50.a1_in1k"})
    source = weight_source(fake, pretrained=True)  # type: ignore[arg-type]
    assert source == {"kind": "timm", "tag": "resnet50.a1_in1k", "hub": "timm/resnet50.a1_in1k"}
    assert describe_weight_source(source) == "timm resnet50.a1_in1k"
    assert weight_source(create_backbone("lenet")) == {"kind": "random"}
    assert describe_weight_source({"kind": "random"}) == "random init"
