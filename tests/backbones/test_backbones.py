import pytest
import timm
import torch

from tlframe.backbones import BackboneError, backbone_stages, create_backbone, data_config, load_backbone_weights


@pytest.mark.parametrize("name, in_shape, num_features", [
    ("lenet", (1, 28, 28), 800),
    ("lenet_tllib", (1, 28, 28), 500),
    ("dtn", (3, 32, 32), 4096),
    ("dann_cnn", (3, 28, 28), 768),
])
def test_digit_networks_go_through_timm(name, in_shape, num_features):
    model = timm.create_model(name, pretrained=False, num_classes=0)
    assert data_config(model)["input_size"] == in_shape
    assert model(torch.randn(2, *in_shape)).shape == (2, num_features)
    with_head = timm.create_model(name, num_classes=7)
    assert with_head(torch.randn(2, *in_shape)).shape == (2, 7)
    assert len(backbone_stages(model)) >= 2


def test_in_chans_override_updates_data_config():
    model = create_backbone("lenet", in_chans=3)
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 28, 28) and len(cfg["mean"]) == 3
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 800)


def test_unknown_backbone_suggests_close_matches():
    with pytest.raises(BackboneError, match=r"Unknown backbone 'resnet_18'.*resnet18"):
        create_backbone("resnet_18")


@pytest.mark.parametrize("name, kwargs, first", [
    ("resnet18", {}, "conv1.weight"),
    ("convnext_atto", {}, "stem.0.weight"),
    ("vit_tiny_patch16_224", {"img_size": 32}, "cls_token"),
    ("efficientnet_b0", {}, "conv_stem.weight"),
])
def test_stages_cover_every_parameter_once_in_forward_order(name, kwargs, first):
    model = create_backbone(name, **kwargs)
    stages = backbone_stages(model)
    names = [n for stage in stages for n in stage]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert first in stages[0]
    assert len(stages) >= 4


def test_weights_from_state_dict_and_from_tlframe_checkpoint(tmp_path):
    src = create_backbone("lenet")
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in src.state_dict().items()} | {"head.classifier.weight": torch.zeros(3, 3)}}
    torch.save(ckpt, tmp_path / "run.ckpt")
    for file in ("plain.pth", "run.ckpt"):
        dst = create_backbone("lenet", weights=str(tmp_path / file))
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), (file, k)


def test_weights_errors_name_the_problem(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("lenet", weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a readable PyTorch checkpoint"):
        create_backbone("lenet", weights=str(tmp_path / "junk.pth"))
    torch.save(create_backbone("lenet", in_chans=3).state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(BackboneError, match=r"shape mismatch for stages\.0\.0\.weight"):
        load_backbone_weights(create_backbone("lenet"), str(tmp_path / "rgb.pth"))
    torch.save(create_backbone("dtn").state_dict(), tmp_path / "dtn.pth")
    with pytest.raises(BackboneError, match="does not fit backbone 'lenet'"):
        create_backbone("lenet", weights=str(tmp_path / "dtn.pth"))
