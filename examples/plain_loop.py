"""Train a streamed ResNet-18 with a plain PyTorch loop: no framework, no subclassing.

Three calls set it up:

1. ``trunk, head = tilefn.split(model, num_classes=2)`` cuts a torchvision ResNet-18 into
   the local trunk (convolutions, pooling, residual blocks) and the global head (average
   pooling, flatten and a fresh 2-class linear layer). Both share the model's modules.
2. ``backbone, _ = tilefn.streamify(trunk, tile_size, normalize=...)`` makes a trunk that
   runs tile by tile; ``backbone(x)`` equals ``trunk(x)`` and ``loss.backward()`` through it
   gives the exact gradients, while memory depends on the tile size only.
3. ``torch.optim.AdamW`` over the trunk's and the head's parameters.

The rest is the training loop you would write for any model. The data are synthetic and
generated in memory: uint8 images with smooth random "tissue"; class 1 images also carry a
few small bright spots, which only a network looking at full resolution can see.

Note: inside the streamed trunk, BatchNorm layers always use their running statistics
(eval semantics), even in ``train()`` mode; their weight and bias still get exact gradients.
With random weights and a handful of steps the loss stays near ln 2 = 0.69: this demo shows
the loop, not a converged model. For real work start from pretrained weights
(``resnet18(weights="DEFAULT")``), whose BatchNorm statistics are meaningful.

Run::

    python examples/plain_loop.py                   # 1024x1024 images, tile 768, ~1-2 min on CPU
    python examples/plain_loop.py --size 2048 --tile 1024 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import tilefn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def synthetic_dataset(n: int, size: int, seed: int = 0) -> TensorDataset:
    """``n`` uint8 images (3, size, size), labels alternating 0, 1; class 1 has bright spots."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        coarse = torch.rand(1, 3, 8, 8, generator=g)
        image = (
            150 * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
        )
        image += 40 * torch.rand(3, size, size, generator=g)
        if labels[i] == 1:  # eight spots, each 4% of the image side across
            for cy, cx in (torch.rand(4, 2, generator=g) * size).tolist():
                spot = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.01 * size) ** 2
                image[:, spot] = 255.0
        images[i] = image.clamp(0, 255).to(torch.uint8)
    return TensorDataset(images, labels)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train a streamed ResNet-18 (tilefn.split + tilefn.streamify) with a "
        "plain PyTorch loop on synthetic large images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--tile", type=int, default=768, help="tile_size passed to tilefn.streamify")
    p.add_argument("--steps", type=int, default=2, help="images (= optimizer steps) per epoch")
    p.add_argument("--epochs", type=int, default=2, help="passes over the data")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--device", default="cpu", help="compute device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    t_start = time.perf_counter()

    # The setup: split, streamify, optimizer.
    # zero_init_residual: every residual block starts as the identity, which keeps a network
    # trained from scratch stable while its BatchNorm layers run on fixed statistics.
    model = torchvision.models.resnet18(weights=None, zero_init_residual=True)
    trunk, head = tilefn.split(model, num_classes=2)
    trunk.to(device)
    head.to(device)
    backbone, _ = tilefn.streamify(
        trunk, args.tile, normalize=(IMAGENET_MEAN, IMAGENET_STD), device=device
    )
    optimizer = torch.optim.AdamW([*trunk.parameters(), *head.parameters()], lr=args.lr)
    data = synthetic_dataset(args.steps, args.size, args.seed)  # images stay uint8 on the CPU
    loader = DataLoader(data, batch_size=1, shuffle=True)
    print(f"{len(data)} images {args.size}x{args.size}, tile {args.tile}, device {device}")
    print(backbone.plan((1, 3, args.size, args.size)))

    # The loop: nothing tilefn-specific in it.
    for epoch in range(1, args.epochs + 1):
        trunk.train()
        head.train()
        for step, (image, label) in enumerate(loader, 1):
            t0 = time.perf_counter()
            logits = head(backbone(image))
            loss = F.cross_entropy(logits, label.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            dt = time.perf_counter() - t0
            print(f"epoch {epoch} step {step}/{len(loader)}: loss {loss.item():.4f} ({dt:.1f} s)")

    # Inference: the same backbone, without gradients.
    trunk.eval()
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(backbone(image[None])) for image, _ in data])
    accuracy = (logits.argmax(1).cpu() == data.tensors[1]).float().mean().item()
    print(f"train accuracy {accuracy:.2f} ({len(data)} images)")
    print(f"done in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
