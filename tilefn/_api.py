"""The public entry points: :func:`streamify` and :func:`plan`.

They check their inputs, plan (``_plan``) and bind an executor (``_execute``); errors get
the context of the call.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.parameter import is_lazy

from ._autograd import StreamedCall, StreamedFunction
from ._chain import ChainCall, ChainFunction, run_chain
from ._compat import share_registries, tree_flatten, tree_unflatten
from ._constant import PassStats
from ._errors import InputError, InputTypeError, OptionError, UnsupportedLayerError
from ._execute import Executor, RngState, model_state
from ._inputs import CropReader, ImageSource, as_source, check_shape, model_dtype
from ._options import StreamOptions, canonical_tile, check_budget, check_tile_option
from ._plan import TilePlan
from ._planner import PlanCache, auto_plan, make_plan, model_fingerprint
from ._staged import SegmentedPlan, StagedKept, StagedPlan, StagedProgram
from ._trace import Trace, trace

__all__ = ["Streamed", "StreamedBackbone", "streamify", "plan"]

TileSize = int | Sequence[int] | str


class Streamed(NamedTuple):
    """What :func:`streamify` returns: unpack it, or use the names."""

    backbone: StreamedBackbone
    vjp: Callable[[torch.Tensor, Any], tuple[dict[str, torch.Tensor], torch.Tensor | None]]


def plan(
    model: nn.Module,
    input_shape: Sequence[int],
    tile_size: TileSize,
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    **options: Any,
) -> TilePlan | StagedPlan | SegmentedPlan:
    """The tiling plan of ``model`` on inputs of ``input_shape``, from shapes only (for a
    model with whole-image ops, a :class:`~tilefn.StagedPlan`: one plan per stage; with
    stage cuts, a :class:`~tilefn.SegmentedPlan`: one plan per segment).

    The model is recorded on meta tensors (no data, no memory); nothing is computed on an
    image. The plan lists the crops, the output blocks each one owns, the alignment, the
    overlap factor ``a`` and an estimate of peak memory, and prints as a table.

    Args:
        model: The network to stream.
        input_shape: ``(N, C, *spatial)``.
        tile_size: Largest crop side in input pixels, an int or one int per spatial dim,
            or ``"auto"`` to choose it from ``memory_budget``.
        dtype: The compute dtype, used for the memory estimate; defaults to the dtype of
            the model's parameters.
        memory_budget: Bytes; needed with ``tile_size="auto"`` (see :func:`streamify`).
        **options: Other options of :func:`streamify` that change the plan (``cut_at``,
            ``spill_dir``, ``batchnorm``); the plan is then the one ``backbone.plan`` gives.

    Example:
        >>> import torch, tilefn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.MaxPool2d(2))
        >>> p = tilefn.plan(net, (1, 3, 256, 256), tile_size=128)
        >>> p.n_tiles, p.alignment
        (9, (2, 2))
    """
    shape = check_shape(tuple(input_shape), "plan")
    budget = check_budget(memory_budget, "plan")
    tile_size = canonical_tile(tile_size)
    check_tile_option(tile_size, budget, "plan")
    dtype = dtype or model_dtype(model)
    if options:
        opts = StreamOptions.from_kwargs({**options, "memory_budget": budget}, "plan")
        return StreamedBackbone(model, tile_size, opts)._plan_of(shape, dtype)
    found = trace(model, shape, dtype, batch_stats=False)
    if found.barriers:
        program = StagedProgram(model, found, StreamOptions())
        return program.plan(shape, tile_size, dtype, budget)[0]
    if tile_size == "auto":
        return auto_plan(model, shape, budget, dtype)[0]  # type: ignore[arg-type]
    return make_plan(model, shape, tile_size, dtype)[0]


def _human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


class StreamedBackbone(nn.Module):
    """``model``, computed tile by tile. Returned by :func:`streamify`.

    It holds ``model`` itself and shares its parameters, buffers and submodules (same
    objects), so ``state_dict()`` keys equal ``model.state_dict()`` keys, an optimizer
    built on ``model.parameters()`` keeps working, and ``.to()``, ``.train()`` and
    ``.eval()`` act on ``model``. Plans are cached per backbone (the 64 most recently used
    input shapes).
    """

    def __init__(self, model: nn.Module, tile_size: TileSize, options: StreamOptions):
        super().__init__()
        object.__setattr__(self, "_model", model)
        share_registries(self, model)  # the backbone *is* the model to nn.Module
        self.tile_size = tile_size
        self.options = options
        self._executor = Executor(model, options)
        self._plans = PlanCache()
        self._programs: dict = {}  # (shape, dtype, fingerprint) -> StagedProgram or None
        self._shown: set[int] = set()  # plans already printed or warned about
        self._segments: dict = {}  # (shape, dtype, fingerprint) -> _Chain
        # What ran the last pass: the executor, a staged program, or a chain of segments.
        self._last_run: Any = self._executor
        if options.cut_at is not None:
            _check_cuts(model, options.cut_at)

    @property
    def model(self) -> nn.Module:
        """The wrapped model (the same object that was passed to :func:`streamify`)."""
        return self._model

    @property
    def last_stats(self) -> dict[str, PassStats]:
        """What the last streamed ``"forward"`` and ``"backward"`` passes computed: crops
        visited, constant crops (one value per sample and channel) and the classes of equal
        ones, crops computed and skipped (see the option ``skip_constant``); for a staged
        model or a trunk with stage cuts, summed over its stages or segments."""
        last = self._last_run
        if isinstance(last, _Chain):
            return _merged([seg.last_stats for seg in last.segments])
        if isinstance(last, StagedProgram):
            return _merged([e.last_stats for e in last.executors])
        return dict(self._executor.last_stats)

    def train(self, mode: bool = True) -> StreamedBackbone:
        super().train(mode)
        self._model.training = mode
        return self

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size!r}, model={type(self._model).__name__}"

    def _source(self, x: Any) -> tuple[ImageSource, CropReader]:
        source = as_source(x, uint8_ok=self.options.normalize is not None)
        return source, self.reader_for(source)

    def reader_for(self, source: ImageSource) -> CropReader:
        """How crops of ``source`` become this model's inputs."""
        return CropReader.for_image(
            source,
            self._model,
            device=self.options.device,
            normalize=self.options.normalize,
            channels_last=self.options.channels_last,
        )

    def _spilled(self, chain: _Chain, source: ImageSource) -> Any:
        """The forward of a segmented trunk whose maps go to disk: one autograd node for
        the chain (see ``_chain``)."""
        names, frozen, params = [], [], []
        for seg in chain.segments:
            state = model_state(seg.model)
            trained = [n for n, p in seg.model.named_parameters() if p.requires_grad]
            names.append(trained)
            frozen.append({n: t for n, t in state.items() if n not in trained})
            params += [state[n] for n in trained]
        call = ChainCall(chain.segments, source, names, frozen, chain.spill_dir)
        tensor = source.tensor
        x_grad = tensor is not None and tensor.requires_grad
        if torch.is_grad_enabled() and (x_grad or params):
            outs = ChainFunction.apply(call, tensor, *params)[:-1]
        else:
            outs, _ = run_chain(call, tensor, params, keep=False)
            for m in call.maps:
                m.close()
        return tree_unflatten(list(outs), call.out_spec)

    def plan(
        self, shape_or_input: Sequence[int] | torch.Tensor | ImageSource
    ) -> TilePlan | StagedPlan | SegmentedPlan:
        """The cached :class:`TilePlan` for this input (or input shape); for a model with
        whole-image ops, a :class:`StagedPlan` with one plan per stage; with stage cuts, a
        :class:`SegmentedPlan` with one plan per segment."""
        if isinstance(shape_or_input, (tuple, list, torch.Size)):
            shape = check_shape(tuple(shape_or_input), "plan")
            dtype = model_dtype(self._model)
        else:
            source, reader = self._source(shape_or_input)
            shape, dtype = tuple(source.shape), reader.dtype
        return self._plan_of(shape, dtype)

    def _plan_of(
        self, shape: tuple[int, ...], dtype: torch.dtype
    ) -> TilePlan | StagedPlan | SegmentedPlan:
        if self.options.cut_at is not None:
            chain = self._segmented(shape, dtype)
            plans, seg_shape = [], shape
            for seg in chain.segments:
                plans.append(seg._plan_of(seg_shape, dtype))
                seg_shape = plans[-1].output_shapes[0]
            return SegmentedPlan(
                chain.cuts, tuple(plans), chain.map_shapes, chain.map_sizes, chain.spill_dir
            )
        return self._plan(shape, dtype)[0]

    def _segmented(self, shape: tuple[int, ...], dtype: torch.dtype) -> _Chain:
        """The segments of a trunk with stage cuts on this input shape: the cut names, one
        backbone per segment (tile scaled by the stride at its cut; budget shared), the
        stored maps between them, and whether those go to disk: when the maps and their
        gradients would take more than half of ``memory_budget``."""
        key = (shape, dtype, model_fingerprint(self._model))
        if key not in self._segments:
            inputs = _child_inputs(self._model, shape, dtype)
            staged: set[str] = set()
            if self.options.cut_at == "auto":
                program = self._program(shape, dtype)
                staged = {b.path.split(".")[0] for b in program.barriers} if program else set()
            cuts = _choose_cuts(self._model, self.options.cut_at, inputs, shape, staged)
            children = dict(self._model.named_children())
            names = list(children)
            starts = [0] + [names.index(c) for c in cuts] + [len(names)]
            itemsize = torch.empty((), dtype=dtype).element_size()
            map_sizes = tuple(math.prod(inputs[c]) * itemsize for c in cuts)
            budget = self.options.memory_budget
            share, spill_dir = None, None
            if budget is not None:
                held = 2 * sum(map_sizes)
                if held > budget / 2:
                    if self.options.process_group is not None:
                        raise OptionError(
                            "streamify: the stage cuts' stored maps and their gradients "
                            f"({_human(held)}) need more than half of memory_budget "
                            f"({_human(budget)}), so they would go to disk, which is not "
                            "supported with process_group= yet. Raise memory_budget, or "
                            "leave cut_at=None."
                        )
                    spill_dir, held = self.options.spill_dir or tempfile.gettempdir(), 0
                share = max(int((budget - held) / (len(starts) - 1)), 1)
            segments = []
            for k in range(len(starts) - 1):
                part = names[starts[k] : starts[k + 1]]
                module = nn.Sequential(OrderedDict((n, children[n]) for n in part))
                module.training = self._model.training  # the container's own flag only
                in_shape = shape if k == 0 else inputs[part[0]]
                tile = self.tile_size
                if k > 0 and tile != "auto":
                    tiles = (tile,) * (len(shape) - 2) if isinstance(tile, int) else tile
                    tile = tuple(
                        max(1, t * m // n) for t, m, n in zip(tiles, in_shape[2:], shape[2:])
                    )
                seg_budget = share
                if spill_dir is not None:  # its plan counts the maps it reads and writes
                    seg_budget += _on_disk(map_sizes, k)  # type: ignore[operator]
                opts = dataclasses.replace(
                    self.options,
                    cut_at=None,
                    memory_budget=seg_budget,
                    normalize=self.options.normalize if k == 0 else None,
                )
                segments.append(StreamedBackbone(module, tile, opts))
            shapes = tuple(inputs[c] for c in cuts)
            self._segments[key] = _Chain(tuple(cuts), segments, shapes, map_sizes, spill_dir)
        return self._segments[key]

    def _program(self, shape: tuple[int, ...], dtype: torch.dtype) -> StagedProgram | None:
        """The stages of the model on this input shape, or None if it has no whole-image
        ops (found by one recording on meta tensors, cached)."""
        key = (shape, dtype, model_fingerprint(self._model))
        if key not in self._programs:
            if len(self._programs) >= 64:
                self._programs.pop(next(iter(self._programs)))
            batch = self.options.batchnorm == "batch"
            found = trace(self._model, shape, dtype, batch_stats=batch)
            program = StagedProgram(self._model, found, self.options) if found.barriers else None
            self._programs[key] = program
        return self._programs[key]

    def _plan(
        self, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[TilePlan | StagedPlan, Trace]:
        _check_initialised(self._model)
        budget = self.options.memory_budget
        program = self._program(shape, dtype)
        if program is not None:
            plan_, trace_ = program.plan(shape, self.tile_size, dtype, budget)
        else:
            plan_, trace_ = self._plans.get(self._model, shape, self.tile_size, dtype, budget)
        if id(plan_) not in self._shown:
            self._shown.add(id(plan_))
            if self.options.verbose:
                print(plan_)
            if budget is not None and plan_.memory_estimate > budget:
                warnings.warn(
                    f"streamify: the plan for input shape {shape} with tile_size "
                    f"{self.tile_size!r} is estimated to need "
                    f"{_human(plan_.memory_estimate)}, more than memory_budget "
                    f"{_human(budget)}. Use a smaller tile_size, or tile_size='auto'.",
                    stacklevel=3,
                )
        return plan_, trace_

    # torch.compile(backbone) runs the streaming itself eagerly: crops, plans and the autograd
    # node are Python; compile the model before streamify for compiled crops.
    @torch.compiler.disable
    def forward(self, x: Any) -> Any:
        source, reader = self._source(x)
        if self.options.cut_at is not None:
            chain = self._segmented(tuple(source.shape), reader.dtype)
            self._last_run = chain
            if chain.spill_dir is not None:
                return self._spilled(chain, source)
            for seg in chain.segments:
                x = seg(x)
            return x
        plan_, trace_ = self._plan(tuple(source.shape), reader.dtype)
        state = model_state(self._model)  # what the model computes with now
        names = [n for n, p in self._model.named_parameters() if p.requires_grad]
        trained = set(names)
        tensor = source.tensor
        x_grad = tensor is not None and tensor.requires_grad
        # A model with whole-image ops runs as a staged program, through the same node.
        runner = self._runner(plan_, source, reader)
        rng = RngState(reader.device) if plan_.uses_rng else None
        if torch.is_grad_enabled() and (x_grad or names):
            call = StreamedCall(
                runner,
                plan_,
                source,
                reader,
                names,
                {n: t for n, t in state.items() if n not in trained},
                rng,
            )
            outs = StreamedFunction.apply(call, tensor, *(state[n] for n in names))[:-1]
        else:
            outs, _ = runner.forward(source, reader, plan_, rng, state=state)
        return tree_unflatten(list(outs), trace_.out_spec)

    def _runner(self, plan_, source: ImageSource, reader: CropReader):
        """What runs ``plan_``: the executor, or for a staged plan the staged program."""
        runner: Any = self._executor
        if isinstance(plan_, StagedPlan):
            runner = self._program(tuple(source.shape), reader.dtype)
        self._last_run = runner
        return runner

    def vjp(self, x: Any, cotangent: Any, *, saliency: bool) -> tuple[dict, torch.Tensor | None]:
        """``(param_grads, input_grad)`` of ``<cotangent, model(x)>``, tile by tile."""
        if self.options.cut_at is not None:
            return self._segmented_vjp(x, cotangent, saliency)
        source, reader = self._source(x)
        plan_, trace_ = self._plan(tuple(source.shape), reader.dtype)
        cots, spec = tree_flatten(cotangent)
        if spec != trace_.out_spec:
            raise InputTypeError(
                f"streamed_vjp: the cotangent must have the structure of the model's output "
                f"({trace_.out_spec}), got {spec}."
            )
        for i, (c, shape) in enumerate(zip(cots, plan_.output_shapes)):
            if isinstance(c, torch.Tensor) and c.is_complex():
                raise InputTypeError(
                    f"streamed_vjp: cotangent {i} is complex ({c.dtype}), but the model's "
                    "outputs are real. Pass a real cotangent (c.real, if that is meant)."
                )
            if not isinstance(c, torch.Tensor) or tuple(c.shape) != tuple(shape):
                got = f"shape {tuple(c.shape)}" if isinstance(c, torch.Tensor) else type(c).__name__
                raise InputError(
                    f"streamed_vjp: cotangent {i} must be a tensor of the output's shape "
                    f"{tuple(shape)}, got {got}."
                )
        named = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        # Replay the RNG state a forward from here would see (vjp leaves it untouched).
        rng = RngState(reader.device) if plan_.uses_rng else None
        runner, kept = self._runner(plan_, source, reader), None
        if isinstance(plan_, StagedPlan):
            # As torch.func.vjp(model, x) would: one forward (its statistics, and the running
            # statistics' update), then the backward; the RNG left as it was.
            saved = RngState(reader.device) if rng is not None else None
            values = runner.statistics(
                source, reader, plan_, rng, model_state(self._model), update=True
            )
            if saved is not None:
                saved.restore()
            kept = StagedKept({}, values)
        grads, input_grad = runner.vjp(
            source,
            reader,
            plan_,
            cots,
            [p for _, p in named],
            want_input=saliency,
            rng=rng,
            kept=kept,
            state=model_state(self._model),
        )
        param_grads = {
            n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)
        }
        return param_grads, input_grad

    def _segmented_vjp(self, x: Any, cotangent: Any, saliency: bool):
        """The vjp through the segments: their streamed forwards under autograd, and one
        backward through the chain (each segment's node backpropagates into its input map)."""
        named = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        source, _ = self._source(x)
        tensor = source.tensor
        with torch.enable_grad():
            xin = x
            if saliency and tensor is not None:
                xin = tensor.detach().requires_grad_()
            out = self.forward(xin)
            leaves, spec = tree_flatten(out)
            cots, cot_spec = tree_flatten(cotangent)
            if cot_spec != spec:
                raise InputTypeError(
                    f"streamed_vjp: the cotangent must have the structure of the model's output "
                    f"({spec}), got {cot_spec}."
                )
            wrt = [p for _, p in named] + ([xin] if xin is not x else [])
            got = torch.autograd.grad(leaves, wrt, cots, allow_unused=True)
        param_grads = {
            n: (g if g is not None else torch.zeros_like(p))
            for (n, p), g in zip(named, got[: len(named)])
        }
        return param_grads, (got[-1] if xin is not x else None)


@dataclass(frozen=True)
class _Chain:
    """A segmented trunk on one input shape (see :meth:`StreamedBackbone._segmented`)."""

    cuts: tuple[str, ...]
    segments: list[StreamedBackbone]
    map_shapes: tuple[tuple[int, ...], ...]
    map_sizes: tuple[int, ...]
    spill_dir: str | None  # None: the maps stay in memory


def _merged(parts: Sequence[dict[str, PassStats]]) -> dict[str, PassStats]:
    """The pass statistics of several stages or segments, summed per kind of pass."""
    out: dict[str, PassStats] = {}
    for stats in parts:
        for kind, s in stats.items():
            total = out.setdefault(kind, PassStats(kind))
            total.crops += s.crops
            total.constant += s.constant
            total.computed += s.computed
            total.classes |= s.classes
    return out


def _on_disk(map_sizes: Sequence[int], k: int) -> int:
    """Bytes that segment ``k``'s plan counts as resident (its input image, its output and
    the output's gradient) but that a chain on disk keeps in files."""
    before = map_sizes[k - 1] if k > 0 else 0
    after = 2 * map_sizes[k] if k < len(map_sizes) else 0
    return before + after


def _check_cuts(model: nn.Module, cut_at: Any) -> None:
    if not isinstance(model, nn.Sequential):
        raise OptionError(
            f"streamify: cut_at needs an nn.Sequential trunk (the cuts go between its "
            f"children), got a {type(model).__name__}. Build the trunk as nn.Sequential, or "
            "leave cut_at=None."
        )
    names = [n for n, _ in model.named_children()]
    if len(names) != len(model):
        raise OptionError(
            "streamify: cut_at needs every child of the Sequential trunk to be a distinct "
            "module, but one module appears twice; give each position its own module (e.g. "
            "a new nn.ReLU()), or leave cut_at=None."
        )
    if cut_at == "auto":
        return
    unknown = [c for c in cut_at if c not in names]
    if unknown or not cut_at:
        raise OptionError(
            f"streamify: cut_at names children of the trunk; {unknown or '[]'} are not among "
            f"them ({', '.join(names)})."
        )
    order = [names.index(c) for c in cut_at]
    if order != sorted(set(order)) or order[0] == 0:
        raise OptionError(
            "streamify: cut_at must name distinct children in the order the trunk runs them, "
            f"not its first child, got {list(cut_at)}."
        )


def _child_inputs(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    """The input shape of every child of a Sequential trunk, from one run on meta tensors
    (the model's own tensors are not touched: they may be torch.func's wrappers)."""
    shapes: dict[str, tuple[int, ...]] = {}
    meta = {
        n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in model_state(model).items()
    }

    def record(name: str) -> Callable:
        def hook(_: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [c.register_forward_pre_hook(record(n)) for n, c in model.named_children()]
    try:
        with torch.no_grad():
            x = torch.empty(shape, device="meta", dtype=dtype)
            functional_call(model, meta, (x,), strict=False)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _choose_cuts(
    model: nn.Module, cut_at: Any, inputs: dict, shape: tuple[int, ...], staged: set[str]
) -> list[str]:
    """The cuts of ``cut_at="auto"``: before each child with parameters whose input map has
    at most twice the image's elements, where the cut pays: at a new resolution (the crops'
    receptive field starts again), or next to a child with whole-image ops (``staged``: the
    streamed passes for their statistics then start at the stored map, not at the image)."""
    if cut_at != "auto":
        return list(cut_at)
    cuts, last = [], tuple(shape[2:])
    image = math.prod(shape)
    barriers_since = False  # the children since the last cut hold whole-image ops
    for k, (name, child) in enumerate(model.named_children()):
        size = inputs[name]
        pays = tuple(size[2:]) != last or name in staged or barriers_since
        has_params = next(child.parameters(), None) is not None
        if k > 0 and has_params and math.prod(size) <= 2 * image and pays:
            cuts.append(name)
            last, barriers_since = tuple(size[2:]), False
        barriers_since = barriers_since or name in staged
    return cuts


def _check_initialised(model: nn.Module) -> None:
    """Lazy layers (``nn.LazyConv2d``, ...) have no shapes to plan with until they first run."""
    for path, module in model.named_modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(is_lazy(t) for t in tensors):
            raise UnsupportedLayerError(
                f"streamify: layer '{path or '<root>'}' ({type(module).__name__}) has "
                "uninitialised (lazy) parameters, whose shapes tilefn needs to plan the "
                "tiles. How to fix: run the model once on a small input before streaming it, "
                "e.g. model(x[..., :64, :64]), which initialises them."
            )


def streamify(model: nn.Module, tile_size: TileSize, **options: Any) -> Streamed:
    """Like ``torch.func.vjp(model, x)``, but computed tile by tile.

    The forward pass is exact: ``backbone(x)`` equals ``model(x)`` up to float rounding,
    computed crop by crop (one crop at a time, or ``crop_batch`` same-shaped crops stacked
    in one model call). Gradients are exact for every parameter: each crop is recomputed
    with autograd during the backward pass (except the graphs the forward kept) and
    backpropagated with the part of the cotangent it owns, so peak memory grows with
    ``tile_size``, not with the image size.

    Whole-image ops inside the model (squeeze-excitation and image pooling: a mean over all
    positions; CBAM: a maximum over all positions; GroupNorm; InstanceNorm; BatchNorm in
    train mode with ``batchnorm="batch"``) are streamed exactly by *staged streaming*: each
    is a barrier, whose exact statistics
    come from a streamed pass of the model up to it; the plan is then a
    :class:`~tilefn.StagedPlan`. BatchNorm layers use their running statistics by default
    (``batchnorm="running"``); their affine parameters get exact gradients either way.

    Args:
        model: A network made of local ops (convolutions, pooling, pointwise ops,
            BatchNorm with running statistics, per-pixel Linear/LayerNorm, upsampling by
            an integer factor, residual additions and concatenations) and whole-image
            statistics (means, sums and maxima over all positions, GroupNorm,
            InstanceNorm), returning feature maps: a tensor or a tuple/list/dict of tensors.
        tile_size: Largest crop side, in input pixels, ever run through the model at
            once: an int, or one int per spatial dim. Bounds peak memory. ``"auto"``
            chooses it per input shape from ``memory_budget``: the plan the cost model
            expects to train fastest among those whose memory estimate fits.
        **options: Keyword options, each documented in full (and validated) by
            :class:`tilefn.StreamOptions`:

            - ``saliency`` (bool): ``streamed_vjp`` also returns the input gradient.
            - ``verbose`` (bool): a progress bar over tiles; each new plan is printed.
            - ``deterministic`` (bool): deterministic kernels, bit-identical reruns.
            - ``normalize`` (``(mean, std)``): per-channel normalisation of each crop on
              the compute device; the input may then be uint8.
            - ``device``: where crops are computed; the image may stay on the CPU.
            - ``memory_budget`` (bytes): keep crop graphs from the forward while they fit;
              needed by ``tile_size="auto"``.
            - ``channels_last`` (bool): feed crops in channels-last memory format.
            - ``crop_batch`` (int): up to this many same-shaped crops per model call.
            - ``process_group``: tile parallelism for one image over a
              ``torch.distributed`` group.
            - ``skip_constant`` (bool, default True): exact background skipping; equal
              constant crops are computed once (``backbone.last_stats`` reports it).
            - ``prefetch`` (int or None): crops of lazy images read ahead in a background
              thread (default: one, when a core is free for it).
            - ``batchnorm`` (``"running"`` or ``"batch"``): train-mode BatchNorm uses
              running statistics (default) or exact whole-image batch statistics (staged
              streaming), updating the running statistics as the plain model does.
            - ``cut_at`` (``None``, ``"auto"`` or child names): stage cuts for an
              ``nn.Sequential`` trunk; each segment streams over its predecessor's stored
              map with its own, smaller receptive field (faster; see the docs' "Stage cuts").
            - ``spill_dir`` (path or None): where stage cuts' stored maps go when they do not
              fit in ``memory_budget`` (default: the system's temporary directory).

    Returns:
        ``Streamed(backbone, vjp)``. ``backbone(x)`` returns ``model(x)``'s structure and,
        under grad mode, is differentiable (``loss.backward()`` fills ``.grad`` of every
        parameter). ``vjp(x, cotangent)`` returns ``(param_grads, input_grad)``:
        ``param_grads`` is keyed like ``model.named_parameters()`` and ``input_grad`` is
        ``None`` unless ``saliency=True``.

    Raises:
        UnsupportedLayerError: a layer is not local (the message names its module path).
        TileSizeError: ``tile_size`` is smaller than the network needs (the message gives
            the minimum).
        OptionError: an unknown or ill-typed option (a ``TypeError``).

    Example:
        >>> import torch, tilefn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).double()
        >>> x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
        >>> backbone, streamed_vjp = tilefn.streamify(net, tile_size=32)
        >>> torch.testing.assert_close(backbone(x), net(x))
    """
    opts = StreamOptions.from_kwargs(options)
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"streamify: expected an nn.Module, got {type(model).__name__}.")
    tile_size = canonical_tile(tile_size)
    check_tile_option(tile_size, opts.memory_budget, "streamify")
    backbone = StreamedBackbone(model, tile_size, opts)

    def streamed_vjp(x: Any, cotangent: Any) -> tuple[dict, torch.Tensor | None]:
        """``(param_grads, input_grad)`` of ``<cotangent, model(x)>``, tile by tile."""
        return backbone.vjp(x, cotangent, saliency=opts.saliency)

    return Streamed(backbone, streamed_vjp)
