"""Layers that real libraries use and that stream exactly: interpolation to a ``size=`` that is
an integer multiple of the input (smp U-Net decoders, torchvision's FeaturePyramidNetwork),
``recompute_scale_factor=True``, nearest subsampling by 1/k, and the networks themselves.

The float64 reference is the plain model; ``tilefn.testing.assert_streams_like`` checks the
output, every parameter gradient and the input gradient through both ``streamed_vjp`` and
``loss.backward()``. Whole library networks need large images (their receptive fields are
several hundred pixels) and are marked slow.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilefn
import tilefn.testing

DTYPE = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


class SkipUp(nn.Module):
    """A U-Net step: downsample, then interpolate back to the skip's size and concatenate."""

    def __init__(self, mode: str, down: int = 2) -> None:
        super().__init__()
        self.mode = mode
        self.down = nn.Conv2d(2, 4, 3, stride=down, padding=1)
        self.out = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(x)
        extra = {} if self.mode == "nearest" else {"align_corners": False}
        up = F.interpolate(d, size=x.shape[-2:], mode=self.mode, **extra)
        return self.out(torch.cat([up, x], 1))


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("down", [2, 4])
def test_interpolate_to_an_integer_multiple_size_streams_exactly(mode: str, down: int) -> None:
    torch.manual_seed(0)
    tilefn.testing.assert_streams_like(SkipUp(mode, down).to(DTYPE), image(1, 2, 96, 80), 40)


class Interp(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.kwargs = kwargs
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.interpolate(self.a(x), **self.kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale_factor": 2.0, "mode": "bilinear", "recompute_scale_factor": True},
        {"scale_factor": 3, "mode": "nearest", "recompute_scale_factor": True},
        {"scale_factor": 0.5, "mode": "nearest"},
        {"scale_factor": 1 / 3, "mode": "nearest"},
    ],
    ids=["bilinear-x2-recompute", "nearest-x3-recompute", "nearest-half", "nearest-third"],
)
@pytest.mark.parametrize("size", [(96, 80), (97, 83)])
def test_scale_factors_that_sit_on_the_grid_stream_exactly(kwargs: dict, size: tuple) -> None:
    torch.manual_seed(0)
    tilefn.testing.assert_streams_like(Interp(**kwargs).to(DTYPE), image(1, 2, *size), 40)


def test_ratios_off_the_grid_are_refused() -> None:
    with pytest.raises(tilefn.UnsupportedLayerError, match=r"non-integer scale factor 1.5"):
        tilefn.plan(Interp(scale_factor=1.5, mode="bilinear").to(DTYPE), (1, 2, 64, 64), 32)
    with pytest.raises(tilefn.UnsupportedLayerError, match=r"non-integer scale factor 0.5"):
        tilefn.plan(Interp(scale_factor=0.5, mode="bilinear").to(DTYPE), (1, 2, 64, 64), 32)
    with pytest.raises(tilefn.UnsupportedLayerError, match=r"non-integer scale factor 1.5"):
        tilefn.plan(Interp(size=(48, 48), mode="bilinear").to(DTYPE), (1, 2, 32, 32), 16)


class FixedSize(nn.Module):
    """Interpolates to a size that is a multiple of the image, not of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.a(x), size=(x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2))


class RatioBySize(nn.Module):
    """Interpolates by 2 on inputs wider than 80 and by 3 on narrower ones (a crop)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        factor = 2 if x.shape[-1] > 80 else 3
        return F.interpolate(y, size=tuple(s * factor for s in y.shape[-2:]))


def test_a_size_that_is_not_the_same_multiple_on_every_crop_is_refused() -> None:
    with pytest.raises(tilefn.UnsupportedLayerError, match=r"non-integer scale factor 1.95918"):
        tilefn.streamify(FixedSize().to(DTYPE), 40).backbone(image(1, 2, 96, 97))
    with pytest.raises(
        tilefn.PlanError,
        match=r"^streamify: layer '<root>' \(RatioBySize\) .*changes the resolution by another factor on a crop",
    ):
        tilefn.streamify(RatioBySize().to(DTYPE), 40).backbone(image(1, 2, 96, 96))


def test_torchvision_feature_pyramid_on_a_small_backbone_streams_exactly() -> None:
    """torchvision's FPN interpolates each level to the size of the next (``size=``)."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.ops import FeaturePyramidNetwork

    class BackboneWithFPN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            stages = OrderedDict(
                s1=nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()),
                s2=nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()),
                s3=nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU()),
            )
            self.body = IntermediateLayerGetter(
                nn.Sequential(stages), {"s1": "0", "s2": "1", "s3": "2"}
            )
            self.fpn = FeaturePyramidNetwork([4, 6, 8], 5)

        def forward(self, x: torch.Tensor):
            return self.fpn(self.body(x))

    torch.manual_seed(0)
    tilefn.testing.assert_streams_like(BackboneWithFPN().to(DTYPE), image(1, 3, 128, 112), 72)


@pytest.mark.slow
def test_smp_unet_and_torchvision_resnet_fpn_stream_exactly() -> None:
    """The libraries' own code paths, no shims (about 5 minutes on 2 cores)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    x = image(1, 3, 704, 640)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=2).to(DTYPE).eval()
    tilefn.testing.assert_streams_like(unet, x, 640, rtol=1e-8, atol=1e-8)
    fpn = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=5, returned_layers=[2, 3, 4]
    )
    tilefn.testing.assert_streams_like(fpn.to(DTYPE).eval(), x, 640, rtol=1e-8, atol=1e-8)


def _smp(arch: str, encoder: str):
    def build() -> nn.Module:
        smp = pytest.importorskip("segmentation_models_pytorch")
        return getattr(smp, arch)(encoder, encoder_weights=None, classes=2)

    return build


def _tv_fpn(backbone: str, layers: list[int]):
    def build() -> nn.Module:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        return resnet_fpn_backbone(
            backbone_name=backbone, weights=None, trainable_layers=5, returned_layers=layers
        )

    return build


def _timm_pyramid(name: str):
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, features_only=True)

    return build


# (network, tile = its minimum tile): each was exact in float64 (rel <= 1e-8 on the output,
# every parameter gradient and the input gradient) on an image of (tile + 64, tile + 32) px,
# i.e. 2 x 2 crops, in a manual run of ~2-9 minutes each on 2 cores.
LIBRARY_NETWORKS = {
    "smp.Unet(vgg11)": (_smp("Unet", "vgg11"), 416),
    "smp.Unet(mobilenet_v2)": (_smp("Unet", "mobilenet_v2"), 640),
    "smp.Unet(timm-regnetx_002)": (_smp("Unet", "timm-regnetx_002"), 704),
    "smp.Unet(dpn68)": (_smp("Unet", "dpn68"), 768),
    "smp.Unet(tu-regnetx_002)": (_smp("Unet", "tu-regnetx_002"), 704),
    "smp.Unet(tu-cspresnet50)": (_smp("Unet", "tu-cspresnet50"), 576),
    "smp.UnetPlusPlus(resnet18)": (_smp("UnetPlusPlus", "resnet18"), 576),
    "smp.Linknet(resnet18)": (_smp("Linknet", "resnet18"), 512),
    "fpn(resnet18, [1, 2, 3, 4])": (_tv_fpn("resnet18", [1, 2, 3, 4]), 576),
    "fpn(resnet18, [4])": (_tv_fpn("resnet18", [4]), 576),
    "timm.features(regnetx_002)": (_timm_pyramid("regnetx_002"), 576),
    "timm.features(mobilenetv2_050)": (_timm_pyramid("mobilenetv2_050"), 512),
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`timm-` encoders are deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(LIBRARY_NETWORKS))
def test_library_networks_stream_exactly(name: str) -> None:
    build, tile = LIBRARY_NETWORKS[name]
    model = build().to(DTYPE).eval()
    x = image(1, 3, tile + 64, tile + 32)
    tilefn.testing.assert_streams_like(model, x, tile, rtol=1e-8, atol=1e-8)


class PerPixelLinear(nn.Module):
    """A patchify conv, then ``nn.Linear`` on the channels-last map (as timm's ConvNeXt)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch, self.fc = nn.Conv2d(3, 4, 4, stride=4), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.patch(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("shape", [(1, 3, 4, 256), (1, 3, 256, 4), (2, 3, 4, 256), (2, 3, 256, 4)])
def test_per_pixel_linear_with_a_spatial_dim_of_size_one(shape: tuple) -> None:
    torch.manual_seed(0)
    tilefn.testing.assert_streams_like(PerPixelLinear().to(DTYPE), image(*shape), 64)


def test_the_minimum_tile_is_the_receptive_field_not_the_image() -> None:
    deep = nn.Sequential(*[nn.Conv2d(1, 1, 9, padding=4) for _ in range(12)]).to(DTYPE)
    with pytest.raises(
        tilefn.TileSizeError, match=r"needs tiles of at least \(97, 97\) px"
    ) as info:
        tilefn.plan(deep, (1, 1, 80, 80), 32)
    assert "can only run as one tile: use tile_size >= (80, 80)" in str(info.value)
    with pytest.raises(tilefn.TileSizeError, match=r"Use tile_size >= \(97, 97\)"):
        tilefn.plan(deep, (1, 1, 400, 400), 32)


TIMM_MODELS = [
    "resnet18",
    "resnet18d",
    "convnext_atto",
    "regnetx_002",
    "vgg11",
    "mobilenetv3_small_050",
]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_split_cuts_timm_models_into_features_and_head(name: str) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    trunk, head = tilefn.split(model)
    x = image(1, 3, 96, 96).float()
    assert torch.equal(head(trunk(x)), model(x))
    trunk_ids = {id(p) for p in trunk.parameters()}
    head_ids = {id(p) for p in head.parameters()}
    assert not trunk_ids & head_ids
    assert trunk_ids | head_ids == {id(p) for p in model.parameters()}


def test_split_refuses_num_classes_for_timm() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(
        tilefn.OptionError, match=r"timm.create_model\(name, pretrained=False, num_classes"
    ):
        tilefn.split(model, num_classes=2)


@pytest.mark.slow
def test_timm_trunks_and_feature_pyramids_stream_exactly() -> None:
    timm = pytest.importorskip("timm")
    x = image(1, 3, 640, 576)
    trunk, _ = tilefn.split(timm.create_model("resnet18", pretrained=False).to(DTYPE).eval())
    tilefn.testing.assert_streams_like(trunk, x, 512, rtol=1e-8, atol=1e-8)
    pyramid = timm.create_model(
        "resnet18", pretrained=False, features_only=True, out_indices=(2, 3, 4)
    )
    tilefn.testing.assert_streams_like(pyramid.to(DTYPE).eval(), x, 512, rtol=1e-8, atol=1e-8)


def test_library_whole_image_layers_stream_and_attention_is_refused() -> None:
    torch.manual_seed(0)
    inorm = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True))
    tilefn.testing.assert_streams_like(inorm.to(DTYPE), image(1, 3, 64, 64), 32)
    from torchvision.models.segmentation.deeplabv3 import ASPP

    # ASPP: dilated branches plus the image-pooling branch (pool, 1x1 conv, BatchNorm, ReLU,
    # bilinear upsampling back), concatenated: the pooling branch is a barrier.
    aspp = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ASPP(8, [2, 4], out_channels=8))
    tilefn.testing.assert_streams_like(aspp.to(DTYPE).eval(), image(1, 3, 96, 80), 48)

    class Tokens(nn.Module):  # a ViT's patch tokens and class token
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4, stride=4)
            self.cls = nn.Parameter(torch.zeros(1, 1, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            return torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)

    with pytest.raises(tilefn.UnsupportedLayerError, match=r"sequence of tokens"):
        tilefn.plan(Tokens(), (1, 3, 64, 64), 32)


def test_monai_unet_with_batch_norm_streams_exactly() -> None:
    monai = pytest.importorskip("monai")
    net = monai.networks.nets.UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2), norm="batch")
    tilefn.testing.assert_streams_like(net.to(DTYPE).eval(), image(1, 1, 96, 96), 40)


class EmptySkip(nn.Module):
    """A U-Net decoder with an empty skip (no channels), as smp builds for encoders without
    a stride-2 stage (timm ConvNeXt)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y, y.new_zeros(y.shape[0], 0, *y.shape[2:])], 1)


def test_concatenating_an_empty_skip_streams_exactly() -> None:
    torch.manual_seed(0)
    tilefn.testing.assert_streams_like(EmptySkip().to(DTYPE), image(1, 2, 64, 64), 32)


def test_split_refuses_a_timm_model_whose_head_reuses_a_trunk_child() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

        def forward_head(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    Shared.__module__ = "timm.models.fake"  # split recognises timm models by their module
    with pytest.raises(
        tilefn.InputTypeError, match=r"forward_features and forward_head both run 'conv'"
    ):
        tilefn.split(Shared().eval())


class Unfolded(nn.Module):
    """``F.unfold`` viewed back as a map (the columns of each block as channels) to compute
    per-block weights, then the weighted columns ``F.fold``-ed back onto the map (as
    involution or CARAFE do)."""

    def __init__(self, kernel: int, stride: int, dilation: int, padding: int) -> None:
        super().__init__()
        self.args = {"kernel_size": kernel, "stride": stride}
        self.args.update(dilation=dilation, padding=padding)
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3 * kernel * kernel, kernel * kernel, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.a(x)
        cols = F.unfold(y, **self.args)
        k, s, d, p = (self.args[n] for n in ("kernel_size", "stride", "dilation", "padding"))
        blocks = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n in y.shape[-2:]]
        n, ck, length = cols.shape
        w = self.b(cols.view(n, ck, *blocks))
        weighted = cols.view(n, 3, k * k, length) * torch.sigmoid(w).view(n, 1, k * k, length)
        return F.fold(weighted.view(n, ck, length), y.shape[-2:], **self.args), w


@pytest.mark.parametrize(
    "kernel,stride,dilation,padding", [(3, 1, 1, 1), (3, 2, 1, 1), (2, 2, 1, 0), (3, 1, 2, 2)]
)
@pytest.mark.parametrize("size", [(48, 40), (51, 45)])
def test_unfold_and_fold_stream_exactly(
    kernel: int, stride: int, dilation: int, padding: int, size: tuple
) -> None:
    torch.manual_seed(0)
    net = Unfolded(kernel, stride, dilation, padding).to(DTYPE)
    tilefn.testing.assert_streams_like(net, image(2, 2, *size), 24)


def test_fold_of_transposed_blocks_streams_and_space_in_channels_is_refused() -> None:
    class Transposed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cols = F.unfold(x, 3, padding=1)
            h, w = x.shape[-2:]
            swapped = cols.view(1, -1, h, w).transpose(2, 3).reshape(1, cols.shape[1], -1)
            return F.fold(swapped, (w, h), 3, padding=1)

    tilefn.testing.assert_streams_like(Transposed(), image(1, 2, 48, 40), 24)

    class RowsAsChannels(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 1, 3).reshape(n, h * c, w)
            return F.fold(rows, (1, w + 2), (1, 3))

    with pytest.raises(tilefn.UnsupportedLayerError, match="channel dim holds a spatial dim"):
        tilefn.plan(RowsAsChannels(), (1, 1, 48, 40), 24)


def test_the_tile_size_error_lists_tiles_that_do_not_overlap_so_much() -> None:
    """The minimum tile of a deep network owns almost nothing (here 1 px per crop, a in the
    thousands): the error lists larger tiles with their overlap and memory."""
    import re

    deep = nn.Sequential(*[nn.Conv2d(1, 1, 9, padding=4) for _ in range(12)]).to(DTYPE)
    with pytest.raises(tilefn.TileSizeError, match=r"Use tile_size >= \(97, 97\)") as info:
        tilefn.plan(deep, (1, 1, 400, 400), 32)
    msg = str(info.value)
    assert "Tiles, their a and estimated peak memory: (97, 97): a = " in msg, msg
    overlaps = [float(a) for a in re.findall(r"\): a = ([0-9.e+]+),", msg)]
    assert overlaps[0] > 100 and overlaps[-1] <= 2 and overlaps == sorted(overlaps, reverse=True)
    for tile, a in zip(re.findall(r"\((\d+), \d+\): a = ", msg)[1:], overlaps[1:]):
        assert tilefn.plan(deep, (1, 1, 400, 400), int(tile)).overlap == pytest.approx(a, rel=1e-2)
