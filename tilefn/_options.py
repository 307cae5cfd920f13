"""The options of :func:`tilefn.streamify`, defined, validated and documented once."""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import OptionError, TileSizeError

__all__ = ["StreamOptions", "canonical_tile", "check_tile_option"]


@dataclass(frozen=True)
class StreamOptions:
    """The keyword options of :func:`tilefn.streamify` (and of
    :class:`tilefn.lightning.StreamedModule`, which passes them on). Each is validated
    once, when the options are made; a bad value raises :class:`tilefn.OptionError`.

    Attributes:
        saliency: ``streamed_vjp`` also returns the gradient with respect to the input
            (after ``loss.backward()``, ``x.grad`` is filled whenever ``x.requires_grad``).
        verbose: Show a progress bar over tiles and print each new plan. A plan is
            printable either way: ``print(backbone.plan(x.shape))``.
        deterministic: Use deterministic kernels while streaming (tiles always run in a
            fixed order), so two runs give bit-identical results.
        normalize: ``(mean, std)``, one value per channel. The input may then be uint8 (4x
            smaller than float32): each crop is converted to the compute dtype, divided
            by 255 if uint8, and normalised on the compute device.
        device: Where crops are computed (``torch.device`` or str, e.g. ``"cuda"``). The
            image may stay on the CPU; only crops travel. ``None``: the device of the
            model's parameters.
        memory_budget: Bytes the streamed step may use (compared with
            ``plan.memory_estimate``). Under grad mode the forward keeps the autograd
            graphs of its last crops while they fit, and the backward uses them instead
            of recomputing those crops; with a budget that holds every crop graph a
            training step costs ``a`` times a plain one instead of ``4a/3``. Without a
            budget only the last crop's graph is kept, which costs no extra peak memory.
            Needed by ``tile_size="auto"``, which chooses the tile from it.
        channels_last: Feed crops in ``torch.channels_last`` memory format (convert the
            model too: ``model.to(memory_format=torch.channels_last)``).
        crop_batch: Run up to this many same-shaped crops in one model call, stacked
            along the batch dim (default 1): fewer, larger kernel launches for small
            tiles on a GPU, at a crop working set that grows by the same factor. Models
            that draw random numbers always run one crop at a time.
        process_group: A ``torch.distributed`` process group for tile parallelism on one
            image: each rank runs its share of the crops, and the output map and the
            gradients are summed across the ranks, so every rank ends with the same
            output and the full gradients. Every rank must call with the same image and
            parameters (and RNG state, if the model draws random numbers).
        skip_constant: Exact background skipping (default on). Crops whose model input is
            one value per sample and channel (masked background) and equal to another's
            are computed once: the forward copies the representative's output, and the
            backward runs it once with the sum of its members' owned cotangents, which is
            exact by linearity. The check costs one comparison pass over each crop. Passes
            that return the input gradient compute every crop in the backward (each crop's
            input gradient differs). ``backbone.last_stats`` says what was skipped.
        prefetch: For lazy images (arrays, zarr, TIFF and slide readers), read and decode
            this many crops ahead in a background thread while the model computes; 0 reads
            each crop when it is needed. ``None`` (the default): one crop ahead when a core
            is free for it (crops computed on a GPU, or torch using fewer CPU threads than
            there are cores), else 0, since a reader competing with every compute thread
            slows both. Tensors are never read ahead (their crops are views).
        batchnorm: What BatchNorm layers in train mode normalise with. ``"running"``
            (the default): their running statistics, as in eval mode, and the running
            statistics are not updated. ``"batch"``: exact batch statistics over the whole
            image (all samples and positions), as the plain model in train mode uses, and
            ``running_mean``/``running_var``/``num_batches_tracked`` updated once per
            forward as the plain model would. Each such layer is then a barrier of staged
            streaming (one streamed pass up to it for its statistics; see the docs' "Staged
            streaming"), so training costs grow with the number of layers. Layers in eval
            mode always use their running statistics.
        cut_at: Stage cuts for an ``nn.Sequential`` trunk: the names of the children at
            which a new segment starts, or ``"auto"``. Each segment is streamed on its own,
            over the stored map its predecessor returns (held in memory, with its gradient
            in the backward), with a tile of the same image area (``tile_size`` divided by
            the stride at the cut) and its own, smaller receptive field, so the crops overlap
            less. ``"auto"`` cuts before children with parameters whose input map is at most
            twice the input image's size, where a cut pays: at each new resolution (for a
            ResNet trunk: ``layer1``, ``layer3``, ``layer4``), and next to children with
            whole-image ops, whose statistics' streamed passes then start at the stored map
            instead of the image (an EfficientNet's ``features``: before every stage from
            the second on, a training step many times faster). ``memory_budget`` is shared
            among the segments after the stored maps; when the maps and their gradients
            would take more than half of it, they go to disk instead (see ``spill_dir``).
            ``None`` (the default): no cuts.
        spill_dir: The directory where stage cuts' stored maps and their gradients go when
            they do not fit in ``memory_budget`` (see ``cut_at``): raw files, one per map,
            written and read block by block, so that they take no resident memory; each is
            removed when it is no longer needed (a gradient map once read, the stored maps
            when the autograd graph is freed). ``None`` (the default): the system's
            temporary directory (``tempfile.gettempdir()``). Needs free disk space of about
            twice ``plan.map_bytes``.

    Example:
        >>> import tilefn
        >>> tilefn.StreamOptions(saliency=True, crop_batch=2).crop_batch
        2
        >>> tilefn.StreamOptions(crop_batch=0)
        Traceback (most recent call last):
        ...
        tilefn._errors.OptionError: streamify: crop_batch must be an int >= 1, got 0.
    """

    saliency: bool = False
    verbose: bool = False
    deterministic: bool = False
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    device: torch.device | None = None
    memory_budget: int | None = None
    channels_last: bool = False
    crop_batch: int = 1
    process_group: Any = None
    skip_constant: bool = True
    prefetch: int | None = None
    batchnorm: str = "running"
    cut_at: Any = None
    spill_dir: str | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in the order they are documented."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any], api: str = "streamify") -> StreamOptions:
        """The options given as keyword arguments; unknown names are an error."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise OptionError(
                f"{api}: unknown options {unknown}; valid options are {sorted(cls.names())}."
            )
        return cls(**options)

    def __post_init__(self) -> None:
        for name in ("saliency", "verbose", "deterministic", "channels_last", "skip_constant"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise OptionError(f"streamify: option {name} must be True or False, got {value!r}.")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("normalize", _normalize(self.normalize))
        set_("device", _device(self.device))
        set_("memory_budget", check_budget(self.memory_budget, "streamify"))
        crop_batch = self.crop_batch
        if not _is_int(crop_batch) or crop_batch < 1:
            raise OptionError(f"streamify: crop_batch must be an int >= 1, got {crop_batch!r}.")
        set_("crop_batch", int(crop_batch))
        if self.prefetch is not None:
            if not _is_int(self.prefetch) or self.prefetch < 0:
                raise OptionError(
                    f"streamify: prefetch must be None or an int >= 0, got {self.prefetch!r}."
                )
            set_("prefetch", int(self.prefetch))
        if self.batchnorm not in ("running", "batch"):
            raise OptionError(
                f"streamify: batchnorm must be 'running' or 'batch', got {self.batchnorm!r}."
            )
        cut_at = self.cut_at
        if cut_at is not None and cut_at != "auto":
            if isinstance(cut_at, str) or not all(isinstance(c, str) for c in cut_at):
                raise OptionError(
                    "streamify: cut_at must be None, 'auto' or a list of names of the "
                    f"children of an nn.Sequential trunk, got {cut_at!r}."
                )
            set_("cut_at", tuple(cut_at))
        if self.spill_dir is not None:
            if not isinstance(self.spill_dir, (str, os.PathLike)) or not os.path.isdir(
                self.spill_dir
            ):
                raise OptionError(
                    "streamify: spill_dir must be None or the path of an existing directory, "
                    f"got {self.spill_dir!r}."
                )
            set_("spill_dir", os.fspath(self.spill_dir))
        _check_group(self.process_group)


def _normalize(normalize: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if normalize is None:
        return None
    try:
        mean, std = normalize
        if isinstance(mean, str) or isinstance(std, str):
            raise TypeError
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise OptionError(
            f"streamify: normalize must be (mean, std), two sequences of floats with one "
            f"value per channel, got {normalize!r}."
        ) from None
    return mean, std


def _device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (TypeError, RuntimeError):
        raise OptionError(
            f"streamify: device must be a torch.device or str, got {device!r}."
        ) from None


def _check_group(group: Any) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise OptionError(
            "streamify: process_group= needs an initialised torch.distributed "
            "(call torch.distributed.init_process_group first)."
        )
    if not isinstance(group, dist.ProcessGroup):
        raise OptionError(
            f"streamify: process_group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD), got {type(group).__name__}."
        )


def check_budget(memory_budget: Any, api: str) -> int | None:
    """``memory_budget`` as int bytes (or None), or an :class:`OptionError`."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Real):
        raise OptionError(
            f"{api}: memory_budget must be a number of bytes (e.g. 8e9 or 8 * 2**30), got "
            f"{memory_budget!r}."
        )
    if not memory_budget > 0:
        raise OptionError(f"{api}: memory_budget must be positive, got {memory_budget!r}.")
    return int(memory_budget)


def check_tile_option(
    tile_size: int | Sequence[int] | str, memory_budget: int | None, api: str
) -> None:
    """Check ``tile_size`` before the number of spatial dims is known: an int, a sequence of
    positive ints, or ``"auto"`` (which needs a memory budget)."""
    if isinstance(tile_size, str):
        if tile_size != "auto":
            raise TileSizeError(
                f"{api}: tile_size must be an int, a tuple of ints or 'auto', got {tile_size!r}."
            )
        if memory_budget is None:
            raise OptionError(
                f"{api}: tile_size='auto' chooses the tile from the memory budget; pass "
                "memory_budget= (bytes), e.g. memory_budget=8 * 2**30."
            )
        return
    ndim = len(tile_size) if isinstance(tile_size, (list, tuple)) else 1
    tile_tuple(tile_size, ndim, api)


def canonical_tile(tile_size: Any) -> int | tuple[int, ...] | str:
    """``tile_size`` with integer-like entries (numpy ints) as Python ints, a sequence as a
    tuple; anything else as given (it is checked by :func:`check_tile_option`)."""
    if _is_int(tile_size):
        return int(tile_size)
    if isinstance(tile_size, (tuple, list)) and all(_is_int(t) for t in tile_size):
        return tuple(int(t) for t in tile_size)
    return tile_size


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy, not bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def tile_tuple(tile_size: Any, ndim: int, api: str = "streamify") -> tuple[int, ...]:
    """``tile_size`` as one positive int per spatial dim, or a :class:`TileSizeError`."""
    if _is_int(tile_size):
        tile_size = int(tile_size)
    elif isinstance(tile_size, (tuple, list)) and all(_is_int(t) for t in tile_size):
        tile_size = tuple(int(t) for t in tile_size)
    if not isinstance(tile_size, (int, tuple, list)):
        raise TileSizeError(
            f"{api}: tile_size must be an int or a tuple with one int per spatial dim, "
            f"got {tile_size!r} ({type(tile_size).__name__})."
        )
    tiles = (tile_size,) * ndim if isinstance(tile_size, int) else tuple(tile_size)
    if len(tiles) != ndim:
        raise TileSizeError(
            f"{api}: tile_size {tuple(tiles)} has {len(tiles)} entries, but the input has "
            f"{ndim} spatial dims. Pass an int or a tuple of {ndim} ints."
        )
    for t in tiles:
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise TileSizeError(
                f"{api}: tile_size must be a positive int (or a tuple of them), got {tile_size!r}."
            )
    return tiles
