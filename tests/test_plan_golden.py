"""Golden plans: the printed plan of fixed networks and shapes, computed from shapes only.

A change here means the planner now cuts images differently: check the new plan is still
right (crops within tile_size, starting on the alignment grid) and better, then update."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import tilefn

RESNET18_4096x3000 = """\
TilePlan(input (1, 3, 4096, 3000), tile_size (2048, 1536), alignment (32, 32))
  dim H: 3 crops [0:2048) [1632:3680) [3264:4096)
  dim W: 3 crops [0:1528) [1088:2616) [2176:3000)
  output 0: shape (1, 512, 128, 94), stride (32, 32)
  9 tiles, overlap a = 1.556 (crop area computed / image area), minimum tile_size (448, 472), estimated peak memory 4382.4 MiB"""

CONV1D_100 = """\
TilePlan(input (2, 2, 100), tile_size (40,), alignment (2,))
  dim L: 3 crops [0:40) [36:76) [72:100)
  output 0: shape (2, 2, 100), stride (1)
  3 tiles, overlap a = 1.080 (crop area computed / image area), minimum tile_size (6,), estimated peak memory 0.0 MiB"""


def test_resnet18_trunk_plan() -> None:
    m = torchvision.models.resnet18(weights=None)
    trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    assert str(tilefn.plan(trunk, (1, 3, 4096, 3000), (2048, 1536), torch.float32)) == (
        RESNET18_4096x3000
    )


def test_conv1d_encoder_decoder_plan() -> None:
    net = nn.Sequential(
        nn.Conv1d(2, 4, 5, padding=2), nn.MaxPool1d(2), nn.ConvTranspose1d(4, 2, 2, stride=2)
    )
    assert str(tilefn.plan(net, (2, 2, 100), 40)) == CONV1D_100


def test_plan_cache_keeps_recent_shapes_only() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)).double()
    backbone, _ = tilefn.streamify(net, 8)
    limit = backbone._plans.maxsize
    for size in range(10, 10 + limit + 6):
        backbone(torch.zeros(1, 1, size, 9, dtype=torch.float64))
    assert len(backbone._plans) == limit == 64
    last = (1, 1, 10 + limit + 5, 9)
    assert backbone.plan(last) is backbone.plan(last)
