"""A chain of stage-cut segments whose stored maps live on disk, as one autograd node.

With stage cuts (option ``cut_at``) each segment streams over the map its predecessor
returns. When those maps fit in memory, the chain is ordinary autograd: each segment is its
own streamed node and autograd keeps the maps. When they do not fit in ``memory_budget``,
autograd cannot hold them, so :class:`ChainFunction` runs the whole chain:

- forward: segment ``k`` streams over the map ``m_{k-1}`` (the image for the first) and
  writes its owned output blocks into ``m_k``, a :class:`~tilefn._spill.DiskMap`; the last
  segment's output is returned as usual (it is small: the trunk's output).
- backward: for ``k = K..1``, segment ``k``'s streamed vjp reads its input crops from
  ``m_{k-1}`` and its output cotangent block by block from ``g_k`` (the trunk's cotangent
  for the last segment) and adds its input gradient, crop by crop, into ``g_{k-1}``, a new
  DiskMap: the cotangent map of the segment before. Each cotangent map is removed once
  read; the stored maps when the graph is freed.

Every segment is an exact streamed pass, so the chain is exact; resident memory is one
segment's crops plus a few blocks, whatever the size of the maps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ._autograd import StreamedFunction, _KeptGraphs, first_order_only
from ._compat import requires_grad_allowed
from ._execute import AutocastState, RngState
from ._inputs import CropReader, ImageSource, TensorImage
from ._spill import DiskMap

__all__ = ["ChainCall", "ChainFunction", "run_chain"]


class Segment(Protocol):
    """What the chain needs of a segment's backbone (``StreamedBackbone``)."""

    def reader_for(self, source: ImageSource) -> CropReader: ...

    def _plan(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Any, Any]: ...

    def _runner(self, plan: Any, source: ImageSource, reader: CropReader) -> Any: ...


@dataclass
class _Link:
    """One segment as the forward ran it: its input, reader, plan, runner and RNG state."""

    source: ImageSource
    reader: CropReader
    plan: Any
    runner: Any
    rng: RngState | None


@dataclass
class ChainCall:
    """Everything a chain's forward needs besides its tensor inputs; the forward fills in
    :attr:`links` and :attr:`maps` for the backward."""

    segments: Sequence[Segment]
    source: ImageSource  # the image, read crop by crop when it is not a tensor input
    names: Sequence[Sequence[str]]  # per segment, the names of its parameter inputs
    frozen: Sequence[dict[str, torch.Tensor]]  # per segment, its other parameters, buffers
    directory: str | os.PathLike | None  # where the maps go (None: the temp directory)
    out_spec: Any = None  # the structure of the trunk's output (of the last segment's)
    links: list[_Link] = field(default_factory=list)
    maps: list[DiskMap] = field(default_factory=list)

    def split(self, params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``params`` (all segments' in order) cut into one list per segment."""
        out, at = [], 0
        for names in self.names:
            out.append(list(params[at : at + len(names)]))
            at += len(names)
        return out

    def state(self, k: int, params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.frozen[k], **dict(zip(self.names[k], params))}


def run_chain(
    call: ChainCall, x: torch.Tensor | None, params: Sequence[torch.Tensor], keep: bool
) -> tuple[list[torch.Tensor], dict]:
    """The chain's forward (once per :class:`ChainCall`): the last segment's outputs and
    its kept crop graphs."""
    source = call.source if x is None else TensorImage(x)
    per_segment = call.split(params)
    last = len(call.segments) - 1
    for k, seg in enumerate(call.segments):
        reader = seg.reader_for(source)
        plan, found = seg._plan(tuple(source.shape), reader.dtype)
        call.out_spec = found.out_spec
        runner = seg._runner(plan, source, reader)
        # Captured after the segment before ran, as the plain model would draw.
        rng = RngState(reader.device) if plan.uses_rng else None
        call.links.append(_Link(source, reader, plan, runner, rng))
        state = call.state(k, per_segment[k])
        if k == last:
            return runner.forward(source, reader, plan, rng, keep=keep, state=state)
        made: list[DiskMap] = []

        def sink(o: int, index: tuple, block: torch.Tensor, made=made, plan=plan, k=k) -> None:
            if not made:
                shape = plan.output_shapes[0]
                made.append(DiskMap(shape, block.dtype, "cpu", call.directory, f"map{k + 1}"))
            made[0].write(index, block)

        runner.forward(source, reader, plan, rng, state=state, sink=sink)
        call.maps.append(made[0])
        source = made[0]
    raise AssertionError("unreachable")  # pragma: no cover


class ChainFunction(torch.autograd.Function):
    """Inputs: a :class:`ChainCall`, the image tensor (``None`` for an image that is not a
    tensor) and every segment's parameters in order; outputs: the trunk's output leaves,
    then the last segment's kept crop graphs (not a tensor)."""

    @staticmethod
    def forward(call: ChainCall, x: torch.Tensor | None, *params: torch.Tensor) -> tuple:
        outs, kept = run_chain(call, x, params, keep=all(p.requires_grad for p in params))
        return (*outs, _KeptGraphs(kept))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        call, x, *params = inputs
        ctx.call = call
        ctx.kept = output[-1].kept
        ctx.autocast = AutocastState.capture(call.links[0].reader.device.type)
        ctx.tensor_input = x is not None
        ctx.save_for_backward(*([x] if x is not None else []), *params)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor | None) -> tuple:
        call: ChainCall = ctx.call
        saved = ctx.saved_tensors
        x, params = (saved[0], saved[1:]) if ctx.tensor_input else (None, saved)
        per_segment = call.split(params)
        needs = list(ctx.needs_input_grad[2:])
        wanted_by = call.split(list(range(len(params))))  # indices into params, per segment
        kept, ctx.kept = ctx.kept, {}  # used once; a second backward recomputes
        grads: list[torch.Tensor | None] = [None] * len(params)
        cots: list[Any] = list(cotangents[:-1])
        input_grad = None
        for k in reversed(range(len(call.links))):
            link = call.links[k]
            source = TensorImage(x) if k == 0 and x is not None else link.source
            want_input = k > 0 or ctx.needs_input_grad[1]
            target = None
            if k > 0:
                target = DiskMap(source.shape, link.reader.dtype, "cpu", call.directory, "grad")
            ids = [i for i in wanted_by[k] if needs[i]]
            with requires_grad_allowed():  # crop leaves of the maps, under torch.func too
                got, ig = link.runner.vjp(
                    source,
                    link.reader,
                    link.plan,
                    cots,
                    [params[i] for i in ids],
                    want_input,
                    rng=link.rng,
                    autocast=ctx.autocast,
                    kept=kept if k == len(call.links) - 1 else None,
                    state=call.state(k, per_segment[k]),
                    input_grad=target,
                )
            for i, g in zip(ids, got):
                grads[i] = g
            for c in cots:
                if isinstance(c, DiskMap):
                    c.close()
            cots = [target]
            if k == 0:
                input_grad = ig
        return (None, *first_order_only((input_grad, *grads), params))

    # Forward mode and vmap are refused with the streamed node's messages.
    jvp = staticmethod(StreamedFunction.jvp)
    vmap = staticmethod(StreamedFunction.vmap)
