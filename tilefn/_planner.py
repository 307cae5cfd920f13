"""Planning: turn a model and an input shape into a :class:`TilePlan`, from shapes only.

The model is recorded on meta tensors (``_trace``), never run on the image. Along each
spatial dim, cut points at multiples of the alignment are advanced greedily as far as the
tile size allows; a block's crop is the union of the receptive fields of its output
positions, expanded to the alignment grid. Each distinct crop shape is traced too, to check
that the model's sizes follow the crop. :func:`auto_plan` picks the tile from a memory
budget; :class:`PlanCache` keeps the recent plans of one backbone.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from fractions import Fraction

import torch
from torch import nn

from ._compat import module_hooks
from ._errors import PlanError, TilefnError, TileSizeError, UnsupportedLayerError, see_docs
from ._geometry import Circular, Graph, Identity, Upsample, Window, align_down
from ._options import tile_tuple
from ._plan import Span, TilePlan, kept_count
from ._trace import TRACE_HOOKS, Trace, trace

__all__ = ["PlanCache", "auto_plan", "make_plan", "model_fingerprint"]


def _blocks(graph: Graph, k: int, b0: int, b1: int, length: int) -> dict[int, tuple[int, int]]:
    """Output positions owned by input cut ``[b0, b1)`` along dim ``k``, per output node
    (half-open)."""
    out = {}
    for o in graph.outputs:
        node = graph.nodes[o]
        n, s = node.sizes[k], node.scales[k]
        lo = 0 if b0 == 0 else min(math.ceil(b0 / s), n)
        hi = n if b1 >= length else min(math.ceil(b1 / s), n)
        out[o] = (lo, hi)
    return out


class _TooSmall(Exception):
    """A cut point cannot advance with this tile size."""


class _DimPlanner:
    def __init__(self, graph: Graph, k: int, length: int, align: int, periodic: bool):
        self.graph, self.k, self.length, self.align = graph, k, length, align
        self.periodic = periodic
        self.cache: dict[tuple[int, int], tuple[int, int, dict] | None] = {}

    def crop(self, b0: int, b1: int):
        key = (b0, b1)
        if key not in self.cache:
            self.cache[key] = self._crop(b0, b1)
        return self.cache[key]

    def _crop(self, b0: int, b1: int):
        blocks = _blocks(self.graph, self.k, b0, b1, self.length)
        need_out = {o: (lo, hi - 1) for o, (lo, hi) in blocks.items() if hi > lo}
        if not need_out:
            return None
        whole = b0 == 0 and b1 >= self.length
        if self.periodic and not whole:
            # The image is a torus along this dim: the crop may wrap around its ends.
            need, _, _ = self.graph.back(self.k, need_out, periodic=True)
            if 0 not in need:
                return None
            lo, hi = need[0]
            start = align_down(lo, self.align)
            stop = start - (-(hi + 1 - start) // self.align) * self.align
            return start, stop, need
        need, at_start, at_end = self.graph.back(self.k, need_out)
        if 0 not in need:
            return None
        lo, hi = need[0]
        start = 0 if at_start else align_down(lo, self.align)
        if at_end:
            stop = self.length
        else:
            stop = hi + 1 + (self.length - (hi + 1)) % self.align
            stop = min(stop, self.length)
        return start, stop, need

    def length_of(self, b0: int, b1: int) -> int:
        c = self.crop(b0, b1)
        return 0 if c is None else c[1] - c[0]

    def min_tile(self) -> int:
        """The smallest tile with which every cut point can advance by one alignment step.

        Away from the image borders every crop of one step has the same length (shifting
        by the alignment shifts every tensor by whole positions), so probing the middle
        and every cut within one crop length of either border is enough."""
        a, n = self.align, self.length
        step = lambda b: self.length_of(b, min(b + a, n))
        cuts = range(0, n, a)
        if len(cuts) <= 1024:
            return max(step(b) for b in cuts)
        sample = cuts[:: len(cuts) // 16]
        reach = max(step(b) for b in sample) + 2 * a
        probes = set(sample) | set(range(0, min(n, reach), a))
        probes |= set(range(max(0, align_down(n - reach, a)), n, a))
        return max(step(b) for b in probes)

    def spans(self, tile: int) -> list[tuple[Span, dict]]:
        a, n = self.align, self.length
        out = []
        b = 0
        while b < n:
            cands = list(range(b + a, n, a)) + [n]
            if self.length_of(b, cands[0]) > tile:
                raise _TooSmall()
            lo, hi = 0, len(cands) - 1  # largest index whose crop fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.length_of(b, cands[mid]) <= tile:
                    lo = mid
                else:
                    hi = mid - 1
            c = cands[lo]
            crop = self.crop(b, c)
            if crop is not None:
                start, stop, need = crop
                blocks = _blocks(self.graph, self.k, b, c, n)
                out.append((Span(start, stop, tuple(blocks[o] for o in self.graph.outputs)), need))
            b = c
        return out


def _check_crop_sizes(
    graph: Graph, k: int, length: int, span: Span, need: dict, crop_graph: Graph
) -> None:
    for node_id, (lo, hi) in need.items():
        full = graph.nodes[node_id]
        crop = crop_graph.nodes[node_id]
        offset = Fraction(span.start) / full.scales[k]
        if offset.denominator != 1:  # pragma: no cover - alignment guarantees this
            raise PlanError(f"internal: crop start {span.start} is not aligned")
        off = int(offset)
        size = crop.sizes[k]
        ok = 0 <= lo - off and hi - off < size
        if span.stop == length and span.start >= 0:
            ok = ok and size == full.sizes[k] - off
        if not ok:
            raise PlanError(
                f"streamify: the model's tensor sizes do not follow the crop along spatial "
                f"dim {k}: on the crop [{span.start}, {span.stop}) of an image of size "
                f"{length}, an intermediate tensor has size {size}, but the crop needs its "
                f"positions {lo - off}..{hi - off} (full-image size {full.sizes[k]}, crop "
                f"offset {off}). The model computes sizes or positions from the input size "
                "in a way tilefn cannot tile (absolute slicing, size-dependent padding). "
                "Please report this with the model."
            )


def _check_periodic(graph: Graph, k: int, length: int, align: int) -> None:
    """Circular padding makes dim ``k`` a torus. Tiles of a torus are exact only if every
    layer along ``k`` is periodic too: no zero/reflect padding, no size changes."""
    padded = set()
    for op in graph.ops:
        for _, maps in op.inputs:
            m = maps[k]
            if isinstance(m, Circular):
                padded.update(op.outputs)
                continue
            periodic = (
                isinstance(m, Identity)
                or (isinstance(m, Window) and m.padding == 0 and not m.after)
                or (isinstance(m, Upsample) and m.mode == "nearest")
            )
            if not periodic:
                raise UnsupportedLayerError(
                    f"streamify: layer {op.where} ({op.name}) handles the image "
                    f"border along spatial dim {k} differently from the circular padding used "
                    "elsewhere along that dim, so the image is neither a torus nor bounded "
                    "there. How to fix: use padding_mode='circular' for every padded layer "
                    f"along this dim, or none at all. {see_docs('Circular padding')}"
                )
    if length % align:
        raise UnsupportedLayerError(
            f"streamify: circular padding along spatial dim {k} needs an image size divisible "
            f"by the network's alignment {align}, got {length}. How to fix: crop or pad the "
            f"image to a multiple of {align}. {see_docs('Circular padding')}"
        )
    for i, node in enumerate(graph.nodes):
        if i not in padded and node.sizes[k] * node.scales[k] != length:
            raise UnsupportedLayerError(
                f"streamify: with circular padding along spatial dim {k}, every layer must keep "
                f"the size image_size / stride; a tensor of size {node.sizes[k]} at stride "
                f"{node.scales[k]} breaks this (image size {length}). How to fix: pad every "
                f"convolution circularly ('same' size). {see_docs('Circular padding')}"
            )


def make_plan(
    model: nn.Module, input_shape: Sequence[int], tile_size, dtype: torch.dtype = torch.float32
) -> tuple[TilePlan, Trace]:
    """Record ``model`` on meta tensors and tile ``input_shape`` with crops of at most
    ``tile_size``. Returns the plan and the full-image trace."""
    planner = _Planner(model, input_shape, dtype)
    return planner.plan(tile_tuple(tile_size, planner.ndim)), planner.full


#: ``tile_size="auto"`` refuses plans whose crops compute more than this many times the image:
#: a budget that only admits such tiles is too small for the network to be worth streaming.
AUTO_MAX_OVERLAP = 8.0


def _overlap_trap(planner: _Planner, plan: TilePlan, budget: int, cands: list[int]) -> str:
    """The TileSizeError text for an "auto" budget that only admits heavily overlapping tiles:
    the best plan it admits, and the budget the smallest tile with a tolerable overlap needs."""
    lengths = planner.lengths
    advice = ""
    for t in sorted(cands):
        tiles = tuple(min(t, n) for n in lengths)
        try:
            found = planner.plan(tiles)
        except TilefnError:
            continue
        if found.overlap <= AUTO_MAX_OVERLAP:
            advice = (
                f" The smallest tile tried with a <= {AUTO_MAX_OVERLAP:g}, {tiles} "
                f"(a = {found.overlap:.2f}), needs memory_budget >= "
                f"{found.memory_estimate / 2**20:.1f} MiB."
            )
            break
    return (
        f"streamify: memory_budget {budget / 2**20:.1f} MiB only admits tiles that overlap "
        f"heavily: the best, {plan.tile_size}, has overlap a = {plan.overlap:.1f} (its crops "
        f"compute {plan.overlap:.0f} times the image of shape {planner.input_shape}), over the "
        f"limit of {AUTO_MAX_OVERLAP:g} for tile_size='auto'.{advice} Raise memory_budget, or "
        "pass that tile_size yourself to accept the cost."
    )


def auto_plan(
    model: nn.Module, input_shape: Sequence[int], memory_budget: int, dtype: torch.dtype
) -> tuple[TilePlan, Trace]:
    """The plan whose training step the cost model expects to be fastest among those whose
    memory estimate fits ``memory_budget`` (bytes), counting crop graphs kept from the
    forward (see :func:`kept_count`) as recompute saved.

    Cost of a step in units of one forward over the image: ``3a`` (forward and backward
    over all crops) plus the fraction of the image recomputed in the backward. Candidate
    tiles run from the whole image down to the minimum tile in steps of about 10%; their
    memory is estimated from the per-pixel activation size, and the chosen one is planned
    exactly (stepping down while its exact estimate exceeds the budget)."""
    planner = _Planner(model, input_shape, dtype)
    lengths = planner.lengths
    minimum = max(planner.min_tile())
    top = max(lengths)
    cands = sorted({top, minimum} | {int(top * 0.9**k) for k in range(200)}, reverse=True)
    cands = [t for t in cands if t >= minimum]
    area = math.prod(lengths)
    per_px = planner.full.activation_bytes / area
    fixed = planner.fixed_bytes()
    scored = []
    for t in cands:
        try:
            spans = planner.spans(tuple(min(t, n) for n in lengths))
        except _TooSmall:
            continue
        biggest = math.prod(max(s.length for s in spans_k) for spans_k in spans)
        act = per_px * biggest
        estimate = fixed + 2 * act
        if estimate > memory_budget:
            continue
        volumes = [math.prod(s.length for s in combo) for combo in itertools.product(*spans)]
        a = sum(volumes) / area
        n = kept_count(volumes, per_px, memory_budget - estimate + act)
        kept = sum(volumes[len(volumes) - n :])
        scored.append((3 * a + (sum(volumes) - kept) / area, -t, t))
    for _, _, t in sorted(scored):
        plan = planner.plan(tuple(min(t, n) for n in lengths))
        if plan.memory_estimate <= memory_budget:
            if plan.overlap > AUTO_MAX_OVERLAP:
                raise TileSizeError(_overlap_trap(planner, plan, memory_budget, cands))
            return plan, planner.full
    smallest = planner.plan(tuple(min(minimum, n) for n in lengths))
    raise TileSizeError(
        f"streamify: memory_budget {memory_budget / 2**20:.1f} MiB is below the memory "
        f"estimate of the smallest possible tile ({smallest.tile_size}: "
        f"{smallest.memory_estimate / 2**20:.1f} MiB for input shape {planner.input_shape}). "
        "Raise memory_budget, or pass a tile_size and no budget."
    )


def _mib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class _Planner:
    """Plans for one model and input shape; traces and per-dim geometry are shared
    between the tile sizes tried."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.input_shape = tuple(int(s) for s in input_shape)
        self.ndim = len(self.input_shape) - 2
        self.full = full = trace(model, self.input_shape, dtype)
        graph = self.graph = full.graph
        ndim = self.ndim
        self.lengths = lengths = self.input_shape[2:]
        self.aligns = tuple(graph.alignment(k) for k in range(ndim))
        periodic = [graph.periodic(k) for k in range(ndim)]
        for k in range(ndim):
            if periodic[k]:
                _check_periodic(graph, k, lengths[k], self.aligns[k])
        self.planners = [
            _DimPlanner(graph, k, lengths[k], self.aligns[k], periodic[k]) for k in range(ndim)
        ]
        self.crop_traces: dict[tuple[int, ...], Trace] = {}
        self._min_tile: tuple[int, ...] | None = None

    def min_tile(self) -> tuple[int, ...]:
        if self._min_tile is None:
            self._min_tile = tuple(
                min(p.min_tile(), n) for p, n in zip(self.planners, self.lengths)
            )
        return self._min_tile

    def streaming_min_tile(self) -> tuple[int, ...] | None:
        """The minimum tile of the receptive field itself, planned on a larger image (the
        minimum on this image is capped at its size); None if that cannot be planned."""
        bigger = tuple(-(-max(4 * n, n + 4096) // a) * a for n, a in zip(self.lengths, self.aligns))
        try:
            return _Planner(self.model, self.input_shape[:2] + bigger, self.dtype).min_tile()
        except TilefnError:
            return None

    def fixed_bytes(self) -> int:
        """Parameters and their gradients, the image, the stitched outputs and theirs."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        out_bytes = sum(math.prod(s) for s in self.full.out_shapes) * itemsize
        return 2 * params + math.prod(self.input_shape) * itemsize + 2 * out_bytes

    def spans(self, tiles: tuple[int, ...]) -> list[list[Span]]:
        return [[s for s, _ in p.spans(t)] for p, t in zip(self.planners, tiles)]

    def crop_trace(self, shape: tuple[int, ...]) -> Trace:
        if shape not in self.crop_traces:
            t = trace(self.model, self.input_shape[:2] + shape, self.dtype)
            if t.program != self.full.program:
                raise PlanError(_different_program(self.full, t, shape, self.lengths))
            strides = [n.scales for n in self.full.graph.nodes]
            if [n.scales for n in t.graph.nodes] != strides:
                op = next(
                    op
                    for op in t.graph.ops
                    if any(t.graph.nodes[o].scales != strides[o] for o in op.outputs)
                )
                raise PlanError(
                    f"streamify: layer {op.where} ({op.name}) changes the resolution by another "
                    f"factor on a crop of spatial shape {shape} than on the image "
                    f"{self.lengths} (an interpolation to a size= that is not the same "
                    "multiple of its input on every crop), which tiles cannot reproduce. How "
                    "to fix: use an integer scale_factor, or make the sizes divisible."
                )
            self.crop_traces[shape] = t
        return self.crop_traces[shape]

    def _sensible_advice(self, minimum: tuple[int, ...]) -> str:
        """The minimum tile can be a trap: for a network with a large receptive field it
        overlaps so much that the crops compute hundreds of times the image (ConvNeXt-tiny).
        List, with their memory estimates, the minimum and the smallest tiles tried (growing by
        1/4 on the alignment grid, up to the image) whose overlap ``a`` is at most 8, 4 and 2."""
        show = (lambda t: t[0]) if self.ndim == 1 else (lambda t: t)  # noqa: E731
        try:
            at_min = self.plan(minimum)
        except TilefnError:
            return ""
        if at_min.overlap <= 2:
            return ""
        rows = [(minimum, at_min)]
        tiles, bounds = minimum, [8.0, 4.0, 2.0]
        for _ in range(24):
            grown = tuple(
                min(n, -(-int(t * 1.25) // a) * a)
                for t, n, a in zip(tiles, self.lengths, self.aligns)
            )
            if grown == tiles or not bounds:
                break
            tiles = grown
            try:
                found = self.plan(tiles)
            except TilefnError:
                break
            if found.overlap <= bounds[0]:
                rows.append((tiles, found))
                bounds = [b for b in bounds if b < found.overlap]
        listed = "; ".join(
            f"{show(t)}: a = {p.overlap:.3g}, {_mib(p.memory_estimate)}" for t, p in rows
        )
        return (
            " At that minimum the crops overlap heavily (a, the crop area computed over the "
            "image area, is the compute cost relative to one plain pass). Tiles, their a and "
            f"estimated peak memory: {listed}. Larger tiles compute less but need more memory: "
            "use the largest that fits, or tile_size='auto' with memory_budget=..."
        )

    def plan(self, tiles: tuple[int, ...]) -> TilePlan:
        ndim, lengths, aligns = self.ndim, self.lengths, self.aligns
        graph, full = self.graph, self.full
        spans_needs = []
        try:
            for k, planner in enumerate(self.planners):
                spans_needs.append(planner.spans(tiles[k]))
        except _TooSmall:
            minimum = self.min_tile()
            short = [k for k in range(ndim) if tiles[k] < minimum[k]] or [k]
            need = minimum[0] if ndim == 1 else minimum
            msg = (
                f"streamify: tile_size {tiles[0] if ndim == 1 else tiles} is too small for this "
                f"network's receptive field along spatial dim{'s' if len(short) > 1 else ''} "
                f"{', '.join(map(str, short))} (alignment {aligns[0] if ndim == 1 else aligns}). "
            )
            capped = [k for k in range(ndim) if minimum[k] >= lengths[k]]
            streaming = self.streaming_min_tile() if capped else None
            if streaming is not None and any(streaming[k] >= lengths[k] for k in capped):
                need_s = streaming[0] if ndim == 1 else streaming
                msg += (
                    f"Streaming this network needs tiles of at least {need_s} px (its receptive "
                    f"field), and the image {lengths[0] if ndim == 1 else lengths} is not larger "
                    "than that, so it can only run as one tile: use tile_size >= "
                    f"{need} for input shape {self.input_shape} (no streaming), or a larger "
                    "image."
                )
            else:
                msg += f"Use tile_size >= {need} for input shape {self.input_shape}."
                msg += self._sensible_advice(minimum)
            err = TileSizeError(msg)
            err.minimum = tuple(minimum)  # type: ignore[attr-defined]
            raise err from None
        spans = tuple(tuple(s for s, _ in sn) for sn in spans_needs)
        # Check the sizes the model really produces on each distinct crop length.
        base = [max(s.length for s in spans[k]) for k in range(ndim)]
        for k in range(ndim):
            for span, need in spans_needs[k]:
                shape = tuple(span.length if j == k else base[j] for j in range(ndim))
                _check_crop_sizes(graph, k, lengths[k], span, need, self.crop_trace(shape).graph)
        biggest = self.crop_trace(tuple(base))
        return TilePlan(
            input_shape=self.input_shape,
            tile_size=tiles,
            alignment=aligns,
            spans=spans,
            output_shapes=full.out_shapes,
            output_strides=tuple(graph.nodes[o].scales for o in graph.outputs),
            output_spatial_dims=full.out_spatial_dims,
            min_tile_size=self.min_tile(),
            crop_activation_bytes=biggest.activation_bytes,
            memory_estimate=self.fixed_bytes() + 2 * biggest.activation_bytes,
            uses_rng=full.uses_rng,
            positional=full.aligned if any(c is not None for c in full.aligned) else (),
        )


_PLAIN = (bool, int, float, str, type(None))


def _plain(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def model_fingerprint(model: nn.Module) -> tuple:
    """What a plan of ``model`` depends on, besides the input: for every module its path,
    class, forward, train/eval flag, hooks and plain attributes (kernel sizes, strides,
    paddings, dilations, scale factors, ...), and the name, shape and dtype of every
    parameter and buffer. Replacing a layer, editing a hyperparameter in place or changing
    dtypes gives another fingerprint, so a cached plan is never reused for a changed model."""
    parts: list = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(m).items() if _plain(v)))
        forward = m.__dict__.get("forward", type(m).forward)
        hooks = tuple(h for h in module_hooks(m) if h not in TRACE_HOOKS)
        parts.append((name, type(m), forward, attrs, hooks))
    for name, t in model.named_parameters(remove_duplicate=False):
        parts.append((name, tuple(t.shape), t.dtype))
    for name, t in model.named_buffers(remove_duplicate=False):
        parts.append((name, tuple(t.shape), t.dtype))
    return tuple(parts)


class PlanCache:
    """The most recent plans of one model, keyed by everything a plan depends on that can
    change between calls: input shape, tile size, compute dtype, the model's
    :func:`model_fingerprint` (structure, hyperparameters, train/eval flags, parameter
    shapes and dtypes), and for ``tile_size="auto"`` the budget. Bounded: slides of many sizes
    keep only the ``maxsize`` most recently used plans."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._plans: OrderedDict[Hashable, tuple[TilePlan, Trace]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._plans)

    def get(
        self,
        model: nn.Module,
        shape: tuple[int, ...],
        tile_size: int | Sequence[int] | str,
        dtype: torch.dtype,
        memory_budget: int | None,
    ) -> tuple[TilePlan, Trace]:
        """The plan (and full-image trace) for these arguments, planned on first use."""
        tile_key = tile_size if isinstance(tile_size, (int, str)) else tuple(tile_size)
        auto = tile_key == "auto"
        key = (shape, tile_key, dtype, model_fingerprint(model), memory_budget if auto else None)
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        if auto:
            assert memory_budget is not None  # checked with the options
            found = auto_plan(model, shape, memory_budget, dtype)
        else:
            found = make_plan(model, shape, tile_size, dtype)
        self._plans[key] = found
        if len(self._plans) > self.maxsize:
            self._plans.popitem(last=False)
        return found


def _different_program(full: Trace, crop: Trace, shape: tuple[int, ...], lengths) -> str:
    """The message for a forward that runs another program on a crop than on the image."""
    step = next(
        (k for k, (a, b) in enumerate(zip(full.program, crop.program)) if a != b),
        min(len(full.program), len(crop.program)),
    )
    if step < min(len(full.program), len(crop.program)):
        (op_a, where_a, args_a), (op_b, where_b, args_b) = full.program[step], crop.program[step]
        detail = (
            f"op {step} is {op_a} in layer {where_a} with arguments {args_a} on the image, but "
            f"{op_b} in layer {where_b} with arguments {args_b} on the crop"
        )
    else:
        detail = f"one of them stops after {step} ops"
    return (
        f"streamify: the model runs different ops on a crop of spatial shape {shape} than on "
        f"the image {tuple(lengths)}: {detail}. Its forward depends on the input size (a branch "
        "on x.shape, a value computed from a size), which tiles cannot reproduce. How to fix: "
        "make the trunk's forward independent of the input size, or move that part into the "
        "head."
    )
