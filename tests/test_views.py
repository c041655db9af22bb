"""Anyres views, budgets and layouts (``anchor_former.views``) against slow references written here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchor_former.views import (
    anyres_views,
    arrange_fixed,
    arrange_selected,
    num_fixed_tokens,
    num_selected_tokens,
    select_best_resolution,
    view_budgets,
)

PINPOINTS = [[8, 16], [16, 8], [16, 16], [24, 8], [8, 24]]  # LLaVA-NeXT's five, scaled: view 8 px, patch 2 px
VIEW, PATCH, SIDE = 8, 2, 4

sizes = st.tuples(st.integers(1, 400), st.integers(1, 400))


def reference_layout(features: torch.Tensor, views, newline: torch.Tensor, image_size) -> torch.Tensor:
    """The stock merge, written out: ``features (V, s*s, D)`` → the LLM tokens, with python loops."""
    s, (r, c) = views.side, views.grid
    base = [features[0, p] for p in range(s * s)]
    if views.merge == "flat":
        return torch.stack([features[v, p] for v in range(views.num_views) for p in range(s * s)])
    grid = [[features[1 + (y // s) * c + x // s, (y % s) * s + x % s] for x in range(c * s)] for y in range(r * s)]
    out = list(base)
    if views.merge == "spatial":
        return torch.stack(out + [t for row in grid for t in row])
    h, w = image_size  # unpad as transformers' unpad_image does
    gh, gw = r * s, c * s
    if w / h > gw / gh:
        pad = (gh - int(round(h * (gw / w), 7))) // 2
        grid = grid[pad : gh - pad]
    else:
        pad = (gw - int(round(w * (gh / h), 7))) // 2
        grid = [row[pad : gw - pad] for row in grid]
    for row in grid:
        out += row + [newline]
    return torch.stack(out)


@settings(max_examples=30, deadline=None)
@given(size=sizes, merge=st.sampled_from(["flat", "spatial", "spatial_unpad"]))
def test_full_budget_layout_is_the_stock_layout(size, merge) -> None:
    views = anyres_views(size, grid_pinpoints=PINPOINTS, view_size=VIEW, patch_size=PATCH, merge=merge)
    features = torch.randn(views.num_views, SIDE * SIDE, 3)
    newline = torch.randn(3)
    mask = views.candidate_mask()
    patches = [m.nonzero().flatten() for m in mask]
    tokens = torch.cat([features[v, p] for v, p in enumerate(patches)])
    got = arrange_selected(views, patches, tokens, newline)
    want = reference_layout(features, views, newline, size)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    budgets = view_budgets(views.num_candidates(), per_view=SIDE * SIDE)
    assert budgets == tuple(int(m.sum()) for m in mask)
    assert num_selected_tokens(views, budgets) == want.shape[0]


def test_layout_check_bites_on_a_wrong_view_order() -> None:
    views = anyres_views((100, 300), grid_pinpoints=PINPOINTS, view_size=VIEW, patch_size=PATCH)
    features = torch.randn(views.num_views, SIDE * SIDE, 3)
    patches = [m.nonzero().flatten() for m in views.candidate_mask()]
    swapped = [patches[0], patches[2], patches[1], *patches[3:]]  # crops 0 and 1 exchanged
    tokens = torch.cat([features[v, p] for v, p in zip([0, 2, 1, *range(3, views.num_views)], swapped, strict=True)])
    got = arrange_selected(views, patches, tokens, torch.zeros(3))
    assert not torch.equal(got, reference_layout(features, views, torch.zeros(3), (100, 300)))


@settings(max_examples=30, deadline=None)
@given(size=sizes, k=st.integers(1, SIDE * SIDE), merge=st.sampled_from(["flat", "spatial", "spatial_unpad"]))
def test_reduced_layout_is_the_stock_layout_restricted_to_kept_patches(size, k, merge) -> None:
    views = anyres_views(size, grid_pinpoints=PINPOINTS, view_size=VIEW, patch_size=PATCH, merge=merge)
    mask = views.candidate_mask()
    budgets = view_budgets(views.num_candidates(), per_view=k)
    gen = torch.Generator().manual_seed(sum(size))
    patches = []
    for m, kv in zip(mask, budgets, strict=True):
        cand = m.nonzero().flatten()
        patches.append(cand[torch.randperm(cand.numel(), generator=gen)[:kv]].sort().values)
    # tag every token with (view, patch) and the newline with -1: the stock layout filtered to the kept tags
    tags = torch.stack(
        torch.meshgrid(torch.arange(views.num_views), torch.arange(SIDE * SIDE), indexing="ij"), -1
    ).float()
    newline = torch.tensor([-1.0, -1.0])
    tokens = torch.cat([tags[v, p] for v, p in enumerate(patches)])
    got = arrange_selected(views, patches, tokens, newline)
    kept = {(v, int(p)) for v, ps in enumerate(patches) for p in ps}
    stock = reference_layout(tags, views, newline, size)
    want = torch.stack([t for t in stock if t[0] < 0 or (int(t[0]), int(t[1])) in kept])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape[0] == num_selected_tokens(views, budgets)


@settings(max_examples=80, deadline=None)
@given(counts=st.lists(st.integers(0, 50), min_size=1, max_size=10), data=st.data())
def test_per_image_budget_is_proportional_and_exact(counts, data) -> None:
    live = sum(c > 0 for c in counts)
    if live == 0:
        return
    budget = data.draw(st.integers(live, sum(counts) + 5))
    k = view_budgets(counts, per_image=budget)
    assert sum(k) == min(budget, sum(counts))
    assert all((c == 0 and kv == 0) or 1 <= kv <= c for kv, c in zip(k, counts, strict=True))
    if budget < sum(counts):  # largest remainder: within one of 1 + the exact share
        spread, weight = budget - live, sum(counts) - live
        for kv, c in zip(k, counts, strict=True):
            if c:
                assert abs(kv - (1 + spread * (c - 1) / weight)) < 1


def test_per_image_budget_examples() -> None:
    assert view_budgets([16, 16, 16], per_image=48) == (16, 16, 16)
    assert view_budgets([16, 8, 0, 4], per_image=3) == (1, 1, 0, 1)
    assert view_budgets([16, 16, 16, 16, 16], per_image=12) == (3, 3, 2, 2, 2)  # ties to the earlier view
    assert view_budgets([576, 576, 576, 288, 288], per_image=576) == (144, 144, 144, 72, 72)


def test_fixed_layout_and_count() -> None:
    views = anyres_views((100, 300), grid_pinpoints=PINPOINTS, view_size=VIEW, patch_size=PATCH)
    assert views.grid == (1, 3)
    tokens = torch.arange(views.num_views * 2).float()[:, None].reshape(views.num_views, 2, 1)
    out = arrange_fixed(views, tokens, torch.tensor([-1.0]))
    assert out.flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1]
    assert out.shape[0] == num_fixed_tokens(views, 2)
    flat = anyres_views((100, 300), grid_pinpoints=PINPOINTS, view_size=VIEW, patch_size=PATCH, merge="flat")
    assert arrange_fixed(flat, tokens, None).flatten().tolist() == list(range(8))


@settings(max_examples=60, deadline=None)
@given(size=sizes)
def test_agrees_with_transformers_resolution_and_unpadding(size) -> None:
    modeling = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")  # transformers >= 4.39
    from transformers.image_processing_utils import select_best_resolution as hf_best

    unpad_image = modeling.unpad_image
    assert select_best_resolution(size, PINPOINTS) == tuple(hf_best(size, PINPOINTS))
    views = anyres_views(size, grid_pinpoints=PINPOINTS, view_size=VIEW, patch_size=PATCH)
    gh, gw = views.grid[0] * SIDE, views.grid[1] * SIDE
    marks = torch.arange(gh * gw).view(1, gh, gw)
    kept = unpad_image(marks, list(size))[0]
    assert kept.shape == (views.rows[1] - views.rows[0], views.cols[1] - views.cols[0])
    if kept.numel():  # an extreme aspect ratio can unpad every row away (then only the base view is left)
        assert int(kept[0, 0]) == views.rows[0] * gw + views.cols[0]


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: anyres_views((10, 10), grid_pinpoints=PINPOINTS, view_size=8, patch_size=2, merge="grid"),
            "merge .*must be one of flat, spatial, spatial_unpad, got 'grid'",
        ),
        (
            lambda: anyres_views((0, 10), grid_pinpoints=PINPOINTS, view_size=8, patch_size=2),
            r"image_size must be a \(height, width\) pair of positive ints, got \(0, 10\)",
        ),
        (
            lambda: anyres_views((10, 10), grid_pinpoints=[[12, 8]], view_size=8, patch_size=2),
            r"multiples of view_size=8, got the chosen pinpoint \[12, 8\]",
        ),
        (lambda: view_budgets([4, 4, 4], per_image=2), r"at least the number of views with candidates \(3.*got 2"),
        (lambda: view_budgets([4, 4], per_view=0), "per_view must be an integer >= 1, got 0"),
        (lambda: view_budgets([4, 4], per_view=1, per_image=3), "exactly one of per_view and per_image"),
    ],
)
def test_bad_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_select_view_tokens_searches_each_view_among_its_candidates() -> None:
    from anchor_former import anchor_search
    from anchor_former.views import select_view_tokens

    views = anyres_views((60, 300), grid_pinpoints=PINPOINTS, view_size=VIEW, patch_size=PATCH)  # 1 x 3, unpadded
    mask = views.candidate_mask()
    assert views.num_candidates() == (16, 8, 8, 8)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(views.num_views, 1 + SIDE * SIDE, 5, generator=gen)
    scores = torch.rand(views.num_views, 2, 1 + SIDE * SIDE, generator=gen)  # (V, H, N), [CLS] first
    budgets = view_budgets(views.num_candidates(), per_view=3)

    def projector(x):
        return x * 2

    newline = torch.full((5,), -1.0)
    got = select_view_tokens(
        views, budgets, features, scores, num_prefix_tokens=1, projector=projector, newline=newline
    )
    patches = []  # reference: one search per view, padded patches excluded
    for v in range(views.num_views):
        real = torch.cat([torch.ones(1, dtype=torch.bool), mask[v]])[None]
        patches.append(anchor_search(scores[v : v + 1], 3, include_cls=False, key_padding_mask=real)[0] - 1)
    assert all(bool(mask[v, p].all()) for v, p in enumerate(patches))
    tokens = torch.cat([features[v, 1 + p] for v, p in enumerate(patches)]) * 2
    torch.testing.assert_close(got, arrange_selected(views, patches, tokens, newline), rtol=0, atol=0)
    full = select_view_tokens(
        views, views.num_candidates(), features, scores, num_prefix_tokens=1, projector=projector, newline=newline
    )
    want = reference_layout(features[:, 1:] * 2, views, newline, (60, 300))
    torch.testing.assert_close(full, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"budgets\[1\] must be at most the view's 8 candidates, got 9"):
        select_view_tokens(
            views, (3, 9, 3, 3), features, scores, num_prefix_tokens=1, projector=projector, newline=newline
        )
