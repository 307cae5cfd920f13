"""Run a :class:`TilePlan`: the streamed forward, the streamed vector-Jacobian product and
the autograd function that connects them. Never plans; takes plans as given.

Backward by linearity: the output positions are partitioned among the crops, so the
parameter gradient ``J^T g`` is the sum over crops of the gradient of
``<g restricted to the crop's block, f(crop)>``, which ordinary autograd computes exactly
on the crop. Each crop is recomputed with autograd, backpropagated and freed before the
next one, so only one crop graph is alive at a time. The forward keeps the graph of its
last crop (the backward's first, so this costs no extra peak memory), or with a memory
budget the graphs of as many of its last crops as fit: the backward starts with those (in
reverse order) and skips their recompute.

With a ``torch.distributed`` process group, each rank runs its share of the crops; the
stitched outputs (zero outside a rank's blocks) and the gradients are summed across the
ranks, so every rank ends with the same output map and the full gradients.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ._errors import PlanError
from ._inputs import ArrayImage
from ._plan import Crop, TilePlan, kept_count
from ._trace import batchnorm_eval

__all__ = ["Executor", "RngState", "StreamedFunction", "model_dtype"]


@dataclass(frozen=True)
class _AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype

    @staticmethod
    def capture(device_type: str) -> _AutocastState:
        return _AutocastState(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )

    def apply(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (else the default dtype)."""
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
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


class Executor:
    """Runs plans for one model with fixed options."""

    def __init__(
        self,
        model: nn.Module,
        *,
        verbose: bool,
        deterministic: bool,
        normalize: tuple[Sequence[float], Sequence[float]] | None,
        device: torch.device | None,
        memory_budget: int | None = None,
        channels_last: bool = False,
        process_group: Any = None,
        crop_batch: int = 1,
    ):
        self.model = model
        self.verbose = verbose
        self.deterministic = deterministic
        self.normalize = normalize
        self.device = device
        self.memory_budget = memory_budget
        self.channels_last = channels_last
        self.process_group = process_group
        self.crop_batch = crop_batch

    # ------------------------------------------------------------------ inputs

    def compute_device(self, x: torch.Tensor) -> torch.device:
        if self.device is not None:
            return self.device
        for p in self.model.parameters():
            return p.device
        return x.device

    def compute_dtype(self, x: torch.Tensor | None) -> torch.dtype:
        """The input's float dtype, else (uint8 or no input) the model's parameter dtype."""
        if x is not None and x.is_floating_point():
            return x.dtype
        return model_dtype(self.model)

    def read(
        self, x: torch.Tensor, crop: Crop, requires_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model input for one crop, and the leaf whose gradient is the input gradient."""
        raw = _gather(x, crop.box).to(self.compute_device(x), non_blocking=True)
        dtype = self.compute_dtype(x)
        leaf = None
        if requires_grad:
            leaf = raw.detach().to(dtype).requires_grad_(True)
            raw = leaf
        if self.normalize is None:
            return self._layout(raw), leaf
        mean, std = self.normalize
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean_t = torch.as_tensor(mean, dtype=dtype, device=raw.device).reshape(shape)
        std_t = torch.as_tensor(std, dtype=dtype, device=raw.device).reshape(shape)
        if leaf is None:  # a private float copy, normalised in place: one crop-sized buffer
            crop_in = raw.to(dtype, copy=True)
            if not x.is_floating_point():
                crop_in.div_(255.0)
            return self._layout(crop_in.sub_(mean_t).div_(std_t)), None
        crop_in = leaf if x.is_floating_point() else leaf / 255.0
        return self._layout((crop_in - mean_t) / std_t), leaf

    def _layout(self, crop: torch.Tensor) -> torch.Tensor:
        if self.channels_last and crop.dim() in (4, 5):
            fmt = torch.channels_last if crop.dim() == 4 else torch.channels_last_3d
            return crop.contiguous(memory_format=fmt)
        return crop

    # ------------------------------------------------------------------ helpers

    def _progress(self, items: list, what: str):
        if self.verbose:
            from tqdm.auto import tqdm

            return tqdm(items, desc=f"tilefn {what}", unit="tile", leave=False)
        return items

    def my_crops(self, plan: TilePlan) -> list[int]:
        """Indices of the crops this process runs, in plan order: all of them, or with a
        process group this rank's share (largest crops first to the least loaded rank,
        the same on every rank because the plan is)."""
        if self.process_group is None:
            return list(range(len(plan.crops)))
        import torch.distributed as dist

        world = dist.get_world_size(self.process_group)
        rank = dist.get_rank(self.process_group)
        if plan.n_tiles < world:
            raise PlanError(
                f"streamify: the plan has {plan.n_tiles} tiles for {world} ranks of the "
                "process group, so some ranks would have no work. Use a smaller tile_size "
                "(or fewer ranks)."
            )
        load = [0] * world
        mine = []
        order = sorted(range(plan.n_tiles), key=lambda i: (-_volume(plan.crops[i].box), i))
        for i in order:
            r = min(range(world), key=lambda j: (load[j], j))
            load[r] += _volume(plan.crops[i].box)
            if r == rank:
                mine.append(i)
        return sorted(mine)

    def kept_crops(self, plan: TilePlan, mine: list[int]) -> set[int]:
        """The crops whose autograd graphs the forward keeps for the backward: the last
        ones this process runs, as many as the memory budget allows after the streaming
        working set (``plan.memory_estimate``, which already holds one crop graph).

        Without a budget, the last crop only: its graph is what the backward would
        rebuild first, so keeping it costs no memory beyond the estimate's working set
        and saves one crop's recompute (a whole recompute when the plan has one tile)."""
        if not mine:
            return set()
        if self.memory_budget is None:
            return {mine[-1]}
        volumes = [_volume(plan.crops[i].box) for i in mine]
        per_px = plan.crop_activation_bytes / max(volumes)
        spare = self.memory_budget - plan.memory_estimate + plan.crop_activation_bytes
        n = kept_count(volumes, per_px, spare)
        return set(mine[len(mine) - n :])

    @staticmethod
    def _indices(plan: TilePlan, crop: Crop, o: int):
        """(global index, local index) of output ``o``'s block in this crop, or None."""
        dims = plan.output_spatial_dims[o]
        ndim = len(plan.output_shapes[o])
        dst: list[Any] = [slice(None)] * ndim
        src: list[Any] = [slice(None)] * ndim
        for k, (lo, hi) in enumerate(crop.blocks[o]):
            if hi <= lo:
                return None
            start = crop.local_starts[o][k]
            dst[dims[k]] = slice(lo, hi)
            src[dims[k]] = slice(start, start + hi - lo)
        return tuple(dst), tuple(src)

    def _run(self, x_crop: torch.Tensor, plan: TilePlan, rng: RngState | None) -> list:
        if rng is not None:
            rng.restore()
        leaves = tree_flatten(self.model(x_crop))[0]
        if len(leaves) != len(plan.output_shapes):  # pragma: no cover - checked by trace
            raise PlanError("streamify: the model returned a different number of outputs")
        return leaves

    @staticmethod
    def _check(plan: TilePlan, o: int, leaf: torch.Tensor, src) -> None:
        shape = plan.output_shapes[o]
        dims = set(plan.output_spatial_dims[o])
        for i, (a, b) in enumerate(zip(leaf.shape, shape)):
            if i in dims:
                s = src[i]
                if s.stop > a:
                    raise PlanError(
                        f"streamify: a crop's output {o} has size {a} along dim {i}, smaller "
                        f"than planned ({s.stop}); please report this with the model."
                    )
            elif a != b:
                raise PlanError(
                    f"streamify: a crop's output {o} has shape {tuple(leaf.shape)}, which does "
                    f"not match the planned {shape} outside the spatial dims."
                )

    def groups(self, plan: TilePlan, order: Sequence[int], alone: set[int]) -> list[list[int]]:
        """Consecutive crops of one shape, up to ``crop_batch`` per model call. Crops in
        ``alone`` (kept graphs) run by themselves; with per-sample randomness every crop
        does, since a batch would draw different numbers for its samples."""
        k = 1 if plan.uses_rng else self.crop_batch
        out: list[list[int]] = []
        for i in order:
            last = out[-1] if out else None
            if (
                last is not None
                and len(last) < k
                and i not in alone
                and last[0] not in alone
                and _lengths(plan.crops[i].box) == _lengths(plan.crops[last[0]].box)
            ):
                last.append(i)
            else:
                out.append([i])
        return out

    def _run_group(
        self, x, plan: TilePlan, group: list[int], rng: RngState | None, want_input: bool
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor | None]]:
        """Run the model once on the crops of ``group`` stacked along the batch dim; per
        crop, its output leaves and its input leaf (or None)."""
        reads = [self.read(x, plan.crops[i], requires_grad=want_input) for i in group]
        if len(group) == 1:
            return [self._run(reads[0][0], plan, rng)], [reads[0][1]]
        batch = torch.cat([r[0] for r in reads])
        leaves = self._run(batch, plan, rng)
        n = reads[0][0].shape[0]
        for leaf in leaves:
            if leaf.dim() == 0 or leaf.shape[0] != n * len(group):
                raise PlanError(
                    f"streamify: with crop_batch={self.crop_batch} the model got {len(group)} "
                    f"crops stacked along dim 0 (batch {n * len(group)}), but an output has "
                    f"shape {tuple(leaf.shape)}: the model's outputs must keep the batch dim "
                    "first. Use crop_batch=1 for this model."
                )
        per_crop = [[leaf[j * n : (j + 1) * n] for leaf in leaves] for j in range(len(group))]
        return per_crop, [r[1] for r in reads]

    # ------------------------------------------------------------------ forward / vjp

    def forward(
        self,
        x: torch.Tensor,
        plan: TilePlan,
        rng: RngState | None = None,
        keep: bool = False,
        want_input: bool = False,
    ) -> tuple[list[torch.Tensor], dict[int, _Kept]]:
        """The stitched outputs, and with ``keep=True`` (under grad) the graphs of the crops
        whose recompute the backward can skip (see :meth:`kept_crops`)."""
        mine = self.my_crops(plan)
        kept_ids = self.kept_crops(plan, mine) if keep else set()
        kept: dict[int, _Kept] = {}
        outs: list[torch.Tensor | None] = [None] * len(plan.output_shapes)
        new = torch.Tensor.new_zeros if self.process_group is not None else torch.Tensor.new_empty
        with batchnorm_eval(self.model), _deterministic(self.deterministic):
            for group in self._progress(self.groups(plan, mine, kept_ids), "forward"):
                grad = group[0] in kept_ids
                with torch.set_grad_enabled(grad):
                    per_crop, inputs = self._run_group(x, plan, group, rng, want_input and grad)
                for i, leaves, leaf in zip(group, per_crop, inputs):
                    crop = plan.crops[i]
                    for o, out in enumerate(leaves):
                        if outs[o] is None:
                            outs[o] = new(out, plan.output_shapes[o])
                        idx = self._indices(plan, crop, o)
                        if idx is None:
                            continue
                        self._check(plan, o, out, idx[1])
                        outs[o][idx[0]] = out[idx[1]].detach()
                    if grad:
                        kept[i] = _Kept(leaves, leaf)
                del per_crop, inputs
        if self.process_group is not None:
            import torch.distributed as dist

            for out in outs:
                dist.all_reduce(out, group=self.process_group)
        return outs, kept  # type: ignore[return-value]

    def vjp(
        self,
        x: torch.Tensor,
        plan: TilePlan,
        cotangents: Sequence[torch.Tensor | None],
        params: Sequence[torch.Tensor],
        want_input: bool,
        rng: RngState | None = None,
        autocast: _AutocastState | None = None,
        kept: dict[int, _Kept] | None = None,
    ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        # The recompute replays the forward's draws from ``rng``; leave the caller's RNG as
        # it was.
        saved = RngState(rng.device) if rng is not None else None
        try:
            grads, input_grad = self._vjp(
                x, plan, cotangents, params, want_input, rng, autocast, kept or {}
            )
        finally:
            if saved is not None:
                saved.restore()
        if self.process_group is not None:
            grads, input_grad = self._all_reduce(grads, params, input_grad)
        return grads, input_grad

    def _vjp(self, x, plan, cotangents, params, want_input, rng, autocast, kept):
        grads: list[torch.Tensor | None] = [None] * len(params)
        input_grad = None
        if want_input:
            input_grad = torch.zeros(x.shape, dtype=self.compute_dtype(x), device=x.device)
        # Kept graphs first (the last crops of the forward), so their memory goes first.
        order = sorted(self.my_crops(plan), key=lambda i: (i not in kept, -i))
        owned_by = {}
        for i in order:
            owned = [
                (o, self._indices(plan, plan.crops[i], o))
                for o, c in enumerate(cotangents)
                if c is not None
            ]
            owned_by[i] = [(o, idx) for o, idx in owned if idx is not None]
        order = [i for i in order if owned_by[i]]
        usable = {i for i, k in kept.items() if k.leaf is not None or not want_input}
        with batchnorm_eval(self.model), _deterministic(self.deterministic):
            for group in self._progress(self.groups(plan, order, usable), "backward"):
                with (
                    torch.enable_grad(),
                    autocast.apply() if autocast is not None else contextlib.nullcontext(),
                ):
                    if group[0] in usable:
                        stored = kept.pop(group[0])
                        per_crop, leafs = [stored.outputs], [stored.leaf]
                        del stored
                    else:
                        per_crop, leafs = self._run_group(x, plan, group, rng, want_input)
                    pieces, cots = [], []
                    for i, leaves in zip(group, per_crop):
                        for o, (dst, src) in owned_by[i]:
                            piece = leaves[o][src]
                            if piece.grad_fn is None:
                                continue
                            pieces.append(piece)
                            cots.append(
                                cotangents[o][dst].to(device=piece.device, dtype=piece.dtype)
                            )
                del per_crop
                if not pieces:
                    continue
                inputs = list(params) + [leaf for leaf in leafs if leaf is not None]
                got = torch.autograd.grad(pieces, inputs, cots, allow_unused=True)
                for k, g in enumerate(got[: len(params)]):
                    if g is None:
                        continue
                    grads[k] = g if grads[k] is None else grads[k].add_(g)
                input_grads = iter(got[len(params) :])
                for i, leaf in zip(group, leafs):
                    if leaf is None:
                        continue
                    g = next(input_grads)
                    if g is not None:
                        _scatter_add(input_grad, plan.crops[i].box, g)  # type: ignore[arg-type]
                del pieces, got, leafs
        return grads, input_grad

    def _all_reduce(self, grads, params, input_grad):
        """Sum the gradients of every rank's crops (one collective per dtype)."""
        import torch.distributed as dist

        full = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, g in enumerate(full):
            by_dtype.setdefault(g.dtype, []).append(k)
        for ks in by_dtype.values():
            flat = torch.cat([full[k].reshape(-1) for k in ks])
            dist.all_reduce(flat, group=self.process_group)
            pos = 0
            for k in ks:
                n = full[k].numel()
                full[k] = flat[pos : pos + n].view_as(full[k]).clone()
                pos += n
        if input_grad is not None:
            dist.all_reduce(input_grad, group=self.process_group)
        return full, input_grad


@dataclass
class _Kept:
    """A crop's outputs with their autograd graph, kept from the forward for the backward."""

    outputs: list[torch.Tensor]
    leaf: torch.Tensor | None


def _lengths(box: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def _volume(box: tuple[tuple[int, int], ...]) -> int:
    v = 1
    for a, b in box:
        v *= b - a
    return v


def _segments(start: int, stop: int, size: int) -> list[tuple[int, int, int]]:
    """Cut ``[start, stop)`` of a periodic dim of ``size`` into ``(lo, hi, local_lo)``
    pieces that lie inside ``[0, size)``."""
    out = []
    pos = start
    while pos < stop:
        lo = pos % size
        hi = min(size, lo + stop - pos)
        out.append((lo, hi, pos - start))
        pos += hi - lo
    return out


def _pieces(x: torch.Tensor, box: tuple[tuple[int, int], ...]):
    """(image index, crop index) pairs covering a crop box that may wrap around the image
    (circular padding)."""
    first = x.dim() - len(box)
    per_dim = [_segments(a, b, x.shape[first + k]) for k, (a, b) in enumerate(box)]
    for combo in itertools.product(*per_dim):
        img = (Ellipsis,) + tuple(slice(lo, hi) for lo, hi, _ in combo)
        local = (Ellipsis,) + tuple(slice(ll, ll + hi - lo) for lo, hi, ll in combo)
        yield img, local


def _inside(x: torch.Tensor, box: tuple[tuple[int, int], ...]) -> bool:
    first = x.dim() - len(box)
    return all(0 <= a and b <= x.shape[first + k] for k, (a, b) in enumerate(box))


def _gather(x: torch.Tensor | ArrayImage, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
    if isinstance(x, ArrayImage):
        if _inside(x, box):
            return x.read(box)
        first = x.dim() - len(box)
        out = torch.empty(x.shape[:first] + tuple(b - a for a, b in box), dtype=x.dtype)
        for img, local in _pieces(x, box):
            out[local] = x.read([(s.start, s.stop) for s in img[1:]])
        return out
    if _inside(x, box):
        return x[(Ellipsis,) + tuple(slice(a, b) for a, b in box)]
    first = x.dim() - len(box)
    out = x.new_empty(x.shape[:first] + tuple(b - a for a, b in box))
    for img, local in _pieces(x, box):
        out[local] = x[img]
    return out


def _scatter_add(target: torch.Tensor, box: tuple[tuple[int, int], ...], g: torch.Tensor) -> None:
    g = g.to(target.device)
    for img, local in _pieces(target, box):
        target[img] += g[local]


class RngState:
    """The RNG state at the start of a streamed forward, replayed before every crop so that
    per-sample randomness (stochastic depth, Dropout2d) draws the same in every crop and in
    the recompute."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = None
        self.device = device
        if device.type == "cuda":
            self.cuda = torch.cuda.get_rng_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class StreamedFunction(torch.autograd.Function):
    """Autograd node of a streamed forward: inputs are ``x`` and the parameters, so that
    ordinary accumulation into ``.grad`` (and DDP's hooks) happens for them."""

    @staticmethod
    def forward(ctx, executor: Executor, plan: TilePlan, x: torch.Tensor, *params: torch.Tensor):
        device = executor.compute_device(x)
        ctx.executor, ctx.plan, ctx.params = executor, plan, params
        ctx.autocast = _AutocastState.capture(device.type)
        ctx.rng = RngState(device) if plan.uses_rng else None
        if isinstance(x, torch.Tensor):
            ctx.save_for_backward(x)
        else:  # an ArrayImage: read again, crop by crop, in the backward
            ctx.image = x
        ctx.set_materialize_grads(False)
        want_input = isinstance(x, torch.Tensor) and x.requires_grad
        outs, ctx.kept = executor.forward(x, plan, ctx.rng, keep=True, want_input=want_input)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *cotangents):
        (x,) = (ctx.image,) if hasattr(ctx, "image") else ctx.saved_tensors
        want_input = ctx.needs_input_grad[2]
        executor: Executor = ctx.executor
        kept, ctx.kept = ctx.kept, {}  # used once; a second backward recomputes
        grads, input_grad = executor.vjp(
            x, ctx.plan, cotangents, ctx.params, want_input, ctx.rng, ctx.autocast, kept
        )
        return (None, None, input_grad, *grads)
