"""The probe object itself: autocast, activation checkpointing, re-attach, block size."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from anchor_former.probes import AttentionProbe


def tiny_clip(layers: int = 3) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionModel(config).eval()


def test_autocast_keeps_the_row_float32() -> None:
    model = tiny_clip()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionProbe(model) as plain:
        model(pixel_values=pixels)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), AttentionProbe(model) as mixed:
        model(pixel_values=pixels)
    assert mixed.attention.dtype == torch.float32
    # the row itself is float32 with autocast off; the bf16 layers before it move it by 9e-5 (measured)
    torch.testing.assert_close(mixed.attention, plain.attention, atol=4e-4, rtol=0)
    assert (plain.attention - 1 / plain.attention.shape[-1]).abs().max() > 4e-4  # a uniform row would fail


def test_gradient_checkpointing_reruns_are_not_captured() -> None:
    model = tiny_clip().train()
    model.gradient_checkpointing_enable()
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    with AttentionProbe(model) as probe:
        out = model(pixel_values=pixels).last_hidden_state
        out.sum().backward()  # recomputes the blocks inside backward, hooks still attached
    assert len(probe.captures) == 1 and pixels.grad is not None


def test_reattach_forgets_old_captures_and_double_attach_raises() -> None:
    model = tiny_clip()
    probe = AttentionProbe(model)
    with torch.no_grad(), probe:
        model(pixel_values=torch.randn(1, 3, 32, 32))
        with pytest.raises(RuntimeError, match="already attached"):
            probe.attach()
    with torch.no_grad(), probe:
        model(pixel_values=torch.randn(2, 3, 32, 32))
    assert probe.features.shape[0] == 2


def test_received_block_size_changes_nothing_but_memory() -> None:
    model = tiny_clip()
    pixels = torch.randn(2, 3, 32, 32)
    rows = []
    for block in (1, 5, 17, 4096):
        with torch.no_grad(), AttentionProbe(model, score="received", block_size=block) as probe:
            model(pixel_values=pixels)
        rows.append(probe.attention)
    for row in rows[1:]:
        torch.testing.assert_close(row, rows[0], atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        AttentionProbe(model, score="received", block_size=0)
