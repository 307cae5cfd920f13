"""Side-by-side timing of a plain and a streamed ResNet-18 trunk (not part of the tests).

Runs, in one process and alternating, a training step (trunk forward + ``mean().backward()``)
and an inference pass of the plain model and of ``tilefn.streamify(trunk, tile)``, and prints
the ratios next to the cost model's limits (``4a/3`` for training, ``a`` for inference).

    python benchmarks/step_time.py --size 2048 --tile 1024 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn

import tilefn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="image side (px)")
    parser.add_argument("--tile", type=int, default=1024, help="tile_size (px)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    net = torchvision.models.resnet18(weights=None)
    trunk = nn.Sequential(*list(net.children())[:-2]).eval()
    x = torch.randn(1, 3, args.size, args.size)
    backbone, _ = tilefn.streamify(trunk, args.tile)
    plan = backbone.plan(x.shape)
    print(plan)

    def train(f) -> float:
        t0 = time.perf_counter()
        f(x).mean().backward()
        return time.perf_counter() - t0

    def infer(f) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            f(x)
        return time.perf_counter() - t0

    a = plan.overlap
    for _ in range(args.repeats):
        tp, ts, ip, is_ = train(trunk), train(backbone), infer(trunk), infer(backbone)
        print(
            f"train: plain {tp:.2f}s tilefn {ts:.2f}s ratio {ts / tp:.2f} (limit 4a/3 {4 * a / 3:.2f}) | "
            f"inference: plain {ip:.2f}s tilefn {is_:.2f}s ratio {is_ / ip:.2f} (a {a:.2f})"
        )


if __name__ == "__main__":
    main()
