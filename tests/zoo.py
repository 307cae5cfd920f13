"""The model zoo: every network tilefn must stream exactly, as data.

Each entry builds a float64 model (random init, ``weights=None``: nothing is downloaded)
already in the mode it is tested in, the input shape it runs on, and the tile size.
Tile sizes are chosen above each net's minimum tile (receptive field plus alignment) and
below the image in at least one dim, so every entry except ``smaller-than-tile`` really
runs several tiles; ``test_zoo.py`` checks that through the plan.

BatchNorm statistics and affine parameters, LayerNorm affine parameters and ConvNeXt
layer scales are randomised, so eval- and train-mode BatchNorm give different results
and no branch is switched off by its init. The reference for a model is
``reference_model(model)``: a copy with every BatchNorm in eval mode (API.md: BatchNorm
always uses running statistics inside the streamed trunk).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = ["ZooEntry", "ZOO", "zoo_params", "reference_model", "randomize_"]


@dataclass(frozen=True)
class ZooEntry:
    id: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # (N, C, *spatial)
    tile: int | tuple[int, ...]
    xfail: str | None = None  # known failure, with its reason: xfail(strict=True)
    rtol: float = 1e-10
    atol: float = 1e-10  # relative to max|reference| of each compared tensor
    rng: bool = False  # the forward draws random numbers: reseed before every call
    slow: bool = False  # deselected by default (pytest -m slow runs them)
    float32: bool = False  # also in the float32 test
    min_tiles: int = 2  # the plan must use at least this many tiles


def zoo_params(entries: list[ZooEntry] | None = None) -> list:
    """``pytest.param`` per entry, with its id, its ``slow`` mark and its strict xfail."""
    params = []
    for entry in ZOO if entries is None else entries:
        marks = []
        if entry.slow:
            marks.append(pytest.mark.slow)
        if entry.xfail is not None:
            marks.append(pytest.mark.xfail(reason=entry.xfail, strict=True))
        params.append(pytest.param(entry, id=entry.id, marks=marks))
    return params


# ----------------------------------------------------------------------------- helpers


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise norm statistics/affine parameters and layer scales, in place."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(0.2 * rnd(m.running_mean))
                    u = torch.rand(m.running_var.shape, generator=g, dtype=torch.float64)
                    m.running_var.copy_((0.5 + 1.5 * u).to(m.running_var.dtype))
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.2 * rnd(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.2 * rnd(m.bias))
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(0.5 + 0.2 * rnd(p))
    return model


def reference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm in eval mode: what the streamed trunk computes."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return ref


def _finish(model: nn.Module, train: bool = False) -> nn.Module:
    randomize_(model)
    model = model.double()
    model.train(train)
    return model


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


# ----------------------------------------------------------------------------- torchvision


def _tv(name: str, **kwargs) -> nn.Module:
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def resnet_trunk(name: str, upto: int = 4, train: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = _tv(name)
        layers = dict(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool)
        layers.update({f"layer{i}": getattr(m, f"layer{i}") for i in range(1, upto + 1)})
        return _finish(_seq(**layers), train)

    return build


class ResNetPyramid(nn.Module):
    """ResNet feature pyramid: a dict {"c3", "c4", "c5"} or a tuple (c2, c3, c4)."""

    def __init__(self, name: str, as_dict: bool) -> None:
        super().__init__()
        m = _tv(name)
        self.as_dict = as_dict
        self.stem = _seq(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool)
        self.layer1, self.layer2, self.layer3 = m.layer1, m.layer2, m.layer3
        self.layer4 = m.layer4 if as_dict else None

    def forward(self, x: torch.Tensor):
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        if self.as_dict:
            return {"c3": c3, "c4": c4, "c5": self.layer4(c4)}
        return (c2, c3, c4)


def densenet121_blocks12() -> nn.Module:
    # Through denseblock2 (stride 8): the full features' receptive field is ~2000 px.
    f = _tv("densenet121").features
    names = ["conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2"]
    return _finish(_seq(**{n: getattr(f, n) for n in names}))


def convnext_tiny_stages12(train: bool) -> Callable[[], nn.Module]:
    # stem, stage 1, downsample, stage 2 (stride 8): LayerNorm2d, permute + Linear,
    # layer scale, StochasticDepth. The full features' receptive field is ~1700 px.
    def build() -> nn.Module:
        f = _tv("convnext_tiny").features[:4]
        if train:  # make the per-sample draws matter
            for m in f.modules():
                if isinstance(m, torchvision.ops.StochasticDepth):
                    m.p = 0.5
        return _finish(f, train)

    return build


class GoogLeNetPieces(nn.Module):
    """conv1, maxpool1 (ceil_mode), conv2, conv3, maxpool2 (ceil_mode), inception3a."""

    def __init__(self) -> None:
        super().__init__()
        g = _tv("googlenet", aux_logits=False, init_weights=False)
        self.body = _seq(
            conv1=g.conv1,
            maxpool1=g.maxpool1,
            conv2=g.conv2,
            conv3=g.conv3,
            maxpool2=g.maxpool2,
            inception3a=g.inception3a,
        )

    def forward(self, x):
        return self.body(x)


class InceptionV3Stem(nn.Module):
    """inception_v3 up to Mixed_5b: unpadded convs, 3x3/2 max pools, avg-pool branch."""

    def __init__(self) -> None:
        super().__init__()
        m = _tv("inception_v3", aux_logits=False, init_weights=False)
        for name in [
            "Conv2d_1a_3x3",
            "Conv2d_2a_3x3",
            "Conv2d_2b_3x3",
            "maxpool1",
            "Conv2d_3b_1x1",
            "Conv2d_4a_3x3",
            "maxpool2",
            "Mixed_5b",
        ]:
            setattr(self, name, getattr(m, name))

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))
        return self.Mixed_5b(self.maxpool2(x))


# ----------------------------------------------------------------------------- hand-written 2-D


def odd_strides() -> nn.Module:
    return _finish(
        _seq(
            c1=nn.Conv2d(3, 6, 5, stride=2, padding=2),
            a1=nn.PReLU(6),
            c2=nn.Conv2d(6, 6, 3, stride=3, padding=1),
            a2=nn.ReLU(),
            c3=nn.Conv2d(6, 6, (3, 5), padding=(1, 2)),
            a3=nn.PReLU(),
            c4=nn.Conv2d(6, 4, 7),  # unpadded
        )
    )


def dilated_grouped() -> nn.Module:
    return _finish(
        _seq(
            c1=nn.Conv2d(3, 8, 3, padding=2, dilation=2),
            a1=nn.GELU(),
            c2=nn.Conv2d(8, 8, 3, padding=3, dilation=3, groups=4),
            a2=nn.ReLU(),
            dw=nn.Conv2d(8, 8, 5, padding=2, groups=8),
            pw=nn.Conv2d(8, 8, 1),
            a3=nn.Hardswish(),
            c3=nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            a4=nn.SiLU(),
            c4=nn.Conv2d(6, 4, (5, 3), dilation=(1, 3)),
        )
    )


def kernel_lt_stride() -> nn.Module:
    return _finish(
        _seq(
            c1=nn.Conv2d(3, 6, 1, stride=2),
            a1=nn.ReLU(),
            c2=nn.Conv2d(6, 6, 2, stride=3),
            a2=nn.ReLU(),
            c3=nn.Conv2d(6, 4, 3, padding=1),
            p=nn.MaxPool2d(1, stride=2),
        )
    )


def padding_modes() -> nn.Module:
    return _finish(
        _seq(
            c1=nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
            a1=nn.Tanh(),
            c2=nn.Conv2d(6, 6, 5, padding=2, padding_mode="replicate"),
            a2=nn.ReLU(),
            c3=nn.Conv2d(6, 6, 3, stride=2, padding=1, padding_mode="zeros"),
            a3=nn.ReLU(),
            c4=nn.Conv2d(6, 4, 3, padding=(2, 1), padding_mode="reflect"),
            c5=nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="replicate"),
        )
    )


def padding_circular() -> nn.Module:
    # Circular padding everywhere, so the image is a torus in both dims (sizes divisible by
    # the alignment). Mixing circular with zero padding along one dim is not streamable.
    return _finish(
        _seq(
            c1=nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular"),
            a1=nn.ReLU(),
            c2=nn.Conv2d(6, 6, 5, stride=2, padding=2, padding_mode="circular"),
            a2=nn.ReLU(),
            c3=nn.Conv2d(6, 4, 3, padding=(1, 2), dilation=(1, 2), padding_mode="circular"),
        )
    )


class FPadModes(nn.Module):
    """F.pad in forward: constant (non-zero value), reflect, replicate; unpadded convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3)
        self.c2 = nn.Conv2d(6, 6, 3)
        self.c3 = nn.Conv2d(6, 4, 3, stride=2)

    def forward(self, x):
        x = self.c1(F.pad(x, (1, 2, 2, 1), mode="constant", value=0.5))
        x = self.c2(F.pad(torch.relu(x), (2, 1, 1, 2), mode="reflect"))
        return self.c3(F.pad(x, (1, 1, 2, 0), mode="replicate"))


class FPadCircular(nn.Module):
    """F.pad(mode="circular") (asymmetric) before unpadded convs: a torus in both dims."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3)
        self.c2 = nn.Conv2d(6, 4, 3, stride=2)

    def forward(self, x):
        x = self.c1(F.pad(x, (2, 0, 1, 1), mode="circular"))
        return self.c2(F.pad(torch.relu(x), (1, 1, 1, 1), mode="circular"))


def pooling() -> nn.Module:
    return _finish(
        _seq(
            c1=nn.Conv2d(3, 6, 3, padding=1),
            p1=nn.MaxPool2d(3, stride=2, ceil_mode=True),
            c2=nn.Conv2d(6, 6, 3, padding=1),
            p2=nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            c3=nn.Conv2d(6, 6, 3, padding=1),
            p3=nn.AvgPool2d(2, ceil_mode=True),
            p4=nn.MaxPool2d(3, stride=1, padding=1),
            p5=nn.MaxPool2d(3, stride=1, padding=1, dilation=2),
            c4=nn.Conv2d(6, 4, 3, padding=1),
            p6=nn.AvgPool2d(3, stride=1, padding=1),
            p7=nn.MaxPool2d(2, stride=2, padding=1),
        )
    )


def conv_transpose() -> nn.Module:
    return _finish(
        _seq(
            c1=nn.Conv2d(3, 6, 3, stride=2, padding=1),
            a1=nn.ReLU(),
            c2=nn.Conv2d(6, 6, 3, stride=2, padding=1),
            a2=nn.ReLU(),
            t1=nn.ConvTranspose2d(6, 6, 3, stride=2, padding=1, output_padding=1),
            a3=nn.ReLU(),
            t2=nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1),
            a4=nn.ReLU(),
            c3=nn.Conv2d(4, 4, 3, padding=1),
            t3=nn.ConvTranspose2d(4, 4, 3, stride=3, padding=1, output_padding=2, groups=2),
            c4=nn.Conv2d(4, 3, 3, stride=3, padding=1),
        )
    )


class UNet(nn.Module):
    """Two-level U-Net: skip concats, ConvTranspose2d, bilinear and nearest upsampling.

    ``bilinear=False`` upsamples the decoder with nearest instead, so the rest of the
    U-Net is covered apart from the bilinear op.
    """

    def __init__(self, bilinear: bool = True) -> None:
        super().__init__()
        self.mode = "bilinear" if bilinear else "nearest"
        self.enc1 = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.enc3 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.up3 = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.dec2 = nn.Sequential(nn.Conv2d(24, 12, 3, padding=1), nn.ReLU())
        self.dec1 = nn.Sequential(nn.Conv2d(20, 8, 3, padding=1), nn.ReLU())
        self.up_nearest = nn.Upsample(scale_factor=2, mode="nearest")
        self.side = nn.Conv2d(16, 2, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up3(e3), e2], dim=1))
        if self.mode == "bilinear":
            u1 = F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)
        else:
            u1 = F.interpolate(d2, scale_factor=2, mode="nearest")
        d1 = self.dec1(torch.cat([u1, e1], dim=1))
        side = F.interpolate(self.up_nearest(self.side(e3)), scale_factor=2, mode="nearest")
        return self.out(d1) + side


class Mixer(nn.Module):
    """Functional ops in forward: PReLU, channel LayerNorm and per-pixel Linear via permute,
    layer scale, residual add, branches + cat, channel shuffle, chunk, gating."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu = nn.PReLU(8)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.branch_a = nn.Conv2d(8, 4, 3, padding=1)
        self.branch_b = nn.Conv2d(8, 4, 5, padding=2, groups=4)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gate = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 6, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.prelu(self.stem(x))
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.ln(y)))).permute(0, 3, 1, 2)
        x = x + self.gamma.view(1, -1, 1, 1) * y
        x = torch.cat([self.branch_a(x), torch.relu(self.branch_b(x))], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.cat([a * torch.sigmoid(b), b - a], dim=1)
        x = x * torch.sigmoid(self.gate(self.dw(x))) + 0.5 * x
        return self.head(x)


def bn_net(train: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return _finish(
            _seq(
                c1=nn.Conv2d(3, 8, 3, padding=1, bias=False),
                bn1=nn.BatchNorm2d(8),
                a1=nn.ReLU(),
                c2=nn.Conv2d(8, 8, 3, stride=2, padding=1),
                bn2=nn.BatchNorm2d(8),
                a2=nn.ReLU6(),
                p=nn.MaxPool2d(2),
                c3=nn.Conv2d(8, 4, 3, padding=1),
                bn3=nn.BatchNorm2d(4, affine=False),
            ),
            train,
        )

    return build


def tiny_net() -> nn.Module:
    return _finish(
        _seq(
            c1=nn.Conv2d(3, 6, 3, padding=1),
            a1=nn.ReLU(),
            p=nn.MaxPool2d(2),
            c2=nn.Conv2d(6, 4, 3, padding=1),
        )
    )


class ListOutputs(nn.Module):
    """Returns a list [full-res map, half-res map]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(
            nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
        )

    def forward(self, x):
        a = self.a(x)
        return [a, self.b(a)]


# ----------------------------------------------------------------------------- 1-D and 3-D


def net1d(train: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return _finish(
            _seq(
                c1=nn.Conv1d(2, 6, 5, padding=2),
                bn=nn.BatchNorm1d(6),
                a1=nn.ReLU(),
                p1=nn.MaxPool1d(3, stride=2, ceil_mode=True),
                c2=nn.Conv1d(6, 6, 3, stride=2, padding=1, padding_mode="reflect"),
                a2=nn.ReLU(),
                t1=nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1),
                c3=nn.Conv1d(4, 4, 3, dilation=2, padding=2),
                p2=nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False),
                c4=nn.Conv1d(4, 3, 3, stride=3),
            ),
            train,
        )

    return build


def net3d(train: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return _finish(
            _seq(
                c1=nn.Conv3d(1, 4, 3, padding=1),
                bn=nn.BatchNorm3d(4),
                a1=nn.ReLU(),
                p1=nn.MaxPool3d(2, ceil_mode=True),
                c2=nn.Conv3d(4, 6, (3, 1, 3), stride=(1, 2, 2), padding=(1, 0, 1)),
                a2=nn.ReLU(),
                c3=nn.Conv3d(6, 4, 3, padding=1, groups=2),
                p2=nn.AvgPool3d((1, 2, 2)),
                t1=nn.ConvTranspose3d(4, 2, 2, stride=2),
            ),
            train,
        )

    return build


# ----------------------------------------------------------------------------- the registry

ZOO: list[ZooEntry] = [
    # torchvision trunks at their real width, small images (not multiples of the alignment)
    ZooEntry(
        "resnet18", resnet_trunk("resnet18"), (1, 3, 97, 613), 544, slow=True
    ),  # resnet18-fpn-dict runs it
    ZooEntry(
        "resnet18-layer3-train-bn",
        resnet_trunk("resnet18", upto=3, train=True),
        (1, 3, 35, 330),
        288,
    ),
    ZooEntry(
        "resnet18-layer2-batch2",
        resnet_trunk("resnet18", upto=2, train=True),
        (2, 3, 50, 230),
        (96, 128),
    ),
    ZooEntry("resnet34-layer3", resnet_trunk("resnet34", upto=3), (1, 3, 65, 900), 640, slow=True),
    ZooEntry(
        "resnet50-layer2", resnet_trunk("resnet50", upto=2), (1, 3, 71, 265), 128, float32=True
    ),
    ZooEntry("resnet50", resnet_trunk("resnet50"), (1, 3, 97, 900), 544, slow=True),
    ZooEntry(
        "resnet18-fpn-dict",
        lambda: _finish(ResNetPyramid("resnet18", as_dict=True)),
        (1, 3, 67, 613),
        544,
    ),
    ZooEntry(
        "resnet18-fpn-tuple",
        lambda: _finish(ResNetPyramid("resnet18", as_dict=False)),
        (1, 3, 99, 421),
        288,
    ),
    ZooEntry(
        "vgg11-features-pool3", lambda: _finish(_tv("vgg11").features[:11]), (1, 3, 67, 161), 64
    ),
    ZooEntry(
        "vgg11-bn-features-pool3-train",
        lambda: _finish(_tv("vgg11_bn").features[:15], train=True),
        (1, 3, 61, 157),
        64,
    ),
    ZooEntry(
        "vgg11-features", lambda: _finish(_tv("vgg11").features), (1, 3, 64, 480), 256, slow=True
    ),
    ZooEntry(
        "vgg11-bn-features",
        lambda: _finish(_tv("vgg11_bn").features),
        (1, 3, 64, 480),
        256,
        slow=True,
    ),
    ZooEntry("densenet121-block2", densenet121_blocks12, (1, 3, 35, 480), 352),
    ZooEntry(
        "mobilenet-v2-features", lambda: _finish(_tv("mobilenet_v2").features), (1, 3, 33, 800), 640
    ),
    ZooEntry(
        "convnext-tiny-stage2",
        convnext_tiny_stages12(train=False),
        (1, 3, 32, 360),
        288,
        float32=True,
    ),
    ZooEntry(
        "convnext-tiny-stage2-train-stochdepth",
        convnext_tiny_stages12(train=True),
        (2, 3, 27, 330),
        288,
        rng=True,
    ),
    ZooEntry("googlenet-inception3a", lambda: _finish(GoogLeNetPieces()), (1, 3, 99, 203), 96),
    ZooEntry("inception-v3-mixed5b", lambda: _finish(InceptionV3Stem()), (1, 3, 91, 241), 128),
    # hand-written 2-D nets
    ZooEntry("odd-kernels-strides", odd_strides, (1, 3, 151, 211), 96),
    ZooEntry("dilated-grouped-depthwise", dilated_grouped, (1, 3, 129, 147), 64),
    ZooEntry("kernel-smaller-than-stride", kernel_lt_stride, (1, 3, 151, 137), 48),
    ZooEntry("conv-padding-modes", padding_modes, (1, 3, 131, 117), 48),
    ZooEntry("conv-padding-circular", padding_circular, (1, 3, 96, 84), 40),
    ZooEntry("fpad-modes", lambda: _finish(FPadModes()), (1, 3, 123, 101), 48),
    ZooEntry("fpad-circular", lambda: _finish(FPadCircular()), (1, 3, 96, 84), 40),
    ZooEntry("pooling-ceil-mode", pooling, (1, 3, 157, 301), 160),
    ZooEntry("conv-transpose", conv_transpose, (1, 3, 131, 97), 48),
    ZooEntry("unet", lambda: _finish(UNet()), (1, 3, 96, 148), 64, float32=True),
    ZooEntry("unet-nearest", lambda: _finish(UNet(bilinear=False)), (1, 3, 96, 148), 64),
    ZooEntry(
        "unet-train-bn-batch2", lambda: _finish(UNet(), train=True), (2, 3, 100, 72), (48, 64)
    ),
    ZooEntry("mixer-functional-ops", lambda: _finish(Mixer()), (1, 3, 117, 135), 40, float32=True),
    ZooEntry("bn-eval-batch2-tuple-tile", bn_net(train=False), (2, 3, 121, 77), (48, 40)),
    ZooEntry("bn-train-batch2-tuple-tile", bn_net(train=True), (2, 3, 121, 77), (48, 40)),
    ZooEntry("list-outputs", lambda: _finish(ListOutputs()), (1, 3, 70, 90), 32),
    ZooEntry(
        "pixel-shuffle-unshuffle",
        lambda: _finish(
            _seq(
                c1=nn.Conv2d(3, 8, 3, padding=1),
                up=nn.PixelShuffle(2),
                c2=nn.Conv2d(2, 8, 3, padding=1),
                down=nn.PixelUnshuffle(2),
                c3=nn.Conv2d(32, 4, 3, stride=2, padding=1),
            )
        ),
        (2, 3, 37, 30),
        16,
    ),
    ZooEntry("smaller-than-tile", tiny_net, (2, 3, 40, 30), 64, min_tiles=1),
    # 1-D and 3-D
    ZooEntry("conv1d-train-bn", net1d(train=True), (2, 2, 301), 64, float32=True),
    ZooEntry("conv1d-eval", net1d(train=False), (1, 2, 257), 48),
    ZooEntry("conv3d-train-bn", net3d(train=True), (1, 1, 21, 50, 60), (14, 32, 40)),
    ZooEntry("conv3d-eval-batch2", net3d(train=False), (2, 1, 17, 45, 52), 40),
]

_ids = [e.id for e in ZOO]
assert len(_ids) == len(set(_ids)), "zoo ids must be unique"
