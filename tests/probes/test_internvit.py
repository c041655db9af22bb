"""InternViT (transformers ``InternVLVisionModel``), with and without qk-norm, against eager attentions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "InternVLVisionModel"):
    pytest.skip("this transformers has no InternVLVisionModel", allow_module_level=True)

from dataclasses import replace  # noqa: E402

from _probe_helpers import check_exact_family, eager_copy, randomize, site_call  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import detect_encoder, extract_anchors  # noqa: E402
from anchor_former.probes.registry import Projection, split_heads  # noqa: E402

LAYERS = 3


def build(qk_norm: bool) -> torch.nn.Module:
    config = transformers.InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        use_qk_norm=qk_norm,
        layer_scale_init_value=0.5,
        use_mean_pooling=False,
    )
    return randomize(transformers.InternVLVisionModel(config).eval())


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("score", ["cls", "received"])
@pytest.mark.parametrize("layer", [-2, 1])
def test_exact(qk_norm: bool, score: str, layer: int) -> None:
    model = build(qk_norm)
    pixels = torch.randn(2, 3, 32, 32)
    probe = check_exact_family(
        model, lambda m, **kw: m(pixel_values=pixels, **kw), score=score, layer=layer, num_layers=LAYERS
    )
    assert probe.attention.shape == (2, 4, 17) and probe.num_prefix_tokens == 1
    result = extract_anchors(model, pixels, num_anchors=5, layer=layer, score=score)
    assert torch.equal(result.anchor_idx, anchor_search(probe.attention, 5, num_prefix_tokens=1))
    assert result.grid_size == (4, 4)


def test_spec() -> None:
    spec = detect_encoder(build(True))
    assert (spec.family, spec.num_layers, spec.num_prefix_tokens, spec.has_cls, spec.patch_size) == (
        "internvit",
        LAYERS,
        1,
        True,
        8,
    )
    attn = spec.blocks[0].attention
    assert spec.sites[0].sources() == (attn.q_norm, attn.k_norm)  # the final queries and keys


def test_keys_before_the_norm_fail_the_tolerance() -> None:
    """Reading k_proj instead of k_norm (the norm over all heads left out) is off by far more than 1e-5."""
    model = build(True)
    pixels = torch.randn(2, 3, 32, 32)
    spec = detect_encoder(model)
    site = spec.sites[-2]
    attn = spec.blocks[-2].attention
    unnormed = replace(site, key=Projection(attn.k_proj, split_heads(attn.num_heads)))
    with torch.no_grad():
        expected = eager_copy(model)(pixel_values=pixels, output_attentions=True).attentions[-2][:, :, 0]
    run = lambda: model(pixel_values=pixels)  # noqa: E731
    torch.testing.assert_close(site.row(site_call(model, run, site)), expected, atol=1e-5, rtol=0)
    assert (unnormed.row(site_call(model, run, unnormed)) - expected).abs().max() > 1e-3
