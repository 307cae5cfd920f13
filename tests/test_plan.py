"""tilefn.plan: computed from shapes only, cached, printable, and sensible for ResNet trunks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import tilefn


def resnet_trunk(arch: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None)
    trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return trunk.eval()


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    return resnet_trunk("resnet18")


def _crop_sides(p: Any) -> list[tuple[int, ...]]:
    return [tuple(stop - start for start, stop in crop.box) for crop in p.crops]


def _volume_ratio(p: Any) -> float:
    spatial = p.input_shape[2:]
    total = sum(math.prod(stop - start for start, stop in crop.box) for crop in p.crops)
    return total / math.prod(spatial)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- shapes only
PLAN_HUGE = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch, torchvision
    from torch import nn
    import tilefn
    def peak_kib():  # this process's peak RSS since exec (ru_maxrss is inherited from the parent)
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.set_num_threads(2)
    m = torchvision.models.resnet18(weights=None)
    trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4).eval()
    before = peak_kib()
    t0 = time.perf_counter()
    p = tilefn.plan(trunk, (1, 3, 16384, 16384), 2048)
    seconds = time.perf_counter() - t0
    after = peak_kib()
    print(json.dumps({"seconds": seconds, "rss_growth_kib": after - before, "n_tiles": p.n_tiles,
                      "overlap": p.overlap, "text": str(p)}))
    """
)


def test_plan_huge_image_from_shapes_only() -> None:
    """A 16384^2 plan takes seconds and no memory: the model never runs on the image."""
    proc = subprocess.run(
        [sys.executable, "-c", PLAN_HUGE], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["seconds"] < 10, info
    # a float32 copy of the image alone would be 3 GiB; allow 512 MiB for probes and bookkeeping
    assert info["rss_growth_kib"] < 512 * 1024, info
    assert info["n_tiles"] > 50
    assert info["overlap"] >= 1.0


def test_plan_never_runs_model_on_full_image(r18: nn.Module) -> None:
    shape = (1, 3, 4096, 3072)
    seen: list[tuple[str, tuple[int, ...]]] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        for a in args:
            if isinstance(a, torch.Tensor):
                seen.append((a.device.type, tuple(a.shape)))

    handles = [m.register_forward_pre_hook(hook) for m in r18.modules()]
    try:
        p = tilefn.plan(r18, shape, 1024)
    finally:
        for h in handles:
            h.remove()
    real = [(dev, s) for dev, s in seen if dev != "meta"]
    biggest = max((math.prod(s) for _, s in real), default=0)
    assert biggest < math.prod(shape) // 4, (
        f"plan ran the model on a large real tensor: {max(real)}"
    )
    assert p.n_tiles > 1


# --------------------------------------------------------------------------- contents
def test_plan_fields(r18: nn.Module) -> None:
    shape = (2, 3, 3000, 2500)
    p = tilefn.plan(r18, shape, 1024)
    assert isinstance(p, tilefn.TilePlan)
    assert tuple(p.input_shape) == shape
    assert tuple(p.tile_size) == (1024, 1024)
    assert isinstance(p.n_tiles, int) and p.n_tiles == len(p.crops) > 1
    assert isinstance(p.overlap, float) and p.overlap >= 1.0
    assert math.isclose(p.overlap, _volume_ratio(p), rel_tol=1e-9)
    assert isinstance(p.memory_estimate, int) and p.memory_estimate > 0
    assert len(p.min_tile_size) == 2 and all(isinstance(v, int) for v in p.min_tile_size)
    for crop in p.crops:
        for (start, stop), size in zip(crop.box, shape[2:]):
            assert 0 <= start < stop <= size


@pytest.mark.parametrize("tile", [1024, (1024, 768), (640, 1500), 700])
def test_crop_sides_at_most_tile_size(r18: nn.Module, tile: Any) -> None:
    shape = (1, 3, 3000, 2500)
    p = tilefn.plan(r18, shape, tile)
    t = tile if isinstance(tile, tuple) else (tile, tile)
    assert tuple(p.tile_size) == t
    for sides in _crop_sides(p):
        assert all(s <= ti for s, ti in zip(sides, t)), (sides, t)
    # the crops cover the image
    covered = torch.zeros(shape[2:], dtype=torch.bool)
    for crop in p.crops:
        (y0, y1), (x0, x1) = crop.box
        covered[y0:y1, x0:x1] = True
    assert bool(covered.all())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_alignment_resnet_trunk(arch: str) -> None:
    trunk = resnet_trunk(arch)
    p = tilefn.plan(trunk, (1, 3, 2048, 2048), 1024)
    assert tuple(p.alignment) == (32, 32)
    for crop in p.crops:
        for start, _ in crop.box:
            assert start % 32 == 0, crop.box


def test_overlap_decreases_as_tile_grows(r18: nn.Module) -> None:
    shape = (1, 3, 8192, 8192)
    overlaps = [tilefn.plan(r18, shape, t).overlap for t in (1024, 2048, 4096)]
    assert all(o >= 1.0 for o in overlaps), overlaps
    assert overlaps[0] > overlaps[1] > overlaps[2], overlaps
    assert tilefn.plan(r18, shape, 8192).overlap == 1.0
    assert tilefn.plan(r18, shape, 8192).n_tiles == 1


def test_overlap_matches_design_ballpark(r18: nn.Module) -> None:
    """docs/design.md#cost-model: a on 3072^2 is at most 1.78, the a of two full 2048 crops a dim."""
    p = tilefn.plan(r18, (1, 3, 3072, 3072), 2048)
    assert 1.0 < p.overlap <= 1.78 + 1e-9, p.overlap


def test_min_tile_size_resnet18(r18: nn.Module) -> None:
    shape = (1, 3, 4096, 4096)
    minimum = tuple(tilefn.plan(r18, shape, 2048).min_tile_size)
    assert all(200 < m < 2048 for m in minimum), minimum
    p = tilefn.plan(r18, shape, minimum)
    assert p.n_tiles > 1
    assert all(all(s <= m for s, m in zip(sides, minimum)) for sides in _crop_sides(p))
    with pytest.raises(tilefn.TileSizeError, match=r"[Uu]se tile_size >= "):
        tilefn.plan(r18, shape, tuple(m - 1 for m in minimum))


def test_memory_estimate_grows_with_tile(r18: nn.Module) -> None:
    shape = (1, 3, 8192, 8192)
    small, big = (tilefn.plan(r18, shape, t).memory_estimate for t in (1024, 2048))
    assert 0 < small < big


# --------------------------------------------------------------------------- printing, purity, cache
def test_plan_is_printable(r18: nn.Module) -> None:
    p = tilefn.plan(r18, (1, 3, 3000, 2500), 1024)
    text = str(p)
    assert "tile" in text.lower() and "overlap" in text.lower(), text
    assert str(p.n_tiles) in text, text
    assert repr(p)


def test_plan_is_pure(r18: nn.Module) -> None:
    a = tilefn.plan(r18, (1, 3, 3000, 2500), 1024)
    b = tilefn.plan(r18, torch.Size([1, 3, 3000, 2500]), 1024)
    assert str(a) == str(b)
    assert [tuple(c.box) for c in a.crops] == [tuple(c.box) for c in b.crops]


def test_backbone_plan_is_cached() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 3)
    ).double()
    x = torch.randn(1, 3, 64, 48, dtype=torch.float64)
    backbone, _ = tilefn.streamify(model, 24)
    y1 = backbone(x)
    first = backbone.plan(x.shape)
    y2 = backbone(x)
    assert backbone.plan(x.shape) is first
    assert backbone.plan(tuple(x.shape)) is first
    assert torch.equal(y1, y2)
    other = backbone.plan((1, 3, 80, 48))
    assert other is not first and tuple(other.input_shape) == (1, 3, 80, 48)
    assert isinstance(first, tilefn.TilePlan) and tuple(first.input_shape) == tuple(x.shape)


def test_backbone_plan_matches_tilefn_plan() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2)
    ).double()
    backbone, _ = tilefn.streamify(model, 32)
    shape = (1, 3, 100, 90)
    assert str(backbone.plan(shape)) == str(tilefn.plan(model, shape, 32))


# --------------------------------------------------------------------------- other ranks
def test_plan_1d_long_signal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 4, 9, padding=4), nn.ReLU(), nn.MaxPool1d(4), nn.Conv1d(4, 4, 9, padding=4)
    )
    t0 = time.perf_counter()
    p = tilefn.plan(model, (1, 1, 1_000_000), 8192)
    assert time.perf_counter() - t0 < 10
    assert len(p.tile_size) == 1 and p.n_tiles > 100
    assert all(stop - start <= 8192 for crop in p.crops for start, stop in crop.box)
    assert p.overlap >= 1.0


def test_plan_3d_volume() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 2, 3, stride=2, padding=1)
    )
    p = tilefn.plan(model, (1, 1, 512, 512, 256), (128, 128, 64))
    assert tuple(p.tile_size) == (128, 128, 64)
    assert len(p.alignment) == 3 and p.n_tiles == len(p.crops) > 1
    for crop in p.crops:
        assert all(stop - start <= t for (start, stop), t in zip(crop.box, (128, 128, 64)))
    assert p.overlap >= 1.0


def test_overlap_below_one_when_network_skips_pixels() -> None:
    """overlap = sum of crop volumes / image volume. Crops only hold pixels the network
    reads, so a stride larger than the kernel (pixels never read) gives overlap < 1
    (found by tests/test_random_nets.py)."""
    model = nn.Sequential(nn.AvgPool1d(1, 3)).double()
    p = tilefn.plan(model, (1, 3, 20), 7)
    assert math.isclose(p.overlap, _volume_ratio(p), rel_tol=1e-12)
    assert p.overlap < 1.0, str(p)
    x = torch.randn(1, 3, 20, dtype=torch.float64)
    torch.testing.assert_close(tilefn.streamify(model, 7).backbone(x), model(x), rtol=0, atol=0)
