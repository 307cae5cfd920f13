"""Saliency map of a streamed CNN: which pixels of a large slide decide its class?

Takes the slide classifier of ``train_slides.py`` (the main example), either trained there and
loaded with ``--checkpoint``, or trained here for about a minute on smaller slides (a plain
PyTorch loop over ``tilefn.streamify``). Then, on a fresh class-1 slide, it computes the
gradient of the class score with respect to every input pixel, streamed tile by tile::

    backbone, _ = tilefn.streamify(trunk, tile_size, saliency=True, normalize=(mean, std))
    x = (image / 255).requires_grad_(True)
    score = head(backbone(x))[0, 1] - head(backbone(x))[0, 0]    # computed once, in the code
    score.backward()                                             # x.grad: the saliency map

and writes it as a PNG: on the left the whole slide with the saliency as a heat map, on the
right the four most salient spots enlarged. The network's decision rests on a few of the tiny
plus-shaped cells; the script prints how much of the saliency falls on cells at all.

    python examples/saliency.py                                   # 2048 px, trains ~1 min
    python examples/saliency.py --checkpoint slides_data/model.pt --size 4096
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
from PIL import Image

import tilefn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_slides import MEAN, STD, build_model, make_slide, slide_seed  # noqa: E402

PANEL = 512  # output: a PANEL x PANEL overview and a 2 x 2 grid of enlarged crops beside it
CROP = 64  # side of each enlarged crop, in slide pixels


def train_briefly(args: argparse.Namespace):
    """A short plain-PyTorch training run (what StreamedModule does, minus Lightning)."""
    trunk, head = build_model(args.seed)
    backbone, _ = tilefn.streamify(trunk, args.tile, normalize=((MEAN,), (STD,)))
    slides = [
        (
            torch.from_numpy(make_slide(args.size, i % 2, slide_seed(args.seed, "train", i))[0]),
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


def heat(gray: np.ndarray, value: np.ndarray, alpha: float = 0.8) -> Image.Image:
    """Blend a "hot" colour map of ``value`` (0..1) over a grayscale uint8 image."""
    v = np.clip(value, 0, 1)[..., None]
    hot = np.clip(np.stack([3 * v[..., 0], 3 * v[..., 0] - 1, 3 * v[..., 0] - 2], -1), 0, 1)
    base = np.repeat(gray[..., None].astype(np.float32) / 255, 3, axis=-1)
    w = alpha * np.sqrt(v)  # faint saliency still shows
    out = base * (1 - w) + hot * w
    return Image.fromarray((out * 255).round().astype(np.uint8))


def render(image: np.ndarray, saliency: np.ndarray, out: str) -> tuple[int, int]:
    """Write the overview and the four most salient crops side by side; return the PNG size."""
    size = image.shape[0]
    s = saliency / max(saliency.max(), 1e-30)
    # Overview: max-pool the saliency so single pixels survive the shrinking.
    k = max(1, size // PANEL)
    s_small = F.max_pool2d(torch.from_numpy(s)[None, None], k)[0, 0].numpy()
    small = Image.fromarray(image).resize((PANEL, PANEL), Image.BOX)
    s_small = np.asarray(Image.fromarray(s_small.astype(np.float32)).resize((PANEL, PANEL)))
    canvas = Image.new("RGB", (2 * PANEL, PANEL))
    canvas.paste(heat(np.asarray(small), s_small), (0, 0))

    # The four most salient spots, at least CROP px apart, enlarged.
    crop = min(CROP, size)
    taken: list[tuple[int, int]] = []
    for idx in np.argsort(s, axis=None)[::-1][:100_000]:
        y, x = divmod(int(idx), size)
        if all(max(abs(y - ty), abs(x - tx)) >= crop for ty, tx in taken):
            taken.append((y, x))
        if len(taken) == 4:
            break
    cell = PANEL // 2
    for n, (y, x) in enumerate(taken):
        y0 = min(max(y - crop // 2, 0), size - crop)
        x0 = min(max(x - crop // 2, 0), size - crop)
        tile = heat(image[y0 : y0 + crop, x0 : x0 + crop], s[y0 : y0 + crop, x0 : x0 + crop], 0.6)
        canvas.paste(
            tile.resize((cell, cell), Image.NEAREST), (PANEL + cell * (n % 2), cell * (n // 2))
        )
    canvas.save(out)
    return canvas.size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Input-gradient (saliency) map of the slide classifier of train_slides.py, "
        "computed tile by tile with tilefn and written as a PNG overlay.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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

    # A fresh class-1 slide: its plus-shaped cells are what the class depends on.
    image, marks = make_slide(args.size, 1, slide_seed(args.seed + 1, "val", 0))
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

    # How much of the saliency lies on the cells (their 5 x 5 px boxes, 1 px margin)?
    on_cell = np.zeros(image.shape, bool)
    on_plus = np.zeros(image.shape, bool)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            ys = np.clip(marks[:, 0] + dy, 0, args.size - 1)
            xs = np.clip(marks[:, 1] + dx, 0, args.size - 1)
            on_cell[ys, xs] = True
            plus = marks[:, 2] == 2
            on_plus[ys[plus], xs[plus]] = True
    total = saliency.sum()
    print(
        f"{saliency[on_cell].sum() / total:.0%} of the saliency lies on the cells "
        f"({on_cell.mean():.1%} of the slide), {saliency[on_plus].sum() / total:.0%} on "
        "plus-shaped ones"
    )

    width, height = render(image, saliency, args.out)
    print(f"wrote {args.out} ({width}x{height} px) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
