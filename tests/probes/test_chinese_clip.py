"""ChineseCLIP's vision tower (``ChineseCLIPVisionModel``, CLIP's architecture) against eager attentions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ChineseCLIPVisionModel"):
    pytest.skip("this transformers has no ChineseCLIPVisionModel", allow_module_level=True)

from _probe_helpers import check_exact_family  # noqa: E402

from anchor_former.probes import detect_encoder  # noqa: E402


@pytest.mark.parametrize("score", ["cls", "received"])
def test_exact(score: str) -> None:
    config = transformers.ChineseCLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = transformers.ChineseCLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    probe = check_exact_family(model, lambda m, **kw: m(pixel_values=pixels, **kw), score=score, layer=-2, num_layers=3)
    assert probe.encoder.family == "chinese_clip" and probe.attention.shape == (2, 4, 17)
    assert detect_encoder(model).num_prefix_tokens == 1
