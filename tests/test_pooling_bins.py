"""Adaptive average pooling to a grid of bins (PSPNet's pyramid pooling: 1, 2, 3 and 6 bins
per side, through 1x1 convolutions, interpolated back to the map's size): the bins are a
barrier whose statistics are the bin means, each block adding to the bins it overlaps at its
place; the interpolated grid is computed on each crop at its place. Against the plain model
in float64, every convolution on at most tile_size pixels (``check_exact``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_staged import check_exact, check_float32, check_func_grad, conv
from torch import nn

import tilefn


class Pyramid(nn.Module):
    """PSPNet's pyramid pooling module, as smp and mmseg write it."""

    def __init__(self, c: int, bins=(1, 2, 3, 6), align_corners: bool = True, out: int = 4):
        super().__init__()
        self.bins, self.align = bins, align_corners
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out, 1), nn.BatchNorm2d(out) if b != 1 else nn.Identity())
            for b in bins
        )

    def forward(self, x):
        h, w = x.shape[-2:]
        outs = [x]
        for b, layer in zip(self.bins, self.convs):
            p = F.relu(layer(F.adaptive_avg_pool2d(x, b)))
            outs.append(F.interpolate(p, size=(h, w), mode="bilinear", align_corners=self.align))
        return torch.cat(outs, 1)


def _net(align_corners: bool, bins=(1, 2, 3, 6)) -> nn.Module:
    c = 8 + 4 * len(bins)
    return nn.Sequential(
        conv(3, 8), conv(8, 8, 2), Pyramid(8, bins, align_corners), conv(c, 4)
    ).eval()


@pytest.mark.parametrize("align_corners", [True, False])
def test_pyramid_pooling_streams_exactly(align_corners):
    """Odd map sizes (34 x 31), so bins of 3 and 6 overlap and differ in size."""
    plan = check_exact(_net(align_corners), (2, 3, 67, 61), 32)
    assert [b.kind for b in plan.barriers] == ["pool", "bins", "bins", "bins"]
    assert "average pooling to (6, 6) bins" in str(plan)
    # The four poolings read one map: one prefix pass reduces it into all four.
    assert plan.leaders == (0, 0, 0, 0) and len(plan.stages) == 2
    assert "reduced in barrier 1's pass (the same map)" in str(plan)


def test_rectangular_bins_and_stacked_crops_stream_exactly():
    check_exact(_net(False, bins=((2, 3), (5, 1))), (1, 3, 70, 90), 40, crop_batch=2)


class Pyramid3d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv3d(c, 2, 1)

    def forward(self, x):
        p = self.conv(F.adaptive_avg_pool3d(x, (2, 3, 2)))
        up = F.interpolate(p, size=x.shape[2:], mode="trilinear", align_corners=True)
        return torch.cat([x, up], 1)


def test_pooling_to_bins_in_3d_streams_exactly():
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), Pyramid3d(4), nn.Conv3d(6, 2, 3, padding=1))
    check_exact(net, (1, 2, 21, 18, 25), 12)


def test_pyramid_pooling_in_float32_is_close():
    check_float32(_net(True))


def test_pyramid_pooling_under_torch_func_grad():
    check_func_grad(_net(True))


def test_smp_pspnet_streams_exactly():
    smp = pytest.importorskip("segmentation_models_pytorch")
    net = smp.PSPNet(
        "resnet18", encoder_weights=None, encoder_depth=3, psp_out_channels=32, classes=2
    ).eval()
    plan = check_exact(net, (1, 3, 320, 288), 192)
    assert [b.bins for b in plan.barriers] == [None, (2, 2), (3, 3), (6, 6)]


class NearestGrid(nn.Module):
    def forward(self, x):
        p = F.adaptive_avg_pool2d(x, 3)
        return x + F.interpolate(p, size=x.shape[-2:], mode="nearest")


def test_a_grid_upsampled_by_nearest_neighbours_is_refused():
    net = nn.Sequential(conv(3, 4), NearestGrid(), conv(4, 2)).double()
    with pytest.raises(tilefn.UnsupportedLayerError, match="NearestGrid.*mode='nearest'"):
        tilefn.streamify(net, 32)[0](torch.randn(1, 3, 64, 64, dtype=torch.float64))


def test_pyramid_pooling_on_a_mostly_constant_image_is_exact():
    """Background crops (constant input) share one computation in translation-equivariant
    passes; the bins' backward weighs every position by the bins that hold it (it depends on
    the place), so its pass computes every crop. Output and every gradient exact."""
    torch.manual_seed(0)
    net = _net(True).double()
    x = torch.zeros(1, 3, 200, 184, dtype=torch.float64)
    x[:, :, 30:80, 50:110] = torch.randn(1, 3, 50, 60, dtype=torch.float64)
    ref = copy.deepcopy(net)
    xr = x.clone().requires_grad_()
    y = ref(xr)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    backbone, _ = tilefn.streamify(net, 48)
    out = backbone(x)  # the input needs no gradient: the passes may share constant crops
    (out * g).sum().backward()
    torch.testing.assert_close(out, y, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    # No pass shares a crop here: the interpolated grid and the bins' weights both depend on
    # the place (with sharing, the bins' pass gave a wrong gradient of 0.bias).
    assert backbone.last_stats["backward"].computed == backbone.last_stats["backward"].crops


class TransposedBins(nn.Module):
    def forward(self, x):
        p = F.adaptive_avg_pool2d(x.transpose(2, 3), 2)
        return x + p.mean()


def test_bins_of_a_map_not_laid_out_as_n_c_spatial_are_refused():
    net = nn.Sequential(conv(3, 4), TransposedBins(), conv(4, 2)).double()
    with pytest.raises(tilefn.UnsupportedLayerError, match="TransposedBins.*pools to bins"):
        tilefn.streamify(net, 32)[0](torch.randn(1, 3, 64, 64, dtype=torch.float64))
