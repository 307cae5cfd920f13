"""Slides as users hold them: pyramidal TIFF levels through tifffile, tiffslide and OpenSlide
objects, tissue masking with background skipping, all against the plain model in float64.

OpenSlide's C library comes from the ``openslide-bin`` wheel (or the system); its tests skip
where it cannot be loaded."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_tree_close, reference_grads
from torch import nn

import tilefn
import tilefn.slides

DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
MEAN, STD = (0.8, 0.7, 0.8), (0.2, 0.25, 0.2)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_slide(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noisy grey glass (about 235) with two coloured, textured pieces of tissue."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(235, 3, (height, width, 3)), 0, 255)
    yy, xx = np.mgrid[:height, :width]
    for cy, cx, r in ((0.3, 0.3, 0.18), (0.7, 0.65, 0.22)):
        inside = (yy / height - cy) ** 2 + (xx / width - cx) ** 2 < r**2
        tissue = rng.normal((170, 90, 170), 25, (height, width, 3))
        image[inside] = tissue[inside]
    return np.clip(image, 0, 255).round().astype(np.uint8)


def write_pyramid(path: Path, image: np.ndarray, levels: int = 3) -> list[np.ndarray]:
    """A tiled, compressed pyramidal TIFF, one page per level (as OpenSlide's generic TIFF
    reader, tiffslide and tifffile all read it)."""
    import tifffile

    pyramid = [image[:: 2**k, :: 2**k] for k in range(levels)]
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(pyramid):
            tif.write(
                level,
                tile=(64, 64),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if k else 0,
            )
    return pyramid


def trunk() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
        )
        .to(DTYPE)
        .eval()
    )


def as_input(rgb: np.ndarray) -> torch.Tensor:
    """What ``normalize=(MEAN, STD)`` makes of a uint8 ``(H, W, 3)`` array, in float64."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(DTYPE) / 255.0
    mean, std = (torch.tensor(v, dtype=DTYPE).reshape(1, 3, 1, 1) for v in (MEAN, STD))
    return (x - mean) / std


def check_against_plain(image, rgb: np.ndarray, tile: int = 48, **options) -> dict:
    net = trunk()
    backbone, streamed_vjp = tilefn.streamify(net, tile, normalize=(MEAN, STD), **options)
    out = backbone(image)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    ref_out, ref_grads, _ = reference_grads(net, as_input(rgb), cot)
    assert_tree_close(out, ref_out, **TOL)
    grads, _ = streamed_vjp(image, cot)
    assert_tree_close(grads, ref_grads, **TOL)
    return backbone.last_stats


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    pytest.importorskip("tifffile")
    pytest.importorskip("zarr")
    path = tmp_path_factory.mktemp("slides") / "slide.tif"
    return path, write_pyramid(path, make_slide(400, 336))


def test_a_pyramidal_tiff_is_read_at_level_1_and_streams_exactly(pyramid) -> None:
    path, levels = pyramid
    image = tilefn.slides.open_tiff(path, level=1)
    assert isinstance(image, tilefn.slides.TiffImage)
    assert tuple(image.shape) == (1, 3, *levels[1].shape[:2])
    assert np.array_equal(
        image.read([(10, 50), (20, 70)])[0].permute(1, 2, 0).numpy(), levels[1][10:50, 20:70]
    )
    check_against_plain(image, levels[1])
    image.close()


def test_open_tiff_names_the_levels_there_are(pyramid) -> None:
    path, _ = pyramid
    with pytest.raises(tilefn.InputError, match=r"levels 0..2, got 5"):
        tilefn.slides.open_tiff(path, level=5)


@pytest.mark.parametrize("reader", ["tiffslide", "openslide"])
def test_slide_objects_are_read_crop_by_crop_at_any_level(pyramid, reader: str) -> None:
    path, levels = pyramid
    if reader == "tiffslide":
        module = pytest.importorskip("tiffslide")
        slide = module.TiffSlide(path)
    else:
        try:
            import openslide
        except (ImportError, OSError) as err:  # the C library is missing
            pytest.skip(f"OpenSlide is not available: {err}")
        slide = openslide.OpenSlide(str(path))
    for level in (0, 1):
        image = tilefn.slides.SlideImage(slide, level=level)
        assert tuple(image.shape) == (1, 3, *levels[level].shape[:2])
        crop = image.read([(30, 90), (40, 100)])[0].permute(1, 2, 0).numpy()
        assert np.array_equal(crop, levels[level][30:90, 40:100])
    check_against_plain(tilefn.slides.SlideImage(slide, level=1), levels[1])
    with pytest.raises(tilefn.InputError, match="level must be 0..2"):
        tilefn.slides.SlideImage(slide, level=3)
    slide.close()


def test_tissue_mask_finds_the_tissue_and_masked_background_is_skipped_exactly(
    tmp_path: Path,
) -> None:
    rgb = make_slide(400, 336)
    mask = tilefn.slides.tissue_mask(rgb, factor=8)
    assert 0.15 < mask.tissue_fraction < 0.5, mask
    image = tilefn.slides.MaskedImage(rgb, mask)
    masked = image.read([(0, 400), (0, 336)])[0].permute(1, 2, 0).numpy()
    tissue = np.repeat(np.repeat(mask.mask, 8, 0), 8, 1)[:400, :336]
    assert np.array_equal(masked[tissue], rgb[tissue])
    assert (masked[~tissue] == 255).all()
    stats = check_against_plain(image, masked)
    assert stats["forward"].skipped > 0 and stats["backward"].skipped > 0
    mask.save_png(tmp_path / "mask.png")
    from PIL import Image

    with Image.open(tmp_path / "mask.png") as png:
        assert png.size == (336 // 8, 400 // 8)


def test_a_masked_slide_reads_only_the_crops_with_tissue(pyramid) -> None:
    path, levels = pyramid
    read = []

    class Counting(tilefn.ImageSource):
        def __init__(self, inner):
            self.inner, self.shape, self.dtype, self.device = (
                inner,
                inner.shape,
                inner.dtype,
                inner.device,
            )

        def _read(self, box):
            read.append(box)
            return self.inner.read(box)

    base = tilefn.slides.open_tiff(path, level=0)
    mask = tilefn.slides.tissue_mask(base, factor=16)
    image = tilefn.slides.MaskedImage(Counting(base), mask)
    backbone, _ = tilefn.streamify(trunk(), 48, normalize=(MEAN, STD))
    with torch.no_grad():
        backbone(image)
    base.close()
    stats = backbone.last_stats["forward"]
    assert stats.constant > 0
    assert len(read) == stats.crops - stats.constant  # background crops are never read


def test_tissue_mask_uses_a_coarser_pyramid_level_of_a_slide(pyramid) -> None:
    module = pytest.importorskip("tiffslide")
    path, levels = pyramid
    opened = module.TiffSlide(path)
    mask = tilefn.slides.tissue_mask(tilefn.slides.SlideImage(opened), factor=8)
    opened.close()
    direct = tilefn.slides.tissue_mask(levels[0], factor=8)
    assert mask.mask.shape == direct.mask.shape == (50, 42)
    assert (mask.mask != direct.mask).mean() < 0.05


class ThreadRecording(tilefn.ImageSource):
    """An array image that records which thread reads each crop, and can fail on one."""

    def __init__(self, rgb: np.ndarray, fail_at: int | None = None):
        self.inner = tilefn.ArrayImage(rgb, "h w c")
        self.shape, self.dtype, self.device = self.inner.shape, self.inner.dtype, self.inner.device
        self.threads: list[str] = []
        self.fail_at = fail_at

    def _read(self, box):
        import threading

        self.threads.append(threading.current_thread().name)
        if self.fail_at is not None and len(self.threads) > self.fail_at:
            raise OSError("corrupt tile")
        return self.inner.read(box)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_reads_ahead_in_a_background_thread(prefetch: int) -> None:
    rgb = make_slide(240, 200)
    image = ThreadRecording(rgb)
    check_against_plain(image, rgb, prefetch=prefetch)
    background = [t for t in image.threads if t.startswith("tilefn-read")]
    assert image.threads
    # Every crop is asked for in the planned order, so every read happens ahead.
    assert len(background) == (len(image.threads) if prefetch else 0)


def test_a_failed_read_ahead_raises_in_the_caller() -> None:
    image = ThreadRecording(make_slide(240, 200), fail_at=3)
    backbone, _ = tilefn.streamify(trunk(), 48, normalize=(MEAN, STD))
    with pytest.raises(OSError, match="corrupt tile"):
        backbone(image)


class TiffSlides(torch.utils.data.Dataset):
    """The documented recipe: each item opens its slide lazily (level 1 of a pyramidal TIFF),
    masks its background and returns ``(MaskedImage, label)``; slides differ in size."""

    def __init__(self, items: list[tuple[Path, int]], with_labels: bool = True):
        self.items, self.with_labels = items, with_labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        level = tilefn.slides.open_tiff(path, level=1)
        image = tilefn.slides.MaskedImage(level, tilefn.slides.tissue_mask(level, factor=8))
        return (image, label) if self.with_labels else image


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*")
def test_lightning_fit_validate_predict_over_slides_of_different_sizes(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    pytest.importorskip("tifffile")
    from torch.utils.data import DataLoader

    from tilefn.lightning import StreamedModule

    items = []
    for i, (h, w) in enumerate([(400, 336), (336, 464), (464, 400)]):
        path = tmp_path / f"slide{i}.tif"
        write_pyramid(path, make_slide(h, w, seed=i), levels=2)
        items.append((path, i % 2))
    torch.manual_seed(3)
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)).to(DTYPE)
    net = trunk()

    # The gradient of the first step, on the first slide, against the plain model.
    first = TiffSlides(items)[0][0]
    rgb = first.read([(0, first.shape[-2]), (0, first.shape[-1])])[0].permute(1, 2, 0).numpy()
    ref_trunk, ref_head = copy.deepcopy(net), copy.deepcopy(head)
    loss = nn.functional.cross_entropy(ref_head(ref_trunk(as_input(rgb))), torch.tensor([0]))
    loss.backward()
    want = {f"trunk.{n}": p.grad for n, p in ref_trunk.named_parameters()}
    want.update({f"head.{n}": p.grad for n, p in ref_head.named_parameters()})

    seen = []

    class Recording(StreamedModule):
        def on_before_optimizer_step(self, optimizer):
            seen.append({n: p.grad.clone() for n, p in self.named_parameters()})

    module = Recording(
        net,
        head,
        nn.functional.cross_entropy,
        tile_size=64,
        normalize=(MEAN, STD),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
    )
    loader = DataLoader(TiffSlides(items), batch_size=1, collate_fn=tilefn.collate)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, loader)
    assert len(seen) == 3
    assert set(seen[0]) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(seen[0][name], g, rtol=1e-9, atol=1e-12 * g.abs().max())
    assert module.trunk.last_stats["backward"].skipped > 0
    (metrics,) = trainer.validate(module, loader, verbose=False)
    assert "val_loss" in metrics
    predictions = trainer.predict(
        module, DataLoader(TiffSlides(items, False), batch_size=1, collate_fn=tilefn.collate)
    )
    assert [tuple(p.shape) for p in predictions] == [(1, 2)] * 3
