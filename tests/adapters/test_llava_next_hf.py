"""Anchors per view on a real tiny transformers LlavaNextForConditionalGeneration + LlavaNextProcessor.

The spine: at full budget (K = every patch of every view) the attached model's logits equal the stock
model's for a batch of two images of different sizes (different pinpoints, one unpadded).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers adapter needs transformers >= 5", allow_module_level=True)

from _hf_llava_next import (  # noqa: E402
    LLM_DIM,
    NUM_PATCHES,
    PINPOINTS,
    SIDE,
    SIZES,
    VISION_DIM,
    inputs_for,
    make_model,
    make_processor,
)
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

from anchor_former import AnchorFormer, anchor_search  # noqa: E402
from anchor_former.adapters.hf.llava_next import (  # noqa: E402
    AnchorFormerLlavaNextForConditionalGeneration,
    AnchorFormerLlavaNextProcessor,
    anyres_token_count,
    register_auto_classes,
)
from anchor_former.adapters.transformers import attach_anchor_former  # noqa: E402
from anchor_former.connectors import SelectConnector  # noqa: E402
from anchor_former.views import anyres_views  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 0}  # fp32
CONNECTOR = {"depth": 1, "heads": 2, "dim_head": 8}


def stock_and_attached(**kwargs):
    processor = make_processor()
    stock = make_model(processor)
    attached = attach_anchor_former(copy.deepcopy(stock), processor, **kwargs)
    return stock, attached, processor


def image_token_counts(processor, sizes) -> list[int]:
    """``<image>`` tokens the processor writes for each image, one image per prompt."""
    ids = inputs_for(processor, sizes)["input_ids"]
    return (ids == processor.image_token_id).sum(dim=1).tolist()


def test_stock_counts_match_the_stock_model() -> None:
    """Sanity of the tiny setup: the size sweep selects every pinpoint and unpads rows and columns."""
    processor = make_processor()
    model = make_model(processor)
    grids = set()
    for size in SIZES:
        views = anyres_views(size, grid_pinpoints=PINPOINTS, view_size=28, patch_size=4)
        grids.add(views.grid)
        with torch.no_grad():
            out = model.model.get_image_features(
                **{k: v for k, v in inputs_for(processor, [size]).items() if k in ("pixel_values", "image_sizes")}
            )
        assert image_token_counts(processor, [size]) == [out.pooler_output[0].shape[0]]
    assert grids == {(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)}
    unpadded = [anyres_views(s, grid_pinpoints=PINPOINTS, view_size=28, patch_size=4) for s in SIZES]
    assert any(v.rows != (0, v.grid[0] * SIDE) for v in unpadded) and any(
        v.cols != (0, v.grid[1] * SIDE) for v in unpadded
    )


def test_full_budget_equals_the_stock_model() -> None:
    stock, reduced, processor = stock_and_attached(connector="select", num_anchors=NUM_PATCHES)
    assert isinstance(reduced, AnchorFormerLlavaNextForConditionalGeneration)
    assert isinstance(processor, AnchorFormerLlavaNextProcessor)
    inputs = inputs_for(processor)  # (17, 120): 1 x 3 crops, rows unpadded; (70, 40): 2 x 2 crops, columns unpadded
    torch.testing.assert_close(inputs["input_ids"], inputs_for(make_processor())["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reduced(**inputs).logits, stock(**inputs).logits, **TOL)


def test_full_budget_identity_catches_a_wrong_view_order() -> None:
    """The tolerance bites: the first image's first two crops swapped changes the logits."""
    stock, _, _ = stock_and_attached(connector="select", num_anchors=NUM_PATCHES)
    inputs = inputs_for(make_processor())
    swapped = dict(inputs)
    pix = inputs["pixel_values"].clone()
    pix[0, [1, 2]] = pix[0, [2, 1]]
    swapped["pixel_values"] = pix
    with torch.no_grad():
        assert (stock(**swapped).logits - stock(**inputs).logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connector": "select", "num_anchors": 5},
        {"connector": "select", "num_anchors": NUM_PATCHES},
        {"connector": "select", "num_anchors": 8, "image_budget": 9},
        {"connector": "select", "num_anchors": 8, "image_budget": 40},
        {"connector": "acformer", "num_anchors": 6, **CONNECTOR},
        {"connector": "avgpool"},
    ],
)
def test_processor_counts_equal_model_tokens_over_the_size_sweep(kwargs) -> None:
    _, model, processor = stock_and_attached(**kwargs)
    inputs = inputs_for(processor, SIZES)  # one batch of ten images of different sizes
    counts = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    with torch.no_grad():
        out = model(**inputs)
    assert [t.shape[0] for t in out.image_outputs.pooler_output] == counts
    settings = model.config.anchor_former["extras"]["anyres"]
    views = [anyres_views(s, grid_pinpoints=PINPOINTS, view_size=28, patch_size=4) for s in SIZES]
    assert counts == [anyres_token_count(settings, v) for v in views]
    if kwargs.get("image_budget") is not None:
        assert counts == [min(kwargs["image_budget"], sum(v.num_candidates())) + v.num_newlines for v in views]


def test_reduced_budget_tokens_are_each_views_anchors() -> None:
    """Per view: the anchors of that view's own [CLS] row (eager reference) among its candidate patches,
    through the model's projector, in the stock layout with newlines."""
    k = 5
    _, model, processor = stock_and_attached(connector="select", num_anchors=k)
    size = (17, 120)  # 1 x 3 crops; unpadding keeps grid rows 2..4 of 7: the crops have 3 x 7 = 21 candidates
    inputs = inputs_for(processor, [size])
    views = anyres_views(size, grid_pinpoints=PINPOINTS, view_size=28, patch_size=4)
    assert views.rows == (2, 5) and views.num_candidates() == (49, 21, 21, 21)
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        got = model(**inputs).image_outputs.pooler_output[0]
        eager = tower(inputs["pixel_values"][0], output_hidden_states=True, output_attentions=True)
        rows, features = eager.attentions[-2][:, :, 0], eager.hidden_states[-2]  # (4, H, N), (4, N, D)
        projector = model.model.multi_modal_projector.projector
        base = projector(features[0, anchor_search(rows[:1], k, include_cls=False)[0]])
        # crops: candidates only (rows 2..4 of each crop), anchors placed row by row across crops, newline per row
        grid = {}
        for c in range(3):
            real = torch.zeros(1, 1 + NUM_PATCHES, dtype=torch.bool)
            real[0, 0] = True
            real[0, 1 + 2 * SIDE : 1 + 5 * SIDE] = True
            idx = anchor_search(rows[1 + c : 2 + c], k, include_cls=False, key_padding_mask=real)[0] - 1
            for p in idx.tolist():
                grid[(p // SIDE, c * SIDE + p % SIDE)] = projector(features[1 + c, 1 + p])
        expected = [*base]
        newline = model.model.image_newline
        for r in range(2, 5):
            expected += [grid[key] for key in sorted(grid) if key[0] == r] + [newline]
    assert got.shape == (k + 3 * k + 3, LLM_DIM)
    torch.testing.assert_close(got, torch.stack(expected), **TOL)


def test_acformer_runs_per_view() -> None:
    k = 6
    _, model, processor = stock_and_attached(connector="acformer", num_anchors=k, **CONNECTOR)
    assert isinstance(model.model.multi_modal_projector, AnchorFormer)
    size = (64, 61)  # 2 x 2 crops
    inputs = inputs_for(processor, [size])
    with torch.no_grad():
        got = model(**inputs).image_outputs.pooler_output[0]
        tower = copy.deepcopy(model.model.vision_tower)
        tower.set_attn_implementation("eager")
        eager = tower(inputs["pixel_values"][0], output_hidden_states=True, output_attentions=True)
        idx = anchor_search(eager.attentions[-2][:, :, 0], k)  # (5, K + 1) per view, [CLS] first
        per_view = model.model.multi_modal_projector(eager.hidden_states[-2], idx)  # (5, K + 1, llm_dim)
    newline = model.model.image_newline[None]
    want = torch.cat([per_view[0], per_view[1], per_view[2], newline, per_view[3], per_view[4], newline])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kwargs", [{"num_anchors": 4}, {"num_anchors": 4, "image_budget": 12}])
def test_generate_with_reduced_budget(kwargs) -> None:
    _, model, processor = stock_and_attached(connector="select", **kwargs)
    processor.tokenizer.padding_side = "left"
    inputs = inputs_for(processor)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    with torch.no_grad():
        first = model(**inputs).logits[:, -1].argmax(-1)
    assert out[:, inputs["input_ids"].shape[1]].tolist() == first.tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connector": "select", "num_anchors": 5, "image_budget": 20},
        {"connector": "acformer", "num_anchors": 4, **CONNECTOR},
    ],
)
def test_save_and_load_round_trip(kwargs, tmp_path) -> None:
    _, model, processor = stock_and_attached(**kwargs)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AnchorFormerLlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = AnchorFormerLlavaNextProcessor.from_pretrained(tmp_path)
    assert loaded_processor.anyres_tokens == processor.anyres_tokens
    assert type(loaded.model.multi_modal_projector) is type(model.model.multi_modal_projector)
    inputs = inputs_for(loaded_processor, SIZES[:4])
    torch.testing.assert_close(inputs["input_ids"], inputs_for(processor, SIZES[:4])["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, **TOL)
    register_auto_classes()
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(auto) is AnchorFormerLlavaNextForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(tmp_path)) is AnchorFormerLlavaNextProcessor
    with torch.no_grad():
        torch.testing.assert_close(auto(**inputs).logits, model(**inputs).logits, **TOL)


def test_norm_score_and_select_keeps_no_new_parameters() -> None:
    stock, model, processor = stock_and_attached(connector="select", num_anchors=6, score="norm")
    assert isinstance(model.model.multi_modal_projector, SelectConnector)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stock.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(**inputs_for(processor)).logits).all()


# --- bad input: clear error, model and processor unchanged ------------------------------------------------


def _foreign_processor():
    processor = make_processor()
    processor.image_processor.image_grid_pinpoints = [[28, 56], [56, 28]]
    return processor


@pytest.mark.parametrize(
    "kwargs,setup,match",
    [
        (
            {"connector": "select", "num_anchors": NUM_PATCHES + 1},
            None,
            rf"num_anchors \+ num_context must be at most the {NUM_PATCHES} patch tokens",
        ),
        (
            {"connector": "select", "num_anchors": 4, "image_budget": 4},
            None,
            r"image_budget must be an integer >= 5 \(the most views an image gets.*got 4",
        ),
        (
            {"connector": "acformer", "num_anchors": 4, "image_budget": 20},
            None,
            "image_budget is a connector='select' option, got connector='acformer'",
        ),
        ({"connector": "select", "num_anchors": 4, "num_context": 2}, None, "num_context .* not supported"),
        (
            {"connector": "select", "num_anchors": 4},
            "strategy",
            "vision_feature_select_strategy must be 'default' .*got 'full'",
        ),
        (
            {"connector": "select", "num_anchors": 4},
            "foreign",
            r"processor does not belong to this model: processor.image_processor.image_grid_pinpoints must be",
        ),
        ({"connector": "select", "num_anchors": 4}, "not_next", "processor must be a transformers LlavaNextProcessor"),
    ],
)
def test_bad_input_changes_nothing(kwargs, setup, match) -> None:
    processor = make_processor()
    model = make_model(processor)
    inputs = inputs_for(processor)
    with torch.no_grad():
        before = model(**inputs).logits
    if setup == "strategy":
        model.config.vision_feature_select_strategy = "full"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    target = processor
    if setup == "foreign":
        target = _foreign_processor()
    elif setup == "not_next":
        from _hf_llava import make_processor as make_llava_processor

        target = make_llava_processor()
    saved = dict(target.__dict__)
    with pytest.raises(ValueError, match=match):
        attach_anchor_former(model, target, **kwargs)
    assert type(model) is LlavaNextForConditionalGeneration and type(model.config).__name__ == "LlavaNextConfig"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(target).__name__ in ("LlavaNextProcessor", "LlavaProcessor") and target.__dict__.keys() == saved.keys()
    assert type(processor) is LlavaNextProcessor
    if setup != "strategy":
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs_for(processor)).logits, before, rtol=0, atol=0)


def test_projector_that_is_not_llava_mlp_is_refused() -> None:
    processor = make_processor()
    model = make_model(processor, projector_hidden_act="relu")
    with pytest.raises(ValueError, match="connector='select' needs projector_hidden_act='gelu'.*got 'relu'"):
        attach_anchor_former(model, processor, connector="select", num_anchors=8)
    assert type(model) is LlavaNextForConditionalGeneration and type(processor) is LlavaNextProcessor
    assert VISION_DIM == model.config.vision_config.hidden_size
