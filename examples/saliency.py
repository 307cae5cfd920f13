"""Saliency map of a streamed CNN: which pixels of a 4096 px slide decide its class?

Takes the slide classifier of ``train_slides.py`` (the main example), either trained there and
loaded with ``--checkpoint``, or trained here for about a minute on smaller slides (a plain
PyTorch loop over ``tilefn.streamify``, which is what the Lightning adapter runs). Then, on a
fresh class-1 slide, it computes the gradient of the class score with respect to every input
pixel, streamed tile by tile like the training::

    backbone, _ = tilefn.streamify(trunk, tile_size, saliency=True, normalize=(mean, std))
    x = (image / 255).requires_grad_(True)       # float input: normalize= skips the / 255
    logits = head(backbone(x))
    (logits[0, 1] - logits[0, 0]).backward()     # x.grad is the saliency map

and writes a PNG: (a) the whole slide with the saliency as a heat map (with its colour scale)
and the eight most salient spots numbered on it; (b) those spots enlarged, each as the pixels
next to the saliency, labelled with the kind of cell it lies on. Spots are ranked by the
saliency summed over a cell-sized 5 x 5 window, so whole cells outrank single stray pixels.

What to expect: the head takes the maximum of each feature map, so the gradient flows back
through the strongest response of each feature only, a few dozen places on the slide: the
pluses that argue for class 1 and the crosses (also present on class-1 slides) that argue
against it. With the model the main job trains (val_acc 0.969), on a 4096 px slide, 44 of the
100 most salient pixels lay on cells (which cover 0.7 % of the slide), most of them on
crosses, and 5 of the 8 spots were cells (4 crosses, 1 plus); the others sit in tissue texture
near cells. The slide's corners light up too: there the zero padding meets the constant glass. After the
one-minute training of the default run (2048 px, 160 steps) the map is more diffuse: the spots
land near pluses and crosses, within the trunk's receptive field, more often than on them, and
the labels in panel (b) say so.
The script prints which kinds of cells the most salient pixels and spots lie on.

    python examples/saliency.py                                   # 2048 px, trains ~1 min
    python examples/train_slides.py && python examples/saliency.py --checkpoint slides_data/model.pt --size 4096
    python examples/saliency.py --size 256 --steps 4 --out /tmp/s.png   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tilefn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_slides import (  # noqa: E402
    KINDS,
    MEAN,
    STD,
    TISSUE_THRESHOLD,
    HelpFormatter,
    build_model,
    make_slide,
    slide_seed,
)

from tilefn.slides import MaskedImage, tissue_mask  # noqa: E402

SPOTS = 8  # the most salient cell-sized windows, enlarged beside the overview
CROP = 32  # side of each enlarged crop, in slide pixels
WINDOW = 5  # spots are ranked by the saliency summed over WINDOW x WINDOW px (one cell)
WIDTH, HEIGHT = 1400, 700  # size of the PNG, in pixels


def masked(image: np.ndarray) -> np.ndarray:
    """The slide as the main job trains on it: glass set to 255 outside the tissue mask."""
    mask = tissue_mask(image, factor=32, threshold=TISSUE_THRESHOLD)
    source = MaskedImage(image, mask)
    return source.read([(0, image.shape[0]), (0, image.shape[1])])[0, 0].numpy()


def train_briefly(args: argparse.Namespace):
    """A short plain-PyTorch training run (what StreamedModule does, minus Lightning)."""
    trunk, head = build_model(args.seed)
    backbone, _ = tilefn.streamify(trunk, args.tile, normalize=((MEAN,), (STD,)))
    slides = [
        (
            torch.from_numpy(
                masked(make_slide(args.size, i % 2, slide_seed(args.seed, "train", i))[0])
            ),
            i % 2,
        )
        for i in range(args.n_train)
    ]
    optimizer = torch.optim.AdamW(
        [
            {"params": trunk.parameters(), "lr": args.lr},
            {"params": head.parameters(), "lr": args.lr * 10},
        ],
        weight_decay=1e-4,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[args.lr, args.lr * 10], total_steps=max(args.steps, 2), pct_start=0.1
    )
    g = torch.Generator().manual_seed(args.seed)
    losses, hits = [], []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        image, label = slides[int(torch.randint(len(slides), (), generator=g))]
        x = torch.rot90(image, int(torch.randint(4, (), generator=g)))[None, None].contiguous()
        logits = head(backbone(x))
        loss = F.cross_entropy(logits, torch.tensor([label]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        hits.append(int(logits.argmax().item() == label))
        if step % 20 == 0 or step == args.steps:
            print(
                f"step {step}/{args.steps}: loss {np.mean(losses[-20:]):.3f}, "
                f"accuracy over the last 20 {np.mean(hits[-20:]):.2f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return trunk, head


def load(path: str):
    trunk, head = build_model()
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk.load_state_dict(state["trunk"])
    head.load_state_dict(state["head"])
    print(f"loaded the model trained on {state['size']} px slides from {path}")
    return trunk, head


def top_spots(saliency: np.ndarray, n: int, apart: int) -> list[tuple[int, int]]:
    """Centres of the ``n`` cell-sized windows with the most saliency (summed over WINDOW x
    WINDOW px, so that a whole cell outranks one stray pixel), at least ``apart`` px apart."""
    s = torch.from_numpy(saliency)[None, None]
    summed = F.avg_pool2d(s, WINDOW, stride=1, padding=WINDOW // 2, count_include_pad=False)
    summed = summed[0, 0].numpy()
    spots: list[tuple[int, int]] = []
    width = summed.shape[1]
    for idx in np.argsort(summed, axis=None)[::-1][: 2000 * n]:
        y, x = divmod(int(idx), width)
        if all(max(abs(y - sy), abs(x - sx)) >= apart for sy, sx in spots):
            spots.append((y, x))
            if len(spots) == n:
                break
    return spots


def render(
    image: np.ndarray, saliency: np.ndarray, spots, kinds, title: str, out: str
) -> tuple[int, int]:
    """The figure: (a) the slide with the saliency over it and the spots numbered, with a
    colour scale; (b) each spot enlarged, its pixels beside its saliency, labelled with the
    cell it lies on. Returns the PNG's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    size = image.shape[0]
    scale = max(saliency.max(), 1e-30)
    # Overview: a max-pool keeps single salient pixels visible when 4096 px become ~600.
    k = max(1, size // 512)
    pooled = F.max_pool2d(torch.from_numpy(saliency / scale)[None, None], k, stride=k)[0, 0]
    fig = plt.figure(figsize=(WIDTH / 100, HEIGHT / 100), dpi=100)
    ax = fig.add_axes((0.045, 0.08, 0.42, 0.84))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(0, size, size, 0))
    shown = np.ma.masked_less(pooled.numpy(), 0.02)  # leave the unimportant pixels clear
    im = ax.imshow(shown, cmap="hot", vmin=0, vmax=1, alpha=0.85, extent=(0, size, size, 0))
    box = max(CROP, size // 40)
    for n, (y, x) in enumerate(spots, 1):
        ax.add_patch(
            Rectangle((x - box / 2, y - box / 2), box, box, fill=False, color="cyan", lw=1.2)
        )
        ax.text(x + box / 2, y - box / 2, str(n), color="cyan", fontsize=10, weight="bold")
    ax.set_title(f"(a) {title}", fontsize=9, loc="left")
    ax.set_xlabel("x (slide px)", fontsize=8)
    ax.set_ylabel("y (slide px)", fontsize=8)
    ax.tick_params(labelsize=7)
    bar = fig.colorbar(im, cax=fig.add_axes((0.475, 0.08, 0.012, 0.84)))
    bar.set_label("|d score / d pixel| / its maximum (overview: max per block)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.text(
        0.565, 0.95, f"(b) the {len(spots)} most salient cell-sized spots, {CROP} x {CROP} px: "
        "pixels | saliency (same scale)", fontsize=9,
    )  # fmt: skip
    side, gap = 0.085, 0.215  # each crop: side (a fraction of the width) square, rows gap apart
    for n, ((y, x), kind) in enumerate(zip(spots, kinds), 1):
        y0 = min(max(y - CROP // 2, 0), size - CROP)
        x0 = min(max(x - CROP // 2, 0), size - CROP)
        row, col = (n - 1) % 4, (n - 1) // 4
        left, bottom = 0.565 + col * 0.215, 0.71 - row * gap
        height = side * WIDTH / HEIGHT  # square in pixels
        a = fig.add_axes((left, bottom, side, height))
        b = fig.add_axes((left + side + 0.005, bottom, side, height))
        a.imshow(image[y0 : y0 + CROP, x0 : x0 + CROP], cmap="gray", vmin=0, vmax=255)
        b.imshow(saliency[y0 : y0 + CROP, x0 : x0 + CROP] / scale, cmap="hot", vmin=0, vmax=1)
        a.set_title(f"{n}: on a {kind}" if kind != "background" else f"{n}: not on a cell",
                    fontsize=8, loc="left")  # fmt: skip
        for axis in (a, b):
            axis.set_xticks([])
            axis.set_yticks([])
    fig.savefig(out, dpi=100)
    plt.close(fig)
    from PIL import Image

    with Image.open(out) as png:
        return png.size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Input-gradient (saliency) map of the slide classifier of train_slides.py, "
        "computed tile by tile with tilefn and written as a PNG overlay.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--size", type=int, default=2048, help="slide side in pixels")
    p.add_argument("--tile", type=int, default=1024, help="tile_size for tilefn")
    p.add_argument("--out", default="saliency.png", help="PNG to write")
    p.add_argument(
        "--checkpoint", default=None, help="model.pt written by train_slides.py (else train here)"
    )
    p.add_argument("--n-train", type=int, default=16, help="slides for the short training run")
    p.add_argument("--steps", type=int, default=160, help="steps of the short training run")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    trunk, head = load(args.checkpoint) if args.checkpoint else train_briefly(args)
    trunk.eval()
    head.eval()

    # A fresh class-1 slide (a seed the training never saw), masked as in training.
    image, marks = make_slide(args.size, 1, slide_seed(args.seed + 1, "val", 0))
    image = masked(image)
    backbone, _ = tilefn.streamify(trunk, args.tile, saliency=True, normalize=((MEAN,), (STD,)))
    x = (torch.from_numpy(image)[None, None].float() / 255).requires_grad_(True)
    logits = head(backbone(x))
    score = logits[0, 1] - logits[0, 0]
    score.backward()
    saliency = x.grad[0, 0].abs().numpy()
    prob = torch.softmax(logits.detach(), 1)[0, 1].item()
    print(
        f"slide {args.size}x{args.size} px, class 1: p(class 1) = {prob:.3f}; "
        f"saliency from {backbone.plan(x.shape).n_tiles} tiles of {args.tile} px"
    )

    # Where is the saliency? Label every pixel with the kind of the cell it lies on (the
    # cell's 5 x 5 px box plus a 1 px margin), or -1 for background.
    on = np.full(image.shape, -1, np.int8)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            on[
                np.clip(marks[:, 0] + dy, 0, args.size - 1),
                np.clip(marks[:, 1] + dx, 0, args.size - 1),
            ] = marks[:, 2]
    top = on.ravel()[np.argsort(saliency, axis=None)[::-1][:100]]
    plural = {"square": "squares", "cross": "crosses", "plus": "pluses"}
    counts = ", ".join(f"{(top == k).sum()} on {plural[name]}" for k, name in enumerate(KINDS))
    print(
        f"the 100 most salient pixels: {(top >= 0).sum()} on cells, which cover "
        f"{(on >= 0).mean():.1%} of the slide ({counts})"
    )
    spots = top_spots(saliency, SPOTS, apart=CROP)
    kinds = [KINDS[on[y, x]] if on[y, x] >= 0 else "background" for y, x in spots]
    print(f"the {len(spots)} most salient spots (enlarged in the PNG) lie on: {', '.join(kinds)}")

    title = (
        f"saliency of the class-1 score on a held-out class-1 slide, {args.size} px "
        f"(p(class 1) = {prob:.2f})"
    )
    width, height = render(image, saliency, spots, kinds, title, args.out)
    print(f"wrote {args.out} ({width}x{height} px) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
