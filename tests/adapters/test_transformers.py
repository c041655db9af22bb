"""The transformers adapter on a real tiny LlavaForConditionalGeneration and a real LlavaProcessor.

Run in the main env: ``.venv/bin/python -m pytest tests/adapters/test_transformers.py -q``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers adapter needs transformers >= 5", allow_module_level=True)

from _hf_llava import (  # noqa: E402
    CONNECTOR,
    IMAGE,
    LLM_DIM,
    NUM_PATCHES,
    PATCH,
    VISION_DIM,
    K,
    inputs_for,
    make_model,
    make_processor,
)
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration, LlavaProcessor  # noqa: E402

from anchor_former.adapters.hf.llava import (  # noqa: E402
    AnchorFormerLlavaConfig,
    AnchorFormerLlavaForConditionalGeneration,
)
from anchor_former.adapters.transformers import attach_anchor_former, register_auto_classes  # noqa: E402
from anchor_former.connectors import AnchorFormer  # noqa: E402
from anchor_former.search import anchor_search  # noqa: E402


@pytest.fixture
def attached():
    processor = make_processor()
    model = make_model(processor)
    old = model.model.multi_modal_projector
    old_weights = {k: v.clone() for k, v in old.state_dict().items()}
    model = attach_anchor_former(model, processor, num_anchors=K, **CONNECTOR)
    return model, processor, old_weights


def reference_image_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Eager CLIP with output_attentions, the [CLS] row of the layer that made hidden_states[-2],
    anchor_search, then the connector on explicit indices."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        idx = anchor_search(out.attentions[-2][:, :, 0], K)
        return model.model.multi_modal_projector(out.hidden_states[-2], idx)


def test_plain_model_works_before_attach() -> None:
    processor = make_processor()
    model = make_model(processor)
    inputs = inputs_for(processor)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 2 * NUM_PATCHES
    with torch.no_grad():
        model(**inputs)


def test_attach_swaps_projector_keeps_sdpa_and_warm_starts(attached) -> None:
    model, _, old_weights = attached
    assert isinstance(model, AnchorFormerLlavaForConditionalGeneration)
    assert isinstance(model.config, AnchorFormerLlavaConfig) and model.config.image_seq_length == K + 1
    connector = model.model.multi_modal_projector
    assert isinstance(connector, AnchorFormer) and connector.num_queries == K + 1
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    torch.testing.assert_close(connector.projector[0].weight, old_weights["linear_1.weight"], atol=0, rtol=0)
    torch.testing.assert_close(connector.projector[0].bias, old_weights["linear_1.bias"], atol=0, rtol=0)
    torch.testing.assert_close(connector.projector[2].weight, old_weights["linear_2.weight"], atol=0, rtol=0)
    torch.testing.assert_close(connector.projector[2].bias, old_weights["linear_2.bias"], atol=0, rtol=0)


def test_processor_to_forward_with_num_anchors_plus_one_tokens(attached) -> None:
    model, processor, _ = attached
    inputs = inputs_for(processor)
    image_tokens = inputs["input_ids"] == processor.image_token_id
    assert image_tokens.sum(dim=1).tolist() == [K + 1, K + 1]
    with torch.no_grad():
        out = model(**inputs)
        expected = reference_image_tokens(model, inputs["pixel_values"])
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert out.image_outputs.pooler_output[0].shape == (K + 1, LLM_DIM)
    torch.testing.assert_close(torch.stack(out.image_outputs.pooler_output), expected, atol=1e-5, rtol=1e-5)
    # the LLM input really holds those tokens at the <image> positions
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        merged = embeds.masked_scatter(image_tokens[..., None], expected.reshape(-1, LLM_DIM))
        direct = model(inputs_embeds=merged, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(out.logits, direct, atol=1e-5, rtol=1e-5)


def test_generate(attached) -> None:
    model, processor, _ = attached
    inputs = inputs_for(processor, batch=1)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    with torch.no_grad():
        first = model(**inputs).logits[0, -1].argmax()
    assert out[0, inputs["input_ids"].shape[1]] == first


def test_training_step_reaches_the_connector(attached) -> None:
    model, processor, _ = attached
    model.train()
    inputs = inputs_for(processor)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, -100)
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.model.multi_modal_projector.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_save_pretrained_and_load_back(attached, tmp_path) -> None:
    model, processor, _ = attached
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AnchorFormerLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.anchor_former == model.config.anchor_former
    assert loaded.config.anchor_former["connector_config"]["num_anchors"] == K
    register_auto_classes()
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(auto) is AnchorFormerLlavaForConditionalGeneration
    reloaded_processor = LlavaProcessor.from_pretrained(tmp_path)  # plain transformers class
    inputs = inputs_for(reloaded_processor)
    torch.testing.assert_close(inputs["input_ids"], inputs_for(processor)["input_ids"], atol=0, rtol=0)
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(auto(**inputs).logits, expected, atol=1e-6, rtol=1e-6)


def test_other_connector_and_score() -> None:
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, connector="avgpool")
    inputs = inputs_for(processor)
    # avgpool pools the 7 x 7 grid 2 x 2 (ceil or floor as the connector documents): as many tokens as it says
    expected = model.model.multi_modal_projector.num_output_tokens(1 + NUM_PATCHES)
    assert (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [expected] * 2
    with torch.no_grad():
        model(**inputs)
    norm = attach_anchor_former(make_model(make_processor()), num_anchors=K, score="norm", **CONNECTOR)
    assert norm.model.multi_modal_projector.num_queries == K  # no [CLS] query with token-norm scores


# --- bad input -------------------------------------------------------------------------------------------


def test_errors() -> None:
    processor = make_processor()
    with pytest.raises(
        ValueError,
        match=r"model must be one of the supported transformers models \(LlavaNextForConditionalGeneration, .*LlavaForConditionalGeneration\), got torch.nn.modules.linear.Linear",
    ):
        attach_anchor_former(nn.Linear(2, 2))
    model = make_model(processor)
    with pytest.raises(
        ValueError, match=rf"num_anchors must be at most the {NUM_PATCHES} patch tokens of the vision tower, got 50"
    ):
        attach_anchor_former(model, num_anchors=50)
    with pytest.raises(ValueError, match="connector must be one of .*got 'qformer'"):
        attach_anchor_former(model, connector="qformer")
    assert type(model) is LlavaForConditionalGeneration  # unchanged after the failures
    multi = make_model(processor, vision_feature_layer=[-2, -1])
    with pytest.raises(ValueError, match=r"vision_feature_layer must be a single int.*got \[-2, -1\]"):
        attach_anchor_former(multi, num_anchors=K)


def test_cls_less_tower_asked_for_cls_anchors() -> None:
    from transformers import SiglipVisionConfig

    processor = make_processor()
    siglip = SiglipVisionConfig(
        hidden_size=VISION_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    model = make_model(processor, vision_config=siglip)
    with pytest.raises(ValueError, match=r"score='cls' needs a \[CLS\] token"):
        attach_anchor_former(model, num_anchors=K)


def test_projector_checkpoints_load_into_the_attached_connector(attached, tmp_path) -> None:
    from anchor_former.checkpoint import CheckpointError, load_connector_weights, save_state_dict

    model, processor, _ = attached
    connector = model.model.multi_modal_projector
    mlp = nn.Sequential(nn.Linear(VISION_DIM, LLM_DIM), nn.GELU(), nn.Linear(LLM_DIM, LLM_DIM))
    path = tmp_path / "mm_projector.bin"  # LLaVA-1.5 layout, as the original training code saves it
    torch.save({f"model.mm_projector.{k}": v for k, v in mlp.state_dict().items()}, path)
    assert load_connector_weights(connector, path) == "llava_mlp"
    torch.testing.assert_close(connector.projector[2].weight, mlp[2].weight, atol=0, rtol=0)
    bad = tmp_path / "bad.safetensors"
    save_state_dict({"model.mm_projector.0.weight": torch.zeros(LLM_DIM, 7)}, bad)
    with pytest.raises(CheckpointError, match=r"projector\.0\.weight: checkpoint \(48, 7\) vs module \(48, 32\)"):
        load_connector_weights(connector, bad)


def test_bfloat16_model() -> None:
    processor = make_processor()
    model = attach_anchor_former(make_model(processor).to(torch.bfloat16), processor, num_anchors=K, **CONNECTOR)
    assert model.model.multi_modal_projector.projector[0].weight.dtype == torch.bfloat16
    inputs = inputs_for(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# --- the kept tokens of a call ----------------------------------------------------------------------------


def test_kept_tokens_are_the_anchors_of_the_call_and_plot(attached) -> None:
    """``kept_tokens(model, **inputs)``: the anchors of the tower's own eager [CLS] attention, per image, as
    data of this call; ``plot_anchors`` draws them."""
    from anchor_former.adapters.transformers import kept_tokens

    model, processor, _ = attached
    inputs = inputs_for(processor)
    kept = kept_tokens(model, **inputs)
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        reference = anchor_search(tower(inputs["pixel_values"], output_attentions=True).attentions[-2][:, :, 0], K)
    assert len(kept) == 2
    torch.testing.assert_close(torch.stack(kept), reference, atol=0, rtol=0)
    pytest.importorskip("matplotlib", reason="plot_anchors needs matplotlib")
    from anchor_former.viz import plot_anchors

    side = IMAGE // PATCH
    figure = plot_anchors(kept[0], grid_size=(side, side), image=inputs["pixel_values"][0])
    assert len(figure.axes) >= 1
    with pytest.raises(ValueError, match="model must be attached with attach_anchor_former"):
        kept_tokens(make_model(make_processor()), **inputs)
