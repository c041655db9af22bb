"""The host contract on the llava-torch families (LLaVA-1.5 and anyres ``flat`` / ``spatial`` /
``spatial_unpad``; runs only in ``.venv-llava``). Every check runs on every entry of
``contract/families_llava_torch.py``: a family added there gets all of them.

Checks: full-budget identity (fp32, bf16 and fp16 against the stock model in the same dtype); the LLM's
image token counts; the re-attach rule; 4 threads x 3 calls equal to sequential calls; ``torch.compile``;
save -> reload through LLaVA's own ``from_pretrained`` / ``load_pretrained_model`` (after
``register_with_llava``) and by hand (plain llava-torch), logits equal and settings kept; LoRA on the
tower's q/k (PEFT) equal to its merged weights; bad input refused with the model unchanged.
"""

from __future__ import annotations

import copy
import importlib.util
import threading

import pytest
import torch

llava = pytest.importorskip("llava")

from contract.families_llava_torch import FAMILIES, LlavaTorchFamily  # noqa: E402
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # noqa: E402
from _llava_torch import save_tiny_tower  # noqa: E402

from anchor_former.adapters.llava import attach_anchor_former, load_projector_weights  # noqa: E402
from anchor_former.adapters.llava.registration import register_with_llava, unregister_from_llava  # noqa: E402

FAMILY = pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
# full-budget identity is exact: the probe reads the same layer output LLaVA's tower returns and the select
# connector keeps every token in the stock order, so the switched model computes the stock model's numbers
# (measured max |difference| 0 in fp32, bf16 and fp16 for every family, CPU)


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return save_tiny_tower(tmp_path_factory.mktemp("clip_tower"))


@pytest.fixture
def registered():
    register_with_llava()
    yield
    unregister_from_llava()


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    images = inputs["images"]
    images = [x.to(dtype) for x in images] if isinstance(images, list) else images.to(dtype)
    return {**inputs, "images": images}


def perturb(module: torch.nn.Module, seed: int = 7) -> None:
    """Values no initialisation would give ("trained" weights), so a reload that re-initialises shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def snapshot(model) -> tuple:
    inner = model.get_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return type(model), inner.vision_tower, inner.mm_projector, model.config.to_dict(), state


def assert_unchanged(model, before: tuple) -> None:
    cls, tower, projector, config, state = before
    inner = model.get_model()
    assert (type(model), inner.vision_tower, inner.mm_projector) == (cls, tower, projector)
    assert model.config.to_dict() == config
    now = model.state_dict()
    assert sorted(now) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, atol=0, rtol=0, msg=key)


# --- full-budget identity -----------------------------------------------------------------------------------


@FAMILY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_full_budget_equals_the_stock_model(tower_dir, family: LlavaTorchFamily, dtype) -> None:
    stock = family.stock(tower_dir).to(dtype)
    model = attach_anchor_former(copy.deepcopy(stock), **family.full_budget)
    inputs = cast(family.inputs(stock), dtype)
    want = run(stock, inputs)
    torch.testing.assert_close(run(model, inputs), want, atol=0, rtol=0)
    assert want.shape[1] == inputs["input_ids"].shape[1] - 1 + max(family.image_tokens(model, inputs))


def test_full_budget_identity_bites(tower_dir) -> None:
    """The check tells a changed image apart: one view's pixels changed moves the stock logits."""
    family = FAMILIES[-1]
    stock = family.stock(tower_dir)
    inputs = family.inputs(stock)
    changed = [x.clone() for x in inputs["images"]]
    changed[0][1] += 0.05
    assert (run(stock, {**inputs, "images": changed}) - run(stock, inputs)).abs().max() > 1e-4


# --- token counts -------------------------------------------------------------------------------------------


@FAMILY
@pytest.mark.parametrize("budget", ["reduced", "trained"])
def test_each_image_gets_its_token_count(tower_dir, family: LlavaTorchFamily, budget) -> None:
    model = attach_anchor_former(family.stock(tower_dir), **getattr(family, budget))
    inputs = family.inputs(model)
    counts = family.image_tokens(model, inputs)
    text = inputs["input_ids"].shape[1] - 1
    assert run(model, inputs).shape[1] == text + max(counts)
    for i, count in enumerate(counts):  # each image alone: its own length
        alone = {k: v[i : i + 1] for k, v in inputs.items()}
        assert run(model, alone).shape[1] == text + count


# --- the re-attach rule -------------------------------------------------------------------------------------


@FAMILY
def test_reattach_carries_trained_weights_over_or_refuses(tower_dir, family: LlavaTorchFamily) -> None:
    model = attach_anchor_former(family.stock(tower_dir), **family.trained)
    perturb(model.get_model().mm_projector)
    trained = {k: v.clone() for k, v in model.get_model().mm_projector.state_dict().items()}
    inputs = family.inputs(model)
    k = family.trained["num_anchors"]
    attach_anchor_former(model, num_anchors=k - 1)  # depth, heads, ...: the recorded ones
    assert model.config.anchor_former["num_anchors"] == k - 1
    assert model.config.anchor_former["connector_config"]["depth"] == family.trained["depth"]
    state = model.get_model().mm_projector.state_dict()
    assert sorted(state) == sorted(trained)
    for key, value in trained.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)
    assert run(model, inputs).shape[1] == inputs["input_ids"].shape[1] - 1 + max(family.image_tokens(model, inputs))
    for kwargs, match in [
        ({"connector": "perceiver", "num_queries": 6},
         r"connector must stay 'acformer' when re-attaching \(the model is already attached: connector='acformer'"),
        ({"depth": family.trained["depth"] + 1},
         r"architecture must stay the same \(attached now: connector='acformer'.*missing keys"),
    ]:
        before = snapshot(model)
        with pytest.raises(ValueError, match=match):
            attach_anchor_former(model, **kwargs)
        assert_unchanged(model, before)


# --- threads and compile ------------------------------------------------------------------------------------


@FAMILY
def test_threads_equal_sequential_calls(tower_dir, family: LlavaTorchFamily) -> None:
    """4 threads x 3 calls on different images at once: each equals its sequential result."""
    model = attach_anchor_former(family.stock(tower_dir), **family.reduced)
    requests = [family.inputs(model, seed=10 + i) for i in range(12)]
    expected = [run(model, r) for r in requests]
    for i in range(1, len(requests)):  # another request's anchors would show
        assert not torch.allclose(expected[i], expected[0], atol=1e-3)
    results: list = [None] * len(requests)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(first: int) -> None:
        try:
            start.wait()
            for i in range(first, len(requests), 4):
                results[i] = run(model, requests[i])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, got in enumerate(results):
        torch.testing.assert_close(got, expected[i], atol=0, rtol=0, msg=f"request {i}")


@pytest.mark.slow
@FAMILY
def test_compiled_model_matches_eager(tower_dir, family: LlavaTorchFamily) -> None:
    """``torch.compile(model)``: the probed vision step runs eagerly, the rest compiled (aot_eager)."""
    model = attach_anchor_former(family.stock(tower_dir), **family.reduced)
    inputs = family.inputs(model)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(run(compiled, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


# --- save -> reload -----------------------------------------------------------------------------------------


def saved(family: LlavaTorchFamily, tower_dir: str, folder) -> torch.nn.Module:
    """A trained (perturbed) AcFormer model saved to ``folder`` with a tokenizer, as LLaVA's trainer leaves it."""
    from transformers import BertTokenizer

    model = attach_anchor_former(family.stock(tower_dir), **family.trained)
    perturb(model.get_model().mm_projector)
    model.config.mm_use_im_patch_token = False  # load_pretrained_model would add a token otherwise
    model.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]))
    BertTokenizer(str(vocab)).save_pretrained(folder)
    return model


@FAMILY
def test_from_pretrained_reloads_settings_and_logits(tower_dir, tmp_path, registered, family) -> None:
    model = saved(family, tower_dir, tmp_path)
    loaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path).eval()
    loaded.get_vision_tower().load_model()
    assert loaded.config.anchor_former == model.config.anchor_former
    inputs = family.inputs(model)
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), atol=0, rtol=0)


@FAMILY
def test_load_pretrained_model_reloads_settings_and_logits(tower_dir, tmp_path, registered, family) -> None:
    """LLaVA's ``load_pretrained_model`` loads the LLM in float16 (its rotary tables are then computed in
    float16, so the logits are those of ``from_pretrained(torch_dtype=float16)``, checked here; the float32
    reload equals the saved model exactly, above)."""
    import llava.model.builder as builder

    folder = tmp_path / "llava-tiny"
    model = saved(family, tower_dir, folder)
    _, loaded, _, _ = builder.load_pretrained_model(str(folder), None, "llava-tiny", device="cpu")
    assert loaded.config.anchor_former == model.config.anchor_former
    reference = LlavaLlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float16).eval()
    reference.get_vision_tower().load_model()
    assert loaded.get_model().vision_tower.dtype == reference.get_model().vision_tower.dtype
    inputs = cast(family.inputs(model), torch.float16)
    torch.testing.assert_close(run(loaded, inputs), run(reference, inputs), atol=0, rtol=0)


@FAMILY
def test_by_hand_reload_reloads_settings_and_logits(tower_dir, tmp_path, family) -> None:
    """Plain llava-torch (no registration): load with the stock projector type, attach, load the weights."""
    model = saved(family, tower_dir, tmp_path)
    loaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path, mm_projector_type="mlp2x_gelu").eval()
    loaded.get_vision_tower().load_model()
    attach_anchor_former(loaded)  # the recorded settings
    load_projector_weights(loaded, tmp_path / "model.safetensors")
    assert loaded.config.anchor_former == model.config.anchor_former
    inputs = family.inputs(model)
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), atol=0, rtol=0)


# --- LoRA on the tower's q/k --------------------------------------------------------------------------------


# Until the probes read q and k from the projections' outputs (forward hooks), they read the weight tensors
# and miss the adapters (logits off by 0.42 on llava_torch); the probe package of that change has no base.py.
PROBE_READS_WEIGHTS = importlib.util.find_spec("anchor_former.probes.base") is not None


@pytest.mark.xfail(PROBE_READS_WEIGHTS, reason="the probe reads q/k weight tensors, not the LoRA-wrapped projections",
                   strict=True)
@FAMILY
def test_lora_on_tower_qk_equals_its_merged_weights(tower_dir, family: LlavaTorchFamily) -> None:
    """PEFT LoRA on the CLIP tower's q_proj / k_proj changes the anchors exactly as merging it into the
    weights does (the probe sees the projections as they run, adapters included)."""
    peft = pytest.importorskip("peft", reason="LoRA needs peft (0.11.1 fits transformers 4.37.2)")
    model = attach_anchor_former(family.stock(tower_dir), **family.reduced)
    inputs = family.inputs(model)
    config = peft.LoraConfig(r=4, target_modules=r".*vision_tower\.vision_tower\..*\.(q_proj|k_proj)",
                             init_lora_weights=False)
    torch.manual_seed(5)
    wrapped = peft.get_peft_model(model, config)
    lora = run(wrapped, inputs)
    with wrapped.disable_adapter():
        plain = run(wrapped, inputs)
    assert (lora - plain).abs().max() > 1e-3  # the adapters matter
    merged = wrapped.merge_and_unload()
    torch.testing.assert_close(lora, run(merged, inputs), atol=1e-4, rtol=0)


# --- bad input ----------------------------------------------------------------------------------------------

COMMON_BAD = (
    ({"num_anchors": 4, "depht": 2}, r"keyword arguments must be arguments of the 'acformer' connector.*'depht'"),
    ({"num_anchors": 4, "score": "bogus"}, "score must be one of .*got 'bogus'"),
    ({"num_anchors": 0}, r"num_anchors must be an integer >= 1, got 0"),
)


@FAMILY
def test_bad_input_is_refused_and_changes_nothing(tower_dir, family: LlavaTorchFamily) -> None:
    model = family.stock(tower_dir)
    inputs = family.inputs(model)
    want = run(model, inputs)
    for kwargs, match in family.bad + COMMON_BAD:
        before = snapshot(model)
        with pytest.raises(ValueError, match=match):
            attach_anchor_former(model, **kwargs)
        assert_unchanged(model, before)
    torch.testing.assert_close(run(model, inputs), want, atol=0, rtol=0)
