"""Whole-slide images as users hold them, read crop by crop: OpenSlide and tiffslide slides,
pyramidal TIFF/SVS levels through tifffile, and tissue masking that sets the background to
one constant lazily, so that :func:`tilefn.streamify` skips it exactly.

    >>> import numpy as np, tilefn.slides
    >>> slide = np.full((512, 384, 3), 240, np.uint8)          # glass ...
    >>> slide[100:300, 50:250] = (150, 80, 160)                  # ... and a piece of tissue
    >>> mask = tilefn.slides.tissue_mask(slide, factor=16)
    >>> image = tilefn.slides.MaskedImage(slide, mask)
    >>> image.constant([(0, 64), (0, 64)]).tolist()              # known background: not read
    [[255, 255, 255]]

Nothing here is imported by the rest of tilefn; tifffile/zarr, tiffslide and OpenSlide are
optional (``pip install "tilefn[slides]"``) and imported when used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._errors import InputError, InputTypeError
from ._inputs import ArrayImage, Box, ImageSource, as_source

__all__ = ["SlideImage", "TiffImage", "open_tiff", "TissueMask", "tissue_mask", "MaskedImage"]


class SlideImage(ImageSource):
    """An OpenSlide or tiffslide slide at one pyramid level, as a uint8 RGB image of shape
    ``(1, 3, height, width)`` read crop by crop with ``read_region``.

    Transparent pixels (outside the scanned area) read as white, as slide viewers show them.

    Args:
        slide: An ``openslide.OpenSlide`` or ``tiffslide.TiffSlide`` (anything with
            ``read_region``, ``level_dimensions`` and ``level_downsamples``).
        level: The pyramid level (0: full resolution).

    Example:
        >>> import tiffslide, tilefn.slides                        # doctest: +SKIP
        >>> image = tilefn.slides.SlideImage(tiffslide.TiffSlide("slide.svs"), level=1)  # doctest: +SKIP
    """

    def __init__(self, slide: Any, level: int = 0):
        for attr in ("read_region", "level_dimensions", "level_downsamples"):
            if not hasattr(slide, attr):
                raise InputTypeError(
                    "SlideImage: expected an openslide.OpenSlide or tiffslide.TiffSlide, got "
                    f"{type(slide).__name__}; for a plain TIFF use tilefn.slides.open_tiff."
                )
        levels = len(slide.level_dimensions)
        if not isinstance(level, int) or not 0 <= level < levels:
            raise InputError(f"SlideImage: level must be 0..{levels - 1}, got {level!r}.")
        self.slide, self.level = slide, level
        width, height = slide.level_dimensions[level]
        self.downsample = float(slide.level_downsamples[level])
        self.shape = torch.Size((1, 3, int(height), int(width)))
        self.dtype, self.device = torch.uint8, torch.device("cpu")

    def _read(self, box: Box) -> torch.Tensor:
        (y0, y1), (x0, x1) = box
        # read_region takes the top-left corner in level-0 pixels and the size at the level.
        corner = (round(x0 * self.downsample), round(y0 * self.downsample))
        region = np.asarray(self.slide.read_region(corner, self.level, (x1 - x0, y1 - y0)))
        rgb = region[..., :3].copy()
        if region.shape[-1] == 4:
            rgb[region[..., 3] == 0] = 255
        return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()

    def __repr__(self) -> str:
        return f"SlideImage({type(self.slide).__name__}, level={self.level}, shape={tuple(self.shape)})"


class TiffImage(ArrayImage):
    """An :class:`~tilefn.ArrayImage` over one level of a TIFF file, which it keeps open until
    :meth:`close` (or the end of a ``with`` block, or garbage collection)."""

    def __init__(self, array: Any, layout: str, store: Any):
        super().__init__(array, layout)
        self._store = store

    def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()

    def __enter__(self) -> TiffImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def open_tiff(path: str | Path, level: int = 0, series: int = 0) -> TiffImage:
    """One level of a (pyramidal) TIFF or SVS file as a lazy :class:`~tilefn.ArrayImage`: read
    tile by tile through tifffile's zarr store, never whole.

    The layout is taken from the level's shape: ``(H, W)`` grayscale, ``(H, W, C)`` with up to
    4 samples per pixel, or ``(C, H, W)``.

    Example:
        >>> import numpy as np, tifffile, tilefn.slides, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "slide.tif")
        >>> with tifffile.TiffWriter(path) as tif:
        ...     tif.write(np.zeros((512, 512, 3), np.uint8), tile=(128, 128), subifds=1)
        ...     tif.write(np.zeros((256, 256, 3), np.uint8), tile=(128, 128), subfiletype=1)
        >>> with tilefn.slides.open_tiff(path, level=1) as image:
        ...     tuple(image.shape)
        (1, 3, 256, 256)
    """
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        n_series = len(tif.series)
        if not 0 <= series < n_series:
            raise InputError(f"open_tiff: {path} has series 0..{n_series - 1}, got {series}.")
        n_levels = len(tif.series[series].levels)
    if not 0 <= level < n_levels:
        raise InputError(
            f"open_tiff: series {series} of {path} has levels 0..{n_levels - 1}, got {level}."
        )
    store = tifffile.imread(path, aszarr=True, series=series, level=level)
    array = zarr.open(store, mode="r")
    shape = tuple(array.shape)
    if len(shape) == 2:
        layout = "h w"
    elif len(shape) == 3 and shape[-1] <= 4:
        layout = "h w c"
    elif len(shape) == 3 and shape[0] <= 4:
        layout = "c h w"
    else:
        raise InputError(
            f"open_tiff: level {level} of {path} has shape {shape}; expected (H, W), (H, W, C) "
            "or (C, H, W). Open it with tifffile and wrap it in tilefn.ArrayImage(array, layout)."
        )
        store.close()
    return TiffImage(array, layout, store)


class TissueMask:
    """Where the tissue is: a boolean ``mask`` in which each element covers ``factor x factor``
    image pixels (pixel ``(y, x)`` is tissue iff ``mask[y // factor, x // factor]``), and the
    ``thumbnail`` (uint8, ``(h, w, C)``) it was found on."""

    def __init__(self, mask: np.ndarray, factor: int, thumbnail: np.ndarray):
        self.mask, self.factor, self.thumbnail = mask.astype(bool), int(factor), thumbnail

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean())

    def covers_tissue(self, box: Box) -> bool:
        """Whether any pixel of ``box`` (inside the image) is tissue."""
        (y0, y1), (x0, x1) = box
        f = self.factor
        return bool(self.mask[y0 // f : -(-y1 // f), x0 // f : -(-x1 // f)].any())

    def save_png(self, path: str | Path) -> None:
        """The thumbnail with the background dimmed and the tissue outlined in green, for a
        look at what was kept."""
        from PIL import Image

        rgb = self.thumbnail if self.thumbnail.shape[-1] == 3 else self.thumbnail[..., :1]
        rgb = np.broadcast_to(rgb, (*rgb.shape[:2], 3)).astype(np.float32)
        shown = np.where(self.mask[..., None], rgb, 0.35 * rgb + 0.65 * 255)
        edge = self.mask & ~_erode(self.mask)
        shown[edge] = (0, 200, 0)
        Image.fromarray(shown.round().astype(np.uint8)).save(path)

    def __repr__(self) -> str:
        return (
            f"TissueMask({self.mask.shape[0]}x{self.mask.shape[1]}, factor {self.factor}, "
            f"{100 * self.tissue_fraction:.1f} % tissue)"
        )


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out &= padded[1 + dy : 1 + dy + mask.shape[0], 1 + dx : 1 + dx + mask.shape[1]]
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(radius):
        padded = np.pad(out, 1, constant_values=False)
        grown = out.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= padded[1 + dy : 1 + dy + out.shape[0], 1 + dx : 1 + dx + out.shape[1]]
        out = grown
    return out


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8-range values: the split that maximises between-class
    variance."""
    hist = np.bincount(np.clip(values, 0, 255).astype(np.int64).ravel(), minlength=256)
    p = hist / max(hist.sum(), 1)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    return float(np.nanargmax(between)) + 0.5


def thumbnail(image: Any, factor: int) -> np.ndarray:
    """``image`` (an :class:`ImageSource`, tensor or array-like) block-averaged by ``factor``,
    as a uint8 ``(h, w, C)`` array, read in strips (never the whole image at once)."""
    source = image if isinstance(image, ImageSource) else _as_image(image)
    n, c, height, width = source.shape
    if n != 1 or len(source.shape) != 4:
        raise InputError(f"thumbnail: expected one 2-d image, got shape {tuple(source.shape)}.")
    h, w = height // factor, width // factor
    if h == 0 or w == 0:
        raise InputError(f"thumbnail: factor {factor} is larger than the image {height}x{width}.")
    rows = max(1, (1 << 24) // max(1, width * c) // factor) * factor  # ~16 MiB strips
    out = np.empty((h, w, c), np.uint8)
    for y in range(0, h * factor, rows):
        y1 = min(h * factor, y + rows)
        strip = source.read([(y, y1), (0, w * factor)])[0].double()
        blocks = strip.reshape(c, (y1 - y) // factor, factor, w, factor).mean((2, 4))
        out[y // factor : y1 // factor] = blocks.permute(1, 2, 0).round().clamp(0, 255).numpy()
    return out


def _as_image(image: Any) -> ImageSource:
    if isinstance(image, np.ndarray) and image.ndim in (2, 3) and image.dtype == np.uint8:
        layout = "h w" if image.ndim == 2 else "h w c"
        return ArrayImage(image, layout)
    return as_source(image, uint8_ok=True)


def tissue_mask(
    image: Any,
    *,
    factor: int = 32,
    method: str = "auto",
    threshold: float | None = None,
    margin: int = 1,
    min_fraction: float = 0.0,
) -> TissueMask:
    """Find the tissue on a thumbnail of ``image`` (block means of ``factor x factor`` pixels).

    Args:
        image: A :class:`SlideImage`, :func:`open_tiff` image, ``ImageSource``, tensor, or a
            uint8 ``(H, W)`` / ``(H, W, C)`` array.
        factor: Image pixels per mask pixel along each side.
        method: ``"saturation"`` (RGB: tissue is coloured, glass is grey; as CLAM does),
            ``"darkness"`` (tissue is darker than glass; grayscale), or ``"auto"``
            (saturation for 3+ channels, darkness for one).
        threshold: On the 0..255 scale of the chosen measure; ``None``: Otsu's threshold.
        margin: Mask pixels added around the tissue (so that its edge is never cut).
        min_fraction: Connected pieces of tissue smaller than this fraction of the slide are
            dropped (dust, pen marks); 0 keeps everything.
    """
    if not isinstance(factor, int) or factor < 1:
        raise InputError(f"tissue_mask: factor must be an int >= 1, got {factor!r}.")
    source = image if isinstance(image, ImageSource) else _as_image(image)
    thumb = thumbnail(_coarse_level(source, factor) or source, factor)
    measure = _measure(thumb, method)
    cut = _otsu(measure) if threshold is None else float(threshold)
    mask = measure > cut
    if min_fraction > 0:
        mask = _drop_small(mask, min_fraction * mask.size)
    if margin:
        mask = _dilate(mask, margin)
    need = [-(-s // factor) for s in source.shape[-2:]]
    return TissueMask(_fit(mask, need), factor, thumb)


def _coarse_level(source: ImageSource, factor: int) -> ImageSource | None:
    """For a slide, the pyramid level with the largest downsample that divides ``factor``,
    wrapped so that its thumbnail has the level-0 grid (reading it is far cheaper)."""
    if not isinstance(source, SlideImage) or source.level != 0:
        return None
    best = None
    for level, d in enumerate(source.slide.level_downsamples):
        d = round(float(d))
        if level and d > 1 and factor % d == 0 and (best is None or d > best[1]):
            best = (level, d)
    if best is None:
        return None
    return _Rescaled(SlideImage(source.slide, best[0]), best[1])


class _Rescaled(ImageSource):
    """A pyramid level seen on the level-0 grid, for thumbnails only: ``read`` of a box in
    level-0 pixels returns the level's pixels, each repeated ``d x d`` times (block means
    of those equal the level's pixels)."""

    def __init__(self, level: ImageSource, d: int):
        self.level, self.d = level, d
        self.shape = torch.Size((*level.shape[:2], *(s * d for s in level.shape[-2:])))
        self.dtype, self.device = level.dtype, level.device

    def _read(self, box: Box) -> torch.Tensor:
        d = self.d
        inner = [(a // d, -(-b // d)) for a, b in box]
        crop = self.level.read(inner)
        crop = crop.repeat_interleave(d, -2).repeat_interleave(d, -1)
        (y0, y1), (x0, x1) = box
        return crop[..., y0 % d : y0 % d + y1 - y0, x0 % d : x0 % d + x1 - x0]


def _fit(mask: np.ndarray, need: Sequence[int]) -> np.ndarray:
    """``mask`` cut or padded (repeating its edge) to the shape ``need``."""
    mask = mask[: need[0], : need[1]]
    pad = [(0, max(0, n - s)) for n, s in zip(need, mask.shape)]
    return np.pad(mask, pad, mode="edge") if any(p for _, p in pad) else mask


def _measure(thumb: np.ndarray, method: str) -> np.ndarray:
    if method == "auto":
        method = "saturation" if thumb.shape[-1] >= 3 else "darkness"
    if method == "saturation":
        if thumb.shape[-1] < 3:
            raise InputError("tissue_mask: method='saturation' needs an RGB image.")
        rgb = thumb[..., :3].astype(np.float64)
        top = rgb.max(-1)
        return np.where(top > 0, 255 * (top - rgb.min(-1)) / np.maximum(top, 1), 0)
    if method == "darkness":
        return 255.0 - thumb.astype(np.float64).mean(-1)
    raise InputError(
        f"tissue_mask: method must be 'auto', 'saturation' or 'darkness', got {method!r}."
    )


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Remove 8-connected components with fewer than ``min_pixels`` pixels."""
    label = np.zeros(mask.shape, np.int64)
    keep = np.zeros(mask.shape, bool)
    current = 0
    for y, x in zip(*np.nonzero(mask)):
        if label[y, x]:
            continue
        current += 1
        stack, members = [(y, x)], []
        label[y, x] = current
        while stack:
            cy, cx = stack.pop()
            members.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]:
                        if mask[ny, nx] and not label[ny, nx]:
                            label[ny, nx] = current
                            stack.append((ny, nx))
        if len(members) >= min_pixels:
            ys, xs = zip(*members)
            keep[list(ys), list(xs)] = True
    return keep


class MaskedImage(ImageSource):
    """``image`` with every pixel outside the tissue set to ``value`` (one per channel),
    lazily, crop by crop: nothing is copied at full size.

    Crops that lie wholly in the background are known to be constant without reading
    (:meth:`constant`), and :func:`tilefn.streamify` computes one per class of equal crops
    and skips the rest exactly (option ``skip_constant``).

    Args:
        image: Anything :func:`tissue_mask` takes.
        mask: The :class:`TissueMask` of ``image`` (the same pixel grid).
        value: The background value per channel (or one for all), in the image's units;
            default 255 (white, as glass) for uint8 and 1.0 for float images.
    """

    def __init__(self, image: Any, mask: TissueMask, value: float | Sequence[float] | None = None):
        self.image = image if isinstance(image, ImageSource) else _as_image(image)
        self.mask = mask
        self.shape, self.dtype, self.device = self.image.shape, self.image.dtype, self.image.device
        self.tensor = None  # a masked view has no input gradient
        n, c = self.shape[:2]
        if value is None:
            value = 255 if self.dtype == torch.uint8 else 1.0
        values = torch.as_tensor(value, dtype=self.dtype).reshape(-1)
        if values.numel() not in (1, c):
            raise InputError(
                f"MaskedImage: value has {values.numel()} entries, the image has {c} channels."
            )
        self.value = values.expand(c).clone()
        need = [-(-s // mask.factor) for s in self.shape[-2:]]
        if len(self.shape) != 4 or list(mask.mask.shape) != need:
            raise InputError(
                f"MaskedImage: the mask of shape {mask.mask.shape} (factor {mask.factor}) does "
                f"not cover the image of shape {tuple(self.shape)}; it needs {tuple(need)}."
            )

    def constant(self, box: Box) -> torch.Tensor | None:
        if self.mask.covers_tissue(box):
            return None
        return self.value.reshape(1, -1).expand(self.shape[0], -1).to(self.device)

    def _read(self, box: Box) -> torch.Tensor:
        crop = self.image.read(box)
        (y0, y1), (x0, x1) = box
        f = self.mask.factor
        m = self.mask.mask[y0 // f : -(-y1 // f), x0 // f : -(-x1 // f)]
        full = np.repeat(np.repeat(m, f, 0), f, 1)[
            y0 % f : y0 % f + y1 - y0, x0 % f : x0 % f + x1 - x0
        ]
        background = torch.from_numpy(~full).to(crop.device)
        out = crop.clone()
        out[..., background] = self.value.to(crop.device).reshape(1, -1, 1)
        return out

    def __repr__(self) -> str:
        return f"MaskedImage({self.image!r}, {self.mask!r})"
