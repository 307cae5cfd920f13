"""Staged streaming: models with whole-image ops (squeeze-excitation, image pooling to 1 or
to bins, GroupNorm, InstanceNorm, BatchNorm with batch statistics, attention pooling),
streamed exactly.

The trace (with ``batch_stats`` given) finds the *barriers*: ops whose statistic spans every
position of a map ``h_k``. Fix the statistics ``s_1..s_K`` and the model is local, so it
streams as any other; each ``h_k`` is itself a local function of the image and of the
statistics before it. So:

- Forward: for ``k = 1..K``, stream the *prefix stage* ``k`` (the model stopped at barrier
  ``k``, with ``s_1..s_{k-1}`` fixed) and reduce its output blocks into ``s_k`` as they come
  (no map is stored; see :class:`~tilefn._global.Reduction`). Then stream the *main stage*
  (the whole model, every statistic fixed).
- Backward: the main stage's streamed vjp gives the parameter and input gradients with the
  statistics held fixed, and the cotangents of the statistics (they are inputs of every
  crop, like parameters, so the linearity argument covers them). Then for ``k = K..1``, the
  prefix stage ``k``'s streamed vjp with the output ``phi_k(h_k)`` and cotangent one, where
  ``phi_k`` (:func:`~tilefn._global.surrogate`) pulls the statistics' cotangents back to
  ``h_k``, adds the rest: every parameter, the input and the statistics before ``k``.

Every step is an exact streamed pass, so the result equals the plain model's. The cost is
one streamed pass per barrier up to that barrier, forward and backward, on top of the
model's own (barriers that read the same map share one: its blocks go to every reduction,
and the backward pulls the sum of their surrogates back); memory stays that of one crop plus
the statistics (bytes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ._compat import requires_grad_allowed, share_registries
from ._errors import PlanError, TileSizeError
from ._execute import AutocastState, Executor, Kept, RngState
from ._global import Barrier, GlobalCall, GlobalOps, Reduction, StopAtBarrier, surrogate
from ._inputs import CropReader, ImageSource
from ._options import StreamOptions
from ._plan import TilePlan
from ._planner import PlanCache
from ._trace import Trace

__all__ = ["SegmentedPlan", "StagedKept", "StagedPlan", "StagedProgram"]

Values = list[tuple[torch.Tensor, ...]]


class _Stage(nn.Module):
    """``model`` with the statistics of its barriers given (``values``): the whole model
    (``stop=None``) or the prefix that ends at barrier ``stop`` and returns the map that
    barrier reads, or ``transform`` of it. It shares the model's parameters, buffers and
    submodules (same names), so plans, ``functional_call`` and optimizers see the model."""

    def __init__(
        self,
        model: nn.Module,
        barriers: tuple[Barrier, ...],
        calls: tuple[int | None, ...],
        stop: int | None,
    ):
        super().__init__()
        object.__setattr__(self, "_model", model)
        share_registries(self, model)
        self.barriers = barriers
        self.global_calls = calls
        self.stop = stop
        object.__setattr__(self, "values", [])
        object.__setattr__(self, "transform", None)

    @contextlib.contextmanager
    def given(self, values: Values, transform: Any = None) -> Iterator[None]:
        """Run with these statistics (and output ``transform``), then forget them."""
        self.values, self.transform = values, transform
        try:
            yield
        finally:
            self.values, self.transform = [], None

    def _handle(self, position: int, call: GlobalCall, run) -> Any:
        if position >= len(self.global_calls):
            raise PlanError(
                "streamify: the model ran more whole-image ops (means over positions, "
                "normalisations) than when it was recorded: its forward depends on something "
                "that changed. Please report this with the model."
            )
        k = self.global_calls[position]
        if k is None:
            return run()
        if k == self.stop:
            raise StopAtBarrier(call.product() if call.kind == "contract" else call.input)
        return call.apply(self.barriers[k].for_call(self.values[k]))

    def forward(self, x: torch.Tensor) -> Any:
        ops = GlobalOps(self._handle)
        try:
            with ops:
                out = self._model(x)
        except StopAtBarrier as stop:
            h = stop.value
            unmerge = None if self.stop is None else self.barriers[self.stop].unmerge
            if unmerge is not None:  # the model flattened the map: give it its dims back
                shape = unmerge.shape(h.shape, ops.reshapes)
                if math.prod(shape) != h.numel():
                    raise PlanError(
                        f"streamify: the map that {self.barriers[self.stop].describe()} reads "
                        f"has shape {tuple(h.shape)} on this crop, which does not unflatten to "
                        f"{shape}. Please report this with the model."
                    ) from None
                h = h.reshape(shape)
            return h if self.transform is None else self.transform(h)
        if self.stop is not None:
            raise PlanError(
                f"streamify: the model did not reach its whole-image op {self.stop}. Please "
                "report this with the model."
            )
        return out


@dataclass(frozen=True)
class StagedPlan:
    """The plan of a model with whole-image ops: its barriers, and one :class:`TilePlan`
    per stage (the prefix up to each barrier, then the whole model)."""

    barriers: tuple[Barrier, ...]
    prefixes: tuple[TilePlan, ...]  # per barrier: the plan of the pass that reduces its map
    main: TilePlan
    # Per barrier, the barrier whose prefix stage streams its map: itself, or the first
    # barrier that reads the same map (PSPNet's four poolings of one map: one pass for all).
    leaders: tuple[int, ...]

    @property
    def stages(self) -> tuple[TilePlan, ...]:
        """The plans of the passes one forward streams: one per map that barriers read,
        then the whole model."""
        return (*(p for k, p in enumerate(self.prefixes) if self.leaders[k] == k), self.main)

    @property
    def n_tiles(self) -> int:
        """Crops of one forward (all stages)."""
        return sum(p.n_tiles for p in self.stages)

    @property
    def memory_estimate(self) -> int:
        """The largest stage's estimate plus the statistics (stages run one at a time)."""
        return max(p.memory_estimate for p in self.stages) + self.stat_bytes

    @property
    def stat_bytes(self) -> int:
        """Bytes of the statistics: all that the barriers store."""
        return sum(b.stat_bytes for b in self.barriers)

    @property
    def map_bytes(self) -> int:
        """Bytes of stored maps (forward) and of cotangent maps (backward): 0, the stages
        recompute instead (as :attr:`SegmentedPlan.map_bytes` counts those of stage cuts)."""
        return 0

    @property
    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.main.output_shapes

    @property
    def uses_rng(self) -> bool:
        return any(p.uses_rng for p in self.stages)

    @property
    def overlap(self) -> float:
        """The main stage's overlap factor ``a`` (each prefix stage has its own, listed in
        the printed plan)."""
        return self.main.overlap

    @property
    def min_tile_size(self) -> tuple[int, ...]:
        return tuple(max(s) for s in zip(*(p.min_tile_size for p in self.stages)))

    @property
    def alignment(self) -> tuple[int, ...]:
        return self.main.alignment

    def __str__(self) -> str:
        lines = [
            f"StagedPlan: {len(self.barriers)} whole-image op(s), each a barrier: the forward "
            f"streams the model up to each barrier for its exact statistics "
            f"({self.stat_bytes} bytes in all, no map stored), then the whole model; the "
            "backward runs the stages in reverse."
        ]
        for k, (b, p) in enumerate(zip(self.barriers, self.prefixes)):
            lead = self.leaders[k]
            stage = (
                f"prefix stage {p.n_tiles} crops, overlap a = {p.overlap:.2f}"
                if lead == k
                else f"reduced in barrier {lead + 1}'s pass (the same map)"
            )
            lines.append(
                f"  barrier {k + 1}: {b.describe()}, map {tuple(b.shape)}: stores "
                f"{b.stat_bytes} bytes (its statistics; the map is recomputed, not stored: 0 "
                f"bytes forward, 0 bytes of cotangent map backward); {stage}"
            )
        lines.append("  main stage: " + str(self.main).replace("\n", "\n  "))
        return "\n".join(lines)


@dataclass(frozen=True)
class SegmentedPlan:
    """The plan of a trunk cut into segments (option ``cut_at``): each segment streams over
    the stored map its predecessor returns, with its own plan (a :class:`TilePlan`, or a
    :class:`StagedPlan` for a segment with whole-image ops). The stored maps are held in
    memory, or, when they do not fit in ``memory_budget``, on disk under ``spill_dir``."""

    cuts: tuple[str, ...]  # the child that starts each segment after the first
    segments: tuple[TilePlan | StagedPlan, ...]
    map_shapes: tuple[tuple[int, ...], ...]  # the stored map at each cut
    map_sizes: tuple[int, ...]  # its bytes (its gradient in the backward: as many again)
    spill_dir: str | None = None  # where the maps go; None: they stay in memory

    @property
    def map_bytes(self) -> int:
        """Bytes of the stored maps (forward); their gradients take as many (backward)."""
        return sum(self.map_sizes)

    @property
    def on_disk(self) -> bool:
        return self.spill_dir is not None

    @property
    def n_tiles(self) -> int:
        return sum(p.n_tiles for p in self.segments)

    @property
    def memory_estimate(self) -> int:
        """The largest segment's estimate, plus the stored maps and their gradients when
        they are held in memory; on disk, without the maps each segment reads and writes."""
        if not self.on_disk:
            return max(p.memory_estimate for p in self.segments) + 2 * self.map_bytes
        sizes, last = self.map_sizes, len(self.segments) - 1
        return max(
            p.memory_estimate - (sizes[k - 1] if k else 0) - (2 * sizes[k] if k < last else 0)
            for k, p in enumerate(self.segments)
        )

    @property
    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.segments[-1].output_shapes

    @property
    def uses_rng(self) -> bool:
        return any(getattr(p, "uses_rng", False) for p in self.segments)

    def __str__(self) -> str:
        where = f"on disk under {self.spill_dir}" if self.on_disk else "in memory"
        lines = [
            f"SegmentedPlan: {len(self.segments)} segments, cut before "
            f"{', '.join(repr(c) for c in self.cuts)}; stored maps {_mib(self.map_bytes)} "
            f"(forward) and their gradients {_mib(self.map_bytes)} (backward), {where}"
        ]
        for k, p in enumerate(self.segments):
            if k > 0:
                c, shape, size = self.cuts[k - 1], self.map_shapes[k - 1], self.map_sizes[k - 1]
                lines.append(
                    f"  cut before {c!r}: map {shape}, {_mib(size)} stored, {_mib(size)} gradient"
                )
            lines.append(f"  segment {k + 1}: " + str(p).replace("\n", "\n  "))
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class StagedProgram:
    """The stages of one model on one input shape, with their executors and plan caches."""

    def __init__(self, model: nn.Module, found: Trace, options: StreamOptions):
        if options.process_group is not None:
            raise PlanError(
                "streamify: process_group= is not supported for models with whole-image ops "
                f"({found.barriers[0].describe()}) yet. Stream without a process group."
            )
        self.model = model
        self.barriers = found.barriers
        # Barriers that read one map share the pass of the first of them (the map is computed
        # before any of them runs, so it depends on no statistic among them).
        self.leaders = tuple(
            next((j for j in range(k) if b.reads_as(self.barriers[j])), k)
            for k, b in enumerate(self.barriers)
        )
        calls = found.global_calls
        self.stages = [_Stage(model, self.barriers, calls, k) for k in range(len(self.barriers))]
        self.stages.append(_Stage(model, self.barriers, calls, None))
        # A pooling to bins pulls its cotangents back with weights that depend on the place
        # (the bins that hold each position), so its pass cannot share background crops.
        placed = {self.leaders[k] for k, b in enumerate(self.barriers) if b.bins is not None}
        self.executors = [
            Executor(s, replace(options, skip_constant=False) if k in placed else options)
            for k, s in enumerate(self.stages)
        ]
        self._caches = [PlanCache() for _ in self.stages]

    def plan(
        self, shape: tuple[int, ...], tile_size: Any, dtype: torch.dtype, budget: int | None
    ) -> tuple[StagedPlan, Trace]:
        plans: list[Any] = []  # per stage its plan (None where the tile is too small)
        main_trace = None
        too_small: list[TileSizeError] = []
        minimum: list[tuple[int, ...]] = []
        for k, (stage, cache) in enumerate(zip(self.stages, self._caches)):
            if k < len(self.barriers) and self.leaders[k] != k:
                plans.append(plans[self.leaders[k]])
                continue
            try:
                with stage.given([b.placeholder("cpu") for b in self.barriers]):
                    plan_, trace_ = cache.get(stage, shape, tile_size, dtype, budget)
            except TileSizeError as err:
                if not hasattr(err, "minimum"):
                    raise
                too_small.append(err)
                minimum.append(err.minimum)
                plans.append(None)
                continue
            plans.append(plan_)
            minimum.append(tuple(plan_.min_tile_size))
            main_trace = trace_
        if too_small:
            raise _too_small(too_small, minimum, shape, tile_size)
        assert main_trace is not None
        prefixes = tuple(plans[:-1])
        return StagedPlan(self.barriers, prefixes, plans[-1], self.leaders), main_trace

    def _group(self, k: int) -> list[int]:
        """The barriers whose map prefix stage ``k`` streams (empty unless ``k`` leads)."""
        return [g for g, lead in enumerate(self.leaders) if lead == k]

    @torch.no_grad()
    def statistics(
        self,
        source: ImageSource,
        reader: CropReader,
        plan: StagedPlan,
        rng: RngState | None,
        state: Mapping[str, torch.Tensor] | None,
        update: bool,
    ) -> Values:
        """The exact statistics of every barrier, in order; with ``update``, BatchNorm
        layers' running statistics are updated as the plain forward would."""
        found: dict[int, tuple[torch.Tensor, ...]] = {}
        for k in range(len(self.barriers)):
            group = self._group(k)
            if not group:
                continue  # reduced in its leader's pass
            reductions = [Reduction(self.barriers[g]) for g in group]

            def sink(o, dst, block, reductions=reductions):
                for r in reductions:
                    r.add(block, dst)

            with self.stages[k].given([found[j] for j in range(k)]):
                self.executors[k].forward(
                    source, reader, plan.prefixes[k], rng, state=state, sink=sink
                )
            for g, reduction in zip(group, reductions):
                found[g] = reduction.values()
                if update and self.barriers[g].module is not None:
                    _update_running(self.model, self.barriers[g], reduction)
        return [found[k] for k in range(len(self.barriers))]

    def forward(
        self,
        source: ImageSource,
        reader: CropReader,
        plan: StagedPlan,
        rng: RngState | None = None,
        keep: bool = False,
        want_input: bool = False,
        state: Mapping[str, torch.Tensor] | None = None,
        sink: Any = None,
    ) -> tuple[list[torch.Tensor], StagedKept]:
        """As :meth:`Executor.forward <tilefn._execute.Executor.forward>` (so that
        :class:`~tilefn._autograd.StreamedFunction` runs either): the outputs, and the
        main stage's kept crop graphs together with the statistics used (leaves that require
        grad when ``keep``, so that kept graphs reach them). Updates BatchNorm running
        statistics as the plain forward does."""
        values = self.statistics(source, reader, plan, rng, state, update=True)
        if keep:
            values = [tuple(_leaf(v) for v in vs) for vs in values]
        with self.stages[-1].given(values):
            outs, kept = self.executors[-1].forward(
                source, reader, plan.main, rng, keep, want_input, state, sink
            )
        return outs, StagedKept(kept, values)

    def vjp(
        self,
        source: ImageSource,
        reader: CropReader,
        plan: StagedPlan,
        cotangents: Sequence[torch.Tensor | None],
        params: Sequence[torch.Tensor],
        want_input: bool,
        rng: RngState | None = None,
        autocast: AutocastState | None = None,
        kept: dict[int, Kept] | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
        input_grad: Any = None,
    ) -> tuple[list[torch.Tensor | None], Any]:
        """As :meth:`Executor.vjp <tilefn._execute.Executor.vjp>`, through every stage, with
        the statistics of the forward that ``kept`` carries (without them, e.g. in a second
        backward, they are computed again, without touching the running statistics). The
        caller's RNG state is left as it was."""
        saved_rng = RngState(rng.device) if rng is not None else None
        try:
            if isinstance(kept, StagedKept):
                values: Values = kept.values
            else:
                values = self.statistics(source, reader, plan, rng, state, update=False)
            return self._vjp(
                source, reader, plan, cotangents, params, want_input, values, rng, autocast,
                kept, state, input_grad,
            )  # fmt: skip
        finally:
            if saved_rng is not None:
                saved_rng.restore()

    def _vjp(
        self,
        source,
        reader,
        plan,
        cotangents,
        params,
        want_input,
        values,
        rng,
        autocast,
        kept,
        state,
        target,
    ):
        n = len(params)
        # The forward's leaves where it made them (its kept crop graphs reach those).
        values = [tuple(v if v.requires_grad else _leaf(v) for v in vs) for vs in values]
        with self.stages[-1].given(values):
            got, input_grad = self.executors[-1].vjp(
                source,
                reader,
                plan.main,
                cotangents,
                [*params, *_flat(values)],
                want_input,
                rng=rng,
                autocast=autocast,
                kept=dict(kept) if kept else None,
                state=state,
                input_grad=target,
            )
        grads = list(got[:n])
        target = input_grad  # the prefix stages add their input gradients into it
        stat_cots = _unflat(got[n:], values)
        for k in reversed(range(len(self.barriers))):
            group = [g for g in self._group(k) if any(c is not None for c in stat_cots[g])]
            if not group:
                continue  # the outputs do not depend on these statistics (or not its pass)
            before = [tuple(_leaf(v) for v in vs) for vs in values[:k]]
            phis = [surrogate(self.barriers[g], values[g], stat_cots[g]) for g in group]
            phi = phis[0] if len(phis) == 1 else _summed(phis)
            out_shape = plan.prefixes[k].output_shapes[0]
            dtype = values[k][0].dtype
            ones = torch.ones((), dtype=dtype, device=reader.device).expand(out_shape)
            with self.stages[k].given(before, phi):
                got, _ = self.executors[k].vjp(
                    source,
                    reader,
                    plan.prefixes[k],
                    [ones],
                    [*params, *_flat(before)],
                    want_input,
                    rng=rng,
                    autocast=autocast,
                    state=state,
                    input_grad=target,
                )
            _add(grads, got[:n])
            for j, cs in enumerate(_unflat(got[n:], before)):
                stat_cots[j] = tuple(_sum(a, b) for a, b in zip(stat_cots[j], cs))
        return grads, input_grad


def _too_small(
    errors: list[TileSizeError], minimum: list[tuple[int, ...]], shape: tuple[int, ...], tile: Any
) -> TileSizeError:
    """The error for a tile below the receptive field of some stage: each stage (the model up
    to each whole-image op, then the whole model) streams with its own, and the tile must do
    for all of them, so the stated minimum is the largest of theirs."""
    need = tuple(max(m) for m in zip(*minimum))
    if len(errors) == 1 and tuple(errors[0].minimum) == need:  # type: ignore[attr-defined]
        return errors[0]
    shown = need[0] if len(need) == 1 else need
    err = TileSizeError(
        f"streamify: tile_size {tile} is too small for this network's receptive field in its "
        "staged passes (one up to each whole-image op, then the whole model, each with its "
        f"own receptive field): Use tile_size >= {shown} for input shape {tuple(shape)}, "
        "the largest of their minimums."
    )
    err.minimum = need  # type: ignore[attr-defined]
    return err


def _summed(phis: list) -> Any:
    """The surrogate of several barriers on one map: the sum of theirs."""

    def phi(h: torch.Tensor) -> torch.Tensor:
        out = phis[0](h)
        for p in phis[1:]:
            out = out + p(h)
        return out

    return phi


def _leaf(v: torch.Tensor) -> torch.Tensor:
    """A statistic as a leaf to differentiate by (also inside a torch.func transform, whose
    backward runs here on plain tensors: the leaf is made outside of it)."""
    with requires_grad_allowed():
        return v.detach().requires_grad_()


def _flat(values: Values) -> list[torch.Tensor]:
    return [v for vs in values for v in vs]


def _unflat(flat: Sequence[torch.Tensor | None], like: Values) -> list[tuple]:
    out, pos = [], 0
    for vs in like:
        out.append(tuple(flat[pos : pos + len(vs)]))
        pos += len(vs)
    return out


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _add(grads: list, got: Sequence[torch.Tensor | None]) -> None:
    for k, g in enumerate(got):
        if g is not None:
            grads[k] = g if grads[k] is None else grads[k] + g


def _update_running(model: nn.Module, barrier: Barrier, reduction: Reduction) -> None:
    """What a train-mode BatchNorm's forward does to its buffers, once, with the exact batch
    statistics: count the step, and move the running statistics towards the batch mean
    and the unbiased batch variance by the momentum (or the cumulative 1/steps)."""
    assert barrier.module is not None
    bn = model.get_submodule(barrier.module)
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    mean = reduction.total.reshape(-1)  # type: ignore[union-attr]
    var = reduction.unbiased_var().reshape(-1)
    for buf, stat in ((bn.running_mean, mean), (bn.running_var, var)):
        buf.copy_((buf.to(torch.float64) * (1 - f) + stat * f).to(buf.dtype))


class StagedKept(dict):
    """The main stage's kept crop graphs (as :class:`~tilefn._execute.Executor.forward`
    returns them), with the statistics of the forward they belong to."""

    def __init__(self, kept: dict[int, Kept], values: Values):
        super().__init__(kept)
        self.values = values
