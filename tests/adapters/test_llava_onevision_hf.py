"""Anchors on a real tiny transformers LlavaOnevisionForConditionalGeneration (SigLIP, no [CLS]) + its processor.

The spine: at full budget (K = every token of every view / every pooled token of every frame) the attached
model's logits equal the stock model's, for images (including ones the model shrinks, ``anyres_max``) and
for a batch mixing an image and a video.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers adapter needs transformers >= 5", allow_module_level=True)
pytest.importorskip(
    "torchvision", reason="the Qwen-VL and OneVision image and video processors need torchvision (extra hf-vision)"
)

from _hf_llava_onevision import (  # noqa: E402
    LLM_DIM,
    MAX_VIEWS,
    NUM_PATCHES,
    PINPOINTS,
    POOLED,
    SIDE,
    SIZES,
    image_inputs,
    make_model,
    make_processor,
    mixed_inputs,
    pixels,
    video,
)
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.adapters.hf.llava_onevision import (  # noqa: E402
    AnchorFormerLlavaOnevisionForConditionalGeneration,
    AnchorFormerLlavaOnevisionProcessor,
    image_token_count,
    shrunk_grid,
    video_token_count,
)
from anchor_former.adapters.transformers import attach_anchor_former, supported_models  # noqa: E402
from anchor_former.connectors import SelectConnector  # noqa: E402
from anchor_former.views import anyres_views  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 0}  # fp32
CONNECTOR = {"depth": 1, "heads": 2, "dim_head": 8}
FULL = {"connector": "select", "num_anchors": NUM_PATCHES}


def stock_and_attached(**kwargs):
    processor = make_processor()
    stock = make_model(processor)
    attached = attach_anchor_former(copy.deepcopy(stock), processor, **kwargs)
    return stock, attached, processor


def views_of(size):
    return anyres_views(size, grid_pinpoints=PINPOINTS, view_size=28, patch_size=4)


def eager_received(model, pixel_values):
    """Slow reference: the selected layer's features and the column mean of eager ``output_attentions``."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    return out.hidden_states[-1], out.attentions[-1].mean(dim=2)  # (M, N, D), (M, H, N)


def test_dispatch_and_stock_counts_match_the_stock_model() -> None:
    """Sanity of the tiny setup: the sweep unpads rows and columns, and the model shrinks some grids."""
    assert "LlavaOnevisionForConditionalGeneration" in supported_models()
    processor = make_processor()
    model = make_model(processor)
    inputs = image_inputs(processor, SIZES)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    counts = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert counts == [t.shape[0] for t in out.pooler_output]
    shrunk = [shrunk_grid(views_of(s), MAX_VIEWS) for s in SIZES]
    assert any(g is None for g in shrunk) and any(g is not None for g in shrunk)


@pytest.mark.parametrize("sizes", [((17, 120), (90, 90)), ((28, 28), (40, 70))])
def test_full_budget_images_equal_the_stock_model(sizes) -> None:
    stock, reduced, processor = stock_and_attached(**FULL)
    assert isinstance(reduced, AnchorFormerLlavaOnevisionForConditionalGeneration)
    assert isinstance(processor, AnchorFormerLlavaOnevisionProcessor)
    assert reduced.config.anchor_former["score"] == "received"
    inputs = image_inputs(processor, sizes)
    torch.testing.assert_close(inputs["input_ids"], image_inputs(make_processor(), sizes)["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reduced(**inputs).logits, stock(**inputs).logits, **TOL)


@pytest.mark.parametrize("frames", [1, 3])
def test_full_budget_video_equals_the_stock_model(frames) -> None:
    """A batch of an image and a video; K per frame = every pooled token (the default for num_anchors = s^2)."""
    stock, reduced, processor = stock_and_attached(**FULL)
    assert reduced.config.anchor_former["extras"]["video"]["tokens_per_frame"] == POOLED
    inputs = mixed_inputs(processor, frames=frames)
    torch.testing.assert_close(
        inputs["input_ids"], mixed_inputs(make_processor(), frames=frames)["input_ids"], rtol=0, atol=0
    )
    with torch.no_grad():
        torch.testing.assert_close(reduced(**inputs).logits, stock(**inputs).logits, **TOL)


def test_full_budget_identity_catches_a_wrong_frame_order() -> None:
    """The tolerance bites: two frames swapped changes the stock logits by far more than 1e-5."""
    stock = make_model(make_processor())
    inputs = mixed_inputs(make_processor(), frames=3)
    swapped = dict(inputs)
    swapped["pixel_values_videos"] = inputs["pixel_values_videos"][:, [1, 0, 2]]
    with torch.no_grad():
        assert (stock(**swapped).logits - stock(**inputs).logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connector": "select", "num_anchors": 5},
        {"connector": "select", "num_anchors": 30, "frame_anchors": 7},
        {"connector": "select", "num_anchors": 8, "image_budget": 12},
        {"connector": "acformer", "num_anchors": 6, **CONNECTOR},
    ],
)
def test_processor_counts_equal_model_tokens(kwargs) -> None:
    """Every image size of the sweep (one batch), and batches mixing an image and a video of 1, 2, 4 frames."""
    _, model, processor = stock_and_attached(**kwargs)
    settings = model.config.anchor_former
    inputs = image_inputs(processor, SIZES)
    counts = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    with torch.no_grad():
        out = model(**inputs)
    assert [t.shape[0] for t in out.image_outputs.pooler_output] == counts
    assert counts == [
        image_token_count(settings["extras"]["anyres"], views_of(s), vision_aspect_ratio=MAX_VIEWS, multi_image=False)
        for s in SIZES
    ]
    for frames in (1, 2, 4):
        mixed = mixed_inputs(processor, size=(80, 100), frames=frames)
        with torch.no_grad():
            out = model(**mixed)
        ids = mixed["input_ids"]
        assert out.image_outputs.pooler_output[0].shape[0] == int((ids[0] == processor.image_token_id).sum())
        n_video = int((ids[1] == processor.video_token_id).sum())
        assert out.video_outputs.pooler_output.shape == (1, n_video, LLM_DIM)
        assert (
            n_video
            == video_token_count(settings["extras"]["video"], frames)
            == frames * settings["extras"]["video"]["tokens_per_frame"] + 1
        )


@pytest.mark.parametrize(
    "kwargs,per_image",
    [
        (FULL, NUM_PATCHES + 1),
        ({"connector": "select", "num_anchors": 5}, 5 + 1),
        ({"connector": "select", "num_anchors": 5, "image_budget": 12}, 12 + 1),
        ({"connector": "acformer", "num_anchors": 3, **CONNECTOR}, 3 + 1),
    ],
)  # no [CLS] query
def test_multi_image_sample_counts_and_full_budget(kwargs, per_image) -> None:
    """A sample with two images: base views only (the whole budget each), each closed by a newline;
    at full budget the logits are the stock model's."""
    stock, model, processor = stock_and_attached(**kwargs)
    prompt = "user <image> <image> what is in the picture ? assistant"
    inputs = processor(text=[prompt], images=[pixels([(30, 90), (64, 61)])], return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [2]
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 2 * per_image
    with torch.no_grad():
        out = model(**inputs)
        assert [t.shape[0] for t in out.image_outputs.pooler_output] == [per_image] * 2
        if kwargs is FULL:
            torch.testing.assert_close(out.logits, stock(**inputs).logits, **TOL)


def test_reattach_follows_the_one_rule() -> None:
    """Re-attaching with the same connector changes the budget; another connector is refused, naming the
    attached one, and changes nothing."""
    _, model, processor = stock_and_attached(connector="select", num_anchors=5)
    settings = copy.deepcopy(model.config.anchor_former)
    with pytest.raises(
        ValueError,
        match=r"connector must stay 'select' when re-attaching \(the model is already "
        r"attached: connector='select', num_anchors=5",
    ):
        attach_anchor_former(model, processor, connector="acformer", num_anchors=7)
    assert model.config.anchor_former == settings and processor.anyres_tokens == settings["extras"]["anyres"]
    attach_anchor_former(model, processor, num_anchors=7)
    assert model.config.anchor_former["num_anchors"] == 7 and processor.anyres_tokens["num_anchors"] == 7


def test_reduced_video_tokens_are_anchors_among_pooled_tokens() -> None:
    """K per frame = the anchors of the pooled received-attention map (eager reference, bilinear pooling),
    taken from the stock model's own pooled video tokens; anchors chosen before pooling would differ."""
    k, frames = 5, 3
    stock, model, processor = stock_and_attached(connector="select", num_anchors=k)
    inputs = mixed_inputs(processor, frames=frames)
    pix = inputs["pixel_values_videos"]
    _, received = eager_received(stock, pix[0])  # (F, H, N)
    pooled_scores = torch.nn.functional.interpolate(
        received.view(frames, -1, SIDE, SIDE), size=[4, 4], mode="bilinear"
    ).flatten(2)  # (F, H, 16)
    with torch.no_grad():
        got = model.model.get_video_features(pix).pooler_output  # (1, F K + 1, L)
        stock_tokens = stock.model.get_video_features(pix).pooler_output[0, :-1].view(frames, POOLED, LLM_DIM)
    idx = anchor_search(pooled_scores, k, include_cls=False, num_prefix_tokens=0)  # (F, K)
    want = torch.cat(
        [stock_tokens.gather(1, idx[..., None].expand(-1, -1, LLM_DIM)).flatten(0, 1), stock.model.image_newline[None]]
    )
    assert got.shape == (1, frames * k + 1, LLM_DIM)
    torch.testing.assert_close(got[0], want, **TOL)
    # the same budget spent before pooling (anchors of the raw map, their pooled cells) is a different selection
    before = anchor_search(received, k, include_cls=False, num_prefix_tokens=0)  # (F, K) of 49 patches
    cells = ((before // SIDE) // 2 * 4 + (before % SIDE) // 2).sort(dim=1).values
    assert not torch.equal(cells, idx)


def test_reduced_shrunk_image_tokens_follow_the_documented_rule() -> None:
    """An image whose grid the model shrinks: base anchors, then anchors of the bilinearly shrunk score map
    among the stock model's shrunk cells, row by row with newlines."""
    k, size = 5, (90, 90)
    stock, model, processor = stock_and_attached(connector="select", num_anchors=k)
    views = views_of(size)
    h, w = shrunk_grid(views, MAX_VIEWS)
    assert views.grid == (3, 3) and (h, w) < (21, 21)
    inputs = image_inputs(processor, [size])
    pix = inputs["pixel_values"][0]
    _, received = eager_received(stock, pix)  # (10, H, N)
    with torch.no_grad():
        got = model(**inputs).image_outputs.pooler_output[0]
        packed = stock.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output[0]
    base_idx = anchor_search(received[:1], k, include_cls=False, num_prefix_tokens=0)[0]
    heads = received.shape[1]
    grid = received[1:].view(3, 3, heads, SIDE, SIDE).permute(2, 0, 3, 1, 4).reshape(heads, 3 * SIDE, 3 * SIDE)
    cells = torch.nn.functional.interpolate(grid[None], [h, w], mode="bilinear")[0].flatten(1)  # (H, h w)
    k_hi = -(-9 * k * h * w // (9 * NUM_PATCHES))  # the 9 crops' budgets scaled by the shrink
    hi_idx = anchor_search(cells[None], k_hi, include_cls=False, num_prefix_tokens=0)[0]
    base, high = packed[:NUM_PATCHES], packed[NUM_PATCHES:].view(h, w + 1, LLM_DIM)  # stock: rows end in a newline
    rows = [torch.cat([high[r, hi_idx[hi_idx // w == r] % w], high[r, w:]]) for r in range(h)]
    want = torch.cat([base[base_idx], *rows])
    assert got.shape == (k + k_hi + h, LLM_DIM)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize(
    "kwargs", [{"connector": "select", "num_anchors": 4}, {"connector": "acformer", "num_anchors": 3, **CONNECTOR}]
)
def test_generate_with_reduced_budget(kwargs) -> None:
    _, model, processor = stock_and_attached(**kwargs)
    processor.tokenizer.padding_side = "left"
    inputs = mixed_inputs(processor, frames=2)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    with torch.no_grad():
        first = model(**inputs).logits[:, -1].argmax(-1)
    assert out[:, inputs["input_ids"].shape[1]].tolist() == first.tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connector": "select", "num_anchors": 5, "frame_anchors": 3, "score": "norm"},
        {"connector": "acformer", "num_anchors": 4, **CONNECTOR},
    ],
)
def test_save_and_load_round_trip(kwargs, tmp_path) -> None:
    _, model, processor = stock_and_attached(**kwargs)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AnchorFormerLlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = AnchorFormerLlavaOnevisionProcessor.from_pretrained(tmp_path)
    assert loaded.config.anchor_former == model.config.anchor_former
    assert (loaded_processor.anyres_tokens, loaded_processor.video_tokens) == (
        processor.anyres_tokens,
        processor.video_tokens,
    )
    inputs = mixed_inputs(loaded_processor, frames=2)
    torch.testing.assert_close(inputs["input_ids"], mixed_inputs(processor, frames=2)["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, **TOL)


def test_select_keeps_no_new_parameters() -> None:
    stock, model, _ = stock_and_attached(connector="select", num_anchors=6)
    assert isinstance(model.model.multi_modal_projector, SelectConnector)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stock.parameters())


# --- bad input: clear error, model and processor unchanged ------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,setup,match",
    [
        ({"connector": "select", "score": "cls"}, None, r"score='cls' needs a \[CLS\] token.*score='received'"),
        (
            {"connector": "select", "num_anchors": 8, "frame_anchors": POOLED + 1},
            None,
            rf"frame_anchors must be an integer in \[1, {POOLED}\] \(the tokens of a video frame after .*got {POOLED + 1}",
        ),
        ({"connector": "select", "num_anchors": 8, "frame_anchors": 0}, None, r"frame_anchors must be an integer in"),
        (
            {"connector": "acformer", "num_anchors": 4, "frame_anchors": 2},
            None,
            "frame_anchors is a connector='select' option, got connector='acformer'",
        ),
        (
            {"connector": "select", "num_anchors": NUM_PATCHES + 1},
            None,
            rf"num_anchors \+ num_context must be at most the {NUM_PATCHES} patch tokens",
        ),
        (
            {"connector": "select", "num_anchors": 4, "image_budget": 9},
            None,
            r"image_budget must be an integer >= 10 \(the most views an image gets.*got 9",
        ),
        (
            {"connector": "select", "num_anchors": 4},
            "foreign",
            "processor does not belong to this model: processor.vision_aspect_ratio must be 'anyres_max_2', "
            "got 'anyres_max_9'",
        ),
        (
            {"connector": "select", "num_anchors": 4},
            "strategy",
            "vision_feature_select_strategy must be 'full' .*got 'default'",
        ),
    ],
)
def test_bad_input_changes_nothing(kwargs, setup, match) -> None:
    processor = make_processor()
    model = make_model(processor)
    if setup == "strategy":
        model.config.vision_feature_select_strategy = "default"
    target = make_processor("anyres_max_9") if setup == "foreign" else processor
    state = {k: v.clone() for k, v in model.state_dict().items()}
    saved = dict(target.__dict__)
    with pytest.raises(ValueError, match=match):
        attach_anchor_former(model, target, **kwargs)
    assert (
        type(model) is LlavaOnevisionForConditionalGeneration and type(model.config).__name__ == "LlavaOnevisionConfig"
    )
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(target) is LlavaOnevisionProcessor and target.__dict__.keys() == saved.keys()


def test_video_with_zero_frames_is_refused() -> None:
    _, model, processor = stock_and_attached(connector="select", num_anchors=5)
    empty = torch.zeros(1, 0, 3, 28, 28)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"pixel_values_videos must have shape \(B, F, C, H, W\) with F >= 1 frames, "
        r"got shape \(1, 0, 3, 28, 28\)",
    ):
        model.model.get_video_features(empty)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="a video must have at least one frame, got num_frames=0"):
        video_token_count(model.config.anchor_former["extras"]["video"], 0)
    frames = video(1)[:0]  # (0, 40, 50, 3)
    assert frames.shape[0] == 0 and isinstance(frames, np.ndarray)
    with pytest.raises(ValueError, match="frame"):
        processor(text=["user <video> what"], videos=[frames], return_tensors="pt")


def test_plain_list_image_sizes_are_accepted_like_the_stock_model() -> None:
    stock, model, processor = stock_and_attached(**FULL)
    inputs = image_inputs(processor, ((30, 90),))
    listed = {**inputs, "image_sizes": inputs["image_sizes"].tolist()}
    with torch.no_grad():
        torch.testing.assert_close(model(**listed).logits, stock(**listed).logits, **TOL)
        torch.testing.assert_close(model(**listed).logits, model(**inputs).logits, atol=0, rtol=0)
