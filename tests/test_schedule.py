"""Crop scheduling as pure functions over hand-made plans: no model is traced or run."""

from __future__ import annotations

from fractions import Fraction

import pytest

import tilefn
from tilefn._plan import Span, TilePlan
from tilefn._schedule import backward_order, crop_groups, kept_crops, owned_slices, rank_share


def make_plan(
    starts_stops: list[tuple[int, int]],
    blocks: list[tuple[int, int]],
    *,
    activation_bytes: int = 100,
    memory_estimate: int = 1000,
    uses_rng: bool = False,
) -> TilePlan:
    """A 1-d plan of one output at stride 1, with the given crops and owned blocks."""
    length = max(stop for _, stop in starts_stops)
    spans = tuple(Span(a, b, (blk,)) for (a, b), blk in zip(starts_stops, blocks))
    return TilePlan(
        input_shape=(1, 1, length),
        tile_size=(max(b - a for a, b in starts_stops),),
        alignment=(1,),
        spans=(spans,),
        output_shapes=((1, 1, length),),
        output_strides=((Fraction(1),),),
        output_spatial_dims=((2,),),
        min_tile_size=(1,),
        crop_activation_bytes=activation_bytes,
        memory_estimate=memory_estimate,
        uses_rng=uses_rng,
    )


# Four crops of lengths 12, 14, 14, 10 owning [0,10) [10,20) [20,30) [30,36).
PLAN = make_plan([(0, 12), (8, 22), (18, 32), (26, 36)], [(0, 10), (10, 20), (20, 30), (30, 36)])


def test_rank_share_partitions_the_crops_and_balances_the_load() -> None:
    assert rank_share(PLAN, 0, 1) == [0, 1, 2, 3]
    shares = [rank_share(PLAN, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == [0, 1, 2, 3]
    # Largest first to the least loaded rank: 14 -> r0, 14 -> r1, 12 -> r0, 10 -> r1.
    assert shares == [[0, 1], [2, 3]]


def test_rank_share_refuses_more_ranks_than_tiles() -> None:
    with pytest.raises(tilefn.PlanError, match="4 tiles for 5 ranks"):
        rank_share(PLAN, 0, 5)


def test_kept_crops_without_a_budget_is_the_last_crop() -> None:
    assert kept_crops(PLAN, [0, 1, 2, 3], None) == {3}
    assert kept_crops(PLAN, [0, 2], None) == {2}
    assert kept_crops(PLAN, [], None) == set()


def test_kept_crops_fill_the_budget_from_the_last_crop_backwards() -> None:
    # 100 bytes for the largest crop (14 px): about 7.14 bytes per px. The estimate (1000)
    # already holds one crop graph, so a budget of 1000 keeps the last crop if it fits in
    # 100 bytes: 10 px * 7.14 = 71.4.
    assert kept_crops(PLAN, [0, 1, 2, 3], 1000) == {3}
    # 1072 - 1000 + 100 = 172 bytes of room: crops 3 and 2 (71.4 + 100 <= 172), not 1.
    assert kept_crops(PLAN, [0, 1, 2, 3], 1072) == {3, 2}
    assert kept_crops(PLAN, [0, 1, 2, 3], 10**9) == {0, 1, 2, 3}
    assert kept_crops(PLAN, [0, 1, 2, 3], 900) == set()


def test_backward_order_starts_with_the_kept_graphs_latest_first() -> None:
    assert backward_order([0, 1, 2, 3], {3}) == [3, 2, 1, 0]
    assert backward_order([0, 1, 2, 3], {1, 2}) == [2, 1, 3, 0]
    assert backward_order([0, 1, 2, 3], set()) == [3, 2, 1, 0]


def test_crop_groups_batch_consecutive_same_shaped_crops() -> None:
    assert crop_groups(PLAN, [0, 1, 2, 3], set(), 1) == [[0], [1], [2], [3]]
    assert crop_groups(PLAN, [0, 1, 2, 3], set(), 4) == [[0], [1, 2], [3]]
    assert crop_groups(PLAN, [0, 1, 2, 3], {2}, 4) == [[0], [1], [2], [3]]
    same = make_plan([(0, 10), (10, 20), (20, 30)], [(0, 10), (10, 20), (20, 30)])
    assert crop_groups(same, [0, 1, 2], set(), 2) == [[0, 1], [2]]


def test_crop_groups_run_random_models_one_crop_at_a_time() -> None:
    rng = make_plan([(0, 10), (10, 20), (20, 30)], [(0, 10), (10, 20), (20, 30)], uses_rng=True)
    assert crop_groups(rng, [0, 1, 2], set(), 3) == [[0], [1], [2]]


def test_owned_slices_place_the_block_in_the_output_and_in_the_crop() -> None:
    crop = PLAN.crops[1]  # [8, 22) owns output [10, 20), which starts at 2 in the crop
    dst, src = owned_slices(PLAN, crop, 0)
    assert dst == (slice(None), slice(None), slice(10, 20))
    assert src == (slice(None), slice(None), slice(2, 12))
    empty = make_plan([(0, 10), (5, 12)], [(0, 10), (10, 10)])
    assert owned_slices(empty, empty.crops[1], 0) is None
