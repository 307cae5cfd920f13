"""Train a streamed ResNet-18 with Lightning: ``Trainer`` + ``tilefn.lightning.StreamedModule``.

The torchvision ResNet-18 (random weights) is split into a streamable trunk and a global head
with ``tilefn.split``; the adapter streams the trunk tile by tile and runs the head normally.
The rest is ordinary Lightning: metrics, gradient accumulation over single-image batches,
gradient clipping, a learning-rate schedule, checkpoints, ``trainer.test`` and resuming.

The data are generated in memory: images whose class is the orientation of a fine stripe
texture (horizontal or vertical stripes with a period of a few pixels) under noise.

    python examples/lightning_resnet.py                  # 1024 x 1024 images, tile 768
    python examples/lightning_resnet.py --size 2048 --tile 1024 --epochs 3
    python examples/lightning_resnet.py --resume runs/lightning_resnet/checkpoints/last.ckpt --epochs 4

About two minutes on two CPU cores at the default size.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings

import lightning as L
import torch
import torchmetrics
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

import tilefn
import tilefn.lightning
from tilefn.lightning import StreamedModule


class Stripes(Dataset):
    """``n`` noisy images with horizontal (class 0) or vertical (class 1) stripes."""

    def __init__(self, n: int, size: int, seed: int):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        label = i % 2
        period = 4 + int(torch.randint(0, 4, (), generator=g))
        pos = torch.arange(self.size, dtype=torch.float32)
        stripes = torch.sin(2 * torch.pi * pos / period)
        stripes = stripes[:, None] if label == 0 else stripes[None, :]
        image = 0.5 * stripes.expand(self.size, self.size) + torch.randn(
            3, self.size, self.size, generator=g
        )
        return image, label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--tile", type=int, default=768, help="tile_size (default 768)")
    parser.add_argument("--n-train", type=int, default=8, help="training images (default 8)")
    parser.add_argument("--n-val", type=int, default=4, help="validation images (default 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs (default 2)")
    parser.add_argument("--accumulate", type=int, default=2, help="images per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--out", default="runs/lightning_resnet", help="checkpoint folder")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6 with torch >= 2.10 trips over its own pytree deprecation: not ours to fix.
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    if args.resume:  # resuming writes into the folder of the run it continues
        warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
    torch.manual_seed(0)

    # 1. The network, split into a streamable trunk and a global head. From scratch, start the
    # residual blocks at the identity: BatchNorm runs on fixed (running) statistics in the
    # streamed trunk, so it does not rescale exploding activations as batch statistics would.
    net = torchvision.models.resnet18(weights=None, zero_init_residual=True)
    trunk, head = tilefn.split(net, num_classes=2)

    # 2. The adapter: the trunk is streamed in tiles of at most args.tile pixels.
    module = StreamedModule(
        trunk,
        head,
        nn.functional.cross_entropy,
        tile_size=args.tile,
        optimizer=functools.partial(torch.optim.AdamW, lr=args.lr),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs),
        metrics={"acc": torchmetrics.Accuracy(task="multiclass", num_classes=2)},
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,
    )
    print(module.trunk.plan((1, 3, args.size, args.size)))

    # 3. Plain Lightning from here on.
    train = DataLoader(Stripes(args.n_train, args.size, seed=1), batch_size=1, shuffle=True)
    val = DataLoader(Stripes(args.n_val, args.size, seed=2), batch_size=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        default_root_dir=args.out,
        logger=CSVLogger(args.out),  # metrics.csv per run, next to the checkpoints
        callbacks=[ModelCheckpoint(dirpath=f"{args.out}/checkpoints", save_last=True)],
        log_every_n_steps=1,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    try:  # a SIGTERM (preemption, time limit) must not end the job with status 0
        tilefn.lightning.run(trainer.fit, module, train, val, ckpt_path=args.resume)
        (result,) = tilefn.lightning.run(trainer.test, module, val, verbose=False)
    except tilefn.lightning.TrainingInterrupted as err:
        print(
            f"INTERRUPTED: {err}; resume with --resume {args.out}/checkpoints/last.ckpt",
            file=sys.stderr,
        )
        return err.exit_code
    print(
        f"epochs={trainer.current_epoch} test_loss={result['test_loss']:.4f} "
        f"test_acc={result['test_acc']:.2f} time={time.perf_counter() - start:.0f}s "
        f"checkpoint={args.out}/checkpoints/last.ckpt"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
