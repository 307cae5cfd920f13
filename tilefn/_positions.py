"""Ops whose result depends on where a crop lies in the image, run exactly on crops.

Almost every layer of a CNN is translation-equivariant: shift the input and the output
shifts with it, so a crop computes what the image computes at the same place. A few ops are
local but not equivariant. ``F.interpolate(..., align_corners=True)`` (``nn.UpsamplingBilinear2d``,
the decoders of smp's FPN, DeepLabV3+ and PAN) samples output position ``I`` of a map of
``n`` positions upsampled to ``N`` at source position ``I * (n - 1) / (N - 1)``: each output
reads two neighbouring inputs, but with weights that depend on ``I`` and on the size of the
whole map. A crop that knows its absolute place computes exactly what the image computes.

Every tensor of a crop starts at a known place: crops start on the network's alignment grid,
and every op keeps ``absolute = local + start / stride`` (``start``: the crop's first input
pixel; ``stride``: input pixels per position of the tensor), which is also how the planner
checks the sizes of each crop (``_planner``). :class:`AlignedCall` is what the trace records
of each such call (pure data: the sizes of the whole map, the strides); :class:`AtCrop` is
the ``TorchFunctionMode`` the executor runs the model under, which replaces each call by
:func:`aligned_interpolate` at the crop's place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._errors import PlanError

__all__ = [
    "AlignedCall",
    "AtCrop",
    "aligned_interpolate",
    "crop_place",
    "crop_starts",
    "grid_interpolate",
    "interpolate_arguments",
]

_LINEAR = ("linear", "bilinear", "trilinear")
_NAMES = (
    "input",
    "size",
    "scale_factor",
    "mode",
    "align_corners",
    "recompute_scale_factor",
    "antialias",
)


def interpolate_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of an ``F.interpolate`` call by name."""
    return {**dict(zip(_NAMES, args)), **kwargs}


def is_aligned(bound: dict[str, Any]) -> bool:
    """Whether an ``F.interpolate`` call samples with ``align_corners=True``."""
    return bool(bound.get("align_corners"))


@dataclass(frozen=True)
class AlignedCall:
    """One ``F.interpolate(..., align_corners=True)`` of a map computed from the image, on the
    whole image: which image dim each interpolated dim is, and per dim the whole map's size
    before (``n``) and after (``N``) and its stride (input pixels per position)."""

    dims: tuple[int, ...]
    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]
    strides: tuple[Fraction, ...]
    # None: a crop of a map computed from the image, upsampled by an integer factor with
    # align_corners=True. "corners" or "centres": a constant grid (a map pooled to k x k bins)
    # interpolated linearly to the size of a map of the image, with align_corners=True or
    # False: each crop computes the positions of that map it holds.
    grid: str | None = None

    def origins(self, start: Sequence[int]) -> tuple[int, ...]:
        """The absolute position of the first position of a crop's map, for the crop whose
        first input pixel is ``start`` (one per image dim)."""
        out = []
        for k, stride in zip(self.dims, self.strides):
            origin = Fraction(start[k]) / stride
            if origin.denominator != 1:  # pragma: no cover - crops start on the alignment grid
                raise RuntimeError(f"tilefn: crop start {start[k]} is not aligned")
            out.append(int(origin))
        return tuple(out)


def aligned_interpolate(
    x: torch.Tensor,
    out_sizes: Sequence[int],
    call: AlignedCall,
    origins: Sequence[int],
) -> torch.Tensor:
    """``F.interpolate(x, mode="(bi|tri)linear", align_corners=True)`` of the crop ``x`` of the
    whole map, whose first position along each interpolated dim is ``origins`` in the whole
    map: the crop's ``out_sizes`` positions, each computed as the whole image computes it
    (source ``I * (n - 1) / (N - 1)`` in float64, as torch does for float64; linear weights
    between its two neighbours). Positions whose neighbours lie outside the crop get clamped
    values: the planner never keeps them."""
    first = x.dim() - len(out_sizes)
    sizes = zip(out_sizes, call.in_sizes, call.out_sizes, origins)
    for j, (m, n, big_n, origin) in enumerate(sizes):
        d = first + j
        length = x.shape[d]
        factor = big_n // n
        scale = (n - 1) / (big_n - 1) if big_n > 1 else 0.0
        index = torch.arange(m, dtype=torch.float64, device=x.device) + factor * origin
        x = _lerp(x, d, index * scale, n, origin, length)
    return x


def _lerp(
    x: torch.Tensor, d: int, src: torch.Tensor, n: int, origin: int, length: int
) -> torch.Tensor:
    """Along dim ``d`` of ``x`` (positions ``origin..origin + length`` of a map of ``n``), the
    values at the float64 source positions ``src``: linear between the two neighbours, as
    torch's linear kernels weigh them (neighbours outside ``x`` clamped to its ends)."""
    i0 = src.floor().clamp(max=n - 1)
    lam = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=n - 1)
    l0 = (i0 - origin).clamp(0, length - 1)
    l1 = (i1 - origin).clamp(0, length - 1)
    shape = [1] * x.dim()
    shape[d] = src.numel()
    w1 = lam.to(x.dtype).reshape(shape)
    w0 = (1 - lam).to(x.dtype).reshape(shape)
    return x.index_select(d, l0) * w0 + x.index_select(d, l1) * w1


def grid_interpolate(
    grid: torch.Tensor, out_sizes: Sequence[int], call: AlignedCall, origins: Sequence[int]
) -> torch.Tensor:
    """``F.interpolate(grid, size=call.out_sizes, mode="(bi|tri)linear")`` of a whole constant
    ``grid`` (its last dims ``call.in_sizes``), only at the ``out_sizes`` positions from
    ``origins`` on: source ``I * (n - 1) / (N - 1)`` with ``align_corners=True``, else
    ``max((I + 0.5) * n / N - 0.5, 0)``, as torch computes them (in float64), and linear
    weights between the two neighbours."""
    first = grid.dim() - len(out_sizes)
    x = grid
    sizes = zip(out_sizes, call.in_sizes, call.out_sizes, origins)
    for j, (m, n, big_n, origin) in enumerate(sizes):
        d = first + j
        index = torch.arange(m, dtype=torch.float64, device=x.device) + origin
        if call.grid == "corners":
            src = index * ((n - 1) / (big_n - 1) if big_n > 1 else 0.0)
        else:
            src = ((index + 0.5) * (n / big_n) - 0.5).clamp(min=0.0)
        x = _lerp(x, d, src, n, 0, n)
    return x


_PLACE: ContextVar[tuple[tuple[int, ...], ...] | None] = ContextVar(
    "tilefn_crop_place", default=None
)


@contextlib.contextmanager
def crop_place(starts: Sequence[Sequence[int]]) -> Iterator[None]:
    """While a model runs on crops stacked along the batch dim: each crop's first input pixel
    (read by :func:`crop_starts`, e.g. by a stage's surrogate of a pooling to bins)."""
    token = _PLACE.set(tuple(tuple(s) for s in starts))
    try:
        yield
    finally:
        _PLACE.reset(token)


def crop_starts() -> tuple[tuple[int, ...], ...] | None:
    """The first input pixel of each crop the model runs on now, or None outside a crop."""
    return _PLACE.get()


class AtCrop(TorchFunctionMode):
    """Runs a model on crops stacked along the batch dim (first input pixels ``starts``,
    one per crop) with every position-dependent ``F.interpolate`` computed at the crop's place.
    ``calls`` lists, in the order the model makes them, every ``F.interpolate`` call the trace
    saw: an :class:`AlignedCall`, or None for one that does not depend on the place (an
    upsampling by an integer factor without aligned corners, a 1 x 1 summary upsampled back),
    which runs as it is."""

    def __init__(self, calls: Sequence[AlignedCall | None], starts: Sequence[Sequence[int]]):
        super().__init__()
        self.calls = tuple(calls)
        self.starts = [tuple(s) for s in starts]
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.interpolate:
            return func(*args, **kwargs)
        bound = interpolate_arguments(args, kwargs)
        position = self.count
        self.count += 1
        if position >= len(self.calls):  # pragma: no cover - the program comparison finds it
            raise PlanError(
                "streamify: the model made more interpolations than when it was recorded: its "
                "forward depends on something that changed. Please report this with the model."
            )
        call = self.calls[position]
        if call is None:
            return func(*args, **kwargs)
        x = bound["input"]
        if bound.get("mode") not in _LINEAR or bound.get("antialias"):  # pragma: no cover
            raise RuntimeError("tilefn: internal: an aligned interpolation that is not linear")
        rest = {k: v for k, v in bound.items() if k != "input"}
        out_sizes = func(torch.empty(x.shape, dtype=x.dtype, device="meta"), **rest).shape[2:]
        if call.grid is not None:  # a constant grid: each stacked crop its own piece of it
            pieces = [grid_interpolate(x, out_sizes, call, call.origins(s)) for s in self.starts]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        per = x.shape[0] // len(self.starts)
        pieces = [
            aligned_interpolate(x[j * per : (j + 1) * per], out_sizes, call, call.origins(s))
            for j, s in enumerate(self.starts)
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
