"""DINOv2 (with and without registers) probe against the eager ``output_attentions`` path."""

from __future__ import annotations

import pytest
import torch
import transformers
from _probe_helpers import (
    assert_close_and_bites,
    column_mean,
    eager_copy,
    hook_count,
    mutants,
    reference_block,
    site_call,
)

from anchor_former import anchor_search
from anchor_former.probes import AttentionProbe, detect_encoder, extract_anchors

LAYERS = 3
HEADS = 4


def build(registers: int) -> torch.nn.Module:
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=32,
        patch_size=8,
    )
    if registers == 0:
        return transformers.Dinov2Model(transformers.Dinov2Config(**kwargs)).eval()
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers has no Dinov2WithRegistersModel")
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
    return transformers.Dinov2WithRegistersModel(config).eval()


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("layer", [-2, 1])
def test_row_features_anchors_match_eager(registers: int, layer: int) -> None:
    model = build(registers)
    pixels = torch.randn(2, 3, 32, 32)
    prefix = 1 + registers
    n = prefix + 16
    with torch.no_grad(), AttentionProbe(model, layer=layer) as probe:
        out = model(pixel_values=pixels, output_hidden_states=True)
        ref = eager_copy(model)(pixel_values=pixels, output_attentions=True)
    row = ref.attentions[reference_block(layer, LAYERS)][:, :, 0]  # (B, H, N)
    assert probe.attention.shape == (2, HEADS, n) and probe.num_prefix_tokens == prefix
    torch.testing.assert_close(probe.attention, row, atol=1e-5, rtol=0)
    assert torch.equal(probe.features, out.hidden_states[layer])

    result = extract_anchors(model, pixels, num_anchors=5, layer=layer)
    assert torch.equal(result.anchor_idx, anchor_search(row, 5, num_prefix_tokens=prefix))
    assert (result.anchor_idx[:, 1:] >= prefix).all()  # registers are never anchors


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("score", ["cls", "received"])
def test_scores_match_eager_and_tolerance_bites(registers: int, score: str) -> None:
    model = build(registers)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionProbe(model, layer=-2, score=score) as probe:
        model(pixel_values=pixels)
        attn = eager_copy(model)(pixel_values=pixels, output_attentions=True).attentions[-2]
    expected = attn[:, :, 0] if score == "cls" else column_mean(attn)
    site = probe.encoder.sites[-2]
    broken = mutants(site, site_call(model, lambda: model(pixel_values=pixels), site), score)
    assert_close_and_bites(probe.attention, expected, broken)
    result = extract_anchors(model, pixels, num_anchors=5, score=score)
    assert torch.equal(result.anchor_idx, anchor_search(probe.attention, 5, num_prefix_tokens=1 + registers))


def test_outputs_bit_identical_and_hooks_removed() -> None:
    model = build(4)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixel_values=pixels, output_hidden_states=True)
        before = hook_count(model)
        with AttentionProbe(model, layer=-2):
            probed = model(pixel_values=pixels, output_hidden_states=True)
    assert hook_count(model) == before
    assert torch.equal(plain.last_hidden_state, probed.last_hidden_state)
    assert torch.equal(plain.pooler_output, probed.pooler_output)
    with pytest.raises((ValueError, RuntimeError)), AttentionProbe(model):
        model(pixel_values=torch.randn(2, 5, 32, 32))  # wrong channel count: the model raises
    assert hook_count(model) == before


def test_bf16_and_grad() -> None:
    model = build(0)
    pixels = torch.randn(2, 3, 32, 32)
    with AttentionProbe(model) as probe:
        model(pixel_values=pixels)
    probe.features.sum().backward()
    assert model.embeddings.patch_embeddings.projection.weight.grad is not None
    fp32_row = probe.attention
    model = model.to(torch.bfloat16)
    with torch.no_grad(), AttentionProbe(model) as probe:
        model(pixel_values=pixels.to(torch.bfloat16))
    assert probe.attention.dtype == torch.float32
    # bf16 forward, fp32 row: measured 1.3e-5 from the fp32 model's row; a uniform row is 2e-3 away
    uniform = torch.full_like(fp32_row, 1 / fp32_row.shape[-1])
    assert_close_and_bites(probe.attention, fp32_row, {"uniform": uniform}, atol=5e-5)


def test_spec() -> None:
    spec = detect_encoder(build(4))
    assert (spec.family, spec.num_layers, spec.num_prefix_tokens, spec.has_cls) == ("dinov2", LAYERS, 5, True)
