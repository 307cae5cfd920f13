"""Every zoo model, streamed tile by tile, against the plain model (the reference).

For each entry, in float64:
  * the plan really tiles the input (``n_tiles >= entry.min_tiles``),
  * ``backbone(x)`` equals ``model(x)``,
  * ``streamed_vjp(x, cotangent)`` gives every parameter gradient and the input gradient,
  * the autograd path: ``(backbone(x) * cotangent).sum().backward()`` fills ``p.grad`` of
    every parameter and ``x.grad``.
The reference is the model with BatchNorm in eval mode (``zoo.reference_model``), run with
plain autograd (``conftest.reference_grads``). Tolerances are relative to the size of each
compared tensor: ``atol = entry.atol * max|reference|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import assert_tree_close, max_rel_error, reference_grads, tree_dot
from torch import nn
from torch.utils import _pytree as pytree
from zoo import ZOO, ZooEntry, reference_model, zoo_params

import tilefn

RNG_SEED = 1234  # reseeded before every call of a stochastic model (StochasticDepth)


def _reseed(entry: ZooEntry) -> None:
    if entry.rng:
        torch.manual_seed(RNG_SEED)


@dataclass
class Case:
    entry: ZooEntry
    model: nn.Module  # what tilefn streams (BatchNorm possibly in train mode)
    x: torch.Tensor
    cotangent: Any
    ref_out: Any
    ref_param_grads: dict[str, torch.Tensor]
    ref_input_grad: torch.Tensor
    buffers: dict[str, torch.Tensor]  # BatchNorm running stats etc. before any streamed call


def _make_case(entry: ZooEntry) -> Case:
    torch.manual_seed(0)
    model = entry.build()
    x = torch.randn(entry.input_shape, dtype=torch.float64)
    ref = reference_model(model)
    _reseed(entry)
    with torch.no_grad():
        out = ref(x)
    cotangent = pytree.tree_map(torch.randn_like, out)
    _reseed(entry)
    ref_out, ref_param_grads, ref_input_grad = reference_grads(ref, x, cotangent)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return Case(entry, model, x, cotangent, ref_out, ref_param_grads, ref_input_grad, buffers)


@pytest.fixture(scope="module", params=zoo_params())
def case(request: pytest.FixtureRequest) -> Case:
    # Module scope: pytest runs all tests of one entry together and builds it once.
    return _make_case(request.param)


def _close(actual: Any, expected: Any, entry: ZooEntry) -> None:
    assert_tree_close(actual, expected, rtol=entry.rtol, atol=entry.atol)


def _assert_buffers_unchanged(case: Case) -> None:
    # Eval semantics (API.md): streaming never updates BatchNorm running statistics,
    # also when the model is in train mode.
    now = {n: b.detach() for n, b in case.model.named_buffers()}
    assert list(now) == list(case.buffers)
    for name, before in case.buffers.items():
        torch.testing.assert_close(now[name], before, rtol=0, atol=0, msg=f"buffer {name} changed")


def test_plan_tiles(case: Case) -> None:
    backbone, _ = tilefn.streamify(case.model, case.entry.tile)
    plan = backbone.plan(case.x.shape)
    assert plan.n_tiles >= case.entry.min_tiles, str(plan)
    assert plan.overlap >= 1.0, str(plan)


def test_forward(case: Case) -> None:
    backbone, _ = tilefn.streamify(case.model, case.entry.tile)
    _reseed(case.entry)
    with torch.no_grad():
        out = backbone(case.x)
    _close(out, case.ref_out, case.entry)
    _assert_buffers_unchanged(case)


def test_streamed_vjp(case: Case) -> None:
    _, streamed_vjp = tilefn.streamify(case.model, case.entry.tile, saliency=True)
    _reseed(case.entry)
    param_grads, input_grad = streamed_vjp(case.x, case.cotangent)
    assert list(param_grads) == list(
        case.ref_param_grads
    )  # keyed like named_parameters, same order
    _close(param_grads, case.ref_param_grads, case.entry)
    _close(input_grad, case.ref_input_grad, case.entry)
    _assert_buffers_unchanged(case)


def test_autograd_backward(case: Case) -> None:
    backbone, _ = tilefn.streamify(case.model, case.entry.tile)
    case.model.zero_grad(set_to_none=True)
    x = case.x.clone().requires_grad_(True)
    try:
        _reseed(case.entry)
        out = backbone(x)
        _close(pytree.tree_map(torch.Tensor.detach, out), case.ref_out, case.entry)
        tree_dot(out, case.cotangent).backward()
        grads = {n: p.grad for n, p in case.model.named_parameters() if p.requires_grad}
        missing = [n for n, g in grads.items() if g is None]
        assert not missing, f"backward left .grad unset for {missing}"
        _close(grads, case.ref_param_grads, case.entry)
        assert x.grad is not None, "backward left x.grad unset"
        _close(x.grad, case.ref_input_grad, case.entry)
        _assert_buffers_unchanged(case)
    finally:
        case.model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- float32

# Streamed float32 against the plain float32 model (both float32, same CPU kernels). Measured
# on 2 CPU cores, torch 2.14.1, as max over leaves of max|streamed - plain| / max|plain|:
#                           out      param grads  input grad
#   resnet50-layer2         9.0e-7   2.9e-6       9.1e-7
#   convnext-tiny-stage2    0        1.2e-6       5.6e-7
#   mixer-functional-ops    2.8e-7   7.9e-6       3.0e-7
#   conv1d-train-bn         0        4.7e-7       2.3e-7
#   (unet: not measured, fails with UnsupportedLayerError under deterministic algorithms)
# Worst 7.9e-6, so the tolerance is 1e-4 * max|plain| per tensor (~13x), and no rtol.
F32_RTOL = 0.0
F32_ATOL = 1e-4
F32_ENTRIES = [e for e in ZOO if e.float32]


@pytest.mark.parametrize("entry", zoo_params(F32_ENTRIES))
def test_float32(entry: ZooEntry) -> None:
    torch.manual_seed(0)
    model = entry.build().float()
    x = torch.randn(entry.input_shape, dtype=torch.float32)
    ref = reference_model(model)
    with torch.no_grad():
        cotangent = pytree.tree_map(torch.randn_like, ref(x))
    ref_out, ref_param_grads, ref_input_grad = reference_grads(ref, x, cotangent)

    backbone, streamed_vjp = tilefn.streamify(model, entry.tile, saliency=True)
    with torch.no_grad():
        out = backbone(x)
    param_grads, input_grad = streamed_vjp(x, cotangent)
    errors = {
        "out": max_rel_error(out, ref_out),
        "param_grads": max_rel_error(param_grads, ref_param_grads),
        "input_grad": max_rel_error(input_grad, ref_input_grad),
    }
    print(f"float32 {entry.id}: {errors}")
    assert_tree_close(out, ref_out, rtol=F32_RTOL, atol=F32_ATOL)
    assert_tree_close(param_grads, ref_param_grads, rtol=F32_RTOL, atol=F32_ATOL)
    assert_tree_close(input_grad, ref_input_grad, rtol=F32_RTOL, atol=F32_ATOL)
