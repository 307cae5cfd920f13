"""Built-in geometry rules for ops that move, merge, select or reduce dims: views and
reshapes, permutes, slicing, split and cat, reductions and softmax over non-spatial dims,
normalisation layers, matrix products (per-pixel ``nn.Linear``)."""

from __future__ import annotations

import math

import torch

from ._geometry import Identity, Window
from ._rules import (
    Layout,
    OpCall,
    OpGeometry,
    Refuse,
    RuleTable,
    TensorArg,
    atom_size,
    canonical,
    has_spatial,
    identity_maps,
    ns,
    register_table,
    same_layout,
)

__all__ = ["VIEW_RULES"]

aten = torch.ops.aten


# --------------------------------------------------------------------------- views


def _view(call: OpCall) -> OpGeometry:
    """A view or reshape: the new dims take the atoms of the old layout in order.

    Spatial dims of size 1 fit any size-1 dim, so they are placed by convention, the one that
    gives a crop the layout the whole image has (where those dims are longer): size-1 spatial
    atoms go with the spatial atom next to them, the one before where it is in a new dim of
    size > 1 (``(1, 64, 1, C) -> (64, C)`` keeps W with H), else the one after where they
    were separate dims (``(N, C, 1, W) -> (N, C, W)`` flattens H with W). Otherwise a run of
    size-1 new dims takes them on its *last* dims (the batch dim, size 1 and dropped from
    layouts, comes first; ``(N, H * W) -> (N, 1, W)`` splits H off again), and a new dim of
    size > 1 takes those that follow it when the next new dim is not of size 1.
    """
    t: TensorArg = call.args["self"]
    new_shape = list(call.out_shapes[0])
    atoms = [a for dim in t.layout for a in dim if a != ns(1)]  # type: ignore[union-attr]
    dim_of = [k for k, dim in enumerate(t.layout) for a in dim if a != ns(1)]  # type: ignore[union-attr]
    unit = lambda k: k < len(atoms) and atoms[k] >= 0 and atom_size(atoms[k], t.sizes) == 1  # noqa: E731
    out: list[tuple[int, ...]] = []
    i = j = 0
    while j < len(new_shape):
        target = new_shape[j]
        if target == 1:
            run = 1
            while j + run < len(new_shape) and new_shape[j + run] == 1:
                run += 1
            units = 0
            while units < run and unit(i + units):
                units += 1
            ahead = units
            while unit(i + ahead):
                ahead += 1
            if (
                j + run < len(new_shape)
                and i + ahead < len(atoms)
                and atoms[i + ahead] >= 0
                and dim_of[i + ahead] != dim_of[i]
            ):  # a flattening: they go with the spatial atom after them (H of 1 with W)
                units = 0
            out += [(ns(1),)] * (run - units) + [(a,) for a in atoms[i : i + units]]
            i, j = i + units, j + run
            continue
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
        ahead = i
        while unit(ahead):
            ahead += 1
        follows = ahead < len(atoms) and atoms[ahead] >= 0 and j + 1 < len(new_shape)
        if (j + 1 == len(new_shape) or new_shape[j + 1] != 1) and (
            has_spatial(group) or not follows
        ):
            while unit(i):
                group.append(atoms[i])
                i += 1
        out.append(tuple(group))
        j += 1
    if any(a >= 0 for a in atoms[i:]):
        raise Refuse("reshapes the spatial dims")  # pragma: no cover
    layout = canonical(out, t.sizes)
    _check_each_spatial_once(layout, call.ndim)
    return OpGeometry([layout], identity_maps(call))


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
    return OpGeometry([tuple(t.layout[d] for d in dims)], identity_maps(call))


def _transpose(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    n = len(t.shape)
    if call.func is aten.t.default:
        d0, d1 = 0, n - 1
    else:
        d0, d1 = call.args["dim0"] % n, call.args["dim1"] % n
    layout = list(t.layout)
    layout[d0], layout[d1] = layout[d1], layout[d0]
    return OpGeometry([tuple(layout)], identity_maps(call))


def _unsqueeze(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    d = call.args["dim"] % (len(t.shape) + 1)
    layout = list(t.layout)
    layout.insert(d, (ns(1),))
    return OpGeometry([tuple(layout)], identity_maps(call))


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
    return OpGeometry([tuple(keep)], identity_maps(call))


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
    return OpGeometry([tuple(layout)], identity_maps(call))


def _select(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    d = call.args["dim"] % len(t.shape)
    if has_spatial(t.layout[d]):
        raise Refuse(
            "indexes a single position along a spatial dim, which depends on where the "
            "tile lies in the image",
            "index channels, not positions, inside the streamed trunk",
        )
    return OpGeometry([t.layout[:d] + t.layout[d + 1 :]], identity_maps(call))


def _slice(call: OpCall) -> OpGeometry:
    t = call.args["self"]
    d = call.args["dim"] % len(t.shape)
    layout = list(t.layout)
    dim = layout[d]
    if not has_spatial(dim):
        layout[d] = (ns(call.out_shapes[0][d]),)
        return OpGeometry([tuple(layout)], identity_maps(call))
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
    return OpGeometry(outs, identity_maps(call))


def _cat(call: OpCall) -> OpGeometry:
    # Empty tensors (the legacy shape (0,), or a skip with no channels) add nothing.
    tensors = [t for t in call.args["tensors"] if t.spatial or math.prod(t.shape) > 0]
    spatial = [t for t in tensors if t.spatial]
    ref = spatial[0]
    d = call.args.get("dim", 0) % len(ref.shape)
    if sum(a >= 0 for a in ref.layout[d]) > 1:
        raise Refuse(
            "treats the image's positions as a sequence of tokens (its spatial dims are "
            "flattened into one, and a token is concatenated to them, as the class token of a "
            "vision transformer), so attention over the tokens mixes every position of the "
            "image",
            "stream a convolutional trunk (or the patch embedding only) and run the "
            "transformer blocks in the head, on the stitched feature map",
        )
    if has_spatial(ref.layout[d]):
        raise Refuse(
            "concatenates tensors along a spatial dim", "concatenate along channels instead"
        )
    for t in tensors:
        uniform = all(
            t.uniform(i) and t.shape[i] == ref.shape[i]
            for i, dim in enumerate(ref.layout)
            if has_spatial(dim)
        )
        if uniform and len(t.shape) == len(ref.shape):
            continue  # a broadcast value (an image-pooling branch upsampled back from 1 x 1)
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
    return OpGeometry([tuple(layout)], identity_maps(call))


def _stack(call: OpCall) -> OpGeometry:
    tensors = call.args["tensors"]
    for t in tensors:
        if not t.spatial or t.layout != tensors[0].layout:
            raise Refuse("stacks tensors that are not all computed alike from the image")
    d = call.args.get("dim", 0) % (len(tensors[0].shape) + 1)
    layout = list(tensors[0].layout)
    layout.insert(d, (ns(len(tensors)),))
    return OpGeometry([tuple(layout)], identity_maps(call))


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
        every = {a for d in dims for a in t.layout[d] if a >= 0} == set(range(call.ndim))
        if not every:  # along some position axes only: each output reads a whole row
            raise Refuse(
                "reduces over some of the spatial dims only (a mean along rows or columns, "
                "strip pooling), so each output depends on a whole row or column of the image",
                "reduce over all spatial dims in one call (x.mean((2, 3)), which streams "
                "exactly as a whole-image statistic), or move it into the head",
            )
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
    return OpGeometry(outs, identity_maps(call))


def _along_dim(call: OpCall) -> OpGeometry:
    """softmax, cumsum, ...: mixes values along one dim, which must not be spatial."""
    t = call.args.get("self", call.args.get("input"))
    d = call.args["dim"] % len(t.shape)
    if has_spatial(t.layout[d]):
        raise Refuse(
            "mixes values along a spatial dim (softmax/cumsum over positions)",
            "apply it along channels, or move it into the head",
        )
    return same_layout(call)


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
    return OpGeometry([t.layout, stats, stats], identity_maps(call))


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
    return OpGeometry(outs, identity_maps(call))


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
    return OpGeometry([out], identity_maps(call))


VIEW_RULES: RuleTable = (
    (_view, "view _unsafe_view reshape _reshape_alias"),
    (_permute, "permute"),
    (_transpose, "transpose t"),
    (_unsqueeze, "unsqueeze"),
    (_squeeze, "squeeze"),
    (_expand, "expand"),
    (_select, "select"),
    (_slice, "slice"),
    (_split, "split split_with_sizes unbind chunk"),
    (_cat, "cat"),
    (_stack, "stack"),
    (
        _reduce,
        """sum mean amax amin max min var std var_mean std_mean logsumexp prod argmax argmin
        any all norm linalg_vector_norm""",
    ),
    (_along_dim, "_softmax _log_softmax softmax log_softmax cumsum cumprod"),
    (_layer_norm, "native_layer_norm"),
    (
        _batch_norm,
        "native_batch_norm _native_batch_norm_legit_no_training _native_batch_norm_legit "
        "batch_norm",
    ),
    (_group_norm, "native_group_norm"),
    (_mm, "mm addmm bmm baddbmm"),
)
register_table(VIEW_RULES)
