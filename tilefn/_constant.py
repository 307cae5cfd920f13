"""Constant crops: exact background skipping.

After tissue masking most crops of a slide hold one value per sample and channel. The model
sees a crop and nothing else (crops start on the alignment grid, so the stride phase is the
same everywhere, and the RNG is replayed before every crop), so two crops whose model inputs
are equal tensors give equal outputs. The crops with equal inputs form a *class*, keyed by
the crop's shape, dtype and values (:func:`class_key`):

- forward: one representative per class is computed; every member copies its own owned
  block out of the representative's output (members may own different blocks);
- backward: the members share the Jacobian ``J``, so by linearity
  ``sum_t J^T (g_t placed at t's block) = J^T (sum_t g_t placed at t's block)``: one
  backward of the representative with the members' owned cotangents added into one
  cotangent of the crop's output shape (:func:`class_cotangents`).

Both are exact; nothing is approximated. The input gradient is not shared (each member's
differs), so passes that want it compute every crop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "ClassKey",
    "Look",
    "OutputCache",
    "PassStats",
    "class_key",
    "class_cotangents",
    "constant_values",
]

ClassKey = tuple  # (crop shape, dtype, channels_last, values as bytes)


def class_key(
    shape: Sequence[int], values: torch.Tensor, dtype: torch.dtype, channels_last: bool
) -> ClassKey:
    """The class of a constant crop: its model input's shape, dtype and memory format, and its
    ``(N, C)`` values."""
    raw = values.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return (tuple(int(s) for s in shape), str(dtype), channels_last, raw)


def constant_values(x: torch.Tensor) -> torch.Tensor | None:
    """``(N, C)`` values if the model input ``x`` is one value per sample and channel (exactly
    equal; NaN is never constant), else None. One comparison pass over the crop."""
    if x.device.type == "meta":  # no values (a dry run on meta parameters)
        return None
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    first = flat[..., :1]
    if not torch.equal(flat, first.expand_as(flat)):
        return None
    return first[..., 0]


@dataclass
class Look:
    """A crop as the skipping sees it before computing: its class (None: not constant) and
    its model input, made on demand for a crop the source knows is constant."""

    index: int
    key: ClassKey | None
    _input: torch.Tensor | None = None
    _make: Callable[[], torch.Tensor] | None = None

    def input(self) -> torch.Tensor:
        if self._input is None:
            assert self._make is not None
            self._input = self._make()
        return self._input


class OutputCache:
    """The detached outputs of one representative per class, during one forward pass; holds at
    most ``limit`` classes (crops of further classes are computed, which is always exact)."""

    def __init__(self, limit: int = 32):
        self.limit = limit
        self._outputs: dict[ClassKey, list[torch.Tensor]] = {}

    def get(self, key: ClassKey | None) -> list[torch.Tensor] | None:
        return None if key is None else self._outputs.get(key)

    def put(self, key: ClassKey | None, outputs: Sequence[torch.Tensor]) -> None:
        if key is not None and key not in self._outputs and len(self._outputs) < self.limit:
            self._outputs[key] = [o.detach() for o in outputs]


def class_cotangents(
    outputs: Sequence[torch.Tensor],
    members: Sequence[Sequence[tuple[int, tuple, tuple]]],
    cotangents: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """One cotangent per output of the representative: the owned cotangent block of every
    member, added at the place of that member's block in the crop's output. ``members``
    holds, per member, ``(output, dst, src)`` of each block it owns (``dst`` indexes the
    stitched cotangent, ``src`` the crop's output)."""
    summed: list[torch.Tensor | None] = [None] * len(outputs)
    for owned in members:
        for o, dst, src in owned:
            if summed[o] is None:
                summed[o] = torch.zeros_like(outputs[o])
            piece = cotangents[o][dst]  # type: ignore[index]
            summed[o][src] += piece.to(device=outputs[o].device, dtype=outputs[o].dtype)  # type: ignore[index]
    return summed


@dataclass
class PassStats:
    """What one streamed pass computed: ``crops`` visited, how many were ``constant`` (one
    value per sample and channel, e.g. masked background), and how many model calls on a
    crop it ran (``computed``; the rest were copied from a representative)."""

    kind: str
    crops: int = 0
    constant: int = 0
    computed: int = 0
    classes: set = field(default_factory=set, repr=False)

    def add(self, key: ClassKey | None) -> None:
        """Count one visited crop of class ``key`` (None: not constant)."""
        self.crops += 1
        if key is not None:
            self.constant += 1
            self.classes.add(key)

    @property
    def skipped(self) -> int:
        return self.crops - self.computed

    def __str__(self) -> str:
        return (
            f"tilefn {self.kind}: {self.crops} crops, {self.constant} constant "
            f"({len(self.classes)} distinct), {self.computed} computed, {self.skipped} skipped"
        )
