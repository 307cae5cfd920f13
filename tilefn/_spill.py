"""Full maps on disk: what a chain of stage cuts stores between its segments when the maps
do not fit in ``memory_budget`` (the forward's maps and the backward's cotangent maps).

A :class:`DiskMap` is an ``(N, C, *spatial)`` map in a raw file under a directory the user
picks (option ``spill_dir``, default the system's temporary directory). It is an
:class:`~tilefn._inputs.ImageSource`, so the next segment streams over it crop by crop like
over any image, and it takes blocks: :meth:`DiskMap.write` (a forward sink) and
:meth:`DiskMap.add` (an input-gradient accumulator; the crops of the backward overlap, so
their input gradients are added). Every call maps the file, copies one block and unmaps it:
nothing of the map stays resident in the process between calls, so its memory is that of
one block. The file is removed by :meth:`DiskMap.close`, or when the map is collected.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from ._compat import outside_functorch, unwrapped
from ._inputs import Box, ImageSource, _pieces

__all__ = ["DiskMap"]

# The file holds the raw bits: a numpy integer type of the same width stands for any torch
# dtype (bfloat16 has no numpy type), and the bytes are viewed back as the torch dtype.
_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


class DiskMap(ImageSource):
    """A map of ``shape`` and ``dtype`` in a new zero-filled file under ``directory``."""

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        directory: str | os.PathLike | None = None,
        name: str = "map",
    ):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.nbytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        self._bits = _BITS[torch.empty((), dtype=dtype).element_size()]
        fd, self.path = tempfile.mkstemp(prefix=f"tilefn-{name}-", suffix=".bin", dir=directory)
        try:
            os.ftruncate(fd, self.nbytes)  # reads as zeros; disk blocks only where written
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, self.path)

    def _mapped(self, mode: str) -> np.memmap:
        return np.memmap(self.path, dtype=self._bits, mode=mode, shape=tuple(self.shape))

    def __getitem__(self, index: tuple) -> torch.Tensor:
        """The block ``index`` (a tuple of slices) as a tensor on :attr:`device`."""
        mapped = self._mapped("r")
        block = np.array(mapped[index])  # a copy; the mapping goes with ``mapped``
        del mapped
        return torch.from_numpy(block).view(self.dtype).to(self.device)

    def _read(self, box: Box) -> torch.Tensor:
        return self[_index(box)]

    def write(self, index: tuple, block: torch.Tensor) -> None:
        """``map[index] = block``."""
        mapped = self._mapped("r+")
        with outside_functorch():  # the values only, never part of a transform's graph
            mapped[index] = _bits(unwrapped(block), self.dtype)
        del mapped

    def add(self, box: Box, values: torch.Tensor) -> None:
        """``map[..., box] += values``, wrapping around the ends like :meth:`read`."""
        mapped = self._mapped("r+")
        values = unwrapped(values)
        with outside_functorch():
            for image_box, local in _pieces(self.shape, box):
                index = _index(image_box)
                now = torch.from_numpy(np.array(mapped[index])).view(self.dtype)
                now += values[local].to(device="cpu", dtype=self.dtype)
                mapped[index] = _bits(now, self.dtype)
        del mapped

    def close(self) -> None:
        """Remove the file (the map cannot be read after)."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"DiskMap(shape={tuple(self.shape)}, dtype={self.dtype}, path={self.path!r})"


def _index(box: Box) -> tuple:
    return (slice(None), slice(None), *(slice(a, b) for a, b in box))


def _bits(block: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    cpu = block.detach().to(device="cpu", dtype=dtype).contiguous()
    width = cpu.element_size()
    return cpu.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]).numpy()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
