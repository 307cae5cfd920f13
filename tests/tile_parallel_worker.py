"""One rank of a tile-parallel run (``streamify(..., process_group=...)``), for
tests/test_tile_parallel.py.

``python tests/tile_parallel_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set: joins a gloo group, streams one image with this
rank's share of the crops (with and without a memory budget, and through
``streamed_vjp``) and writes the output, parameter gradients and input gradient it ends
with to ``OUT_DIR/rank{r}.pt``. The builders are imported by the test for the
single-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 1),
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 91, 77, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 4, 23, 19, generator=g, dtype=torch.float64)  # output's shape
    return x, weight


TILE = 36


def run(model: nn.Module, **options) -> dict:
    """Output, parameter grads and input grad of ``sum(weight * backbone(x))``."""
    import tilefn

    x, weight = make_data()
    x.requires_grad_(True)
    backbone, streamed_vjp = tilefn.streamify(model, TILE, saliency=True, **options)
    for p in model.parameters():
        p.grad = None
    y = backbone(x)
    (y * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    vjp_grads, vjp_input = streamed_vjp(x.detach(), weight)
    return {
        "out": y.detach(),
        "grads": grads,
        "input_grad": x.grad.clone(),
        "vjp_grads": vjp_grads,
        "vjp_input": vjp_input,
    }


def main(out_dir: Path) -> None:
    import tilefn

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    model = make_model()
    result = {
        "plain": run(model, process_group=group),
        "budget": run(model, process_group=group, memory_budget=2**30),
    }
    try:  # one tile for two ranks: refused on every rank alike
        tilefn.streamify(model, 512, process_group=group).backbone(make_data()[0])
        result["too_few_tiles"] = "no error"
    except tilefn.PlanError as err:
        result["too_few_tiles"] = str(err)
    x, _ = make_data()
    backbone, _ = tilefn.streamify(model, TILE, process_group=group)
    plan = backbone.plan(x.shape)
    result["n_tiles"] = plan.n_tiles
    result["my_crops"] = backbone._executor.my_crops(plan)
    torch.save(result, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
