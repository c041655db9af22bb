"""timm VisionTransformer probe against timm's own non-fused attention path."""

from __future__ import annotations

import pytest
import torch

timm_vit = pytest.importorskip("timm.models.vision_transformer")

from _probe_helpers import assert_close_and_bites, column_mean, hook_count, mutants, site_call  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import AttentionProbe, detect_encoder, extract_anchors  # noqa: E402

HEADS = 4


def build(**kwargs) -> torch.nn.Module:
    defaults = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=HEADS, num_classes=0)
    return timm_vit.VisionTransformer(**{**defaults, **kwargs}).eval()


def eager_rows(model: torch.nn.Module, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """Run timm's non-fused path and capture block ``block``'s attention probabilities (B, H, N, N)."""
    attn = model.blocks[block].attn
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, a, o: seen.append(o))  # called with the probabilities
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        with torch.no_grad():
            model.forward_features(pixels)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return seen[0]


@pytest.mark.parametrize(
    "kwargs, prefix",
    [({}, 1), ({"reg_tokens": 4}, 5), ({"qk_norm": True, "qkv_bias": True}, 1), ({"init_values": 0.1}, 1)],
)
@pytest.mark.parametrize("layer", [-2, 3])
def test_row_features_anchors_match_non_fused(kwargs: dict, prefix: int, layer: int) -> None:
    model = build(**kwargs)
    assert all(b.attn.fused_attn for b in model.blocks)  # the probe runs beside the fused (SDPA) path
    pixels = torch.randn(2, 3, 32, 32)
    block = layer - 1 if layer > 0 else 3 + layer
    with torch.no_grad(), AttentionProbe(model, layer=layer) as probe:
        model.forward_features(pixels)
    expected = eager_rows(model, pixels, block)[:, :, 0]  # (B, H, N)
    assert probe.num_prefix_tokens == prefix and probe.attention.shape == (2, HEADS, prefix + 16)
    torch.testing.assert_close(probe.attention, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        intermediates = model.forward_intermediates(
            pixels, indices=[block], norm=False, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
    patches, prefix_tokens = intermediates[0]
    assert torch.equal(probe.features, torch.cat([prefix_tokens, patches], dim=1))
    result = extract_anchors(model, pixels, num_anchors=5, layer=layer)
    assert torch.equal(result.anchor_idx, anchor_search(expected, 5, num_prefix_tokens=prefix))


@pytest.mark.parametrize(
    "kwargs", [{}, {"qk_norm": True, "qkv_bias": True}, {"class_token": False, "reg_tokens": 2, "global_pool": "avg"}]
)
@pytest.mark.parametrize("score", ["cls", "received"])
def test_scores_match_non_fused_and_tolerance_bites(kwargs: dict, score: str) -> None:
    model = build(**kwargs)
    if score == "cls" and model.cls_token is None:
        pytest.skip("no [CLS] token")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionProbe(model, layer=-2, score=score) as probe:
        model.forward_features(pixels)
    attn = eager_rows(model, pixels, 1)  # (B, H, N, N)
    expected = attn[:, :, 0] if score == "cls" else column_mean(attn)
    site = probe.encoder.sites[1]
    broken = mutants(site, site_call(model, lambda: model.forward_features(pixels), site), score)
    assert_close_and_bites(probe.attention, expected, broken)
    result = extract_anchors(model, pixels, num_anchors=4, score=score)
    assert torch.equal(
        result.anchor_idx,
        anchor_search(probe.attention, 4, include_cls=probe.has_cls, num_prefix_tokens=probe.num_prefix_tokens),
    )


def test_outputs_bit_identical_hooks_removed_grad() -> None:
    model = build(reg_tokens=2)
    pixels = torch.randn(2, 3, 32, 32)
    plain = model(pixels)
    before = hook_count(model)
    with AttentionProbe(model) as probe:
        probed = model(pixels)
    assert torch.equal(plain, probed) and hook_count(model) == before
    probe.features.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
    with pytest.raises((AssertionError, RuntimeError)), AttentionProbe(model):
        model(torch.randn(2, 3, 48, 48))  # timm refuses the image size mid-forward
    assert hook_count(model) == before


def test_bf16() -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionProbe(model) as probe:
        model.forward_features(pixels)
    fp32_row = probe.attention
    model = model.to(torch.bfloat16)
    result = extract_anchors(model, pixels.to(torch.bfloat16), num_anchors=4)
    assert result.attention.dtype == torch.float32 and result.features.dtype == torch.bfloat16
    # measured 1.1e-5 (bf16 weights and tokens, float32 row); a uniform row is 2e-3 away
    uniform = torch.full_like(fp32_row, 1 / fp32_row.shape[-1])
    assert_close_and_bites(result.attention, fp32_row, {"uniform": uniform}, atol=5e-5)


def test_without_class_token() -> None:
    model = build(class_token=False, reg_tokens=2, global_pool="avg")
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="score='cls' needs a \\[CLS\\] token, but this timm_vit encoder has none"):
        extract_anchors(model, pixels, num_anchors=4)
    result = extract_anchors(model, pixels, num_anchors=4, score="norm")
    assert result.attention is None and result.anchor_idx.shape == (2, 4)
    assert (result.anchor_idx >= 2).all()
    assert torch.equal(
        result.anchor_idx,
        anchor_search(result.features.float().norm(dim=-1), 4, include_cls=False, num_prefix_tokens=2),
    )


def test_spec_and_unsupported_block() -> None:
    spec = detect_encoder(build(reg_tokens=3))
    assert (spec.family, spec.num_prefix_tokens, spec.has_cls, spec.patch_size) == ("timm_vit", 4, True, 8)
    post_norm = build(block_fn=timm_vit.ResPostBlock)
    with pytest.raises(ValueError, match="supported: pre-norm"):
        detect_encoder(post_norm)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}])
def test_map_head_row_equals_explicit(kwargs: dict) -> None:
    model = build(class_token=False, global_pool="map", **kwargs)
    pool = model.attn_pool
    pixels = torch.randn(2, 3, 32, 32)
    seen = []
    handle = pool.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad(), AttentionProbe(model, score="map") as probe:
            model(pixels)
    finally:
        handle.remove()
    x = seen[0].double()  # (B, N, D) what the pool attends over
    with torch.no_grad():
        q = pool.q(pool.latent).double().view(1, 1, HEADS, -1).transpose(1, 2)  # (1, H, 1, E)
        k = torch.nn.functional.linear(x, pool.kv.weight[:32].double(), pool.kv.bias[:32].double())
        k = k.view(2, -1, HEADS, 8).transpose(1, 2)  # (B, H, N, E)
        expected = ((q @ k.transpose(-1, -2)) * pool.scale).softmax(-1)[:, :, 0]  # (B, H, N)
    torch.testing.assert_close(probe.attention, expected.float(), atol=1e-5, rtol=0)
    prefix = kwargs.get("reg_tokens", 0)
    result = extract_anchors(model, pixels, num_anchors=4, score="map")
    assert torch.equal(result.anchor_idx, anchor_search(expected, 4, include_cls=False, num_prefix_tokens=prefix))


def test_dynamic_img_pad_grid_rounds_up() -> None:
    model = build(img_size=32, dynamic_img_size=True, dynamic_img_pad=True)
    pixels = torch.randn(1, 3, 36, 44)  # 4.5 x 5.5 patches: timm pads to 5 x 6
    result = extract_anchors(model, pixels, num_anchors=4)
    assert result.grid_size == (5, 6)
    assert result.features.shape[1] == 1 + 5 * 6
