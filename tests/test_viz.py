"""The anchor plot: a PNG with the anchors boxed on the patch grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from anchor_former import extract_anchors  # noqa: E402
from anchor_former.viz import plot_anchors, save_anchor_plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_save_anchor_plot_writes_png(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = CLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    result = extract_anchors(model, pixels, num_anchors=4)
    out = save_anchor_plot(tmp_path / "anchors.png", result, index=1, image=pixels[1])
    assert out.read_bytes()[:8] == PNG_MAGIC
    out = save_anchor_plot(tmp_path / "grid.png", result)  # no image: heat map and grid only
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_save_anchor_plot_takes_each_images_grid_in_a_mixed_batch(tmp_path: Path) -> None:
    """SigLIP2 NaFlex: no common grid_size; image 1 has a 2 x 3 grid and padding after its 6 tokens."""
    from dataclasses import replace

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    result = extract_anchors(CLIPVisionModel(config).eval(), torch.randn(2, 3, 32, 32), num_anchors=4)
    mixed = replace(
        result,
        grid_size=None,
        grid_sizes=((4, 4), (2, 3)),
        anchor_idx=torch.tensor([[0, 1, 5, 9, 16], [0, 1, 2, 4, 6]]),
    )
    assert save_anchor_plot(tmp_path / "a.png", mixed, index=1).read_bytes()[:8] == PNG_MAGIC
    assert save_anchor_plot(tmp_path / "b.png", mixed, index=0).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="anchor_idx must index the 7 tokens of a 2x3 grid"):
        save_anchor_plot(tmp_path / "c.png", replace(mixed, anchor_idx=mixed.anchor_idx.flip(0)), index=1)


def test_plot_anchors_draws_one_box_per_anchor() -> None:
    fig = plot_anchors(
        torch.tensor([0, 1, 6, 16]),
        grid_size=(4, 4),
        num_prefix_tokens=1,
        image=torch.rand(32, 32, 3),
        scores=torch.rand(4, 17),
    )
    boxes = fig.axes[0].patches
    assert len(boxes) == 3  # [CLS] is not drawn
    corners = sorted((b.get_x(), b.get_y()) for b in boxes)
    assert corners == [(0.0, 0.0), (8.0, 8.0), (24.0, 24.0)]  # tokens 1, 6, 16 -> patches (0,0), (1,1), (3,3)


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"anchor_idx must have shape \(K,\)"):
        plot_anchors(torch.zeros(2, 3, dtype=torch.long), grid_size=(4, 4))
    with pytest.raises(ValueError, match="anchor_idx must index the 17 tokens"):
        plot_anchors(torch.tensor([0, 17]), grid_size=(4, 4))
    with pytest.raises(ValueError, match=r"scores must have shape \(17,\) or \(H, 17\), got shape \(16,\)"):
        plot_anchors(torch.tensor([1]), grid_size=(4, 4), scores=torch.rand(16))
