"""DINOv3 (transformers ``DINOv3ViTModel``, rotary keys, registers) against eager attentions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DINOv3ViTModel"):
    pytest.skip("this transformers has no DINOv3ViTModel", allow_module_level=True)

from _probe_helpers import check_exact_family  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import detect_encoder, extract_anchors  # noqa: E402

LAYERS = 3


def build(registers: int) -> torch.nn.Module:
    config = transformers.DINOv3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_register_tokens=registers,
    )
    return transformers.DINOv3ViTModel(config).eval()


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("score", ["cls", "received"])
@pytest.mark.parametrize("layer", [-2, 1])
def test_exact(registers: int, score: str, layer: int) -> None:
    model = build(registers)
    pixels = torch.randn(2, 3, 32, 32)
    probe = check_exact_family(
        model, lambda m, **kw: m(pixel_values=pixels, **kw), score=score, layer=layer, num_layers=LAYERS
    )
    prefix = 1 + registers
    assert probe.attention.shape == (2, 4, prefix + 16) and probe.num_prefix_tokens == prefix
    result = extract_anchors(model, pixels, num_anchors=5, layer=layer, score=score)
    assert torch.equal(result.anchor_idx, anchor_search(probe.attention, 5, num_prefix_tokens=prefix))
    assert (result.anchor_idx[:, 1:] >= prefix).all()


def test_spec() -> None:
    spec = detect_encoder(build(2))
    assert (spec.family, spec.num_layers, spec.num_prefix_tokens, spec.has_cls) == ("dinov3", LAYERS, 3, True)
    assert spec.sites[0].rotary is not None
