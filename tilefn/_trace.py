"""Record a model's ops on a meta tensor and turn them into a geometry :class:`Graph`.

The model runs once on a tensor on the ``meta`` device (shapes only, no data, no memory)
under a ``TorchDispatchMode`` that sees every aten op, whether it comes from a module,
a functional call, a tensor method or an operator. Every op that touches a tensor
derived from the input is checked against its geometry rule (``_rules``); an op that
is not local is refused with the module path it ran in. Parameters are never written.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._compat import (
    BatchNormBase,
    TorchDispatchMode,
    TreeSpec,
    is_view,
    op_arguments,
    op_name,
    outside_functorch,
    tree_flatten,
    tree_unflatten,
    writes_argument,
)
from ._errors import InputError, TilefnError, TraceError, UnsupportedLayerError, see_docs
from ._geometry import AlignedUpsample, Circular, DimMap, Graph, Identity, Node, Op
from ._global import LSE_KINDS, VARIANCE_KINDS, Barrier, GlobalCall, GlobalOps, Unmerge
from ._positions import AlignedCall, interpolate_arguments, is_aligned
from ._rules import Layout, OpCall, Refuse, TensorArg, get_rule, has_spatial, ns
from ._view_rules import VIEW_RULES  # noqa: F401 - importing registers the built-in rules
from ._window_rules import WINDOW_RULES  # noqa: F401 - importing registers the built-in rules

__all__ = ["Trace", "trace", "RunningStats", "batchnorm_eval"]


aten = torch.ops.aten
OpSignature = tuple[str, str, str]  # (op, layer, arguments)

# Ops whose integer arguments are sizes or indices that follow the crop (a view of a crop has
# the crop's sizes): their geometry and the sizes they produce are checked by the planner.
_SIZE_ARGUMENT_OPS = frozenset(
    """view _unsafe_view reshape _reshape_alias expand new_empty new_zeros new_ones new_full
    new_empty_strided slice narrow select split split_with_sizes unbind chunk
    upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d
    _upsample_nearest_exact2d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d
    upsample_trilinear3d upsample_bicubic2d col2im""".split()
)


@dataclass(frozen=True)
class Trace:
    """A recorded model on one input shape."""

    graph: Graph
    out_spec: TreeSpec
    out_shapes: tuple[tuple[int, ...], ...]
    out_spatial_dims: tuple[tuple[int, ...], ...]  # per output: tensor dim of each spatial dim
    op_names: tuple[str, ...]  # every recorded op that touched the image, in order
    program: tuple[OpSignature, ...]  # those ops with their layers and arguments
    activation_bytes: int  # bytes of all tensors computed from the image
    uses_rng: bool
    # Found when recording with ``batch_stats`` given (see :func:`trace`): the whole-image
    # ops, and for every call GlobalOps matched, the index of its barrier (None: local).
    barriers: tuple[Barrier, ...] = ()
    global_calls: tuple[int | None, ...] = ()
    # Every F.interpolate(..., align_corners=True), in order: computed at each crop's place.
    aligned: tuple[AlignedCall | None, ...] = ()


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training")


class RunningStats(TorchFunctionMode):
    """BatchNorm layers of ``model`` run on their running statistics, without any module being
    changed: inside this mode every ``F.batch_norm`` call that has running statistics runs
    with ``training=False``, and the step counter (``num_batches_tracked``) of BatchNorm
    layers in train mode is not advanced. Mode stacks are thread-local, so another thread
    using the same model meanwhile is unaffected. (The autograd engine does not carry the
    mode into the backward, where activation checkpointing recomputes its blocks: see
    :func:`batchnorm_eval`.)"""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.counters = {
            id(m.num_batches_tracked)
            for m in model.modules()
            if isinstance(m, BatchNormBase) and m.training and m.num_batches_tracked is not None
        }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = {**dict(zip(_BATCH_NORM_ARGS, args)), **kwargs}
            if len(args) > len(_BATCH_NORM_ARGS):
                bound.update(zip(("momentum", "eps"), args[len(_BATCH_NORM_ARGS) :]))
            if bound.get("running_mean") is not None and bound.get("running_var") is not None:
                bound["training"] = False
            return func(**bound)
        if func is torch.Tensor.add_ and args and id(args[0]) in self.counters:
            return args[0]  # BatchNorm's step counter: running statistics are not updated
        if func is torch.Tensor.__float__ and args and id(args[0]) in self.counters:
            # momentum=None reads the counter it has just advanced: the value it would have.
            return float(args[0].item()) + 1.0
        return func(*args, **kwargs)


# While a streamed backward runs, the model's BatchNorm layers are switched to
# running statistics (see batchnorm_eval); such backwards over one model take turns.
_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_LOCK = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that :func:`batchnorm_eval` holds for ``model``."""
    with _MODEL_LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """Switch every BatchNorm layer in train mode to eval (running statistics), restoring the
    flags after, holding the model's lock meanwhile.

    Only for what :class:`RunningStats` cannot reach: activation checkpointing recomputes its
    blocks inside the autograd engine, possibly on another thread, where no function mode is
    active but the modules' flags are seen. The streamed backward holds this for its duration;
    forwards and traces use the mode only and change nothing."""
    with model_lock(model):
        flipped = [m for m in model.modules() if isinstance(m, BatchNormBase) and m.training]
        for m in flipped:
            m.training = False
        try:
            yield
        finally:
            for m in flipped:
                m.training = True


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    schema = op_arguments(func)
    bound: dict[str, Any] = {name: value for (name, _, _), value in zip(schema, args)}
    bound.update(kwargs)
    for name, has_default, default in schema:
        if name not in bound and has_default:
            bound[name] = default
    return bound


class _Recorder(TorchDispatchMode):
    def __init__(
        self, input_shape: tuple[int, ...], stack: list[tuple[str, str]], names: dict[int, str]
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.ndim = len(input_shape) - 2
        self.stack = stack
        self.names = names  # id of each parameter and buffer -> its name
        self.program: list[OpSignature] = []
        self.node_of: dict[int, int] = {}
        self.layouts: list[Layout] = []
        self.nodes: list[Node] = []
        self.ops: list[Op] = []
        self.keep: list[torch.Tensor] = []
        self.activation_bytes = 0
        self.uses_rng = False
        self.paused = False
        self.aligned: list[AlignedCall | None] = []  # see _FunctionMode.aligned_interpolate

    def add_node(self, t: torch.Tensor, layout: Layout, node: Node) -> int:
        self.nodes.append(node)
        self.layouts.append(layout)
        self.node_of[id(t)] = len(self.nodes) - 1
        self.keep.append(t)
        self.activation_bytes += t.numel() * t.element_size()
        return len(self.nodes) - 1

    def where(self) -> str:
        """The current layer, as error messages name it: ``'path' (Class)``."""
        path, cls = self.stack[-1] if self.stack else ("", "model")
        return f"'{path or '<root>'}' ({cls})"

    def refuse(self, func: Any, err: Refuse) -> UnsupportedLayerError:
        if self.stack:
            path, cls = self.stack[-1]
            layer = f"layer '{path or '<root>'}' ({cls}"
            if len(self.stack) > 1 and self.stack[-2][0]:
                layer += f", inside {self.stack[-2][1]} '{self.stack[-2][0]}'"
            layer += ")"
        else:
            layer = "layer '<root>'"
        cls = self.stack[-1][1] if self.stack else ""
        if cls.startswith("InstanceNorm") and "statistics" in err.why:
            err = Refuse(
                "normalises each sample with the mean and variance over all its positions "
                "(instance statistics), which a tile cannot reproduce",
                "use BatchNorm (tilefn runs it on its running statistics) or a per-pixel "
                "LayerNorm instead; MONAI networks take norm='batch', which streams exactly",
            )
        op = "" if str(func) in err.why else f" (aten op {func})"
        msg = f"streamify: {layer} {err.why}{op}."
        inside = [(p, c) for p, c in self.stack[:-1] if p and c != "Sequential"]
        if err.global_op and inside:
            # Global pooling inside a block: squeeze-and-excitation, image-pooling branches
            # (ASPP, pyramid pooling) and global-context blocks feed the whole-image summary
            # back into every position.
            path, cls = inside[-1]
            msg += (
                f" It is part of the block '{path}' ({cls}). tilefn streams whole-image "
                "statistics that are means, sums or amax exactly (squeeze-excitation, CBAM, "
                "image pooling to 1 x 1, GroupNorm: staged streaming), but not this one "
                "(pooling to a grid of bins, a max with indices, max pooling to 1 x 1). How to "
                "fix: if the block feeds a whole-image summary back into every position, make "
                "that summary x.mean((2, 3), keepdim=True) or x.amax((2, 3), keepdim=True), "
                f"or end the trunk before '{path}' and put the rest in the head; otherwise "
                f"{err.fix}."
            )
        elif err.fix:
            msg += f" How to fix: {err.fix}."
        msg += " " + see_docs()
        return UnsupportedLayerError(msg)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is aten._local_scalar_dense.default and args[0].device.type != "meta":
            return func(*args)  # .item() of a buffer (BatchNorm's step counter): its value
        if "device" in kwargs:
            kwargs["device"] = torch.device("meta")
        flat, spec = tree_flatten((args, kwargs))
        meta_flat = [
            a.to("meta") if isinstance(a, torch.Tensor) and a.device.type != "meta" else a
            for a in flat
        ]
        margs, mkwargs = tree_unflatten(meta_flat, spec)
        if self.paused:
            out = func(*margs, **mkwargs)
            self.keep.append(out)
            return out
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.uses_rng = True
        tensors = [(i, a) for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
        spatial = [self.node_of.get(id(a)) for _, a in tensors]
        if any(n is not None for n in spatial):
            self._check_view_write(func, flat, tensors, spatial)
            self._check_input(func, args, kwargs)
        # Every op, also those on constants only: a whole-image statistic divided by a size
        # read from a crop (x[0, 0].numel()) must differ between the crop and the image.
        self.program.append(self._signature(func, flat, spec))
        try:
            out = func(*margs, **mkwargs)
        except (RuntimeError, ValueError, IndexError) as err:
            if not any(n is not None for n in spatial):
                raise
            shapes = [tuple(t.shape) for _, t in tensors]
            raise TraceError(
                f"streamify: layer {self.where()} fails on the input of shape "
                f"{self.input_shape}: {func} on tensors of shapes {shapes} raised "
                f"{type(err).__name__}: {err}. Check that the model accepts this input (rank, "
                "channels, size)."
            ) from None
        out_tensors = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not any(n is not None for n in spatial):
            for o in out_tensors:  # a constant, also when written in place
                self.node_of.pop(id(o), None)
                self.keep.append(o)
            return out
        try:
            self._record(func, args, kwargs, flat, spec, tensors, spatial, out_tensors)
        except Refuse as err:
            raise self.refuse(func, err) from None
        return out

    def _signature(self, func, flat: list, spec) -> OpSignature:
        """The op as a step of the program: its name, its layer and its arguments (spatial
        tensors by node, parameters and buffers by name, other tensors by dtype and rank,
        scalars by value; sizes and indices of shape ops, which follow the crop, left out)."""
        sizes_follow_crop = op_name(func)[1] in _SIZE_ARGUMENT_OPS

        def sig(a: Any) -> Any:
            if isinstance(a, torch.Tensor):
                node = self.node_of.get(id(a))
                if node is not None:
                    return ("node", node)
                name = self.names.get(id(a))
                return ("tensor", name) if name else ("tensor", str(a.dtype), a.dim())
            if isinstance(a, int) and not isinstance(a, bool) and sizes_follow_crop:
                return "size"
            if isinstance(a, (bool, int, float, str, type(None))):
                return a
            return str(a)  # dtypes, devices, memory formats, layouts

        args = tree_unflatten([sig(a) for a in flat], spec)
        return (str(func), self.where(), repr(args))

    def _check_input(self, func, args: tuple, kwargs: dict) -> None:
        """A convolution that reads the image itself names a wrong rank or channel count of
        the input (an unbatched (C, H, W) image would be read as a batch of 1-d signals)."""
        if func is not aten.convolution.default:
            return
        bound = _bind(func, args, kwargs)
        x, weight = bound["input"], bound["weight"]
        transposed, groups = bound["transposed"], bound["groups"]
        conv_dims = weight.dim() - 2
        if conv_dims != self.ndim:
            raise InputError(
                f"streamify: layer {self.where()} is a {conv_dims}-d convolution, but the input "
                f"of shape {self.input_shape} is read as (N, C, *spatial) with {self.ndim} "
                f"spatial dim{'s' if self.ndim > 1 else ''}. "
                + (
                    "For an unbatched image, add the batch dim: backbone(x[None])."
                    if conv_dims > self.ndim
                    else "Give the input the shape the model expects."
                )
            )
        expected = weight.shape[0] if transposed else weight.shape[1] * groups
        if self.node_of.get(id(x)) == 0 and x.shape[1] != expected:
            raise InputError(
                f"streamify: layer {self.where()} expects {expected} input channels, but the "
                f"input of shape {self.input_shape} has {x.shape[1]}."
            )

    def _check_view_write(self, func, flat, tensors, spatial) -> None:
        for (pos, t), node in zip(tensors, spatial):
            if writes_argument(func, pos) and is_view(t):
                others = [n for (p, _), n in zip(tensors, spatial) if p != pos and n is not None]
                if others or node is not None:
                    raise self.refuse(
                        func,
                        Refuse(
                            "writes image data in place into a view of another tensor "
                            "(e.g. y[:, :, 1:-1] = x, or circular padding), which tilefn "
                            "cannot follow",
                            "build the tensor with torch.cat / F.pad instead of writing "
                            "into slices",
                        ),
                    )

    def _record(self, func, args, kwargs, flat, spec, tensors, spatial, out_tensors) -> None:
        targs: list[TensorArg] = []
        by_pos: dict[int, TensorArg] = {}
        for j, ((pos, t), node) in enumerate(zip(tensors, spatial)):
            ta = TensorArg(
                j,
                tuple(t.shape),
                self.layouts[node] if node is not None else None,
                self.nodes[node].sizes if node is not None else (),
                tuple(t.stride()) if node is None and t.layout == torch.strided else (),
            )
            targs.append(ta)
            by_pos[pos] = ta
        args_with_info = tree_unflatten([by_pos.get(i, a) for i, a in enumerate(flat)], spec)
        bound = _bind(func, *args_with_info)
        rule = get_rule(func)
        if rule is None:
            namespace, name = op_name(func)
            raise Refuse(
                f"runs the op {func}, which has no geometry rule in tilefn",
                "if the op is local (each output position reads a fixed window of input "
                f"positions), register a rule with tilefn.register_rule(torch.ops.{namespace}."
                f"{name}, rule) (tilefn.rules.pointwise for elementwise ops); otherwise move "
                "it into the head",
            )
        call = OpCall(func, bound, targs, [tuple(o.shape) for o in out_tensors], self.ndim)
        geom = rule(call)
        if len(geom.out_layouts) != len(out_tensors):  # pragma: no cover - rule bug
            raise Refuse(f"internal: rule for {func} returned a wrong number of layouts")
        if all(layout is None for layout in geom.out_layouts):
            for o in out_tensors:  # constants made from the image's metadata, e.g. x.new_zeros
                self.node_of.pop(id(o), None)
                self.keep.append(o)
            return
        scales: tuple[Fraction, ...] | None = None
        inputs = []
        for ta, node in zip(targs, spatial):
            if node is None:
                continue
            maps = geom.in_maps.get(ta.index)
            if maps is None:
                raise Refuse(f"internal: rule for {func} gave no geometry for a spatial input")
            s = tuple(a * m.scale for a, m in zip(self.nodes[node].scales, maps))
            if scales is not None and s != scales:
                raise Refuse(
                    "combines tensors at different resolutions of the image (their strides "
                    f"differ: {[str(v) for v in scales]} vs {[str(v) for v in s]})"
                )
            scales = s
            inputs.append((node, maps))
        first_sizes = self.nodes[inputs[0][0]].sizes
        outputs = []
        given = geom.out_sizes or [None] * len(out_tensors)
        for o, layout, out_sizes in zip(out_tensors, geom.out_layouts, given):
            if layout is None:
                self.node_of.pop(id(o), None)
                self.keep.append(o)
                continue
            seen = sorted(a for dim in layout for a in dim if a >= 0)
            if seen != list(range(self.ndim)):
                raise Refuse(
                    "mixes spatial positions with each other or drops a spatial dim",
                    "move global operations into the head",
                )
            assert scales is not None
            sizes = _spatial_sizes(layout, o.shape, out_sizes or first_sizes)
            outputs.append(self.add_node(o, layout, Node(sizes, scales)))
        self.ops.append(Op(str(func), self.where(), tuple(inputs), tuple(outputs)))

    def circular_pad(self, x: torch.Tensor, pad: list[int], run) -> torch.Tensor:
        """Record ``F.pad(x, pad, mode="circular")`` as one op (aten decomposes it into
        in-place writes into slices)."""
        self.paused = True
        try:
            out = run()
        finally:
            self.paused = False
        node = self.node_of[id(x)]
        layout = self.layouts[node]
        n = len(pad) // 2
        first = x.dim() - n
        maps: list[DimMap] = [Identity()] * self.ndim
        for i in range(first, x.dim()):
            j = x.dim() - 1 - i  # F.pad lists the last dim first
            before, after = pad[2 * j], pad[2 * j + 1]
            dim = layout[i]
            if not has_spatial(dim):
                continue
            if len(dim) != 1 or before < 0 or after < 0:
                raise self.refuse(F.pad, Refuse("pads circularly a dim that merges spatial dims"))
            maps[dim[0]] = Circular(before, after)
        out_layout = tuple(
            dim if has_spatial(dim) else (ns(out.shape[i]),) for i, dim in enumerate(layout)
        )
        sizes = _spatial_sizes(out_layout, out.shape, self.nodes[node].sizes)
        new = self.add_node(out, out_layout, Node(sizes, self.nodes[node].scales))
        self.ops.append(Op("circular_pad", self.where(), ((node, tuple(maps)),), (new,)))
        return out


def _spatial_sizes(layout: Layout, shape, inherited: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial sizes of a tensor: read from its shape where a spatial dim has a tensor dim of
    its own, else (merged into a view's dim by a pointwise op) inherited from the input."""
    sizes = list(inherited)
    for i, dim in enumerate(layout):
        if len(dim) == 1 and dim[0] >= 0:
            sizes[dim[0]] = shape[i]
    return tuple(sizes)


class _Discovery:
    """Decides, for every call :class:`~tilefn._global.GlobalOps` matches, whether it is a
    barrier (a statistic over every position of a map computed from the image) and, if so,
    records it and lets the recording go on past it with placeholder statistics."""

    def __init__(self, rec: _Recorder, batch_stats: bool):
        self.rec, self.batch_stats = rec, batch_stats
        self.calls: list[int | None] = []
        self.barriers: list[Barrier] = []
        self.ops: GlobalOps | None = None  # the mode that calls it (its reshapes)

    def handle(self, position: int, call: GlobalCall, run) -> Any:
        barrier = self._barrier(call)
        if barrier is None:
            self.calls.append(None)
            return run()
        self.calls.append(len(self.barriers))
        self.barriers.append(barrier)
        self.rec.paused = True
        try:
            values = barrier.placeholder()
        finally:
            self.rec.paused = False
        return call.apply(barrier.for_call(values))

    def _refuse(self, call: GlobalCall, why: str, fix: str) -> UnsupportedLayerError:
        return self.rec.refuse(f"{call.kind} statistics", Refuse(why, fix))

    def _barrier(self, call: GlobalCall) -> Barrier | None:
        rec = self.rec
        if call.kind == "contract":
            if not self._contracts_positions(call):
                return None  # over channels (local), or not a reduction (refused by its rule)
            call.input = call.product()
            if call.subscripts is None:
                call.dims = (call.input.dim() - 2,)
            else:
                out = call.subscripts[2]
                call.dims = tuple(i for i, c in enumerate(call.full()) if c not in out)
        x = call.input
        node = rec.node_of.get(id(x)) if isinstance(x, torch.Tensor) else None
        if node is None:
            return None  # not computed from the image: a constant
        assert x is not None
        layout = rec.layouts[node]
        spatial = [i for i, dim in enumerate(layout) if has_spatial(dim)]
        if call.kind in ("mean", "sum", "max", "pool", "contract", *LSE_KINDS, *VARIANCE_KINDS):
            dims = call.dims if call.dims is not None else tuple(range(x.dim()))
            if not set(spatial) <= set(dims):
                return None  # over channels only (local), or over some positions (refused)
            dtype = call.dtype or x.dtype
            if all(len(layout[i]) == 1 for i in spatial):
                return Barrier(
                    call.kind,
                    rec.where(),
                    tuple(x.shape),
                    tuple(dims),
                    None,
                    dtype,
                    source=node,
                    correction=call.correction,
                )
            if call.kind == "pool":
                raise self._refuse(
                    call,
                    "pools a tensor whose dims merge spatial positions with other factors",
                    "pool the feature map in its (N, C, *spatial) layout",
                )
            return self._merged(call, x, node, tuple(dims), dtype)
        canonical = all(not has_spatial(layout[i]) for i in (0, 1)) and all(
            layout[2 + k] == (k,) for k in range(rec.ndim)
        )
        if call.kind == "bins":
            if x.dim() != 2 + rec.ndim or not canonical or call.bins is None:
                raise self._refuse(
                    call,
                    "pools to bins a tensor that is not laid out as (N, C, *spatial)",
                    "pool the feature map in its (N, C, *spatial) layout",
                )
            return Barrier(
                "bins",
                rec.where(),
                tuple(x.shape),
                tuple(range(2, x.dim())),
                None,
                x.dtype,
                bins=call.bins,
                strides=rec.nodes[node].scales,
                source=node,
            )
        if not call.batch_stats:
            return None  # running statistics: local
        running = call.running[0] is not None
        if call.kind == "batch" and running and not self.batch_stats:
            return None  # batchnorm="running": RunningStats switches it to running statistics
        if call.kind == "instance" and running:
            raise self._refuse(
                call,
                "is an InstanceNorm with track_running_stats=True in train mode, whose "
                "running statistics tilefn does not update",
                "use track_running_stats=False (the default), or call .eval() on the layer",
            )
        if x.dim() != 2 + rec.ndim or not canonical:
            raise self._refuse(
                call,
                "normalises a tensor that is not laid out as (N, C, *spatial)",
                "normalise the feature map in its (N, C, *spatial) layout",
            )
        groups, channels = call.groups, x.shape[1]
        reduce = tuple(range(2, 3 + rec.ndim))
        if call.kind == "batch":
            reduce = (0, *reduce)
        module = None
        if call.kind == "batch" and running:
            name = rec.names.get(id(call.running[0]), "")
            module = name.rpartition(".")[0] if name.endswith("running_mean") else None
            if module is None:
                raise self._refuse(
                    call,
                    "normalises with batch statistics into running statistics that are not a "
                    "BatchNorm module's running_mean buffer",
                    "use nn.BatchNorm layers, or batchnorm='running'",
                )
        if channels % groups:  # pragma: no cover - torch refuses first
            return None
        return Barrier(
            call.kind,
            rec.where(),
            tuple(x.shape),
            reduce,
            groups,
            x.dtype,
            eps=call.eps,
            module=module,
            source=node,
        )

    def _contracts_positions(self, call: GlobalCall) -> bool:
        """Whether a matmul ``a @ b`` (or a two-operand einsum) sums over positions and keeps
        none: both operands are computed from the image, the contracted dims hold the same
        positions, and no other dim holds any (a product that keeps positions while summing
        over them is attention, which its rule refuses)."""
        rec = self.rec
        assert call.operands is not None
        a, b = call.operands
        nodes = [rec.node_of.get(id(t)) for t in (a, b)]
        if any(n is None for n in nodes):
            return False
        la, lb = (rec.layouts[n] for n in nodes)  # type: ignore[index]
        if call.subscripts is not None:
            ia, ib, out = call.subscripts
            da, db = dict(zip(ia, la)), dict(zip(ib, lb))
            spatial = {c for c, d in (*da.items(), *db.items()) if has_spatial(d)}
            return (
                bool(spatial)
                and not spatial & set(out)
                and all(da.get(c) == db.get(c) for c in spatial)
            )
        if not has_spatial(la[-1]) or la[-1] != lb[-2]:
            return False
        rest = (*la[:-1], *lb[:-2], lb[-1])
        return not any(has_spatial(d) for d in rest)

    def _merged(
        self, call: GlobalCall, x: torch.Tensor, node: int, dims: tuple[int, ...], dtype
    ) -> Barrier:
        """A barrier over a map whose spatial dims the model flattened: it reads the map with
        every layout atom as a dim of its own (see :class:`~tilefn._global.Unmerge`), the
        sizes of the spatial ones on a crop read from an earlier reshape's input at the
        same place and scale."""
        rec, ops = self.rec, self.ops
        assert ops is not None
        layout = rec.layouts[node]
        target = rec.nodes[node]
        sources = [(-1, -1)] * rec.ndim
        for k in sorted({a for dim in layout for a in dim if a >= 0}):
            for p in reversed(range(len(ops.reshaped))):
                n = rec.node_of.get(id(ops.reshaped[p]))
                if n is None:
                    continue
                lay, seen = rec.layouts[n], rec.nodes[n]
                i = next((j for j, d in enumerate(lay) if d == (k,)), None)
                if i is not None and (seen.sizes[k], seen.scales[k]) == (
                    target.sizes[k],
                    target.scales[k],
                ):
                    sources[k] = (p, i)
                    break
            else:
                raise self._refuse(
                    call,
                    "reduces a tensor whose spatial dims were merged by an op tilefn cannot "
                    "follow back",
                    "flatten the feature map with reshape/view/flatten, or reduce it in its "
                    "(N, C, *spatial) layout",
                )
        stat_shape = tuple(1 if j in dims else s for j, s in enumerate(x.shape))
        unmerge = Unmerge(tuple(layout), tuple(sources), stat_shape)
        shape = unmerge.shape(x.shape, ops.reshapes)
        reduce, pos = [], 0
        for j, dim in enumerate(layout):
            if j in dims:
                reduce.extend(range(pos, pos + len(dim)))
            pos += len(dim)
        if math.prod(shape) != x.numel():  # pragma: no cover - the layout lists every factor
            raise self._refuse(call, "reduces a map tilefn cannot unflatten", "report this")
        return Barrier(
            call.kind,
            rec.where(),
            shape,
            tuple(reduce),
            None,
            dtype,
            unmerge=unmerge,
            source=node,
            correction=call.correction,
        )


class _FunctionMode(TorchFunctionMode):
    """Sees calls before aten decomposes them: ``x.repeat`` of a constant (a broadcast where
    it repeats dims of size 1), ``F.pad(..., mode="circular")``
    (which aten turns into in-place writes into slices; recorded as one op) and
    ``F.interpolate``: each call gets one entry in ``rec.aligned`` (an aligned interpolation
    of a map or a constant grid interpolated to a map's size, computed at each crop's place;
    None for the others), and under deterministic algorithms, which decompose linear modes
    into gathers of the same geometry, the plain kernel is recorded, with deterministic
    algorithms switched off for that one call only."""

    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.pad:
            names = ("input", "pad", "mode", "value")
            bound = {**dict(zip(names, args)), **kwargs}
            x = bound.get("input")
            if (
                bound.get("mode") == "circular"
                and isinstance(x, torch.Tensor)
                and id(x) in self.rec.node_of
            ):
                return self.rec.circular_pad(x, list(bound["pad"]), lambda: func(*args, **kwargs))
        if func is torch.Tensor.repeat and args and id(args[0]) not in self.rec.node_of:
            x = args[0]
            reps = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            reps = tuple(kwargs.get("repeats", reps))
            if len(reps) == x.dim() and all(r == 1 or s == 1 for r, s in zip(reps, x.shape)):
                # A constant repeated only along dims of size 1 (a pooled summary repeated to
                # the map's size) is a broadcast, which every crop reproduces at its size.
                return x.expand(tuple(r * s for r, s in zip(reps, x.shape)))
        if func is F.interpolate:  # exactly one entry in rec.aligned per call
            bound = interpolate_arguments(args, kwargs)
            x = bound.get("input")
            n = x.dim() - 2 if isinstance(x, torch.Tensor) else 0
            spatial = isinstance(x, torch.Tensor) and id(x) in self.rec.node_of
            if n > 0 and spatial and is_aligned(bound):
                return self.aligned_interpolate(x, n, func, args, kwargs)
            if n > 0 and not spatial and any(s != 1 for s in x.shape[2:]):
                return self.grid_interpolate(x, n, bound, func, args, kwargs)
            self.rec.aligned.append(None)  # runs as it is on every crop
            if n > 0 and not spatial and all(s == 1 for s in x.shape[2:]):
                # A 1 x 1 map upsampled is its value everywhere (any mode): record it as a
                # broadcast, which every crop reproduces at its own size.
                self.rec.paused = True
                try:
                    shape = func(*args, **kwargs).shape
                finally:
                    self.rec.paused = False
                return x.expand(shape)
        return self._run(func, args, kwargs)

    def _run(self, func, args, kwargs):
        if func is F.interpolate and torch.are_deterministic_algorithms_enabled():
            warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
            torch.use_deterministic_algorithms(False)
            try:
                return func(*args, **kwargs)
            finally:
                torch.use_deterministic_algorithms(True, warn_only=warn_only)
        return func(*args, **kwargs)

    def grid_interpolate(self, x: torch.Tensor, n: int, bound: dict, func, args, kwargs):
        """A constant grid (a map pooled to bins, through constant layers) interpolated to
        the size of a map of the image (``size=x.shape[-2:]``, as PSPNet does). Linearly:
        recorded as a tensor of the image at that map's place and stride (an op that reads
        the map, identity geometry), which the executor computes on each crop at its place
        (``_positions.grid_interpolate``). Another mode is refused; a size that is no map's
        leaves a constant (refused where it meets the image)."""
        rec = self.rec
        rec.paused = True
        try:
            out = self._run(func, args, kwargs)
        finally:
            rec.paused = False
        sizes = tuple(out.shape[2:])
        canonical = tuple((k,) for k in range(n))
        ref = next(
            (
                node
                for node in reversed(range(len(rec.nodes)))
                if rec.nodes[node].sizes == sizes and rec.layouts[node][2:] == canonical
            ),
            None,
        )
        if ref is None or n != rec.ndim or bound.get("size") is None:
            rec.aligned.append(None)
            return out
        if bound.get("mode") not in ("linear", "bilinear", "trilinear") or bound.get("antialias"):
            raise rec.refuse(
                F.interpolate,
                Refuse(
                    f"interpolates a grid pooled from the image to the map's size with "
                    f"mode={bound.get('mode', 'nearest')!r}, which tilefn computes at each "
                    "crop's place only for linear modes",
                    "use mode='bilinear' (or linear/trilinear), with or without align_corners",
                ),
            )
        scales = rec.nodes[ref].scales
        layout = ((ns(out.shape[0]),), (ns(out.shape[1]),), *canonical)
        new = rec.add_node(out, layout, Node(sizes, scales))
        maps = (Identity(),) * n
        rec.ops.append(Op("grid_interpolate", rec.where(), ((ref, maps),), (new,)))
        rec.aligned.append(
            AlignedCall(
                dims=tuple(range(n)),
                in_sizes=tuple(x.shape[2:]),
                out_sizes=sizes,
                strides=scales,
                grid="corners" if is_aligned(bound) else "centres",
            )
        )
        return out

    def aligned_interpolate(self, x: Any, n: int, func, args, kwargs):
        """Record an interpolation with ``align_corners=True`` for the executor, which computes
        it at each crop's place (``_positions``): the whole map's sizes and strides."""
        rec = self.rec
        node = rec.node_of[id(x)]
        layout, first = rec.layouts[node], x.dim() - n
        dims = [layout[i][0] if len(layout[i]) == 1 else -1 for i in range(first, x.dim())]
        if any(d < 0 for d in dims):
            raise rec.refuse(
                F.interpolate,
                Refuse(
                    "interpolates with align_corners=True a tensor whose interpolated dims "
                    "are not the image's spatial dims"
                ),
            )
        out = self._run(func, args, kwargs)
        scales = rec.nodes[node].scales
        rec.aligned.append(
            AlignedCall(
                dims=tuple(dims),
                in_sizes=tuple(x.shape[first:]),
                out_sizes=tuple(out.shape[first:]),
                strides=tuple(scales[d] for d in dims),
            )
        )
        return out


# Identities of the hooks traces have registered right now (a model's fingerprint leaves them
# out: a trace in one thread must not make another thread plan again).
TRACE_HOOKS: set[int] = set()


@contextlib.contextmanager
def _module_paths(model: nn.Module, stack: list[tuple[str, str]]) -> Iterator[None]:
    """Keep ``stack`` at the (path, class) of the modules of ``model`` now running, through
    hooks on the model's own modules (removed after). The hooks act on this thread only: the
    model may run in other threads meanwhile (their own streamed passes or traces)."""
    handles = []
    owner = threading.get_ident()

    def hooks(name: str):
        def pre(module, args):
            if threading.get_ident() == owner:
                stack.append((name, type(module).__name__))

        def post(module, args, output):
            if stack and threading.get_ident() == owner:
                stack.pop()

        return pre, post

    mine: list[int] = []
    try:
        for name, module in model.named_modules():
            pre, post = hooks(name)
            mine += [id(pre), id(post)]
            TRACE_HOOKS.update(mine[-2:])
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        TRACE_HOOKS.difference_update(mine)


@contextlib.contextmanager
def _recording_state() -> Iterator[None]:
    """Autocast would cast the (real) parameters but not the meta input; geometry does not
    depend on it, so record without it."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


# Inference mode (Lightning's validation and predict loops) would hide the decomposition of
# composite ops such as aten.conv2d from the recorder, so always record outside it.
@torch.inference_mode(False)
def trace(
    model: nn.Module,
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    batch_stats: bool | None = None,
) -> Trace:
    """Record ``model`` on a meta tensor of ``input_shape``; BatchNorm uses running stats.
    Transforms active around the call (torch.func.grad, vjp) do not see the recording.

    With ``batch_stats`` given, whole-image ops (means over all positions, GroupNorm,
    InstanceNorm, and BatchNorm in train mode when ``batch_stats`` is True) are barriers
    instead of refusals: the trace lists them, and records the rest of the model as if their
    statistics were constants (the geometry of staged streaming's last stage)."""
    with outside_functorch():
        return _record_model(model, input_shape, dtype, batch_stats)


def _record_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    batch_stats: bool | None = None,
) -> Trace:
    ndim = len(input_shape) - 2
    stack: list[tuple[str, str]] = []
    names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    names.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
    rec = _Recorder(input_shape, stack, names)
    x = torch.empty(input_shape, device="meta", dtype=dtype)
    layout: Layout = ((ns(input_shape[0]),), (ns(input_shape[1]),)) + tuple(
        (k,) for k in range(ndim)
    )
    rec.add_node(x, layout, Node(tuple(input_shape[2:]), (Fraction(1),) * ndim))
    rec.activation_bytes = 0
    discovery = _Discovery(rec, batch_stats) if batch_stats is not None else None
    barriers: Any = contextlib.nullcontext()
    if discovery is not None:
        barriers = discovery.ops = GlobalOps(discovery.handle, keep=True)
    try:
        with (
            _recording_state(),
            torch.no_grad(),
            RunningStats(model),
            _module_paths(model, stack),
            rec,
            _FunctionMode(rec),
            barriers,
        ):
            out = model(x)
    except TilefnError:
        raise
    except Exception as err:
        raise TraceError(
            f"streamify: could not record the model on an input of shape "
            f"{tuple(input_shape)}: {type(err).__name__}: {err}. Check that the model accepts "
            "this input shape (rank, channels, size). tilefn records the model's ops on a meta "
            "tensor without computing values, so a forward that reads tensor values "
            "(.item(), if x.sum() > 0) cannot be streamed."
        ) from err
    leaves, out_spec = tree_flatten(out)
    out_nodes, out_shapes, out_dims = [], [], []
    for i, leaf in enumerate(leaves):
        node = rec.node_of.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
        if node is None and isinstance(leaf, torch.Tensor) and discovery and discovery.barriers:
            last = discovery.barriers[-1]
            raise UnsupportedLayerError(
                f"streamify: layer {last.layer} reduces the whole image ({last.describe()}), "
                f"and the model's output {i} (shape {tuple(leaf.shape)}) has no spatial dims: "
                "a streamed model returns feature maps. How to fix: end the trunk before the "
                "final global pooling (or whatever reduces the map to this output) and apply "
                "it in the head, on the stitched feature map, where it is cheap. Whole-image "
                "statistics inside the trunk (squeeze-excitation, GroupNorm, image pooling) "
                f"stream exactly. {see_docs()}"
            )
        if node is None:
            raise UnsupportedLayerError(
                f"streamify: the model's output {i} is "
                + (
                    "not a tensor"
                    if not isinstance(leaf, torch.Tensor)
                    else "not computed from the input"
                )
                + f" ({type(leaf).__name__}). A streamed model must return tensors computed "
                "from the image (a tensor, or a tuple/list/dict of them)."
            )
        lone = {
            dim[0]: j for j, dim in enumerate(rec.layouts[node]) if len(dim) == 1 and dim[0] >= 0
        }
        if len(lone) != ndim:
            raise UnsupportedLayerError(
                f"streamify: the model's output {i} merges spatial dims with other dims "
                f"(shape {tuple(leaf.shape)}). Return feature maps with their spatial dims "
                "intact and reshape in the head."
            )
        out_nodes.append(node)
        out_shapes.append(tuple(leaf.shape))
        out_dims.append(tuple(lone[k] for k in range(ndim)))
    graph = Graph(tuple(rec.nodes), tuple(rec.ops), tuple(out_nodes))
    _check_aligned(graph, rec.aligned)
    return Trace(
        graph=graph,
        out_spec=out_spec,
        out_shapes=tuple(out_shapes),
        out_spatial_dims=tuple(out_dims),
        op_names=tuple(op.name for op in rec.ops),
        program=tuple(rec.program),
        activation_bytes=rec.activation_bytes,
        uses_rng=rec.uses_rng,
        barriers=tuple(discovery.barriers) if discovery else (),
        global_calls=tuple(discovery.calls) if discovery else (),
        aligned=tuple(rec.aligned),
    )


def _check_aligned(graph: Graph, calls: list[AlignedCall | None]) -> None:
    """Every op that samples with ``align_corners=True`` must come from an ``F.interpolate``
    call the executor sees (an aten op called directly would run on the crop as if it were
    the image: silently wrong)."""
    ops = [
        op
        for op in graph.ops
        if any(isinstance(m, AlignedUpsample) for _, ms in op.inputs for m in ms)
    ]
    seen = sum(c is not None and c.grid is None for c in calls)
    if len(ops) != seen:
        op = ops[-1] if ops else None
        where = f"layer {op.where} ({op.name})" if op else "the model"
        raise UnsupportedLayerError(
            f"streamify: {where} interpolates with align_corners=True without calling "
            "torch.nn.functional.interpolate, so tilefn cannot compute it at each crop's place. "
            f"How to fix: call F.interpolate (or nn.Upsample). {see_docs()}"
        )
