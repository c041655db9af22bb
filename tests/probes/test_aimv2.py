"""AIMv2 (transformers ``Aimv2VisionModel``, no [CLS]): received against eager, map against its head."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Aimv2VisionModel"):
    pytest.skip("this transformers has no Aimv2VisionModel", allow_module_level=True)

from _probe_helpers import assert_close_and_bites, check_exact_family, mutants, site_call  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import AttentionProbe, extract_anchors  # noqa: E402

HEADS = 4


def build(use_head: bool = True) -> torch.nn.Module:
    config = transformers.Aimv2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        image_size=32,
        patch_size=8,
        use_head=use_head,
        qkv_bias=True,
    )
    model = transformers.Aimv2VisionModel(config).eval()
    with torch.no_grad():  # the head's query starts near zero (uniform attention): give it a real one
        model.head.cls_token.normal_(0, 1.0) if use_head else None
    return model


@pytest.mark.parametrize("layer", [-2, 1])
def test_received_exact(layer: int) -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    probe = check_exact_family(
        model, lambda m, **kw: m(pixel_values=pixels, **kw), score="received", layer=layer, num_layers=3
    )
    assert probe.encoder.family == "aimv2" and probe.attention.shape == (2, HEADS, 16)
    result = extract_anchors(model, pixels, num_anchors=5, layer=layer, score="received")
    assert torch.equal(result.anchor_idx, anchor_search(probe.attention, 5, include_cls=False, num_prefix_tokens=0))


def test_map_row_equals_the_head_attention() -> None:
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionProbe(model, score="map") as probe:
        out = model(pixel_values=pixels)
    head = model.head
    with torch.no_grad():  # the head's attention, written out in float64
        x = out.last_hidden_state.double()
        k = torch.nn.functional.linear(x, head.k_proj.weight.double(), head.k_proj.bias.double())
        k = k.view(2, 16, HEADS, 8).transpose(1, 2)  # (B, H, N, E)
        q = head.cls_token.double().view(1, HEADS, 1, 8)  # (1, H, 1, E)
        expected = ((q @ k.transpose(-1, -2)) * 8**-0.5).softmax(-1)[:, :, 0].float()  # (B, H, N)
    site = probe.encoder.pool_site
    broken = mutants(site, site_call(model, lambda: model(pixel_values=pixels), site), "map")
    assert_close_and_bites(probe.attention, expected, broken)


def test_refusals_name_the_alternatives() -> None:
    with pytest.raises(
        ValueError,
        match="score='cls' needs a \\[CLS\\] token, but this aimv2 encoder has none; use "
        "score='received' .* or score='map' .* or score='norm'",
    ):
        AttentionProbe(build())
    with pytest.raises(
        ValueError,
        match="score='map' needs an attention-pooling \\(MAP\\) head, but this aimv2 "
        "encoder has none; use score='received'",
    ):
        AttentionProbe(build(use_head=False), score="map")
