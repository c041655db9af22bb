"""The transformers adapter used the way people use HF models: ``from_pretrained`` → attach → save →
reload (also through the Auto class and from a legacy-layout folder), re-attach, ``torch.compile``, and
serving one model from several threads. Real tiny LlavaForConditionalGeneration + LlavaProcessor.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers adapter needs transformers >= 5", allow_module_level=True)

from _hf_llava import CONNECTOR, IMAGE, PROMPTS, VISION_DIM, K, make_model, make_processor  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForImageTextToText, LlamaConfig, LlavaForConditionalGeneration, LlavaProcessor  # noqa: E402

from anchor_former.adapters.hf.llava import AnchorFormerLlavaForConditionalGeneration  # noqa: E402
from anchor_former.adapters.transformers import attach_anchor_former, register_auto_classes  # noqa: E402
from anchor_former.connectors import available_connectors  # noqa: E402


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    """A stock tiny LLaVA saved with ``save_pretrained``, what ``from_pretrained(model_id)`` reads."""
    path = tmp_path_factory.mktemp("stock_llava")
    processor = make_processor()
    make_model(processor).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def perturb(module: nn.Module) -> None:
    """Give every parameter a value no initialisation would, so a reload that re-initialises shows."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def image_inputs(processor, seed: int):
    image = np.random.default_rng(seed).integers(0, 256, (IMAGE + 6, IMAGE + 2, 3), dtype=np.uint8)
    return processor(text=PROMPTS[:1], images=[image], return_tensors="pt")


def assert_same_model(loaded: nn.Module, saved: nn.Module, inputs) -> None:
    """Every tensor equal (the language model and lm_head included) and the same logits."""
    ours, theirs = loaded.state_dict(), saved.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, saved(**inputs).logits, atol=0, rtol=0)


# --- save path: from_pretrained -> attach -> save_pretrained -> from_pretrained ---------------------------


def test_documented_save_path_keeps_the_language_model(stock_dir, tmp_path) -> None:
    processor = LlavaProcessor.from_pretrained(stock_dir)
    model = LlavaForConditionalGeneration.from_pretrained(stock_dir).eval()
    attach_anchor_former(model, processor, num_anchors=K, **CONNECTOR)
    perturb(model.model.multi_modal_projector)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # transformers writes the legacy LLaVA key layout for a model it converted at load
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "language_model.lm_head.weight" in keys and not any(k.startswith("model.language_model.") for k in keys)

    loaded = AnchorFormerLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded_processor = LlavaProcessor.from_pretrained(tmp_path)
    inputs = image_inputs(reloaded_processor, 0)
    assert_same_model(loaded, model, inputs)
    register_auto_classes()
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(auto) is AnchorFormerLlavaForConditionalGeneration
    assert_same_model(auto, model, inputs)


def test_folder_saved_in_the_legacy_layout_loads(tmp_path) -> None:
    """A folder whose weights use LLaVA's old key names (what earlier versions of this package wrote on
    the documented path) loads with the real language model."""
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, num_anchors=K, **CONNECTOR)
    perturb(model.model.multi_modal_projector)
    model.save_pretrained(tmp_path)
    legacy = {}
    for key, value in load_file(tmp_path / "model.safetensors").items():
        if key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif key.startswith("model.language_model."):
            key = "language_model.model." + key.removeprefix("model.language_model.")
        else:
            key = key.removeprefix("model.")  # vision_tower.*, multi_modal_projector.*
        legacy[key] = value.contiguous()
    assert "language_model.model.embed_tokens.weight" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AnchorFormerLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_same_model(loaded, model, image_inputs(processor, 0))


def test_the_equality_check_sees_a_random_language_model(tmp_path) -> None:
    """The check above fails for a model whose language model was re-initialised (the defect's symptom)."""
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, num_anchors=K, **CONNECTOR)
    broken = copy.deepcopy(model)
    perturb(broken.model.language_model)
    with pytest.raises(AssertionError):
        assert_same_model(broken, model, image_inputs(processor, 0))


# --- every connector saves and reloads --------------------------------------------------------------------


def _attach_kwargs(connector: str) -> dict:
    return {
        "acformer": {"num_anchors": K, **CONNECTOR},
        "perceiver": {"num_queries": 6, **CONNECTOR},
        "select": {"num_anchors": K, "num_context": 2},
        "linear": {"init_projector": False},  # LLaVA-1.5's MLP does not fit a linear
        "identity": {"init_projector": False},
    }.get(connector, {})


@pytest.mark.parametrize("connector", available_connectors())
def test_every_connector_saves_and_reloads(connector, stock_dir, tmp_path) -> None:
    processor = LlavaProcessor.from_pretrained(stock_dir)
    if connector == "identity":  # an identity map needs vision width == LLM width
        text = LlamaConfig(
            vocab_size=len(processor.tokenizer),
            hidden_size=VISION_DIM,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=3,
        )
        model = make_model(processor, text_config=text)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(stock_dir).eval()
    attach_anchor_former(model, processor, connector=connector, **_attach_kwargs(connector))
    perturb(model.model.multi_modal_projector)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AnchorFormerLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.anchor_former == model.config.anchor_former
    inputs = image_inputs(LlavaProcessor.from_pretrained(tmp_path), 0)
    assert_same_model(loaded, model, inputs)


# --- re-attach ---------------------------------------------------------------------------------------------


def test_reattach_carries_the_connector_weights_over() -> None:
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, num_anchors=K, **CONNECTOR)
    perturb(model.model.multi_modal_projector)  # "trained" weights
    trained = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    same = attach_anchor_former(model, processor, num_anchors=4)  # depth/heads/dim_head: the recorded ones
    assert same is model
    connector = model.model.multi_modal_projector
    assert connector.num_queries == 4 + 1 and model.config.anchor_former["connector_config"]["num_anchors"] == 4
    assert sorted(connector.state_dict()) == sorted(trained)
    for key, value in connector.state_dict().items():
        torch.testing.assert_close(value, trained[key], atol=0, rtol=0, msg=key)
    inputs = image_inputs(processor, 0)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 4 + 1
    with torch.no_grad():
        assert model(**inputs).image_outputs.pooler_output[0].shape[0] == 4 + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"connector": "perceiver", "num_queries": 6},
            r"connector must stay 'acformer' when re-attaching.*got 'perceiver'",
        ),
        (
            {"num_anchors": 4, "depth": 3},
            r"architecture must stay the same \(attached now: connector='acformer', num_anchors=8.*\): .*missing keys \['layers\.2\.",
        ),
    ],
)
def test_reattach_that_would_discard_weights_is_refused(kwargs, match) -> None:
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, num_anchors=K, **CONNECTOR)
    perturb(model.model.multi_modal_projector)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config, connector, tokens = (
        model.config.to_dict(),
        model.model.multi_modal_projector,
        processor.num_additional_image_tokens,
    )
    with pytest.raises(ValueError, match=match):
        attach_anchor_former(model, processor, **kwargs)
    assert model.model.multi_modal_projector is connector and model.config.to_dict() == config
    assert processor.num_additional_image_tokens == tokens
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)


def test_reattach_select_equals_a_fresh_attach() -> None:
    """Training-free select: re-attaching with another K gives exactly the model a fresh attach gives."""
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, connector="select", num_anchors=K, num_context=2)
    attach_anchor_former(model, processor, connector="select", num_anchors=4)
    fresh_processor = make_processor()
    fresh = attach_anchor_former(
        make_model(fresh_processor), fresh_processor, connector="select", num_anchors=4, num_context=2
    )
    assert model.model.multi_modal_projector.config == fresh.model.multi_modal_projector.config
    inputs = image_inputs(processor, 0)
    torch.testing.assert_close(inputs["input_ids"], image_inputs(fresh_processor, 0)["input_ids"], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, fresh(**inputs).logits, atol=0, rtol=0)


# --- torch.compile -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_model_matches_eager() -> None:
    """``torch.compile(model)``: the probed vision step runs eagerly, the rest compiled (aot_eager: the
    dynamo + AOTAutograd tracing that failed before, without inductor's C++ build time)."""
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, num_anchors=K, **CONNECTOR)
    inputs = image_inputs(processor, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(compiled(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            compiled(**image_inputs(processor, 1)).logits,
            model(**image_inputs(processor, 1)).logits,
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.slow
def test_fullgraph_compile_says_what_to_do_and_the_language_model_compiles() -> None:
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, num_anchors=K, **CONNECTOR)
    inputs = image_inputs(processor, 0)
    with torch.no_grad():
        expected = model(**inputs).logits
    torch._dynamo.reset()
    with pytest.raises(
        Exception,
        match=r"(?s)vision tower runs eagerly under an AttentionProbe.*"
        r"model\.model\.language_model\.compile\(fullgraph=True\)",
    ):
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)
    torch._dynamo.reset()
    model.model.language_model.compile(fullgraph=True, backend="aot_eager")  # the advice, in place
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# --- one model, several threads ----------------------------------------------------------------------------


def test_concurrent_generate_equals_single_threaded() -> None:
    """4 threads x 3 requests on different images, all at once: each result equals its single-threaded
    run (a request never gets another request's anchors, and no thread sees a probe error)."""
    processor = make_processor()
    model = attach_anchor_former(make_model(processor), processor, num_anchors=K, **CONNECTOR)
    requests = [image_inputs(processor, seed) for seed in range(12)]

    def serve(inputs):
        out = model.generate(
            **inputs,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        return torch.stack(out.logits), out.sequences  # (steps, 1, vocab), (1, prompt + steps)

    expected = [serve(inputs) for inputs in requests]
    # the images differ enough that a request answered with another's anchors would show
    for i in range(1, len(requests)):
        assert not torch.allclose(expected[i][0][0], expected[0][0][0], atol=1e-3)
    results: list = [None] * len(requests)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(first: int) -> None:
        try:
            start.wait()
            for i in range(first, len(requests), 4):
                results[i] = serve(requests[i])
        except BaseException as error:  # reported below, with the thread's traceback
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, (logits, tokens) in enumerate(results):
        torch.testing.assert_close(logits, expected[i][0], atol=0, rtol=0, msg=f"request {i}")
        torch.testing.assert_close(tokens, expected[i][1], atol=0, rtol=0, msg=f"request {i}")
