"""Shared test setup: deterministic kernels, few threads, and the plain-autograd reference.

The non-streamed model is the reference for every tilefn test (see docs/design.md).
Models are built in float32 and converted with ``.double()`` explicitly; the default
dtype is left alone on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

torch.use_deterministic_algorithms(True)
torch.set_num_threads(2)


def tree_dot(outputs: Any, cotangents: Any) -> torch.Tensor:
    """``sum_leaves <cotangent, output>``; both trees must have the same structure."""
    out_leaves, out_spec = pytree.tree_flatten(outputs)
    cot_leaves, cot_spec = pytree.tree_flatten(cotangents)
    if out_spec != cot_spec:
        raise AssertionError(
            f"cotangent structure {cot_spec} differs from output structure {out_spec}"
        )
    return sum((o * c).sum() for o, c in zip(out_leaves, cot_leaves, strict=True))


def reference_grads(
    model: nn.Module, x: torch.Tensor, cotangent: Any
) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """Plain autograd: ``(model(x), {name: d<cot, model(x)>/dp}, d<cot, model(x)>/dx)``.

    ``param_grads`` is keyed like ``model.named_parameters()`` and holds only the
    parameters with ``requires_grad``; a parameter the output does not depend on gets
    zeros (that is the exact gradient). The model is used as given: pass the reference
    model (BatchNorm in eval mode), and seed the RNG first if the model is stochastic.
    """
    x = x.detach().clone().requires_grad_(True)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        out = model(x)
        dot = tree_dot(out, cotangent)
        grads = torch.autograd.grad(dot, [p for _, p in named] + [x], allow_unused=True)
    param_grads = {
        name: (torch.zeros_like(p) if g is None else g)
        for (name, p), g in zip(named, grads[:-1], strict=True)
    }
    input_grad = torch.zeros_like(x) if grads[-1] is None else grads[-1]
    out = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
    return out, param_grads, input_grad


def assert_tree_close(
    actual: Any, expected: Any, rtol: float, atol: float, *, scaled: bool = True
) -> None:
    """``torch.testing.assert_close`` on every leaf of two trees of tensors (dicts, tuples, lists).

    With ``scaled=True`` (the default) ``atol`` is relative to the size of each expected
    leaf: the absolute tolerance of a leaf is ``atol * max|expected leaf|`` (``atol`` if
    that leaf is all zeros), so one setting fits outputs and gradients of any magnitude.
    Dict keys must match exactly; the message names the leaf that differs.
    """
    if isinstance(actual, Mapping) and isinstance(expected, Mapping):
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        if missing or extra:
            raise AssertionError(f"keys differ: missing {missing}, unexpected {extra}")
    a_leaves, a_spec = pytree.tree_flatten_with_path(actual)
    e_leaves, e_spec = pytree.tree_flatten_with_path(expected)
    if a_spec != e_spec:
        raise AssertionError(f"tree structure differs:\nactual   {a_spec}\nexpected {e_spec}")
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        where = pytree.keystr(path) or "<root>"
        if not isinstance(a, torch.Tensor):
            raise AssertionError(f"{where}: expected a tensor, got {type(a).__name__}")
        leaf_atol = atol
        if scaled and e.numel():
            leaf_atol = atol * max(e.detach().abs().max().item(), 0.0) or atol
        torch.testing.assert_close(
            a, e, rtol=rtol, atol=leaf_atol, msg=lambda m, where=where: f"{where}: {m}"
        )


def max_rel_error(actual: Any, expected: Any) -> float:
    """Largest ``max|a - e| / max|e|`` over the leaves of two trees (for measuring tolerances)."""
    a_leaves, _ = pytree.tree_flatten(actual)
    e_leaves, _ = pytree.tree_flatten(expected)
    worst = 0.0
    for a, e in zip(a_leaves, e_leaves, strict=True):
        scale = e.detach().abs().max().item() or 1.0
        worst = max(worst, (a.detach().double() - e.detach().double()).abs().max().item() / scale)
    return worst


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
