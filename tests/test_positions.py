"""Interpolation with align_corners=True: computed at each crop's place, exactly.

Its sampling grid depends on the size of the whole map, so a crop computes it from its
absolute place (``tilefn._positions``); the planner reads the neighbours it needs from
:class:`~tilefn._geometry.AlignedUpsample`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_staged import max_conv_input
from torch import nn

import tilefn
from tilefn._errors import UnsupportedLayerError
from tilefn._geometry import AlignedUpsample
from tilefn._positions import AlignedCall, aligned_interpolate
from tilefn.testing import assert_streams_like


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_the_geometry_covers_every_input_torch_reads(n, factor):
    """For every output position, the inputs whose weight is non-zero (read off the
    Jacobian of the kernel itself) lie in what ``back`` asks for."""
    x = torch.randn(1, 1, n, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(
        lambda t: F.interpolate(t, scale_factor=factor, mode="linear", align_corners=True), x
    ).reshape(n * factor, n)
    up = AlignedUpsample(factor)
    for o in range(n * factor):
        lo, hi = up.back(o, o, n)
        assert 0 <= lo <= hi <= n - 1
        read = jac[o].nonzero().flatten().tolist()
        assert all(lo <= i <= hi for i in read), (o, read, (lo, hi))


@pytest.mark.parametrize("origin", [0, 3, 8])
def test_a_crop_at_its_place_computes_what_the_image_computes(origin):
    torch.manual_seed(0)
    full = torch.randn(2, 3, 20, 13, dtype=torch.float64)
    ref = F.interpolate(full, scale_factor=(2, 3), mode="bilinear", align_corners=True)
    call = AlignedCall(dims=(0, 1), in_sizes=(20, 13), out_sizes=(40, 39), strides=(1, 1))
    crop = full[:, :, origin : origin + 9, 2:10]
    got = aligned_interpolate(crop, (18, 24), call, (origin, 2))
    # Interior outputs (whose neighbours are in the crop) are exact; the planner keeps only those.
    want = ref[:, :, 2 * origin : 2 * origin + 18, 6:30]
    inner = (slice(None), slice(None), slice(2, 15), slice(3, 20))
    torch.testing.assert_close(got[inner], want[inner], rtol=1e-14, atol=1e-14)


class Decoder(nn.Module):
    """A small encoder-decoder whose upsampling is all align_corners=True: by a scale factor,
    to a skip's size, and nn.UpsamplingBilinear2d at the end (smp's FPN and DeepLabV3+ heads)."""

    def __init__(self, norm: bool = False):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8) if norm else nn.Identity()
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.up = nn.UpsamplingBilinear2d(scale_factor=4)

    def forward(self, x):
        h = self.a(x).relu()
        g = self.b(h).relu()
        f = self.norm(self.c(g)).relu()
        g = g + F.interpolate(f, size=g.shape[-2:], mode="bilinear", align_corners=True)
        h = h + F.interpolate(g, scale_factor=2, mode="bilinear", align_corners=True)
        return self.up(self.head(h))


@pytest.mark.parametrize(
    "shape,tile,options",
    [
        ((1, 3, 200, 168), 64, {}),
        ((2, 3, 136, 184), 72, {"crop_batch": 2}),
        ((1, 3, 176, 200), 80, {"skip_constant": False}),
    ],
)
def test_align_corners_upsampling_streams_exactly(shape, tile, options):
    torch.manual_seed(0)
    net = Decoder().double()
    x = torch.randn(*shape, dtype=torch.float64)
    assert_streams_like(net, x, tile, **options)
    backbone, _ = tilefn.streamify(net, tile, **options)
    sizes = max_conv_input(net, lambda: backbone(x))
    assert max(max(s) for s in sizes) <= tile


def test_align_corners_upsampling_with_group_norm_streams_exactly():
    """Both together: a staged model (GroupNorm) whose stages upsample at their place."""
    torch.manual_seed(0)
    net = Decoder(norm=True).double()
    x = torch.randn(1, 3, 160, 136, dtype=torch.float64)
    assert_streams_like(net, x, 64)


def test_1d_and_3d_align_corners_stream_exactly():
    torch.manual_seed(0)
    net1 = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1),
        nn.Upsample(scale_factor=2, mode="linear", align_corners=True),
        nn.Conv1d(4, 3, 3, padding=1),
        nn.Upsample(scale_factor=3, mode="linear", align_corners=True),
    ).double()
    assert_streams_like(net1, torch.randn(1, 2, 301, dtype=torch.float64), 64)
    net3 = nn.Sequential(
        nn.Conv3d(2, 4, 3, stride=2, padding=1),
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
        nn.Conv3d(4, 3, 3, padding=1),
    ).double()
    assert_streams_like(net3, torch.randn(1, 2, 30, 26, 22, dtype=torch.float64), 16)


def test_constant_crops_are_computed_each_at_its_place():
    """Constant crops share one computation per class only in translation-equivariant
    models; with align_corners=True every crop runs (skip_constant is ignored), exactly."""
    torch.manual_seed(0)
    net = Decoder().double()
    x = torch.zeros(1, 3, 256, 256, dtype=torch.float64)
    x[:, :, 40:90, 60:120] = torch.randn(1, 3, 50, 60, dtype=torch.float64)
    backbone, _ = tilefn.streamify(net, 64, skip_constant=True)
    y = backbone(x)
    assert backbone.last_stats["forward"].computed == backbone.plan(x.shape).n_tiles
    torch.testing.assert_close(y, net(x), rtol=1e-12, atol=1e-12)


def test_float32_align_corners_is_close():
    torch.manual_seed(0)
    net = Decoder()
    x = torch.randn(1, 3, 200, 168)
    assert_streams_like(net, x, 64)


def test_under_torch_func_grad():
    torch.manual_seed(0)
    net = Decoder().double()
    x = torch.randn(1, 3, 128, 112, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    backbone, _ = tilefn.streamify(net, 64)

    def loss(p, f):
        return torch.func.functional_call(f, p, (x,)).square().sum()

    got = torch.func.grad(loss)(params, backbone)
    want = torch.func.grad(loss)(params, copy.deepcopy(net))
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10)


def test_bicubic_and_non_integer_align_corners_are_refused():
    bicubic = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Upsample(scale_factor=2, mode="bicubic", align_corners=True),
    )
    with pytest.raises(UnsupportedLayerError, match="bicubic"):
        tilefn.streamify(bicubic, 32)[0](torch.randn(1, 3, 64, 64))
    odd = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Upsample(scale_factor=1.5, mode="bilinear", align_corners=True),
    )
    with pytest.raises(UnsupportedLayerError, match="ratio 3/2"):
        tilefn.streamify(odd, 32)[0](torch.randn(1, 3, 64, 64))


class Direct(nn.Module):
    """Calls the aten kernel itself, past F.interpolate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        size = [2 * s for s in h.shape[-2:]]
        return torch.ops.aten.upsample_bilinear2d(h, size, True, None)


def test_the_kernel_called_directly_is_refused_not_run_wrongly():
    with pytest.raises(UnsupportedLayerError, match="without calling"):
        tilefn.streamify(Direct(), 32)[0](torch.randn(1, 3, 64, 64))


@pytest.mark.slow  # 85 s in float64, 2 threads
def test_segmentation_models_fpn_streams_exactly():
    """smp's FPN: GroupNorm in the decoder and align_corners=True upsampling (staged)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    net = smp.FPN(
        encoder_name="resnet18",
        encoder_weights=None,
        encoder_depth=3,
        decoder_pyramid_channels=32,
        decoder_segmentation_channels=32,
        upsampling=2,
        classes=2,
    ).eval()
    net = net.double()
    x = torch.randn(1, 3, 256, 224, dtype=torch.float64)
    assert_streams_like(net, x, 192)


class PooledBranch(nn.Module):
    """A 1 x 1 summary upsampled back with align_corners=True (PAN's and PSPNet's pooling
    branch): a constant on every crop, next to a spatial aligned upsampling."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.a(x)
        s = self.b(F.adaptive_avg_pool2d(h, 1))
        h = h + F.interpolate(s, size=h.shape[-2:], mode="bilinear", align_corners=True)
        return F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)


def test_a_pooled_summary_upsampled_with_align_corners_streams_exactly():
    torch.manual_seed(0)
    net = PooledBranch().double()
    x = torch.randn(1, 3, 96, 80, dtype=torch.float64)
    assert_streams_like(net, x, 32)
