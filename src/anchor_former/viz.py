"""Draw visual anchors over the image and its patch grid (extra ``viz``: matplotlib).

The picture a user wants before trusting the method: the image, the anchor score as a heat map over the
patch grid, and a box around every anchor patch. Uses matplotlib's object API (no pyplot state, no
backend switch), so it is safe in scripts, notebooks and threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from anchor_former._optional import require
from anchor_former._validation import check_integer, check_ndim, shape_str

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from anchor_former.probes import AnchorExtraction

__all__ = ["plot_anchors", "save_anchor_plot"]


def _figure_class() -> type[Figure]:
    figure: type[Figure] = require("matplotlib.figure", extra="viz", feature="anchor_former.viz").Figure
    return figure


def _image_hwc(image: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` or ``(H, W, C)`` (C in 1, 3), any range → ``(H, W, C)`` float in [0, 1] on the CPU."""
    check_ndim("image", image, (2, 3), "(C, H_img, W_img), (H_img, W_img, C) or (H_img, W_img)")
    img = image.detach().float().cpu()
    if img.ndim == 2:
        img = img.unsqueeze(-1)
    elif img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.permute(1, 2, 0)  # (H, W, C)
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)  # undo any normalisation for display
    return img.expand(-1, -1, 3) if img.shape[-1] == 1 else img


def plot_anchors(
    anchor_idx: torch.Tensor,
    *,
    grid_size: tuple[int, int],
    num_prefix_tokens: int = 1,
    image: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    title: str | None = None,
) -> Figure:
    """Draw one sample's anchors as boxes on its patch grid, over the image and/or a score heat map.

    Args:
        anchor_idx: ``(K,)`` token indices of one sample (prefix tokens such as [CLS] are skipped),
            e.g. ``result.anchor_idx[b]``.
        grid_size: ``(rows, cols)`` of the patch grid; patch token ``num_prefix_tokens + r * cols + c``.
        num_prefix_tokens: leading special tokens of the sequence.
        image: the sample's image, ``(C, H_img, W_img)`` or ``(H_img, W_img, C)``; min-max scaled for
            display, so normalised ``pixel_values[b]`` work.
        scores: ``(N,)`` one score per token or ``(H, N)`` per head (averaged over heads), drawn as a
            heat map over the grid (prefix tokens dropped).
        title: figure title.

    Returns:
        a matplotlib ``Figure`` (save with ``fig.savefig(path)``).
    """
    Rectangle = require("matplotlib.patches", extra="viz", feature="anchor_former.viz").Rectangle

    check_ndim("anchor_idx", anchor_idx, (1,), "(K,) token indices of one sample")
    check_integer("anchor_idx", anchor_idx)
    rows, cols = grid_size
    num = num_prefix_tokens + rows * cols
    idx = anchor_idx.detach().cpu()
    if ((idx < 0) | (idx >= num)).any():
        raise ValueError(
            f"anchor_idx must index the {num} tokens of a {rows}x{cols} grid with {num_prefix_tokens} prefix "
            f"tokens, got values in [{int(idx.min())}, {int(idx.max())}]"
        )
    heat = None
    if scores is not None:
        check_ndim("scores", scores, (1, 2), f"({num},) or (H, {num})")
        if scores.shape[-1] != num:
            raise ValueError(f"scores must have shape ({num},) or (H, {num}), got shape {shape_str(scores)}")
        per_token = scores.detach().float().cpu()
        per_token = per_token.mean(0) if per_token.ndim == 2 else per_token
        heat = per_token[num_prefix_tokens:].reshape(rows, cols)

    fig = _figure_class()(figsize=(5, 5 * rows / cols + 0.4))
    ax = fig.add_subplot()
    if image is not None:
        img = _image_hwc(image)
        height, width = img.shape[:2]
        ax.imshow(img.numpy(), extent=(0, width, height, 0))
    else:
        height, width = rows, cols
    cell_h, cell_w = height / rows, width / cols
    if heat is not None:
        ax.imshow(
            heat.numpy(),
            extent=(0, width, height, 0),
            cmap="magma",
            alpha=0.55 if image is not None else 1.0,
            interpolation="nearest",
        )
    patches = idx[idx >= num_prefix_tokens] - num_prefix_tokens
    for p in patches.tolist():
        r, c = divmod(p, cols)
        ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="cyan", linewidth=1.5))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else f"{len(patches)} anchors on a {rows}x{cols} patch grid")
    fig.tight_layout()
    return fig


def save_anchor_plot(
    path: str | Path,
    result: AnchorExtraction,
    *,
    index: int = 0,
    image: torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Save sample ``index`` of an :func:`~anchor_former.extract_anchors` result as a PNG.

    Args:
        path: the output file (``.png``).
        result: what ``extract_anchors`` returned.
        index: which sample of the batch.
        image: that sample's image ``(C, H_img, W_img)``, e.g. ``pixel_values[index]``; None draws the grid
            and the score heat map only.
        title: figure title.

    Returns:
        the path written.
    """
    batch = result.anchor_idx.shape[0]
    if not -batch <= index < batch:
        raise ValueError(f"index must be in [-{batch}, {batch - 1}] for a batch of {batch}, got {index}")
    # a batch of mixed grids (SigLIP2 NaFlex) has no common grid_size: this image's own grid, and its scores
    # without the padding that follows its tokens
    rows, cols = result.grid_size if result.grid_size is not None else result.grid_sizes[index]
    fig = plot_anchors(
        result.anchor_idx[index],
        grid_size=(rows, cols),
        num_prefix_tokens=result.num_prefix_tokens,
        image=image,
        scores=result.scores[index][..., : result.num_prefix_tokens + rows * cols],
        title=title,
    )
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path
