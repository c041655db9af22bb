"""Training-free ``connector="select"`` on a real tiny LlavaForConditionalGeneration + LlavaProcessor.

The spine: at full budget (K = every patch, M = 0) the attached model's logits equal the stock model's.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers adapter needs transformers >= 5", allow_module_level=True)

from _hf_llava import (  # noqa: E402
    IMAGE,
    LLM_DIM,
    NUM_PATCHES,
    PATCH,
    PROMPTS,
    VISION_DIM,
    inputs_for,
    make_model,
    make_processor,
    pixels,
)
from transformers import LlavaForConditionalGeneration, LlavaProcessor  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.adapters.hf.llava import AnchorFormerLlavaForConditionalGeneration  # noqa: E402
from anchor_former.adapters.transformers import attach_anchor_former  # noqa: E402
from anchor_former.connectors import SelectConnector  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 0}  # fp32; the full-budget identity measured 0.0 here (bitwise equal)


def stock_and_attached(num_anchors: int, strategy: str = "default", **kwargs):
    processor = make_processor()
    processor.vision_feature_select_strategy = strategy
    stock = make_model(processor, vision_feature_select_strategy=strategy)
    reduced = attach_anchor_former(
        copy.deepcopy(stock), processor, connector="select", num_anchors=num_anchors, **kwargs
    )
    return stock, reduced, processor


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_full_budget_equals_the_stock_model(strategy) -> None:
    stock_processor = make_processor()
    stock_processor.vision_feature_select_strategy = strategy
    stock, reduced, processor = stock_and_attached(NUM_PATCHES, strategy)
    inputs = inputs_for(processor)
    torch.testing.assert_close(inputs["input_ids"], inputs_for(stock_processor)["input_ids"], rtol=0, atol=0)
    assert reduced.model.multi_modal_projector.config.include_cls == (strategy == "full")
    with torch.no_grad():
        torch.testing.assert_close(reduced(**inputs).logits, stock(**inputs).logits, **TOL)


def test_full_budget_identity_catches_a_wrong_token_order() -> None:
    """The tolerance bites: the same tokens in another order give different logits."""
    stock, reduced, processor = stock_and_attached(NUM_PATCHES)
    connector = reduced.model.multi_modal_projector
    inputs = inputs_for(processor)
    reversed_idx = torch.arange(NUM_PATCHES, 0, -1).expand(2, -1)
    with torch.no_grad():
        features = reduced.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        wrong = connector.projector(features.gather(1, reversed_idx[..., None].expand(-1, -1, VISION_DIM)))
        embeds = reduced.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == processor.image_token_id)[..., None]
        logits = reduced(
            inputs_embeds=embeds.masked_scatter(mask, wrong), attention_mask=inputs["attention_mask"]
        ).logits
        assert (logits - stock(**inputs).logits).abs().max() > 1e-3


def test_reduced_budget_tokens_are_the_anchor_patches() -> None:
    k, m = 8, 3
    _, reduced, processor = stock_and_attached(k, num_context=m)
    assert reduced.config.image_seq_length == k + m
    inputs = inputs_for(processor)
    assert (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [k + m] * 2
    tower = copy.deepcopy(reduced.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = reduced(**inputs)
        eager = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        idx = anchor_search(eager.attentions[-2][:, :, 0], k, include_cls=False)
        expected = reduced.model.multi_modal_projector(eager.hidden_states[-2], idx)
    names = [n for n, _ in reduced.model.multi_modal_projector.named_parameters()]
    assert names == ["projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"]
    torch.testing.assert_close(torch.stack(out.image_outputs.pooler_output), expected, **TOL)


def test_padded_batch_equals_each_sample_alone() -> None:
    _, reduced, processor = stock_and_attached(6, num_context=2)
    batch = inputs_for(processor)
    with torch.no_grad():
        logits = reduced(**batch).logits
        for i in range(2):
            alone = processor(text=PROMPTS[i], images=pixels(2)[i], return_tensors="pt")
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(reduced(**alone).logits[0], logits[i, :length], **TOL)


def test_generate_batched_with_reduced_budget() -> None:
    _, reduced, processor = stock_and_attached(4, num_context=2)
    processor.tokenizer.padding_side = "left"
    inputs = inputs_for(processor)
    out = reduced.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    with torch.no_grad():
        first = reduced(**inputs).logits[:, -1].argmax(-1)
    assert out[:, inputs["input_ids"].shape[1]].tolist() == first.tolist()


@pytest.mark.parametrize("score", ["cls", "norm"])
def test_save_and_load_round_trip(score, tmp_path) -> None:
    _, reduced, processor = stock_and_attached(5, num_context=1, score=score)
    reduced.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AnchorFormerLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.multi_modal_projector, SelectConnector)
    inputs = inputs_for(LlavaProcessor.from_pretrained(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reduced(**inputs).logits, **TOL)


def test_siglip_tower_with_norm_score_and_no_cls() -> None:
    from transformers import SiglipVisionConfig

    processor = make_processor()
    processor.num_additional_image_tokens = 0  # SigLIP has no [CLS]
    siglip = SiglipVisionConfig(
        hidden_size=VISION_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    model = make_model(processor, vision_config=siglip, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match=r"score='cls' needs a \[CLS\] token"):
        attach_anchor_former(model, processor, connector="select", num_anchors=6)
    attach_anchor_former(model, processor, connector="select", num_anchors=6, score="norm")
    assert model.model.multi_modal_projector.config.num_prefix_tokens == 0
    inputs = inputs_for(processor)
    assert (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [6, 6]
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


# --- bad input: clear error, model and processor unchanged ------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"num_anchors": NUM_PATCHES + 1},
            rf"num_anchors \+ num_context must be at most the {NUM_PATCHES} patch tokens",
        ),
        (
            {"num_anchors": 40, "num_context": 10},
            rf"at most the {NUM_PATCHES} patch tokens of the vision tower, got 50",
        ),
        ({"num_anchors": 8, "num_context": -1}, "num_context must be an integer >= 0, got -1"),
        ({"num_anchors": 0}, "num_anchors must be an integer >= 1, got 0"),
        ({"num_anchors": 8, "init_projector": False}, "init_projector=False would leave it random"),
    ],
)
def test_bad_input_changes_nothing(kwargs, match) -> None:
    processor = make_processor()
    model = make_model(processor)
    inputs = inputs_for(processor)
    with torch.no_grad():
        before = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        attach_anchor_former(model, processor, connector="select", **kwargs)
    assert type(model) is LlavaForConditionalGeneration and type(model.config).__name__ == "LlavaConfig"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert (processor.num_additional_image_tokens, processor.patch_size) == (1, PATCH)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_for(processor)).logits, before, rtol=0, atol=0)


def test_projector_that_is_not_llava_mlp_is_refused() -> None:
    processor = make_processor()
    model = make_model(processor, projector_hidden_act="relu")
    with pytest.raises(ValueError, match="connector='select' needs projector_hidden_act='gelu'.*got 'relu'"):
        attach_anchor_former(model, processor, connector="select", num_anchors=8)
    assert type(model) is LlavaForConditionalGeneration
    model.model.multi_modal_projector = torch.nn.Linear(VISION_DIM, LLM_DIM)
    with pytest.raises(ValueError, match="needs the model's projector to be transformers' LlavaMultiModalProjector"):
        attach_anchor_former(model, processor, connector="select", num_anchors=8)


def test_one_sdpa_tower_forward_per_batch() -> None:
    _, reduced, processor = stock_and_attached(8, num_context=2)
    tower = reduced.model.vision_tower
    assert tower.config._attn_implementation == "sdpa"
    calls = []
    handle = tower.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            reduced(**inputs_for(processor))
    finally:
        handle.remove()
    assert calls == [2]  # one forward over both images
