"""The public entry points: :func:`streamify` and :func:`plan`."""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._errors import InputError, InputTypeError, OptionError, TileSizeError
from ._execute import Executor, RngState, StreamedFunction, model_dtype
from ._inputs import ArrayImage, as_input
from ._plan import TilePlan, auto_plan, check_tile_size, make_plan
from ._trace import Trace

__all__ = ["Streamed", "StreamedBackbone", "streamify", "plan"]

TileSize = int | Sequence[int] | str

_VALID_OPTIONS = (
    "saliency",
    "verbose",
    "deterministic",
    "normalize",
    "device",
    "memory_budget",
    "channels_last",
    "process_group",
    "crop_batch",
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Streamed(NamedTuple):
    """What :func:`streamify` returns: unpack it, or use the names."""

    backbone: StreamedBackbone
    vjp: Callable[[torch.Tensor, Any], tuple[dict[str, torch.Tensor], torch.Tensor | None]]


# Plans are cached per model and input, so that tilefn.plan() and the backbone share them.
_PLAN_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()
_PLANS_PER_MODEL = 64


def _cached_plan(
    model: nn.Module,
    shape: tuple[int, ...],
    tile_size: Any,
    dtype: torch.dtype,
    memory_budget: int | None = None,
) -> tuple[TilePlan, Trace]:
    flags = tuple(m.training for m in model.modules())
    tile_key = tile_size if isinstance(tile_size, (int, str)) else tuple(tile_size)
    key = (shape, tile_key, dtype, flags, memory_budget if tile_key == "auto" else None)
    per_model = _PLAN_CACHE.setdefault(model, OrderedDict())
    if key in per_model:
        per_model.move_to_end(key)
    elif tile_key == "auto":
        per_model[key] = auto_plan(model, shape, memory_budget, dtype)  # type: ignore[arg-type]
    else:
        per_model[key] = make_plan(model, shape, tile_size, dtype)
        if len(per_model) > _PLANS_PER_MODEL:  # slides of many sizes: keep the recent ones
            per_model.popitem(last=False)
    return per_model[key]


def plan(
    model: nn.Module,
    input_shape: Sequence[int],
    tile_size: TileSize,
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
) -> TilePlan:
    """The tiling plan of ``model`` on inputs of ``input_shape``, from shapes only.

    The model is recorded on meta tensors (no data, no memory); nothing is computed on an
    image. The plan lists the crops, the output blocks each one owns, the alignment, the
    overlap factor ``a`` and an estimate of peak memory, and prints as a table.

    Args:
        model: The network to stream.
        input_shape: ``(N, C, *spatial)``.
        tile_size: Largest crop side in input pixels, an int or one int per spatial dim,
            or ``"auto"`` to choose it from ``memory_budget``.
        dtype: The compute dtype, used for the memory estimate; defaults to the dtype of
            the model's parameters.
        memory_budget: Bytes; needed with ``tile_size="auto"`` (see :func:`streamify`).

    Example:
        >>> import torch, tilefn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.MaxPool2d(2))
        >>> p = tilefn.plan(net, (1, 3, 256, 256), tile_size=128)
        >>> p.n_tiles, p.alignment
        (9, (2, 2))
    """
    shape = _check_shape(tuple(input_shape), "plan")
    budget = _check_budget(tile_size, memory_budget, "plan")
    return _cached_plan(model, shape, tile_size, dtype or model_dtype(model), budget)[0]


def _check_budget(tile_size: Any, memory_budget: Any, api: str) -> int | None:
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
            raise OptionError(
                f"{api}: memory_budget must be a number of bytes (e.g. 8e9 or 8 * 2**30), got "
                f"{memory_budget!r}."
            )
        if not memory_budget > 0:
            raise OptionError(f"{api}: memory_budget must be positive, got {memory_budget!r}.")
        memory_budget = int(memory_budget)
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
    else:
        check_tile_size(tile_size)
    return memory_budget


def _human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def _check_shape(shape: tuple[int, ...], api: str) -> tuple[int, ...]:
    if len(shape) < 3:
        raise InputError(
            f"{api}: expected an input of shape (N, C, *spatial) with 1 to 3 spatial dims, got "
            f"shape {shape}. Add the missing batch/channel dims, e.g. x[None] or x.unsqueeze(0)."
        )
    if any(int(s) <= 0 for s in shape):
        raise InputError(f"{api}: the input shape {shape} has an empty dim.")
    return tuple(int(s) for s in shape)


class StreamedBackbone(nn.Module):
    """``model``, computed tile by tile. Returned by :func:`streamify`.

    It holds ``model`` itself and shares its parameters, buffers and submodules (same
    objects), so ``state_dict()`` keys equal ``model.state_dict()`` keys, an optimizer
    built on ``model.parameters()`` keeps working, and ``.to()``, ``.train()`` and
    ``.eval()`` act on ``model``.
    """

    def __init__(self, model: nn.Module, tile_size: TileSize, executor: Executor):
        super().__init__()
        object.__setattr__(self, "_model", model)
        # Share the model's registries, so that the backbone *is* the model to nn.Module.
        object.__setattr__(self, "_parameters", model._parameters)
        object.__setattr__(self, "_buffers", model._buffers)
        object.__setattr__(self, "_modules", model._modules)
        object.__setattr__(self, "_non_persistent_buffers_set", model._non_persistent_buffers_set)
        self.tile_size = tile_size
        self._executor = executor
        self._shown: set[int] = set()  # plans already printed (verbose)

    @property
    def model(self) -> nn.Module:
        """The wrapped model (the same object that was passed to :func:`streamify`)."""
        return self._model

    def train(self, mode: bool = True) -> StreamedBackbone:
        super().train(mode)
        self._model.training = mode
        return self

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size!r}, model={type(self._model).__name__}"

    def _prepare(self, x: Any) -> torch.Tensor | ArrayImage:
        x = as_input(x)  # tensors as they are; numpy / memmap / zarr arrays read per crop
        _check_shape(tuple(x.shape), "streamify")
        if x.dtype not in _FLOAT_DTYPES:
            if self._executor.normalize is None or x.dtype != torch.uint8:
                raise InputTypeError(
                    f"streamify: expected a floating-point input, got dtype {x.dtype}. "
                    "Convert it (x.float()), or pass normalize=(mean, std) to stream a uint8 "
                    "image that is normalised crop by crop."
                )
        return x

    def plan(self, shape_or_input: Sequence[int] | torch.Tensor | ArrayImage) -> TilePlan:
        """The cached :class:`TilePlan` for this input (or input shape)."""
        if not isinstance(shape_or_input, (tuple, list, torch.Size)):
            x = self._prepare(shape_or_input)
            shape, dtype = tuple(x.shape), self._executor.compute_dtype(x)
        else:
            shape = _check_shape(tuple(shape_or_input), "plan")
            dtype = self._executor.compute_dtype(None)
        return self._plan(shape, dtype)[0]

    def _plan(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[TilePlan, Trace]:
        plan_, trace_ = _cached_plan(
            self._model, shape, self.tile_size, dtype, self._executor.memory_budget
        )
        if id(plan_) not in self._shown:
            self._shown.add(id(plan_))
            if self._executor.verbose:
                print(plan_)
            budget = self._executor.memory_budget
            if budget is not None and plan_.memory_estimate > budget:
                warnings.warn(
                    f"streamify: the plan for input shape {shape} with tile_size "
                    f"{self.tile_size!r} is estimated to need "
                    f"{_human(plan_.memory_estimate)}, more than memory_budget "
                    f"{_human(budget)}. Use a smaller tile_size, or tile_size='auto'.",
                    stacklevel=3,
                )
        return plan_, trace_

    def forward(self, x: torch.Tensor) -> Any:
        x = self._prepare(x)
        plan_, trace_ = self._plan(tuple(x.shape), self._executor.compute_dtype(x))
        params = [p for p in self._model.parameters() if p.requires_grad]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if needs_grad:
            outs = StreamedFunction.apply(self._executor, plan_, x, *params)
        else:
            rng = RngState(self._executor.compute_device(x)) if plan_.uses_rng else None
            outs, _ = self._executor.forward(x, plan_, rng)
        return tree_unflatten(list(outs), trace_.out_spec)

    def vjp(self, x: torch.Tensor, cotangent: Any, *, saliency: bool):
        x = self._prepare(x)
        plan_, trace_ = self._plan(tuple(x.shape), self._executor.compute_dtype(x))
        cots, spec = tree_flatten(cotangent)
        if spec != trace_.out_spec:
            raise InputTypeError(
                f"streamed_vjp: the cotangent must have the structure of the model's output "
                f"({trace_.out_spec}), got {spec}."
            )
        for i, (c, shape) in enumerate(zip(cots, plan_.output_shapes)):
            if not isinstance(c, torch.Tensor) or tuple(c.shape) != tuple(shape):
                raise InputError(
                    f"streamed_vjp: cotangent {i} must be a tensor of the output's shape "
                    f"{tuple(shape)}, got "
                    + (
                        f"shape {tuple(c.shape)}"
                        if isinstance(c, torch.Tensor)
                        else type(c).__name__
                    )
                    + "."
                )
        named = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        # Replay the RNG state a forward from here would see (vjp leaves it untouched).
        rng = RngState(self._executor.compute_device(x)) if plan_.uses_rng else None
        grads, input_grad = self._executor.vjp(
            x, plan_, cots, [p for _, p in named], want_input=saliency, rng=rng
        )
        param_grads = {
            n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)
        }
        return param_grads, input_grad


def streamify(model: nn.Module, tile_size: TileSize, **options: Any) -> Streamed:
    """Like ``torch.func.vjp(model, x)``, but computed tile by tile.

    The forward pass is exact: ``backbone(x)`` equals ``model(x)`` up to float rounding,
    computed crop by crop without ever running ``model`` on more than one crop at a time.
    Gradients are exact for every parameter: each crop is recomputed with autograd during
    the backward pass and backpropagated with the part of the cotangent it owns, so peak
    memory grows with ``tile_size``, not with the image size.

    BatchNorm layers always use their running statistics inside the streamed model (the
    statistics of a tile are not those of the image); their affine parameters still get
    exact gradients.

    Args:
        model: A network made of local ops (convolutions, pooling, pointwise ops,
            BatchNorm with running statistics, per-pixel Linear/LayerNorm, upsampling by
            an integer factor, residual additions and concatenations), returning a tensor
            or a tuple/list/dict of tensors.
        tile_size: Largest crop side, in input pixels, ever run through the model at
            once: an int, or one int per spatial dim. Bounds peak memory. ``"auto"``
            chooses it per input shape from ``memory_budget``: the plan the cost model
            expects to train fastest among those whose memory estimate fits.

    Keyword Args:
        saliency (bool): ``streamed_vjp`` also returns the gradient with respect to ``x``.
        verbose (bool): show a progress bar over tiles.
        deterministic (bool): use deterministic kernels while streaming, so two runs give
            bit-identical results (tiles always run in a fixed order).
        normalize (tuple): ``(mean, std)`` per channel. ``x`` may then be uint8 (divided by
            255 first); each crop is converted and normalised on the compute device.
        device (torch.device | str): where crops are computed; ``x`` may stay on the CPU.
            Defaults to the device of the model's parameters.
        memory_budget (int | float): bytes the streamed step may use (compared with
            ``plan.memory_estimate``). Under grad mode the forward keeps the autograd
            graphs of its last crops while they fit in what the plan leaves of the
            budget (without a budget: the last crop only, which costs no extra peak
            memory), and the backward uses them instead of recomputing those crops; with
            a budget that holds every crop graph, a training step costs ``a`` times a
            plain one instead of ``4a/3``. Needed by ``tile_size="auto"``.
        channels_last (bool): feed crops in ``torch.channels_last`` memory format (convert
            the model too: ``model.to(memory_format=torch.channels_last)``).
        crop_batch (int): run up to this many same-shaped crops in one model call, stacked
            along the batch dim (default 1). Fewer, larger kernel launches for small tiles
            on a GPU; the crop working set grows by the same factor. Models that draw
            random numbers always run one crop at a time.
        process_group (torch.distributed.ProcessGroup): tile parallelism for one image:
            each rank of the group runs its share of the crops, the output map is summed
            across ranks (each position is computed by exactly one rank) and so are the
            gradients, so every rank gets the same output and the full gradients. Every
            rank must call with the same image and parameters (and RNG state, if the
            model draws random numbers).

    Returns:
        ``Streamed(backbone, vjp)``. ``backbone(x)`` returns ``model(x)``'s structure and,
        under grad mode, is differentiable (``loss.backward()`` fills ``.grad`` of every
        parameter). ``vjp(x, cotangent)`` returns ``(param_grads, input_grad)``:
        ``param_grads`` is keyed like ``model.named_parameters()`` and ``input_grad`` is
        ``None`` unless ``saliency=True``.

    Raises:
        UnsupportedLayerError: a layer is not local (the message names its module path).
        TileSizeError: ``tile_size`` is smaller than the network needs (the message gives
            the minimum).
        OptionError: an unknown option (a ``TypeError``).

    Example:
        >>> import torch, tilefn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).double()
        >>> x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
        >>> backbone, streamed_vjp = tilefn.streamify(net, tile_size=32)
        >>> torch.testing.assert_close(backbone(x), net(x))
    """
    unknown = sorted(set(options) - set(_VALID_OPTIONS))
    if unknown:
        raise OptionError(
            f"streamify: unknown options {unknown}; valid options are {sorted(_VALID_OPTIONS)}."
        )
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"streamify: expected an nn.Module, got {type(model).__name__}.")
    for name in ("saliency", "verbose", "deterministic"):
        if not isinstance(options.get(name, False), bool):
            raise OptionError(
                f"streamify: option {name} must be True or False, got {options[name]!r}."
            )
    saliency = options.get("saliency", False)
    normalize = options.get("normalize")
    if normalize is not None:
        try:
            mean, std = normalize
            mean, std = [float(v) for v in mean], [float(v) for v in std]
        except (TypeError, ValueError):
            raise OptionError(
                f"streamify: normalize must be (mean, std), two sequences of floats with one "
                f"value per channel, got {normalize!r}."
            ) from None
        normalize = (mean, std)
    device = options.get("device")
    if device is not None:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError):
            raise OptionError(
                f"streamify: device must be a torch.device or str, got {device!r}."
            ) from None
    budget = _check_budget(tile_size, options.get("memory_budget"), "streamify")
    if not isinstance(options.get("channels_last", False), bool):
        raise OptionError(
            f"streamify: option channels_last must be True or False, got "
            f"{options['channels_last']!r}."
        )
    crop_batch = options.get("crop_batch", 1)
    if isinstance(crop_batch, bool) or not isinstance(crop_batch, int) or crop_batch < 1:
        raise OptionError(f"streamify: crop_batch must be an int >= 1, got {crop_batch!r}.")
    group = options.get("process_group")
    if group is not None:
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
    executor = Executor(
        model,
        verbose=bool(options.get("verbose", False)),
        deterministic=bool(options.get("deterministic", False)),
        normalize=normalize,
        device=device,
        memory_budget=budget,
        channels_last=bool(options.get("channels_last", False)),
        process_group=group,
        crop_batch=crop_batch,
    )
    backbone = StreamedBackbone(model, tile_size, executor)

    def streamed_vjp(x: torch.Tensor, cotangent: Any):
        """``(param_grads, input_grad)`` of ``<cotangent, model(x)>``, tile by tile."""
        return backbone.vjp(x, cotangent, saliency=saliency)

    return Streamed(backbone, streamed_vjp)
