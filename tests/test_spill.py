"""Stage cuts whose stored maps do not fit in ``memory_budget`` go to disk (``spill_dir``):
exact against the plain model, files removed when done, resident memory within the
budget although the maps exceed it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tilefn
import tilefn.testing
from tilefn._inputs import scatter_add
from tilefn._spill import DiskMap

ROOT = Path(__file__).resolve().parents[1]
# The budgets here are far below the maps, so that they spill, and below a crop's working set.
pytestmark = pytest.mark.filterwarnings("ignore:streamify. the plan for input shape")


def test_disk_map_reads_writes_and_adds_blocks(tmp_path):
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.uint8):
        m = DiskMap((2, 3, 10, 7), dtype, "cpu", tmp_path, "t")
        assert Path(m.path).parent == tmp_path and os.path.getsize(m.path) == m.nbytes
        full = torch.zeros(2, 3, 10, 7, dtype=dtype)
        assert torch.equal(m.read([(0, 10), (0, 7)]), full)  # a new map reads as zeros
        block = (torch.rand(2, 3, 4, 5) * 100).to(dtype)
        m.write((slice(None), slice(None), slice(2, 6), slice(1, 6)), block)
        full[..., 2:6, 1:6] = block
        assert torch.equal(m[(slice(None), slice(None), slice(0, 10), slice(0, 7))], full)
        m.close()
        assert not os.path.exists(m.path)
    # add() wraps around periodic ends like read(): an input-gradient accumulator.
    m = DiskMap((1, 2, 6, 5), torch.float64, "cpu", tmp_path)
    ref = torch.zeros(1, 2, 6, 5, dtype=torch.float64)
    for box in ([(-2, 3), (1, 4)], [(4, 8), (-1, 6)], [(0, 6), (0, 5)]):
        values = torch.randn(1, 2, *(b - a for a, b in box), dtype=torch.float64)
        m.add(box, values)
        scatter_add(ref, box, values)
        torch.testing.assert_close(m.read([(0, 6), (0, 5)]), ref, rtol=0, atol=0)
        torch.testing.assert_close(m.read(box), _wrap(ref, box), rtol=0, atol=0)
    path = m.path
    del m
    gc.collect()
    assert not os.path.exists(path)  # removed when collected


def _wrap(t: torch.Tensor, box) -> torch.Tensor:
    (a, b), (c, d) = box
    rows = [i % t.shape[2] for i in range(a, b)]
    cols = [j % t.shape[3] for j in range(c, d)]
    return t[:, :, rows][:, :, :, cols]


def _trunk() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), nn.GroupNorm(2, 8), nn.ReLU()
        ),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=2, dilation=2),
    ).double()


def _spilling(**options):
    """Options whose maps go to disk (the budget is far below the maps), warnings quiet."""
    return {"cut_at": ["2", "3"], "memory_budget": 2e4, **options}


@pytest.mark.parametrize("batchnorm", ["running", "batch"])
def test_spilled_chain_is_exact(tmp_path, batchnorm):
    trunk = _trunk()
    x = torch.randn(2, 3, 67, 61, dtype=torch.float64)
    opts = _spilling(spill_dir=str(tmp_path), batchnorm=batchnorm)
    backbone, _ = tilefn.streamify(trunk, 32, **opts)
    plan = backbone.plan(x.shape)
    assert plan.on_disk and plan.spill_dir == str(tmp_path)
    assert plan.map_bytes == 2 * (2 * 8 * 67 * 61 * 8)
    assert "on disk under" in str(plan) and "cut before '3': map (2, 8, 67, 61)" in str(plan)
    running = trunk[4].running_mean.clone()
    tilefn.testing.assert_streams_like(trunk, x, 32, **opts)
    if batchnorm == "batch":  # one plain train-mode forward updates the running stats
        plain = _trunk().train()
        plain(x)
        trunk[4].running_mean.copy_(running)
        trunk[4].running_var.fill_(1.0)
        trunk[4].num_batches_tracked.zero_()
        backbone(x)
        torch.testing.assert_close(trunk[4].running_mean, plain[4].running_mean)
        torch.testing.assert_close(trunk[4].running_var, plain[4].running_var)
        assert trunk[4].num_batches_tracked.item() == 1
    gc.collect()
    assert list(tmp_path.iterdir()) == []  # every map is removed once its graph is gone


def test_spilled_chain_in_float32_is_close(tmp_path):
    trunk = _trunk().float().eval()
    x = torch.randn(1, 3, 67, 61)
    opts = _spilling(spill_dir=str(tmp_path))
    assert tilefn.streamify(trunk, 32, **opts)[0].plan(x.shape).on_disk
    tilefn.testing.assert_streams_like(trunk, x, 32, **opts)  # float32: rtol = atol = 1e-4


def test_spilled_maps_are_files_until_the_backward(tmp_path):
    trunk = _trunk().eval()
    x = torch.randn(1, 3, 40, 36, dtype=torch.float64, requires_grad=True)
    backbone, _ = tilefn.streamify(trunk, 24, **_spilling(spill_dir=tmp_path))
    out = backbone(x)
    files = sorted(p.name.split("-")[1] for p in tmp_path.iterdir())
    assert files == ["map1", "map2"]  # the two stored maps, nothing in memory
    out.square().sum().backward()
    streamed = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad()
    ref_x = x.detach().clone().requires_grad_()
    ref = trunk(ref_x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
    for got, p in zip(streamed, trunk.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-10)
    del out
    gc.collect()
    assert list(tmp_path.iterdir()) == []
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), ref.detach(), rtol=1e-12, atol=1e-12)
    assert list(tmp_path.iterdir()) == []  # without grad the maps go as soon as read


@pytest.mark.parametrize("budget", [2e4, None], ids=["on-disk", "in-memory"])
def test_cut_chain_under_torch_func(tmp_path, budget):
    trunk = _trunk().eval()
    x = torch.randn(1, 3, 40, 36, dtype=torch.float64)
    opts = _spilling(spill_dir=tmp_path, memory_budget=budget)
    backbone, _ = tilefn.streamify(trunk, 24, **opts)
    assert backbone.plan(x.shape).on_disk == (budget is not None)
    params = {n: p.detach() for n, p in trunk.named_parameters()}

    def loss(p, model):
        return torch.func.functional_call(model, p, (x,)).square().sum()

    got = torch.func.grad(loss)(params, backbone)
    want = torch.func.grad(loss)(params, trunk)
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


def test_maps_that_fit_stay_in_memory():
    trunk = _trunk().eval()
    backbone, _ = tilefn.streamify(trunk, 32, cut_at=["2", "3"], memory_budget=1e9)
    plan = backbone.plan((2, 3, 67, 61))
    assert not plan.on_disk and plan.spill_dir is None and "in memory" in str(plan)
    assert plan.memory_estimate > 2 * plan.map_bytes


def test_spill_dir_must_be_a_directory(tmp_path):
    with pytest.raises(tilefn.OptionError, match="spill_dir must be None or the path"):
        tilefn.streamify(_trunk(), 32, spill_dir=str(tmp_path / "missing"))
    with pytest.raises(tilefn.OptionError, match="spill_dir"):
        tilefn.streamify(_trunk(), 32, spill_dir=3)


_RSS_SCRIPT = r"""
import gc, json, os, sys, warnings
import torch, tilefn
from torch import nn
warnings.simplefilter("ignore")
torch.set_num_threads(1)
torch.manual_seed(0)
budget, spill_dir = float(sys.argv[1]), sys.argv[2]
trunk = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
    nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
    nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
    nn.Conv2d(16, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=4, padding=1),
)
x = torch.randn(1, 3, 1024, 1024)
backbone, _ = tilefn.streamify(
    trunk, 256, cut_at=["2", "3"], memory_budget=budget, spill_dir=spill_dir
)
plan = backbone.plan(x.shape)
backbone(x[..., :300, :300]).sum().backward()  # warm up kernels and allocator pools
trunk.zero_grad()
gc.collect()
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
backbone(x).square().sum().backward()
with open("/proc/self/status") as f:  # VmHWM: this process's peak, unlike ru_maxrss not
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))  # inherited
print(json.dumps({"on_disk": plan.on_disk, "map_bytes": plan.map_bytes, "step": peak - base,
                  "files": os.listdir(spill_dir)}))
"""


def _step_memory(budget: float, spill_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(budget), str(spill_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/statm and status"
)
def test_peak_memory_stays_within_the_budget_when_the_maps_do_not(tmp_path):
    # Two 64 MiB float32 maps (and as much again for their gradients), a 128 MB budget.
    budget = 128e6
    spilled = _step_memory(budget, tmp_path)
    assert spilled["on_disk"] and spilled["map_bytes"] > budget
    assert spilled["step"] < budget, spilled
    assert spilled["files"] == []
    # The same step with the maps in memory needs more than the budget: the check bites.
    held = _step_memory(4e9, tmp_path)
    assert not held["on_disk"] and held["step"] > 2 * budget, held


def test_maps_on_disk_with_a_process_group_are_refused(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        group = dist.new_group([0])
        backbone, _ = tilefn.streamify(_trunk(), 32, **_spilling(process_group=group))
        with pytest.raises(tilefn.OptionError, match="not supported with process_group= yet"):
            backbone.plan((2, 3, 67, 61))
        # Maps that fit in memory are fine with a group (a trunk without whole-image ops).
        local = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
        fits, _ = tilefn.streamify(local, 32, cut_at=["2"], process_group=group)
        assert not fits.plan((2, 3, 67, 61)).on_disk
    finally:
        dist.destroy_process_group()
