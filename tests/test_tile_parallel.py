"""Tile parallelism: one image streamed by two gloo processes equals one process and the
plain model (float64)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tilefn

sys.path.insert(0, str(Path(__file__).parent))
from tile_parallel_worker import TILE, make_data, make_model, run  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("tile_parallel")
    worker = Path(__file__).with_name("tile_parallel_worker.py")
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(out)],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def reference() -> dict:
    model = make_model()
    x, weight = make_data()
    x.requires_grad_(True)
    y = model(x)
    (y * weight).sum().backward()
    return {
        "out": y.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "input_grad": x.grad.clone(),
    }


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", ["plain", "budget"])
def test_two_ranks_equal_the_plain_model(ranks: list[dict], reference: dict, config: str) -> None:
    for rank in ranks:
        got = rank[config]
        _close(got["out"], reference["out"])
        _close(got["input_grad"], reference["input_grad"])
        _close(got["vjp_input"], reference["input_grad"])
        assert got["grads"].keys() == reference["grads"].keys()
        for name, g in reference["grads"].items():
            _close(got["grads"][name], g)
            _close(got["vjp_grads"][name], g)


def test_two_ranks_equal_one_process(ranks: list[dict]) -> None:
    single = run(make_model())
    for rank in ranks:
        _close(rank["plain"]["out"], single["out"])
        for name, g in single["grads"].items():
            _close(rank["plain"]["grads"][name], g)


def test_ranks_split_the_crops(ranks: list[dict]) -> None:
    mine = [set(r["my_crops"]) for r in ranks]
    assert mine[0] and mine[1]
    assert not mine[0] & mine[1]
    assert mine[0] | mine[1] == set(range(ranks[0]["n_tiles"]))
    x, _ = make_data()
    assert tilefn.plan(make_model(), x.shape, TILE).n_tiles == ranks[0]["n_tiles"]


def test_too_few_tiles_is_refused_on_every_rank(ranks: list[dict]) -> None:
    for rank in ranks:
        assert "1 tiles for 2 ranks" in rank["too_few_tiles"]


def test_process_group_needs_initialised_distributed() -> None:
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised")
    with pytest.raises(tilefn.OptionError, match="init_process_group"):
        tilefn.streamify(make_model(), TILE, process_group=object())
