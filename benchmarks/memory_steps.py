"""Resident memory over many streamed training steps: it must not grow.

Runs ``--steps`` full training steps (streamed trunk forward, head, loss, backward,
optimizer step) on one image and samples the process's resident set size after each step
(``/proc/self/statm``). Prints one line per ``--every`` steps and a summary, and exits 1 if
the RSS after the warm-up grows by more than ``--tolerance-mb``.

    python benchmarks/memory_steps.py --model resnet18 --size 2048 --tile 1024 --steps 100
    python benchmarks/memory_steps.py --model tiny --size 256 --tile 96 --steps 100 --budget 1e9
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import torchvision
from torch import nn

import tilefn


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make(model: str) -> tuple[nn.Module, int]:
    if model == "tiny":
        trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
        )
        return trunk.eval(), 32
    net = getattr(torchvision.models, model)(weights=None)
    return nn.Sequential(*list(net.children())[:-2]).eval(), net.fc.in_features


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="tiny or a torchvision ResNet")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5, help="steps before the baseline")
    parser.add_argument("--budget", type=float, default=None, help="memory_budget (bytes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=10, help="print every N steps")
    parser.add_argument("--tolerance-mb", type=float, default=32.0)
    parser.add_argument("--json", default="", help="write the samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trunk, channels = make(args.model)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2))
    options = {} if args.budget is None else {"memory_budget": int(args.budget)}
    backbone, _ = tilefn.streamify(trunk, args.tile, **options)
    params = list(trunk.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    x = torch.randn(1, 3, args.size, args.size)
    label = torch.tensor([1])
    plan = backbone.plan(x.shape)
    print(f"{args.model} {args.size}² tile {args.tile}: {plan.n_tiles} tiles, a {plan.overlap:.3f}")
    samples = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(backbone(x)), label)
        loss.backward()
        opt.step()
        samples.append(rss_mb())
        if step % args.every == 0 or step == 1:
            print(f"step {step:4d}  rss {samples[-1]:8.1f} MiB  loss {loss.item():.4f}", flush=True)
    elapsed = time.perf_counter() - t0
    base = max(samples[: args.warmup])
    late = max(samples[args.warmup :]) if args.steps > args.warmup else base
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "model": args.model,
        "size": args.size,
        "tile": args.tile,
        "budget": args.budget,
        "steps": args.steps,
        "seconds_per_step": elapsed / args.steps,
        "rss_after_warmup_mib": base,
        "rss_max_after_warmup_mib": late,
        "growth_mib": late - base,
        "rss_last_mib": samples[-1],
        "peak_rss_mib": peak,
    }
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rss_mib": samples}, f)
    return 0 if late - base <= args.tolerance_mb else 1


if __name__ == "__main__":
    sys.exit(main())
