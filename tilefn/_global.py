"""Whole-image ops as barriers: recognising them, rewriting them as local ops on exact
statistics, and the exact reductions and their cotangents.

Squeeze-excitation, image-pooling branches, GroupNorm, InstanceNorm and BatchNorm with batch
statistics need a statistic of the whole map ``h`` they read: a mean (or sum) over all
positions, or a mean and a variance per group. So do a maximum (CBAM), a variance, a softmax
over all positions (a log-sum-exp: GCNet's attention pooling), a matrix product that sums
over positions (the product map's sum), and adaptive pooling to a grid of bins (PSPNet: a
sum per bin, each block adding to the bins it overlaps at its place). Given the statistic,
what they compute is local: ``x * s(mean)``, ``(x - mean) * rsqrt(var + eps) * w + b``,
``exp(x - lse)``. So the model is local once the statistics are fixed values, and the
statistics are exact reductions of maps that are themselves local functions of the image
(see ``_staged``). Where the model flattened the map's positions first (``x.flatten(2)``),
:class:`Unmerge` says how a stage gives the map its spatial dims back.

:class:`GlobalOps` is a ``TorchFunctionMode`` (above autograd, so the rewrite is
differentiable in the statistics) that sees every call of the functions :func:`match`
recognises and hands it to a handler: the tracer's (which decides from the recorded layout
whether the call is a barrier) or a stage's (which, by the call's position in the program,
feeds exact statistics, stops the model at a barrier, or lets the call run as it is).
Nothing here plans or runs crops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._positions import crop_starts

__all__ = [
    "LSE_KINDS",
    "VARIANCE_KINDS",
    "Barrier",
    "GlobalCall",
    "GlobalOps",
    "Reduction",
    "StopAtBarrier",
    "Unmerge",
    "match",
    "surrogate",
]

_MEANS = (torch.mean, torch.Tensor.mean)
_SUMS = (torch.sum, torch.Tensor.sum)
_MAXES = (torch.amax, torch.Tensor.amax)
_REDUCTIONS = {**dict.fromkeys(_MEANS, "mean"), **dict.fromkeys(_SUMS, "sum")}
_REDUCTIONS.update(dict.fromkeys(_MAXES, "max"))
_POOLS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_NORMS = (F.group_norm, F.instance_norm, F.batch_norm)
# softmax and log_softmax over one dim: (input, dim, dtype) by position, per function
_SOFTMAXES = {
    F.softmax: ("softmax", ("input", "dim", "_stacklevel", "dtype")),
    torch.softmax: ("softmax", ("input", "dim", "dtype")),
    torch.Tensor.softmax: ("softmax", ("input", "dim", "dtype")),
    F.log_softmax: ("log_softmax", ("input", "dim", "_stacklevel", "dtype")),
    torch.log_softmax: ("log_softmax", ("input", "dim", "dtype")),
    torch.Tensor.log_softmax: ("log_softmax", ("input", "dim", "dtype")),
}
_LOGSUMEXPS = (torch.logsumexp, torch.Tensor.logsumexp)
_VARIANCES = {
    torch.var: "var",
    torch.Tensor.var: "var",
    torch.std: "std",
    torch.Tensor.std: "std",
    torch.var_mean: "var_mean",
    torch.std_mean: "std_mean",
}
# Kinds whose statistics are a mean and a variance of the map they read, and what they return.
VARIANCE_KINDS = tuple(dict.fromkeys(_VARIANCES.values()))
_MATMULS = (
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
)
# Reshapes, whose input shapes a stage reads back to undo a flattening of spatial dims.
_RESHAPES = (
    torch.reshape,
    torch.Tensor.reshape,
    torch.Tensor.view,
    torch.flatten,
    torch.Tensor.flatten,
)
# Kinds whose statistic is a log-sum-exp over the reduced dims.
LSE_KINDS = ("softmax", "log_softmax", "logsumexp")


@dataclass
class GlobalCall:
    """A call of a function that may read the whole map (see :func:`match`)."""

    # "mean", "sum", "max" (amax), "pool" (adaptive average to size 1), "group", "instance",
    # "batch", "softmax", "log_softmax", "logsumexp", "contract" (a matmul: the sum over its
    # contracted dim of the product map, see :meth:`product`)
    kind: str
    input: torch.Tensor | None
    dims: tuple[int, ...] | None = None  # reduced dims of mean/sum/pool (None: all dims)
    keepdim: bool = False
    dtype: torch.dtype | None = None
    groups: int = 1
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 1e-5
    batch_stats: bool = False  # normalises with statistics of its input (F.batch_norm training)
    running: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    operands: tuple[torch.Tensor, torch.Tensor] | None = None  # of a matmul or einsum
    subscripts: tuple[str, str, str] | None = None  # of an einsum: its two inputs and output
    bins: tuple[int, ...] | None = None  # adaptive average pooling to this grid
    correction: float = 0.0  # of a variance: the divisor is positions - correction

    def product(self) -> torch.Tensor:
        """A matmul ``a @ b`` (``(..., M, P) @ (..., P, N)``) as a reduction: the map
        ``a[..., :, :, None] * b[..., None, :, :]`` of shape ``(..., M, P, N)``, whose sum over
        ``P`` (dim -2) is the product. An einsum likewise: the product over every index of
        both operands (:meth:`full`), whose sum over the indices the output drops is the
        einsum. Built only where the contraction is over positions."""
        assert self.operands is not None
        a, b = self.operands
        if self.subscripts is not None:
            ia, ib, _ = self.subscripts
            full = self.full()
            return _aligned(a, ia, full) * _aligned(b, ib, full)
        return a.unsqueeze(-1) * b.unsqueeze(-3)

    def full(self) -> str:
        """An einsum's indices in the product map: the first operand's, then the second's new
        ones."""
        assert self.subscripts is not None
        ia, ib, _ = self.subscripts
        return ia + "".join(c for c in dict.fromkeys(ib) if c not in ia)

    def _drop(self, v: torch.Tensor) -> torch.Tensor:
        """A statistic (reduced dims kept, of size 1) without them, unless ``keepdim``."""
        if self.keepdim:
            return v
        return v.reshape(()) if self.dims is None else v.squeeze(self.dims)

    def apply(self, values: Sequence[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What the call computes, given the exact statistics of its input: local work only."""
        if self.kind == "contract":
            if self.subscripts is None:
                return values[0].squeeze(-2)
            full, out = self.full(), self.subscripts[2]
            kept = "".join(c for c in full if c in out)
            dropped = tuple(i for i, c in enumerate(full) if c not in out)
            return torch.einsum(f"{kept}->{out}", values[0].squeeze(dropped))
        if self.kind == "bins":
            return values[0]
        if self.kind in VARIANCE_KINDS:  # values: the mean and the corrected variance
            mean, var = (self._drop(v) for v in values)
            spread = var.sqrt() if self.kind.startswith("std") else var
            return (spread, mean) if self.kind.endswith("_mean") else spread
        if self.kind in ("mean", "sum", "max", "pool", "logsumexp"):
            v = values[0]  # a maximum's second value is its number of ties
            return v if self.kind == "pool" else self._drop(v)
        x = self.input
        assert x is not None
        if self.kind in ("softmax", "log_softmax"):
            y = x if self.dtype is None else x.to(self.dtype)
            shifted = y - values[0]  # the log-sum-exp over the dim
            return shifted.exp() if self.kind == "softmax" else shifted
        mean, var = values
        c, ones = x.shape[1], [1] * (x.dim() - 2)
        m = _per_channel(mean, self.groups, c, ones)
        v = _per_channel(var, self.groups, c, ones)
        y = (x - m) * torch.rsqrt(v + self.eps)
        if self.weight is not None:
            y = y * self.weight.reshape(1, c, *ones)
        if self.bias is not None:
            y = y + self.bias.reshape(1, c, *ones)
        return y


def _per_channel(stat: torch.Tensor, groups: int, channels: int, ones: list[int]) -> torch.Tensor:
    """A statistic of the grouped view ``(N, G, 1, 1...)`` spread over the ``channels``."""
    n = stat.shape[0]
    return stat.expand(n, groups, channels // groups, *ones).reshape(n, channels, *ones)


def _dims(dim: Any, ndim: int) -> tuple[int, ...] | None:
    if dim is None:
        return None
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)) or not all(isinstance(d, int) for d in dim):
        return None
    return tuple(sorted({d % ndim for d in dim})) if ndim else ()


def match(func: Any, args: tuple, kwargs: dict) -> GlobalCall | None:
    """The call as a :class:`GlobalCall` if ``func`` is one of the functions whose statistics
    may span the whole map: ``mean``/``sum``/``amax`` (function or method), adaptive average pooling
    to size 1, ``F.group_norm``, ``F.instance_norm`` and ``F.batch_norm``. Purely syntactic
    (whether it reads a spatial map is the tracer's to decide), so that every run of the
    model matches the same calls in the same order."""
    if func in _REDUCTIONS:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        names = ("dim", "keepdim")
        # torch also takes numpy's names for these: axis=, keepdims=
        aliases = {"axis": "dim", "keepdims": "keepdim"}
        bound = {**dict(zip(names, args[1:])), **{aliases.get(k, k): v for k, v in kwargs.items()}}
        raw = bound.get("dim")
        dims = _dims(raw, x.dim())
        if raw is not None and dims is None:
            return None  # named dims and the like: left to the tracer
        if raw is not None and len(dims or ()) == 0:
            return None  # dim=() means "all dims" only in old torch; let torch decide
        if func in _MAXES and raw is None:
            return None  # amax() needs its dims; torch refuses the call
        return GlobalCall(
            _REDUCTIONS[func],
            x,
            dims=dims,
            keepdim=bool(bound.get("keepdim", False)),
            dtype=bound.get("dtype"),
        )
    if func in _SOFTMAXES:
        kind, names = _SOFTMAXES[func]
        bound = {**dict(zip(names, args)), **kwargs}
        x, dim = bound.get("input"), bound.get("dim")
        if not isinstance(x, torch.Tensor) or not isinstance(dim, int) or x.dim() == 0:
            return None  # an implicit dim: left to the tracer
        return GlobalCall(kind, x, dims=(dim % x.dim(),), keepdim=True, dtype=bound.get("dtype"))
    if func in _LOGSUMEXPS:
        bound = {**dict(zip(("input", "dim", "keepdim"), args)), **kwargs}
        x = bound.get("input")
        if not isinstance(x, torch.Tensor):
            return None
        dims = _dims(bound.get("dim"), x.dim())
        if not dims:
            return None
        return GlobalCall("logsumexp", x, dims=dims, keepdim=bool(bound.get("keepdim", False)))
    if func is torch.einsum:
        return _einsum(args, kwargs)
    if func in _VARIANCES:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return None
        rest = list(args[1:])
        if rest and isinstance(rest[0], bool):  # var(x, unbiased)
            bound = {"unbiased": rest[0]}
        else:
            bound = dict(zip(("dim", "unbiased", "keepdim"), rest))
        bound.update(kwargs)
        dims = _dims(bound.get("dim"), x.dim())
        if bound.get("dim") is not None and not dims:
            return None
        correction = bound.get("correction")
        if correction is None:
            correction = 1.0 if bound.get("unbiased", True) else 0.0
        return GlobalCall(
            _VARIANCES[func],
            x,
            dims=dims,
            keepdim=bool(bound.get("keepdim", False)) and dims is not None,
            correction=float(correction),
        )
    if func in _MATMULS:
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (a, b)):
            return None  # products with vectors: left to the tracer
        if set(kwargs) - {"input", "other", "mat2"}:
            return None  # out= and the like
        return GlobalCall("contract", None, operands=(a, b))
    if func in _POOLS:
        x = args[0] if args else kwargs.get("input")
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        n = _POOLS[func]
        sizes = (size,) * n if isinstance(size, int) else tuple(size or ())
        if not isinstance(x, torch.Tensor) or len(sizes) != n:
            return None
        if not all(isinstance(s, int) and s >= 1 for s in sizes):
            return None  # None keeps a dim's size: left to the tracer
        dims = tuple(range(x.dim() - n, x.dim()))
        if all(s == 1 for s in sizes):
            return GlobalCall("pool", x, dims=dims, keepdim=True)
        return GlobalCall("bins", x, dims=dims, keepdim=True, bins=tuple(sizes))
    if func is F.group_norm:
        bound = {**dict(zip(("input", "num_groups", "weight", "bias", "eps"), args)), **kwargs}
        return GlobalCall(
            "group",
            bound["input"],
            groups=int(bound["num_groups"]),
            weight=bound.get("weight"),
            bias=bound.get("bias"),
            eps=float(bound.get("eps", 1e-5)),
            batch_stats=True,
        )
    if func is F.instance_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats")
        bound = {**dict(zip(names + ("momentum", "eps"), args)), **kwargs}
        x = bound["input"]
        return GlobalCall(
            "instance",
            x,
            groups=int(x.shape[1]) if x.dim() > 1 else 1,
            weight=bound.get("weight"),
            bias=bound.get("bias"),
            eps=float(bound.get("eps", 1e-5)),
            batch_stats=bool(bound.get("use_input_stats", True)),
            running=(bound.get("running_mean"), bound.get("running_var")),
        )
    if func is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training")
        bound = {**dict(zip(names + ("momentum", "eps"), args)), **kwargs}
        x = bound["input"]
        return GlobalCall(
            "batch",
            x,
            groups=int(x.shape[1]) if x.dim() > 1 else 1,
            weight=bound.get("weight"),
            bias=bound.get("bias"),
            eps=float(bound.get("eps", 1e-5)),
            batch_stats=bool(bound.get("training", False)),
            running=(bound.get("running_mean"), bound.get("running_var")),
        )
    return None


def _aligned(t: torch.Tensor, indices: str, full: str) -> torch.Tensor:
    """``t`` (one dim per index) with its dims in the order of ``full``, and a dim of size 1
    for each index it lacks (views only), so that operands multiply by broadcasting."""
    order = sorted(range(len(indices)), key=lambda i: full.index(indices[i]))
    t = t.permute(order)
    for pos, c in enumerate(full):
        if c not in indices:
            t = t.unsqueeze(pos)
    return t


def _einsum(args: tuple, kwargs: dict) -> GlobalCall | None:
    """An einsum of two operands with explicit indices (no ``...``, each index once per
    operand), as a contraction (whether over positions is the tracer's to decide)."""
    if kwargs or not args or not isinstance(args[0], str):
        return None
    ops = args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if len(ops) != 2 or not all(isinstance(t, torch.Tensor) for t in ops):
        return None
    eq = args[0].replace(" ", "")
    if "." in eq:
        return None
    lhs, arrow, out = eq.partition("->")
    parts = lhs.split(",")
    if len(parts) != 2 or not all(p.isalpha() for p in parts):
        return None
    ia, ib = parts
    if not arrow:  # implicit output: the indices that appear once, in order
        out = "".join(sorted(c for c in set(ia + ib) if (ia + ib).count(c) == 1))
    if not out.isalpha() and out:
        return None
    if any(len(set(p)) != len(p) for p in (ia, ib, out)) or set(out) - set(ia + ib):
        return None
    if len(ia) != ops[0].dim() or len(ib) != ops[1].dim():
        return None
    return GlobalCall("contract", None, operands=(ops[0], ops[1]), subscripts=(ia, ib, out))


@dataclass(frozen=True)
class Unmerge:
    """How a stage gives back the map a barrier reads with its spatial dims restored, where
    the model flattened them (``x.flatten(2).mean(-1)``, ``x.reshape(B, C, H * W)``): each dim
    of the call's view is split into its factors (the layout's atoms), so the stage returns a
    map with one dim per position axis, which streams and is reduced like any other. A
    spatial factor's size on a crop is read from the input shape of an earlier reshape in
    the same run (``sources``: per spatial dim, that reshape's position among the run's
    reshapes, and the dim of its input), recorded on the whole image."""

    atoms: tuple[tuple[int, ...], ...]  # per dim of the call's view: its layout atoms
    sources: tuple[tuple[int, int], ...]  # per spatial dim k: (reshape position, input dim)
    stat_shape: tuple[int, ...]  # of the statistics in the call's view

    def shape(self, viewed: Sequence[int], reshapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The restored map's shape on this run: a dim of one factor keeps its size in the
        call's view (``viewed``), a spatial factor's is read from the run's ``reshapes`` (input
        shapes), a lone non-spatial factor of a merged dim is what remains of its size."""
        sizes: list[int] = []
        for dim, n in zip(self.atoms, viewed):
            if len(dim) == 1:
                sizes.append(int(n))
                continue
            factors = [
                int(reshapes[self.sources[a][0]][self.sources[a][1]]) if a >= 0 else 0 for a in dim
            ]
            known = math.prod(f for f in factors if f) or 1
            fixed = [a for a, f in zip(dim, factors) if not f]
            for a, f in zip(dim, factors):
                if f:
                    sizes.append(f)
                elif len(fixed) == 1:
                    sizes.append(int(n) // known)
                else:
                    sizes.append(-a - 1)
        return tuple(sizes)


@dataclass(frozen=True)
class Barrier:
    """A whole-image op of the model on one input shape: what it reduces, and where.

    Reductions are over dims ``reduce`` of the *grouped view* of the map ``h`` it reads:
    ``h`` itself for ``mean``/``sum``/``pool``, ``h.unflatten(1, (groups, C // groups))``
    for normalisations (GroupNorm: its groups; InstanceNorm and BatchNorm: one group per
    channel), so every kind is a mean, a sum, or a mean and a variance per kept position."""

    kind: str
    layer: str  # the layer it runs in, as error messages name it
    shape: tuple[int, ...]  # of the map it reads, on the whole image
    reduce: tuple[int, ...]
    groups: int | None  # normalisations: the grouped view's groups
    dtype: torch.dtype  # of its statistics
    eps: float = 0.0
    module: str | None = None  # BatchNorm whose running statistics the forward updates
    unmerge: Unmerge | None = None  # the model flattened the map's spatial dims: undo it
    bins: tuple[int, ...] | None = None  # adaptive average pooling to a grid of bins
    strides: tuple[Fraction, ...] = ()  # of the map (input pixels per position), for bins
    correction: float = 0.0  # a variance divides by its positions minus this (normalisations: 0)
    source: int | None = None  # the recorded tensor it reads (barriers on one map share it)

    def reads_as(self, other: Barrier) -> bool:
        """Whether it reads the same map as ``other``, in the same view: one streamed pass
        gives the blocks of both."""
        if self.source is None or self.source != other.source:
            return False
        mine, theirs = self.unmerge, other.unmerge
        if mine is None or theirs is None:
            return mine is theirs
        return mine.atoms == theirs.atoms

    def for_call(self, values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The statistics in the shape the call's own (flattened) view of the map gives them."""
        if self.unmerge is None:
            return tuple(values)
        return tuple(v.reshape(self.unmerge.stat_shape) for v in values)

    @property
    def summed(self) -> bool:
        """Whether its statistic is a plain sum (a matmul contracting positions is one)."""
        return self.kind in ("sum", "contract")

    @property
    def path(self) -> str:
        """The module path of the layer it runs in (``""`` for the root)."""
        path = self.layer.split("'")[1]  # ``layer`` reads "'path' (Class)"
        return "" if path == "<root>" else path

    @property
    def moments(self) -> bool:
        """Whether it needs a variance besides the mean."""
        return self.kind in ("group", "instance", "batch", *VARIANCE_KINDS)

    @property
    def n_values(self) -> int:
        """Its statistics: a mean and a variance, a maximum and its number of ties (amax's
        gradient is shared among them), or one mean or sum."""
        return 2 if self.moments or self.kind == "max" else 1

    @property
    def grouped_shape(self) -> tuple[int, ...]:
        if self.groups is None:
            return self.shape
        n, c, *rest = self.shape
        return (n, self.groups, c // self.groups, *rest)

    @property
    def count(self) -> int:
        """Positions in each reduction."""
        return math.prod(self.grouped_shape[d] for d in self.reduce)

    @property
    def stat_shape(self) -> tuple[int, ...]:
        if self.bins is not None:
            return (*self.shape[: -len(self.bins)], *self.bins)
        return tuple(1 if d in self.reduce else s for d, s in enumerate(self.grouped_shape))

    def bin_weights(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Along spatial dim ``dim`` of a pooling to bins: the ``(bins, length)`` float64
        matrix whose row ``i`` is 1 at the positions ``start..start + length`` of the map that
        bin ``i`` averages (``floor(i * n / k) <= p < ceil((i + 1) * n / k)``, as adaptive
        pooling takes them; bins may overlap) and 0 elsewhere."""
        assert self.bins is not None
        k, n = self.bins[dim], self.shape[len(self.shape) - len(self.bins) + dim]
        i = torch.arange(k, dtype=torch.int64)[:, None]
        p = torch.arange(start, start + length, dtype=torch.int64)[None, :]
        lo, hi = (i * n) // k, -((-(i + 1) * n) // k)
        return ((p >= lo) & (p < hi)).to(torch.float64)

    def bin_counts(self) -> torch.Tensor:
        """Positions in each bin, as a grid of the bins' shape (float64)."""
        assert self.bins is not None
        counts = torch.ones((), dtype=torch.float64)
        for d in range(len(self.bins)):
            c = self.bin_weights(d, 0, self.shape[len(self.shape) - len(self.bins) + d]).sum(1)
            counts = counts.unsqueeze(-1) * c
        return counts

    @property
    def stat_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.n_values * math.prod(self.stat_shape) * itemsize

    def placeholder(self, device: torch.device | str = "meta") -> tuple[torch.Tensor, ...]:
        """Statistics of the right shape and dtype, for recording the model on meta tensors."""
        return tuple(
            torch.ones(self.stat_shape, dtype=self.dtype, device=device)
            for _ in range(self.n_values)
        )

    def describe(self) -> str:
        what = {
            "mean": "mean over all positions",
            "sum": "sum over all positions",
            "max": "maximum over all positions",
            "pool": "global average pooling",
            "group": f"GroupNorm statistics ({self.groups} groups)",
            "instance": "InstanceNorm statistics",
            "batch": "BatchNorm batch statistics",
            "softmax": "softmax over all positions",
            "log_softmax": "log-softmax over all positions",
            "logsumexp": "log-sum-exp over all positions",
            "contract": "matrix product summing over all positions",
            "bins": f"average pooling to {self.bins} bins",
            "var": "variance over all positions",
            "std": "standard deviation over all positions",
            "var_mean": "variance and mean over all positions",
            "std_mean": "standard deviation and mean over all positions",
        }[self.kind]
        return f"{what} in {self.layer}"


class Reduction:
    """The exact statistics of a :class:`Barrier`, accumulated block by block over a
    partition of its map (each position counted once) in float64: sums, or per group the
    count, mean and sum of squared deviations combined pairwise (Chan et al.), which keeps
    the variance accurate where ``E[h^2] - E[h]^2`` would cancel."""

    def __init__(self, barrier: Barrier):
        self.barrier = barrier
        self.n = 0
        self.total: torch.Tensor | None = None  # sum (mean/sum kinds) or mean (moments)
        self.m2: torch.Tensor | None = None

    def add(self, block: torch.Tensor, place: Sequence[slice] | None = None) -> None:
        """Reduce one block of the map; ``place``: its slices in the whole map (needed by a
        pooling to bins)."""
        if block.numel() == 0:
            return
        b = self.barrier
        h = block.detach().to(torch.float64)
        if b.bins is not None:  # per bin, the sum of the positions the block holds of it
            assert place is not None
            first = h.dim() - len(b.bins)
            starts = [place[first + d].start or 0 for d in range(len(b.bins))]
            sums = _along_bins(b, h, starts, h.shape[first:], to_bins=True)
            self.total = sums if self.total is None else self.total + sums
            return
        if b.groups is not None:
            n, c, *rest = h.shape
            h = h.reshape(n, b.groups, c // b.groups, *rest)
        dims = list(b.reduce)
        if b.kind in LSE_KINDS:  # a running maximum and the sum of exp below it
            top = h.amax(dims, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            s = (h - top).exp().sum(dims, keepdim=True)
            if self.total is None or self.m2 is None:
                self.total, self.m2 = top, s
                return
            new = torch.maximum(self.total, top)
            self.m2 = self.m2 * (self.total - new).exp() + s * (top - new).exp()
            self.total = new
            return
        if b.kind == "max":  # exact in any order; ties counted, as amax shares its gradient
            top = h.amax(dims, keepdim=True)
            ties = (h == top).sum(dims, keepdim=True, dtype=torch.float64)
            if self.total is None or self.m2 is None:
                self.total, self.m2 = top, ties
                return
            new = torch.maximum(self.total, top)
            self.m2 = self.m2 * (self.total == new) + ties * (top == new)
            self.total = new
            return
        if not b.moments:
            s = h.sum(dims, keepdim=True)
            self.total = s if self.total is None else self.total + s
            return
        k = math.prod(h.shape[d] for d in dims)
        mean = h.mean(dims, keepdim=True)
        m2 = (h - mean).square().sum(dims, keepdim=True)
        if self.total is None or self.m2 is None:
            self.n, self.total, self.m2 = k, mean, m2
            return
        n = self.n
        delta = mean - self.total
        self.total = self.total + delta * (k / (n + k))
        self.m2 = self.m2 + m2 + delta.square() * (n * k / (n + k))
        self.n = n + k

    def values(self) -> tuple[torch.Tensor, ...]:
        """The statistics in the barrier's dtype: ``(mean or sum,)`` or ``(mean, var)``
        (the biased variance, which normalisations use)."""
        b = self.barrier
        if self.total is None:  # pragma: no cover - every position is owned by some crop
            raise RuntimeError("tilefn: a barrier's map was never reduced")
        if b.kind == "max":
            assert self.m2 is not None
            return self.total.to(b.dtype), self.m2.to(b.dtype)
        if b.kind in LSE_KINDS:
            assert self.m2 is not None
            return ((self.total + self.m2.log()).to(b.dtype),)
        if b.bins is not None:
            return ((self.total / b.bin_counts().to(self.total.device)).to(b.dtype),)
        if not b.moments:
            v = self.total if b.summed else self.total / b.count
            return (v.to(b.dtype),)
        assert self.m2 is not None
        return self.total.to(b.dtype), (self.m2 / (b.count - b.correction)).to(b.dtype)

    def unbiased_var(self) -> torch.Tensor:
        assert self.m2 is not None
        return self.m2 / max(self.barrier.count - 1, 1)


def surrogate(
    barrier: Barrier, values: Sequence[torch.Tensor], cots: Sequence[torch.Tensor | None]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A pointwise ``phi`` with ``sum(phi(h))`` having the gradient in ``h`` that the
    statistics' cotangents ``cots`` pull back to the map: ``c / n`` for a mean, ``c`` for a
    sum, ``c * exp(h - lse)`` (the softmax) for a log-sum-exp, ``c / ties`` where ``h`` equals
    the maximum (and 0 elsewhere) for a maximum, ``c_bin / count_bin`` summed over the bins
    that hold a position for a pooling to bins, and ``(c_mean + 2 c_var (h - mean)) / n`` for
    a mean and a variance (divided by ``n - correction`` for a corrected one). The
    backward of the map's prefix with cotangent one everywhere is then the exact vjp of the
    statistics (``mean`` enters ``phi`` as a constant: the variance's gradient through the
    mean is zero)."""
    n = barrier.count
    groups = barrier.groups

    def spread(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if groups is None:
            return t
        return _per_channel(t, groups, h.shape[1], [1] * (h.dim() - 2))

    if barrier.kind == "max":
        top, ties = values[0].detach(), values[1].detach()
        c = cots[0]
        assert c is not None
        share = c.detach() / ties

        def phi_max(h: torch.Tensor) -> torch.Tensor:
            at_top = h.detach() == top.to(h.dtype)  # constant: the gradient is the share
            return h * at_top * share.to(h.dtype)

        return phi_max
    if barrier.bins is not None:
        (c,) = cots
        assert c is not None
        per_bin = c.detach().to(torch.float64) / barrier.bin_counts().to(c.device)

        def phi_bins(h: torch.Tensor) -> torch.Tensor:
            return h * bin_weights_at(barrier, per_bin, h).to(h.dtype)

        return phi_bins
    if barrier.kind in LSE_KINDS:
        lse, c_lse = values[0].detach(), cots[0]
        assert c_lse is not None
        c_lse = c_lse.detach()

        def phi_lse(h: torch.Tensor) -> torch.Tensor:
            return (h - lse.to(h.dtype)).exp() * c_lse.to(h.dtype)

        return phi_lse
    if not barrier.moments:
        (c,) = cots
        assert c is not None
        alpha = c.detach() if barrier.summed else c.detach() / n

        def phi(h: torch.Tensor) -> torch.Tensor:
            return h * spread(alpha.to(h.dtype), h)

        return phi
    mean = values[0].detach()
    c_mean, c_var = cots
    alpha = None if c_mean is None else c_mean.detach() / n
    beta = None if c_var is None else c_var.detach() / (n - barrier.correction)

    def phi_moments(h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=h.dtype, device=h.device)
        if alpha is not None:
            out = h * spread(alpha.to(h.dtype), h)
        if beta is not None:
            dev = h - spread(mean.to(h.dtype), h)
            out = out + dev * dev * spread(beta.to(h.dtype), h)
        return out

    return phi_moments


def bin_weights_at(barrier: Barrier, per_bin: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The weight of each position of the crop ``h`` (crops stacked along the batch dim, at
    the places :func:`~tilefn._positions.crop_starts` gives) in ``sum(per_bin * bins(h))``:
    the sum of ``per_bin`` over the bins that hold the position. Outside a crop (the
    recording on the whole image) ``h`` is the whole map."""
    assert barrier.bins is not None
    lengths = h.shape[h.dim() - len(barrier.bins) :]
    pieces = []
    for start in crop_starts() or ((0,) * len(barrier.bins),):
        origins = [int(Fraction(a) / s) for a, s in zip(start, barrier.strides)]
        pieces.append(_along_bins(barrier, per_bin.to(h.device), origins, lengths, to_bins=False))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _along_bins(
    barrier: Barrier, t: torch.Tensor, starts: Sequence[int], lengths: Sequence[int], to_bins: bool
) -> torch.Tensor:
    """Along each pooled dim (the last ones of ``t``), multiply by the bin membership of the
    positions ``starts[d]..starts[d] + lengths[d]`` (:meth:`Barrier.bin_weights`): from positions
    to bins (``to_bins``: the sums per bin) or from bins to positions (the sum over the bins
    that hold each position)."""
    assert barrier.bins is not None
    first = t.dim() - len(barrier.bins)
    for d, (start, length) in enumerate(zip(starts, lengths)):
        w = barrier.bin_weights(d, start, length).to(t.device)
        axis = first + d
        t = torch.movedim(torch.tensordot(t, w, dims=([axis], [1 if to_bins else 0])), -1, axis)
    return t


class StopAtBarrier(BaseException):
    """Raised inside the model at a barrier to end a prefix stage there (a BaseException, so
    that a model's own ``except Exception`` does not swallow it)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


Handler = Callable[[int, GlobalCall, Callable[[], Any]], Any]


class GlobalOps(TorchFunctionMode):
    """Hands every call :func:`match` recognises to ``handler(position, call, run)``, where
    ``position`` counts the matched calls of this model run and ``run()`` makes the call
    as it was. Notes the input shape of every reshape (``reshapes``, for :class:`Unmerge`),
    and with ``keep`` the input tensor too (``reshaped``: the tracer's, on meta tensors)."""

    def __init__(self, handler: Handler, keep: bool = False):
        super().__init__()
        self.handler = handler
        self.count = 0
        self.keep = keep
        self.reshapes: list[tuple[int, ...]] = []
        self.reshaped: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RESHAPES:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor):
                self.reshapes.append(tuple(x.shape))
                if self.keep:
                    self.reshaped.append(x)
            return func(*args, **kwargs)
        call = match(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        position = self.count
        self.count += 1
        return self.handler(position, call, lambda: func(*args, **kwargs))
