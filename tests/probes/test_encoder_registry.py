"""Family lookup and the extension API: layer indexing, the registry, replacing a family."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from anchor_former.probes import AttentionProbe, detect_encoder, registered_families
from anchor_former.probes.registry import register_encoder_family


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


def test_a_site_that_cannot_be_read_is_refused_by_name() -> None:
    from dataclasses import replace

    from anchor_former.probes.registry import Projection, SiteCall, hf_linear_site, split_heads

    model = tiny_clip(2)
    spec = detect_encoder(model)
    first, second = (b.self_attn for b in spec.blocks)
    with pytest.raises(ValueError, match=r"has no submodule 'q_norm' \(found NoneType\).*score='norm'"):
        hf_linear_site(first, query="q_norm", num_heads=4, scale=1.0)
    foreign = replace(spec.sites[0], key=Projection(second.k_proj, split_heads(4)))  # another layer's keys
    with pytest.raises(ValueError, match="Linear as a projection of CLIPAttention, but it is not a submodule"):
        foreign.validate()
    with pytest.raises(RuntimeError, match="hook on Linear did not fire during this attention call"):
        SiteCall((), {}).output_of(first.q_proj)
