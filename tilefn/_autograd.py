"""The autograd node of a streamed forward, so that a streamed trunk composes with ordinary
PyTorch and with ``torch.func``: ``loss.backward()`` runs the streamed vjp and accumulates
into ``.grad`` (and fires DDP's hooks) like any other op; ``torch.func.grad``/``vjp`` and
``functional_call`` differentiate with respect to the tensors that entered the node.

The node is a pure function of its inputs (the image tensor and the parameters) and of the
buffers captured with them: the backward recomputes crops with exactly those tensors, never
with whatever the module holds by then. Double backward (``create_graph=True`` followed by a
backward through the gradient), forward mode (``torch.func.jvp``) and ``torch.func.vmap``
raise :class:`~tilefn.TransformError`, which says what to do instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ._errors import TransformError
from ._execute import AutocastState, Executor, Kept, RngState
from ._inputs import CropReader, ImageSource, TensorImage

__all__ = ["StreamedCall", "StreamedFunction", "first_order_only"]


class Runner(Protocol):
    """What runs a plan: an :class:`~tilefn._execute.Executor`, or a staged program (a
    model with whole-image ops), which has the same ``forward`` and ``vjp``."""

    def forward(self, source, reader, plan, rng=None, keep=False, want_input=False, state=None): ...

    def vjp(self, source, reader, plan, cotangents, params, want_input, **kwargs): ...


@dataclass
class StreamedCall:
    """Everything a streamed forward needs besides its tensor inputs."""

    executor: Runner | Executor
    plan: Any  # a TilePlan, or the StagedPlan of a staged program
    source: ImageSource  # read crop by crop when the image is not a tensor input
    reader: CropReader
    names: Sequence[str]  # names of the parameter inputs, in order
    frozen: dict[str, torch.Tensor]  # the other parameters and the buffers, by name
    rng: RngState | None

    def state(self, params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.frozen, **dict(zip(self.names, params))}


class _KeptGraphs:
    """A non-tensor output of the forward: the crop graphs kept for the backward."""

    def __init__(self, kept: dict[int, Kept]):
        self.kept = kept


class StreamedFunction(torch.autograd.Function):
    """Inputs: a :class:`StreamedCall`, the image tensor (``None`` for an image that is not a
    tensor, which gets no gradient) and the parameters; outputs: the stitched output
    leaves, then the kept crop graphs (not a tensor)."""

    @staticmethod
    def forward(call: StreamedCall, x: torch.Tensor | None, *params: torch.Tensor) -> tuple:
        source = call.source if x is None else TensorImage(x)
        want_input = x is not None and x.requires_grad
        # Keep crop graphs only when they reach every input: inside torch.func transforms the
        # forward sees inputs that do not require grad, and the backward recomputes instead.
        keep = all(p.requires_grad for p in params)
        outs, kept = call.executor.forward(
            source,
            call.reader,
            call.plan,
            call.rng,
            keep=keep,
            want_input=want_input,
            state=call.state(params),
        )
        return (*outs, _KeptGraphs(kept))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        call, x, *params = inputs
        ctx.call = call
        ctx.kept = output[-1].kept
        ctx.autocast = AutocastState.capture(call.reader.device.type)
        ctx.tensor_input = x is not None
        # Saved, so that changing the image or a parameter in place before the backward is
        # an error instead of a silently different gradient.
        ctx.save_for_backward(*([x] if x is not None else []), *params)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor | None) -> tuple:
        call: StreamedCall = ctx.call
        saved = ctx.saved_tensors
        x, params = (saved[0], saved[1:]) if ctx.tensor_input else (None, saved)
        source = call.source if x is None else TensorImage(x)
        want_input = ctx.needs_input_grad[1]
        wanted = [k for k in range(len(params)) if ctx.needs_input_grad[2 + k]]
        kept, ctx.kept = ctx.kept, {}  # used once; a second backward recomputes
        grads, input_grad = call.executor.vjp(
            source,
            call.reader,
            call.plan,
            cotangents[:-1],
            [params[k] for k in wanted],
            want_input,
            rng=call.rng,
            autocast=ctx.autocast,
            kept=kept,
            state=call.state(params),
        )
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        for k, g in zip(wanted, grads):
            param_grads[k] = g
        return (None, *first_order_only((input_grad, *param_grads), params))

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise TransformError(
            "streamify: forward-mode differentiation (torch.func.jvp, torch.autograd.forward_ad) "
            "through a streamed backbone is not supported. Use reverse mode (loss.backward(), "
            "torch.func.grad or torch.func.vjp), which is exact."
        )

    @staticmethod
    def vmap(info: Any, in_dims: tuple, call: StreamedCall, x: Any, *params: Any) -> tuple:
        raise TransformError(
            "streamify: torch.func.vmap over a streamed backbone is not supported. Images "
            "mapped over are independent samples: put them in the batch dim instead, e.g. "
            "backbone(x.flatten(0, 1)) for x of shape (B, N, C, H, W), and reshape the output "
            "back; for an ensemble of parameter sets, stream each set in turn."
        )


def first_order_only(
    grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """``grads`` as a streamed backward returns them: under ``create_graph=True`` each is
    wrapped so that differentiating it again raises (see :class:`_FirstOrderOnly`)."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    return tuple(_FirstOrderOnly.apply(g, *params) if g is not None else None for g in grads)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a gradient computed by the streamed backward under ``create_graph=True``;
    differentiating it again raises a typed error (the streamed backward recomputes crops
    with plain autograd, so it has no exact second-order graph to offer)."""

    @staticmethod
    def forward(g: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return g.clone()  # params are inputs so that the result requires grad when they do

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise TransformError(
            "streamify: double backward through a streamed backbone is not supported: the "
            "gradient it computed (with create_graph=True) cannot itself be differentiated, "
            "so a gradient penalty or a Hessian through the streamed trunk would be wrong. "
            "Compute such terms on the head only, or on the plain model at a size it fits."
        )
