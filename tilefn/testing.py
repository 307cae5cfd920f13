"""Reference checks: compare a streamed model with the plain model on the same input."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ._api import TileSize, streamify
from ._compat import tree_flatten, tree_unflatten
from ._trace import batchnorm_eval

__all__ = ["assert_streams_like"]


def _close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    what: str,
    rtol: float,
    atol: float,
    scale: float | None = None,
):
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=atol * max(scale, 1e-30),
        equal_nan=True,
        msg=lambda m: f"{what}: streamed result differs from the plain model.\n{m}",
    )


def assert_streams_like(
    model: nn.Module,
    x: torch.Tensor,
    tile_size: TileSize,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    **options: Any,
) -> None:
    """Assert that streaming ``model`` over ``x`` reproduces the plain model exactly.

    Checks the output, the gradient of every parameter that requires grad and the input
    gradient for a random cotangent, through both ``streamed_vjp`` and
    ``loss.backward()``. The reference runs ``model`` with BatchNorm layers on their
    running statistics (as the streamed model does), or with ``batchnorm="batch"`` in the
    model's own mode. ``atol`` is relative to the largest magnitude of each reference
    tensor, and for parameter gradients to the largest of all of them (a gradient that is
    zero in exact arithmetic, such as a bias right before a normalisation, is rounding on
    both sides). Defaults: ``1e-10`` in float64, ``1e-4`` in float32, ``1e-2`` in lower
    precision.

    Raises:
        AssertionError: a result differs; the message says which.

    Example:
        >>> import torch, tilefn.testing
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        >>> x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
        >>> tilefn.testing.assert_streams_like(net.double(), x, tile_size=16)
    """
    default = {torch.float64: 1e-10, torch.float32: 1e-4}.get(x.dtype, 1e-2)
    rtol = default if rtol is None else rtol
    atol = default if atol is None else atol
    options = {**options, "saliency": True}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    torch.manual_seed(seed)
    x_ref = x.detach().clone().requires_grad_(x.is_floating_point())
    # The backward stays inside batchnorm_eval too: activation checkpointing recomputes the
    # forward during backward, and must see the same BatchNorm mode.
    batch_stats = options.get("batchnorm") == "batch"
    with contextlib.nullcontext() if batch_stats else batchnorm_eval(model):
        ref = model(x_ref)
        ref_leaves = tree_flatten(ref)[0]
        gen = torch.Generator().manual_seed(seed + 1)
        cots = [
            torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.dtype) for r in ref_leaves
        ]
        inputs = [p for _, p in named] + ([x_ref] if x_ref.requires_grad else [])
        ref_grads = torch.autograd.grad(ref_leaves, inputs, cots, allow_unused=True)
    grad_scale = max(
        (g.abs().max().item() for g in ref_grads[: len(named)] if g is not None and g.numel()),
        default=1.0,
    )

    backbone, streamed_vjp = streamify(model, tile_size, **options)
    torch.manual_seed(seed)
    out = backbone(x.detach())
    for i, (a, b) in enumerate(zip(tree_flatten(out)[0], ref_leaves)):
        _close(a, b.detach(), f"output {i}", rtol, atol)

    cot_tree = tree_unflatten(cots, tree_flatten(ref)[1])
    torch.manual_seed(seed)
    param_grads, input_grad = streamed_vjp(x.detach(), cot_tree)
    for (name, p), g in zip(named, ref_grads):
        expected = g if g is not None else torch.zeros_like(p)
        what = f"streamed_vjp gradient of {name!r}"
        _close(param_grads[name], expected, what, rtol, atol, grad_scale)
    if x_ref.requires_grad:
        _close(input_grad, ref_grads[-1], "streamed_vjp input gradient", rtol, atol)

    # The autograd path: loss.backward() through the backbone.
    saved = [p.grad for _, p in named]
    try:
        for _, p in named:
            p.grad = None
        x_auto = x.detach().clone().requires_grad_(x.is_floating_point())
        torch.manual_seed(seed)
        out = backbone(x_auto)
        loss = sum((o * c).sum() for o, c in zip(tree_flatten(out)[0], cots))
        loss.backward()
        for (name, p), g in zip(named, ref_grads):
            if g is None:
                continue
            what = f"loss.backward() gradient of {name!r}"
            _close(p.grad, g, what, rtol, atol, grad_scale)
        if x_auto.requires_grad:
            _close(x_auto.grad, ref_grads[-1], "loss.backward() input gradient", rtol, atol)
    finally:
        for (_, p), g in zip(named, saved):
            p.grad = g
