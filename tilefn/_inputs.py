"""Images as the executor sees them: one interface for every kind of image.

An :class:`ImageSource` has a ``shape`` ``(N, C, *spatial)``, a ``dtype``, a ``device``
and :meth:`~ImageSource.read`, which returns one crop as a tensor. A crop box may reach
past the ends of a dim that is periodic (circular padding): such a crop wraps around the
image. Two kinds exist: :class:`TensorImage` (a ``torch.Tensor``) and :class:`ArrayImage`
(numpy arrays, memmaps, zarr arrays, TIFFs opened as zarr: anything with numpy-style
slicing, read crop by crop so that only the crops being computed are ever in memory).

:class:`CropReader` turns a crop into what the model receives: on the compute device, in
the compute dtype, normalised, in the requested memory format.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import einops
import numpy as np
import torch
from torch import nn

from ._compat import requires_grad_allowed
from ._errors import InputError, InputTypeError

__all__ = [
    "Box",
    "ImageSource",
    "TensorImage",
    "ArrayImage",
    "Prefetched",
    "CropReader",
    "as_source",
    "check_shape",
    "model_dtype",
    "scatter_add",
    "collate",
]

Box = Sequence[tuple[int, int]]  # one (start, stop) per spatial dim

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_TO_TORCH = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


class ImageSource:
    """An ``(N, C, *spatial)`` image that can be read crop by crop."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    #: The tensor the image is, when it is one: the input of autograd (its gradient is the
    #: input gradient). None for images read from arrays, which get no gradient.
    tensor: torch.Tensor | None = None

    def read(self, box: Box) -> torch.Tensor:
        """The crop ``box`` as an ``(N, C, *crop)`` tensor on :attr:`device`; parts of the box
        outside the image wrap around (periodic dims)."""
        if _inside(self.shape, box):
            return self._read(box)
        out = torch.empty(_crop_shape(self.shape, box), dtype=self.dtype, device=self.device)
        for image_box, local in _pieces(self.shape, box):
            out[local] = self._read(image_box)
        return out

    def _read(self, box: Box) -> torch.Tensor:  # pragma: no cover - abstract
        """The crop ``box``, which lies inside the image."""
        raise NotImplementedError

    def constant(self, box: Box) -> torch.Tensor | None:
        """``(N, C)`` values if the source knows, without reading it, that the crop ``box``
        holds one value per sample and channel (a tissue mask says it is all background);
        None when it does not know. Crops are checked after reading either way, so a source
        need not implement this; one that does saves reading its background."""
        return None


class TensorImage(ImageSource):
    """A ``torch.Tensor`` image; crops inside the image are views of it."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device

    def _read(self, box: Box) -> torch.Tensor:
        return self.tensor[(Ellipsis,) + tuple(slice(a, b) for a, b in box)]

    def __repr__(self) -> str:
        return f"TensorImage(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class ArrayImage(ImageSource):
    """An array-like image, read crop by crop, with its axes named by ``layout``.

    Args:
        array: Anything with ``shape``, ``dtype`` and numpy-style slicing that returns numpy
            arrays: ``numpy.ndarray``, ``numpy.memmap``, a ``zarr`` array, an ``h5py``
            dataset, ...
        layout: The axes of ``array`` as an einops pattern of plain names: ``n`` (batch,
            optional), ``c`` (channels, optional) and one name per spatial dim, in the
            array's order. The default, ``"n c h w"`` style, takes the array as
            ``(N, C, *spatial)``. A TIFF read as zarr is usually ``"h w c"`` (RGB) or
            ``"h w"`` (grayscale).

    The streamed model sees ``(N, C, *spatial)``: missing ``n``/``c`` axes become size 1, and
    spatial dims keep the order they have in ``layout``. Each crop is moved into that order
    with ``einops.rearrange``.

    Example:
        >>> import numpy as np, tilefn
        >>> slide = np.zeros((3000, 2000, 3), dtype=np.uint8)   # e.g. zarr.open(tiff_store)
        >>> image = tilefn.ArrayImage(slide, "h w c")
        >>> tuple(image.shape)
        (1, 3, 3000, 2000)
    """

    def __init__(self, array: Any, layout: str | None = None):
        for attr in ("shape", "dtype", "__getitem__"):
            if not hasattr(array, attr):
                raise InputTypeError(
                    f"ArrayImage: expected an array-like with shape, dtype and slicing "
                    f"(numpy array, memmap, zarr array), got {type(array).__name__}."
                )
        self.array = array
        ndim = len(array.shape)
        if layout is None:
            if ndim < 3:
                raise InputError(
                    f"ArrayImage: an array of shape {tuple(array.shape)} needs a layout naming "
                    "its axes, e.g. ArrayImage(array, 'h w') for a grayscale image or "
                    "'h w c' for RGB; without one the array is read as (N, C, *spatial)."
                )
            layout = " ".join(["n", "c"] + [f"s{k}" for k in range(ndim - 2)])
        names = layout.split()
        if (
            len(names) != ndim
            or len(set(names)) != ndim
            or not all(name.isidentifier() for name in names)
        ):
            raise InputError(
                f"ArrayImage: layout {layout!r} must name each of the array's {ndim} axes once "
                f"with a plain name (shape {tuple(array.shape)}), e.g. 'h w c'."
            )
        spatial = [name for name in names if name not in ("n", "c")]
        if not 1 <= len(spatial) <= 3:
            raise InputError(
                f"ArrayImage: layout {layout!r} has {len(spatial)} spatial axes; tilefn streams "
                "1 to 3 spatial dims."
            )
        np_dtype = np.dtype(array.dtype)
        if np_dtype not in _NUMPY_TO_TORCH:
            raise InputTypeError(
                f"ArrayImage: arrays of dtype {np_dtype} are not supported; use uint8 (with "
                "streamify(..., normalize=(mean, std))) or float16/32/64."
            )
        self.layout = " ".join(names)
        sizes = dict(zip(names, (int(s) for s in array.shape)))
        self._spatial_axes = [names.index(name) for name in spatial]
        # The einops pattern that puts one crop into (N, C, *spatial) order.
        target = [name if name in names else "1" for name in ("n", "c")] + spatial
        self._pattern = f"{self.layout} -> {' '.join(target)}"
        self.shape = torch.Size(
            (sizes.get("n", 1), sizes.get("c", 1), *(sizes[name] for name in spatial))
        )
        self.dtype = _NUMPY_TO_TORCH[np_dtype]
        self.device = torch.device("cpu")

    def _read(self, box: Box) -> torch.Tensor:
        index: list[Any] = [slice(None)] * len(self.array.shape)
        for axis, (start, stop) in zip(self._spatial_axes, box):
            index[axis] = slice(start, stop)
        crop = einops.rearrange(np.asarray(self.array[tuple(index)]), self._pattern)
        return torch.from_numpy(np.ascontiguousarray(crop))

    def __repr__(self) -> str:
        return (
            f"ArrayImage({type(self.array).__name__}, layout={self.layout!r}, "
            f"shape={tuple(self.shape)}, dtype={self.dtype})"
        )


class Prefetched(ImageSource):
    """``source`` read ahead: while the model runs on one crop, a background thread reads and
    decodes the next ``depth`` crops of ``boxes`` (in the order they will be asked for), so
    that I/O and decompression overlap with compute. Boxes the source knows to be constant
    are not read ahead. A box asked for out of order is read directly. Use as a context
    manager (the thread stops at the end)."""

    def __init__(self, source: ImageSource, boxes: Iterable[Box], depth: int):
        self.source = source
        self.shape, self.dtype, self.device = source.shape, source.dtype, source.device
        self.tensor = source.tensor
        self._pending = (b for b in boxes if source.constant(b) is None)
        self._futures: dict[tuple, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tilefn-read")
        self.depth = depth
        self._fill()

    def _fill(self) -> None:
        while len(self._futures) < self.depth:
            box = next(self._pending, None)
            if box is None:
                return
            self._futures[_key(box)] = self._pool.submit(self.source.read, box)

    def read(self, box: Box) -> torch.Tensor:
        future = self._futures.pop(_key(box), None)
        self._fill()
        return future.result() if future is not None else self.source.read(box)

    def constant(self, box: Box) -> torch.Tensor | None:
        return self.source.constant(box)

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(box: Box) -> tuple:
    return tuple((int(a), int(b)) for a, b in box)


def as_source(x: Any, *, uint8_ok: bool) -> ImageSource:
    """``x`` as an :class:`ImageSource`: tensors and array-likes (numpy, memmap, zarr, taken
    as ``(N, C, *spatial)``) are wrapped; an :class:`ArrayImage` is used as it is. Floating
    point dtypes are accepted, and uint8 when ``uint8_ok`` (crops are normalised)."""
    if isinstance(x, ImageSource):
        source = x
    elif isinstance(x, torch.Tensor):
        source = TensorImage(x)
    elif all(hasattr(x, a) for a in ("shape", "dtype", "__getitem__")) and not isinstance(
        x, (str, bytes)
    ):
        source = ArrayImage(x)
    else:
        raise InputTypeError(
            "streamify: expected the input to be a torch.Tensor of shape (N, C, *spatial), or "
            "an array (numpy, memmap, zarr) of that shape, or a tilefn.ArrayImage; got "
            f"{type(x).__name__}."
        )
    check_shape(tuple(source.shape), "streamify")
    if source.device.type == "meta":
        raise InputError(
            "streamify: the input is on the meta device, so it has no values to stream. Pass "
            "a tensor with data (on the CPU or the compute device), or an array."
        )
    if source.dtype not in _FLOAT_DTYPES and not (uint8_ok and source.dtype == torch.uint8):
        raise InputTypeError(
            f"streamify: expected a floating-point input, got dtype {source.dtype}. Convert it "
            "(x.float()), or pass normalize=(mean, std) to stream a uint8 image that is "
            "normalised crop by crop."
        )
    return source


def check_shape(shape: tuple[int, ...], api: str) -> tuple[int, ...]:
    """``shape`` as ints, if it is ``(N, C, *spatial)`` with no empty dim."""
    if len(shape) < 3:
        raise InputError(
            f"{api}: expected an input of shape (N, C, *spatial) with 1 to 3 spatial dims, got "
            f"shape {shape}. Add the missing batch/channel dims, e.g. x[None] or x.unsqueeze(0)."
        )
    if any(int(s) <= 0 for s in shape):
        raise InputError(f"{api}: the input shape {shape} has an empty dim.")
    return tuple(int(s) for s in shape)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (else the default dtype)."""
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )


@dataclass(frozen=True)
class CropReader:
    """Reads crops of an image as model inputs: on ``device``, in ``dtype``, normalised with
    ``normalize = (mean, std)`` (uint8 divided by 255 first), channels-last if asked."""

    device: torch.device
    dtype: torch.dtype
    normalize: tuple[Sequence[float], Sequence[float]] | None = None
    channels_last: bool = False

    @staticmethod
    def for_image(
        source: ImageSource,
        model: nn.Module,
        *,
        device: torch.device | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        channels_last: bool = False,
    ) -> CropReader:
        """Crops are computed on ``device`` (default: the model's, else the image's), in the
        image's float dtype (a uint8 image: the model's dtype)."""
        if device is None:
            device = next((p.device for p in model.parameters()), source.device)
        for kind, named in (
            ("parameter", model.named_parameters()),
            ("buffer", model.named_buffers()),
        ):
            for name, t in named:
                if t.device != device:
                    raise InputError(
                        f"streamify: the model's {kind} '{name}' is on {t.device}, but crops "
                        f"are computed on {device}. Move the model there "
                        f"(model.to({str(device)!r})) or pass device= to streamify."
                    )
        channels = source.shape[1]
        if normalize is not None:
            for what, values in zip(("mean", "std"), normalize):
                if len(values) not in (1, channels):
                    raise InputError(
                        f"streamify: normalize has {len(values)} {what} values, but the input "
                        f"of shape {tuple(source.shape)} has {channels} channels. Give one "
                        "value per channel (or one for all)."
                    )
        dtype = source.dtype if source.dtype.is_floating_point else model_dtype(model)
        return CropReader(device, dtype, normalize, channels_last)

    def __call__(
        self, source: ImageSource, box: Box, requires_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model input for one crop, and (``requires_grad``) the leaf whose gradient is
        the crop's input gradient."""
        return self.prepare(source.read(box), source.dtype, requires_grad)

    def prepare(
        self, raw: torch.Tensor, source_dtype: torch.dtype, requires_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`__call__` for a crop already read (``raw``, in the source's dtype)."""
        raw = raw.to(self.device, non_blocking=True)
        leaf = None
        if requires_grad:
            with requires_grad_allowed():  # a fresh leaf, also under torch.func transforms
                leaf = raw = raw.detach().to(self.dtype).requires_grad_(True)
        if self.normalize is None:
            return self._layout(raw), leaf
        shape = (1, -1) + (1,) * (raw.dim() - 2)
        mean = torch.as_tensor(self.normalize[0], dtype=self.dtype, device=raw.device)
        std = torch.as_tensor(self.normalize[1], dtype=self.dtype, device=raw.device)
        mean, std = mean.reshape(shape), std.reshape(shape)
        from_uint8 = not source_dtype.is_floating_point
        if leaf is None:  # a private float copy, normalised in place: one crop-sized buffer
            crop = raw.to(self.dtype, copy=True)
            if from_uint8:
                crop.div_(255.0)
            return self._layout(crop.sub_(mean).div_(std)), None
        crop = leaf / 255.0 if from_uint8 else leaf
        return self._layout((crop - mean) / std), leaf

    def _layout(self, crop: torch.Tensor) -> torch.Tensor:
        if self.channels_last and crop.dim() in (4, 5):
            fmt = torch.channels_last if crop.dim() == 4 else torch.channels_last_3d
            return crop.contiguous(memory_format=fmt)
        return crop


def scatter_add(target: torch.Tensor, box: Box, values: torch.Tensor) -> None:
    """``target[box] += values``, wrapping around the ends of ``target`` like :meth:`read`."""
    values = values.to(target.device)
    for image_box, local in _pieces(target.shape, box):
        target[(Ellipsis,) + tuple(slice(a, b) for a, b in image_box)] += values[local]


def _inside(shape: Sequence[int], box: Box) -> bool:
    first = len(shape) - len(box)
    return all(0 <= a and b <= shape[first + k] for k, (a, b) in enumerate(box))


def _crop_shape(shape: Sequence[int], box: Box) -> tuple[int, ...]:
    first = len(shape) - len(box)
    return tuple(shape[:first]) + tuple(b - a for a, b in box)


def _pieces(shape: Sequence[int], box: Box) -> Iterator[tuple[list[tuple[int, int]], tuple]]:
    """``(image box, crop index)`` pairs that cover a box which may wrap around the image."""
    first = len(shape) - len(box)
    per_dim = [_segments(a, b, shape[first + k]) for k, (a, b) in enumerate(box)]
    for combo in itertools.product(*per_dim):
        image_box = [(lo, hi) for lo, hi, _ in combo]
        local = (Ellipsis,) + tuple(slice(at, at + hi - lo) for lo, hi, at in combo)
        yield image_box, local


def _segments(start: int, stop: int, size: int) -> list[tuple[int, int, int]]:
    """Cut ``[start, stop)`` of a periodic dim of ``size`` into ``(lo, hi, offset)`` pieces
    that lie inside ``[0, size)``; ``offset`` is where the piece starts in the crop."""
    out = []
    pos = start
    while pos < stop:
        lo = pos % size
        hi = min(size, lo + stop - pos)
        out.append((lo, hi, pos - start))
        pos += hi - lo
    return out


def collate(samples: Sequence[Any]) -> Any:
    """A DataLoader ``collate_fn`` that keeps lazy images lazy.

    Samples are images, ``(image, target, ...)`` tuples or dicts. A lazy image
    (:class:`ArrayImage`, or any :class:`ImageSource`) cannot be stacked without reading it
    whole, so batches holding one must have ``batch_size=1``: the image is passed on as it is
    (it already has a batch dim of 1) and the rest is collated as PyTorch does. Batches of
    tensors are collated as PyTorch does.

    Example:
        >>> import numpy as np, torch, tilefn
        >>> slide = tilefn.ArrayImage(np.zeros((64, 48, 3), np.uint8), "h w c")
        >>> image, target = tilefn.collate([(slide, 1)])
        >>> image is slide, target
        (True, tensor([1]))
    """
    from torch.utils.data import default_collate

    def lazy(value: Any) -> bool:
        return isinstance(value, ImageSource)

    first = samples[0]
    fields = (
        first.values()
        if isinstance(first, dict)
        else first
        if isinstance(first, (tuple, list))
        else [first]
    )
    if not any(lazy(v) for v in fields):
        return default_collate(list(samples))
    if len(samples) != 1:
        raise InputError(
            f"collate: a batch of {len(samples)} samples holds lazy images (read crop by crop), "
            "which cannot be stacked without reading them whole. Use batch_size=1 (slides of "
            "different sizes cannot be stacked anyway)."
        )
    if lazy(first):
        return first
    if isinstance(first, dict):
        return {k: v if lazy(v) else default_collate([v]) for k, v in first.items()}
    return type(first)(v if lazy(v) else default_collate([v]) for v in first)
