"""memory_budget (crop graphs kept from the forward), tile_size="auto" and channels_last:
still exact against the plain model in float64."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import tilefn
from tilefn._schedule import crop_groups, kept_crops


def make_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 4, 5, padding=2),
    ).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _data(shape=(2, 3, 97, 83)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _grads(net: nn.Module, f, x: torch.Tensor, cot: torch.Tensor | None = None):
    for p in net.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = f(x)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    y.backward(cot)
    return y.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, x.grad


def _assert_same(got, ref) -> None:
    y, grads, xg = got
    y_ref, grads_ref, xg_ref = ref
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xg, xg_ref, rtol=1e-10, atol=1e-12)
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-10, atol=1e-12)


def _kept(backbone, x) -> tuple[int, int]:
    plan = backbone.plan(x.shape)
    mine = backbone._executor.my_crops(plan)
    return len(kept_crops(plan, mine, backbone.options.memory_budget)), len(mine)


@pytest.mark.parametrize("budget", [2**20, 3 * 2**20, 2**30])
def test_kept_crop_graphs_give_exact_gradients(budget: int) -> None:
    net, x = make_net(), _data()
    ref = _grads(net, net, x)
    backbone, _ = tilefn.streamify(net, 48, memory_budget=budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the smallest budget is below the estimate
        kept, total = _kept(backbone, x)
        _assert_same(_grads(net, backbone, x), ref)
    assert total > 1
    if budget == 2**30:
        assert kept == total  # every graph kept: no recompute at all


def test_budget_keeps_the_last_crops_and_counts_their_memory() -> None:
    net, x = make_net(), _data()
    plan = tilefn.plan(net, x.shape, 48)
    per_crop = plan.crop_activation_bytes
    budget = plan.memory_estimate + per_crop  # room for about two crop graphs
    backbone, _ = tilefn.streamify(net, 48, memory_budget=budget)
    kept, total = _kept(backbone, x)
    assert 1 <= kept < total
    kept_ids = kept_crops(plan, list(range(total)), budget)
    assert kept_ids == set(range(total - kept, total))


def test_second_backward_recomputes_after_the_kept_graphs_are_used() -> None:
    net, x = make_net(), _data()
    backbone, _ = tilefn.streamify(net, 48, memory_budget=2**30)
    y_ref = net(x)
    y_ref.sum().backward()
    ref = {n: 2 * p.grad for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = None
    y = backbone(x)
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-12)


def test_kept_graphs_replay_randomness_like_recompute() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Dropout2d(0.5), nn.Conv2d(6, 4, 3, padding=1)
    ).double()
    net.train()
    x = _data((2, 3, 60, 50))
    results = []
    for budget in (None, 2**30):
        backbone, _ = tilefn.streamify(net, 24, memory_budget=budget)
        torch.manual_seed(7)
        results.append(_grads(net, backbone, x))
    torch.manual_seed(7)
    ref = _grads(net, net, x)
    _assert_same(results[0], ref)
    _assert_same(results[1], ref)


def test_autocast_bf16_kept_equals_recomputed() -> None:
    net = make_net().float()
    x = _data().float()
    outs = []
    for budget in (None, 2**30):
        backbone, _ = tilefn.streamify(net, 48, memory_budget=budget)
        for p in net.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = backbone(x)
        y.float().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
    assert outs[0][0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_auto_tile_with_room_for_everything_is_one_tile() -> None:
    net, x = make_net(), _data()
    backbone, _ = tilefn.streamify(net, "auto", memory_budget=2**30)
    plan = backbone.plan(x.shape)
    assert plan.n_tiles == 1 and plan.overlap == 1.0
    _assert_same(_grads(net, backbone, x), _grads(net, net, x))


def test_auto_tile_fits_the_budget_and_is_exact() -> None:
    net, x = make_net(), _data((1, 3, 301, 257))
    whole = tilefn.plan(net, x.shape, 301)
    budget = whole.memory_estimate // 3
    plan = tilefn.plan(net, x.shape, "auto", memory_budget=budget)
    assert plan.n_tiles > 1
    assert plan.memory_estimate <= budget
    backbone, _ = tilefn.streamify(net, "auto", memory_budget=budget)
    assert backbone.plan(x.shape) == plan  # the same plan, cached by the backbone
    assert backbone.plan(x.shape) is backbone.plan(x.shape)
    _assert_same(_grads(net, backbone, x), _grads(net, net, x))


def test_auto_tile_below_the_smallest_plan_is_refused() -> None:
    net, x = make_net(), _data()
    with pytest.raises(tilefn.TileSizeError, match="memory_budget .* is below"):
        tilefn.plan(net, x.shape, "auto", memory_budget=1000)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"tile_size": "auto"}, tilefn.OptionError, "pass memory_budget"),
        ({"tile_size": "big"}, tilefn.TileSizeError, "'auto'"),
        ({"tile_size": 48, "memory_budget": "8G"}, tilefn.OptionError, "number of bytes"),
        ({"tile_size": 48, "memory_budget": -1}, tilefn.OptionError, "positive"),
        ({"tile_size": 48, "channels_last": 1}, tilefn.OptionError, "channels_last"),
    ],
)
def test_bad_budget_options(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tilefn.streamify(make_net(), **kwargs)


def test_fixed_tile_over_budget_warns() -> None:
    net, x = make_net(), _data()
    backbone, _ = tilefn.streamify(net, 48, memory_budget=1000)
    with pytest.warns(UserWarning, match="more than memory_budget"):
        backbone(x)


def test_channels_last_is_exact() -> None:
    net = make_net().to(memory_format=torch.channels_last)
    x = _data()
    backbone, _ = tilefn.streamify(net, 48, channels_last=True)
    _assert_same(_grads(net, backbone, x), _grads(net, net, x))


@pytest.mark.parametrize("crop_batch", [2, 4])
@pytest.mark.parametrize("budget", [None, 3 * 2**20])
def test_crop_batch_is_exact(crop_batch: int, budget: int | None) -> None:
    net, x = make_net(), _data()
    backbone, _ = tilefn.streamify(net, 48, crop_batch=crop_batch, memory_budget=budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = backbone.plan(x.shape)
        groups = crop_groups(plan, list(range(plan.n_tiles)), set(), crop_batch)
        assert any(len(g) > 1 for g in groups)
        assert all(len(g) <= crop_batch for g in groups)
        _assert_same(_grads(net, backbone, x), _grads(net, net, x))


def test_crop_batch_runs_random_models_one_crop_at_a_time() -> None:
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Dropout2d(0.5)).double().train()
    backbone, _ = tilefn.streamify(net, 24, crop_batch=4)
    plan = backbone.plan((2, 3, 60, 50))
    groups = crop_groups(plan, list(range(plan.n_tiles)), set(), 4)
    assert all(len(g) == 1 for g in groups)
    x = _data((2, 3, 60, 50))
    torch.manual_seed(7)
    got = _grads(net, backbone, x)
    torch.manual_seed(7)
    _assert_same(got, _grads(net, net, x))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_crop_batch(bad) -> None:
    with pytest.raises(tilefn.OptionError, match="crop_batch"):
        tilefn.streamify(make_net(), 48, crop_batch=bad)


def test_auto_refuses_a_budget_that_only_admits_heavily_overlapping_tiles() -> None:
    """A deep network whose minimum tile owns almost nothing: a budget that fits only such
    tiles is refused (with the budget a tolerable tile needs), not turned into a plan whose
    crops compute 28 times the image."""
    deep = nn.Sequential(*[nn.Conv2d(1, 1, 9, padding=4) for _ in range(12)])
    with pytest.raises(tilefn.TileSizeError, match=r"only admits tiles that overlap heavily") as e:
        tilefn.plan(deep, (1, 1, 400, 400), "auto", memory_budget=3 * 2**20)
    need = float(re.search(r"needs memory_budget >= ([0-9.]+) MiB", str(e.value)).group(1))
    plan = tilefn.plan(deep, (1, 1, 400, 400), "auto", memory_budget=int((need + 0.1) * 2**20))
    assert plan.overlap <= 8
