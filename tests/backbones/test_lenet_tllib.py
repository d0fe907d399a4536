"""``lenet_tllib``: TLlib's digits LeNet (conv stages of ``lenet`` + FC-500-ReLU-Dropout as a third stage)."""

import timm
import torch
from torch import nn

from tlframe.backbones import backbone_stages, create_backbone, data_config
from tlframe.module import TransferModule
from tlframe.strategies import FineTune


def test_layers_are_tllibs_lenet_in_order():
    model = timm.create_model("lenet_tllib", pretrained=False, num_classes=0)
    layers = [m for m in model.stages.modules() if not isinstance(m, nn.Sequential)]
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.Conv2d, nn.Dropout2d, nn.MaxPool2d, nn.ReLU,
                     nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout]
    conv1, conv2, fc = layers[0], layers[3], layers[8]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (1, 20, (5, 5))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size) == (20, 50, (5, 5))
    assert (fc.in_features, fc.out_features) == (800, 500)
    assert layers[4].p == 0.5 and layers[10].p == 0.5


def test_shape_features_and_config():
    model = timm.create_model("lenet_tllib", pretrained=False, num_classes=0)
    assert model.num_features == 500 and isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 500)
    assert model.forward_features(torch.randn(4, 1, 28, 28)).shape == (4, 500)
    cfg, ref = data_config(model), data_config(timm.create_model("lenet", num_classes=0))
    assert cfg == ref and cfg["input_size"] == (1, 28, 28)
    keep = ("input_size", "mean", "std", "interpolation", "crop_pct", "first_conv", "classifier", "num_classes")
    assert {k: model.pretrained_cfg[k] for k in keep} == {k: timm.create_model("lenet").pretrained_cfg[k] for k in keep}
    with_head = timm.create_model("lenet_tllib", num_classes=7)
    assert with_head(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_dropout_only_in_training():
    model = create_backbone("lenet_tllib").eval()
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    assert not torch.equal(a, model(x))
    assert (a == 0).float().mean() > 0.3  # the final Dropout(0.5) after a ReLU zeroes well over a third


def test_three_stages_and_conv_stages_shared_with_lenet():
    model = create_backbone("lenet_tllib")
    stages = backbone_stages(model)
    assert stages == [["stages.0.0.weight", "stages.0.0.bias"], ["stages.1.0.weight", "stages.1.0.bias"],
                      ["stages.2.1.weight", "stages.2.1.bias"]]
    lenet = create_backbone("lenet")
    missing, unexpected = model.load_state_dict(lenet.state_dict(), strict=False)
    assert unexpected == [] and missing == ["stages.2.1.weight", "stages.2.1.bias"]


def test_stage_freezing_and_transfer_module():
    model = TransferModule("lenet_tllib", num_classes=10, bottleneck_dim=256, strategy=FineTune(freeze_stages=2))
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable == ["stages.2.1.weight", "stages.2.1.bias"]
    assert [type(m) for m in model.head.bottleneck] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]  # TLlib's: no dropout
    assert (model.head.bottleneck[0].in_features, model.head.out_features) == (500, 256)
    assert model.eval()(torch.randn(3, 1, 28, 28)).shape == (3, 10)
