"""Tiling plans as data: which crops to run and which output positions each one owns.

A :class:`TilePlan` is pure data computed from shapes only (see ``_planner``), printable and
cached. Along each spatial dim the image is cut at multiples of the network's alignment into
blocks; every output (at its own stride) is partitioned by the same cuts, so each output
position belongs to exactly one crop. Crops are the Cartesian product of the per-dim spans.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from ._positions import AlignedCall

__all__ = ["Span", "Crop", "TilePlan", "kept_count"]


@dataclass(frozen=True)
class Span:
    """One tile along one spatial dim: the crop ``[start, stop)`` in input pixels, and for
    each output the block ``[lo, hi)`` of output positions it owns."""

    start: int
    stop: int
    blocks: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Crop:
    """One tile: its crop box (``(start, stop)`` per spatial dim, input pixels) and, per
    output, the owned block (``(lo, hi)`` per dim, global output positions) and the
    block's start inside the crop's output."""

    box: tuple[tuple[int, int], ...]
    blocks: tuple[tuple[tuple[int, int], ...], ...]
    local_starts: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class TilePlan:
    """How :func:`tilefn.streamify` tiles one input shape. Printable."""

    input_shape: tuple[int, ...]
    tile_size: tuple[int, ...]
    alignment: tuple[int, ...]
    spans: tuple[tuple[Span, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_strides: tuple[tuple[Fraction, ...], ...]
    output_spatial_dims: tuple[tuple[int, ...], ...]
    min_tile_size: tuple[int, ...]
    crop_activation_bytes: int
    memory_estimate: int
    uses_rng: bool
    # The model's F.interpolate(..., align_corners=True) calls, which each crop computes at
    # its place (see ``_positions``); empty for most models.
    positional: tuple[AlignedCall | None, ...] = ()

    @functools.cached_property
    def crops(self) -> tuple[Crop, ...]:
        out = []
        for combo in itertools.product(*self.spans):
            blocks, starts = [], []
            for o, strides in enumerate(self.output_strides):
                blocks.append(tuple(s.blocks[o] for s in combo))
                starts.append(
                    tuple(
                        s.blocks[o][0] - int(Fraction(s.start) / strides[k])
                        for k, s in enumerate(combo)
                    )
                )
            out.append(Crop(tuple((s.start, s.stop) for s in combo), tuple(blocks), tuple(starts)))
        return tuple(out)

    @property
    def n_tiles(self) -> int:
        return math.prod(len(s) for s in self.spans)

    @property
    def overlap(self) -> float:
        """Sum of crop volumes over image volume (the factor ``a`` of the cost model).

        At least 1 for a network that reads every pixel; below 1 only when strides larger
        than kernels leave pixels that no output reads (crops hold only pixels that are
        read)."""
        a = 1.0
        for spans, size in zip(self.spans, self.input_shape[2:]):
            a *= sum(s.length for s in spans) / size
        return a

    def __str__(self) -> str:
        dims = "HW" if len(self.spans) == 2 else ("L" if len(self.spans) == 1 else "DHW")
        lines = [
            f"TilePlan(input {tuple(self.input_shape)}, tile_size {tuple(self.tile_size)}, "
            f"alignment {tuple(self.alignment)})",
        ]
        for k, spans in enumerate(self.spans):
            crops = " ".join(f"[{s.start}:{s.stop})" for s in spans)
            lines.append(f"  dim {dims[k]}: {len(spans)} crops {crops}")
        for o, shape in enumerate(self.output_shapes):
            stride = ", ".join(str(s) for s in self.output_strides[o])
            lines.append(f"  output {o}: shape {tuple(shape)}, stride ({stride})")
        lines.append(
            f"  {self.n_tiles} tiles, overlap a = {self.overlap:.3f} (crop area computed / "
            "image area), "
            f"minimum tile_size {tuple(self.min_tile_size)}, "
            f"estimated peak memory {self.memory_estimate / 2**20:.1f} MiB"
        )
        return "\n".join(lines)

    __repr__ = __str__


def kept_count(volumes: Sequence[int], bytes_per_px: float, spare: float) -> int:
    """How many crops, taken from the last one backwards, have graphs that fit in ``spare``
    bytes (a crop's graph: ``bytes_per_px`` times its volume)."""
    n = 0
    for v in reversed(volumes):
        if bytes_per_px * v > spare:
            break
        spare -= bytes_per_px * v
        n += 1
    return n
