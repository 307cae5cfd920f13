"""Whole-image ops as barriers: recognising them, rewriting them as local ops on exact
statistics, and the exact reductions and their cotangents.

Squeeze-excitation, image-pooling branches, GroupNorm, InstanceNorm and BatchNorm with batch
statistics need a statistic of the whole map ``h`` they read: a mean (or sum) over all
positions, or a mean and a variance per group. Given the statistic, what they compute is
local: ``x * s(mean)``, ``(x - mean) * rsqrt(var + eps) * w + b``. So the model is local once
the statistics are fixed values, and the statistics are exact reductions of maps that are
themselves local functions of the image (see ``_staged``).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "Barrier",
    "GlobalCall",
    "GlobalOps",
    "Reduction",
    "StopAtBarrier",
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


@dataclass
class GlobalCall:
    """A call of a function that may read the whole map (see :func:`match`)."""

    # "mean", "sum", "max" (amax), "pool" (adaptive average to size 1), "group", "instance",
    # "batch"
    kind: str
    input: torch.Tensor
    dims: tuple[int, ...] | None = None  # reduced dims of mean/sum/pool (None: all dims)
    keepdim: bool = False
    dtype: torch.dtype | None = None
    groups: int = 1
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 1e-5
    batch_stats: bool = False  # normalises with statistics of its input (F.batch_norm training)
    running: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def apply(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """What the call computes, given the exact statistics of its input: local work only."""
        if self.kind in ("mean", "sum", "max", "pool"):
            v = values[0]  # a maximum's second value is its number of ties
            if self.kind == "pool" or self.keepdim:
                return v
            return v.reshape(()) if self.dims is None else v.squeeze(self.dims)
        x = self.input
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
    if func in _POOLS:
        x = args[0] if args else kwargs.get("input")
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        n = _POOLS[func]
        sizes = (size,) * n if isinstance(size, int) else tuple(size or ())
        if not isinstance(x, torch.Tensor) or len(sizes) != n or any(s != 1 for s in sizes):
            return None
        return GlobalCall("pool", x, dims=tuple(range(x.dim() - n, x.dim())), keepdim=True)
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

    @property
    def path(self) -> str:
        """The module path of the layer it runs in (``""`` for the root)."""
        path = self.layer.split("'")[1]  # ``layer`` reads "'path' (Class)"
        return "" if path == "<root>" else path

    @property
    def moments(self) -> bool:
        """Whether it needs a variance besides the mean."""
        return self.kind in ("group", "instance", "batch")

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
        return tuple(1 if d in self.reduce else s for d, s in enumerate(self.grouped_shape))

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

    def add(self, block: torch.Tensor) -> None:
        if block.numel() == 0:
            return
        b = self.barrier
        h = block.detach().to(torch.float64)
        if b.groups is not None:
            n, c, *rest = h.shape
            h = h.reshape(n, b.groups, c // b.groups, *rest)
        dims = list(b.reduce)
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
        if not b.moments:
            v = self.total if b.kind == "sum" else self.total / b.count
            return (v.to(b.dtype),)
        assert self.m2 is not None
        return self.total.to(b.dtype), (self.m2 / b.count).to(b.dtype)

    def unbiased_var(self) -> torch.Tensor:
        assert self.m2 is not None
        return self.m2 / max(self.barrier.count - 1, 1)


def surrogate(
    barrier: Barrier, values: Sequence[torch.Tensor], cots: Sequence[torch.Tensor | None]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A pointwise ``phi`` with ``sum(phi(h))`` having the gradient in ``h`` that the
    statistics' cotangents ``cots`` pull back to the map: ``c / n`` for a mean, ``c`` for a
    sum, ``c / ties`` where ``h`` equals the maximum (and 0 elsewhere) for a maximum, and
    ``(c_mean + 2 c_var (h - mean)) / n`` for a mean and a biased variance. The
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
    if not barrier.moments:
        (c,) = cots
        assert c is not None
        alpha = c.detach() if barrier.kind == "sum" else c.detach() / n

        def phi(h: torch.Tensor) -> torch.Tensor:
            return h * spread(alpha.to(h.dtype), h)

        return phi
    mean = values[0].detach()
    c_mean, c_var = cots
    alpha = None if c_mean is None else c_mean.detach() / n
    beta = None if c_var is None else c_var.detach() / n

    def phi_moments(h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=h.dtype, device=h.device)
        if alpha is not None:
            out = h * spread(alpha.to(h.dtype), h)
        if beta is not None:
            dev = h - spread(mean.to(h.dtype), h)
            out = out + dev * dev * spread(beta.to(h.dtype), h)
        return out

    return phi_moments


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
    as it was."""

    def __init__(self, handler: Handler):
        super().__init__()
        self.handler = handler
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = match(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        position = self.count
        self.count += 1
        return self.handler(position, call, lambda: func(*args, **kwargs))
