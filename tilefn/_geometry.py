"""Pure integer geometry of local ops: how an output interval maps back to an input interval.

Nothing here imports torch. Every op in a streamed network is described, per spatial
dim, by a *dim map*: ``back(lo, hi, in_size)`` gives the input positions that output
positions ``lo..hi`` (inclusive) read, and ``scale`` is the op's stride (input pixels per
output pixel; a fraction for upsampling). Intervals are inclusive pairs ``(lo, hi)``; an
interval with ``lo > hi`` is empty. ``back`` may return positions outside
``[0, in_size)``: those are padding reads at a true border, and the planner uses them to
force a crop onto the image border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "Interval",
    "DimMap",
    "Identity",
    "Window",
    "TransposedWindow",
    "Upsample",
    "AlignedUpsample",
    "Reflect",
    "Circular",
    "hull",
    "align_down",
    "lcm_all",
]

Interval = tuple[int, int]


def hull(a: Interval | None, b: Interval) -> Interval:
    """Smallest interval containing both ``a`` and ``b`` (``a`` may be ``None``)."""
    if a is None:
        return b
    return (min(a[0], b[0]), max(a[1], b[1]))


def align_down(value: int, step: int) -> int:
    """Largest multiple of ``step`` that is ``<= value``."""
    return (value // step) * step


def lcm_all(values) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


class DimMap:
    """Geometry of one op along one spatial dim."""

    scale: Fraction = Fraction(1)

    def back(self, lo: int, hi: int, in_size: int) -> Interval:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Identity(DimMap):
    """Pointwise along this dim: output ``o`` reads input ``o``."""

    scale: Fraction = Fraction(1)

    def back(self, lo: int, hi: int, in_size: int) -> Interval:
        return (lo, hi)


@dataclass(frozen=True)
class Window(DimMap):
    """Convolution, pooling, padding and slicing: output ``o`` reads
    ``[o*stride - padding, o*stride - padding + dilation*(kernel-1)]``.

    ``padding`` is the padding before the first position and ``after`` the padding after
    the last one (``None``: the same as ``padding``, as in a convolution). Negative values
    trim: ``x[..., 2:-3]`` is ``Window(padding=-2, after=-3)``.
    """

    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    after: int | None = None

    @property
    def scale(self) -> Fraction:  # type: ignore[override]
        return Fraction(self.stride)

    def back(self, lo: int, hi: int, in_size: int) -> Interval:
        s, p, reach = self.stride, self.padding, self.dilation * (self.kernel - 1)
        after = p if self.after is None else self.after
        # Besides the positions it reads, output ``o`` needs a crop in which it exists: one
        # starting at or before ``o*s``, and long enough that the output (of length
        # (L + padding + after - reach - 1) // s + 1) reaches ``o``.
        first = min(lo * s - p, lo * s)
        last = max(hi * s - p, hi * s - p - after) + reach
        return (first, last)


@dataclass(frozen=True)
class TransposedWindow(DimMap):
    """Transposed convolution: input ``i`` writes outputs ``i*stride - padding + [0, d*(k-1)]``."""

    kernel: int
    stride: int
    padding: int
    dilation: int
    output_padding: int

    @property
    def scale(self) -> Fraction:  # type: ignore[override]
        return Fraction(1, self.stride)

    def back(self, lo: int, hi: int, in_size: int) -> Interval:
        s, p, reach = self.stride, self.padding, self.dilation * (self.kernel - 1)
        first = -((-(lo + p - reach)) // s)  # ceil((lo + p - reach) / s)
        last = (hi + p) // s
        # Output positions between the strided writes (kernel < stride) read nothing, but
        # must exist in the crop: its input must start at or before floor(lo / s) and be
        # long enough for position ``hi``.
        exists_first = lo // s
        exists_last = -((-(hi + 2 * p - reach - self.output_padding)) // s)
        return (min(first, exists_first), max(last, exists_last))


@dataclass(frozen=True)
class Upsample(DimMap):
    """Upsampling by an integer factor (``align_corners=False``).

    ``mode`` is one of ``nearest``, ``nearest-exact``, ``linear`` (also bilinear and
    trilinear along each dim) and ``cubic``.
    """

    factor: int
    mode: str

    @property
    def scale(self) -> Fraction:  # type: ignore[override]
        return Fraction(1, self.factor)

    def back(self, lo: int, hi: int, in_size: int) -> Interval:
        f = self.factor
        if self.mode == "nearest":
            return (lo // f, hi // f)
        if self.mode == "nearest-exact":
            return ((2 * lo + 1) // (2 * f), (2 * hi + 1) // (2 * f))
        # source coordinate (o + 0.5) / f - 0.5 = (2o + 1 - f) / (2f)
        first = (2 * lo + 1 - f) // (2 * f)
        last = (2 * hi + 1 - f) // (2 * f)
        if self.mode == "linear":
            return (first, last + 1)
        if self.mode == "cubic":
            return (first - 1, last + 2)
        raise ValueError(f"unknown upsampling mode {self.mode!r}")  # internal: rules check modes


@dataclass(frozen=True)
class AlignedUpsample(DimMap):
    """Linear upsampling by an integer factor with ``align_corners=True``: output ``o`` of the
    whole map (``factor * in_size`` positions) reads the two inputs around
    ``o * (in_size - 1) / (factor * in_size - 1)``. Not translation-equivariant: crops compute
    it at their place in the image (see ``_positions``)."""

    factor: int

    @property
    def scale(self) -> Fraction:  # type: ignore[override]
        return Fraction(1, self.factor)

    def back(self, lo: int, hi: int, in_size: int) -> Interval:
        n, big_n = in_size, self.factor * in_size
        if big_n <= 1:
            return (0, 0)
        # The kernels compute the source position in floating point, which may round across
        # an integer: one position of margin on either side.
        first = max(lo * (n - 1) // (big_n - 1) - 1, 0)
        last = min(hi * (n - 1) // (big_n - 1) + 2, n - 1)
        return (first, last)


@dataclass(frozen=True)
class Reflect(DimMap):
    """Reflection padding by ``(before, after)`` positions."""

    before: int
    after: int

    def back(self, lo: int, hi: int, in_size: int) -> Interval:
        p = self.before
        first, last = lo - p, hi - p
        if lo < p:  # reflected at the start: reads up to p - lo
            last = max(last, p - lo)
        if hi - p > in_size - 1:  # reflected at the end: reads down to 2(L-1) - (hi - p)
            first = min(first, 2 * (in_size - 1) - (hi - p))
        return (first, last)


@dataclass(frozen=True)
class Circular(DimMap):
    """Circular padding by ``(before, after)``: output ``o`` reads input ``o - before``,
    wrapping around the image. Only exact when the whole dim is treated as periodic."""

    before: int
    after: int

    def back(self, lo: int, hi: int, in_size: int) -> Interval:
        return (lo - self.before, hi - self.before)


@dataclass(frozen=True)
class Node:
    """A tensor computed from the image: its size and its stride (input pixels per
    position) along each spatial dim."""

    sizes: tuple[int, ...]
    scales: tuple[Fraction, ...]


@dataclass(frozen=True)
class Op:
    """One recorded op: for each spatial input node, one dim map per spatial dim."""

    name: str
    where: str  # the layer it ran in, for messages: "'path' (Class)"
    inputs: tuple[tuple[int, tuple[DimMap, ...]], ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Graph:
    """The geometry of a network on one input shape: nodes in topological order
    (node 0 is the input), the ops between them, and the output nodes."""

    nodes: tuple[Node, ...]
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.nodes[0].sizes)

    def alignment(self, k: int) -> int:
        """Smallest crop-start step along dim ``k`` that keeps every tensor's sampling grid
        aligned with the image's: the lcm of the numerators of all strides."""
        return lcm_all(node.scales[k].numerator for node in self.nodes)

    def periodic(self, k: int) -> bool:
        """Whether dim ``k`` is circularly padded somewhere, so the image is a torus."""
        return any(
            isinstance(maps[k], Circular) and (maps[k].before or maps[k].after)
            for op in self.ops
            for _, maps in op.inputs
        )

    def back(
        self, k: int, blocks: dict[int, Interval], periodic: bool = False
    ) -> tuple[dict[int, Interval], bool, bool]:
        """Propagate needed output intervals along dim ``k`` back to every node.

        Returns ``(needed, at_start, at_end)``: the needed interval of every node (clamped
        to the node), and whether some node reads padding at the start / end of its
        extent, in which case the crop must start at 0 / end at the image end. In a
        ``periodic`` dim nothing is clamped: positions outside a node wrap around.
        """
        need: dict[int, Interval] = dict(blocks)
        at_start = at_end = False
        for op in reversed(self.ops):
            iv: Interval | None = None
            for o in op.outputs:
                if o in need:
                    iv = hull(iv, need[o])
            if iv is None:
                continue
            for node, maps in op.inputs:
                size = self.nodes[node].sizes[k]
                lo, hi = maps[k].back(iv[0], iv[1], size)
                if periodic:
                    need[node] = hull(need.get(node), (lo, hi))
                    continue
                if lo < 0:
                    at_start = True
                    lo = 0
                if hi > size - 1:
                    at_end = True
                    hi = size - 1
                if lo > hi:
                    continue
                need[node] = hull(need.get(node), (lo, hi))
        return need, at_start, at_end
