"""Any-resolution ("anyres") views of one image, their anchor budgets and the LLM token layout.

LLaVA-NeXT (LLaVA-1.6) and its successors encode an image as several ViT views: a **base view** (the
whole image resized to the ViT's square input) and **crops** of a high-resolution version of it. This
module holds the host-independent rules (no transformers / llava imports): which views an image of a
given size gets, which patches of each view carry image content, how many anchors each view gets, and
in which order the kept tokens (and ``image_newline`` tokens) reach the LLM. Both hosts' adapters (the
transformers ``LlavaNextForConditionalGeneration`` adapter and the ``llava-torch`` anyres adapter) call
it, so a processor's token count and the model's output come from the same arithmetic.

Views (what both hosts do):

1. the grid pinpoint ``(PH, PW)`` (pixels) is chosen by :func:`select_best_resolution`;
2. the image is resized (aspect ratio kept) and padded to ``(PH, PW)`` and cut into ``R x C`` crops
   of the view size (``R = PH / view_size``, ``C = PW / view_size``), row-major;
3. views = ``[base, crop (0, 0), crop (0, 1), ..., crop (R - 1, C - 1)]``, ``V = 1 + R * C``; each view
   has ``s x s`` patches, ``s = view_size // patch_size``.

The crops' patches form one high-resolution grid of ``(R * s) x (C * s)`` patches. ``merge`` (LLaVA's
``mm_patch_merge_type``) says how the tokens of the views are laid out for the LLM:

* ``"flat"``: the views one after another, each in raster order; nothing removed, no newlines.
* ``"spatial"``: the base view (raster), then the whole high-resolution grid in raster order (row by
  row across crops); no newlines.
* ``"spatial_unpad"`` (LLaVA-NeXT's, and transformers' only layout): as ``"spatial"``, but the rows or
  columns of the grid that only cover the padding of step 2 are removed ("unpadding"), and one
  ``image_newline`` token closes every remaining row of the grid.

Anchors, per view: a view's **candidates** are its patches that the layout keeps (all of them, except
under ``"spatial_unpad"``, where the unpadded-away patches are not candidates: they show padding).
:func:`view_budgets` gives each view ``k_v`` anchors, either ``K`` per view (``min(K, c_v)`` for a view
with ``c_v`` candidates) or one budget ``B`` per image spread over the views in proportion to their
candidate counts. The **layout at reduced budget** is the stock layout restricted to the kept patches:
the base view's anchors (raster order), then the crops' anchors in the order the stock layout would
put them, with (``"spatial_unpad"``) every row's ``image_newline`` still closing its row, so the LLM
keeps the row structure. At full budget (``k_v = c_v``) this IS the stock layout, token for token.

Connectors that return a fixed number ``T`` of tokens per view (AcFormer: ``K + 1``; perceiver,
pooling) are laid out by :func:`arrange_fixed`: the base view's ``T`` tokens, then the crops in
row-major order, ``T`` tokens each; under ``"spatial_unpad"`` one ``image_newline`` closes each row of
crops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from anchor_former._validation import shape_str
from anchor_former.search import anchor_search

__all__ = [
    "AnyresViews",
    "Merge",
    "anyres_views",
    "num_fixed_tokens",
    "num_selected_tokens",
    "select_best_resolution",
    "view_budgets",
]

Merge = Literal["flat", "spatial", "spatial_unpad"]
MERGES: tuple[str, ...] = ("flat", "spatial", "spatial_unpad")


def _check_size(name: str, value: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {value!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {value!r}")
    return h, w


def select_best_resolution(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The grid pinpoint an image is resized and padded to, as LLaVA-NeXT chooses it.

    The pinpoint that keeps the most image pixels after an aspect-preserving downscale
    (``min(int(w * scale) * int(h * scale), w * h)``) wins; ties go to the one that wastes the fewest
    pixels, then to the earlier one.

    Args:
        image_size: ``(height, width)`` of the original image, pixels.
        grid_pinpoints: candidate resolutions ``[(height, width), ...]``, pixels.

    Returns:
        ``(height, width)`` of the chosen pinpoint.
    """
    height, width = _check_size("image_size", image_size)
    if not grid_pinpoints:
        raise ValueError(f"grid_pinpoints must be a non-empty list of (height, width) pairs, got {grid_pinpoints!r}")
    best, best_effective, best_waste = None, 0, float("inf")
    for pinpoint in grid_pinpoints:
        ph, pw = _check_size("grid_pinpoints entry", pinpoint)
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    assert best is not None  # every pinpoint has effective >= 1 > 0
    return best


@dataclass(frozen=True)
class AnyresViews:
    """The views of one image and the part of the high-resolution grid the layout keeps.

    Attributes:
        grid: ``(R, C)`` crops (rows, columns).
        side: ``s``, patches per view side (each view has ``s * s`` patches).
        merge: ``"flat"``, ``"spatial"`` or ``"spatial_unpad"`` (see the module doc).
        rows: ``(top, bottom)``: the kept rows ``top <= r < bottom`` of the ``(R * s) x (C * s)`` patch grid.
        cols: ``(left, right)``: the kept columns, likewise. The whole grid unless ``"spatial_unpad"``.
    """

    grid: tuple[int, int]
    side: int
    merge: str
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def num_views(self) -> int:
        """``V = 1 + R * C``: the base view and the crops."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def num_newlines(self) -> int:
        """``image_newline`` tokens of the selected-patch layout: one per kept grid row (``"spatial_unpad"``)."""
        return self.rows[1] - self.rows[0] if self.merge == "spatial_unpad" else 0

    def candidate_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(V, s * s)`` bool, True = a patch the layout keeps (a candidate anchor); row 0 is the base view."""
        r, c = self.grid
        s = self.side
        grid_rows = torch.arange(r * s, device=device)
        grid_cols = torch.arange(c * s, device=device)
        keep_r = (grid_rows >= self.rows[0]) & (grid_rows < self.rows[1])  # (R * s,)
        keep_c = (grid_cols >= self.cols[0]) & (grid_cols < self.cols[1])  # (C * s,)
        keep = keep_r[:, None] & keep_c[None, :]  # (R * s, C * s)
        crops = keep.view(r, s, c, s).permute(0, 2, 1, 3).reshape(r * c, s * s)  # (R * C, s * s), row-major crops
        base = torch.ones(1, s * s, dtype=torch.bool, device=device)
        return torch.cat([base, crops], dim=0)

    def num_candidates(self) -> tuple[int, ...]:
        """Candidate patches per view, ``(c_0, ..., c_{V-1})`` (``c_0 = s * s``: the base view is never unpadded)."""
        s = self.side
        top, bottom = self.rows
        left, right = self.cols
        counts = [s * s]
        for i in range(self.grid[0]):
            rows = max(0, min(bottom, (i + 1) * s) - max(top, i * s))
            for j in range(self.grid[1]):
                counts.append(rows * max(0, min(right, (j + 1) * s) - max(left, j * s)))
        return tuple(counts)


def _unpad_bounds(
    image_size: tuple[int, int], grid_height: int, grid_width: int, rounding: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The rows/columns of a ``grid_height x grid_width`` grid that cover the image, not the padding.

    The same float arithmetic as both hosts' ``unpad_image`` (transformers rounds to 7 decimals before
    ``int``; llava-torch truncates), so the bounds agree with theirs exactly.
    """
    height, width = image_size
    if width / height > grid_width / grid_height:
        exact = height * (grid_width / width)
        new_height = int(round(exact, 7)) if rounding == "round" else int(exact)
        pad = (grid_height - new_height) // 2
        return (pad, grid_height - pad), (0, grid_width)
    exact = width * (grid_height / height)
    new_width = int(round(exact, 7)) if rounding == "round" else int(exact)
    pad = (grid_width - new_width) // 2
    return (0, grid_height), (pad, grid_width - pad)


def anyres_views(
    image_size: Sequence[int],
    *,
    grid_pinpoints: Sequence[Sequence[int]],
    view_size: int,
    patch_size: int,
    merge: str = "spatial_unpad",
    rounding: Literal["round", "floor"] = "round",
) -> AnyresViews:
    """The views of an image of ``image_size`` and the grid region its layout keeps.

    Args:
        image_size: ``(height, width)`` of the original image, pixels.
        grid_pinpoints: ``[(height, width), ...]`` pixels, each a multiple of ``view_size``.
        view_size: the ViT's square input size, pixels (336 for CLIP ViT-L/14-336).
        patch_size: the ViT's patch size, pixels (14); ``s = view_size // patch_size``.
        merge: ``"flat"``, ``"spatial"`` or ``"spatial_unpad"``.
        rounding: how the unpadded length is made an int: ``"round"`` (transformers:
            ``int(round(x, 7))``) or ``"floor"`` (llava-torch: ``int(x)``).

    Returns:
        An :class:`AnyresViews`.

    Raises:
        ValueError: a bad size, an unknown ``merge`` or ``rounding``, a pinpoint that is not a multiple of
            ``view_size``, or ``view_size`` not a multiple of ``patch_size``.
    """
    size = _check_size("image_size", image_size)
    if merge not in MERGES:
        raise ValueError(f"merge (mm_patch_merge_type) must be one of {', '.join(MERGES)}, got {merge!r}")
    if rounding not in ("round", "floor"):
        raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")
    for name, value in (("view_size", view_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if view_size % patch_size:
        raise ValueError(f"view_size must be a multiple of patch_size={patch_size}, got {view_size}")
    ph, pw = select_best_resolution(size, grid_pinpoints)
    if ph % view_size or pw % view_size:
        raise ValueError(
            f"grid_pinpoints entries must be multiples of view_size={view_size}, got the chosen pinpoint {[ph, pw]}"
        )
    grid = (ph // view_size, pw // view_size)
    side = view_size // patch_size
    rows, cols = (0, grid[0] * side), (0, grid[1] * side)
    if merge == "spatial_unpad":
        rows, cols = _unpad_bounds(size, grid[0] * side, grid[1] * side, rounding)
    return AnyresViews(grid=grid, side=side, merge=merge, rows=rows, cols=cols)


def view_budgets(
    candidates: Sequence[int], *, per_view: int | None = None, per_image: int | None = None
) -> tuple[int, ...]:
    """Anchors per view, ``(k_0, ..., k_{V-1})``, from exactly one of ``per_view`` and ``per_image``.

    * ``per_view = K``: ``k_v = min(K, c_v)``.
    * ``per_image = B``: with ``V'`` views that have candidates and ``C = sum(c_v)`` candidates, if
      ``B >= C`` every candidate is kept (``k_v = c_v``); otherwise each such view gets one anchor and the
      other ``B - V'`` are spread in proportion to ``c_v - 1`` by largest remainder (ties to the earlier
      view): ``k_v = 1 + floor(q_v) (+ 1)``, ``q_v = (B - V') (c_v - 1) / (C - V')``. So
      ``sum(k_v) = min(B, C)``, ``1 <= k_v <= c_v``, and views without candidates get 0.

    Args:
        candidates: ``c_v``, candidate patches per view (:meth:`AnyresViews.num_candidates`).
        per_view: K anchors per view, ``>= 1``.
        per_image: B anchors per image, at least the number of views with candidates.

    Returns:
        ``k_v`` per view, ints.

    Raises:
        ValueError: both or neither budget given, a budget < 1, or ``per_image`` below the number of views.
    """
    counts = [int(c) for c in candidates]
    if (per_view is None) == (per_image is None):
        raise ValueError(
            f"pass exactly one of per_view and per_image, got per_view={per_view!r}, per_image={per_image!r}"
        )
    budget = per_view if per_image is None else per_image
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        name = "per_view" if per_image is None else "per_image"
        raise ValueError(f"{name} must be an integer >= 1, got {budget!r}")
    if per_image is None:  # per_view given
        return tuple(min(budget, c) for c in counts)
    live = [v for v, c in enumerate(counts) if c > 0]
    total = sum(counts)
    if per_image < len(live):
        raise ValueError(
            f"per_image must be at least the number of views with candidates ({len(live)}: each view gets an "
            f"anchor), got {per_image}"
        )
    if per_image >= total:
        return tuple(counts)
    spread, weight = per_image - len(live), total - len(live)
    shares = {v: spread * (counts[v] - 1) for v in live}  # numerators over `weight`
    k = [0] * len(counts)
    for v in live:
        k[v] = 1 + shares[v] // weight
    left = per_image - sum(k)
    for v in sorted(live, key=lambda v: (-(shares[v] % weight), v))[:left]:
        k[v] += 1
    return tuple(k)


def num_selected_tokens(views: AnyresViews, budgets: Sequence[int]) -> int:
    """LLM tokens of the selected-patch layout: ``sum(k_v)`` plus :attr:`AnyresViews.num_newlines`."""
    return int(sum(budgets)) + views.num_newlines


def num_fixed_tokens(views: AnyresViews, tokens_per_view: int) -> int:
    """LLM tokens of :func:`arrange_fixed`: ``V * T`` plus one newline per crop row under ``"spatial_unpad"``."""
    return views.num_views * tokens_per_view + (views.grid[0] if views.merge == "spatial_unpad" else 0)


def _selected_keys(views: AnyresViews, view: int, patches: torch.Tensor) -> torch.Tensor:
    """Sort keys of the kept patches of one view (``(k,)`` patch indices in ``[0, s * s)``) in the layout."""
    s = views.side
    if view == 0:
        return patches  # the base view first, raster order
    if views.merge == "flat":
        return view * s * s + patches
    i, j = divmod(view - 1, views.grid[1])
    g_row = i * s + torch.div(patches, s, rounding_mode="floor")  # (k,) rows of the high-res grid
    g_col = j * s + patches % s
    top, left = views.rows[0], views.cols[0]
    width = views.cols[1] - left + int(views.merge == "spatial_unpad")  # + the newline column
    return s * s + (g_row - top) * width + (g_col - left)


def arrange_selected(
    views: AnyresViews, patches: Sequence[torch.Tensor], tokens: torch.Tensor, newline: torch.Tensor | None
) -> torch.Tensor:
    """Lay out the kept patches' tokens of one image (and the newlines) in the order the LLM sees them.

    Args:
        views: the image's :class:`AnyresViews`.
        patches: V tensors ``(k_v,)``: view v's kept patch indices (``0 <= p < s * s``, raster order within
            the view; the [CLS]/prefix tokens excluded), each a candidate of :meth:`AnyresViews.candidate_mask`.
        tokens: ``(sum k_v, D)`` the kept tokens, view 0's first, each view's in ``patches`` order.
        newline: ``(D,)`` the ``image_newline`` vector (needed only under ``"spatial_unpad"``).

    Returns:
        ``(sum k_v + num_newlines, D)``: the base view's tokens, then the crops' tokens in stock-layout
        order, with one ``newline`` closing each kept grid row under ``"spatial_unpad"``.
    """
    if len(patches) != views.num_views:
        raise ValueError(f"patches must hold one index tensor per view ({views.num_views}), got {len(patches)}")
    count = sum(int(p.numel()) for p in patches)
    if tokens.ndim != 2 or tokens.shape[0] != count:
        raise ValueError(f"tokens must have shape (sum k_v, D) = ({count}, D), got shape {shape_str(tokens)}")
    keys = [_selected_keys(views, v, p.to(tokens.device).long()) for v, p in enumerate(patches)]
    parts = [tokens]
    if views.num_newlines:
        if newline is None or newline.shape != tokens.shape[1:]:
            got = None if newline is None else shape_str(newline)
            raise ValueError(f"newline must have shape ({tokens.shape[1]},) under merge='spatial_unpad', got {got}")
        width = views.cols[1] - views.cols[0] + 1
        rows = torch.arange(views.num_newlines, device=tokens.device)
        keys.append(views.side**2 + rows * width + width - 1)  # the last column of each kept row
        parts.append(newline.to(tokens.dtype).expand(views.num_newlines, -1))
    order = torch.cat(keys).argsort()  # keys are distinct
    return torch.cat(parts, dim=0)[order]


def arrange_fixed(views: AnyresViews, tokens: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
    """Lay out a fixed-size connector's per-view tokens of one image.

    Args:
        views: the image's :class:`AnyresViews`.
        tokens: ``(V, T, D)``: T tokens per view, views in order (base, then crops row-major).
        newline: ``(D,)`` the ``image_newline`` vector (needed only under ``"spatial_unpad"``).

    Returns:
        ``(V * T + newlines, D)``: base view, then each row of crops followed (``"spatial_unpad"``) by one
        ``newline``.
    """
    v, t, d = tokens.shape
    if v != views.num_views:
        raise ValueError(f"tokens must have shape (V={views.num_views}, T, D), got shape {shape_str(tokens)}")
    if views.merge != "spatial_unpad":
        return tokens.reshape(v * t, d)
    if newline is None or newline.shape != (d,):
        got = None if newline is None else shape_str(newline)
        raise ValueError(f"newline must have shape ({d},) under merge='spatial_unpad', got {got}")
    r, c = views.grid
    crops = tokens[1:].reshape(r, c * t, d)  # (R, C * T, D): one row of crops per entry
    closing = newline.to(tokens.dtype).expand(r, 1, d)
    return torch.cat([tokens[0], torch.cat([crops, closing], dim=1).reshape(-1, d)], dim=0)


def select_view_tokens(
    views: AnyresViews,
    budgets: Sequence[int],
    features: torch.Tensor,
    scores: torch.Tensor,
    *,
    num_prefix_tokens: int,
    projector: Callable[[torch.Tensor], torch.Tensor],
    newline: torch.Tensor | None,
) -> torch.Tensor:
    """One image's training-free tokens: each view's anchors through ``projector``, in the stock layout.

    View ``v`` keeps ``k_v = budgets[v]`` anchors, found by :func:`~anchor_former.anchor_search` on its own
    score row among its candidate patches only (:meth:`AnyresViews.candidate_mask`; a view keeping every
    candidate needs no search). Views with the same budget are searched in one batched call.

    Args:
        views: the image's :class:`AnyresViews`.
        budgets: ``k_v`` per view (:func:`view_budgets`).
        features: ``(V, N, D)`` the views' tokens of the selected ViT layer, ``num_prefix_tokens`` prefix
            tokens first, then the ``s * s`` patches in raster order.
        scores: ``(V, H, N)`` [CLS] attention rows or ``(V, N)`` per-token scores of the same layer.
        num_prefix_tokens: leading non-patch tokens (1 for CLIP's [CLS]).
        projector: maps ``(T, D)`` features to ``(T, llm_dim)`` (the checkpoint's own projector).
        newline: ``(llm_dim,)`` the ``image_newline`` vector (``"spatial_unpad"`` only).

    Returns:
        ``(sum k_v + num_newlines, llm_dim)``, laid out by :func:`arrange_selected`.
    """
    prefix = num_prefix_tokens
    if features.ndim != 3 or features.shape[0] != views.num_views or features.shape[1] != prefix + views.side**2:
        raise ValueError(
            f"features must have shape (V, N, D) = ({views.num_views}, {prefix + views.side**2}, D), "
            f"got shape {shape_str(features)}"
        )
    mask = views.candidate_mask(features.device)  # (V, P)
    patches = [mask[v].nonzero().flatten() for v in range(views.num_views)]
    by_budget: dict[int, list[int]] = {}
    for v, k in enumerate(budgets):
        if k > patches[v].numel():
            raise ValueError(f"budgets[{v}] must be at most the view's {patches[v].numel()} candidates, got {k}")
        if k < patches[v].numel():  # a view keeping every candidate needs no search
            by_budget.setdefault(int(k), []).append(v)
    for k, group in by_budget.items():
        if k == 0:
            for v in group:
                patches[v] = patches[v][:0]
            continue
        real = torch.cat([mask.new_ones(len(group), prefix), mask[group]], dim=1)  # (G, N), True = candidate
        found = anchor_search(scores[group], k, include_cls=False, num_prefix_tokens=prefix, key_padding_mask=real)
        for v, row in zip(group, found - prefix, strict=True):  # (k,) ascending patch indices
            patches[v] = row
    kept = torch.cat([features[v, prefix + p] for v, p in enumerate(patches)], dim=0)  # (sum k_v, D)
    return arrange_selected(views, patches, projector(kept), newline)
