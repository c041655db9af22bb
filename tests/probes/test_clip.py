"""CLIP probe against the eager ``output_attentions`` path of the installed transformers (4.37 or 5.x)."""

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
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from anchor_former import anchor_search
from anchor_former.probes import AttentionProbe, detect_encoder, extract_anchors

LAYERS = 3
HEADS = 4


def tiny_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )


@pytest.fixture
def model() -> CLIPVisionModel:
    return CLIPVisionModel(tiny_config()).eval()


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32)


def _layouts() -> list[str]:
    return ["model", "with_projection", "transformer"]


def _build(layout: str) -> torch.nn.Module:
    if layout == "model":
        return CLIPVisionModel(tiny_config()).eval()
    if layout == "with_projection":
        return CLIPVisionModelWithProjection(tiny_config()).eval()
    inner = CLIPVisionModel(tiny_config()).eval()
    if not hasattr(inner, "vision_model"):  # transformers >= 5.6 has no CLIPVisionTransformer wrapper
        pytest.skip("this transformers has no CLIPVisionTransformer")
    return inner.vision_model


@pytest.mark.parametrize("layout", _layouts())
@pytest.mark.parametrize("layer", [-2, -1, 1, 2])
def test_row_and_features_match_eager(layout: str, layer: int, pixels: torch.Tensor) -> None:
    model = _build(layout)
    with torch.no_grad(), AttentionProbe(model, layer=layer) as probe:
        out = model(pixel_values=pixels, output_hidden_states=True)
    ref = eager_copy(model)(pixel_values=pixels, output_attentions=True)
    row = ref.attentions[reference_block(layer, LAYERS)][:, :, 0]  # (B, H, N)
    assert probe.attention.shape == (3, HEADS, 17)
    assert probe.attention.dtype == torch.float32
    torch.testing.assert_close(probe.attention, row.detach(), atol=1e-5, rtol=0)
    assert torch.equal(probe.features, out.hidden_states[layer])


@pytest.mark.parametrize("score", ["cls", "received"])
@pytest.mark.parametrize("layer", [-2, 1])
def test_scores_match_eager_and_tolerance_bites(score: str, layer: int, pixels: torch.Tensor) -> None:
    model = CLIPVisionModel(tiny_config()).eval()
    with torch.no_grad(), AttentionProbe(model, layer=layer, score=score) as probe:
        model(pixel_values=pixels)
    with torch.no_grad():
        attn = eager_copy(model)(pixel_values=pixels, output_attentions=True).attentions[reference_block(layer, LAYERS)]
    expected = attn[:, :, 0] if score == "cls" else column_mean(attn)  # (B, H, N)
    site = probe.encoder.sites[reference_block(layer, LAYERS)]
    broken = mutants(site, site_call(model, lambda: model(pixel_values=pixels), site), score)
    assert probe.attention.shape == (3, HEADS, 17)
    assert_close_and_bites(probe.attention, expected.float(), broken)


def test_extract_anchors_received(model: CLIPVisionModel, pixels: torch.Tensor) -> None:
    result = extract_anchors(model, pixels, num_anchors=6, score="received")
    with torch.no_grad():
        ref = eager_copy(model)(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    expected = column_mean(ref.attentions[-2])
    torch.testing.assert_close(result.attention, expected, atol=1e-5, rtol=0)
    assert torch.equal(result.anchor_idx, anchor_search(result.attention, 6, num_prefix_tokens=1))
    assert result.anchor_idx.shape == (3, 7) and result.score == "received"
    assert torch.equal(result.features, model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2])


def test_extract_anchors_equals_search_on_eager_row(model: CLIPVisionModel, pixels: torch.Tensor) -> None:
    result = extract_anchors(model, pixels, num_anchors=6)
    with torch.no_grad():
        ref = eager_copy(model)(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    expected = anchor_search(ref.attentions[-2][:, :, 0], 6, num_prefix_tokens=1)
    assert torch.equal(result.anchor_idx, expected)
    assert result.anchor_idx.shape == (3, 7)
    torch.testing.assert_close(result.features, ref.hidden_states[-2], atol=1e-5, rtol=1e-5)
    assert result.num_prefix_tokens == 1 and result.layer == LAYERS - 1 and result.grid_size == (4, 4)
    gathered = torch.stack([result.features[b, result.anchor_idx[b]] for b in range(3)])
    assert torch.equal(result.anchor_features, gathered)


def test_outputs_bit_identical_with_probe(model: CLIPVisionModel, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        plain = model(pixel_values=pixels, output_hidden_states=True)
        with AttentionProbe(model, layer=-2):
            probed = model(pixel_values=pixels, output_hidden_states=True)
    assert torch.equal(plain.last_hidden_state, probed.last_hidden_state)
    assert torch.equal(plain.pooler_output, probed.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(plain.hidden_states, probed.hidden_states))


def test_hooks_removed_after_use_and_after_exception(model: CLIPVisionModel, pixels: torch.Tensor) -> None:
    model(pixel_values=pixels, output_hidden_states=True)  # let transformers install its own hooks first
    before = hook_count(model)
    with AttentionProbe(model) as probe:
        assert hook_count(model) == before + 5 and probe.attached  # layer; attention before/after; q_proj, k_proj
        model(pixel_values=pixels)
    assert hook_count(model) == before and not probe.attached
    with pytest.raises((ValueError, RuntimeError)), AttentionProbe(model):
        model(pixel_values=torch.randn(2, 3, 48, 40))  # wrong image size: the model raises mid-forward
    assert hook_count(model) == before
    with pytest.raises(KeyError), AttentionProbe(model):
        raise KeyError("user code")
    assert hook_count(model) == before


def test_grad_flows_through_features_not_attention(model: CLIPVisionModel, pixels: torch.Tensor) -> None:
    pixels = pixels.clone().requires_grad_(True)
    with AttentionProbe(model, layer=-2) as probe:
        model(pixel_values=pixels)
    assert probe.features.requires_grad and not probe.attention.requires_grad
    probe.features.square().sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    with torch.no_grad():
        ref = eager_copy(model)(pixel_values=pixels, output_attentions=True)
    torch.testing.assert_close(probe.attention, ref.attentions[-2][:, :, 0], atol=1e-5, rtol=0)


def test_bf16_row_is_fp32_from_the_bf16_projections(model: CLIPVisionModel, pixels: torch.Tensor) -> None:
    """In bf16 the row is the float32 softmax of the bf16 queries and keys the attention itself used."""
    model = model.to(torch.bfloat16)
    spec = detect_encoder(model)
    attn = spec.blocks[-2].self_attn
    seen = {}
    handles = [
        attn.q_proj.register_forward_hook(lambda m, a, o: seen.setdefault("q", o)),
        attn.k_proj.register_forward_hook(lambda m, a, o: seen.setdefault("k", o)),
    ]
    try:
        with torch.no_grad(), AttentionProbe(model, layer=-2) as probe:
            model(pixel_values=pixels.to(torch.bfloat16))
    finally:
        for handle in handles:
            handle.remove()
    q = seen["q"].double()[:, :1].view(3, 1, HEADS, -1).transpose(1, 2)  # (B, H, 1, E)
    k = seen["k"].double().view(3, 17, HEADS, -1).transpose(1, 2)  # (B, H, N, E)
    expected = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0]  # (B, H, N)
    assert probe.attention.dtype == torch.float32 and probe.features.dtype == torch.bfloat16
    torch.testing.assert_close(probe.attention, expected.float(), atol=1e-5, rtol=0)


def test_several_forwards_are_kept_separately(model: CLIPVisionModel, pixels: torch.Tensor) -> None:
    with torch.no_grad(), AttentionProbe(model) as probe:
        model(pixel_values=pixels[:1])
        model(pixel_values=pixels[1:])
    assert [c.features.shape[0] for c in probe.captures] == [1, 2]
    with pytest.raises(RuntimeError, match="ran 2 times"):
        _ = probe.attention
    with AttentionProbe(model) as probe:
        pass
    with pytest.raises(RuntimeError, match="no forward ran"):
        _ = probe.features


def test_errors(model: CLIPVisionModel, pixels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\] or \[-3, -1\].*got 0"):
        AttentionProbe(model, layer=0)
    with pytest.raises(ValueError, match="got 4"):
        AttentionProbe(model, layer=4)
    with pytest.raises(ValueError, match="got -4"):
        extract_anchors(model, pixels, num_anchors=4, layer=-4)
    with pytest.raises(ValueError, match="score='map' needs an attention-pooling"):
        AttentionProbe(model, score="map")
    with pytest.raises(
        ValueError, match=r"pixel_values must have shape \(B, 3, H_img, W_img\), got shape \(3, 32, 32\)"
    ):
        extract_anchors(model, pixels[0], num_anchors=4)
    with pytest.raises(ValueError, match=r"got shape \(3, 1, 32, 32\)"):
        extract_anchors(model, pixels[:, :1], num_anchors=4)
    with pytest.raises(
        ValueError, match="not a supported vision encoder; supported families: .*clip \\(transformers CLIPVisionModel"
    ):
        extract_anchors(torch.nn.Linear(3, 3), pixels, num_anchors=4)
