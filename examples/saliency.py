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

and writes a PNG: on the left the whole slide with the saliency as a heat map, on the right the
eight most salient spots enlarged, each as the raw pixels next to the saliency.

What to expect: the saliency sits on single 5 x 5 px cells, on about 2 % of the slide. The head
takes the maximum of each feature map, so the gradient flows back through the strongest
response of each feature: the pluses that argue for class 1 and the crosses (also present on
class-1 slides) that argue against it. The script prints which kinds of cells the most salient
pixels and spots lie on.

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
from PIL import Image

import tilefn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_slides import (  # noqa: E402
    KINDS,
    MEAN,
    STD,
    HelpFormatter,
    build_model,
    make_slide,
    slide_seed,
)

PANEL = 512  # output: a PANEL x PANEL overview, and beside it the SPOTS most salient spots
SPOTS = 8  # enlarged, each as a (raw | saliency) pair of CROP x CROP px crops
CROP = 32  # side of each crop, in slide pixels


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


def heat(gray: np.ndarray, value: np.ndarray, gamma: float = 1.0, floor: float = 0.0):
    """Blend a "hot" colour map of ``value`` (0..1) over a grayscale uint8 image."""
    v = np.clip((value - floor) / (1 - floor), 0, 1)[..., None]
    hot = np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0, 1)
    base = np.repeat(gray[..., None].astype(np.float32) / 255, 3, axis=-1)
    w = 0.9 * v**gamma
    return Image.fromarray(((base * (1 - w) + hot * w) * 255).round().astype(np.uint8))


def top_spots(saliency: np.ndarray, n: int, apart: int) -> list[tuple[int, int]]:
    """The ``n`` most salient pixels that lie at least ``apart`` px from each other."""
    spots: list[tuple[int, int]] = []
    width = saliency.shape[1]
    for idx in np.argsort(saliency, axis=None)[::-1][: 1000 * n]:
        y, x = divmod(int(idx), width)
        if all(max(abs(y - sy), abs(x - sx)) >= apart for sy, sx in spots):
            spots.append((y, x))
            if len(spots) == n:
                break
    return spots


def render(image: np.ndarray, saliency: np.ndarray, spots, out: str) -> tuple[int, int]:
    """Write the overview and the enlarged spots side by side; return the PNG's size."""
    size = image.shape[0]
    s = torch.from_numpy(saliency / max(saliency.max(), 1e-30))
    # Overview: a dilating max-pool, so that single salient pixels survive the shrinking.
    k = max(1, size // PANEL)
    small_s = F.max_pool2d(s[None, None], 3 * k, stride=k, padding=k)[0, 0]
    small_s = F.interpolate(small_s[None, None], size=(PANEL, PANEL))[0, 0].numpy()
    small = np.asarray(Image.fromarray(image).resize((PANEL, PANEL), Image.BOX))
    canvas = Image.new("RGB", (2 * PANEL, PANEL))
    canvas.paste(heat(small, small_s / max(small_s.max(), 1e-30), gamma=0.5), (0, 0))

    crop, cell = min(CROP, size), PANEL // 4  # each spot: two cell x cell squares
    for n, (y, x) in enumerate(spots):
        y0 = min(max(y - crop // 2, 0), size - crop)
        x0 = min(max(x - crop // 2, 0), size - crop)
        raw = image[y0 : y0 + crop, x0 : x0 + crop]
        sal = s[y0 : y0 + crop, x0 : x0 + crop].numpy()
        left, top = PANEL + 2 * cell * (n % 2), cell * (n // 2)
        canvas.paste(Image.fromarray(raw).resize((cell, cell), Image.NEAREST), (left, top))
        hot = heat(raw, sal / max(sal.max(), 1e-30), floor=0.15)
        canvas.paste(hot.resize((cell, cell), Image.NEAREST), (left + cell, top))
    canvas.save(out)
    return canvas.size


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

    # A fresh class-1 slide (a seed the training never saw).
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

    width, height = render(image, saliency, spots, args.out)
    print(f"wrote {args.out} ({width}x{height} px) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
