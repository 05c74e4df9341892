"""2-D window matching: destinations, plans, and merge-then-restore on a token grid.

Oracles: explicit loops over windows, and grids whose exact restore is known.
"""

from __future__ import annotations

import pytest
import torch

from turbo_core import (
    CopyRestorer,
    SizeWeightedMerger,
    TurboConfig,
    score_windows,
    window_destinations,
)


@pytest.mark.parametrize(
    ("height", "width", "sx", "sy"), [(4, 6, 2, 2), (5, 7, 2, 3), (8, 8, 4, 1)]
)
@pytest.mark.parametrize("seeded", [False, True])
def test_one_destination_inside_each_full_window(height, width, sx, sy, seeded):
    generator = torch.Generator().manual_seed(3) if seeded else None
    dst = window_destinations(height, width, sx, sy, generator)
    rows, cols = height // sy, width // sx
    assert dst.shape == (rows * cols,)
    windows = [(int(i) // width // sy, int(i) % width // sx) for i in dst]
    assert sorted(windows) == [(r, c) for r in range(rows) for c in range(cols)]
    if not seeded:  # top-left corners
        expected = [r * sy * width + c * sx for r in range(rows) for c in range(cols)]
        assert dst.tolist() == expected


def test_seeded_destinations_are_reproducible_and_vary():
    draw = lambda seed: window_destinations(16, 16, 2, 2, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("bad", [{"sx": 0}, {"sy": -1}, {"sx": 9}, {"height": 0}])
def test_bad_window_arguments_name_the_parameter(bad):
    args = {"height": 8, "width": 8, "sx": 2, "sy": 2} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        window_destinations(**args)


def test_plan_is_a_partition_with_slots_at_destinations():
    metric = torch.randn(3, 48, 5)
    dst = window_destinations(6, 8, 2, 2)
    scores = score_windows(metric, dst)
    for r in (0, 1, 20, scores.max_r):
        plan = scores.plan(r)
        everything = torch.cat([plan.kept_idx, plan.merged_idx], dim=1).sort(dim=1).values
        assert torch.equal(everything, torch.arange(48).expand(3, -1))
        assert plan.r == r and plan.num_out == 48 - r
        if r:
            assert torch.equal(plan.kept_idx[:, : dst.numel()], dst.expand(3, -1))
            assert int(plan.merged_into.max()) < dst.numel()  # only into destinations
    with pytest.raises(ValueError, match="r must be an int in"):
        scores.plan(scores.max_r + 1)


def test_sources_merge_into_most_similar_destination_in_degree_order():
    metric = torch.randn(2, 24, 6, dtype=torch.float64)
    dst = window_destinations(4, 6, 2, 2)
    scores = score_windows(metric, dst)
    normed = metric / metric.norm(dim=-1, keepdim=True)
    for b in range(2):
        sims = []
        for i in scores.src_idx[b].tolist():
            row = [float(normed[b, i] @ normed[b, j]) for j in dst.tolist()]
            sims.append(max(row))
            assert row.index(max(row)) == int(scores.partner[b, len(sims) - 1])
        assert sims == sorted(sims, reverse=True)


def test_semantic_value_keeps_important_tokens_unmerged():
    metric = torch.randn(1, 64, 8)
    dst = window_destinations(8, 8, 2, 2)
    plain = score_windows(metric, dst).plan(16)
    semantic = torch.ones(1, 64)
    top = plain.merged_idx[0, :4]
    semantic[0, top] = 100.0  # the four most redundant tokens become important
    guided = score_windows(metric, dst, semantic, TurboConfig(alpha=1.0)).plan(16)
    assert not set(top.tolist()) & set(guided.merged_idx[0].tolist())
    redundancy_only = score_windows(metric, dst, semantic, TurboConfig(alpha=0.0)).plan(16)
    assert torch.equal(redundancy_only.merged_idx, plain.merged_idx)


def test_merge_then_copy_restore_is_exact_on_window_constant_grid():
    # every 2x2 window holds one distinct direction: each source's best destination is
    # its own window's, the merge averages identical tokens, restoring must give x back
    height, width = 6, 8
    windows = (height // 2) * (width // 2)
    basis = torch.eye(windows, dtype=torch.float64)
    grid = basis.view(height // 2, width // 2, windows)
    grid = grid.repeat_interleave(2, 0).repeat_interleave(2, 1)  # (H, W, C)
    x = grid.reshape(1, height * width, windows).expand(2, -1, -1).contiguous()
    dst = window_destinations(height, width, 2, 2, torch.Generator().manual_seed(0))
    plan = score_windows(x, dst).plan(3 * windows)  # every source merges
    merged, _ = SizeWeightedMerger().merge(x, plan)
    assert merged.shape == (2, windows, windows)
    assert torch.equal(CopyRestorer().restore(merged, plan), x)
