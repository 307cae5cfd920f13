"""Geometry rules: one rule per aten op, saying how the op moves and reads spatial dims.

The tracer (``_trace``) records every aten op a model runs on a meta tensor. For each op
that touches a tensor derived from the input image (a *spatial* tensor), it calls the
rule registered for that op. A rule receives an :class:`OpCall` and returns an
:class:`OpGeometry`: the *layout* of each output (which tensor dims hold which spatial
dims) and, for each spatial input, one :class:`~tilefn._geometry.DimMap` per spatial dim.
A rule that finds the op non-local raises :class:`Refuse`; an op with no rule is refused
by the tracer. Register rules for custom ops with :func:`register_rule`.

Layouts: a layout has one entry per tensor dim, a tuple of *atoms*. An atom ``k >= 0``
is spatial dim ``k`` of the image; an atom ``< 0`` is a non-spatial factor of size
``-atom - 1`` (see :func:`ns`). Most dims hold one atom; ``x.view(N*H*W, C)`` (what
``nn.Linear`` does on a channels-last tensor) holds three in its first dim.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import OptionError
from ._geometry import DimMap, Identity, Reflect, TransposedWindow, Upsample, Window

__all__ = [
    "Layout",
    "TensorArg",
    "OpCall",
    "OpGeometry",
    "Refuse",
    "register_rule",
    "get_rule",
    "pointwise",
    "ns",
]

aten = torch.ops.aten
Layout = tuple[tuple[int, ...], ...]


def ns(size: int) -> int:
    """The atom of a non-spatial factor of the given size."""
    return -int(size) - 1


def atom_size(atom: int, sizes: Sequence[int]) -> int:
    return sizes[atom] if atom >= 0 else -atom - 1


def has_spatial(dim: tuple[int, ...]) -> bool:
    return any(a >= 0 for a in dim)


def canonical(dims: Sequence[Sequence[int]], sizes: Sequence[int]) -> Layout:
    """Merge adjacent non-spatial atoms and drop size-1 ones inside spatial dims."""
    out = []
    for dim in dims:
        if not has_spatial(dim):
            total = 1
            for a in dim:
                total *= atom_size(a, sizes)
            out.append((ns(total),))
            continue
        merged: list[int] = []
        for a in dim:
            if a < 0:
                if a == ns(1):
                    continue
                if merged and merged[-1] < 0:
                    merged[-1] = ns(atom_size(merged[-1], sizes) * atom_size(a, sizes))
                    continue
            merged.append(a)
        out.append(tuple(merged))
    return tuple(out)


class Refuse(Exception):
    """Raised by a rule: the op cannot be streamed. ``why`` and ``fix`` end up in the
    user-facing :class:`~tilefn.UnsupportedLayerError`."""

    def __init__(self, why: str, fix: str = "", *, global_op: bool = False):
        super().__init__(why)
        self.why = why
        self.fix = fix
        self.global_op = global_op  # global pooling / a whole-image statistic


@dataclass
class TensorArg:
    """A tensor argument as a rule sees it."""

    index: int  # position among the op's tensor arguments
    shape: tuple[int, ...]
    layout: Layout | None  # None: a constant (parameter, buffer, or not derived from the input)
    sizes: tuple[int, ...] = ()  # spatial sizes, one per spatial dim, when spatial

    @property
    def spatial(self) -> bool:
        return self.layout is not None


@dataclass
class OpCall:
    """One recorded op, as a rule sees it."""

    func: Any  # torch._ops.OpOverload
    args: dict[str, Any]  # bound by schema name; tensors replaced by TensorArg
    tensors: list[TensorArg]
    out_shapes: list[tuple[int, ...]]
    ndim: int  # number of spatial dims of the image

    @property
    def name(self) -> str:
        return str(self.func)

    @property
    def spatial_inputs(self) -> list[TensorArg]:
        return [t for t in self.tensors if t.spatial]


@dataclass
class OpGeometry:
    """What a rule returns."""

    out_layouts: list[Layout | None]
    in_maps: dict[int, tuple[DimMap, ...]] = field(default_factory=dict)


Rule = Callable[[OpCall], OpGeometry]
_RULES: dict[Any, Rule] = {}


def register_rule(op: Any, rule: Rule) -> None:
    """Register the geometry rule of an aten op (an ``OpOverload`` or ``OpOverloadPacket``).

    A packet registers the rule for all its overloads. ``rule`` receives an
    :class:`OpCall` and returns an :class:`OpGeometry`; :func:`pointwise` is the rule of
    any elementwise op::

        tilefn.register_rule(torch.ops.mylib.my_activation, tilefn.rules.pointwise)
    """
    if isinstance(op, torch._ops.OpOverloadPacket):
        for name in op.overloads():
            _RULES[getattr(op, name)] = rule
    elif isinstance(op, torch._ops.OpOverload):
        _RULES[op] = rule
    else:
        raise OptionError(
            f"register_rule: expected an aten op such as torch.ops.aten.gelu or "
            f"torch.ops.aten.gelu.default, got {op!r}."
        )
    if not callable(rule):
        raise OptionError(f"register_rule: expected a callable rule, got {rule!r}.")


def get_rule(func: Any) -> Rule | None:
    rule = _RULES.get(func)
    if rule is None and torch.Tag.pointwise in getattr(func, "tags", ()):
        return pointwise
    return rule


def _identity_maps(call: OpCall) -> dict[int, tuple[DimMap, ...]]:
    return {t.index: (Identity(),) * call.ndim for t in call.spatial_inputs}


# --------------------------------------------------------------------------- pointwise


def _broadcast_layout(call: OpCall, shape: Sequence[int]) -> Layout:
    nd = len(shape)
    out: list[tuple[int, ...]] = [(ns(s),) for s in shape]
    for t in call.spatial_inputs:
        off = nd - len(t.shape)
        for j, dim in enumerate(t.layout or ()):
            if has_spatial(dim):
                i = off + j
                if has_spatial(out[i]) and out[i] != dim:
                    raise Refuse("combines tensors whose spatial dims are laid out differently")
                out[i] = dim
    for t in call.tensors:
        off = nd - len(t.shape)
        for j, size in enumerate(t.shape):
            i = off + j
            if not has_spatial(out[i]) or size == 1:
                continue
            if not t.spatial:
                raise Refuse(
                    f"combines the image with a tensor of shape {tuple(t.shape)} that is not "
                    "computed from the image but has the image's spatial size (a tensor built "
                    "from x.shape, e.g. coordinate channels or a positional embedding)",
                    "build such tensors from the input itself (e.g. torch.zeros_like(x)), or "
                    "keep them out of the streamed trunk",
                )
            if t.layout[j] != out[i]:  # type: ignore[index]
                raise Refuse("combines tensors whose spatial dims are laid out differently")
    return tuple(out)


def pointwise(call: OpCall) -> OpGeometry:
    """Rule for elementwise ops with broadcasting (``add``, ``relu``, ``where``, ...)."""
    layout = _broadcast_layout(call, call.out_shapes[0])
    outs: list[Layout | None] = []
    for shape in call.out_shapes:
        if tuple(shape) != tuple(call.out_shapes[0]):
            raise Refuse("elementwise op with outputs of different shapes")
        outs.append(layout)
    return OpGeometry(outs, _identity_maps(call))


def _same_layout(call: OpCall) -> OpGeometry:
    """Ops whose outputs all have the layout of their (single) spatial input."""
    (t,) = call.spatial_inputs[:1]
    return OpGeometry([t.layout] * len(call.out_shapes), _identity_maps(call))


# --------------------------------------------------------------------------- views


def _view(call: OpCall) -> OpGeometry:
    t: TensorArg = call.args["self"]
    new_shape = list(call.out_shapes[0])
    atoms = [a for dim in t.layout for a in dim if a != ns(1)]  # type: ignore[union-attr]
    out: list[tuple[int, ...]] = []
    i = 0
    for target in new_shape:
        group: list[int] = []
        prod = 1
        while prod < target:
            if i >= len(atoms):
                raise Refuse("reshapes the spatial dims")  # pragma: no cover - shape mismatch
            a = atoms[i]
            size = atom_size(a, t.sizes)
            if target % (prod * size) == 0:
                group.append(a)
                prod *= size
                i += 1
            elif a < 0 and target % prod == 0 and size % (target // prod) == 0:
                r = target // prod
                group.append(ns(r))
                atoms[i] = ns(size // r)
                prod = target
            else:
                raise Refuse(
                    "reshapes a spatial dim of the image into other dims (e.g. flattening "
                    "the image, or splitting it into windows)",
                    "keep flatten/reshape over spatial dims in the head, after streaming",
                )
        out.append(tuple(group) if group else (ns(target),))
    if any(a >= 0 for a in atoms[i:]):
        raise Refuse("reshapes the spatial dims")  # pragma: no cover
    layout = canonical(out, t.sizes)
    _check_each_spatial_once(layout, call.ndim)
    return OpGeometry([layout], _identity_maps(call))


def _check_each_spatial_once(layout: Layout, ndim: int) -> None:
    seen = sorted(a for dim in layout for a in dim if a >= 0)
    if seen != list(range(ndim)):
        raise Refuse(
            "mixes spatial positions with each other (e.g. flattening space and "
            "multiplying positions with positions, as attention does)",
            "attention and other global mixing belong in the head, after streaming",
        )


def _permute(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    dims = [d % len(t.shape) for d in call.args["dims"]]
    return OpGeometry([tuple(t.layout[d] for d in dims)], _identity_maps(call))


def _transpose(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    n = len(t.shape)
    if call.func is aten.t.default:
        d0, d1 = 0, n - 1
    else:
        d0, d1 = call.args["dim0"] % n, call.args["dim1"] % n
    layout = list(t.layout)
    layout[d0], layout[d1] = layout[d1], layout[d0]
    return OpGeometry([tuple(layout)], _identity_maps(call))


def _unsqueeze(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    d = call.args["dim"] % (len(t.shape) + 1)
    layout = list(t.layout)
    layout.insert(d, (ns(1),))
    return OpGeometry([tuple(layout)], _identity_maps(call))


def _squeeze(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    n = len(t.shape)
    if "dim" in call.args:
        dims = {call.args["dim"] % n} if n else set()
    elif "dims" in call.args:
        dims = {d % n for d in call.args["dims"]}
    else:
        dims = set(range(n))
    keep = []
    for i, (dim, size) in enumerate(zip(t.layout, t.shape)):
        if i in dims and size == 1:
            if has_spatial(dim):
                raise Refuse("squeezes away a spatial dim of size 1")
            continue
        keep.append(dim)
    return OpGeometry([tuple(keep)], _identity_maps(call))


def _expand(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    shape = call.out_shapes[0]
    off = len(shape) - len(t.shape)
    layout = [(ns(s),) for s in shape[:off]]
    for dim, old, new in zip(t.layout, t.shape, shape[off:]):
        if old != new:
            if has_spatial(dim):  # pragma: no cover - only size-1 dims expand
                raise Refuse("expands a spatial dim")
            dim = (ns(new),)
        layout.append(dim)
    return OpGeometry([tuple(layout)], _identity_maps(call))


def _select(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    d = call.args["dim"] % len(t.shape)
    if has_spatial(t.layout[d]):
        raise Refuse(
            "indexes a single position along a spatial dim, which depends on where the "
            "tile lies in the image",
            "index channels, not positions, inside the streamed trunk",
        )
    return OpGeometry([t.layout[:d] + t.layout[d + 1 :]], _identity_maps(call))


def _slice(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    d = call.args["dim"] % len(t.shape)
    layout = list(t.layout)
    dim = layout[d]
    if not has_spatial(dim):
        layout[d] = (ns(call.out_shapes[0][d]),)
        return OpGeometry([tuple(layout)], _identity_maps(call))
    if len(dim) != 1:
        raise Refuse("slices a dim that merges spatial and other dims")
    k = dim[0]
    size = t.shape[d]
    start = call.args.get("start")
    end = call.args.get("end")
    step = call.args.get("step", 1) or 1
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else min(end, size))
    if step != 1:
        raise Refuse(
            f"slices a spatial dim with step {step}",
            "use a strided pooling or convolution instead of x[..., ::step]",
        )
    maps = {}
    for s in call.spatial_inputs:
        ms = [Identity()] * call.ndim
        if s is t:
            ms[k] = Window(padding=-start, after=min(0, end - size))
        maps[s.index] = tuple(ms)
    return OpGeometry([tuple(layout)], maps)


def _split(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    d = call.args.get("dim", 0) % len(t.shape)
    if has_spatial(t.layout[d]):
        raise Refuse("splits the image along a spatial dim", "split along channels instead")
    outs = []
    for shape in call.out_shapes:
        layout = list(t.layout)
        if call.func in (aten.unbind.int,):
            del layout[d]
        else:
            layout[d] = (ns(shape[d]),)
        outs.append(tuple(layout))
    return OpGeometry(outs, _identity_maps(call))


def _cat(call: OpCall) -> OpGeometry:
    tensors = [t for t in call.args["tensors"] if t.shape != (0,)]
    spatial = [t for t in tensors if t.spatial]
    ref = spatial[0]
    d = call.args.get("dim", 0) % len(ref.shape)
    if has_spatial(ref.layout[d]):
        raise Refuse(
            "concatenates tensors along a spatial dim", "concatenate along channels instead"
        )
    for t in tensors:
        if not t.spatial:
            raise Refuse(
                f"concatenates the image with a tensor of shape {tuple(t.shape)} that is not "
                "computed from the image",
                "build such tensors from the input itself (e.g. torch.zeros_like(x))",
            )
        other = tuple(dim for i, dim in enumerate(t.layout) if i != d)
        if other != tuple(dim for i, dim in enumerate(ref.layout) if i != d):
            raise Refuse("concatenates tensors whose spatial dims are laid out differently")
    layout = list(ref.layout)
    layout[d] = (ns(call.out_shapes[0][d]),)
    return OpGeometry([tuple(layout)], _identity_maps(call))


def _stack(call: OpCall) -> OpGeometry:
    tensors = call.args["tensors"]
    for t in tensors:
        if not t.spatial or t.layout != tensors[0].layout:
            raise Refuse("stacks tensors that are not all computed alike from the image")
    d = call.args.get("dim", 0) % (len(tensors[0].shape) + 1)
    layout = list(tensors[0].layout)
    layout.insert(d, (ns(len(tensors)),))
    return OpGeometry([tuple(layout)], _identity_maps(call))


# --------------------------------------------------------------------------- reductions


def _reduce(call: OpCall) -> OpGeometry:
    t = call.args.get("self", call.args.get("input"))
    n = len(t.shape)
    dims = call.args.get("dim")
    if dims is None:
        dims = list(range(n))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {d % n for d in dims} if n else set()
    if any(has_spatial(t.layout[d]) for d in dims):
        raise Refuse(
            "reduces over spatial dims (global pooling / a statistic over the whole image), "
            "so each output depends on every pixel",
            "move global pooling and everything after it into the head, which runs on the "
            "stitched feature map",
            global_op=True,
        )
    keepdim = bool(call.args.get("keepdim", False))
    layout = []
    for i, dim in enumerate(t.layout):
        if i in dims:
            if keepdim:
                layout.append((ns(1),))
        else:
            layout.append(dim)
    outs = [tuple(layout) if len(s) == len(layout) else None for s in call.out_shapes]
    return OpGeometry(outs, _identity_maps(call))


def _along_dim(call: OpCall) -> OpGeometry:
    """softmax, cumsum, ...: mixes values along one dim, which must not be spatial."""
    t = call.args.get("self", call.args.get("input"))
    d = call.args["dim"] % len(t.shape)
    if has_spatial(t.layout[d]):
        raise Refuse(
            "mixes values along a spatial dim (softmax/cumsum over positions)",
            "apply it along channels, or move it into the head",
        )
    return _same_layout(call)


def _layer_norm(call: OpCall) -> OpGeometry:
    t = call.args["input"]
    k = len(call.args["normalized_shape"])
    if any(has_spatial(dim) for dim in t.layout[len(t.shape) - k :]):
        raise Refuse(
            "normalises over spatial dims (LayerNorm over (C, H, W)), a statistic of the "
            "whole image",
            "normalise over channels only (LayerNorm on a channels-last tensor, as "
            "ConvNeXt's LayerNorm2d does), or use BatchNorm with running statistics",
        )
    stats = t.layout[: len(t.shape) - k] + ((ns(1),),) * k
    return OpGeometry([t.layout, stats, stats], _identity_maps(call))


def _batch_norm(call: OpCall) -> OpGeometry:
    t = call.args["input"]
    training = call.args.get("training", False)
    if call.func in (aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats):
        training = True
    if training or call.args.get("running_mean") is None:
        raise Refuse(
            "normalises with statistics computed over the image (batch or instance "
            "statistics), which a tile cannot reproduce",
            "BatchNorm layers are switched to running statistics automatically; for "
            "BatchNorm(track_running_stats=False), InstanceNorm and GroupNorm, replace the "
            "layer (e.g. by BatchNorm with running statistics, or LayerNorm over channels)",
        )
    if has_spatial(t.layout[1]):
        raise Refuse("normalises along a spatial dim")
    outs: list[Layout | None] = [t.layout] + [None] * (len(call.out_shapes) - 1)
    return OpGeometry(outs, _identity_maps(call))


def _group_norm(call: OpCall) -> OpGeometry:
    raise Refuse(
        "normalises with statistics over the whole image (GroupNorm computes mean and "
        "variance over channels *and all positions*)",
        "replace GroupNorm by a per-pixel normalisation (LayerNorm over channels) or by "
        "BatchNorm with running statistics",
    )


# --------------------------------------------------------------------------- matmul


def _mm(call: OpCall) -> OpGeometry:
    if "mat1" in call.args:  # addmm(bias, mat1, mat2)
        a, b, bias = call.args["mat1"], call.args["mat2"], call.args["self"]
    elif "batch1" in call.args:  # baddbmm(bias, batch1, batch2)
        a, b, bias = call.args["batch1"], call.args["batch2"], call.args["self"]
    else:
        a, b, bias = call.args["self"], call.args["mat2"], None
    contracted = []
    if a.spatial:
        contracted.append(a.layout[-1])
    if b.spatial:
        contracted.append(b.layout[-2])
    if any(has_spatial(dim) for dim in contracted):
        raise Refuse(
            "multiplies over spatial positions (a Linear or matmul across the flattened "
            "image, or attention)",
            "apply Linear layers per pixel on a channels-last tensor, or move them into the head",
        )
    shape = call.out_shapes[0]
    layout = [(ns(s),) for s in shape]
    if len(shape) == 3:  # bmm: batch dim
        for t in (a, b):
            if t.spatial and has_spatial(t.layout[0]):
                layout[0] = t.layout[0]
    if a.spatial:
        layout[-2] = a.layout[-2]
    if b.spatial:
        layout[-1] = b.layout[-1]
    out = canonical(layout, (a if a.spatial else b).sizes)
    _check_each_spatial_once(out, call.ndim)
    if isinstance(bias, TensorArg) and bias.spatial:
        raise Refuse("adds a spatial bias to a matrix product")
    return OpGeometry([out], _identity_maps(call))


# --------------------------------------------------------------------------- windows


def _spatial_window_dims(t: TensorArg, first: int, op: str) -> list[int | None]:
    """The spatial dim (or None) of each windowed tensor dim ``first..``; dims before must
    be non-spatial (batch, channels)."""
    for dim in t.layout[:first]:
        if has_spatial(dim):
            raise Refuse(f"runs a {op} whose batch or channel dim holds a spatial dim")
    out: list[int | None] = []
    for dim in t.layout[first:]:
        if not has_spatial(dim):
            out.append(None)
        elif len(dim) == 1:
            out.append(dim[0])
        else:
            raise Refuse(f"runs a {op} over a dim that merges spatial and other dims")
    return out


def _window_maps(call: OpCall, t: TensorArg, first: int, op: str, make) -> OpGeometry:
    ks = _spatial_window_dims(t, first, op)
    maps: list[DimMap] = [Identity()] * call.ndim
    for j, k in enumerate(ks):
        if k is not None:
            maps[k] = make(j)
    layout = tuple((ns(s),) for s in call.out_shapes[0][:first]) + tuple(
        (k,) if k is not None else (ns(call.out_shapes[0][first + j]),) for j, k in enumerate(ks)
    )
    outs: list[Layout | None] = [layout if len(s) == len(layout) else None for s in call.out_shapes]
    return OpGeometry(outs, {t.index: tuple(maps)})


def _const_params(call: OpCall, names: Sequence[str], what: str) -> None:
    for name in names:
        v = call.args.get(name)
        if isinstance(v, TensorArg) and v.spatial:
            raise Refuse(f"uses a {what} computed from the image (dynamic weights)")


def _per_dim(value, n: int, default) -> list[int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        value = default
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    return value * n if len(value) == 1 else value


def _convolution(call: OpCall) -> OpGeometry:
    t = call.args["input"]
    _const_params(call, ("weight", "bias"), "convolution weight")
    kernel = call.args["weight"].shape[2:]
    n = len(kernel)
    stride = _per_dim(call.args["stride"], n, 1)
    padding = _per_dim(call.args["padding"], n, 0)
    dilation = _per_dim(call.args["dilation"], n, 1)
    if call.args["transposed"]:
        out_pad = _per_dim(call.args["output_padding"], n, 0)
        return _window_maps(
            call,
            t,
            2,
            "transposed convolution",
            lambda j: TransposedWindow(kernel[j], stride[j], padding[j], dilation[j], out_pad[j]),
        )
    return _window_maps(
        call,
        t,
        2,
        "convolution",
        lambda j: Window(kernel[j], stride[j], padding[j], dilation[j]),
    )


def _pool(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    n = int(re.search(r"pool(\d)d", call.name).group(1))  # type: ignore[union-attr]
    kernel = _per_dim(call.args["kernel_size"], n, 1)
    stride = _per_dim(call.args.get("stride"), n, kernel)  # empty stride means kernel
    padding = _per_dim(call.args.get("padding", 0), n, 0)
    dilation = _per_dim(call.args.get("dilation", 1), n, 1)
    first = len(t.shape) - n
    return _window_maps(
        call, t, first, "pooling", lambda j: Window(kernel[j], stride[j], padding[j], dilation[j])
    )


def _pads(pad: Sequence[int], n: int) -> list[tuple[int, int]]:
    """F.pad order (last dim first) -> (before, after) for each of the last n dims."""
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
    pairs += [(0, 0)] * (n - len(pairs))
    return list(reversed(pairs[:n]))


def _constant_pad(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    pad = list(call.args["pad"])
    n = len(pad) // 2
    pairs = _pads(pad, n)
    first = len(t.shape) - n
    ks = _spatial_window_dims(t, 0, "padding")
    maps: list[DimMap] = [Identity()] * call.ndim
    layout = []
    for i, (dim, k) in enumerate(zip(t.layout, ks)):
        if k is not None and i >= first:
            before, after = pairs[i - first]
            maps[k] = Window(padding=before, after=after)
            layout.append(dim)
        elif k is not None:
            layout.append(dim)
        else:
            layout.append((ns(call.out_shapes[0][i]),))
    return OpGeometry([tuple(layout)], {t.index: tuple(maps)})


def _reflect_pad(call: OpCall) -> OpGeometry:
    return _border_pad(call, reflect=True)


def _replicate_pad(call: OpCall) -> OpGeometry:
    return _border_pad(call, reflect=False)


def _border_pad(call: OpCall, reflect: bool) -> OpGeometry:
    t = call.args["self"]
    pad = list(call.args["padding"])
    n = len(pad) // 2
    pairs = _pads(pad, n)
    first = len(t.shape) - n

    def make(j: int) -> DimMap:
        before, after = pairs[j]
        if before < 0 or after < 0:
            raise Refuse("uses negative reflection/replication padding")
        return Reflect(before, after) if reflect else Window(padding=before, after=after)

    return _window_maps(call, t, first, "padding", make)


_UPSAMPLE_MODES = {
    "upsample_nearest": "nearest",
    "_upsample_nearest_exact": "nearest-exact",
    "upsample_linear1d": "linear",
    "upsample_bilinear2d": "linear",
    "upsample_trilinear3d": "linear",
    "upsample_bicubic2d": "cubic",
}


def _upsample(call: OpCall) -> OpGeometry:
    t = call.args["input"] if "input" in call.args else call.args["self"]
    name = call.func._schema.name.split("::")[1]
    mode = next(m for prefix, m in _UPSAMPLE_MODES.items() if name.startswith(prefix))
    if call.args.get("align_corners"):
        raise Refuse(
            "interpolates with align_corners=True, whose sampling grid depends on the size of "
            "the whole image",
            "use align_corners=False with an integer scale_factor",
        )
    n = int(name[-2]) if name[-2].isdigit() else len(t.shape) - 2
    if "scale_factors" in call.args:
        scales = call.args["scale_factors"]
    else:
        keys = {1: ["scales"], 2: ["scales_h", "scales_w"], 3: ["scales_d", "scales_h", "scales_w"]}
        scales = [call.args.get(key) for key in keys[n]]
    if scales is None or any(s is None for s in scales):
        raise Refuse(
            "interpolates to a fixed output size (F.interpolate(size=...)), so the scale "
            "depends on the size of the whole image",
            "use F.interpolate(x, scale_factor=<integer>) instead of size=",
        )
    factors = []
    for s in scales:
        if float(s) != int(s) or int(s) < 1:
            raise Refuse(
                f"interpolates by the non-integer scale factor {s}",
                "use an integer scale_factor (2, 3, ...)",
            )
        factors.append(int(s))
    first = len(t.shape) - n
    return _window_maps(call, t, first, "interpolation", lambda j: Upsample(factors[j], mode))


def _pixel_shuffle(call: OpCall) -> OpGeometry:
    """``pixel_shuffle`` moves channel blocks into an r x r neighbourhood (output ``o`` reads
    input ``o // r``, like nearest upsampling); ``pixel_unshuffle`` is the inverse (a
    stride-r window of size r)."""
    t = call.args["self"]
    shuffle = "unshuffle" not in call.name
    r = call.args["upscale_factor" if shuffle else "downscale_factor"]
    make = (lambda j: Upsample(r, "nearest")) if shuffle else (lambda j: Window(r, r))
    return _window_maps(call, t, len(t.shape) - 2, "pixel shuffle", make)


def _refuse_with(why: str, fix: str, *, global_op: bool = False) -> Rule:
    def rule(call: OpCall) -> OpGeometry:
        raise Refuse(why, fix, global_op=global_op)

    return rule


_GLOBAL_POOL = _refuse_with(
    "pools to a fixed output size (adaptive pooling), so each output reads a region that "
    "grows with the image: global pooling",
    "move the global pooling and everything after it into the head, which runs on the "
    "stitched feature map: split the model into a streamable trunk and a head",
    global_op=True,
)
_RANDOM = _refuse_with(
    "draws random values for every pixel (e.g. dropout in training mode), which differ "
    "between tiles",
    "call model.eval() for dropout layers inside the trunk, or use per-sample or "
    "per-channel randomness (stochastic depth, Dropout2d) which tilefn replays exactly",
)


def _like(call: OpCall) -> OpGeometry:
    if torch.Tag.nondeterministic_seeded in call.func.tags:
        return _RANDOM(call)
    return _same_layout(call)


def _new_tensor(call: OpCall) -> OpGeometry:
    """``x.new_zeros(shape)``: a tensor of an explicit shape, not computed from ``x``."""
    return OpGeometry([None] * len(call.out_shapes))


def _register_defaults() -> None:
    for packet in (
        aten._to_copy,
        aten.clone,
        aten.alias,
        aten.detach,
        aten.lift_fresh_copy,
        aten.contiguous,
        aten.fill_,
        aten.zero_,
        aten._prelu_kernel,
        aten.where,
        aten.masked_fill,
        aten.masked_fill_,
        aten.fill,
        aten.native_dropout_backward,
        aten.leaky_relu,
        aten.leaky_relu_,
        aten.hardtanh,
        aten.hardtanh_,
        aten.gelu,
        aten.gelu_,
        aten.silu,
        aten.silu_,
        aten.mish,
        aten.mish_,
        aten.elu,
        aten.elu_,
        aten.hardswish,
        aten.hardswish_,
        aten.hardsigmoid,
        aten.hardsigmoid_,
        aten.softplus,
        aten.threshold,
        aten.threshold_,
        aten.log_sigmoid_forward,
        aten.relu6,
        aten.celu,
        aten.selu,
        aten.clamp,
        aten.clamp_,
        aten.clamp_min,
        aten.clamp_min_,
        aten.clamp_max,
        aten.clamp_max_,
        aten.softshrink,
        aten.hardshrink,
        aten.copy_,
    ):
        register_rule(packet, pointwise)
    for packet in (
        aten.empty_like,
        aten.zeros_like,
        aten.ones_like,
        aten.full_like,
        aten.rand_like,
        aten.randn_like,
        aten.randint_like,
    ):
        register_rule(packet, _like)
    for packet in (aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias):
        register_rule(packet, _view)
    for packet in (
        aten.new_empty,
        aten.new_zeros,
        aten.new_ones,
        aten.new_full,
        aten.new_empty_strided,
    ):
        register_rule(packet, _new_tensor)
    register_rule(aten.permute, _permute)
    register_rule(aten.transpose, _transpose)
    register_rule(aten.t, _transpose)
    register_rule(aten.unsqueeze, _unsqueeze)
    register_rule(aten.squeeze, _squeeze)
    register_rule(aten.expand, _expand)
    register_rule(aten.select, _select)
    register_rule(aten.slice, _slice)
    for packet in (aten.split, aten.split_with_sizes, aten.unbind, aten.chunk):
        register_rule(packet, _split)
    register_rule(aten.cat, _cat)
    register_rule(aten.stack, _stack)
    for packet in (
        aten.sum,
        aten.mean,
        aten.amax,
        aten.amin,
        aten.max,
        aten.min,
        aten.var,
        aten.std,
        aten.var_mean,
        aten.std_mean,
        aten.logsumexp,
        aten.prod,
        aten.argmax,
        aten.argmin,
        aten.any,
        aten.all,
        aten.norm,
        aten.linalg_vector_norm,
    ):
        register_rule(packet, _reduce)
    for packet in (
        aten._softmax,
        aten._log_softmax,
        aten.softmax,
        aten.log_softmax,
        aten.cumsum,
        aten.cumprod,
    ):
        register_rule(packet, _along_dim)
    register_rule(aten.native_layer_norm, _layer_norm)
    for packet in (
        aten.native_batch_norm,
        aten._native_batch_norm_legit_no_training,
        aten._native_batch_norm_legit,
        aten.batch_norm,
    ):
        register_rule(packet, _batch_norm)
    register_rule(aten.native_group_norm, _group_norm)
    for packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
        register_rule(packet, _mm)
    register_rule(aten.convolution, _convolution)
    for packet in (
        aten.max_pool2d_with_indices,
        aten.max_pool3d_with_indices,
        aten.avg_pool2d,
        aten.avg_pool3d,
        aten.max_pool2d,
        aten.max_pool3d,
    ):
        register_rule(packet, _pool)
    register_rule(aten.constant_pad_nd, _constant_pad)
    register_rule(aten.pixel_shuffle, _pixel_shuffle)
    register_rule(aten.pixel_unshuffle, _pixel_shuffle)
    for packet in (aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d):
        register_rule(packet, _reflect_pad)
    for packet in (aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d):
        register_rule(packet, _replicate_pad)
    for packet in (
        aten.upsample_nearest1d,
        aten.upsample_nearest2d,
        aten.upsample_nearest3d,
        aten._upsample_nearest_exact1d,
        aten._upsample_nearest_exact2d,
        aten._upsample_nearest_exact3d,
        aten.upsample_linear1d,
        aten.upsample_bilinear2d,
        aten.upsample_trilinear3d,
        aten.upsample_bicubic2d,
    ):
        register_rule(packet, _upsample)
    for packet in (
        aten._adaptive_avg_pool2d,
        aten._adaptive_avg_pool3d,
        aten.adaptive_max_pool2d,
        aten.adaptive_max_pool3d,
        aten.adaptive_avg_pool1d,
        aten.adaptive_max_pool1d,
    ):
        register_rule(packet, _GLOBAL_POOL)
    for packet in (
        aten.bernoulli,
        aten.bernoulli_,
        aten.uniform_,
        aten.normal_,
        aten.native_dropout,
        aten.exponential_,
        aten.random_,
        aten.rand_like,
    ):
        register_rule(packet, _RANDOM)


_register_defaults()
