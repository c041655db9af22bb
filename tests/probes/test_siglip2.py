"""SigLIP2 NaFlex (variable patch count per image, padding): received and map scores respect the padding."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Siglip2VisionModel"):
    pytest.skip("this transformers has no Siglip2VisionModel", allow_module_level=True)

from _probe_helpers import assert_close_and_bites, check_exact_family, mutants, site_call  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.probes import AttentionProbe, extract_anchors  # noqa: E402

LAYERS = 3
HEADS = 4
PATCH = 4
GRIDS = [(4, 4), (2, 3), (3, 5)]  # rows x cols per image; 16 token slots, padding after the real ones


def build(attn: str = "sdpa") -> torch.nn.Module:
    config = transformers.Siglip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        patch_size=PATCH,
        num_patches=16,
        attn_implementation=attn,
    )
    return transformers.Siglip2VisionModel(config).eval()


def naflex_inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What the processor returns: patch rows (B, N, C*P*P), pixel_attention_mask (B, N), spatial_shapes (B, 2)."""
    n = 16
    pixels = torch.randn(len(GRIDS), n, 3 * PATCH * PATCH)
    mask = torch.zeros(len(GRIDS), n, dtype=torch.long)
    for b, (r, c) in enumerate(GRIDS):
        mask[b, : r * c] = 1
        pixels[b, r * c :] = 0
    return pixels, {"pixel_attention_mask": mask, "spatial_shapes": torch.tensor(GRIDS)}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [-2, 1])
def test_received_exact_with_padding(attn: str, layer: int) -> None:
    model = build(attn)
    pixels, inputs = naflex_inputs()
    padding = inputs["pixel_attention_mask"] == 0
    probe = check_exact_family(
        model,
        lambda m, **kw: m(pixel_values=pixels, **inputs, **kw),
        score="received",
        layer=layer,
        num_layers=LAYERS,
        padding=padding,
    )
    assert probe.attention.shape == (3, HEADS, 16)
    assert (probe.attention.masked_select(padding[:, None]) == 0).all()  # padded tokens receive nothing
    torch.testing.assert_close(probe.attention.sum(-1), torch.ones(3, HEADS), atol=1e-5, rtol=0)


def test_map_row_respects_padding() -> None:
    model = build()
    pixels, inputs = naflex_inputs()
    padding = inputs["pixel_attention_mask"] == 0
    with torch.no_grad(), AttentionProbe(model, score="map") as probe:
        out = model(pixel_values=pixels, **inputs)
    head = model.head
    x = out.last_hidden_state
    with torch.no_grad():
        probe_q = head.probe.expand(3, -1, -1)
        weights = head.attention(
            probe_q, x, x, key_padding_mask=padding, need_weights=True, average_attn_weights=False
        )[1][:, :, 0]  # (B, H, N), the head's own MHA
    site = probe.encoder.pool_site
    broken = mutants(site, site_call(model, lambda: model(pixel_values=pixels, **inputs), site), "map")
    with torch.no_grad():  # the head's row had it been called without its key_padding_mask
        broken["padding ignored"] = head.attention(probe_q, x, x, average_attn_weights=False)[1][:, :, 0]
    assert_close_and_bites(probe.attention, weights, broken)


@pytest.mark.parametrize("score", ["received", "map", "norm"])
def test_extract_anchors_naflex(score: str) -> None:
    model = build()
    pixels, inputs = naflex_inputs()
    result = extract_anchors(model, pixels, num_anchors=5, score=score, inputs=inputs)
    padding = inputs["pixel_attention_mask"] == 0
    assert result.anchor_idx.shape == (3, 5)
    real = [r * c for r, c in GRIDS]
    assert all((result.anchor_idx[b] < real[b]).all() for b in range(3))  # padding is never an anchor
    assert result.grid_sizes == tuple(GRIDS) and result.grid_size is None
    assert torch.equal(result.padding, padding)
    expected = anchor_search(result.scores, 5, include_cls=False, num_prefix_tokens=0)
    assert torch.equal(result.anchor_idx, expected)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, **inputs, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(result.features, hidden)


def test_errors() -> None:
    model = build()
    pixels, inputs = naflex_inputs()
    with pytest.raises(
        ValueError, match="score='cls' needs a \\[CLS\\] token, but this siglip2 encoder has none; use score='received'"
    ):
        extract_anchors(model, pixels, num_anchors=4, inputs=inputs)
    with pytest.raises(ValueError, match="num_anchors must be at most 6, the real .* got 7"):
        extract_anchors(model, pixels, num_anchors=7, score="received", inputs=inputs)
    with pytest.raises(ValueError, match="inputs must hold exactly pixel_attention_mask"):
        extract_anchors(model, pixels, num_anchors=4, score="received")
    with pytest.raises(
        ValueError,
        match=r"pixel_values must have shape \(B, N, 48\) \(NaFlex patch rows\), got "
        r"shape \(3, 3, 32, 32\)",
    ):
        extract_anchors(model, torch.randn(3, 3, 32, 32), num_anchors=4, score="received", inputs=inputs)
    bad = {**inputs, "spatial_shapes": torch.tensor([[4, 4], [2, 2], [3, 5]])}
    with pytest.raises(ValueError, match=r"spatial_shapes'\]\[1\] = \(2, 2\) must cover the 6 real patches"):
        extract_anchors(model, pixels, num_anchors=4, score="received", inputs=bad)
