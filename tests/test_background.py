"""Exact background skipping: crops that are one value per sample and channel are computed once
per class in the forward, and backpropagated once per class with the summed cotangents.

The reference is the plain model in float64: output, every parameter gradient (through
``streamed_vjp`` and ``loss.backward()``, where the backward skips) and the input gradient
(``saliency=True``, where the backward computes every crop).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_tree_close, reference_grads
from torch import nn

import tilefn

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
pytestmark = pytest.mark.usefixtures("one_thread")


def slide(shape: tuple[int, ...], regions, seed: int = 0) -> torch.Tensor:
    """Random tissue with constant regions: ``regions`` holds (index, value per channel)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    for index, value in regions:
        v = torch.as_tensor(value, dtype=DTYPE).reshape(1, -1, *([1] * (len(shape) - 2)))
        x[(Ellipsis, *index)] = v
    return x


def net2d(padding_mode: str = "zeros") -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, padding_mode=padding_mode),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 6, 5, padding=2, dilation=1, padding_mode=padding_mode),
            nn.GELU(),
            nn.Conv2d(6, 4, 3, stride=2, padding=1, padding_mode=padding_mode),
        )
        .to(DTYPE)
        .eval()
    )


# Glass along the top border and a corner, a square inside the tissue, a second colour.
REGIONS_2D = [
    ((slice(0, 100), slice(None)), (0.9, 0.85, 0.95)),
    ((slice(180, 240), slice(150, 232)), (0.9, 0.85, 0.95)),
    ((slice(120, 180), slice(60, 148)), (0.9, 0.85, 0.95)),
    ((slice(186, 240), slice(0, 56)), (0.2, 0.3, 0.1)),
]
SHAPE_2D = (1, 3, 240, 232)


def check_exact(net: nn.Module, x: torch.Tensor, tile, **options) -> dict:
    """Streamed against plain, with and without the input gradient; the stats of the
    skipping (parameter-gradient) backward."""
    backbone, streamed_vjp = tilefn.streamify(net, tile, **options)
    with torch.no_grad():
        out = backbone(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    ref_out, ref_grads, ref_input = reference_grads(net, x, cot)
    assert_tree_close(out, ref_out, **TOL)
    forward = backbone.last_stats["forward"]

    grads, input_grad = streamed_vjp(x, cot)
    assert input_grad is None
    assert_tree_close(grads, ref_grads, **TOL)
    backward = backbone.last_stats["backward"]

    net.zero_grad(set_to_none=True)
    (backbone(x) * cot).sum().backward()
    assert_tree_close({n: p.grad for n, p in net.named_parameters()}, ref_grads, **TOL)

    _, with_input = tilefn.streamify(net, tile, saliency=True, **options)
    grads, input_grad = with_input(x, cot)
    assert_tree_close(grads, ref_grads, **TOL)
    assert_tree_close(input_grad, ref_input, **TOL)
    return {"forward": forward, "backward": backward}


def test_constant_regions_at_borders_and_inside_are_skipped_exactly() -> None:
    x = slide(SHAPE_2D, REGIONS_2D)
    stats = check_exact(net2d(), x, 48)
    for kind in ("forward", "backward"):
        s = stats[kind]
        assert s.constant >= 4 and s.computed < s.crops, s
        assert s.computed == s.crops - s.constant + len(s.classes), s


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_modes_with_constant_crops_at_the_borders(padding_mode: str) -> None:
    x = slide(SHAPE_2D, REGIONS_2D)
    stats = check_exact(net2d(padding_mode), x, 48)
    assert stats["backward"].skipped > 0


def test_nothing_constant_computes_every_crop() -> None:
    x = slide((1, 3, 120, 120), [])
    stats = check_exact(net2d(), x, 48)
    assert stats["forward"].constant == 0 and stats["forward"].skipped == 0


def test_a_batch_is_constant_only_where_every_sample_is() -> None:
    x = slide((2, 3, 160, 160), [((slice(0, 80), slice(None)), (0.5, 0.5, 0.5))])
    x[1:, :, 0:80] = 0.25  # sample 1 has another value there: still one per sample
    x[1:, :, 0:80, 0:50] = torch.randn(1, 3, 80, 50, dtype=DTYPE)  # but tissue here
    stats = check_exact(net2d(), x, 48)
    # Rows [0, 48) and [32, 80) are constant in both samples right of column 50 only.
    assert stats["forward"].constant == 2 * 3, stats["forward"]


def test_several_outputs_owned_at_different_places() -> None:
    class Pyramid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 5, 3, stride=2, padding=1)
            self.c = nn.ConvTranspose2d(5, 2, 2, stride=2)

        def forward(self, x):
            a = torch.relu(self.a(x))
            b = torch.relu(self.b(a))
            return {"full": a + self.c(b).sum(1, keepdim=True), "half": b}

    torch.manual_seed(0)
    net = Pyramid().to(DTYPE)
    x = slide((1, 3, 128, 144), REGIONS_2D[:3])
    backbone, streamed_vjp = tilefn.streamify(net, 48)
    out = backbone(x)
    gen = torch.Generator().manual_seed(2)
    cot = {k: torch.randn(v.shape, generator=gen, dtype=DTYPE) for k, v in out.items()}
    ref_out, ref_grads, _ = reference_grads(net, x, cot)
    assert_tree_close(out, ref_out, **TOL)
    grads, _ = streamed_vjp(x, cot)
    assert_tree_close(grads, ref_grads, **TOL)
    assert backbone.last_stats["backward"].skipped > 0


@pytest.mark.parametrize("crop_batch", [1, 3])
def test_volumes_and_crop_batches(crop_batch: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 2, 3, stride=2, padding=1)
    ).to(DTYPE)
    x = slide((1, 2, 40, 36, 32), [((slice(0, 20), slice(None), slice(None)), (1.0, -1.0))])
    stats = check_exact(net, x, 16, crop_batch=crop_batch)
    assert stats["backward"].skipped > 0


def test_stochastic_models_replay_their_draws_in_every_class() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 3, padding=1)
            self.drop = nn.Dropout2d(0.5)

        def forward(self, x):
            return self.b(self.drop(torch.relu(self.a(x))))

    torch.manual_seed(0)
    net = Noisy().to(DTYPE).train()
    x = slide((1, 3, 120, 120), REGIONS_2D[:1])
    backbone, streamed_vjp = tilefn.streamify(net, 48)
    torch.manual_seed(5)
    out = backbone(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    torch.manual_seed(5)
    ref_out, ref_grads, _ = reference_grads(net, x, cot)
    assert_tree_close(out, ref_out, **TOL)
    torch.manual_seed(5)
    grads, _ = streamed_vjp(x, cot)
    assert_tree_close(grads, ref_grads, **TOL)
    assert backbone.last_stats["backward"].skipped > 0


def test_skip_constant_false_computes_every_crop() -> None:
    x = slide(SHAPE_2D, REGIONS_2D)
    net = net2d()
    backbone, streamed_vjp = tilefn.streamify(net, 48, skip_constant=False)
    out = backbone(x)
    streamed_vjp(x, torch.ones_like(out))
    for s in backbone.last_stats.values():
        assert s.skipped == 0 and s.computed == s.crops


class CountingImage(tilefn.ImageSource):
    """A lazy image that knows where its background is (as a tissue mask does) and counts
    how many pixels are read."""

    def __init__(self, x: torch.Tensor, background: torch.Tensor, value: torch.Tensor):
        self.x, self.background, self.value = x, background, value
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.pixels_read = 0

    def _read(self, box):
        self.pixels_read += (box[0][1] - box[0][0]) * (box[1][1] - box[1][0])
        return self.x[(Ellipsis, *(slice(a, b) for a, b in box))]

    def constant(self, box):
        (y0, y1), (x0, x1) = box
        inside = 0 <= y0 and y1 <= self.shape[-2] and 0 <= x0 and x1 <= self.shape[-1]
        if inside and bool(self.background[y0:y1, x0:x1].all()):
            return self.value.reshape(1, -1).expand(self.shape[0], -1)
        return None


def test_a_source_that_knows_its_background_is_not_read_there() -> None:
    value = torch.tensor([0.9, 0.85, 0.95], dtype=DTYPE)
    x = slide(SHAPE_2D, [((slice(0, 120), slice(None)), value)])
    background = torch.zeros(240, 232, dtype=torch.bool)
    background[:120] = True
    net = net2d()
    plain = tilefn.streamify(net, 48)[0](x)
    image = CountingImage(x, background, value)
    backbone, streamed_vjp = tilefn.streamify(net, 48)
    assert_tree_close(backbone(image), plain, **TOL)
    assert image.pixels_read < 0.75 * sum(
        (c.box[0][1] - c.box[0][0]) * (c.box[1][1] - c.box[1][0])
        for c in backbone.plan(x.shape).crops
    )
    cot = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    _, ref_grads, _ = reference_grads(net, x, cot)
    grads, _ = streamed_vjp(image, cot)
    assert_tree_close(grads, ref_grads, **TOL)
