"""SigLIP (no [CLS]): the pooling head's probe attention and token-norm scores."""

from __future__ import annotations

import pytest
import torch
from _probe_helpers import (
    assert_close_and_bites,
    column_mean,
    eager_copy,
    hook_count,
    mutants,
    reference_block,
    site_call,
)
from transformers import SiglipVisionConfig, SiglipVisionModel

from anchor_former import anchor_search
from anchor_former.probes import AttentionProbe, detect_encoder, extract_anchors, token_norm_scores

HEADS = 4


def build(**kwargs) -> SiglipVisionModel:
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        image_size=32,
        patch_size=8,
        **kwargs,
    )
    return SiglipVisionModel(config).eval()


def head_of(model: SiglipVisionModel) -> torch.nn.Module:
    return model.vision_model.head if hasattr(model, "vision_model") else model.head  # 4.x / 5.x layout


def test_map_row_equals_the_head_attention() -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionProbe(model, layer=-2, score="map") as probe:
        out = model(pixel_values=pixels, output_hidden_states=True)
    head = head_of(model)
    x = out.last_hidden_state  # what the head pools (after post_layernorm)
    probe_q = head.probe.expand(2, -1, -1)
    with torch.no_grad():
        # the head's own nn.MultiheadAttention, asked for its per-head weights
        weights = head.attention(probe_q, x, x, need_weights=True, average_attn_weights=False)[1][:, :, 0]
        # and an explicit float64 recomputation
        w, b = head.attention.in_proj_weight.double(), head.attention.in_proj_bias.double()
        q = torch.nn.functional.linear(probe_q.double(), w[:32], b[:32]).view(2, 1, HEADS, 8).transpose(1, 2)
        k = torch.nn.functional.linear(x.double(), w[32:64], b[32:64]).view(2, 16, HEADS, 8).transpose(1, 2)
        explicit = ((q @ k.transpose(-1, -2)) * 8**-0.5).softmax(-1)[:, :, 0]  # (B, H, N)
    assert probe.attention.shape == (2, HEADS, 16) and probe.num_prefix_tokens == 0 and not probe.has_cls
    torch.testing.assert_close(probe.attention, weights, atol=1e-5, rtol=0)
    torch.testing.assert_close(probe.attention, explicit.float(), atol=1e-5, rtol=0)
    assert torch.equal(probe.features, out.hidden_states[-2])

    result = extract_anchors(model, pixels, num_anchors=5, score="map")
    assert result.anchor_idx.shape == (2, 5)
    assert torch.equal(result.anchor_idx, anchor_search(weights, 5, include_cls=False, num_prefix_tokens=0))


@pytest.mark.parametrize("layer", [-2, 3])
def test_received_matches_eager_column_mean(layer: int) -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionProbe(model, layer=layer, score="received") as probe:
        out = model(pixel_values=pixels, output_hidden_states=True)
        attn = eager_copy(model)(pixel_values=pixels, output_attentions=True).attentions[reference_block(layer, 3)]
    site = probe.encoder.sites[reference_block(layer, 3)]
    broken = mutants(site, site_call(model, lambda: model(pixel_values=pixels), site), "received")
    assert probe.attention.shape == (2, HEADS, 16)
    assert_close_and_bites(probe.attention, column_mean(attn), broken)
    assert torch.equal(probe.features, out.hidden_states[layer])
    result = extract_anchors(model, pixels, num_anchors=5, layer=layer, score="received")
    assert torch.equal(result.anchor_idx, anchor_search(probe.attention, 5, include_cls=False, num_prefix_tokens=0))


def test_norm_score() -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    result = extract_anchors(model, pixels, num_anchors=4, layer=2, score="norm")
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
    norms = hidden.double().pow(2).sum(-1).sqrt()
    torch.testing.assert_close(result.scores, norms.float(), atol=1e-5, rtol=1e-5)
    assert result.attention is None
    assert torch.equal(result.anchor_idx, anchor_search(norms, 4, include_cls=False, num_prefix_tokens=0))
    torch.testing.assert_close(token_norm_scores(hidden), norms.float(), atol=1e-5, rtol=1e-5)


def test_bit_identical_and_hooks_removed() -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixel_values=pixels)
        before = hook_count(model)
        with AttentionProbe(model, score="map"):
            probed = model(pixel_values=pixels)
    assert torch.equal(plain.pooler_output, probed.pooler_output) and hook_count(model) == before


def test_errors() -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(
        ValueError, match="score='cls' needs a \\[CLS\\] token, but this siglip encoder has none; use score='received'"
    ):
        extract_anchors(model, pixels, num_anchors=4)
    with pytest.raises(ValueError, match="include_cls=True needs a \\[CLS\\] token"):
        extract_anchors(model, pixels, num_anchors=4, score="norm", include_cls=True)
    with pytest.raises(ValueError, match="score must be one of"):
        AttentionProbe(model, score="max")
    with pytest.raises(ValueError, match="features must have shape \\(B, N, D\\)"):
        token_norm_scores(torch.randn(4, 8))


def test_without_head() -> None:
    try:
        model = build(vision_use_head=False)
    except TypeError:
        pytest.skip("this transformers has no vision_use_head")
    if detect_encoder(model).pool_site is not None:
        pytest.skip("this transformers builds the head regardless")
    with pytest.raises(ValueError, match="score='map' needs an attention-pooling \\(MAP\\) head"):
        AttentionProbe(model, score="map")
