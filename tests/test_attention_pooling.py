"""Whole-image statistics of flattened maps, softmax attention pooling (GCNet's global context)
and matrix products that sum over positions: streamed exactly, against the plain model in
float64, every convolution on at most tile_size pixels (``check_exact``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_staged import SHAPE, check_exact, check_float32, check_func_grad, conv
from torch import nn

import tilefn


class FlatSE(nn.Module):
    """Squeeze-excitation as hand-written code often spells it: the mean of a flattened map."""

    def __init__(self, c: int, spelling: str):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.spelling = spelling

    def forward(self, x):
        b, c = x.shape[:2]
        if self.spelling == "view":
            s = x.view(b, c, -1).mean(-1)
        elif self.spelling == "flatten":
            s = torch.flatten(x, 2).sum(dim=2) / 100.0
        elif self.spelling == "reshape-all":  # over channels and positions: one per sample
            s = x.reshape(b, -1).mean(1, keepdim=True).expand(b, c)
        else:  # einops
            einops = pytest.importorskip("einops")
            s = einops.rearrange(x, "b c h w -> b c (h w)").amax(-1)
        return x * torch.sigmoid(self.fc(s)).view(b, c, 1, 1)


class AttentionPool(nn.Module):
    """GCNet's context modelling written with bmm and a transposed softmax: a 1x1 conv scores
    every position, the softmax over all positions weights the map's sum."""

    def __init__(self, c: int):
        super().__init__()
        self.score = nn.Conv2d(c, 1, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        weights = F.softmax(self.score(x).flatten(1), dim=1)  # (b, h * w)
        context = torch.bmm(x.flatten(2), weights.unsqueeze(1).transpose(1, 2))  # (b, c, 1)
        return x + self.out(context.unsqueeze(-1))


class LogSoftmaxGate(nn.Module):
    """A log-softmax over positions and a log-sum-exp per channel."""

    def forward(self, x):
        b, c, h, w = x.shape
        logp = torch.log_softmax(x.reshape(b, c, h * w), -1).reshape(b, c, h, w)
        lse = torch.logsumexp(x.flatten(2), dim=-1, keepdim=True).unsqueeze(-1)
        return torch.tanh(logp + 0.01 * lse)


@pytest.mark.parametrize("spelling", ["view", "flatten", "reshape-all", "einops"])
def test_statistics_of_flattened_maps_stream_exactly(spelling):
    net = nn.Sequential(conv(3, 8), FlatSE(8, spelling), conv(8, 8, 2), FlatSE(8, spelling))
    plan = check_exact(net, SHAPE, 32)
    assert len(plan.barriers) == 2
    assert plan.barriers[0].unmerge is not None


def test_timm_global_context_streams_exactly():
    """timm's GlobalContext (GCNet) with its attention pooling: conv scores reshaped to
    (B, 1, H*W), softmax over them, the map's matmul with the weights; fused scale and add."""
    layers = pytest.importorskip("timm.layers")
    net = nn.Sequential(
        conv(3, 32),
        layers.GlobalContext(32, fuse_add=True, fuse_scale=True),
        conv(32, 16, 2),
        layers.GlobalContext(16, use_attn=False),
        conv(16, 4),
    )
    plan = check_exact(net, SHAPE, 32)
    kinds = [b.kind for b in plan.barriers]
    assert kinds == ["softmax", "contract", "mean"], kinds
    assert "softmax over all positions" in str(plan)


def test_attention_pooling_with_bmm_and_log_softmax_stream_exactly():
    net = nn.Sequential(conv(3, 8), AttentionPool(8), conv(8, 8, 2), LogSoftmaxGate(), conv(8, 4))
    plan = check_exact(net, SHAPE, 32)
    assert [b.kind for b in plan.barriers] == ["softmax", "contract", "log_softmax", "logsumexp"]


class Softmax1d(nn.Module):
    def forward(self, x):
        return x * x.softmax(-1) * 300.0


def test_softmax_over_the_positions_of_a_signal_streams_exactly():
    net = nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2), Softmax1d(), nn.Conv1d(8, 4, 3, stride=2, padding=1)
    )
    check_exact(net, (2, 3, 301), 64)


def test_global_context_in_float32_and_under_torch_func_grad():
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    check_float32(nn.Sequential(conv(3, 16), layers.GlobalContext(16, fuse_add=True), conv(16, 4)))
    check_func_grad(nn.Sequential(conv(3, 16), layers.GlobalContext(16), conv(16, 4)))


class NonLocal(nn.Module):
    """Self-attention over positions: every position attends to every other."""

    def __init__(self, c: int):
        super().__init__()
        self.q, self.k = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)  # (b, hw, c)
        k = self.k(x).flatten(2)  # (b, c, hw)
        attn = torch.softmax(q @ k, dim=-1)  # (b, hw, hw)
        return (x.flatten(2) @ attn.transpose(1, 2)).view(b, c, h, w)


class RowSoftmax(nn.Module):
    def forward(self, x):
        return x.softmax(-1)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (NonLocal(8), "'1' \\(NonLocal\\)"),
        (RowSoftmax(), "'1' \\(RowSoftmax\\).*softmax/cumsum over positions"),
    ],
)
def test_attention_over_positions_and_a_softmax_along_one_axis_stay_refused(layer, match):
    net = nn.Sequential(conv(3, 8), layer, conv(8, 4)).double()
    with pytest.raises(tilefn.UnsupportedLayerError, match=match):
        tilefn.streamify(net, 32)[0](torch.randn(1, 3, 64, 64, dtype=torch.float64))


def test_a_position_weighted_sum_with_a_weight_per_pixel_is_refused():
    """A matmul of the positions with a parameter of the image's size depends on the size."""

    class PerPixel(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64 * 64, 1))

        def forward(self, x):
            return x + (x.flatten(2) @ self.w).unsqueeze(-1) / 4096

    net = nn.Sequential(conv(3, 8), PerPixel(), conv(8, 4)).double()
    with pytest.raises(tilefn.UnsupportedLayerError, match="PerPixel"):
        tilefn.streamify(net, 32)[0](torch.randn(1, 3, 64, 64, dtype=torch.float64))


class _LastFeature(nn.Module):
    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x):
        return self.features(x)[-1]


def test_timm_gcresnext_streams_exactly():
    """A real network with global-context blocks: timm's gcresnext26ts (its third stage)."""
    timm = pytest.importorskip("timm")
    net = timm.create_model("gcresnext26ts", pretrained=False, features_only=True, out_indices=(2,))
    plan = check_exact(_LastFeature(net).eval(), (1, 3, 192, 160), 128)
    assert [b.kind for b in plan.barriers].count("softmax") == 4


class EinsumPool(nn.Module):
    """Attention pooling and a channel Gram matrix written with einsum."""

    def __init__(self, c: int, spelling: str):
        super().__init__()
        self.score, self.out = nn.Conv2d(c, 1, 1), nn.Conv2d(c, c, 1)
        self.spelling = spelling

    def forward(self, x):
        b, c, h, w = x.shape
        if self.spelling == "flattened":
            weights = self.score(x).flatten(1).softmax(-1)
            context = torch.einsum("bcn,bn->bc", x.flatten(2), weights)
        elif self.spelling == "spatial":
            weights = self.score(x).flatten(1).softmax(-1).view(b, h, w)
            context = torch.einsum("b c h w, b h w -> b c", x, weights)
        else:  # style statistics: the Gram matrix of the channels over positions
            f = x.flatten(2)
            context = torch.einsum("bcn,bdn->bcd", f, f).mean(-1) / 1000.0
        return x + self.out(context[:, :, None, None])


@pytest.mark.parametrize("spelling", ["flattened", "spatial", "gram"])
def test_einsum_contractions_over_positions_stream_exactly(spelling):
    net = nn.Sequential(conv(3, 8), EinsumPool(8, spelling), conv(8, 4))
    plan = check_exact(net, SHAPE, 32)
    assert plan.barriers[-1].kind == "contract"


class EinsumAttention(nn.Module):
    def forward(self, x):
        b, c, h, w = x.shape
        f = x.flatten(2)
        attn = torch.einsum("bcn,bcm->bnm", f, f).softmax(-1)
        return torch.einsum("bcm,bnm->bcn", f, attn).view(b, c, h, w)


def test_attention_written_with_einsum_stays_refused():
    net = nn.Sequential(conv(3, 8), EinsumAttention(), conv(8, 4)).double()
    with pytest.raises(tilefn.UnsupportedLayerError, match="EinsumAttention"):
        tilefn.streamify(net, 32)[0](torch.randn(1, 3, 64, 64, dtype=torch.float64))


class SignalPool(nn.Module):
    def forward(self, x):
        weights = torch.softmax(x[:, :1], -1)  # (b, 1, positions)
        return x + torch.bmm(x, weights.transpose(1, 2))  # + (b, c, 1)


@pytest.mark.parametrize("shape,tile", [((1, 1, 25), 4), ((2, 3, 41), 8)])
def test_a_matmul_over_the_positions_of_a_signal_streams(shape, tile):
    """The 1-d chain softmax over positions then bmm summing over them (no flattening, so no
    unmerged view): exact, gradients included."""
    c = shape[1]
    check_exact(nn.Sequential(nn.Conv1d(c, c, 1), SignalPool(), nn.Conv1d(c, c, 3)), shape, tile)


class SignalContext(nn.Module):
    """A 1-d signal plus its softmax-weighted sum (one channel): on a crop one position long,
    autograd hands the statistic's gradient back as the cotangent crop itself."""

    def forward(self, x):
        weights = torch.softmax(x.mean(1), dim=-1)  # (b, positions)
        return x + torch.bmm(x, weights.unsqueeze(-1))


def test_the_cotangent_is_left_unchanged():
    """streamed_vjp and the autograd path read the cotangent and never write into it (they
    once accumulated a statistic's gradient into the cotangent crop autograd returned as
    that gradient, changing the caller's tensor and so any gradient computed from it later)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 1, 1), SignalContext()).double()
    x = torch.randn(1, 1, 21, dtype=torch.float64)
    cot = torch.randn(1, 1, 21, dtype=torch.float64)
    kept = cot.clone()
    streamed = tilefn.streamify(net, 4, saliency=True)
    streamed.vjp(x, cot)
    assert torch.equal(cot, kept)

    seen: list[torch.Tensor] = []
    copies: list[torch.Tensor] = []

    def keep(g):
        seen.append(g)
        copies.append(g.clone())

    out = streamed.backbone(x.clone().requires_grad_())
    out.register_hook(keep)
    (out * cot).sum().backward()
    assert torch.equal(seen[0], copies[0])


@pytest.mark.parametrize("shape", [(1, 1, 21, 9), (1, 1, 9, 21), (2, 1, 21, 5)])
def test_attention_pooling_with_crops_one_position_long(shape):
    """Crops one position long in a dim (an image one longer than a multiple of the tile):
    flattening a crop with H = 1 gives the layout the whole image has ((H, W) merged), so the
    positions' weights and the map line up (the recording once refused the product there)."""
    check_exact(nn.Sequential(nn.Conv2d(1, 1, 1), SignalContext2d()), shape, 4)


class SignalContext2d(nn.Module):
    def forward(self, x):
        b, c = x.shape[:2]
        weights = torch.softmax(x.mean(1).flatten(1), dim=-1)  # (b, positions)
        context = torch.bmm(x.flatten(2), weights.unsqueeze(-1))  # (b, c, 1)
        return x + context.view(b, c, 1, 1)
