"""Custom models with tilefn: split, stream, and check every claim against the plain model.

Each section makes one claim about streaming a kind of model and checks it on a small input
in float64, where "exact" can be told apart from "close": the streamed output, every
parameter gradient and the input gradient are compared with plain PyTorch, and the largest
relative errors are printed (they are at the level of float64 rounding, ~1e-16).

  a  split: cut torchvision classifiers into a streamable trunk and a global head with
     ``tilefn.split``, and cut your own model by hand.
  b  ConvNeXt in train mode: stochastic depth and layer scale stay on, and stream exactly.
  c  BatchNorm: inside the trunk it runs on its running statistics; weight and bias still
     get exact gradients; with ``batchnorm="batch"``, exact batch statistics instead.
  d  A U-Net with a per-pixel segmentation head: a dense output, streamed exactly.
  e  Refusals: what tilefn says about layers that cannot be streamed.
  f  Whole-image statistics (GroupNorm, squeeze-excitation, InstanceNorm): staged
     streaming, exact.

No subclassing, no hooks, no callbacks: the model stays a plain ``nn.Module``, and
``tilefn.streamify`` wraps the part that sees the whole image in pieces.

Run::

    python examples/custom_models.py              # every section, a minute or two on CPU
    python examples/custom_models.py --section b  # one section (repeat the flag for more)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import textwrap
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig

import tilefn
import tilefn.testing

TOLERANCE = 1e-9  # relative, float64


# --------------------------------------------------------------------------------------
# The check every section uses: streamed vs plain, output and all gradients.
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """Run BatchNorm layers on their running statistics for a while (what tilefn does)."""
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    for m in bns:
        m.eval()
    try:
        yield
    finally:
        for m in bns:
            m.train()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def compare(model: nn.Module, x: torch.Tensor, tile: int, *, seed: int = 0) -> dict[str, float]:
    """Stream ``model`` over ``x`` with tiles of ``tile`` px and run it plain; print and
    assert the largest relative errors of the output, the parameter gradients and the input
    gradient. Both runs start from the same RNG seed; the plain run uses BatchNorm's running
    statistics, as the streamed trunk does. Returns the error of every compared tensor."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    x_ref = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with batchnorm_eval(model):  # backward too: checkpointed layers recompute in it
        out_ref = model(x_ref)
        cot = torch.randn(
            out_ref.shape, dtype=out_ref.dtype, generator=torch.Generator().manual_seed(1)
        )
        ref_grads = torch.autograd.grad(out_ref, [*params.values(), x_ref], cot)

    backbone, _ = tilefn.streamify(model, tile)
    plan = backbone.plan(x.shape)
    x_s = x.clone().requires_grad_(True)
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    out = backbone(x_s)
    (out * cot).sum().backward()  # any loss; a random linear one checks every output element

    errors = {"output": rel_error(out.detach(), out_ref.detach())}
    errors.update({n: rel_error(p.grad, g) for (n, p), g in zip(params.items(), ref_grads)})
    errors["input grad"] = rel_error(x_s.grad, ref_grads[-1])
    for p in params.values():
        p.grad = None
    worst_param = max((e for n, e in errors.items() if n in params), default=0.0)
    print(
        f"  streamed vs plain: float64 input {tuple(x.shape)}, tile {tile}, "
        f"{plan.n_tiles} tiles (overlap {plan.overlap:.2f})"
    )
    rows = {
        "output": errors["output"],
        f"{len(params)} param grads": worst_param,
        "input grad": errors["input grad"],
    }
    for what, err in rows.items():
        print(f"    {what:<18} max rel. error {err:.1e}")
    bad = {n: e for n, e in errors.items() if not e < TOLERANCE}
    assert not bad, f"streamed result differs from the plain model: {bad}"
    return errors


def show_error(e: Exception) -> None:
    """Print an exception's type and message, wrapped."""
    print(f"  -> {type(e).__name__}:")
    for para in str(e).split("\n"):
        print(textwrap.fill(para, 96, initial_indent="     ", subsequent_indent="     "))


def n_params(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"


# --------------------------------------------------------------------------------------
# (a) Splitting networks into trunk and head.
# --------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    """A classifier as people write them: conv stages, then global max pooling in forward."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU())
        self.stages = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=2, dilation=2),
            nn.GELU(),
        )
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.amax(x, dim=(2, 3)))  # global: needs every position


def section_split() -> None:
    print(
        "tilefn.split(model) -> (trunk, head): the trunk holds every local layer and is\n"
        "streamed; the head (global pooling, flatten, classifier) runs on the small stitched\n"
        "feature map. Both share the model's modules, so head(trunk(x)) is model(x).\n"
        "Checked bit for bit on a 64x64 input (float32: VGG's classifier alone has 120M\n"
        "parameters); the plan of each trunk gives its smallest possible tile."
    )
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    print(f"  {'model':<14} {'trunk':>7} {'head':>7}  head(trunk(x)) == model(x)  min tile")
    for name in ["resnet18", "convnext_tiny", "vgg11_bn", "densenet121", "mobilenet_v2"]:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        trunk, head = tilefn.split(model)
        with torch.no_grad():
            same = torch.equal(head(trunk(x)), model(x))
        assert same, name
        min_tile = tilefn.plan(trunk, (1, 3, 4096, 4096), 4096).min_tile_size
        print(
            f"  {name:<14} {n_params(trunk):>7} {n_params(head):>7}  {str(same):<26}  "
            f"{min_tile[0]} px"
        )
    model = torchvision.models.resnet18(weights=None)
    trunk, head = tilefn.split(model, num_classes=2)
    print(f"  split(resnet18, num_classes=2): head {list(head)}")

    print("\nYour own model: split() refuses what it does not know, and says how to do it by hand:")
    net = SmallNet().double().eval()
    try:
        tilefn.split(net)
    except tilefn.InputTypeError as e:
        print(f"  -> InputTypeError: {str(e).splitlines()[0]}")
    trunk = nn.Sequential(OrderedDict(stem=net.stem, stages=net.stages))
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1), net.fc)
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(head(trunk(x)), net(x))
    print("  trunk = nn.Sequential(OrderedDict(stem=net.stem, stages=net.stages))")
    print("  head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1), net.fc)")
    print("  head(trunk(x)) == net(x): True")
    compare(trunk, x, tile=48)


# --------------------------------------------------------------------------------------
# (b) ConvNeXt in train mode: stochastic depth and layer scale stay on.
# --------------------------------------------------------------------------------------


def small_convnext() -> nn.Module:
    """A torchvision ConvNeXt with two small stages: the blocks of convnext_tiny (7x7
    depthwise conv, LayerNorm, MLP, layer scale, stochastic depth), but a receptive field
    of ~150 px instead of ~1700, so that a float64 check runs in seconds."""
    torch.manual_seed(0)
    model = torchvision.models.ConvNeXt(
        [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.5
    )
    with torch.no_grad():  # layer scales start at 1e-6; give them the size of trained ones
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.5, 1.5)
    return model.double()


def section_convnext_train() -> None:
    print(
        "ConvNeXt in train mode: nothing is switched off. Stochastic depth drops whole residual\n"
        "branches per sample at random; tilefn records the RNG state and replays it for every\n"
        "crop, so each tile sees the same draws as the plain model under the same seed. Layer\n"
        "scale is a per-channel parameter and gets its exact gradient."
    )
    model = small_convnext().train()
    trunk, head = tilefn.split(model, num_classes=2)
    depth = [m.p for m in trunk.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    print(f"  stochastic depth probabilities in the trunk: {[round(p, 3) for p in depth]}")
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            outs.append(trunk(x))
        trunk.eval()
        eval_out = trunk(x)
        trunk.train()
    print(
        f"  plain train-mode outputs, seed 0 vs seed 1: max |diff| "
        f"{(outs[0] - outs[1]).abs().max().item():.2f}; seed 0 vs eval mode: "
        f"{(outs[0] - eval_out).abs().max().item():.2f} (branches are dropped)"
    )
    errors = compare(trunk, x, tile=192, seed=0)
    scale_err = max(e for n, e in errors.items() if n.endswith("layer_scale"))
    print(f"    {'layer_scale grads':<18} max rel. error {scale_err:.1e}")
    # A full training step: streamed trunk, plain head.
    backbone, _ = tilefn.streamify(trunk, 192)
    loss = F.cross_entropy(head(backbone(x)), torch.tensor([0, 1]))
    loss.backward()
    print(
        f"  one training step: loss {loss.item():.4f}, every trunk parameter has a gradient: "
        f"{all(p.grad is not None for p in trunk.parameters())}"
    )


# --------------------------------------------------------------------------------------
# (c) BatchNorm: running statistics inside the trunk.
# --------------------------------------------------------------------------------------


def section_batchnorm() -> None:
    print(
        "BatchNorm in train mode normalises with the mean and variance of the whole batch,\n"
        "i.e. of every pixel of the image: no tile can know them. By default, inside the\n"
        "streamed trunk tilefn runs BatchNorm on its running statistics (eval semantics),\n"
        "even after model.train(), and leaves those statistics untouched. BatchNorm's weight\n"
        "and bias stay trainable and get exact gradients. So the plain model to compare with\n"
        "is the one with BatchNorm in eval mode. Start from pretrained statistics (or estimate\n"
        "them with plain forward passes on downscaled images) and keep them fixed."
    )
    torch.manual_seed(0)
    trunk, _ = tilefn.split(torchvision.models.resnet18(weights=None))
    trunk = trunk[:6]  # conv1 ... layer2 (stride 8): keeps the float64 check small
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # running statistics like a pretrained network's
        for m in trunk.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
    trunk.double().train()
    print(f"  trunk: resnet18 {list(dict(trunk.named_children()))}, in train mode")
    x = torch.randn(2, 3, 160, 160, dtype=torch.float64, generator=g)
    backbone, _ = tilefn.streamify(trunk, 128)
    stats = trunk.bn1.running_mean.clone()
    with torch.no_grad():
        streamed = backbone(x)
        unchanged = torch.equal(stats, trunk.bn1.running_mean)
        with batchnorm_eval(trunk):
            plain_eval = trunk(x)
        plain_train = trunk(x)  # batch statistics (and it updates the running statistics)
    print(
        f"  streamed vs plain, BatchNorm on batch statistics:   max rel. error "
        f"{rel_error(streamed, plain_train):.1e} (different, as it must be)"
    )
    print(
        f"  streamed vs plain, BatchNorm on running statistics: max rel. error "
        f"{rel_error(streamed, plain_eval):.1e}"
    )
    print(f"  running statistics unchanged by the streamed forward: {unchanged}")
    trunk.bn1.running_mean.copy_(stats)  # undo the plain train-mode forward's update
    errors = compare(trunk, x, tile=128)
    bn_err = max(e for n, e in errors.items() if "bn" in n or "downsample.1" in n)
    print(f"    {'BatchNorm grads':<18} max rel. error {bn_err:.1e} (weight and bias)")

    print(
        "  With batchnorm='batch', BatchNorm uses exact whole-image batch statistics instead\n"
        "  (staged streaming, one streamed pass up to each layer) and updates its running\n"
        "  statistics once per forward, as the plain train-mode model does:"
    )
    small = trunk[:4]  # conv1, bn1, relu, maxpool: one BatchNorm keeps this quick
    plain = copy.deepcopy(small)
    backbone, _ = tilefn.streamify(small, 128, batchnorm="batch")
    with torch.no_grad():
        streamed, expected = backbone(x), plain(x)
    print(
        f"  streamed vs plain, both on batch statistics: max rel. error "
        f"{rel_error(streamed, expected):.1e}; running_mean max |diff| "
        f"{(small.bn1.running_mean - plain.bn1.running_mean).abs().max().item():.1e}, "
        f"num_batches_tracked {int(small.bn1.num_batches_tracked)} == "
        f"{int(plain.bn1.num_batches_tracked)}"
    )
    assert rel_error(streamed, expected) < 1e-10


# --------------------------------------------------------------------------------------
# (d) A U-Net: dense, per-pixel output.
# --------------------------------------------------------------------------------------


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Three levels, skip connections, ConvTranspose2d and bilinear upsampling, and a 1x1
    convolution as the segmentation head: one logit per class and pixel."""

    def __init__(self, classes: int = 3, w: int = 8) -> None:
        super().__init__()
        self.enc1 = block(3, w)
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), block(w, 2 * w))
        self.bottom = nn.Sequential(nn.MaxPool2d(2), block(2 * w, 4 * w))
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = block(4 * w, 2 * w)
        # Upsampling streams with scale_factor= (not size=, not align_corners=True).
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = block(3 * w, w)
        self.seg_head = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.up2(self.bottom(e2)), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.seg_head(d1)


def section_unet() -> None:
    print(
        "Segmentation: every layer of a U-Net is local, the per-pixel head included, so the\n"
        "whole network is the trunk and there is no global head: streamify it as it is. The\n"
        "output is the full-resolution logit map; the loss is any per-pixel loss on it."
    )
    torch.manual_seed(0)
    unet = UNet().double().train()
    x = torch.randn(2, 3, 160, 160, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.randint(0, 3, (2, 160, 160), generator=torch.Generator().manual_seed(1))
    plan = tilefn.plan(unet, x.shape, 96)
    print(f"  min tile {plan.min_tile_size}, alignment {plan.alignment}")
    compare(unet, x, tile=96)
    backbone, _ = tilefn.streamify(unet, 96)
    logits = backbone(x)
    loss = F.cross_entropy(logits, mask)
    loss.backward()
    print(
        f"  training step: logits {tuple(logits.shape)}, per-pixel cross-entropy {loss.item():.4f}"
    )
    tilefn.testing.assert_streams_like(unet, x, 96)
    print("  tilefn.testing.assert_streams_like(unet, x, 96): passed (the one-liner for tests)")


# --------------------------------------------------------------------------------------
# (e) Refusals.
# --------------------------------------------------------------------------------------


def section_refusals() -> None:
    print(
        "A layer that needs the whole image cannot be computed tile by tile. tilefn finds it\n"
        "when it plans (on shapes only, before any compute) and raises\n"
        "tilefn.UnsupportedLayerError with the layer's path, the reason and a fix; it never\n"
        "silently computes something else."
    )
    x = torch.randn(1, 3, 128, 128)
    cases: list[tuple[str, Callable[[], object]]] = []

    class MaxGate(nn.Module):  # CBAM's channel gate from global *max* pooling: not a sum
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Conv2d(16, 16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(self.fc(F.adaptive_max_pool2d(x, 1)))

    gate = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), MaxGate(), nn.Conv2d(16, 16, 3))
    cases.append(("a global max gate", lambda: tilefn.streamify(gate, 64).backbone(x)))
    attention = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Flatten(2))
    cases.append(("flattened positions", lambda: tilefn.streamify(attention, 64).backbone(x)))
    for what, attempt in cases:
        print(f"\n  {what}:")
        try:
            attempt()
        except tilefn.UnsupportedLayerError as e:
            show_error(e)
        else:
            raise AssertionError(f"{what} was not refused")


# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# (f) Whole-image statistics: staged streaming.
# --------------------------------------------------------------------------------------


def section_staged() -> None:
    print(
        "Squeeze-excitation, image pooling, GroupNorm and InstanceNorm need one statistic of\n"
        "the whole map (a mean, or a mean and variance per group); given it, they are local.\n"
        "tilefn makes each a barrier: the forward streams the model up to it and reduces the\n"
        "map's blocks into the exact statistic, then streams the whole model with the\n"
        "statistics fixed; the backward runs the stages in reverse. Nothing is frozen."
    )
    torch.manual_seed(0)
    net = nn.Sequential(
        # No bias right before a normalisation (its gradient is zero: nothing to compare)
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        torchvision.ops.SqueezeExcitation(16, 4),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False),
        nn.InstanceNorm2d(16, affine=True),
        nn.Conv2d(16, 4, 3, padding=1),
    ).double()
    x = torch.randn(2, 3, 160, 160, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plan = tilefn.plan(net, x.shape, 96)
    print("  " + str(plan).split("\n  main stage")[0].replace("\n", "\n  "))
    compare(net, x, tile=96)
    print(
        "  BatchNorm in train mode can use exact batch statistics the same way:\n"
        "  tilefn.streamify(trunk, tile, batchnorm='batch') (see section c)."
    )


SECTIONS: dict[str, tuple[str, Callable[[], None]]] = {
    "a": ("splitting networks into trunk and head", section_split),
    "b": ("ConvNeXt in train mode", section_convnext_train),
    "c": ("BatchNorm", section_batchnorm),
    "d": ("a U-Net with a dense segmentation head", section_unet),
    "e": ("refusals", section_refusals),
    "f": ("whole-image statistics (staged streaming)", section_staged),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Custom models with tilefn, each claim checked against the plain model "
        "in float64. Sections: " + "; ".join(f"{k}: {v[0]}" for k, v in SECTIONS.items()),
    )
    p.add_argument(
        "--section",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeat for several; default: all)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    for key in args.section or sorted(SECTIONS):
        title, run = SECTIONS[key]
        print(f"\n== ({key}) {title} ==")
        t0 = time.perf_counter()
        run()
        print(f"({key}) OK in {time.perf_counter() - t0:.1f} s")
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
