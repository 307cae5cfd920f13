"""Crop scheduling: pure functions over a :class:`TilePlan`, no model and no tensors.

Which crops a rank runs (:func:`rank_share`), which crop graphs the forward keeps for the
backward under a memory budget (:func:`kept_crops`), in which order the backward visits
the crops (:func:`backward_order`), how consecutive crops are grouped into one model call
(:func:`crop_groups`), and where a crop's owned output block sits in the stitched output
and in the crop's own output (:func:`owned_slices`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

from ._errors import PlanError
from ._plan import Crop, TilePlan, kept_count

__all__ = ["rank_share", "kept_crops", "backward_order", "crop_groups", "owned_slices"]


def _volume(crop: Crop) -> int:
    return math.prod(b - a for a, b in crop.box)


def _lengths(crop: Crop) -> tuple[int, ...]:
    return tuple(b - a for a, b in crop.box)


def rank_share(plan: TilePlan, rank: int, world: int) -> list[int]:
    """Indices of the crops rank ``rank`` of ``world`` runs, in plan order.

    Crops go to ranks largest first, each to the least loaded rank (ties: the lower rank);
    every rank computes the same assignment because the plan is the same. One rank runs
    every crop.

    Example:
        >>> import tilefn, torch
        >>> p = tilefn.plan(torch.nn.Conv2d(1, 1, 3, padding=1), (1, 1, 64, 64), 24)
        >>> sorted(rank_share(p, 0, 2) + rank_share(p, 1, 2)) == list(range(p.n_tiles))
        True
    """
    if world == 1:
        return list(range(plan.n_tiles))
    if plan.n_tiles < world:
        raise PlanError(
            f"streamify: the plan has {plan.n_tiles} tiles for {world} ranks of the "
            "process group, so some ranks would have no work. Use a smaller tile_size "
            "(or fewer ranks)."
        )
    load = [0] * world
    mine = []
    order = sorted(range(plan.n_tiles), key=lambda i: (-_volume(plan.crops[i]), i))
    for i in order:
        r = min(range(world), key=lambda j: (load[j], j))
        load[r] += _volume(plan.crops[i])
        if r == rank:
            mine.append(i)
    return sorted(mine)


def kept_crops(plan: TilePlan, mine: Sequence[int], memory_budget: int | None) -> set[int]:
    """The crops whose autograd graphs the forward keeps for the backward: the last ones of
    ``mine``, as many as ``memory_budget`` allows after the streaming working set
    (``plan.memory_estimate``, which already holds one crop graph).

    Without a budget, the last crop only: its graph is what the backward would rebuild
    first, so keeping it costs no memory beyond the estimate's working set and saves one
    crop's recompute (a whole recompute when the plan has one tile)."""
    if not mine:
        return set()
    if memory_budget is None:
        return {mine[-1]}
    volumes = [_volume(plan.crops[i]) for i in mine]
    per_px = plan.crop_activation_bytes / max(volumes)
    spare = memory_budget - plan.memory_estimate + plan.crop_activation_bytes
    n = kept_count(volumes, per_px, spare)
    return set(mine[len(mine) - n :])


def backward_order(mine: Sequence[int], kept: Collection[int]) -> list[int]:
    """The backward's crop order: kept graphs first (the forward's last crops, latest first,
    so their memory is freed first), then the rest from the last crop to the first."""
    return sorted(mine, key=lambda i: (i not in kept, -i))


def crop_groups(
    plan: TilePlan, order: Sequence[int], alone: Collection[int], crop_batch: int
) -> list[list[int]]:
    """``order`` cut into groups of consecutive same-shaped crops, up to ``crop_batch`` per
    model call. Crops in ``alone`` (kept graphs) run by themselves; with per-sample
    randomness (``plan.uses_rng``) every crop does, since a batch would draw different
    numbers for its samples."""
    k = 1 if plan.uses_rng else crop_batch
    out: list[list[int]] = []
    for i in order:
        last = out[-1] if out else None
        if (
            last is not None
            and len(last) < k
            and i not in alone
            and last[0] not in alone
            and _lengths(plan.crops[i]) == _lengths(plan.crops[last[0]])
        ):
            last.append(i)
        else:
            out.append([i])
    return out


def owned_slices(plan: TilePlan, crop: Crop, output: int) -> tuple[tuple, tuple] | None:
    """``(in the stitched output, in the crop's output)`` indices of the block of output
    ``output`` that ``crop`` owns, or None if it owns nothing there."""
    dims = plan.output_spatial_dims[output]
    ndim = len(plan.output_shapes[output])
    dst: list[Any] = [slice(None)] * ndim
    src: list[Any] = [slice(None)] * ndim
    for k, (lo, hi) in enumerate(crop.blocks[output]):
        if hi <= lo:
            return None
        start = crop.local_starts[output][k]
        dst[dims[k]] = slice(lo, hi)
        src[dims[k]] = slice(start, start + hi - lo)
    return tuple(dst), tuple(src)
