"""Reading ahead (option ``prefetch``), measured: a streamed forward and a training step over a
compressed, tiled TIFF slide read lazily through ``tilefn.slides.open_tiff``, with
``prefetch=0`` (each crop read and decoded when needed) and ``prefetch=1`` (the next crop read
in a background thread while the model computes), timed alternately in one process.

    python benchmarks/prefetch.py                    # 4096^2 RGB, zlib tiles of 256, tile 1024
    python benchmarks/prefetch.py --model resnet18 --size 2048

It also reports the time to read every crop once without computing anything, which bounds
what overlapping can save. (The default, ``prefetch=None``, picks 1 only when a core is free
for the reader: compare ``--threads 1`` and ``--threads 2`` on a 2-core machine.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _systems import build_trunk  # noqa: E402

import tilefn  # noqa: E402
import tilefn.slides  # noqa: E402


def write_slide(path: Path, size: int, compression: str) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    # Smooth texture plus noise: compresses like tissue, not like random bytes.
    coarse = rng.integers(60, 220, (size // 64 + 1, size // 64 + 1, 3)).astype(np.uint8)
    image = np.repeat(np.repeat(coarse, 64, 0), 64, 1)[:size, :size]
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, image, tile=(256, 256), compression=compression, photometric="rgb")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--compression", default="zlib")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    trunk = build_trunk(args.model)
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        write_slide(path, args.size, args.compression)
        mib = path.stat().st_size / 2**20
        with tilefn.slides.open_tiff(path) as image:
            plan = tilefn.plan(trunk, image.shape, args.tile)
            t0 = time.perf_counter()
            for crop in plan.crops:
                image.read(crop.box)
            read_s = time.perf_counter() - t0
            times: dict[tuple[str, int], list[float]] = {}
            backbones = {
                k: tilefn.streamify(trunk, args.tile, normalize=norm, prefetch=k)[0] for k in (0, 1)
            }
            for _ in range(args.repeats + 1):  # the first round warms up
                for k, backbone in backbones.items():
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        backbone(image)
                    times.setdefault(("forward", k), []).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    backbone(image).float().square().mean().backward()
                    times.setdefault(("train step", k), []).append(time.perf_counter() - t0)
    print(
        f"{args.size}² RGB {args.compression} TIFF ({mib:.0f} MiB), {args.model} trunk, tile "
        f"{args.tile} ({plan.n_tiles} crops), {args.threads} threads; reading every crop once "
        f"takes {read_s:.2f} s"
    )
    print("| pass | prefetch=0 (s) | prefetch=1 (s) | ratio |")
    print("|---|---|---|---|")
    for kind in ("forward", "train step"):
        a, b = (min(times[(kind, k)][1:]) for k in (0, 1))
        print(f"| {kind} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
