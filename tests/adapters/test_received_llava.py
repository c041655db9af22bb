"""``score="received"`` in the LLaVA-1.5 adapters of both hosts (transformers >= 5 and llava-torch).

The anchors must be those of the received-attention score (the column mean of the selected layer's
eager ``output_attentions``, per head) and not those of the [CLS] row. Each host's tests run in the
environment that has it (transformers 5 for ``adapters.hf.llava``, llava-torch for ``adapters.llava``).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import transformers

from anchor_former import anchor_search

HF5 = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="needs transformers >= 5")
LLAVA_TORCH = pytest.mark.skipif(importlib.util.find_spec("llava") is None, reason="needs llava-torch")
TOL = {"atol": 1e-5, "rtol": 0}  # fp32
K = 6


def eager_scores(clip, pixel_values: torch.Tensor, layer: int = -2):
    """Slow reference: ``(features (B, N, D), received (B, H, N), cls_row (B, H, N))`` of ``hidden_states[layer]``."""
    clip = copy.deepcopy(clip)
    clip.set_attn_implementation("eager") if hasattr(clip, "set_attn_implementation") else None
    with torch.no_grad():
        out = clip(pixel_values, output_hidden_states=True, output_attentions=True)
    attn = out.attentions[layer]  # (B, H, N, N): the layer that produced hidden_states[layer]
    return out.hidden_states[layer], attn.mean(dim=2), attn[:, :, 0]


# --- transformers: adapters.hf.llava ------------------------------------------------------------------------


def _hf(connector: str, **kwargs):
    from _hf_llava import inputs_for, make_model, make_processor

    from anchor_former.adapters.transformers import attach_anchor_former

    processor = make_processor()
    stock = make_model(processor)
    model = attach_anchor_former(
        copy.deepcopy(stock), processor, connector=connector, num_anchors=K, score="received", **kwargs
    )
    return stock, model, inputs_for(processor)


@HF5
def test_hf_select_keeps_the_received_anchors() -> None:
    stock, model, inputs = _hf("select")
    assert model.config.anchor_former["score"] == "received"
    features, received, cls_row = eager_scores(stock.model.vision_tower, inputs["pixel_values"])
    idx = anchor_search(received, K, include_cls=False)  # (B, K), [CLS] never an anchor
    projector = model.model.multi_modal_projector.projector
    with torch.no_grad():
        got = torch.stack(model.model.get_image_features(inputs["pixel_values"]).pooler_output)  # (B, K, L)
    want = projector(features.gather(1, idx[..., None].expand(-1, -1, features.shape[-1])))
    torch.testing.assert_close(got, want, **TOL)
    # the tolerance bites: the [CLS] row's anchors give other tokens
    cls_idx = anchor_search(cls_row, K, include_cls=False)
    assert not torch.equal(cls_idx, idx)
    wrong = projector(features.gather(1, cls_idx[..., None].expand(-1, -1, features.shape[-1])))
    assert (got - wrong).abs().max() > 1e-3


@HF5
def test_hf_acformer_queries_at_the_received_anchors_and_generates() -> None:
    from _hf_llava import CONNECTOR

    stock, model, inputs = _hf("acformer", **CONNECTOR)
    connector = model.model.multi_modal_projector
    assert connector.config.include_cls is False  # no [CLS] query without the [CLS] score
    features, received, _ = eager_scores(stock.model.vision_tower, inputs["pixel_values"])
    with torch.no_grad():
        got = torch.stack(model.model.get_image_features(inputs["pixel_values"]).pooler_output)  # (B, K, L)
        want = connector(features, anchor_search(received, K, include_cls=False))
    assert got.shape[1] == K
    torch.testing.assert_close(got, want, **TOL)
    out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


# --- llava-torch: adapters.llava ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    if importlib.util.find_spec("llava") is None:
        pytest.skip("needs llava-torch")
    from _llava_torch import save_tiny_tower

    return save_tiny_tower(tmp_path_factory.mktemp("clip_tower"))


@LLAVA_TORCH
@pytest.mark.parametrize("connector", ["select", "acformer"])
def test_llava_torch_uses_the_received_anchors(tower_dir, connector) -> None:
    from _llava_torch import CONNECTOR, images, make_model, prompt

    from anchor_former.adapters.llava import attach_anchor_former

    extra = CONNECTOR if connector == "acformer" else {}
    model = attach_anchor_former(make_model(tower_dir), num_anchors=K, connector=connector, score="received", **extra)
    assert model.config.anchor_former["score"] == "received"
    pixel_values = images(2)
    clip = model.get_model().vision_tower.vision_tower
    features, received, cls_row = eager_scores(clip, pixel_values)
    idx = anchor_search(received, K, include_cls=False)
    inner = model.get_model().mm_projector.connector
    with torch.no_grad():
        got = model.encode_images(pixel_values)
        want = inner(features, idx)
    assert got.shape == (2, K, want.shape[-1])
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.equal(anchor_search(cls_row, K, include_cls=False), idx)
    out = model.generate(
        prompt(1), images=pixel_values[:1], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0
    )
    assert out.shape[0] == 1
