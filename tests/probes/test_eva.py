"""timm Eva (rotary ViTs: EVA02, EVA-CLIP, Perception Encoder) against timm's own non-fused attention."""

from __future__ import annotations

import pytest
import torch

eva = pytest.importorskip("timm.models.eva")

from _probe_helpers import assert_close_and_bites, column_mean, hook_count, mutants, site_call  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import AttentionProbe, detect_encoder, extract_anchors  # noqa: E402

HEADS = 4


def build(**kwargs) -> torch.nn.Module:
    defaults = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=HEADS,
        num_classes=0,
        use_rot_pos_emb=True,
        ref_feat_shape=4,
    )
    model = eva.Eva(**{**defaults, **kwargs}).eval()
    with torch.no_grad():  # EVA zero-initialises q_bias; give every bias a value so a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("q_bias"):
                p.normal_(0, 0.5)
    return model


def eager_maps(model: torch.nn.Module, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """timm's non-fused path: block ``block``'s attention probabilities (B, H, N, N)."""
    attn = model.blocks[block].attn
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, a, o: seen.append(o))
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        with torch.no_grad():
            model.forward_features(pixels)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return seen[0]


VARIANTS = [
    {},
    {"qkv_fused": False},
    {"qk_norm": True, "rope_rotate_half": True},
    {"num_reg_tokens": 2, "qkv_bias": False},
    {"class_token": False, "global_pool": "avg"},
]


@pytest.mark.parametrize("kwargs", VARIANTS)
@pytest.mark.parametrize("score", ["cls", "received"])
@pytest.mark.parametrize("layer", [-2, 1])
def test_exact_against_non_fused(kwargs: dict, score: str, layer: int) -> None:
    model = build(**kwargs)
    if score == "cls" and model.cls_token is None:
        pytest.skip("no [CLS] token")
    pixels = torch.randn(2, 3, 32, 32)
    block = layer - 1 if layer > 0 else 3 + layer
    with torch.no_grad():
        plain = model.forward_features(pixels)
        before = hook_count(model)
        with AttentionProbe(model, layer=layer, score=score) as probe:
            probed = model.forward_features(pixels)
    assert torch.equal(plain, probed) and hook_count(model) == before
    attn = eager_maps(model, pixels, block)
    expected = attn[:, :, 0] if score == "cls" else column_mean(attn)
    site = probe.encoder.sites[block]
    broken = mutants(site, site_call(model, lambda: model.forward_features(pixels), site), score)
    assert "keys without rotary" in broken
    assert_close_and_bites(probe.attention, expected, broken)
    prefix = model.num_prefix_tokens > 0  # timm cannot return_prefix_tokens without prefix tokens
    with torch.no_grad():
        inter = model.forward_intermediates(
            pixels, indices=[block], norm=False, return_prefix_tokens=prefix, output_fmt="NLC", intermediates_only=True
        )
    features = torch.cat([inter[0][1], inter[0][0]], dim=1) if prefix else inter[0]
    assert torch.equal(probe.features, features)
    result = extract_anchors(model, pixels, num_anchors=4, layer=layer, score=score)
    assert torch.equal(
        result.anchor_idx,
        anchor_search(probe.attention, 4, include_cls=probe.has_cls, num_prefix_tokens=probe.num_prefix_tokens),
    )


def test_map_head_and_spec() -> None:
    model = build(class_token=False, global_pool="map")
    spec = detect_encoder(model)
    assert spec.family == "timm_eva" and spec.pool_site is not None and not spec.has_cls
    pixels = torch.randn(2, 3, 32, 32)
    result = extract_anchors(model, pixels, num_anchors=4, score="map")
    assert result.attention.shape == (2, HEADS, 16) and result.anchor_idx.shape == (2, 4)
    with pytest.raises(
        ValueError,
        match="score='cls' needs a \\[CLS\\] token, but this timm_eva encoder has none; use score='received'",
    ):
        AttentionProbe(model)


def test_post_norm_blocks_refused() -> None:
    model = build(use_post_norm=True)
    with pytest.raises(ValueError, match="supported: pre-norm timm.models.eva.EvaBlock.*score='norm'"):
        detect_encoder(model)
