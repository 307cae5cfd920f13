"""Run a :class:`TilePlan`: the streamed forward and the streamed vector-Jacobian product.
Never plans, and never knows what kind of image it reads (see ``_inputs``); which crops
run, in which order and groups, comes from ``_schedule``.

Backward by linearity: the output positions are partitioned among the crops, so the
parameter gradient ``J^T g`` is the sum over crops of the gradient of
``<g restricted to the crop's block, f(crop)>``, which ordinary autograd computes exactly
on the crop. Each crop (or group of ``crop_batch`` crops) is recomputed with autograd,
backpropagated and freed before the next one. The forward keeps the graph of its last
crop (the backward's first, so this costs no extra peak memory), or with a memory budget
the graphs of as many of its last crops as fit: the backward starts with those and skips
their recompute.

With a ``torch.distributed`` process group, each rank runs its share of the crops; the
stitched outputs (zero outside a rank's blocks) and the gradients are summed across the
ranks, so every rank ends with the same output map and the full gradients.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ._compat import tree_flatten
from ._constant import Look, OutputCache, PassStats, class_cotangents, class_key, constant_values
from ._errors import PlanError
from ._inputs import CropReader, ImageSource, Prefetched, scatter_add
from ._options import StreamOptions
from ._plan import TilePlan
from ._positions import AtCrop, crop_place
from ._schedule import backward_order, crop_groups, kept_crops, owned_slices, rank_share
from ._spill import DiskMap
from ._trace import RunningStats, batchnorm_eval

__all__ = ["AutocastState", "Executor", "Kept", "RngState", "model_state"]

# Streamed passes of models that draw random numbers replay the global RNG state before every
# crop; two such passes in two threads would interleave their draws, so they take turns.
_RNG_LOCK = threading.RLock()


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers ``model`` computes with now, by name (the same tensors)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _differs(model: nn.Module, state: Mapping[str, torch.Tensor] | None) -> bool:
    """Whether ``state`` holds other tensors than the ones ``model`` holds now."""
    if state is None:
        return False
    now = model_state(model)
    return any(now.get(name) is not t for name, t in state.items())


@dataclass(frozen=True)
class AutocastState:
    """The autocast state of the forward, which the recompute in the backward must use."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @staticmethod
    def capture(device_type: str) -> AutocastState:
        return AutocastState(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )

    def apply(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the duration of one streamed pass, then as before."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


class RngState:
    """The RNG state at the start of a streamed forward, replayed before every crop so that
    per-sample randomness (stochastic depth, Dropout2d) draws the same in every crop and in
    the recompute.

    Every crop draws the same numbers, so the state after each crop's draws must be the same
    too: :meth:`check` compares it with the first crop's, which catches another thread
    changing the global RNG in the middle of a streamed pass (the crops would then disagree
    on their draws) instead of returning a silently mixed result."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu, self.cuda = self._now()
        self.after: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _now(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def check(self) -> None:
        """After a crop's draws: the RNG must be where the first crop's draws left it."""
        now = self._now()
        if self.after is None:
            self.after = now
            return
        same = torch.equal(now[0], self.after[0]) and (
            now[1] is None or torch.equal(now[1], self.after[1])  # type: ignore[arg-type]
        )
        if not same:
            raise PlanError(
                "streamify: the global random number generator changed in the middle of a "
                "streamed pass of a model that draws random numbers (another thread seeded or "
                "drew from it), so its crops would disagree on their draws. Streamed passes "
                "of such models take turns with each other; other code must not use "
                "torch's global RNG meanwhile (use a torch.Generator of its own), or call "
                "model.eval() for the streamed trunk."
            )


@dataclass
class Kept:
    """A crop's outputs with their autograd graph, kept from the forward for the backward."""

    outputs: list[torch.Tensor]
    leaf: torch.Tensor | None


class Executor:
    """Runs plans of one model with fixed options: forward, vjp and the collective sums."""

    def __init__(self, model: nn.Module, options: StreamOptions):
        self.model = model
        self.options = options
        #: The :class:`PassStats` of the last ``"forward"`` and ``"backward"`` pass.
        self.last_stats: dict[str, PassStats] = {}

    def my_crops(self, plan: TilePlan) -> list[int]:
        """The crops this process runs: all, or with a process group this rank's share."""
        group = self.options.process_group
        if group is None:
            return list(range(plan.n_tiles))
        import torch.distributed as dist

        return rank_share(plan, dist.get_rank(group), dist.get_world_size(group))

    def _progress(self, items: list, what: str):
        if self.options.verbose:
            from tqdm.auto import tqdm

            return tqdm(items, desc=f"tilefn {what}", unit="tile", leave=False)
        return items

    def _context(self, rng: RngState | None):
        return _stack(
            _RNG_LOCK if rng is not None else contextlib.nullcontext(),
            RunningStats(self.model),
            _deterministic(self.options.deterministic),
        )

    def _run_group(
        self,
        source: ImageSource,
        reader: CropReader,
        plan: TilePlan,
        group: list[int],
        rng: RngState | None,
        want_input: bool,
        state: Mapping[str, torch.Tensor] | None,
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor | None]]:
        """Run the model once on the crops of ``group`` stacked along the batch dim, with the
        parameters and buffers ``state`` if given (else the model's own); per crop, its
        output leaves and its input leaf (or None)."""
        reads = [reader(source, plan.crops[i].box, want_input) for i in group]
        inputs = [r[0] for r in reads]
        return self._call(plan, inputs, rng, state, group), [r[1] for r in reads]

    def _call(
        self,
        plan: TilePlan,
        inputs: list[torch.Tensor],
        rng: RngState | None,
        state: Mapping[str, torch.Tensor] | None,
        crops: Sequence[int],
    ) -> list[list[torch.Tensor]]:
        """One model call on ``inputs`` (same-shaped crops, the plan's crops ``crops``)
        stacked along the batch dim; the output leaves of each crop."""
        if rng is not None:
            rng.restore()
        batch = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        starts = [[a for a, _ in plan.crops[i].box] for i in crops]
        at = contextlib.nullcontext()
        if plan.positional:  # ops that depend on the crop's place: computed there
            at = AtCrop(plan.positional, starts)
        with crop_place(starts), at:
            if state is None:
                out = self.model(batch)
            else:
                out = functional_call(self.model, dict(state), (batch,), strict=False)
        if rng is not None:
            rng.check()
        leaves = tree_flatten(out)[0]
        if len(leaves) != len(plan.output_shapes):  # pragma: no cover - checked by trace
            raise PlanError("streamify: the model returned a different number of outputs")
        if len(inputs) == 1:
            return [leaves]
        n = inputs[0].shape[0]
        for leaf in leaves:
            if leaf.dim() == 0 or leaf.shape[0] != n * len(inputs):
                raise PlanError(
                    f"streamify: with crop_batch={self.options.crop_batch} the model got "
                    f"{len(inputs)} crops stacked along dim 0 (batch {n * len(inputs)}), but an "
                    f"output has shape {tuple(leaf.shape)}: the model's outputs must keep the "
                    "batch dim first. Use crop_batch=1 for this model."
                )
        return [[leaf[j * n : (j + 1) * n] for leaf in leaves] for j in range(len(inputs))]

    def _look(self, source: ImageSource, reader: CropReader, plan: TilePlan, i: int) -> Look:
        """Crop ``i`` before computing: its class if it is constant (known to the source, or
        checked on the crop as read), and its model input."""
        box = plan.crops[i].box
        shape = (*source.shape[:2], *(b - a for a, b in box))
        values = source.constant(box)
        if values is not None:
            pixel = values.reshape(*values.shape, *([1] * len(box)))
            model_values = reader.prepare(pixel, source.dtype)[0].reshape(values.shape)
            key = class_key(shape, model_values, reader.dtype, reader.channels_last)

            def make() -> torch.Tensor:
                full = pixel.expand(shape).contiguous()
                return reader.prepare(full, source.dtype)[0]

            return Look(i, key, _make=make)
        x, _ = reader(source, box)
        found = constant_values(x)
        key = None if found is None else class_key(shape, found, x.dtype, reader.channels_last)
        return Look(i, key, _input=x)

    def _skipping_group(self, source, reader, plan, group, rng, state, cache, stats):
        """The outputs of each crop of ``group``, computing one crop per class of constant
        crops not in ``cache`` and copying the rest from it."""
        looks = [self._look(source, reader, plan, i) for i in group]
        run: list[Look] = []
        pending: set = set()
        for look in looks:
            stats.add(look.key)
            if look.key is None or (cache.get(look.key) is None and look.key not in pending):
                run.append(look)
                if look.key is not None:
                    pending.add(look.key)
        inputs = [look.input() for look in run]
        computed = self._call(plan, inputs, rng, state, [look.index for look in run]) if run else []
        stats.computed += len(run)
        by_index, by_key = {}, {}
        for look, leaves in zip(run, computed):
            cache.put(look.key, leaves)
            by_index[look.index] = leaves
            if look.key is not None:
                by_key[look.key] = leaves
        out = []
        for look in looks:
            leaves = by_index.get(look.index)
            if leaves is None:
                leaves = by_key.get(look.key)
            out.append(leaves if leaves is not None else cache.get(look.key))
        return out

    def forward(
        self,
        source: ImageSource,
        reader: CropReader,
        plan: TilePlan,
        rng: RngState | None = None,
        keep: bool = False,
        want_input: bool = False,
        state: Mapping[str, torch.Tensor] | None = None,
        sink: Callable[[int, tuple, torch.Tensor], None] | None = None,
    ) -> tuple[list[torch.Tensor], dict[int, Kept]]:
        """The stitched outputs, and with ``keep=True`` (under grad) the graphs of the crops
        whose recompute the backward can skip (see :func:`~tilefn._schedule.kept_crops`).
        With ``sink``, nothing is stitched: ``sink(output, index, block)`` receives each
        owned block (``index`` into the full output) and the outputs returned are empty.

        ``state`` (names to tensors) is what the model computes with when it differs from
        the tensors the model holds (``torch.func.functional_call``, torch.func transforms)."""
        state = state if _differs(self.model, state) else None
        mine = self.my_crops(plan)
        kept_ids = kept_crops(plan, mine, self.options.memory_budget) if keep else set()
        kept: dict[int, Kept] = {}
        outs: list[torch.Tensor | None] = [None] * len(plan.output_shapes)
        distributed = self.options.process_group is not None
        new = torch.Tensor.new_zeros if distributed else torch.Tensor.new_empty
        groups = crop_groups(plan, mine, kept_ids, self.options.crop_batch)
        # Constant crops share one computation per class only where every crop computes the
        # same function: not with ops that depend on the crop's place (align_corners=True).
        cache = OutputCache() if self.options.skip_constant and not plan.positional else None
        stats = PassStats("forward")
        boxes = [plan.crops[i].box for group in groups for i in group]
        with self._reading(source, reader, boxes) as source, self._context(rng):
            for group in self._progress(groups, "forward"):
                grad = group[0] in kept_ids
                with torch.set_grad_enabled(grad):
                    if cache is not None and not grad:
                        per_crop = self._skipping_group(
                            source, reader, plan, group, rng, state, cache, stats
                        )
                        inputs = [None] * len(group)
                    else:
                        per_crop, inputs = self._run_group(
                            source, reader, plan, group, rng, want_input and grad, state
                        )
                        stats.crops += len(group)
                        stats.computed += len(group)
                for i, leaves, leaf in zip(group, per_crop, inputs):
                    for o, out in enumerate(leaves):
                        if sink is not None:
                            idx = owned_slices(plan, plan.crops[i], o)
                            if idx is not None:
                                _check_output(plan, o, out, idx[1])
                                sink(o, idx[0], out[idx[1]].detach())
                            continue
                        if outs[o] is None:
                            outs[o] = new(out, plan.output_shapes[o])
                        idx = owned_slices(plan, plan.crops[i], o)
                        if idx is None:
                            continue
                        _check_output(plan, o, out, idx[1])
                        outs[o][idx[0]] = out[idx[1]].detach()
                    if grad:
                        kept[i] = Kept(leaves, leaf)
                del per_crop, inputs
        self._report(stats)
        if sink is not None:
            return [], kept
        if distributed:
            import torch.distributed as dist

            for out in outs:
                dist.all_reduce(out, group=self.options.process_group)
        return outs, kept  # type: ignore[return-value]

    def vjp(
        self,
        source: ImageSource,
        reader: CropReader,
        plan: TilePlan,
        cotangents: Sequence[torch.Tensor | None],
        params: Sequence[torch.Tensor],
        want_input: bool,
        rng: RngState | None = None,
        autocast: AutocastState | None = None,
        kept: dict[int, Kept] | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
        input_grad: torch.Tensor | DiskMap | None = None,
    ) -> tuple[list[torch.Tensor | None], torch.Tensor | DiskMap | None]:
        """Parameter gradients (None where unused) and, with ``want_input``, the input
        gradient of ``<cotangents, outputs>``, summed over crops. ``params`` are the
        tensors to differentiate by; the model computes with ``state`` (names to tensors,
        holding ``params``) when it differs from what the model holds now, as after
        ``functional_call`` or when a parameter was replaced between forward and backward.
        ``cotangents`` may be :class:`~tilefn._spill.DiskMap` s (read block by block), and
        the input gradient is added into ``input_grad`` when one is given (a tensor or a
        DiskMap of the input's shape; it is returned)."""
        state = state if _differs(self.model, state) else None
        # The recompute replays the forward's draws from ``rng``; leave the caller's RNG as
        # it was.
        lock = _RNG_LOCK if rng is not None else contextlib.nullcontext()
        with lock:
            saved = RngState(rng.device) if rng is not None else None
            try:
                grads, input_grad = self._vjp(
                    source,
                    reader,
                    plan,
                    cotangents,
                    params,
                    want_input,
                    rng,
                    autocast,
                    kept or {},
                    state,
                    input_grad,
                )
            finally:
                if saved is not None:
                    saved.restore()
        if self.options.process_group is not None:
            grads, input_grad = self._all_reduce(grads, params, input_grad)
        return grads, input_grad

    def _vjp(
        self, source, reader, plan, cotangents, params, want_input, rng, autocast, kept, state,
        input_grad,
    ):  # fmt: skip
        grads: list[torch.Tensor | None] = [None] * len(params)
        if not want_input:
            input_grad = None
        elif input_grad is None:
            input_grad = torch.zeros(source.shape, dtype=reader.dtype, device=source.device)
        wanted = [o for o, c in enumerate(cotangents) if c is not None]
        owned_by = {}
        for i in self.my_crops(plan):
            owned = [(o, owned_slices(plan, plan.crops[i], o)) for o in wanted]
            owned_by[i] = [(o, idx) for o, idx in owned if idx is not None]
        order = [i for i in backward_order(list(owned_by), kept) if owned_by[i]]
        usable = {i for i, k in kept.items() if k.leaf is not None or not want_input}
        groups = crop_groups(plan, order, usable, self.options.crop_batch)
        # Constant crops share one backward per class, except when the input gradient is
        # wanted (each crop's differs).
        skipping = self.options.skip_constant and not want_input and not plan.positional
        classes: dict = {}  # class -> (the representative's Look, its member crops)
        stats = PassStats("backward")
        amp = autocast.apply if autocast is not None else contextlib.nullcontext

        def backprop(ids: list[int], per_crop: list, leafs: list) -> None:
            """Backpropagate each crop's owned blocks with their cotangents; add the
            parameter gradients and scatter the input gradients."""
            pieces, cots = [], []
            for i, leaves in zip(ids, per_crop):
                for o, (dst, src) in owned_by[i]:
                    piece = leaves[o][src]
                    if piece.grad_fn is not None:
                        pieces.append(piece)
                        cots.append(cotangents[o][dst].to(device=piece.device, dtype=piece.dtype))
            if not pieces:
                return
            inputs = list(params) + [leaf for leaf in leafs if leaf is not None]
            got = torch.autograd.grad(pieces, inputs, cots, allow_unused=True)
            _add(grads, got[: len(params)])
            input_grads = iter(got[len(params) :])
            for i, leaf in zip(ids, leafs):
                g = next(input_grads) if leaf is not None else None
                if g is None:
                    continue
                if isinstance(input_grad, DiskMap):
                    input_grad.add(plan.crops[i].box, g)
                else:
                    scatter_add(input_grad, plan.crops[i].box, g)  # type: ignore[arg-type]

        boxes = [plan.crops[i].box for g in groups if g[0] not in usable for i in g]
        # batchnorm_eval: checkpointed blocks recompute inside autograd.grad, out of the mode.
        with (
            self._reading(source, reader, boxes) as source,
            self._context(rng),
            batchnorm_eval(self.model),
        ):
            for group in self._progress(groups, "backward"):
                with torch.enable_grad(), amp():
                    if group[0] in usable:
                        stored = kept.pop(group[0])
                        ids, per_crop, leafs = group, [stored.outputs], [stored.leaf]
                        del stored
                        stats.crops += 1
                    elif skipping:
                        rest = []
                        for look in (self._look(source, reader, plan, i) for i in group):
                            stats.add(look.key)
                            if look.key is None:
                                rest.append(look)
                            else:
                                classes.setdefault(look.key, (look, []))[1].append(look.index)
                        ids, leafs = [look.index for look in rest], [None] * len(rest)
                        inputs = [look.input() for look in rest]
                        crops = [look.index for look in rest]
                        per_crop = self._call(plan, inputs, rng, state, crops) if rest else []
                        del rest, inputs
                    else:
                        ids = group
                        per_crop, leafs = self._run_group(
                            source, reader, plan, group, rng, want_input, state
                        )
                        stats.crops += len(group)
                    stats.computed += len(ids)
                    backprop(ids, per_crop, leafs)
                del per_crop, leafs
            # One backward per class: the representative with its members' owned cotangent
            # blocks added at their places in its output (exact by linearity).
            for look, members in classes.values():
                with torch.enable_grad(), amp():
                    leaves = self._call(plan, [look.input()], rng, state, [look.index])[0]
                stats.computed += 1
                blocks = [[(o, dst, src) for o, (dst, src) in owned_by[i]] for i in members]
                summed = class_cotangents(leaves, blocks, cotangents)
                pairs = [
                    (leaves[o], c)
                    for o, c in enumerate(summed)
                    if c is not None and leaves[o].grad_fn is not None
                ]
                if pairs:
                    outs, cots = zip(*pairs)
                    _add(grads, torch.autograd.grad(outs, list(params), cots, allow_unused=True))
                del leaves, summed, pairs
        self._report(stats)
        return grads, input_grad

    def _reading(
        self, source: ImageSource, reader: CropReader, boxes: list
    ) -> contextlib.AbstractContextManager:
        """``source``, read ahead in a background thread if it is lazy (see ``prefetch``)."""
        depth = self.options.prefetch
        if depth is None:  # auto: only where a core is free for the reader
            free = reader.device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)
            depth = 1 if free else 0
        if depth and source.tensor is None and len(boxes) > 1:
            return Prefetched(source, boxes, depth)
        return contextlib.nullcontext(source)

    def _report(self, stats: PassStats) -> None:
        self.last_stats[stats.kind] = stats
        if self.options.verbose and stats.constant:
            print(stats)

    def _all_reduce(self, grads, params, input_grad):
        """Sum the gradients of every rank's crops (one collective per dtype)."""
        import torch.distributed as dist

        group = self.options.process_group
        full = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, g in enumerate(full):
            by_dtype.setdefault(g.dtype, []).append(k)
        for ks in by_dtype.values():
            flat = torch.cat([full[k].reshape(-1) for k in ks])
            dist.all_reduce(flat, group=group)
            pos = 0
            for k in ks:
                n = full[k].numel()
                full[k] = flat[pos : pos + n].view_as(full[k]).clone()
                pos += n
        if isinstance(input_grad, torch.Tensor):
            dist.all_reduce(input_grad, group=group)
        return full, input_grad


def _add(grads: list, got: Sequence[torch.Tensor | None]) -> None:
    """``grads[k] += got[k]`` where ``got[k]`` is not None (None: no gradient yet).

    The first gradient is copied before anything is added to it in place: autograd can hand
    back a tensor it did not make (the cotangent itself, where an output is a statistic
    passed through unchanged), and the caller's tensors must not change."""
    for k, g in enumerate(got):
        if g is not None:
            grads[k] = g.clone() if grads[k] is None else grads[k].add_(g)


@contextlib.contextmanager
def _stack(*contexts) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _check_output(plan: TilePlan, o: int, leaf: torch.Tensor, src: tuple) -> None:
    """A crop's output ``o`` must have the planned shape outside the spatial dims and reach
    at least as far as its owned block inside them."""
    shape = plan.output_shapes[o]
    dims = set(plan.output_spatial_dims[o])
    for i, (a, b) in enumerate(zip(leaf.shape, shape)):
        if i in dims:
            if src[i].stop > a:
                raise PlanError(
                    f"streamify: a crop's output {o} has size {a} along dim {i}, smaller "
                    f"than planned ({src[i].stop}); please report this with the model."
                )
        elif a != b:
            raise PlanError(
                f"streamify: a crop's output {o} has shape {tuple(leaf.shape)}, which does "
                f"not match the planned {shape} outside the spatial dims."
            )
