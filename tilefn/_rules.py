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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._compat import OpOverload, OpOverloadPacket, op_overloads
from ._errors import OptionError
from ._geometry import DimMap, Identity

__all__ = [
    "Layout",
    "TensorArg",
    "OpCall",
    "OpGeometry",
    "Refuse",
    "register_rule",
    "get_rule",
    "pointwise",
    "same_layout",
    "identity_maps",
    "refuse_with",
    "register_table",
    "RuleTable",
    "ns",
    "atom_size",
    "has_spatial",
    "canonical",
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
    strides: tuple[int, ...] = ()  # of a constant: 0 where it is uniform (expanded)

    def uniform(self, dim: int) -> bool:
        """A constant with the same value at every index of ``dim`` (stride 0: a broadcast,
        e.g. a global statistic expanded back to the map's size). Such a constant is the
        same on every crop, whatever its size there."""
        return not self.spatial and len(self.strides) > dim and self.strides[dim] == 0

    @property
    def spatial(self) -> bool:
        return self.layout is not None


@dataclass
class OpCall:
    """One recorded op, as a rule sees it."""

    func: OpOverload
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
    # Spatial sizes of each output (one per spatial dim of the image), for an op whose
    # output merges spatial dims into one tensor dim *and* changes their sizes (im2col);
    # None: read from the output's shape, or inherited from the first spatial input.
    out_sizes: list[tuple[int, ...] | None] | None = None


Rule = Callable[[OpCall], OpGeometry]
RuleTable = tuple[tuple[Rule, str], ...]  # rules with the names of the op packets they cover
_RULES: dict[Any, Rule] = {}


def register_rule(op: Any, rule: Rule, *, replace: bool = False) -> None:
    """Register the geometry rule of an aten op (an ``OpOverload`` or ``OpOverloadPacket``).

    A packet registers the rule for all its overloads. ``rule`` receives an
    :class:`OpCall` and returns an :class:`OpGeometry`; :func:`pointwise` is the rule of
    any elementwise op::

        tilefn.register_rule(torch.ops.mylib.my_activation, tilefn.rules.pointwise)

    Args:
        op: The op, e.g. ``torch.ops.mylib.my_op`` or ``torch.ops.mylib.my_op.default``.
        rule: ``rule(call: OpCall) -> OpGeometry``.
        replace: Replace a rule the op already has (a built-in rule or one registered
            before). Without it, registering a second rule for an op is an error, so a
            built-in rule is never replaced by accident.

    Raises:
        OptionError: ``op`` is not an op, ``rule`` is not callable, or the op already has
            a rule and ``replace`` is False.
    """
    if isinstance(op, OpOverloadPacket):
        overloads = list(op_overloads(op))
    elif isinstance(op, OpOverload):
        overloads = [op]
    else:
        raise OptionError(
            f"register_rule: expected an aten op such as torch.ops.aten.gelu or "
            f"torch.ops.aten.gelu.default, got {op!r}."
        )
    if not callable(rule):
        raise OptionError(f"register_rule: expected a callable rule, got {rule!r}.")
    taken = [str(o) for o in overloads if o in _RULES]
    if taken and not replace:
        raise OptionError(
            f"register_rule: {', '.join(taken)} already "
            f"{'has a geometry rule' if len(taken) == 1 else 'have geometry rules'}. Pass "
            "replace=True to replace it (for example to refine a built-in rule)."
        )
    for o in overloads:
        _RULES[o] = rule


def get_rule(func: Any) -> Rule | None:
    rule = _RULES.get(func)
    if rule is None and torch.Tag.pointwise in getattr(func, "tags", ()):
        return pointwise
    return rule


def identity_maps(call: OpCall) -> dict[int, tuple[DimMap, ...]]:
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
            if t.uniform(j):
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
    return OpGeometry(outs, identity_maps(call))


def same_layout(call: OpCall) -> OpGeometry:
    """Ops whose outputs all have the layout of their (single) spatial input."""
    (t,) = call.spatial_inputs[:1]
    return OpGeometry([t.layout] * len(call.out_shapes), identity_maps(call))


def refuse_with(why: str, fix: str, *, global_op: bool = False) -> Rule:
    def rule(call: OpCall) -> OpGeometry:
        raise Refuse(why, fix, global_op=global_op)

    return rule


_RANDOM = refuse_with(
    "draws random values for every pixel (e.g. dropout in training mode), which differ "
    "between tiles",
    "call model.eval() for dropout layers inside the trunk, or use per-sample or "
    "per-channel randomness (stochastic depth, Dropout2d) which tilefn replays exactly",
)


def _like(call: OpCall) -> OpGeometry:
    if torch.Tag.nondeterministic_seeded in call.func.tags:
        return _RANDOM(call)
    return same_layout(call)


def _new_tensor(call: OpCall) -> OpGeometry:
    """``x.new_zeros(shape)``: a tensor of an explicit shape, not computed from ``x``."""
    return OpGeometry([None] * len(call.out_shapes))


def register_table(table: RuleTable) -> None:
    """Register built-in rules: each rule with the names of the aten op packets it covers."""
    for rule, names in table:
        for name in names.split():
            register_rule(getattr(aten, name), rule)


# Ops tagged pointwise by PyTorch need no entry: get_rule() falls back to ``pointwise``.
_TENSOR_RULES: RuleTable = (
    (
        pointwise,
        """_to_copy clone alias detach lift_fresh_copy contiguous fill_ zero_ _prelu_kernel
        where masked_fill masked_fill_ fill native_dropout_backward leaky_relu leaky_relu_
        hardtanh hardtanh_ gelu gelu_ silu silu_ mish mish_ elu elu_ hardswish hardswish_
        hardsigmoid hardsigmoid_ softplus threshold threshold_ log_sigmoid_forward relu6 celu
        selu clamp clamp_ clamp_min clamp_min_ clamp_max clamp_max_ softshrink hardshrink
        copy_""",
    ),
    (_like, "empty_like zeros_like ones_like full_like rand_like randn_like randint_like"),
    (_new_tensor, "new_empty new_zeros new_ones new_full new_empty_strided"),
    (_RANDOM, "bernoulli bernoulli_ uniform_ normal_ native_dropout exponential_ random_"),
)
register_table(_TENSOR_RULES)
