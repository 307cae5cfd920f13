"""Stage cuts as a speed tool: one float32 training step of a torchvision trunk (a ResNet's
children up to layer4, an EfficientNet's or MobileNetV3's ``features``) at 4096 x 4096, tile
2048, plain against tilefn with and without ``cut_at="auto"``, with and without
``memory_budget``, and with the cut maps on disk; each configuration in its own subprocess
(peak RSS from ``ru_maxrss``), the configurations alternated ``--repeats`` times on the same
weights and image.

    python benchmarks/stage_cuts.py                      # resnet18, 4096^2, 1 repeat
    python benchmarks/stage_cuts.py --model resnet50 --no-plain --repeats 2
    python benchmarks/stage_cuts.py --model efficientnet_b0 --size 2048 --tile 1024 \
        --configs "plain;tilefn;tilefn, cuts"
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision
from torch import nn

import tilefn

CONFIGS = {
    "plain": None,
    "tilefn": {},
    "tilefn, budget": {"memory_budget": 6e9},
    "tilefn, cuts": {"cut_at": "auto"},
    "tilefn, cuts, budget": {"cut_at": "auto", "memory_budget": 6e9},
    # The maps and their gradients take more than half of this budget (at 4096^2; it scales
    # with the image area): they go to disk.
    "tilefn, cuts, on disk": {"cut_at": "auto", "memory_budget": 1.5e9},
}


def trunk(name: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if hasattr(model, "features"):  # EfficientNet, MobileNetV3: squeeze-excitation inside
        return model.features.eval()
    return nn.Sequential(*list(model.children())[:-2]).eval()  # BatchNorm as tilefn runs it


def step(name: str, config: str, size: int, tile: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    net = trunk(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    options = CONFIGS[config]
    if config == "tilefn, cuts, on disk":
        options = {**options, "memory_budget": options["memory_budget"] * (size / 4096) ** 2}
    on_disk = False
    if options is None:
        forward = net
    else:
        forward, _ = tilefn.streamify(net, tile, **options)
        plan = forward.plan(x.shape)  # plan outside the timing
        on_disk = getattr(plan, "on_disk", False)
    t0 = time.perf_counter()
    forward(x).square().mean().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:  # VmHWM: this process's own peak (ru_maxrss starts at the parent's RSS)
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        pass
    grad = float(torch.stack([p.grad.norm() for p in net.parameters()]).norm())
    return {"seconds": seconds, "peak_bytes": peak, "grad_norm": grad, "on_disk": on_disk}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tile", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-plain", action="store_true", help="skip plain (it may not fit)")
    p.add_argument("--configs", help="configurations separated by semicolons (default: all)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(step(args.model, args.one, args.size, args.tile, args.threads)))
        return
    chosen = [c.strip() for c in args.configs.split(";")] if args.configs else list(CONFIGS)
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    configs = [c for c in CONFIGS if c in chosen and not (args.no_plain and c == "plain")]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            cmd = [sys.executable, __file__, "--one", c, "--model", args.model]
            cmd += ["--size", str(args.size), "--tile", str(args.tile)]
            cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(c, runs[c][-1], flush=True)
    base = statistics.median(r["seconds"] for r in runs["plain"]) if "plain" in runs else None
    print(f"\n{args.model} trunk, {args.size}^2, tile {args.tile}, float32 training step")
    print(f"{'configuration':<22} {'seconds':>8} {'x plain':>8} {'peak GB':>8}")
    for c in configs:
        sec = statistics.median(r["seconds"] for r in runs[c])
        peak = max(r["peak_bytes"] for r in runs[c]) / 1e9
        ratio = f"{sec / base:.2f}" if base else "-"
        print(f"{c:<22} {sec:>8.1f} {ratio:>8} {peak:>8.2f}")


if __name__ == "__main__":
    main()
