"""The probe mechanism itself: the row math, layer indexing, the registry, autocast, checkpointing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from anchor_former.probes import AttentionProbe, attention_row, detect_encoder, registered_families
from anchor_former.probes.registry import register_encoder_family


def reference_row(q0, k, scale, padding=None):
    """softmax(scale * q0 . k_j) over j, in float64, the obvious way: one (b, h) at a time."""
    batch, heads, num, _ = k.shape
    out = torch.zeros(batch, heads, num, dtype=torch.float64)
    for b in range(batch):
        real = torch.ones(num, dtype=torch.bool) if padding is None else padding[b]
        for h in range(heads):
            if not real.any():
                continue
            logits = (k[b, h, real].double() @ q0[b, h].double()) * scale
            out[b, h, real] = logits.softmax(-1)
    return out


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), tokens=st.integers(1, 20), heads=st.integers(1, 4), head_dim=st.integers(1, 8),
    padded=st.booleans(), seed=st.integers(0, 2**16),
)
def test_row_equals_explicit_attention(batch, tokens, heads, head_dim, padded, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    q0 = torch.randn(batch, heads, head_dim, generator=g)
    k = torch.randn(batch, heads, tokens, head_dim, generator=g)
    real = torch.rand(batch, tokens, generator=g) > 0.3 if padded else None
    row = attention_row(q0, k, scale=head_dim**-0.5, key_padding_mask=real)
    assert row.shape == (batch, heads, tokens) and row.dtype == torch.float32
    torch.testing.assert_close(row, reference_row(q0, k, head_dim**-0.5, real).float(), atol=1e-6, rtol=1e-5)


def test_row_refuses_bad_shapes() -> None:
    k = torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match=r"query must have shape \(2, 4, 8\) \(B, H, E\).*got shape \(2, 8\)"):
        attention_row(torch.randn(2, 8), k, scale=1.0)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \(2, 5\)"):
        attention_row(torch.randn(2, 4, 8), k, scale=1.0, key_padding_mask=torch.ones(2, 5))


def tiny_clip(layers: int = 3) -> CLIPVisionModel:
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                              image_size=32, patch_size=8)
    return CLIPVisionModel(config).eval()


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_block_index_follows_hidden_states(layers: int) -> None:
    spec = detect_encoder(tiny_clip(layers))
    for layer in range(1, layers + 1):
        assert spec.block_index(layer) == layer - 1
        assert spec.block_index(layer - layers - 1) == layer - 1  # hidden_states[-k] == hidden_states[L + 1 - k]
    for bad in (0, layers + 1, -layers - 1, True, 1.0):
        with pytest.raises(ValueError, match="layer must"):
            spec.block_index(bad)


def test_registry_lists_the_families() -> None:
    assert {f.name for f in registered_families()} >= {"clip", "dinov2", "timm_vit", "siglip"}
    with pytest.raises(ValueError, match=r"torch.nn.modules.container.Sequential is not a supported.*dinov2"):
        detect_encoder(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="not a supported vision encoder"):
        AttentionProbe("not a model")  # type: ignore[arg-type]


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


def test_registering_an_existing_name_needs_replace() -> None:
    families = registered_families()
    clip = next(f for f in families if f.name == "clip")
    assert "clip" in repr(clip) and "CLIPVisionModel" in repr(clip)
    with pytest.raises(ValueError, match="family name 'clip' is already registered.*replace=True"):
        register_encoder_family(type(clip)())
    assert registered_families() == families
    try:
        replacement = type(clip)()
        assert register_encoder_family(replacement, replace=True) is replacement
        assert [f.name for f in registered_families()] == [f.name for f in families]  # same place in the order
        assert any(f is replacement for f in registered_families())
    finally:
        register_encoder_family(clip, replace=True)
    with pytest.raises(ValueError, match="family must be an EncoderFamily with a non-empty name"):
        register_encoder_family("clip")  # type: ignore[arg-type]


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
