"""The LLaVA adapter used the way people use LLaVA models: ``from_pretrained`` → attach → save → the
documented reload recipe for every connector, re-attach, ``torch.compile``, and serving one model from
several threads. Real llava-torch 1.2.2.post1 (runs only in ``.venv-llava``).
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

llava = pytest.importorskip("llava")

from _llava_torch import CONNECTOR, VISION_DIM, K, images, make_model, prompt, save_tiny_tower  # noqa: E402
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # noqa: E402

import anchor_former.adapters.llava as llava_adapter  # noqa: E402
from anchor_former.adapters.llava import attach_anchor_former, load_projector_weights  # noqa: E402
from anchor_former.adapters.llava._registration import register_with_llava, unregister_from_llava  # noqa: E402
from anchor_former.connectors import available_connectors  # noqa: E402


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return save_tiny_tower(tmp_path_factory.mktemp("clip_tower"))


def perturb(module: nn.Module) -> None:
    """Give every parameter a value no initialisation would, so a reload that re-initialises shows."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def logits(model, ids, pixel_values):
    with torch.no_grad():
        return model(input_ids=ids, images=pixel_values).logits


def test_one_verb() -> None:
    """``attach_anchor_former`` is the one public verb; the pre-release alias is gone."""
    assert "attach_anchor_former" in llava_adapter.__all__
    assert not hasattr(llava_adapter, "enable_anchor_former") and "enable_anchor_former" not in llava_adapter.__all__


# --- every connector saves and reloads through the documented recipe ---------------------------------------


def _attach_kwargs(connector: str) -> dict:
    return {
        "acformer": {"num_anchors": K, **CONNECTOR},
        "perceiver": {"num_queries": 6, **CONNECTOR},
        "select": {"num_anchors": K, "num_context": 2},
        "linear": {"init_projector": False},  # LLaVA-1.5's MLP does not fit a linear
        "identity": {"init_projector": False},
    }.get(connector, {})


@pytest.mark.parametrize("connector", available_connectors())
def test_every_connector_saves_and_reloads(connector, tower_dir, tmp_path) -> None:
    # an identity map needs vision width == LLM width
    overrides = {"hidden_size": VISION_DIM} if connector == "identity" else {}
    stock_dir = tmp_path / "stock"
    make_model(tower_dir, **overrides).save_pretrained(stock_dir)
    model = LlavaLlamaForCausalLM.from_pretrained(stock_dir).eval()
    model.get_vision_tower().load_model()
    attach_anchor_former(model, connector=connector, **_attach_kwargs(connector))
    assert model.config.anchor_former["connector"] == connector
    perturb(model.get_model().mm_projector)
    saved_dir = tmp_path / "attached"
    model.save_pretrained(saved_dir)

    # the recipe of docs/llava.md
    loaded = LlavaLlamaForCausalLM.from_pretrained(saved_dir, mm_projector_type="mlp2x_gelu").eval()
    loaded.get_vision_tower().load_model()
    attach_anchor_former(loaded)  # the recorded settings
    if any(True for _ in model.get_model().mm_projector.parameters()):
        load_projector_weights(loaded, saved_dir / "model.safetensors")
    assert loaded.config.anchor_former == model.config.anchor_former
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
    ids, pixel_values = prompt(2), images(2)
    torch.testing.assert_close(logits(loaded, ids, pixel_values), logits(model, ids, pixel_values), atol=0, rtol=0)


def test_recipe_keeps_the_score(tower_dir, tmp_path) -> None:
    """``score="norm"`` is recorded too: the rebuilt tower computes token norms, not the [CLS] row."""
    model = attach_anchor_former(make_model(tower_dir), num_anchors=K, score="norm", **CONNECTOR)
    assert model.config.anchor_former["score"] == "norm"
    model.save_pretrained(tmp_path)
    fresh = LlavaLlamaForCausalLM.from_pretrained(tmp_path, mm_projector_type="mlp2x_gelu")
    fresh.get_vision_tower().load_model()
    attach_anchor_former(fresh)
    assert fresh.get_vision_tower().score == "norm"
    assert fresh.get_model().mm_projector.connector.config == model.get_model().mm_projector.connector.config


# --- re-attach ---------------------------------------------------------------------------------------------


def test_reattach_carries_the_connector_weights_over(tower_dir) -> None:
    model = attach_anchor_former(make_model(tower_dir), num_anchors=K, **CONNECTOR)
    perturb(model.get_model().mm_projector)  # "trained" weights
    trained = {k: v.clone() for k, v in model.get_model().mm_projector.state_dict().items()}
    assert attach_anchor_former(model, num_anchors=4) is model  # depth/heads/dim_head: the recorded ones
    connector = model.get_model().mm_projector.connector
    assert connector.num_queries == 4 + 1 and model.config.anchor_former["num_anchors"] == 4
    state = model.get_model().mm_projector.state_dict()
    assert sorted(state) == sorted(trained)
    for key, value in state.items():
        torch.testing.assert_close(value, trained[key], atol=0, rtol=0, msg=key)
    ids = prompt(1)
    assert logits(model, ids, images(1)).shape[1] == ids.shape[1] - 1 + 4 + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"connector": "perceiver", "num_queries": 6},
            r"connector must stay 'acformer' when re-attaching \(the model is already attached: connector='acformer', "
            r"num_anchors=8.*got 'perceiver'",
        ),
        (
            {"num_anchors": 4, "depth": 3},
            r"architecture must stay the same \(attached now: connector='acformer'.*depth=2.*missing keys \['layers\.2\.",
        ),
    ],
)
def test_reattach_that_would_discard_weights_is_refused(tower_dir, kwargs, match) -> None:
    model = attach_anchor_former(make_model(tower_dir), num_anchors=K, **CONNECTOR)
    perturb(model.get_model().mm_projector)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    modules = (model.get_model().vision_tower, model.get_model().mm_projector)
    with pytest.raises(ValueError, match=match):
        attach_anchor_former(model, **kwargs)
    assert (model.get_model().vision_tower, model.get_model().mm_projector) == modules
    assert model.config.to_dict() == config
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)


def test_reattach_select_equals_a_fresh_attach(tower_dir) -> None:
    """Training-free select: re-attaching with another K gives exactly the model a fresh attach gives
    (same projector, same token layout: no [CLS] on a "patch" model, num_context kept)."""
    model = attach_anchor_former(make_model(tower_dir), connector="select", num_anchors=K, num_context=2)
    attach_anchor_former(model, connector="select", num_anchors=4)
    fresh = attach_anchor_former(make_model(tower_dir), connector="select", num_anchors=4, num_context=2)
    connector = model.get_model().mm_projector.connector
    assert connector.config == fresh.get_model().mm_projector.connector.config and not connector.config.include_cls
    ids, pixel_values = prompt(2), images(2)
    torch.testing.assert_close(logits(model, ids, pixel_values), logits(fresh, ids, pixel_values), atol=0, rtol=0)


# --- torch.compile -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_model_matches_eager(tower_dir) -> None:
    """``torch.compile(model)``: the probed vision step runs eagerly, the rest compiled (aot_eager)."""
    model = attach_anchor_former(make_model(tower_dir), num_anchors=K, **CONNECTOR)
    ids, pixel_values = prompt(2), images(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(
        logits(compiled, ids, pixel_values), logits(model, ids, pixel_values), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(Exception, match=r"(?s)vision tower runs eagerly under an AttentionProbe.*fullgraph=True"):
        torch._dynamo.reset()
        logits(torch.compile(model, fullgraph=True, backend="aot_eager"), ids, pixel_values)
    torch._dynamo.reset()


# --- one model, several threads ----------------------------------------------------------------------------


def test_concurrent_generate_equals_single_threaded(tower_dir) -> None:
    """4 threads x 3 requests on different images, all at once: each result equals its single-threaded
    run (a request never gets another request's anchors, and no thread sees a probe error)."""
    model = attach_anchor_former(make_model(tower_dir), num_anchors=K, **CONNECTOR)
    ids = prompt(1)
    requests = [torch.randn(1, 3, *images(1).shape[2:], generator=torch.Generator().manual_seed(s)) for s in range(12)]

    def serve(pixel_values):
        out = model.generate(
            ids,
            images=pixel_values,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
        )
        return torch.stack(out.scores), out.sequences  # (steps, 1, vocab), (1, steps [+ BOS])

    expected = [serve(pixel_values) for pixel_values in requests]
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
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, (scores, tokens) in enumerate(results):
        torch.testing.assert_close(scores, expected[i][0], atol=0, rtol=0, msg=f"request {i}")
        torch.testing.assert_close(tokens, expected[i][1], atol=0, rtol=0, msg=f"request {i}")


# --- LLaVA's own reload (after register_with_llava) ------------------------------------------------------------


@pytest.fixture
def registered():
    register_with_llava()
    yield
    unregister_from_llava()


def saved_with_tokenizer(model, folder) -> None:
    """``model`` saved as LLaVA's trainer leaves a folder: with a (slow) tokenizer of the model's 64 tokens."""
    from transformers import BertTokenizer

    model.config.mm_use_im_patch_token = False  # else load_pretrained_model adds a token and resizes
    model.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]))
    BertTokenizer(str(vocab)).save_pretrained(folder)


@pytest.mark.parametrize("connector", ["acformer", "select"])
def test_llava_reloads_a_saved_folder_with_its_settings(tower_dir, tmp_path, registered, connector) -> None:
    """``from_pretrained`` (float32: the saved model exactly) and ``load_pretrained_model`` (LLaVA loads the LLM
    in float16 and computes its rotary tables in float16: the logits of ``from_pretrained(torch_dtype=float16)``)."""
    import llava.model.builder as builder

    kwargs = {"num_anchors": K, **CONNECTOR} if connector == "acformer" else {"num_anchors": K, "num_context": 2}
    model = attach_anchor_former(make_model(tower_dir), connector=connector, **kwargs)
    perturb(model.get_model().mm_projector)
    folder = tmp_path / "llava-tiny"
    saved_with_tokenizer(model, folder)
    ids, pixel_values = prompt(2), images(2)

    loaded = LlavaLlamaForCausalLM.from_pretrained(folder).eval()
    loaded.get_vision_tower().load_model()
    assert loaded.config.anchor_former == model.config.anchor_former
    torch.testing.assert_close(logits(loaded, ids, pixel_values), logits(model, ids, pixel_values), atol=0, rtol=0)

    _, half, _, _ = builder.load_pretrained_model(str(folder), None, "llava-tiny", device="cpu")
    assert half.config.anchor_former == model.config.anchor_former
    reference = LlavaLlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float16).eval()
    reference.get_vision_tower().load_model()
    pixel_values = pixel_values.half()
    torch.testing.assert_close(logits(half, ids, pixel_values), logits(reference, ids, pixel_values), atol=0, rtol=0)


# --- accelerate offload -------------------------------------------------------------------------------------


def test_offloaded_projector_is_refused_at_attach(tower_dir) -> None:
    """An offloaded projector (weights on ``meta``) would make attach build the connector on ``meta``."""
    accelerate = pytest.importorskip("accelerate")
    model = make_model(tower_dir)
    accelerate.cpu_offload(model.get_model().mm_projector, execution_device=torch.device("cpu"))
    config = model.config.to_dict()
    projector = model.get_model().mm_projector
    with pytest.raises(
        ValueError,
        match=r"model\.get_model\(\)\.mm_projector must hold its weights to attach "
        r"\(they are on the 'meta' device",
    ):
        attach_anchor_former(model, num_anchors=K, **CONNECTOR)
    assert model.get_model().mm_projector is projector and model.config.to_dict() == config


def test_offloaded_tower_equals_the_resident_one(tower_dir) -> None:
    """accelerate ``cpu_offload`` of the CLIP model (weights on ``meta``, loaded per forward by hooks)."""
    accelerate = pytest.importorskip("accelerate")
    model = attach_anchor_former(make_model(tower_dir), num_anchors=K, **CONNECTOR)
    ids, pixel_values = prompt(2), images(2)
    expected = logits(model, ids, pixel_values)
    clip = model.get_model().vision_tower.vision_tower
    accelerate.cpu_offload(clip, execution_device=torch.device("cpu"))
    assert next(clip.parameters()).device.type == "meta"
    torch.testing.assert_close(logits(model, ids, pixel_values), expected, atol=1e-6, rtol=1e-6)
