"""IDEFICS (v1) vision tower (transformers ``IdeficsVisionTransformer``, CLIP's architecture).

It returns neither ``hidden_states`` nor ``attentions``: the eager reference maps come from its own
attention modules run with the eager implementation (which return their weights), the reference
features from its layers' outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

# 5.x: attention modules return their weights under the eager implementation (the reference below)
transformers = pytest.importorskip("transformers", minversion="5.0")
vision = pytest.importorskip("transformers.models.idefics.vision")

from _probe_helpers import assert_close_and_bites, column_mean, hook_count, mutants, site_call  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import AttentionProbe, extract_anchors  # noqa: E402


def build() -> torch.nn.Module:
    config = transformers.IdeficsVisionConfig(
        embed_dim=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    return vision.IdeficsVisionTransformer(config).eval()


def eager_run(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(attention maps (B, H, N, N), layer outputs (B, N, D)) of an eager twin with the same weights."""
    twin = copy.deepcopy(model)
    twin.config._attn_implementation = "eager"
    maps, outs = [], []
    layers = twin.encoder.layers
    handles = [layer.self_attn.register_forward_hook(lambda m, a, o: maps.append(o[1])) for layer in layers]
    handles += [layer.register_forward_hook(lambda m, a, o: outs.append(o)) for layer in twin.encoder.layers]
    try:
        with torch.no_grad():
            twin(pixel_values=pixels)
    finally:
        for h in handles:
            h.remove()
    return maps, outs


@pytest.mark.parametrize("score", ["cls", "received"])
def test_exact(score: str) -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixel_values=pixels)
        before = hook_count(model)
        with AttentionProbe(model, layer=-2, score=score) as probe:
            probed = model(pixel_values=pixels)
    assert hook_count(model) == before and torch.equal(plain.last_hidden_state, probed.last_hidden_state)
    maps, outs = eager_run(model, pixels)
    assert maps[1] is not None and maps[1].shape == (2, 4, 17, 17)
    expected = maps[1][:, :, 0] if score == "cls" else column_mean(maps[1])
    site = probe.encoder.sites[1]
    broken = mutants(site, site_call(model, lambda: model(pixel_values=pixels), site), score)
    assert_close_and_bites(probe.attention, expected, broken)
    torch.testing.assert_close(probe.features, outs[1], atol=1e-6, rtol=0)  # SDPA vs eager twin
    result = extract_anchors(model, pixels, num_anchors=5, score=score)
    assert result.anchor_idx.shape == (2, 6) and probe.encoder.family == "idefics"
    assert torch.equal(result.anchor_idx, anchor_search(probe.attention, 5, num_prefix_tokens=1))
