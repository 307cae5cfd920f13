"""Built-in geometry rules for ops that read a window of positions along each spatial dim:
convolution (also transposed), pooling, padding (constant, reflect, replicate),
interpolation by integer factors, pixel (un)shuffle, ``F.unfold``/``F.fold``; and the refusal of adaptive (global)
pooling."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from fractions import Fraction

import torch

from ._geometry import (
    AlignedUpsample,
    DimMap,
    Identity,
    Reflect,
    TransposedWindow,
    Upsample,
    Window,
)
from ._rules import (
    OpCall,
    OpGeometry,
    Refuse,
    RuleTable,
    TensorArg,
    atom_size,
    has_spatial,
    ns,
    refuse_with,
    register_table,
)

__all__ = ["WINDOW_RULES"]

aten = torch.ops.aten


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
    outs = [layout if len(s) == len(layout) else None for s in call.out_shapes]
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


def _pool(call: OpCall, n: int) -> OpGeometry:
    """Max and average pooling over the last ``n`` dims."""
    t = call.args["self"]
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


def _upsample(call: OpCall, mode: str, n: int) -> OpGeometry:
    """Interpolation in ``mode`` (nearest, nearest-exact, linear, cubic) over the last ``n``
    dims, by integer scale factors."""
    t = call.args["input"] if "input" in call.args else call.args["self"]
    aligned = bool(call.args.get("align_corners"))
    if aligned and mode != "linear":
        raise Refuse(
            "interpolates bicubically with align_corners=True, whose sampling grid depends on "
            "the size of the whole image (tilefn computes it at each crop's place for linear "
            "modes only)",
            "use mode='bilinear', or align_corners=False with an integer scale_factor",
        )
    if "scale_factors" in call.args:
        scales = call.args["scale_factors"]
    else:
        keys = {1: ["scales"], 2: ["scales_h", "scales_w"], 3: ["scales_d", "scales_h", "scales_w"]}
        scales = [call.args.get(key) for key in keys[n]]
    first = len(t.shape) - n
    if scales is None or any(s is None for s in scales):
        # F.interpolate(size=...) (also scale_factor= with recompute_scale_factor=True): the
        # kernel samples at input/output size ratios. Exact integer ratios are the same as an
        # integer scale_factor; every crop's trace must give the same ratios (the planner
        # checks that the strides of all tensors agree between the image and each crop).
        ratios = [
            Fraction(out, size) for out, size in zip(call.out_shapes[0][first:], t.shape[first:])
        ]
    else:
        ratios = [Fraction(float(s)).limit_denominator(1 << 20) for s in scales]
    maps: list[DimMap] = []
    for r in ratios:
        if r.denominator == 1 and r >= 1:
            maps.append(AlignedUpsample(int(r)) if aligned else Upsample(int(r), mode))
        elif aligned:
            raise Refuse(
                f"interpolates with align_corners=True by the ratio {r}, which is not an "
                "integer factor, so output positions do not sit on a fixed grid of input "
                "positions",
                "upsample by an integer factor (scale_factor=2, or size= an integer multiple "
                "of the input size)",
            )
        elif r.numerator == 1 and mode == "nearest":  # nearest by 1/k: every k-th position
            k = r.denominator
            maps.append(Window(kernel=1, stride=k, after=1 - k))
        elif scales is not None:
            raise Refuse(
                f"interpolates by the non-integer scale factor {float(r):g} (only integer "
                "factors, or 1/k with mode='nearest', keep output positions on a fixed grid "
                "of input positions)",
                "use an integer scale_factor (2, 3, ...)",
            )
        else:
            raise Refuse(
                f"interpolates to the size {tuple(call.out_shapes[0][first:])} from "
                f"{tuple(t.shape[first:])}, the ratio {r}, which is not an integer factor (or "
                "1/k for mode='nearest'), so output positions do not sit on a fixed grid of "
                "input positions",
                "interpolate to an integer multiple of the input size (size=skip.shape[-2:] "
                "with a skip at twice the resolution), or use an integer scale_factor",
            )
    return _window_maps(call, t, first, "interpolation", lambda j: maps[j])


def _pixel_shuffle(call: OpCall, shuffle: bool) -> OpGeometry:
    """``pixel_shuffle`` moves channel blocks into an r x r neighbourhood (output ``o`` reads
    input ``o // r``, like nearest upsampling); ``pixel_unshuffle`` is the inverse (a
    stride-r window of size r)."""
    t = call.args["self"]
    r = call.args["upscale_factor" if shuffle else "downscale_factor"]
    make = (lambda j: Upsample(r, "nearest")) if shuffle else (lambda j: Window(r, r))
    return _window_maps(call, t, len(t.shape) - 2, "pixel shuffle", make)


def _block_counts(call: OpCall, sizes: Sequence[int]) -> tuple[list[int], ...]:
    """``F.unfold``/``F.fold`` arguments per dim, and the number of blocks along each of
    the two dims for the given image-side sizes."""
    kernel, dilation, padding, stride = (
        _per_dim(call.args[name], 2, 1) for name in ("kernel_size", "dilation", "padding", "stride")
    )
    counts = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, d, p, s in zip(sizes, kernel, dilation, padding, stride)
    ]
    return kernel, dilation, padding, stride, counts


def _im2col(call: OpCall) -> OpGeometry:
    """``F.unfold``: column ``(c, i, j)`` of block ``(oh, ow)`` reads one position of a
    kernel window, so each spatial dim is a :class:`Window`. The block dim ``L`` merges the
    output positions row-major: its atoms are the two windowed dims in order, with the
    spatial sizes of the output (the number of blocks), not of the input."""
    t = call.args["self"]
    first = len(t.shape) - 2
    ks = _spatial_window_dims(t, first, "unfold (im2col)")
    kernel, dilation, padding, stride, counts = _block_counts(call, t.shape[first:])
    maps: list[DimMap] = [Identity()] * call.ndim
    sizes = list(t.sizes)
    blocks: list[int] = []
    for j, k in enumerate(ks):
        if k is None:
            blocks.append(ns(counts[j]))
            continue
        maps[k] = Window(kernel[j], stride[j], padding[j], dilation[j])
        sizes[k] = counts[j]
        blocks.append(k)
    out = call.out_shapes[0]
    layout = tuple((ns(n),) for n in out[:-1]) + (tuple(b for b in blocks if b != ns(1)),)
    return OpGeometry([layout], {t.index: tuple(maps)}, [tuple(sizes)])


def _col2im(call: OpCall) -> OpGeometry:
    """``F.fold``: block ``(oh, ow)`` adds its columns into the window it covers, as a
    transposed convolution writes its kernel (:class:`TransposedWindow`). The block dim
    must hold the blocks row-major, as ``F.unfold`` (or a view of a map) makes it."""
    t = call.args["self"]
    for dim in t.layout[:-1]:
        if has_spatial(dim):
            raise Refuse("folds (col2im) a tensor whose channel dim holds a spatial dim")
    out_size = list(call.args["output_size"])
    kernel, dilation, padding, stride, counts = _block_counts(call, out_size)
    atoms = [a for a in t.layout[-1] if a != ns(1)]
    maps: list[DimMap] = [Identity()] * call.ndim
    out_dims: list[tuple[int, ...]] = []
    for j, count in enumerate(counts):
        a = atoms[0] if atoms else None
        if a is not None and atom_size(a, t.sizes) == count:
            atoms.pop(0)
        elif count == 1:  # a size-1 factor, dropped from the layout
            a = None
        else:
            raise Refuse(
                "folds (col2im) a tensor whose block dim does not hold the blocks of its "
                "output row-major (as F.unfold makes it)",
                "reshape to (N, C * kernel, H_blocks * W_blocks) before F.fold",
            )
        if a is None or a < 0:
            out_dims.append((ns(out_size[j]),))
            continue
        length = (count - 1) * stride[j] - 2 * padding[j] + dilation[j] * (kernel[j] - 1) + 1
        maps[a] = TransposedWindow(
            kernel[j], stride[j], padding[j], dilation[j], out_size[j] - length
        )
        out_dims.append((a,))
    if atoms:  # pragma: no cover - the block count is checked by the kernel itself
        raise Refuse("folds (col2im) a tensor whose block dim holds more than the blocks")
    out = call.out_shapes[0]
    layout = tuple((ns(n),) for n in out[:-2]) + tuple(out_dims)
    return OpGeometry([layout], {t.index: tuple(maps)})


_GLOBAL_POOL = refuse_with(
    "pools to a fixed output size (adaptive pooling), so each output reads a region that "
    "grows with the image: global pooling",
    "move the global pooling and everything after it into the head, which runs on the "
    "stitched feature map: split the model into a streamable trunk and a head",
    global_op=True,
)


WINDOW_RULES: RuleTable = (
    (_convolution, "convolution"),
    (functools.partial(_pool, n=2), "max_pool2d_with_indices avg_pool2d max_pool2d"),
    (functools.partial(_pool, n=3), "max_pool3d_with_indices avg_pool3d max_pool3d"),
    (_constant_pad, "constant_pad_nd"),
    (_im2col, "im2col"),
    (_col2im, "col2im"),
    (functools.partial(_pixel_shuffle, shuffle=True), "pixel_shuffle"),
    (functools.partial(_pixel_shuffle, shuffle=False), "pixel_unshuffle"),
    (_reflect_pad, "reflection_pad1d reflection_pad2d reflection_pad3d"),
    (_replicate_pad, "replication_pad1d replication_pad2d replication_pad3d"),
    (
        _GLOBAL_POOL,
        "_adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool2d adaptive_max_pool3d "
        "adaptive_avg_pool1d adaptive_max_pool1d",
    ),
    *(
        (functools.partial(_upsample, mode=mode, n=n), name)
        for name, mode, n in (
            ("upsample_nearest1d", "nearest", 1),
            ("upsample_nearest2d", "nearest", 2),
            ("upsample_nearest3d", "nearest", 3),
            ("_upsample_nearest_exact1d", "nearest-exact", 1),
            ("_upsample_nearest_exact2d", "nearest-exact", 2),
            ("_upsample_nearest_exact3d", "nearest-exact", 3),
            ("upsample_linear1d", "linear", 1),
            ("upsample_bilinear2d", "linear", 2),
            ("upsample_trilinear3d", "linear", 3),
            ("upsample_bicubic2d", "cubic", 2),
        )
    ),
)
register_table(WINDOW_RULES)
