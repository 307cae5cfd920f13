"""Stage cuts (option ``cut_at``): a Sequential trunk streamed segment by segment over the
stored maps between them, exactly."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import tilefn
import tilefn.testing
from tilefn._staged import SegmentedPlan, StagedPlan


def resnet18_trunk() -> nn.Sequential:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    return nn.Sequential(*list(model.children())[:-2]).double().eval()


@pytest.mark.parametrize("cut_at", ["auto", ("6",)])
def test_cut_trunk_streams_exactly(cut_at):
    trunk = resnet18_trunk()[:7]  # conv1 ... layer3
    x = torch.randn(1, 3, 512, 480, dtype=torch.float64)
    tilefn.testing.assert_streams_like(trunk, x, 256, cut_at=cut_at)
    backbone, _ = tilefn.streamify(trunk, 256, cut_at=cut_at)
    plan = backbone.plan(x.shape)
    assert isinstance(plan, SegmentedPlan)
    assert plan.cuts == (("4", "6") if cut_at == "auto" else cut_at)
    # Each segment's tile covers the same image area: 256 px at stride 4 is 64.
    stride = 512 // plan.segments[1].input_shape[2]
    assert plan.segments[1].tile_size == (256 // stride, 256 // stride)
    maps = {"4": 64 * 128 * 120, "6": 128 * 64 * 60, "7": 256 * 32 * 30}  # float64 maps
    assert plan.map_bytes == sum(maps[c] for c in plan.cuts) * 8
    assert "SegmentedPlan: " in str(plan)


def _gn_trunk() -> nn.Sequential:
    """A trunk with one GroupNorm (a barrier) before a stride-2 conv."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
    ).double()


def test_a_segment_with_whole_image_ops_is_staged():
    net = _gn_trunk()
    x = torch.randn(2, 3, 96, 80, dtype=torch.float64)
    tilefn.testing.assert_streams_like(net, x, 48, cut_at=["2"])
    plan = tilefn.streamify(net, 48, cut_at=["2"])[0].plan(x.shape)
    assert isinstance(plan.segments[0], StagedPlan) and not isinstance(plan.segments[1], StagedPlan)


@pytest.mark.filterwarnings("ignore:streamify. the plan for input shape")  # the small budget
def test_plan_takes_the_options_that_change_the_plan():
    trunk = resnet18_trunk()[:7]
    plan = tilefn.plan(trunk, (1, 3, 512, 480), 256, cut_at="auto")
    assert isinstance(plan, SegmentedPlan) and plan.cuts == ("4", "6")
    assert plan == tilefn.streamify(trunk, 256, cut_at="auto")[0].plan((1, 3, 512, 480))
    small = tilefn.plan(trunk, (1, 3, 512, 480), 256, memory_budget=2e6, cut_at="auto")
    assert small.on_disk and not plan.on_disk
    with pytest.raises(tilefn.OptionError, match="plan: unknown options"):
        tilefn.plan(trunk, (1, 3, 512, 480), 256, cut_a="auto")


def test_bad_cuts_are_refused():
    trunk = resnet18_trunk()
    with pytest.raises(tilefn.OptionError, match="not among them"):
        tilefn.streamify(trunk, 512, cut_at=["layer9"])
    with pytest.raises(tilefn.OptionError, match="not its first child"):
        tilefn.streamify(trunk, 512, cut_at=["0"])
    with pytest.raises(tilefn.OptionError, match="in the order the trunk runs them"):
        tilefn.streamify(trunk, 512, cut_at=["6", "4"])
    with pytest.raises(tilefn.OptionError, match="needs an nn.Sequential trunk"):
        tilefn.streamify(torchvision.models.resnet18(weights=None), 512, cut_at="auto")
    relu = nn.ReLU()
    shared = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.Conv2d(4, 4, 3), relu)
    with pytest.raises(tilefn.OptionError, match="one module appears twice"):
        tilefn.streamify(shared, 64, cut_at="auto")
    with pytest.raises(tilefn.OptionError, match="cut_at must be None, 'auto' or a list"):
        tilefn.streamify(trunk, 512, cut_at="layer1")


def test_last_stats_sum_the_stages_and_segments():
    """backbone.last_stats counts every crop of a staged model's stages and of a cut trunk's
    segments, background skipping included."""
    net = _gn_trunk()
    x = torch.zeros(1, 3, 128, 128, dtype=torch.float64)
    x[..., :40, :40] = torch.randn(1, 3, 40, 40, dtype=torch.float64)  # the rest: background
    for options in ({}, {"cut_at": ["2"]}):
        backbone, _ = tilefn.streamify(net, 32, **options)
        plan = backbone.plan(x.shape)
        backbone(x).sum().backward()
        forward, backward = backbone.last_stats["forward"], backbone.last_stats["backward"]
        assert forward.crops == plan.n_tiles, options
        assert 0 < forward.constant < forward.crops and forward.skipped > 0, options
        assert backward.crops > 0, options
