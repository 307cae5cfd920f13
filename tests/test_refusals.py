"""More refusals, each pinned by type and message: circular-padding conditions, outputs,
resolutions, in-place writes, size-dependent forwards, and rule-level refusals."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilefn


class Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> object:
        return self.fn(x)


def _circ(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), *layers)


def _inplace_into_view(x: torch.Tensor) -> torch.Tensor:
    y = torch.zeros_like(x)
    y[:, :, 1:-1] = x[:, :, 1:-1]
    return y


def _size_dependent(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if x.shape[-1] > 40 else x.relu()


CASES = [
    (
        "circular-then-valid-conv",
        _circ(nn.Conv2d(2, 2, 3)),
        (1, 2, 32, 32),
        tilefn.UnsupportedLayerError,
        r"^streamify: with circular padding along spatial dim 0, every layer must keep the "
        r"size image_size / stride",
    ),
    (
        "circular-size-not-divisible",
        _circ(nn.MaxPool2d(2)),
        (1, 2, 33, 32),
        tilefn.UnsupportedLayerError,
        r"^streamify: circular padding along spatial dim 0 needs an image size divisible by "
        r"the network's alignment 2, got 33",
    ),
    (
        "circular-mixed-with-zero-padding",
        _circ(nn.Conv2d(2, 2, 3, padding=1)),
        (1, 2, 32, 32),
        tilefn.UnsupportedLayerError,
        r"^streamify: layer '1' \(Conv2d\) \(aten.convolution.default\) handles the image "
        r"border along spatial dim 0 differently",
    ),
    (
        "output-not-from-input",
        Fn(lambda x: torch.ones(3, dtype=x.dtype)),
        (1, 2, 16, 16),
        tilefn.UnsupportedLayerError,
        r"^streamify: the model's output 0 is not computed from the input",
    ),
    (
        "output-flattened",
        Fn(lambda x: x.flatten(2)),
        (1, 2, 16, 16),
        tilefn.UnsupportedLayerError,
        r"^streamify: the model's output 0 merges spatial dims with other dims "
        r"\(shape \(1, 2, 256\)\)",
    ),
    (
        "different-resolutions",
        Fn(lambda x: F.max_pool2d(x, 2) + x[:, :, :16, :16]),
        (1, 2, 32, 32),
        tilefn.UnsupportedLayerError,
        r"^streamify: layer '<root>' \(Fn\) combines tensors at different resolutions",
    ),
    (
        "in-place-write-into-view",
        Fn(_inplace_into_view),
        (1, 2, 16, 16),
        tilefn.UnsupportedLayerError,
        r"^streamify: layer '<root>' \(Fn\) writes image data in place into a view",
    ),
    (
        "forward-depends-on-size",
        Fn(_size_dependent),
        (1, 2, 48, 48),
        tilefn.PlanError,
        r"^streamify: the model runs different ops on a crop of spatial shape",
    ),
    (
        "squeeze-spatial",
        Fn(lambda x: x.squeeze(2).unsqueeze(2)),
        (1, 2, 1, 16),
        tilefn.UnsupportedLayerError,
        r"^streamify: layer '<root>' \(Fn\) squeezes away a spatial dim of size 1",
    ),
    (
        "non-integer-scale",
        Fn(lambda x: F.interpolate(x, scale_factor=1.5)),
        (1, 2, 16, 16),
        tilefn.UnsupportedLayerError,
        r"^streamify: layer '<root>' \(Fn\) interpolates by the non-integer scale factor 1.5",
    ),
    (
        "strided-slice",
        Fn(lambda x: x[..., ::2]),
        (1, 2, 16, 16),
        tilefn.UnsupportedLayerError,
        r"^streamify: layer '<root>' \(Fn\) slices a spatial dim with step 2",
    ),
]


@pytest.mark.parametrize(
    ("model", "shape", "error", "pattern"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_refusal_is_pinned(
    model: nn.Module, shape: tuple[int, ...], error: type[Exception], pattern: str
) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    backbone, _ = tilefn.streamify(model.double(), 16)
    with pytest.raises(error, match=pattern) as info:
        backbone(x)
    assert isinstance(info.value, tilefn.TilefnError)


class MaxGate(nn.Module):
    """A channel gate from global *max* pooling (CBAM's max branch): not a sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool, self.fc = nn.AdaptiveMaxPool2d(1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(self.pool(x)))


def test_global_max_gate_refusal_names_the_block_and_the_real_fix():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), MaxGate(16), nn.Conv2d(16, 16, 3))
    with pytest.raises(tilefn.UnsupportedLayerError) as info:
        tilefn.plan(net, (1, 3, 128, 128), 64)
    msg = str(info.value)
    assert "layer '1.pool' (AdaptiveMaxPool2d, inside MaxGate '1')" in msg
    assert "It is part of the block '1' (MaxGate)" in msg
    assert "x.mean((2, 3), keepdim=True)" in msg and "end the trunk before '1'" in msg
