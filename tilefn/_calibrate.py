"""Exact full-image BatchNorm statistics for a streamed trunk.

Streamed BatchNorm layers normalise with their running statistics. At initialisation those
are mean 0 and variance 1, which in a deep network from scratch (ResNet-50) lets activations
grow layer after layer until the head saturates: zero loss, zero gradients.
:func:`calibrate_batchnorm` sets every BatchNorm's running statistics to the exact statistics
of its input over whole images, layer by layer in the order the model runs them. Each layer is
then calibrated with the layers before it already normalising with their new statistics,
which is what train-mode BatchNorm would compute on those images. Each layer's input is
streamed as the output of a probe that stops the model right there, so every position of the
full map is counted once and no crop is ever larger than ``tile_size``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._api import TileSize, streamify
from ._compat import BatchNormBase
from ._errors import InputError
from ._inputs import as_source, model_dtype
from ._trace import trace

__all__ = ["calibrate_batchnorm"]


class _Stop(Exception):
    pass


class _Probe(nn.Module):
    """``model``, stopped at the input of ``layer``: returns what ``layer`` receives."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple) -> None:
            seen.append(args[0])
            raise _Stop

        handle = self.layer.register_forward_pre_hook(grab)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise InputError("calibrate_batchnorm: a BatchNorm layer was not reached.")
        return seen[0]


def _run_order(
    model: nn.Module, layers: list[nn.Module], shape: tuple[int, ...]
) -> list[nn.Module]:
    """``layers`` in the order the model first calls them, recorded on meta tensors."""
    order: list[nn.Module] = []

    def seen(module: nn.Module, args: tuple) -> None:
        if module not in order:
            order.append(module)

    handles = [m.register_forward_pre_hook(seen) for m in layers]
    try:
        trace(model, shape, model_dtype(model))
    finally:
        for h in handles:
            h.remove()
    return order + [m for m in layers if m not in order]


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module, images: Iterable[Any], tile_size: TileSize, **options: Any
) -> nn.Module:
    """Set the running statistics of every BatchNorm in ``model`` to the exact per-channel
    mean and (unbiased) variance of its input over all positions of ``images``, streamed.

    Use it before training a trunk from scratch (or on a new stain or sensor): streamed
    BatchNorm normalises with running statistics, and the initial ones (mean 0, variance 1)
    can saturate a deep network. Layers are calibrated one after another in the order the
    model runs them, each with the layers before it already using their new statistics.
    ``num_batches_tracked`` is left alone, and nothing else changes. Cost: one streamed
    forward per BatchNorm layer, each up to that layer, per image; each layer's input map is
    held whole while its statistics are taken.

    Args:
        model: The trunk (the model you pass to :func:`streamify`), changed in place.
        images: A few images (tensors, arrays or :class:`~tilefn.ImageSource`), pooled as one
            batch.
        tile_size: As for :func:`streamify`.
        **options: Options for :func:`streamify` (``normalize``, ``device``, ...).

    Returns:
        ``model``.

    Example:
        >>> import torch, tilefn
        >>> from torch import nn
        >>> trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        >>> _ = tilefn.calibrate_batchnorm(trunk, [torch.rand(1, 3, 256, 256) * 9], tile_size=128)
        >>> bool(trunk[1].running_var.mean() > 1)  # no longer the initial 1.0
        True
    """
    images = list(images)
    if not images:
        raise InputError("calibrate_batchnorm: give at least one image.")
    layers = [m for m in model.modules() if isinstance(m, BatchNormBase) and m.track_running_stats]
    was_training = model.training
    model.eval()
    try:
        shape = tuple(as_source(images[0], uint8_ok=True).shape)
        for layer in _run_order(model, layers, shape):
            probe = _Probe(model, layer)
            backbone, _ = streamify(probe, tile_size, **options)
            total = total_sq = None
            count = 0
            for image in images:
                u = backbone(image).to(torch.float64)
                dims = [0, *range(2, u.dim())]
                s, sq = u.sum(dims), (u * u).sum(dims)
                total = s if total is None else total + s
                total_sq = sq if total_sq is None else total_sq + sq
                count += u.numel() // u.shape[1]
                del u
            mean = total / count
            var = (total_sq - count * mean * mean) / max(count - 1, 1)
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_(var.clamp_min(0).to(layer.running_var.dtype))
    finally:
        model.train(was_training)
    return model
