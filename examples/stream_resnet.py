"""Train a ResNet-18 on a large image with tilefn, then check it against the plain model.

The trunk of a torchvision ResNet-18 (everything before global pooling) is streamed tile by
tile with ``tilefn.streamify``; the head (global average pooling + a linear layer) runs on the
small stitched feature map as usual. The training loop is plain PyTorch:
``head(backbone(x)) -> cross-entropy -> loss.backward() -> opt.step()``.

At the end the script repeats one training step in float64 at a smaller size, streamed and
plain, and asserts that the output, every parameter gradient and the input gradient agree to
within 1e-9 (relative).

Run::

    python examples/stream_resnet.py                       # 2048x2048 image, tile 1024
    python examples/stream_resnet.py --size 4096 --steps 1
    python examples/stream_resnet.py --measure-memory      # peak RSS: plain model vs tilefn

Note: inside the streamed trunk, BatchNorm layers always use their running statistics (eval
semantics), even after ``model.train()``; their weight and bias still get exact gradients.
The plain reference in the check therefore runs the trunk in eval mode.
"""

from __future__ import annotations

import argparse
import copy
import re
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tilefn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = 1e-9


def build_model(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    """Return ``(trunk, head)`` of a randomly initialised ResNet-18 with two classes."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 2))
    return trunk, head


def synthetic_image(size: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, size, size) uint8 image: smooth random "tissue" blobs plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 16, 16, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = torch.rand(1, 3, size, size, generator=g)
    return (200 * smooth + 55 * noise).clamp(0, 255).to(torch.uint8)


def normalize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ``streamify(..., normalize=(mean, std))`` does per crop, on the whole image."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1)
    return (x.to(dtype) / 255 - mean) / std


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------------------
# The main job: a few SGD steps on a big image, streamed.
# --------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    trunk, head = build_model(args.seed)
    trunk.to(device, dtype).train()  # BatchNorm still uses running statistics in the trunk
    head.to(device, dtype).train()

    x = synthetic_image(args.size, args.seed)  # uint8, stays on the CPU
    label = torch.tensor([1], device=device)

    backbone, _ = tilefn.streamify(
        trunk,
        args.tile,
        normalize=(IMAGENET_MEAN, IMAGENET_STD),
        verbose=args.verbose,
        deterministic=args.deterministic,
        device=device,
    )
    print(f"image {tuple(x.shape)} {x.dtype}, model {args.dtype} on {device}, tile {args.tile}")
    print(backbone.plan(x.shape))

    params = list(trunk.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = head(backbone(x))
        loss = F.cross_entropy(logits, label)
        loss.backward()
        opt.step()
        print(
            f"step {step}/{args.steps}: loss {loss.item():.6f} ({time.perf_counter() - t0:.1f} s)"
        )


# --------------------------------------------------------------------------------------
# Exactness check: streamed vs plain, float64, at a smaller size.
# --------------------------------------------------------------------------------------


def pick_check_tile(trunk: nn.Module, shape: tuple[int, ...]) -> int:
    """A tile just above the smallest one tilefn accepts, so that the check really tiles."""
    one_tile = tilefn.plan(trunk, shape, max(shape[2:]))
    return min(max(one_tile.min_tile_size) + max(one_tile.alignment), max(shape[2:]))


def check_exactness(args: argparse.Namespace) -> None:
    size = args.check_size
    trunk, head = build_model(args.seed)
    trunk.double().eval()  # the reference: BatchNorm with running statistics
    head.double()
    shape = (1, 3, size, size)
    tile = args.check_tile or pick_check_tile(trunk, shape)

    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    label = torch.tensor([1])

    # Plain model.
    x_ref = x.clone().requires_grad_(True)
    feats_ref = trunk(x_ref)
    loss_ref = F.cross_entropy(head(feats_ref), label)
    (cotangent,) = torch.autograd.grad(loss_ref, feats_ref, retain_graph=True)
    loss_ref.backward()
    ref_grads = {n: p.grad for n, p in trunk.named_parameters()}

    # Streamed: a fresh copy with the same weights, through loss.backward().
    s_trunk, s_head = copy.deepcopy(trunk), copy.deepcopy(head)
    for p in list(s_trunk.parameters()) + list(s_head.parameters()):
        p.grad = None
    backbone, streamed_vjp = tilefn.streamify(s_trunk, tile, saliency=True)
    plan = backbone.plan(x.shape)
    x_s = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    feats = backbone(x_s)
    loss = F.cross_entropy(s_head(feats), label)
    loss.backward()
    elapsed = time.perf_counter() - t0

    errors = {
        "output": rel_error(feats.detach(), feats_ref.detach()),
        "param grads": max(rel_error(p.grad, ref_grads[n]) for n, p in s_trunk.named_parameters()),
        "head grads": max(
            rel_error(p.grad, q.grad)
            for p, q in zip(s_head.parameters(), head.parameters(), strict=True)
        ),
        "input grad": rel_error(x_s.grad, x_ref.grad),
    }

    # Streamed, functional: streamed_vjp(x, cotangent) -> (param_grads, input_grad).
    param_grads, input_grad = streamed_vjp(x, cotangent)
    if set(param_grads) != set(ref_grads):
        raise AssertionError(f"vjp keys differ: {sorted(set(param_grads) ^ set(ref_grads))}")
    errors["vjp param grads"] = max(rel_error(param_grads[n], ref_grads[n]) for n in ref_grads)
    errors["vjp input grad"] = rel_error(input_grad, x_ref.grad)

    print(
        f"exactness check: float64, image {size}x{size}, tile {tile}, "
        f"{plan.n_tiles} tiles, overlap {plan.overlap:.2f} ({elapsed:.1f} s streamed)"
    )
    for name, err in errors.items():
        print(f"  {name:<16} max rel. error {err:.2e}")
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE}
    assert not bad, f"streamed result differs from the plain model: {bad}"
    print(f"OK: every error < {TOLERANCE:g}")


# --------------------------------------------------------------------------------------
# Peak memory: one training step in a fresh process, plain vs tilefn.
# --------------------------------------------------------------------------------------


def mem_child(mode: str, args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    trunk, head = build_model(args.seed)
    trunk.to(dtype).eval()
    head.to(dtype)
    x = synthetic_image(args.size, args.seed)
    label = torch.tensor([1])
    if mode == "plain":
        loss = F.cross_entropy(head(trunk(normalize(x, dtype))), label)
        loss.backward()
    elif mode == "tilefn":
        backbone, _ = tilefn.streamify(trunk, args.tile, normalize=(IMAGENET_MEAN, IMAGENET_STD))
        loss = F.cross_entropy(head(backbone(x)), label)
        loss.backward()
    # mode == "baseline": imports, model and image only.
    print(f"peak_rss_kib {peak_rss_kib()}")


def peak_rss_kib() -> int:
    """Peak resident set size of this process, in KiB.

    On Linux, ``ru_maxrss`` of a freshly exec'd child also counts the peak of the process
    that spawned it (the kernel carries the old address space's high-water mark across
    ``exec``), so prefer ``VmHWM``, the high-water mark of this process's own memory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB elsewhere


def measure_memory(args: argparse.Namespace) -> None:
    print(f"peak resident memory of one training step, {args.size}x{args.size} {args.dtype}:")
    results = {}
    for mode in ("baseline", "plain", "tilefn"):
        cmd = [sys.executable, __file__, "--_mem-child", mode]
        cmd += ["--size", str(args.size), "--tile", str(args.tile), "--dtype", args.dtype]
        cmd += ["--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        match = re.search(r"peak_rss_kib (\d+)", proc.stdout)
        if proc.returncode != 0 or match is None:
            print(f"  {mode:<9} failed (exit code {proc.returncode}):\n{proc.stderr[-2000:]}")
            continue
        results[mode] = int(match.group(1)) / 1024
    base = results.get("baseline", 0.0)
    for mode, mib in results.items():
        extra = "" if mode == "baseline" else f"  (+{mib - base:,.0f} MiB over baseline)"
        print(f"  {mode:<9} {mib:>9,.0f} MiB{extra}")


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a streamed ResNet-18 on a synthetic large image with tilefn, "
        "then check the streamed result against the plain model in float64.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", type=int, default=2048, help="image side in pixels")
    p.add_argument("--tile", type=int, default=1024, help="tile_size passed to tilefn.streamify")
    p.add_argument("--steps", type=int, default=3, help="SGD steps on the big image")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="training dtype")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate")
    p.add_argument("--device", default="cpu", help="compute device, e.g. cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data")
    p.add_argument("--verbose", action="store_true", help="progress bar over tiles")
    p.add_argument("--deterministic", action="store_true", help="bit-reproducible gradients")
    p.add_argument(
        "--check-size", type=int, default=512, help="image side of the float64 exactness check"
    )
    p.add_argument(
        "--check-tile",
        type=int,
        default=None,
        help="tile of the exactness check (default: the minimum tile size plus the alignment)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the float64 exactness check")
    p.add_argument(
        "--measure-memory",
        action="store_true",
        help="also report the peak RSS of one training step, plain model vs tilefn, at --size",
    )
    p.add_argument("--_mem-child", choices=["baseline", "plain", "tilefn"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._mem_child:
        mem_child(args._mem_child, args)
        return
    t0 = time.perf_counter()
    train(args)
    if args.measure_memory:
        measure_memory(args)
    if not args.no_check:
        check_exactness(args)
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
