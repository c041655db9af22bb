"""Training-free reduction on real tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models + processors (random init, offline).

The spine: at full budget (every merged token kept) the attached model's logits equal the stock model's,
for a batch mixing two image sizes and a video.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the Qwen adapter needs transformers >= 5", allow_module_level=True)
pytest.importorskip(
    "torchvision", reason="the Qwen-VL and OneVision image and video processors need torchvision (extra hf-vision)"
)

from _hf_qwen import (  # noqa: E402
    FAMILIES,
    IMAGE_SIZES,
    MERGE,
    PATCH,
    PROMPTS,
    SPECIAL,
    VIDEO_SHAPE,
    inputs_for,
    make_model,
    make_processor,
    media,
)
from transformers.vision_utils import get_vision_window_index  # noqa: E402

from anchor_former.adapters.hf.qwen_vl import (  # noqa: E402
    AnchorFormerQwen2_5_VLForConditionalGeneration,
    AnchorFormerQwen2VLForConditionalGeneration,
    AnchorFormerQwen3VLForConditionalGeneration,
    attach_qwen_processor,
    kept_per_step,
    merged_token_scores,
)
from anchor_former.adapters.hf.qwen_vl import (  # noqa: E402
    attach_anchor_former as qwen_vl_attach,
)

TOL = {"atol": 1e-5, "rtol": 0}  # fp32; the full-budget identity measured 0.0 here (bitwise equal)
ATTACHED = {
    "qwen2_5_vl": AnchorFormerQwen2_5_VLForConditionalGeneration,
    "qwen2_vl": AnchorFormerQwen2VLForConditionalGeneration,
    "qwen3_vl": AnchorFormerQwen3VLForConditionalGeneration,
}
# merged tokens per image and per video step: images 3 x 4 and 2 x 2, video 2 steps of 2 x 3
MERGED = [(IMAGE_SIZES[0][0] // 16) * (IMAGE_SIZES[0][1] // 16), (IMAGE_SIZES[1][0] // 16) * (IMAGE_SIZES[1][1] // 16)]
VIDEO_STEPS, VIDEO_MERGED = VIDEO_SHAPE[0] // 2, (VIDEO_SHAPE[1] // 16) * (VIDEO_SHAPE[2] // 16)


def stock_and_attached(family: str, num_anchors, **kwargs):
    processor = make_processor(family)
    stock = make_model(processor, family)
    reduced = qwen_vl_attach(copy.deepcopy(stock), processor, num_anchors=num_anchors, **kwargs)
    return stock, reduced, processor


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_budget_equals_the_stock_model(family) -> None:
    """Two image sizes and a video in one (right-padded) batch; fraction 1.0 keeps every merged token."""
    stock_processor = make_processor(family)
    stock, reduced, processor = stock_and_attached(family, 1.0)
    assert type(reduced) is ATTACHED[family]
    inputs = inputs_for(processor)
    assert inputs["image_grid_thw"].tolist() == [[1, h // PATCH, w // PATCH] for h, w in IMAGE_SIZES]
    torch.testing.assert_close(inputs["input_ids"], inputs_for(stock_processor)["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reduced(**inputs).logits, stock(**inputs).logits, **TOL)


def test_full_budget_identity_catches_a_wrong_token_order() -> None:
    """The tolerance bites: the same merged tokens in another order (true positions kept) differ."""
    stock, reduced, processor = stock_and_attached("qwen2_5_vl", 1.0)
    inputs = inputs_for(processor)
    with torch.no_grad():
        reference = stock(**inputs).logits
        image = reduced.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        flipped = {"image": copy.copy(image)}
        flipped["image"].pooler_output = tuple(t.flip(0) for t in image.pooler_output)
        video = reduced.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        logits = reduced(
            **{k: v for k, v in inputs.items() if not k.startswith("pixel_values")},
            mm_encoder_outputs={**flipped, "video": video},
        ).logits
    assert (logits - reference).abs().max() > 1e-3


# --- scores ---------------------------------------------------------------------------------------------


def reference_scores(
    model, inputs, layer: int, *, video: bool = False, undo_windows: bool = True
) -> list[torch.Tensor]:
    """Slow reference: the full softmax map of each segment, column mean, head mean, 2 x 2 sum, per item."""
    visual = model.model.visual
    attn = visual.blocks[layer].attn
    pixels, grid = (
        (inputs["pixel_values_videos"], inputs["video_grid_thw"])
        if video
        else (inputs["pixel_values"], inputs["image_grid_thw"])
    )
    captured = {}

    def hook(module, args, kwargs):
        captured.update(x=args[0], cu=kwargs["cu_seqlens"], pe=kwargs["position_embeddings"])

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        visual(pixels, grid_thw=grid)
    handle.remove()
    x, cu, (cos, sin) = captured["x"], captured["cu"].tolist(), captured["pe"]
    heads = attn.num_heads
    with torch.no_grad():
        q, k, _ = attn.qkv(x).reshape(len(x), 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # (L, H, E)

        def rotate(t):  # the rotary embedding written out: t * cos + rotate_half(t) * sin
            half = t.shape[-1] // 2
            return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]

        q, k = rotate(q), rotate(k)
        per_patch = []
        for a, b in zip(cu[:-1], cu[1:]):
            probs = torch.softmax(torch.einsum("qhe,khe->hqk", q[a:b], k[a:b]) * attn.scaling, dim=-1)  # (H, n, n)
            per_patch.append(probs.mean(1).mean(0))  # (n,) column mean, then head mean
    merged = torch.cat(per_patch).view(-1, MERGE * MERGE).sum(-1)
    if undo_windows and hasattr(visual, "fullatt_block_indexes"):
        window, _ = get_vision_window_index(
            grid, spatial_merge_size=MERGE, window_size=visual.window_size, patch_size=visual.patch_size
        )
        merged = merged[torch.argsort(window)]
    return list(merged.split((grid.prod(-1) // MERGE**2).tolist()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scores_match_the_dense_reference_and_pick_the_top_k(family) -> None:
    _, reduced, processor = stock_and_attached(family, 3)
    inputs = inputs_for(processor)
    layer = reduced.config.anchor_former["layer"]
    assert layer == (3 if family == "qwen2_5_vl" else 2)  # the last full-attention block (all are, but 2.5-VL's)
    visual = reduced.model.visual
    captured = []
    handle = visual.blocks[layer].attn.register_forward_pre_hook(
        lambda m, a, kw: captured.append(
            merged_token_scores(m, a[0], kw["cu_seqlens"], kw["position_embeddings"], merge_unit=4, block_size=5)
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        images = reduced.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        video = reduced.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    handle.remove()
    expected = reference_scores(reduced, inputs, layer, undo_windows=False)
    torch.testing.assert_close(captured[0], torch.cat(expected), atol=2e-7, rtol=0)  # measured 3e-8
    for idx, score in zip(images.kept_indices, reference_scores(reduced, inputs, layer)):
        assert idx.tolist() == sorted(torch.argsort(score, descending=True, stable=True)[:3].tolist())
    # video: top 3 of each 2-frame step, step offsets added
    steps = reference_scores(reduced, inputs, layer, video=True)[0].view(VIDEO_STEPS, VIDEO_MERGED)
    expected_video = [
        s * VIDEO_MERGED + i
        for s in range(VIDEO_STEPS)
        for i in sorted(torch.argsort(steps[s], descending=True, stable=True)[:3].tolist())
    ]
    assert video.kept_indices[0].tolist() == expected_video
    if family == "qwen2_5_vl":  # the window order matters: scores left in the tower's window order differ
        wrong = reference_scores(reduced, inputs, layer, undo_windows=False)[0]
        assert (wrong - reference_scores(reduced, inputs, layer)[0]).abs().max() > 1e-3


# --- token counts and positions -------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("budget,images,video", [(3, [3, 3], 3), (0.5, [6, 2], 3), (0.25, [3, 1], 2)])
def test_processor_counts_equal_the_model_tokens(family, budget, images, video) -> None:
    assert [kept_per_step(budget, n) for n in MERGED] == images and kept_per_step(budget, VIDEO_MERGED) == video
    _, reduced, processor = stock_and_attached(family, budget)
    inputs = inputs_for(processor)
    ids = inputs["input_ids"]
    assert (ids == processor.image_token_id).sum(1).tolist() == [images[0], images[1]]
    assert (ids == processor.video_token_id).sum(1).tolist() == [0, video * VIDEO_STEPS]
    with torch.no_grad():
        out = reduced(**inputs)
    assert [len(t) for t in out.image_outputs.pooler_output] == images
    assert [len(t) for t in out.video_outputs.pooler_output] == [video * VIDEO_STEPS]
    for idx in (*out.image_outputs.kept_indices, *out.video_outputs.kept_indices):
        assert bool((idx[1:] > idx[:-1]).all())  # original order


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kept_tokens_keep_their_stock_positions(family) -> None:
    """What the LLM sees: the stock (t, h, w) / text positions of exactly the tokens that remain."""
    stock, reduced, processor = stock_and_attached(family, 2)
    full = inputs_for(make_processor(family), padding_side="left")
    inputs = inputs_for(processor, padding_side="left")
    with torch.no_grad():
        out = reduced(**inputs)
    kept = {"image": out.image_outputs.kept_indices, "video": out.video_outputs.kept_indices}
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
    stock_pos, stock_delta = stock.model.get_rope_index(
        **{k: full[k] for k in keys}, second_per_grid_ts=full.get("second_per_grid_ts")
    )
    pos, delta = reduced.model.get_rope_index(
        **{k: inputs[k] for k in keys}, second_per_grid_ts=inputs.get("second_per_grid_ts"), kept_indices=kept
    )
    torch.testing.assert_close(reduced.model.rope_deltas, delta, rtol=0, atol=0)  # what forward stored for decoding
    video_runs = kept["video"]
    if family == "qwen3_vl":  # one run per video step (timestamp text between), indices per step
        video_runs = [step - s * VIDEO_MERGED for idx in video_runs for s, step in enumerate(idx.view(VIDEO_STEPS, -1))]
    iters = {1: iter(kept["image"]), 2: iter(video_runs)}
    for b in range(2):
        real, full_real = inputs["attention_mask"][b].bool(), full["attention_mask"][b].bool()
        types, full_types = inputs["mm_token_type_ids"][b][real], full["mm_token_type_ids"][b][full_real]
        # the stock token each reduced token is: walk both sequences run by run
        chosen, i = [], 0
        while i < len(full_types):
            j = i
            while j < len(full_types) and full_types[j] == full_types[i]:
                j += 1
            kind = int(full_types[i])
            chosen += list(range(i, j)) if kind == 0 else (next(iters[kind]) + i).tolist()
            i = j
        assert len(chosen) == len(types)
        torch.testing.assert_close(pos[:, b, real], stock_pos[:, b, full_real][:, chosen], rtol=0, atol=0)
        # generated text continues where the stock model's would: same next position
        removed = int(full_real.sum() - real.sum())
        assert int(delta[b]) == int(stock_delta[b]) + removed


def test_a_wrong_position_rule_changes_the_logits() -> None:
    """The positions matter: renumbering the kept tokens as if they were a smaller grid changes the output;
    precomputed ``mm_encoder_outputs`` get the true positions too (they carry the kept indices)."""
    _, reduced, processor = stock_and_attached("qwen2_5_vl", 2)
    inputs = inputs_for(processor)
    with torch.no_grad():
        right = reduced(**inputs).logits
        keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
        placeholder, _ = reduced.model.get_rope_index(
            **{k: inputs[k] for k in keys}, second_per_grid_ts=inputs["second_per_grid_ts"]
        )
        wrong = reduced(**inputs, position_ids=placeholder).logits  # forward overrides position_ids ...
        torch.testing.assert_close(wrong, right, rtol=0, atol=0)  # ... with the true ones
        embeds = reduced.model(**inputs).image_outputs
        text = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos")}
        features = {
            "image": embeds,
            "video": reduced.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]),
        }
        plain = reduced(**text, mm_encoder_outputs=features, position_ids=placeholder).logits
        torch.testing.assert_close(plain, right, rtol=0, atol=0)
        # the stock forward with the placeholder positions: what mm_encoder_outputs used to give
        stock_forward = type(reduced.model).__mro__[2].forward  # Qwen2_5_VLModel.forward
        hidden = stock_forward(reduced.model, **text, mm_encoder_outputs=features, position_ids=placeholder)
        wrong = reduced.lm_head(hidden.last_hidden_state)
    assert (wrong - right).abs().max() > 1e-3  # measured 2.3e-3, 200 x the identity tolerance


# --- batching and generate ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_left_padded_batch_equals_each_sample_alone(family) -> None:
    _, reduced, processor = stock_and_attached(family, 2)
    batch = inputs_for(processor, padding_side="left")
    images, video = media()
    with torch.no_grad():
        logits = reduced(**batch).logits
        alone = [
            processor(text=PROMPTS[0], images=images[:1], return_tensors="pt"),
            processor(text=PROMPTS[1], images=images[1:], videos=[video], return_tensors="pt"),
        ]
        for i, sample in enumerate(alone):
            length = sample["input_ids"].shape[1]
            torch.testing.assert_close(reduced(**sample).logits[0], logits[i, -length:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_batched_left_padded_with_reduced_budget(family) -> None:
    """Cached generate equals a greedy loop that recomputes everything (so decode positions are right)."""
    _, reduced, processor = stock_and_attached(family, 0.5)
    inputs = inputs_for(processor, padding_side="left")
    steps = 3
    # a random model may pick a vision pad token, which a recomputing loop would read as a new image, or
    # end early: both are suppressed in generate and in the loop
    special = processor.tokenizer.convert_tokens_to_ids([*SPECIAL, "<|im_end|>"])
    out = reduced.generate(**inputs, max_new_tokens=steps, do_sample=False, suppress_tokens=special)
    prompt = inputs["input_ids"].shape[1]
    assert out.shape == (2, prompt + steps)
    loop = dict(inputs)
    with torch.no_grad():
        for _ in range(steps):
            logits = reduced(**loop, use_cache=False).logits[:, -1]
            logits[:, special] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            loop["input_ids"] = torch.cat([loop["input_ids"], nxt], 1)
            for key in ("attention_mask", "mm_token_type_ids"):
                fill = 1 if key == "attention_mask" else 0
                loop[key] = torch.cat([loop[key], torch.full_like(nxt, fill)], 1)
    assert out.tolist() == loop["input_ids"].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_and_load_round_trip(family, tmp_path) -> None:
    _, reduced, processor = stock_and_attached(family, 3)
    reduced.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = ATTACHED[family].from_pretrained(tmp_path).eval()
    assert loaded.config.anchor_former == reduced.config.anchor_former
    stock_processor_class = FAMILIES[family][0]
    loaded_processor = attach_qwen_processor(
        stock_processor_class.from_pretrained(tmp_path), num_anchors=loaded.config.anchor_former["num_anchors"]
    )
    inputs = inputs_for(loaded_processor)
    torch.testing.assert_close(inputs["input_ids"], inputs_for(processor)["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reduced(**inputs).logits, **TOL)


# --- bad input: clear error, model and processor unchanged ----------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_anchors": 0}, "num_anchors must be an int K >= 1 or a float in \\(0, 1\\], got 0"),
        ({"num_anchors": 1.5}, r"num_anchors as a fraction must lie in \(0, 1\], got 1.5"),
        (
            {"num_anchors": 2, "score_layer": 0},
            r"score_layer must be a full-attention block, one of fullatt_block_indexes=\[1, 3\]; got 0",
        ),
        ({"num_anchors": 2, "score_layer": 4}, r"score_layer must be an int block index in \[-4, 4\), got 4"),
        ({"num_anchors": 2, "connector": "acformer"}, "connector must be 'select' for Qwen-VL"),
        ({"num_anchors": 2, "score": "cls"}, "score must be 'received' for Qwen-VL"),
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
        qwen_vl_attach(model, processor, **kwargs)
    assert type(model) is FAMILIES["qwen2_5_vl"][2] and type(model.config).__name__ == "Qwen2_5_VLConfig"
    assert type(processor) is FAMILIES["qwen2_5_vl"][0]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs_for(processor)).logits, before, rtol=0, atol=0)


def test_budget_larger_than_an_image_is_refused() -> None:
    """K = 5 fits the 12-token image but not the 4-token one: the processor and the model both refuse it."""
    stock, reduced, processor = stock_and_attached("qwen2_5_vl", 5)
    with pytest.raises(ValueError, match=r"num_anchors=5 must be at most the 4 merged tokens per step of image 1"):
        inputs_for(processor)
    inputs = inputs_for(make_processor())
    with pytest.raises(ValueError, match=r"num_anchors=5 must be at most the 4 merged tokens per step of image 1"):
        with torch.no_grad():
            reduced(**inputs)
    with torch.no_grad():  # the stock copy is untouched and still runs
        assert torch.isfinite(stock(**inputs).logits).all()


def test_inputs_from_a_stock_processor_are_refused() -> None:
    _, reduced, _ = stock_and_attached("qwen2_5_vl", 2)
    with pytest.raises(
        ValueError,
        match=r"input_ids must hold the 2 kept image tokens of grid \(1, 6, 8\) "
        r"\(num_anchors=2\), got a run of 12; prepare inputs with the processor",
    ):
        with torch.no_grad():
            reduced(**inputs_for(make_processor()))


def test_unsupported_models_are_refused() -> None:
    from _hf_llava import make_model as make_llava
    from _hf_llava import make_processor as make_llava_processor

    llava = make_llava(make_llava_processor())
    with pytest.raises(
        ValueError,
        match="model must be a transformers Qwen2VLForConditionalGeneration, Qwen2_5_VL"
        "ForConditionalGeneration or Qwen3VLForConditionalGeneration, got transformers"
        ".*LlavaForConditional",
    ):
        qwen_vl_attach(llava, num_anchors=4)
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    _, reduced, processor = stock_and_attached("qwen2_5_vl", 2)
    qwen_vl_attach(reduced, processor, num_anchors=3)  # re-attach: a new budget
    assert reduced.config.anchor_former["num_anchors"] == 3 and processor.num_anchors == 3
    with pytest.raises(
        ValueError, match="processor must be a transformers Qwen2VLProcessor, Qwen2_5_VLProcessor or Qwen3VLProcessor"
    ):
        qwen_vl_attach(make_model(make_processor()), object(), num_anchors=2)


def test_qwen3_deepstack_features_are_taken_at_the_kept_tokens() -> None:
    stock, reduced, processor = stock_and_attached("qwen3_vl", 2)
    inputs = inputs_for(processor)
    with torch.no_grad():
        out = reduced.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        full = stock.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert len(out.deepstack_features) == 2
    for layer_out, layer_full in zip(out.deepstack_features, full.deepstack_features):
        for kept, idx, everything in zip(layer_out, out.kept_indices, layer_full):
            torch.testing.assert_close(kept, everything[idx], rtol=0, atol=0)


def test_kept_tokens_of_a_call() -> None:
    """``kept_tokens(model, **inputs)``: per image, the kept merged tokens (top-K scores, ascending), the same
    indices the call's forward used."""
    from anchor_former.adapters.transformers import kept_tokens

    _, reduced, processor = stock_and_attached("qwen2_vl", 2)
    inputs = inputs_for(processor)
    kept = kept_tokens(reduced, **inputs)
    assert [k.numel() for k in kept] == [2, 2]
    with torch.no_grad():
        out = reduced(**inputs)
    for got, used in zip(kept, out.image_outputs.kept_indices):
        torch.testing.assert_close(got, used, atol=0, rtol=0)
        assert bool((got[1:] > got[:-1]).all())
