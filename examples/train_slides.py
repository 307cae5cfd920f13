"""The main job: train a CNN on 4096 x 4096 "slides" whose labels only show at full resolution.

The script generates its own data set of large grayscale images, stored as tiled TIFF files
(as whole-slide images are), and trains a small fully convolutional network on them with
Lightning and ``tilefn.lightning.StreamedModule``: the trunk runs tile by tile at full
resolution, with exact gradients, and the head sees the whole image at once.

The task. Every slide is glass (grey level 236 with scanner noise) around two or three
soft-edged pieces of tissue, about a third of the slide. The tissue is a noisy, textured
background with large bright and dark blobs, sprinkled with thousands of tiny 5 x 5 px "cells"
of three shapes::

    +  plus     x  cross     #  3x3 square      (9 bright pixels each)

On a class-1 slide, 50 to 100 % of the cells are pluses; a class-0 slide has no plus at all
(those cells are crosses instead). Everything else (tissue, background, blobs, where each
cell lies, its brightness) is drawn the same way for both classes: ``make_slide(size, 0,
seed)`` and ``make_slide(size, 1, seed)`` differ only in the shape of some cells.

Background. As a pathology pipeline does, each slide's tissue is found on a thumbnail
(``tilefn.slides.tissue_mask``) and the glass is set to one value, lazily
(``tilefn.slides.MaskedImage``). The streamed trunk then computes each class of equal
background crops once, exactly (``skip_constant``, on by default); every epoch prints how many
crops were skipped, and the run times one training step with and without skipping.

Why downsampling fails. All three shapes have the same number of pixels and the same
brightness, so averaging 16 x 16 blocks, i.e. shrinking a 4096 px slide to the 256 px that a
plain CNN could train on, maps a plus and a cross to the same blurred dot: the two classes of a
pair then differ by about one grey level in a few blocks, far below the texture of the background.
The shape is only visible at (nearly) full resolution. To show it, the script ends by training
the same network on the 16x-downsampled slides: it stays at chance (``--no-downsample-baseline``
skips this).

The model. A trunk of four convolutions (15k parameters) with an early stride; its
first convolution has zero-mean kernels (``HighPassConv2d``), so it is blind to the slowly
varying background from the start. The head takes the global max of each feature map ("is
there such a structure anywhere?"), standardises it with running statistics (a batch of one
slide has no batch statistics) and applies a linear layer.

Run::

    python examples/train_slides.py                           # 4096 px slides, ~8 min on 2 cores
    python examples/train_slides.py --size 8192               # 4x the pixels, same tile memory
    python examples/train_slides.py --size 512 --n-train 4 --n-val 4 --epochs 1   # smoke test

The data are generated once into ``--data-dir`` (about 16 MiB per 4096 px slide) and reused.
The last line reads ``FINAL val_acc=... (chance 0.50)``; at ``--size 4096`` and above the
script exits with status 1 if the validation accuracy is below ``--min-acc``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset

import tilefn
import tilefn.lightning
from tilefn.lightning import StreamedModule, TrainingInterrupted
from tilefn.slides import MaskedImage, tissue_mask

# ----------------------------------------------------------------------------------------
# Synthetic slides
# ----------------------------------------------------------------------------------------

#: Cell shapes as (dy, dx) offsets from the cell centre: 9 pixels each, all within 5 x 5 px.
GLYPHS = {
    "square": [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
    "cross": [(d, d) for d in range(-2, 3)] + [(d, -d) for d in (-2, -1, 1, 2)],
    "plus": [(d, 0) for d in range(-2, 3)] + [(0, d) for d in (-2, -1, 1, 2)],
}
KINDS = ("square", "cross", "plus")  # kind codes 0, 1, 2 in the marks returned by make_slide
CELLS_PER_MPX = 8000 / 4096**2  # cell density: 8000 cells on a 4096 x 4096 slide
GRID = 32  # at most one cell per 32 x 32 px grid square, so cells never overlap
# Pixel statistics of the tissue (on the 0..1 scale), for normalize=; the glass around it is
# masked to one constant, which the high-pass first layer does not see.
MEAN, STD = 0.47, 0.16
GLASS = 236  # grey level of the glass around the tissue (with a little noise, as scanned)
TISSUE_THRESHOLD = 30  # tissue_mask darkness threshold: thumbnail blocks darker than 225
GENERATOR_VERSION = 2  # bump when make_slide changes, so that old data sets are regenerated


def _background(gen: torch.Generator, size: int) -> torch.Tensor:
    """Smooth "tissue" texture at scales of 512, 64 and 8 px, grey level around 120.

    Built as a pyramid (noise, upsample x8, add noise, ...) so that only the last bilinear
    upsampling runs at full resolution.
    """
    n = -(-size // 512) + 2
    field = torch.randn(1, 1, n, n, generator=gen) * 35
    for amplitude in (14, 7):
        field = F.interpolate(field, scale_factor=8, mode="bilinear", align_corners=False)
        field += torch.randn(field.shape, generator=gen) * amplitude
    field = F.interpolate(field, scale_factor=8, mode="bilinear", align_corners=False)
    off = (field.shape[-1] - size) // 2
    return field[0, 0, off : off + size, off : off + size] + 120


def make_slide(size: int, label: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic slide: ``(image, marks)``.

    ``image`` is a ``(size, size)`` uint8 array. ``marks`` is an ``(n, 3)`` int array of
    ``(y, x, kind)`` per cell (kind indexes :data:`KINDS`). Deterministic in ``seed``; the
    label changes nothing but the shape of the class cells (plus for 1, cross for 0).
    """
    if size < 2 * GRID:
        raise ValueError(f"make_slide: size must be at least {2 * GRID}, got {size}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    image = _background(gen, size).contiguous()
    image.add_(torch.randn(size, size, generator=gen), alpha=10.0)  # pixel noise
    pixels = image.numpy()  # shares memory with `image`

    # Large bright and dark blobs: soft-edged ellipses, radius 40-260 px (scaled down on
    # small slides), about 12 per 4096 x 4096 px.
    area = size * size / 4096**2
    for _ in range(max(1, rng.poisson(12 * area))):
        radius = rng.uniform(40, 260) * min(1.0, size / 1024)
        a, b = radius, radius * rng.uniform(0.5, 1.0)
        theta = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0, size, 2)
        contrast = rng.choice([-1, 1]) * rng.uniform(30, 70)
        h = int(radius) + 8
        y0, y1 = max(0, int(cy) - h), min(size, int(cy) + h)
        x0, x1 = max(0, int(cx) - h), min(size, int(cx) + h)
        if y1 <= y0 or x1 <= x0:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        u = (np.cos(theta) * xx + np.sin(theta) * yy) / a
        v = (-np.sin(theta) * xx + np.cos(theta) * yy) / b
        pixels[y0:y1, x0:x1] += contrast / (1 + np.exp(12 * (np.sqrt(u * u + v * v) - 1)))

    # Tissue: two or three overlapping ellipses covering about a third of the slide, fading
    # into the glass (grey level GLASS with scanner noise) over a few dozen pixels.
    tissue = _tissue(rng, size)

    # Cells: at most one per grid square well inside the tissue, 5 px away from its edges.
    n_grid = size // GRID
    inside = tissue[GRID // 2 :: GRID, GRID // 2 :: GRID][:n_grid, :n_grid] > 0.999
    squares = np.flatnonzero(inside)
    n_cells = min(max(2, round(CELLS_PER_MPX * size * size * inside.mean())), len(squares))
    where = rng.choice(squares, n_cells, replace=False)
    ys = (where // n_grid) * GRID + rng.integers(5, GRID - 5, n_cells)
    xs = (where % n_grid) * GRID + rng.integers(5, GRID - 5, n_cells)
    kinds = rng.integers(0, 2, n_cells)  # background cells: squares and crosses
    n_class = max(1, round(rng.uniform(0.5, 1.0) * n_cells))
    kinds[:n_class] = KINDS.index("plus" if label else "cross")  # the class cells
    brightness = rng.uniform(45, 75, n_cells).astype(np.float32)
    for k, name in enumerate(KINDS):
        sel = kinds == k
        offsets = np.array(GLYPHS[name])
        rows = ys[sel, None] + offsets[None, :, 0]
        cols = xs[sel, None] + offsets[None, :, 1]
        pixels[rows, cols] += brightness[sel, None]

    glass = GLASS + rng.normal(0, 2, (size, size)).astype(np.float32)
    pixels *= tissue
    pixels += (1 - tissue) * glass
    out = image.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out, np.stack([ys, xs, kinds], axis=1)


def _tissue(rng: np.random.Generator, size: int) -> np.ndarray:
    """How much tissue each pixel holds (0: glass, 1: tissue), a float ``(size, size)`` map:
    2 or 3 random ellipses with soft edges (about 1 % of their radius)."""
    yy = np.arange(size, dtype=np.float32)[:, None] / size
    xx = np.arange(size, dtype=np.float32)[None, :] / size
    tissue = np.zeros((size, size), np.float32)
    n = int(rng.integers(2, 4))
    for _ in range(n):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        a = np.sqrt(0.4 / n / np.pi) * rng.uniform(0.9, 1.3)
        b = 0.4 / n / np.pi / a
        theta = rng.uniform(0, np.pi)
        u = (np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)) / a
        v = (-np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)) / b
        r = np.sqrt(u * u + v * v)
        np.maximum(tissue, 1 / (1 + np.exp(np.clip(60 * (r - 1), -50, 50))), out=tissue)
    return tissue


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Block mean over ``factor x factor`` pixels (what an area-resampling resize does)."""
    h, w = (s // factor * factor for s in image.shape)
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float64)


def slide_seed(seed: int, split: str, index: int) -> int:
    """The generator seed of slide ``index`` of ``split``: independent across splits."""
    return int(
        np.random.SeedSequence([seed, ("train", "val").index(split), index]).generate_state(1)[0]
    )


def _write_slide(path: str, size: int, label: int, seed: int) -> None:
    torch.set_num_threads(1)
    image, _ = make_slide(size, label, seed)
    tmp = f"{path}.part"
    tifffile.imwrite(tmp, image, tile=(256, 256))
    os.replace(tmp, path)


def generate_dataset(
    data_dir: Path, size: int, n_train: int, n_val: int, seed: int, workers: int = 1
) -> dict[str, list[tuple[Path, int]]]:
    """Write the slides as tiled TIFFs under ``data_dir`` (missing ones only); return the
    ``(path, label)`` lists of both splits. Labels alternate 0, 1, 0, 1, ..."""
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = {"size": size, "seed": seed, "generator": GENERATOR_VERSION}
    manifest = data_dir / "settings.json"
    if not manifest.exists() or json.loads(manifest.read_text()) != settings:
        for old in data_dir.glob("*.tif"):  # other settings: start afresh
            old.unlink()
        manifest.write_text(json.dumps(settings))
    splits, jobs = {}, []
    for split, n in (("train", n_train), ("val", n_val)):
        splits[split] = []
        for i in range(n):
            label = i % 2
            path = data_dir / f"{split}_{i:04d}_class{label}.tif"
            splits[split].append((path, label))
            if not path.exists():
                jobs.append((str(path), size, label, slide_seed(seed, split, i)))
    if jobs:
        t0 = time.perf_counter()
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_slide, *zip(*jobs)))
        else:
            for job in jobs:
                _write_slide(*job)
        print(
            f"generated {len(jobs)} slides of {size}x{size} px in {data_dir} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    else:
        print(f"reusing {n_train + n_val} slides of {size}x{size} px in {data_dir}")
    return splits


class SlideDataset(Dataset):
    """Reads one tiled TIFF per item: ``(image, label)``.

    At full resolution the image is a ``tilefn.slides.MaskedImage``: the tissue is found on a
    32x-smaller thumbnail (``tissue_mask``) and the glass around it reads as one constant
    (255), crop by crop, so that the streamed trunk computes each class of equal background
    crops once (exactly; ``skip_constant``). With ``augment=True`` each read is randomly
    rotated by a multiple of 90 degrees and flipped (the three cell shapes are symmetric, so
    the label is unchanged). ``downsample`` block-averages by that factor instead (for the
    low-resolution baseline, a uint8 tensor ``(1, H, W)``).
    """

    def __init__(self, items: list[tuple[Path, int]], augment: bool = False, downsample: int = 1):
        self.items, self.augment, self.factor = items, augment, downsample

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        image = tifffile.imread(path)
        if self.augment:
            k, flip = int(torch.randint(4, ())), bool(torch.randint(2, ()))
            image = np.rot90(image, k)
            image = image[:, ::-1] if flip else image
        image = np.ascontiguousarray(image)
        if self.factor > 1:
            small = np.round(downsample(image, self.factor)).astype(np.uint8)
            return torch.from_numpy(small)[None], label
        mask = tissue_mask(image, factor=32, threshold=TISSUE_THRESHOLD)
        return MaskedImage(image, mask), label


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------


class HighPassConv2d(nn.Conv2d):
    """A convolution whose kernels always sum to zero: blind to constant (and slowly varying)
    brightness, so from the first step it responds to small structures, not to the background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, weight, self.bias)


class RunningStandardize(nn.Module):
    """Standardises ``(N, C)`` features with running mean and variance, in training too.

    BatchNorm needs batch statistics to train, and a batch of one slide has none; this keeps
    BatchNorm-like running statistics (a cumulative average for the first ``1 / momentum``
    updates, an exponential one after) and always normalises with them.
    """

    def __init__(self, num_features: int, momentum: float = 0.05, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.num_updates += 1
                m = max(self.momentum, 1.0 / float(self.num_updates))
                delta = x.detach().mean(0) - self.running_mean
                self.running_mean += m * delta
                self.running_var.copy_((1 - m) * (self.running_var + m * delta**2))
        return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)


def build_model(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    """``(trunk, head)``. The trunk has output stride 16 (4096 px -> 256 px feature maps)."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        HighPassConv2d(1, 8, 5, stride=2, padding=2),  # sees a whole 5 x 5 cell
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
    )
    for m in trunk:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    linear = nn.Linear(32, 2)
    nn.init.zeros_(linear.weight)  # start at p = 0.5 for both classes
    head = nn.Sequential(
        nn.AdaptiveMaxPool2d(1),  # "is there such a structure anywhere?"
        nn.Flatten(),
        RunningStandardize(32),
        linear,
    )
    return trunk, head


# ----------------------------------------------------------------------------------------
# Training with Lightning
# ----------------------------------------------------------------------------------------


class SlideClassifier(StreamedModule):
    """tilefn's Lightning adapter, with its own optimizer: the head learns 10x faster (its
    inputs are standardised, its weights start at zero) and a one-cycle schedule."""

    def __init__(self, trunk, head, *, tile: int, lr: float, head_lr_mult: float, steps: int):
        super().__init__(
            trunk,
            head,
            F.cross_entropy,
            tile_size=tile,
            normalize=((MEAN,), (STD,)),  # the slides stay uint8 until each tile is processed
            metrics={"acc": torchmetrics.Accuracy(task="multiclass", num_classes=2)},
        )
        self.lr, self.head_lr_mult, self.steps = lr, head_lr_mult, steps

    def configure_optimizers(self):
        groups = [
            {"params": self.trunk.parameters(), "lr": self.lr},
            {"params": self.head.parameters(), "lr": self.lr * self.head_lr_mult},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in groups],
            total_steps=max(self.steps, 2),
            pct_start=0.1,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class EpochReport(L.Callback):
    """Prints one line per epoch, after the epoch's validation, and how many crops the streamed
    trunk computed and skipped (constant background) in the epoch's training steps."""

    def __init__(self, report_crops: bool = True) -> None:
        self.t0 = time.perf_counter()
        self.report_crops = report_crops
        self.crops = {"forward": [0, 0], "backward": [0, 0]}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        stats = getattr(module.trunk, "last_stats", {})
        for kind, (seen, computed) in list(self.crops.items()):
            if kind in stats:
                self.crops[kind] = [seen + stats[kind].crops, computed + stats[kind].computed]

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        module.print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: "
            f"train_loss {m.get('train_loss_epoch', math.nan):.4f}  "
            f"train_acc {m.get('train_acc', math.nan):.3f}  "
            f"val_loss {m.get('val_loss', math.nan):.4f}  "
            f"val_acc {m.get('val_acc', math.nan):.3f}  "
            f"({time.perf_counter() - self.t0:.0f} s)"
        )
        (fs, fc), (bs, bc) = self.crops["forward"], self.crops["backward"]
        if fs and self.report_crops:
            module.print(
                f"  crops in training: forward computed {fc} of {fs}, backward {bc} of {bs} "
                f"({fs - fc + bs - bc} skipped as constant background, "
                f"{100 * (fs - fc + bs - bc) / (fs + bs):.0f} %)"
            )
        self.crops = {"forward": [0, 0], "backward": [0, 0]}


def fit(splits, args, *, downsample_factor: int = 1) -> float:
    """Train a fresh model on ``splits``; return the final validation accuracy."""
    size = args.size // downsample_factor
    trunk, head = build_model(args.seed)
    train = SlideDataset(splits["train"], augment=True, downsample=downsample_factor)
    val = SlideDataset(splits["val"], downsample=downsample_factor)
    gen = torch.Generator().manual_seed(args.seed)
    # Masked slides are lazy images: tilefn.collate passes them on (batch size 1) and collates
    # the labels; the downsampled baseline has plain tensors.
    collate = tilefn.collate if downsample_factor == 1 else None
    train_loader = DataLoader(train, batch_size=1, shuffle=True, generator=gen, collate_fn=collate)
    val_loader = DataLoader(val, batch_size=1, collate_fn=collate)
    module = SlideClassifier(
        trunk,
        head,
        tile=args.tile,
        lr=args.lr,
        head_lr_mult=args.head_lr_mult,
        steps=args.epochs * len(train),
    )
    if downsample_factor == 1:
        print(module.trunk.plan((1, 1, size, size)))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[EpochReport(report_crops=downsample_factor == 1)],
    )
    # run() fails loudly when fit ends unfinished (Lightning ends a SIGTERM with status 0).
    tilefn.lightning.run(trainer.fit, module, train_loader, val_loader)
    if downsample_factor == 1 and args.save:
        torch.save(
            {"trunk": trunk.state_dict(), "head": head.state_dict(), "size": args.size},
            args.save,
        )
        print(f"saved the trained model to {args.save}")
    if downsample_factor == 1:
        time_saved(trunk, head, val[0][0], args.tile)
    return float(trainer.callback_metrics["val_acc"])


def time_saved(trunk: nn.Module, head: nn.Module, image, tile: int) -> None:
    """Time one training step on one masked slide with background skipping and without (same
    weights, same slide, same gradients), and print both."""
    trunk, head = copy.deepcopy(trunk), copy.deepcopy(head).eval()  # no side effects
    times = {}
    for skip in (True, False):
        backbone, _ = tilefn.streamify(trunk, tile, normalize=((MEAN,), (STD,)), skip_constant=skip)
        backbone.plan(image)  # plan outside the timing
        t0 = time.perf_counter()
        loss = F.cross_entropy(head(backbone(image)), torch.tensor([0]))
        loss.backward()
        times[skip] = time.perf_counter() - t0
        trunk.zero_grad(), head.zero_grad()
    saved = 1 - times[True] / times[False]
    print(
        f"background skipping: a training step on one validation slide takes {times[True]:.1f} s, "
        f"{times[False]:.1f} s without (skip_constant=False): {100 * saved:.0f} % saved"
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a streamed CNN (tilefn + Lightning) on synthetic 4096x4096 slides "
        "whose class is only visible at full resolution.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--size", type=int, default=4096, help="slide side in pixels")
    p.add_argument("--tile", type=int, default=1024, help="tile_size for tilefn")
    p.add_argument("--n-train", type=int, default=64, help="training slides")
    p.add_argument("--n-val", type=int, default=32, help="validation slides (balanced)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate of the trunk")
    p.add_argument(
        "--head-lr-mult", type=float, default=10.0, help="head learning rate / trunk learning rate"
    )
    p.add_argument("--data-dir", default="slides_data", help="where the TIFF slides are kept")
    p.add_argument("--seed", type=int, default=0, help="seed for the data and the weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument(
        "--save", default=None, help="write the trained weights here (default: DATA_DIR/model.pt)"
    )
    p.add_argument(
        "--min-acc",
        type=float,
        default=None,
        help="exit with status 1 below this validation accuracy (default: 0.8 at --size 4096 "
        "and above, not checked on smaller slides)",
    )
    p.add_argument(
        "--downsample-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the same network on the slides downsampled 16x, to show that it stays "
        "at chance there",
    )
    args = p.parse_args(argv)
    if args.save is None:
        args.save = str(Path(args.data_dir) / "model.pt")
    if args.min_acc is None:
        args.min_acc = 0.8 if args.size >= 4096 else 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6 with torch >= 2.10 trips over its own pytree deprecation: not ours to fix.
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available: ..." etc.
    t0 = time.perf_counter()

    splits = generate_dataset(
        Path(args.data_dir),
        args.size,
        args.n_train,
        args.n_val,
        args.seed,
        workers=args.threads or torch.get_num_threads(),
    )
    t_data = time.perf_counter() - t0
    print(
        f"training on {args.n_train} slides of {args.size}x{args.size} px (uint8, tiled TIFF), "
        f"validating on {args.n_val}; tile {args.tile}, {args.epochs} epochs, "
        f"{torch.get_num_threads()} threads"
    )
    try:
        val_acc = fit(splits, args)
        t_train = time.perf_counter() - t0 - t_data
        if args.downsample_baseline:
            factor = 16
            print(f"baseline: the same network on the slides downsampled {factor}x")
            base_acc = fit(splits, args, downsample_factor=factor)
    except TrainingInterrupted as err:
        print(f"INTERRUPTED: {err}; no FINAL result.", file=sys.stderr)
        return err.exit_code

    if args.downsample_baseline:
        print(
            f"BASELINE {args.size // factor}x{args.size // factor} px (downsampled {factor}x): "
            f"val_acc={base_acc:.3f} (chance 0.50, give or take {0.5 / math.sqrt(args.n_val):.2f} "
            f"on {args.n_val} slides)"
        )

    elapsed = time.perf_counter() - t0
    print(
        f"time: {elapsed:.0f} s in all ({t_data:.0f} s data, {t_train:.0f} s training and "
        f"validation at full resolution)"
    )
    print(f"FINAL val_acc={val_acc:.3f} (chance 0.50) on {args.n_val} slides of {args.size} px")
    if val_acc < args.min_acc:
        print(f"FAILED: val_acc {val_acc:.3f} < --min-acc {args.min_acc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
