"""tilefn.split: torchvision classifiers -> (streamable trunk, global head), exactly.

For every supported family: ``head(trunk(x))`` is bit-for-bit ``model(x)``, trunk and head
share the model's modules, and tilefn can plan the trunk (it is streamable). A few trunks
are also streamed for real and compared with the plain model (``assert_streams_like``).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig

import tilefn
from tilefn.testing import assert_streams_like

pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    return model.to(dtype).eval()


def tiny_convnext(stochastic_depth_prob: float = 0.0) -> nn.Module:
    """A real torchvision ConvNeXt with two small stages (receptive field ~150 px)."""
    torch.manual_seed(0)
    model = torchvision.models.ConvNeXt(
        [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)],
        stochastic_depth_prob=stochastic_depth_prob,
    ).double()
    with torch.no_grad():  # layer scales start at 1e-6: make the residual branches matter
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.5, 1.5)
    return model.eval()


# VGG and AlexNet have ~100M-parameter classifiers: float32 keeps them quick (the
# comparison is bit-for-bit either way).
FAMILIES = [
    pytest.param("resnet18", torch.float64, id="resnet18"),
    pytest.param("resnet50", torch.float64, id="resnet50", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", torch.float64, id="resnext50", marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", torch.float32, id="wide_resnet50", marks=pytest.mark.slow),
    pytest.param("convnext_tiny", torch.float64, id="convnext_tiny"),
    pytest.param("vgg11_bn", torch.float32, id="vgg11_bn"),
    pytest.param("vgg11", torch.float32, id="vgg11", marks=pytest.mark.slow),
    pytest.param("alexnet", torch.float32, id="alexnet", marks=pytest.mark.slow),
    pytest.param("densenet121", torch.float64, id="densenet121"),
    pytest.param("mobilenet_v2", torch.float64, id="mobilenet_v2"),
    pytest.param("regnet_x_400mf", torch.float64, id="regnet_x_400mf"),
    pytest.param("regnet_y_400mf", torch.float64, id="regnet_y_400mf"),
    pytest.param("efficientnet_b0", torch.float64, id="efficientnet_b0"),
    pytest.param("mobilenet_v3_small", torch.float64, id="mobilenet_v3_small"),
    pytest.param("shufflenet_v2_x0_5", torch.float64, id="shufflenet_v2"),
    pytest.param("mnasnet0_5", torch.float64, id="mnasnet"),
    pytest.param("squeezenet1_1", torch.float64, id="squeezenet1_1"),
]


@pytest.mark.parametrize(("name", "dtype"), FAMILIES)
def test_split_is_exact_and_streamable(name: str, dtype: torch.dtype):
    model = build(name, dtype)
    trunk, head = tilefn.split(model)
    x = torch.randn(2, 3, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(head(trunk(x)), model(x))

    # Same modules, no copies: every parameter and buffer of the model, each in one part.
    model_params = {id(p) for p in model.parameters()}
    trunk_params = {id(p) for p in trunk.parameters()}
    head_params = {id(p) for p in head.parameters()}
    assert trunk_params | head_params == model_params
    assert not trunk_params & head_params
    # Names are kept: the state-dict keys of both parts are the model's own keys.
    model_keys = set(model.state_dict())
    assert set(trunk.state_dict()) | set(head.state_dict()) == model_keys

    plan = tilefn.plan(trunk, (2, 3, 64, 64), 64)  # streamable: tilefn can plan it
    if isinstance(plan, tilefn.StagedPlan):  # squeeze-excitation: one plan per stage
        plan = plan.main
    assert plan.n_tiles == 1


def test_split_trunk_streams_exactly_squeezenet():
    trunk, head = tilefn.split(build("squeezenet1_1"))
    x = torch.randn(1, 3, 288, 288, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert tilefn.plan(trunk, x.shape, 256).n_tiles > 1
    assert_streams_like(trunk, x, 256)


def test_split_convnext_train_mode_streams_exactly():
    """Stochastic depth and layer scale stay on in train mode, and stream exactly."""
    model = tiny_convnext(stochastic_depth_prob=0.5).train()
    trunk, head = tilefn.split(model)
    assert trunk.training and head.training
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.manual_seed(0)
        train_out = trunk(x)
        trunk.eval()
        eval_out = trunk(x)
        trunk.train()
    assert not torch.allclose(train_out, eval_out)  # some residual branches were dropped
    assert tilefn.plan(trunk, x.shape, 192).n_tiles > 1
    assert_streams_like(trunk, x, 192)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size", "tile"), [("resnet18", 512, 480), ("mobilenet_v2", 576, 544)]
)
def test_split_trunk_streams_exactly_slow(name: str, size: int, tile: int):
    trunk, _ = tilefn.split(build(name))
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    assert tilefn.plan(trunk, x.shape, tile).n_tiles > 1
    assert_streams_like(trunk, x, tile)


def test_split_densenet_has_final_relu_in_trunk():
    model = build("densenet121")
    trunk, head = tilefn.split(model)
    assert list(dict(trunk.named_children())) == ["features", "relu"]
    assert isinstance(trunk.relu, nn.ReLU) and not trunk.relu.inplace
    assert trunk.features is model.features and head.classifier is model.classifier


def test_split_keeps_modes():
    model = build("resnet18").train()
    model.bn1.eval()
    trunk, head = tilefn.split(model)
    assert trunk.training and head.training and head.flatten.training
    assert not trunk.bn1.training and trunk.layer1.training
    model.eval()
    trunk, head = tilefn.split(model)
    assert not trunk.training and not head.training and not head.flatten.training


# ----------------------------------------------------------------------------- num_classes


@pytest.mark.parametrize(
    ("name", "final"),
    [
        ("resnet18", "fc"),
        ("mobilenet_v2", "classifier.1"),
        ("densenet121", "classifier"),
        ("squeezenet1_1", "classifier.1"),
        ("regnet_x_400mf", "fc"),
    ],
)
def test_split_num_classes(name: str, final: str):
    model = build(name)
    old = model.get_submodule(final)
    old_weight = old.weight.detach().clone()
    trunk, head = tilefn.split(model, num_classes=3)
    new = head.get_submodule(final)

    assert new is not old and type(new) is type(old)
    assert new.weight.dtype == torch.float64 and new.training is False
    assert new.weight.shape[0] == 3 and new.bias.shape == (3,)
    assert new.weight.shape[1:] == old.weight.shape[1:]
    assert model.get_submodule(final) is old and torch.equal(old.weight, old_weight)  # untouched
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert head(trunk(x)).shape == (2, 3)
        assert model(x).shape == (2, 1000)
    # Everything else in the head is still the model's own.
    new_ids = {id(p) for p in new.parameters()}
    rest = {id(p) for p in head.parameters()} - new_ids
    assert rest <= {id(p) for p in model.parameters()}
    assert not new_ids & {id(p) for p in model.parameters()}


def test_split_num_classes_vgg_keeps_other_classifier_layers():
    model = build("vgg11", torch.float32)
    _, head = tilefn.split(model, num_classes=5)
    assert head.classifier is not model.classifier
    for i in range(6):
        assert head.classifier[i] is model.classifier[i]
    assert head.classifier[6].out_features == 5 and model.classifier[6].out_features == 1000
    assert torch.all(head.classifier[6].bias == 0)  # torchvision's VGG init: N(0, 0.01), bias 0
    assert head.classifier[6].weight.std().item() == pytest.approx(0.01, rel=0.2)


def test_split_num_classes_convnext_init():
    _, head = tilefn.split(tiny_convnext(), num_classes=4)
    fc = head.classifier[2]
    assert fc.out_features == 4 and torch.all(fc.bias == 0)
    assert fc.weight.std().item() == pytest.approx(0.02, rel=0.3)  # torchvision: N(0, 0.02)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "10"])
def test_split_num_classes_invalid(bad):
    with pytest.raises(tilefn.OptionError, match="num_classes must be a positive int"):
        tilefn.split(build("squeezenet1_1"), num_classes=bad)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "barriers"),
    [("efficientnet_b0", 16), ("mobilenet_v3_small", 9), ("regnet_y_400mf", 16)],
)
def test_split_squeeze_excitation_families_into_staged_trunks(name: str, barriers: int):
    """These used to be refused; their squeeze-excitation blocks are now barriers."""
    trunk, _ = tilefn.split(build(name, torch.float32))
    plan = tilefn.plan(trunk, (1, 3, 2048, 2048), 1024)
    assert isinstance(plan, tilefn.StagedPlan) and len(plan.barriers) == barriers


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_split_unknown_model():
    with pytest.raises(tilefn.InputTypeError) as info:
        tilefn.split(Custom())
    msg = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "Custom" in msg and "'body' (Conv2d), 'fc' (Linear)" in msg
    for family in ["ResNet", "ConvNeXt", "VGG", "DenseNet", "MobileNetV2"]:
        assert family in msg
    assert "trunk = nn.Sequential(" in msg and "tilefn.streamify(trunk" in msg


@pytest.mark.parametrize("obj", ["resnet18", None, nn.Sequential(nn.Conv2d(3, 3, 1))])
def test_split_not_a_model(obj):
    with pytest.raises(tilefn.InputTypeError, match="split: don't know how to split"):
        tilefn.split(obj)


def test_split_streamed_backbone():
    trunk, _ = tilefn.split(build("squeezenet1_1"))
    backbone, _ = tilefn.streamify(trunk, 256)
    with pytest.raises(tilefn.InputTypeError, match="Split the plain model first"):
        tilefn.split(backbone)


def test_split_subclass_with_own_forward():
    class MyResNet(torchvision.models.ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    model = MyResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    with pytest.raises(tilefn.InputTypeError, match=r"overrides forward\(\)"):
        tilefn.split(model)

    class Plain(torchvision.models.ResNet):  # same forward: fine
        pass

    trunk, head = tilefn.split(Plain(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]))
    assert isinstance(trunk, nn.Sequential)
