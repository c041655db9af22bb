"""open_clip ``VisionTransformer`` and ``TimmModel`` (unwrapped to its timm trunk)."""

from __future__ import annotations

import pytest
import torch

oc_transformer = pytest.importorskip("open_clip.transformer")
oc_timm = pytest.importorskip("open_clip.timm_model")

from _probe_helpers import assert_close_and_bites, column_mean, hook_count, mutants, site_call  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import AttentionProbe, detect_encoder, extract_anchors  # noqa: E402

HEADS = 4


def build() -> torch.nn.Module:
    return oc_transformer.VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=3, heads=HEADS, mlp_ratio=2.0, output_dim=16
    ).eval()


def own_attention_maps(model: torch.nn.Module, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """Block ``block``'s nn.MultiheadAttention on its own ln_1 input, asked for per-head weights (B, H, N, N)."""
    mha = model.transformer.resblocks[block].attn
    seen = []
    handle = mha.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        handle.remove()
    x = seen[0]
    with torch.no_grad():
        return mha(x, x, x, need_weights=True, average_attn_weights=False)[1]


@pytest.mark.parametrize("score", ["cls", "received"])
@pytest.mark.parametrize("layer", [-2, 1])
def test_vision_transformer_exact(score: str, layer: int) -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    block = layer - 1 if layer > 0 else 3 + layer
    with torch.no_grad():
        plain = model(pixels)
        before = hook_count(model)
        with AttentionProbe(model, layer=layer, score=score) as probe:
            probed = model(pixels)
    assert torch.equal(plain, probed) and hook_count(model) == before
    attn = own_attention_maps(model, pixels, block)
    expected = attn[:, :, 0] if score == "cls" else column_mean(attn)
    site = probe.encoder.sites[block]
    broken = mutants(site, site_call(model, lambda: model(pixels), site), score)
    assert_close_and_bites(probe.attention, expected, broken)
    with torch.no_grad():
        inter = model.forward_intermediates(
            pixels,
            indices=[block],
            normalize_intermediates=False,
            output_fmt="NLC",
            intermediates_only=True,
            output_extra_tokens=True,
        )
    features = torch.cat([inter["image_intermediates_prefix"][0], inter["image_intermediates"][0]], dim=1)
    assert torch.equal(probe.features, features)
    result = extract_anchors(model, pixels, num_anchors=5, layer=layer, score=score)
    assert torch.equal(result.anchor_idx, anchor_search(probe.attention, 5, num_prefix_tokens=1))
    assert result.grid_size == (4, 4)


def test_timm_model_unwrapped_to_its_trunk() -> None:
    model = oc_timm.TimmModel("vit_tiny_patch16_224", embed_dim=16, image_size=224).eval()
    spec = detect_encoder(model)
    assert spec.family == "timm_vit" and spec.blocks[0] is model.trunk.blocks[0]
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain = model(pixels)
        result = extract_anchors(model, pixels, num_anchors=8, score="received")
    with torch.no_grad(), AttentionProbe(model.trunk, score="received") as probe:
        trunk_out = model(pixels)
    assert torch.equal(plain, trunk_out)
    torch.testing.assert_close(result.attention, probe.attention, atol=0, rtol=0)
    assert result.anchor_idx.shape == (1, 9) and result.grid_size == (14, 14)
