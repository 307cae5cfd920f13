"""Images that are not one torch tensor: numpy arrays, memmaps, zarr arrays (a TIFF opened
with ``tifffile.imread(path, aszarr=True)``), read crop by crop.

An :class:`ArrayImage` looks to the executor like an ``(N, C, *spatial)`` tensor that lives on
the CPU: it has ``shape``, ``dtype``, ``device`` and ``dim()``, and :meth:`ArrayImage.read`
returns one crop as a torch tensor. Only the crops being computed are ever in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._errors import InputError, InputTypeError

__all__ = ["ArrayImage", "as_input"]

_NUMPY_TO_TORCH = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


class ArrayImage:
    """An array-like image, read crop by crop, with its axes named by ``layout``.

    Args:
        array: Anything with ``shape``, ``dtype`` and numpy-style slicing that returns numpy
            arrays: ``numpy.ndarray``, ``numpy.memmap``, a ``zarr`` array, an ``h5py``
            dataset, ...
        layout: The axes of ``array``, space-separated: ``n`` (batch, optional), ``c``
            (channels, optional) and one name per spatial dim, in the array's order. The
            default, ``"n c h w"`` style, takes the array as ``(N, C, *spatial)``. A TIFF
            read as zarr is usually ``"h w c"`` (RGB) or ``"h w"`` (grayscale).

    The streamed model sees ``(N, C, *spatial)``: missing ``n``/``c`` axes become size 1, and
    spatial dims keep the order they have in ``layout``.

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
        names = layout.split() if layout is not None else None
        if names is None:
            if ndim < 3:
                raise InputError(
                    f"ArrayImage: an array of shape {tuple(array.shape)} needs a layout naming "
                    "its axes, e.g. ArrayImage(array, 'h w') for a grayscale image or "
                    "'h w c' for RGB; without one the array is read as (N, C, *spatial)."
                )
            names = ["n", "c"] + [f"s{k}" for k in range(ndim - 2)]
        if len(names) != ndim or len(set(names)) != ndim:
            raise InputError(
                f"ArrayImage: layout {layout!r} must name each of the array's {ndim} axes once "
                f"(shape {tuple(array.shape)}), e.g. 'h w c'."
            )
        spatial = [i for i, name in enumerate(names) if name not in ("n", "c")]
        if not 1 <= len(spatial) <= 3:
            raise InputError(
                f"ArrayImage: layout {layout!r} has {len(spatial)} spatial axes; tilefn streams "
                "1 to 3 spatial dims."
            )
        self.layout = " ".join(names)
        self._n = names.index("n") if "n" in names else None
        self._c = names.index("c") if "c" in names else None
        self._spatial = spatial
        size = lambda i: 1 if i is None else int(array.shape[i])  # noqa: E731
        self.shape = torch.Size(
            (size(self._n), size(self._c), *(int(array.shape[i]) for i in spatial))
        )
        np_dtype = np.dtype(array.dtype)
        if np_dtype not in _NUMPY_TO_TORCH:
            raise InputTypeError(
                f"ArrayImage: arrays of dtype {np_dtype} are not supported; use uint8 (with "
                "streamify(..., normalize=(mean, std))) or float16/32/64."
            )
        self.dtype = _NUMPY_TO_TORCH[np_dtype]
        self.device = torch.device("cpu")
        self.requires_grad = False

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def read(self, box: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The crop ``box`` (one ``(start, stop)`` per spatial dim) as an ``(N, C, *crop)``
        tensor."""
        index: list[Any] = [slice(None)] * len(self.array.shape)
        for axis, (start, stop) in zip(self._spatial, box):
            index[axis] = slice(start, stop)
        crop = np.asarray(self.array[tuple(index)])
        order = [a for a in (self._n, self._c) if a is not None] + self._spatial
        crop = np.ascontiguousarray(crop.transpose(order))
        if self._n is None:
            crop = crop[None]
        if self._c is None:
            crop = crop[:, None]
        return torch.from_numpy(crop)

    def __repr__(self) -> str:
        return (
            f"ArrayImage({type(self.array).__name__}, layout={self.layout!r}, "
            f"shape={tuple(self.shape)}, dtype={self.dtype})"
        )


def as_input(x: Any) -> torch.Tensor | ArrayImage:
    """``x`` itself if it is a tensor or an :class:`ArrayImage`; array-likes (numpy, memmap,
    zarr) are wrapped as ``(N, C, *spatial)`` images."""
    if isinstance(x, (torch.Tensor, ArrayImage)):
        return x
    if all(hasattr(x, a) for a in ("shape", "dtype", "__getitem__")) and not isinstance(
        x, (str, bytes)
    ):
        return ArrayImage(x)
    raise InputTypeError(
        "streamify: expected the input to be a torch.Tensor of shape (N, C, *spatial), or an "
        f"array (numpy, memmap, zarr) of that shape, or a tilefn.ArrayImage; got "
        f"{type(x).__name__}."
    )
