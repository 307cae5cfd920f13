"""tilefn keeps no surprising global state: rules are registered deliberately, tracing leaves
the process as it found it, and plans are cached per backbone with a bound."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilefn
from tilefn import _rules
from tilefn._trace import trace

aten = torch.ops.aten

torch.library.define("tilefn_registry_tests::act", "(Tensor x) -> Tensor")


@torch.library.impl("tilefn_registry_tests::act", "CompositeExplicitAutograd")
def _act(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@torch.library.register_fake("tilefn_registry_tests::act")
def _act_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_register_rule_checks_the_rule_before_storing_anything() -> None:
    op = torch.ops.tilefn_registry_tests.act
    with pytest.raises(tilefn.OptionError, match=r"^register_rule: expected a callable rule"):
        tilefn.register_rule(op, "pointwise")  # type: ignore[arg-type]
    assert _rules.get_rule(op.default) is None  # nothing half-registered


def test_register_rule_never_replaces_a_rule_silently() -> None:
    before = _rules.get_rule(aten.convolution.default)
    with pytest.raises(
        tilefn.OptionError, match=r"^register_rule: aten.convolution.default\b.* already ha"
    ):
        tilefn.register_rule(aten.convolution, tilefn.rules.pointwise)
    assert _rules.get_rule(aten.convolution.default) is before
    op = torch.ops.tilefn_registry_tests.act
    tilefn.register_rule(op, tilefn.rules.pointwise)
    with pytest.raises(tilefn.OptionError, match="replace=True"):
        tilefn.register_rule(op.default, tilefn.rules.pointwise)

    def doubled(call):
        return tilefn.rules.pointwise(call)

    tilefn.register_rule(op.default, doubled, replace=True)
    assert _rules.get_rule(op.default) is doubled


def test_pooling_and_interpolation_rules_are_registered_per_rank() -> None:
    for op in (aten.max_pool2d_with_indices.default, aten.avg_pool3d.default):
        assert _rules.get_rule(op) is not None
    for op, mode in (
        (aten.upsample_bicubic2d.default, "cubic"),
        (aten.upsample_nearest3d.vec, "nearest"),
    ):
        rule = _rules.get_rule(op)
        assert rule.keywords["mode"] == mode  # type: ignore[union-attr]


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.conv(x))


def test_tracing_restores_the_deterministic_flag_and_leaves_no_hooks() -> None:
    net = Blocks()
    assert torch.are_deterministic_algorithms_enabled()  # conftest turns it on
    flags: list[bool] = []
    net.conv.register_forward_hook(
        lambda *_: flags.append(torch.are_deterministic_algorithms_enabled())
    )
    t = trace(net, (1, 1, 16, 16), torch.float32)
    assert any(name.startswith("aten.upsample_bilinear2d.") for name in t.op_names)
    assert torch.are_deterministic_algorithms_enabled()
    assert flags == [True]  # only the interpolation call itself runs without it
    for m in net.modules():
        hooks = len(m._forward_pre_hooks) + len(m._forward_hooks)
        assert hooks == (1 if m is net.conv else 0), m


def test_refusals_name_the_layer_with_per_module_hooks() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.AdaptiveAvgPool2d(1)))
    with pytest.raises(tilefn.UnsupportedLayerError, match=r"layer '1.0' \(AdaptiveAvgPool2d"):
        tilefn.plan(net, (1, 1, 32, 32), 16)


def test_auto_plans_are_cached_per_backbone_with_a_bound() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)).double()
    backbone, _ = tilefn.streamify(net, "auto", memory_budget=2**30)
    other, _ = tilefn.streamify(net, "auto", memory_budget=2**30)
    for size in range(10, 10 + backbone._plans.maxsize + 3):
        backbone.plan((1, 1, size, 9))
    assert len(backbone._plans) == backbone._plans.maxsize
    assert len(other._plans) == 0  # each backbone has its own cache
