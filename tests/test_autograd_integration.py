"""The streamed backbone as an ordinary autograd citizen: hooks, accumulation, autocast."""

from __future__ import annotations

import torch
from torch import nn

import tilefn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=2, dilation=2),
    ).double()


def _reference_grads(model: nn.Module, x: torch.Tensor, head) -> dict[str, torch.Tensor]:
    model.eval()
    loss = head(model(x))
    names = [n for n, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return dict(zip(names, grads))


def test_parameter_hooks_fire_and_grads_accumulate() -> None:
    model = _net()
    x = torch.randn(1, 3, 48, 40, dtype=torch.float64)
    head = lambda y: (y**2).mean()
    expected = _reference_grads(model, x, head)
    model.train()  # BatchNorm still uses running statistics inside the streamed trunk

    backbone, _ = tilefn.streamify(model, 20)
    fired: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: fired.append(name))
    head(backbone(x)).backward()
    head(backbone(x)).backward()  # a second backward accumulates, as plain autograd does
    assert sorted(set(fired)) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * expected[name], rtol=1e-10, atol=1e-12)


def test_frozen_parameters_get_no_grad_and_clipping_works() -> None:
    model = _net()
    model[0].weight.requires_grad_(False)
    x = torch.randn(2, 3, 33, 37, dtype=torch.float64)
    backbone, _ = tilefn.streamify(model, 16)
    backbone(x).sum().backward()
    assert model[0].weight.grad is None
    assert model[4].weight.grad is not None
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    assert total > 1e-3
    clipped = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    torch.testing.assert_close(clipped, torch.tensor(1e-3, dtype=torch.float64), rtol=1e-6, atol=0)


def test_no_grad_forward_builds_no_graph() -> None:
    model = _net()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    backbone, _ = tilefn.streamify(model, 16)
    with torch.no_grad():
        y = backbone(x)
    assert y.grad_fn is None and not y.requires_grad
    y = backbone(x)
    assert y.grad_fn is not None


def test_input_grad_through_backward_matches_plain() -> None:
    model = _net().eval()
    x = torch.randn(1, 3, 45, 39, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    (model(xr) ** 3).sum().backward()
    model.zero_grad()
    xs = x.clone().requires_grad_()
    backbone, _ = tilefn.streamify(model, 18)
    (backbone(xs) ** 3).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)


def test_recompute_runs_under_the_forward_autocast_state() -> None:
    model = _net().float().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    ref_grads = torch.autograd.grad(ref.float().square().mean(), list(model.parameters()))

    backbone, _ = tilefn.streamify(model, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = backbone(x)
    assert out.dtype == torch.bfloat16 == ref.dtype
    # bf16 has 8 bits of mantissa: compare with a bf16-sized tolerance.
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().square().mean().backward()  # outside autocast: the recompute restores it
    for p, g in zip(model.parameters(), ref_grads):
        assert p.grad is not None and p.grad.dtype == torch.float32
        rel = (p.grad - g).norm() / g.norm()
        assert rel < 5e-2, rel


def test_rng_advances_like_one_plain_forward_and_vjp_leaves_it_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout2d(0.5)).double().train()
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)
    backbone, streamed_vjp = tilefn.streamify(model, 16)

    torch.manual_seed(1)
    ref = model(x)
    after_plain = torch.get_rng_state()
    torch.manual_seed(1)
    out = backbone(x)  # 9 crops, each replaying the same draw
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.get_rng_state(), after_plain)

    before = torch.get_rng_state()
    streamed_vjp(x, torch.ones_like(ref))
    assert torch.equal(torch.get_rng_state(), before)
    out = backbone(x.requires_grad_())
    before = torch.get_rng_state()
    out.sum().backward()  # the recompute replays the forward's draws, then restores
    assert torch.equal(torch.get_rng_state(), before)
