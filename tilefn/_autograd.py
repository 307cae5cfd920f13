"""The autograd node of a streamed forward, so that a streamed trunk composes with ordinary
PyTorch: ``loss.backward()`` runs the streamed vjp and accumulates into ``.grad`` (and fires
DDP's hooks) like any other op."""

from __future__ import annotations

from typing import Any

import torch

from ._execute import AutocastState, Executor, RngState
from ._inputs import CropReader, ImageSource, TensorImage
from ._plan import TilePlan

__all__ = ["StreamedFunction"]


class StreamedFunction(torch.autograd.Function):
    """Inputs: the image tensor (``None`` for an image that is not a tensor, which gets no
    gradient) and the parameters; outputs: the stitched output leaves."""

    @staticmethod
    def forward(
        ctx: Any,
        executor: Executor,
        plan: TilePlan,
        source: ImageSource,
        reader: CropReader,
        x: torch.Tensor | None,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.executor, ctx.plan, ctx.reader, ctx.params = executor, plan, reader, params
        ctx.autocast = AutocastState.capture(reader.device.type)
        ctx.rng = RngState(reader.device) if plan.uses_rng else None
        ctx.tensor_input = x is not None
        if x is not None:  # saved, so that an in-place change before backward is an error
            ctx.save_for_backward(x)
        else:  # read again, crop by crop, in the backward
            ctx.source = source
        ctx.set_materialize_grads(False)
        want_input = x is not None and x.requires_grad
        outs, ctx.kept = executor.forward(
            source, reader, plan, ctx.rng, keep=True, want_input=want_input
        )
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        source = TensorImage(ctx.saved_tensors[0]) if ctx.tensor_input else ctx.source
        want_input = ctx.needs_input_grad[4]
        kept, ctx.kept = ctx.kept, {}  # used once; a second backward recomputes
        grads, input_grad = ctx.executor.vjp(
            source,
            ctx.reader,
            ctx.plan,
            cotangents,
            ctx.params,
            want_input,
            rng=ctx.rng,
            autocast=ctx.autocast,
            kept=kept,
        )
        return (None, None, None, None, input_grad, *grads)
