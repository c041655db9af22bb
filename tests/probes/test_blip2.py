"""BLIP-2's EVA ViT (transformers ``Blip2VisionModel``, fused qkv with [q_bias, 0, v_bias]) against eager."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Blip2VisionModel"):
    pytest.skip("this transformers has no Blip2VisionModel", allow_module_level=True)

from _probe_helpers import check_exact_family, randomize  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import extract_anchors  # noqa: E402


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("score", ["cls", "received"])
def test_exact(qkv_bias: bool, score: str) -> None:
    config = transformers.Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        qkv_bias=qkv_bias,
    )
    model = randomize(transformers.Blip2VisionModel(config).eval())
    if qkv_bias:
        with torch.no_grad():  # the key slice of the fused bias is zero by construction
            for layer in model.encoder.layers:
                layer.self_attn.qkv.bias[32:64].zero_()
    pixels = torch.randn(2, 3, 32, 32)
    probe = check_exact_family(model, lambda m, **kw: m(pixel_values=pixels, **kw), score=score, layer=-2, num_layers=3)
    assert probe.encoder.family == "blip2" and probe.attention.shape == (2, 4, 17)
    result = extract_anchors(model, pixels, num_anchors=5, score=score)
    assert torch.equal(result.anchor_idx, anchor_search(probe.attention, 5, num_prefix_tokens=1))
