"""Staged streaming: whole-image ops (squeeze-excitation, image pooling, GroupNorm,
InstanceNorm, BatchNorm with batch statistics) streamed exactly, against the plain model in
float64: output, every parameter gradient, the input gradient and the buffers, with every
convolution seeing at most ``tile_size`` pixels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilefn
from tilefn._staged import StagedPlan


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, mid: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class ImagePool(nn.Module):
    """DeepLab's image-pooling branch: pool, 1x1 conv, upsample back, concatenate."""

    def __init__(self, c: int, out: int = 4, mode: str = "bilinear"):
        super().__init__()
        self.conv, self.mode = nn.Conv2d(c, out, 1), mode

    def forward(self, x):
        p = F.relu(self.conv(F.adaptive_avg_pool2d(x, (1, 1))))
        up = F.interpolate(p, size=x.shape[-2:], mode=self.mode)
        return torch.cat([x, up], dim=1)


class Centre(nn.Module):
    """x - mean + a small multiple of the sum, as tensor methods, and a statistic that gates."""

    def forward(self, x):
        m = x.mean((2, 3), keepdim=True)
        s = torch.sum(x, dim=(-2, -1), keepdim=True)
        g = torch.tanh(x.mean(dim=(1, 2, 3)))  # over channels too: one value per sample
        return (x - m + 1e-3 * s) * g[:, None, None, None]


class SpatialSum(nn.Module):
    def forward(self, x):
        return x.sum(dim=(-2, -1), keepdim=True) * x


def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def max_conv_input(model: nn.Module, run) -> list[tuple[int, ...]]:
    """The spatial inputs the convolutions of ``model`` computed on while ``run()`` ran (the
    recordings on meta tensors, which compute nothing, left out)."""
    seen: list[tuple[int, ...]] = []

    def hook(module, args):
        if args[0].device.type != "meta":
            seen.append(tuple(args[0].shape[2:]))

    hooks = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def check_exact(net: nn.Module, shape, tile: int, rtol: float = 1e-9, **options) -> StagedPlan:
    """Streamed forward and loss.backward() against the plain model (a deep copy), in
    float64; returns the staged plan."""
    torch.manual_seed(0)
    net = net.double()
    ref = copy.deepcopy(net)
    x = torch.randn(*shape, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    y = ref(xr)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    backbone, _ = tilefn.streamify(net, tile, saliency=True, **options)
    xs = x.clone().requires_grad_()

    def step():
        out = backbone(xs)
        (out * g).sum().backward()
        return out

    outs: list[torch.Tensor] = []
    sizes = max_conv_input(net, lambda: outs.append(step()))
    assert sizes and max(max(s) for s in sizes) <= tile, f"a convolution saw {max(sizes)}"

    def close(a, b, what):
        scale = b.abs().max().clamp_min(1e-300)
        err = ((a - b).abs().max() / scale).item()
        assert err <= rtol, f"{what}: relative error {err:.2e}"

    close(outs[0], y, "output")
    close(xs.grad, xr.grad, "input gradient")
    # Gradients of parameters that are zero in exact arithmetic (a bias before a norm) are
    # rounding on both sides: compare every gradient on the scale of the largest.
    gmax = max(p.grad.abs().max() for p in ref.parameters() if p.grad is not None)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        if q.grad is None:  # a parameter the forward does not use (smp's unused encoder stages)
            assert p.grad is None or not p.grad.any(), f"gradient of unused {name}"
            continue
        err = ((p.grad - q.grad).abs().max() / gmax).item()
        assert err <= rtol, f"gradient of {name}: error {err:.2e} of the largest gradient"
    for (name, a), b in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"buffer {name}")
    plan = backbone.plan(shape)
    assert isinstance(plan, StagedPlan)
    return plan


SHAPE = (2, 3, 67, 61)


def test_squeeze_excitation_streams_exactly():
    net = nn.Sequential(
        conv(3, 8), nn.ReLU(), SqueezeExcite(8), conv(8, 8, 2), SqueezeExcite(8), conv(8, 5)
    )
    plan = check_exact(net, SHAPE, 32)
    assert len(plan.barriers) == 2
    assert "global average pooling in '2' (SqueezeExcite)" in str(plan)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_image_pooling_branch_streams_exactly(mode):
    net = nn.Sequential(conv(3, 8), nn.ReLU(), ImagePool(8, mode=mode), conv(12, 5, 2))
    check_exact(net, SHAPE, 32)


def test_means_and_sums_as_methods_and_functions_stream_exactly():
    check_exact(nn.Sequential(conv(3, 8), Centre(), conv(8, 4)), SHAPE, 32)
    check_exact(nn.Sequential(conv(3, 4), SpatialSum()), SHAPE, 32)


def test_a_model_that_ends_in_global_pooling_is_refused_with_the_fix():
    net = nn.Sequential(conv(3, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    backbone, _ = tilefn.streamify(net, 32)
    with pytest.raises(tilefn.UnsupportedLayerError, match="end the trunk before the final"):
        backbone(torch.randn(1, 3, 64, 64))


def test_group_norm_streams_exactly():
    net = nn.Sequential(
        conv(3, 8), nn.GroupNorm(4, 8), nn.ReLU(), conv(8, 8, 2), nn.GroupNorm(1, 8), conv(8, 5)
    )
    check_exact(net, SHAPE, 32)


def test_instance_norm_streams_exactly():
    net = nn.Sequential(
        conv(3, 8),
        nn.InstanceNorm2d(8, affine=True),
        nn.LeakyReLU(),
        conv(8, 8, 2),
        nn.InstanceNorm2d(8),
        conv(8, 5),
    )
    check_exact(net, SHAPE, 32)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_statistics_stream_exactly_and_update_running_stats(momentum):
    net = nn.Sequential(
        conv(3, 8),
        nn.BatchNorm2d(8, momentum=momentum),
        nn.ReLU(),
        conv(8, 8, 2),
        nn.BatchNorm2d(8),
        conv(8, 5),
    ).train()
    net[1].num_batches_tracked.fill_(3)  # momentum=None averages over the steps so far
    net[1].running_var.fill_(2.0)
    check_exact(net, SHAPE, 32, batchnorm="batch")  # compares the buffers too
    assert int(net[1].num_batches_tracked) == 4


def test_batchnorm_default_stays_running_statistics():
    net = nn.Sequential(conv(3, 8), nn.BatchNorm2d(8), nn.ReLU(), conv(8, 5)).double().train()
    backbone, _ = tilefn.streamify(net, 32)
    x = torch.randn(*SHAPE, dtype=torch.float64)
    plan = backbone.plan(SHAPE)
    assert not isinstance(plan, StagedPlan)
    before = net[1].running_mean.clone()
    out = backbone(x)
    torch.testing.assert_close(out, copy.deepcopy(net).eval()(x))
    assert torch.equal(net[1].running_mean, before)
    with pytest.raises(tilefn.OptionError, match="batchnorm must be 'running' or 'batch'"):
        tilefn.streamify(net, 32, batchnorm="train")


def test_batchnorm_without_running_stats_always_uses_batch_statistics():
    net = nn.Sequential(conv(3, 8), nn.BatchNorm2d(8, track_running_stats=False), conv(8, 5))
    check_exact(net.train(), SHAPE, 32)


def test_streamed_vjp_and_no_grad_forward_of_a_staged_model():
    torch.manual_seed(1)
    net = nn.Sequential(conv(3, 8), nn.GroupNorm(2, 8), SqueezeExcite(8), conv(8, 4)).double()
    x = torch.randn(*SHAPE, dtype=torch.float64, requires_grad=True)
    y = net(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *net.parameters()])
    backbone, streamed_vjp = tilefn.streamify(net, 32, saliency=True)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x.detach()), y.detach(), rtol=1e-10, atol=1e-12)
    param_grads, input_grad = streamed_vjp(x.detach(), g)
    torch.testing.assert_close(input_grad, grads[0], rtol=1e-9, atol=1e-12)
    for (name, _), ref in zip(net.named_parameters(), grads[1:]):
        torch.testing.assert_close(param_grads[name], ref, rtol=1e-9, atol=1e-12)


def test_staged_model_with_two_outputs_and_a_skip_over_the_barrier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = conv(3, 8), nn.GroupNorm(4, 8), conv(8, 8, 2)

        def forward(self, x):
            h = self.a(x)
            y = self.b(F.relu(self.norm(h)) + h)  # h jumps over the barrier
            return {"fine": h * torch.sigmoid(h.mean((2, 3), keepdim=True)), "coarse": y}

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(*SHAPE, dtype=torch.float64)
    backbone, _ = tilefn.streamify(net, 32)
    out = backbone(x)
    ref = net(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-10, atol=1e-12)
    loss = sum((v * v).sum() for v in out.values())
    loss.backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ref = net(x)
    sum((v * v).sum() for v in ref.values()).backward()
    for a, (name, p) in zip(got, net.named_parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12, msg=name)


class AmaxGate(nn.Module):
    """CBAM's channel attention: a gate from the mean and the maximum over all positions."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        avg, top = x.mean((2, 3), keepdim=True), torch.amax(x, dim=(-2, -1), keepdim=True)
        return x * torch.sigmoid(self.fc(avg) + self.fc(top))


def test_global_amax_streams_exactly_with_ties():
    torch.manual_seed(0)
    first = conv(3, 8)
    with torch.no_grad():  # channel 0 is zero everywhere: every position ties for its max
        first.weight[0] = 0.0
        first.bias[0] = 0.0
    net = nn.Sequential(first, AmaxGate(8), conv(8, 4, 2), nn.ReLU(), AmaxGate(4))
    plan = check_exact(net, SHAPE, 32)
    assert [b.kind for b in plan.barriers] == ["mean", "max", "mean", "max"]
    assert "maximum over all positions" in str(plan)
    # The tie is real: the first conv's channel-0 weights get the max's gradient shared
    # among all positions, exactly as plain amax shares it.
    assert net[0].weight.grad[0].abs().max() > 0


def test_global_max_pooling_is_still_refused():
    class MaxGate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(F.adaptive_max_pool2d(x, 1))

    net = nn.Sequential(conv(3, 4), MaxGate())
    backbone, _ = tilefn.streamify(net, 32)
    with pytest.raises(tilefn.UnsupportedLayerError, match="'1' \\(MaxGate\\)"):
        backbone(torch.randn(1, 3, 64, 64))


def test_float32_staged_forward_and_backward_are_close():
    torch.manual_seed(0)
    net = nn.Sequential(conv(3, 8), nn.GroupNorm(4, 8), nn.ReLU(), SqueezeExcite(8), conv(8, 4))
    x = torch.randn(1, 3, 96, 80)
    y = net(x)
    y.square().sum().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    backbone, _ = tilefn.streamify(net, 48)
    out = backbone(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-5)
    for a, p in zip(ref, net.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-3, atol=1e-4)


def _tv(name: str):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


def _monai(name: str, **kw):
    def build():
        nets = pytest.importorskip("monai.networks.nets")
        return getattr(nets, name)(spatial_dims=2, in_channels=3, out_channels=2, **kw)

    return build


# (builder, input shape, tile): each at its minimum tile on an image a little larger, so that
# every stage runs 2 x 2 crops. Float64 step times against plain, 2 threads: mobilenet_v3_small
# 21.6 s vs 0.93 s, regnet_y_400mf 93 s vs 3.1 s, efficientnet_b0 260 s vs 13.8 s,
# resnet18 with batch statistics 237 s vs 7.3 s; the MONAI networks take seconds.
LIBRARY = {
    "mobilenet_v3_small": (lambda: _tv("mobilenet_v3_small")().features, (1, 3, 704, 672), 640),
    "regnet_y_400mf": (lambda: _tv("regnet_y_400mf")().trunk_output, (1, 32, 352, 320), 288),
    "efficientnet_b0": (lambda: _tv("efficientnet_b0")().features, (1, 3, 960, 928), 896),
    "monai_unet": (_monai("UNet", channels=(8, 16, 32), strides=(2, 2)), (1, 3, 128, 96), 64),
    "monai_basicunet": (
        _monai("BasicUNet", features=(8, 8, 16, 16, 32, 8)),
        (1, 3, 288, 256),
        224,
    ),
    "monai_dynunet": (
        _monai(
            "DynUNet",
            kernel_size=[3, 3, 3],
            strides=[1, 2, 2],
            upsample_kernel_size=[2, 2],
            filters=[8, 16, 32],
        ),
        (1, 3, 128, 96),
        64,
    ),
    "monai_attentionunet": (
        _monai("AttentionUnet", channels=(8, 16, 32), strides=(2, 2)),
        (1, 3, 128, 96),
        64,
    ),
    "monai_segresnet": (
        _monai("SegResNet", init_filters=8, blocks_down=(1, 2), blocks_up=(1,)),
        (1, 3, 128, 96),
        64,
    ),
}
FAST = {"monai_unet", "monai_dynunet", "monai_attentionunet", "monai_segresnet"}


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in LIBRARY],
)
def test_library_networks_with_whole_image_ops_stream_exactly(name):
    build, shape, tile = LIBRARY[name]
    check_exact(build().eval(), shape, tile, rtol=1e-8)


@pytest.mark.slow
def test_resnet18_with_batch_statistics_streams_exactly():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    trunk = nn.Sequential(*list(model.children())[:-2]).train()
    plan = check_exact(trunk, (2, 3, 512, 480), 448, rtol=1e-8, batchnorm="batch")
    assert len(plan.barriers) == 20


def test_timm_squeeze_excitation_and_group_norm_layers_stream_exactly():
    """timm's own blocks, as its EfficientNets, RegNetYs and GroupNorm models use them."""
    timm_layers = pytest.importorskip("timm.layers")
    from timm.models._efficientnet_blocks import SqueezeExcite as EffSE

    net = nn.Sequential(
        conv(3, 8),
        timm_layers.GroupNormAct(8, num_groups=4),
        timm_layers.SEModule(8, rd_ratio=0.5),
        conv(8, 8, 2),
        EffSE(8, rd_ratio=0.5),
        timm_layers.EffectiveSEModule(8),
        timm_layers.GroupNorm1(8),
        conv(8, 4),
    )
    plan = check_exact(net, SHAPE, 32)
    assert len(plan.barriers) == 5


def test_timm_channel_attention_layers_stream_exactly():
    """timm's other global-context channel attention: ECA and CECA (a 1-d convolution over
    the pooled channels), selective kernels and split attention (the mean of a sum of
    branches), gather-excite with a global extent (``keepdims=True``, numpy's spelling),
    CBAM and light CBAM (a mean and an amax over positions)."""
    timm_layers = pytest.importorskip("timm.layers")
    from timm.layers import cbam

    net = nn.Sequential(
        conv(3, 16),
        timm_layers.EcaModule(16),
        timm_layers.CecaModule(16),
        timm_layers.SelectiveKernel(16, 16),
        conv(16, 16, 2),
        timm_layers.SplitAttn(16, 16),
        timm_layers.GatherExcite(16, extent=0, use_mlp=False),
        cbam.CbamModule(16),
        cbam.LightCbamModule(16),
        conv(16, 4),
    ).eval()
    plan = check_exact(net, SHAPE, 48)
    assert len(plan.barriers) == 9
    # CBAM's mean and amax read one map: one pass each for CBAM and light CBAM.
    assert len(plan.stages) == 1 + 9 - 2


class _NumpyNames(nn.Module):
    """Means and sums spelled with numpy's keyword names, which torch accepts."""

    def forward(self, x):
        gate = torch.sigmoid(x.mean(axis=(2, 3), keepdims=True))
        return x * gate + torch.sum(x, axis=[-1, -2], keepdims=True) / 4087


def test_numpy_spelled_reductions_keep_their_dims():
    net = nn.Sequential(conv(3, 8), _NumpyNames(), conv(8, 4, 2))
    plan = check_exact(net, SHAPE, 32)
    assert [b.kind for b in plan.barriers] == ["mean", "sum"]


class _SizeScaled(nn.Module):
    """A whole-image sum divided by the number of positions read from the tensor: on a crop
    that is the crop's size, not the image's."""

    def forward(self, x):
        return x + torch.sum(x, (2, 3), keepdim=True) / x[0, 0].numel()


def test_a_statistic_scaled_by_the_crop_size_is_refused():
    net = nn.Sequential(conv(3, 8), _SizeScaled(), conv(8, 4, 2)).double()
    backbone, _ = tilefn.streamify(net, 32)
    with pytest.raises(tilefn.PlanError, match=r"aten.div.Tensor in layer '1' \(_SizeScaled\)"):
        backbone(torch.randn(*SHAPE, dtype=torch.float64))


def check_func_grad(net: nn.Module, shape=(1, 3, 64, 56), tile: int = 32) -> None:
    """``torch.func.grad`` through ``functional_call`` of the backbone equals the plain
    model's, in float64."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    net = net.double()
    x = torch.randn(*shape, dtype=torch.float64)
    backbone, _ = tilefn.streamify(net, tile)
    params = {n: p.detach().clone() * 1.1 for n, p in net.named_parameters()}

    def loss(p, model):
        return functional_call(model, p, (x,)).square().sum()

    expected = grad(loss)(params, net)
    got = grad(loss)(params, backbone)
    for name in params:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)


def test_staged_model_under_functional_call_and_torch_func_grad():
    check_func_grad(nn.Sequential(conv(3, 8), nn.GroupNorm(2, 8), SqueezeExcite(8), conv(8, 4)))


def check_float32(net: nn.Module, shape=(1, 3, 96, 80), tile: int = 48) -> None:
    """Float32 forward and input gradient close to the plain model's (rtol 1e-4)."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    backbone, _ = tilefn.streamify(net, tile)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(backbone(xs), net(xr), rtol=1e-4, atol=1e-5)
    backbone(xs).square().sum().backward()
    net(xr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5)


class _Spread(nn.Module):
    """Variances and standard deviations over all positions, in the spellings torch offers."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, x):
        b, c = x.shape[:2]
        if self.spelling == "var":  # an instance norm by hand, unbiased
            m = x.mean((2, 3), keepdim=True)
            return (x - m) / (x.var((2, 3), keepdim=True) + 1e-5).sqrt()
        if self.spelling == "std":
            return x / (1 + torch.std(x, dim=(-2, -1), keepdim=True, unbiased=False))
        if self.spelling == "std_mean":
            sd, m = torch.std_mean(x, dim=(2, 3), keepdim=True, correction=0)
            return (x - m) / (sd + 1e-3)
        v, m = torch.var_mean(x.view(b, c, -1), dim=-1)  # of a flattened map
        return x * torch.sigmoid(v - m)[:, :, None, None]


@pytest.mark.parametrize("spelling", ["var", "std", "std_mean", "var_mean"])
def test_variances_over_all_positions_stream_exactly(spelling):
    net = nn.Sequential(conv(3, 8), _Spread(spelling), conv(8, 8, 2), _Spread(spelling))
    plan = check_exact(net, SHAPE, 32)
    # A mean and a variance of one map share one pass.
    assert len(plan.stages) == 3


class _Repeated(nn.Module):
    def forward(self, x):
        h, w = x.shape[-2:]
        return torch.cat([x, x.mean((2, 3), keepdim=True).repeat(1, 1, h, w)], 1)


def test_a_pooled_summary_repeated_to_the_map_size_streams_exactly():
    check_exact(nn.Sequential(conv(3, 4), _Repeated(), conv(8, 4)), SHAPE, 32)


class _RowMean(nn.Module):
    def forward(self, x):
        return x - x.mean(-1, keepdim=True)


def test_a_mean_along_rows_only_is_refused_with_the_fix():
    net = nn.Sequential(conv(3, 4), _RowMean(), conv(4, 4)).double()
    with pytest.raises(tilefn.UnsupportedLayerError, match=r"some of the spatial dims.*x.mean"):
        tilefn.streamify(net, 32)[0](torch.randn(*SHAPE, dtype=torch.float64))


class _MeanAndMax(nn.Module):
    def forward(self, x):
        return x - x.mean((2, 3), keepdim=True) + x.amax((2, 3), keepdim=True)


def test_the_stated_minimum_tile_of_a_staged_model_covers_every_stage():
    """Each stage streams with its own receptive field (here the pass up to the gate needs a
    taller tile than 8 and the whole model a wider one): the minimum the error states is the
    largest of theirs, and it streams."""
    net = nn.Sequential(
        nn.Upsample(scale_factor=2.0, mode="nearest"),
        nn.Conv2d(1, 1, 1, stride=(2, 1), bias=False),
        nn.Upsample(scale_factor=2.0, mode="bilinear"),
        nn.AvgPool2d((1, 1), (3, 2)),
        nn.AvgPool2d((4, 1), 1),
        _MeanAndMax(),  # two barriers on one map: one shared pass
        nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False),
    ).double()
    x = torch.randn(1, 1, 20, 20, dtype=torch.float64)
    with pytest.raises(tilefn.TileSizeError, match=r"staged passes.*tile_size >= \(11, 3\)"):
        tilefn.streamify(net, 8)[0](x)
    backbone, _ = tilefn.streamify(net, (11, 3))
    torch.testing.assert_close(backbone(x), net(x), rtol=1e-12, atol=1e-12)
