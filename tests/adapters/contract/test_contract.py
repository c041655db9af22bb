"""The host contract: every family (``FAMILIES``, see ``conftest.py``) on tiny real models.

Rows: full-budget identity (fp32 exact, bf16 against the stock model in bf16); processor token counts; the
re-attach rule; a failed attach changes nothing; threads; ``torch.compile(model)``; save -> reload from a
hub-layout base; Auto classes, ``AutoProcessor`` and ``pipeline(model=folder)``; a LoRA-wrapped and an
8-bit tower; accelerate offload of tower and projector; ``mm_encoder_outputs``.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from family import Family
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def needs(family: Family, row: str, request: pytest.FixtureRequest | None = None) -> None:
    """Skip unless ``family`` takes part in ``row``; a row the family lists as failing today runs as a strict
    xfail (``request`` given)."""
    if row not in family.supports:
        pytest.skip(family.skip.get(row, f"{family.name} does not take part in the {row!r} row"))
    if request is not None and row in family.xfail:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=family.xfail[row]))


def logits(family: Family, model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return family.logits(model, inputs) if family.logits else model(**inputs).logits


def stock_and_attached(family: Family, kwargs: dict):
    processor = family.make_processor()
    stock = family.make_model(processor)
    attached = family.attach(copy.deepcopy(stock), processor, **kwargs)
    return stock, attached, processor


def perturb(module: nn.Module, seed: int = 7) -> None:
    """Give every parameter a value no initialisation would ("trained" weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def snapshot(model: nn.Module, processor) -> tuple:
    """Everything a failed attach must leave as it was, compared bit for bit."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proc = (
        type(processor),
        {k: copy.deepcopy(v) for k, v in vars(processor).items() if k != "tokenizer"}
        if processor is not None
        else None,
    )
    inner = getattr(model, "model", None)
    return type(model), type(inner), _config_text(model.config), state, proc


def _config_text(config) -> str:
    to_json = getattr(config, "to_json_string", None)
    return to_json() if to_json is not None else repr(sorted(vars(config).items()))


def assert_unchanged(model: nn.Module, processor, before: tuple) -> None:
    cls, inner, config, state, processor_state = before
    assert type(model) is cls and type(getattr(model, "model", None)) is inner
    assert _config_text(model.config) == config
    now = model.state_dict()
    assert sorted(now) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, atol=0, rtol=0, msg=key)
    if processor_state is None:
        return
    proc_cls, proc = processor_state
    assert type(processor) is proc_cls
    assert {k for k in processor.__dict__ if k != "tokenizer"} == set(proc)
    for key, value in proc.items():
        assert repr(processor.__dict__[key]) == repr(value), key


# --- identity and counts -----------------------------------------------------------------------------


def test_full_budget_equals_the_stock_model(family: Family) -> None:
    needs(family, "identity")
    stock, attached, processor = stock_and_attached(family, family.full)
    inputs = family.inputs(processor, 0)
    torch.testing.assert_close(logits(family, attached, inputs), logits(family, stock, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_budget_equals_the_stock_model_in_half_precision(family: Family, dtype) -> None:
    needs(family, "bf16")
    processor = family.make_processor()
    stock = family.make_model(processor).to(dtype)
    attached = family.attach(copy.deepcopy(stock), processor, **family.full)
    inputs = family.inputs(processor, 0)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    torch.testing.assert_close(logits(family, attached, inputs), logits(family, stock, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("budget", ["full", "reduced"])
def test_processor_counts_equal_the_model_tokens(family: Family, budget) -> None:
    needs(family, "counts")
    _, attached, processor = stock_and_attached(family, getattr(family, budget))
    expected, got = family.tokens(attached, family.inputs(processor, 1))
    assert expected == got


# --- the re-attach rule and failed attaches ---------------------------------------------------------------


def test_reattach_keeps_the_trained_connector(family: Family) -> None:
    needs(family, "reattach")
    _, model, processor = stock_and_attached(family, family.reduced)
    projector = family.projector(model) if family.projector else None
    if projector is not None:
        perturb(projector)
    trained = {k: v.clone() for k, v in (projector.state_dict() if projector is not None else {}).items()}
    assert family.attach(model, processor, **family.reattach) is model
    assert isinstance(model, family.attached_class)
    for key, value in model.config.anchor_former["connector_config"].items():
        if key in family.reattach:
            assert value == family.reattach[key]
    if projector is not None:
        now = family.projector(model).state_dict()
        assert sorted(now) == sorted(trained)
        for key, value in trained.items():
            torch.testing.assert_close(now[key], value, atol=0, rtol=0, msg=key)
    expected, got = family.tokens(model, family.inputs(processor, 0))
    assert expected == got


def test_reattach_that_would_discard_the_connector_is_refused(family: Family) -> None:
    needs(family, "reattach")
    _, model, processor = stock_and_attached(family, family.reduced)
    if family.projector is not None:
        perturb(family.projector(model))
    before = snapshot(model, processor)
    kwargs, match = family.reattach_bad
    with pytest.raises(ValueError, match=match):
        family.attach(model, processor, **kwargs)
    assert_unchanged(model, processor, before)


def test_failed_attach_changes_nothing(family: Family) -> None:
    processor = family.make_processor()
    model = family.make_model(processor)
    before = snapshot(model, processor)
    kwargs, match = family.bad
    with pytest.raises(ValueError, match=match):
        family.attach(model, processor, **kwargs)
    assert_unchanged(model, processor, before)


def test_failure_while_switching_the_processor_is_rolled_back(family: Family, monkeypatch) -> None:
    """The pipeline restores the processor (class and attributes) and the model when a late step raises."""
    from anchor_former.adapters._host import Host

    processor = family.make_processor()
    model = family.make_model(processor)
    before = snapshot(model, processor)

    def broken_install(self, *args, **kwargs):
        raise ValueError("install failed on purpose")

    host = type(family.host)
    assert issubclass(host, Host)
    monkeypatch.setattr(host, "install", broken_install)
    with pytest.raises(ValueError, match="install failed on purpose"):
        family.attach(model, processor, **family.reduced)
    monkeypatch.undo()
    assert_unchanged(model, processor, before)


# --- threads and compile --------------------------------------------------------------------------------


def test_threads_equal_sequential_calls(family: Family) -> None:
    """4 threads x 3 requests at once: each result equals its sequential run (no request sees another's
    anchors or scores, no hook error)."""
    needs(family, "threads")
    _, model, processor = stock_and_attached(family, family.reduced)
    requests = [family.inputs(processor, seed) for seed in range(12)]
    expected = [logits(family, model, inputs) for inputs in requests]
    assert not torch.allclose(expected[0], expected[1], atol=1e-4)  # the requests differ visibly
    results: list = [None] * len(requests)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(first: int) -> None:
        try:
            start.wait()
            for i in range(first, len(requests), 4):
                results[i] = logits(family, model, requests[i])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, result in enumerate(results):
        torch.testing.assert_close(result, expected[i], atol=0, rtol=0, msg=f"request {i}")


def test_compiled_model_equals_eager(family: Family) -> None:
    """``torch.compile(model)`` (aot_eager: dynamo + AOTAutograd, without inductor's C++ build time)."""
    needs(family, "compile")
    _, model, processor = stock_and_attached(family, family.reduced)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    for seed in (0, 1):
        inputs = family.inputs(processor, seed)
        torch.testing.assert_close(
            logits(family, compiled, inputs), logits(family, model, inputs), atol=1e-5, rtol=1e-5
        )
    torch._dynamo.reset()


# --- save and reload --------------------------------------------------------------------------------------


@pytest.fixture
def saved(family: Family, tmp_path):
    """A stock model saved and loaded back (transformers then writes the hub checkpoints' key layout again),
    attached, given trained connector weights, and saved with its processor."""
    processor = family.make_processor()
    stock_dir, folder = tmp_path / "stock", tmp_path / "attached"
    family.make_model(processor).save_pretrained(stock_dir)
    processor.save_pretrained(stock_dir)
    model = family.stock_class.from_pretrained(stock_dir).eval()
    family.attach(model, processor, **family.reduced)
    if family.projector is not None:
        perturb(family.projector(model))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def assert_same_model(loaded: nn.Module, model: nn.Module, family: Family, inputs: dict) -> None:
    """Every tensor equal (the language model and lm_head included), the same settings and logits."""
    assert type(loaded) is family.attached_class
    assert loaded.config.anchor_former == model.config.anchor_former
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
    torch.testing.assert_close(logits(family, loaded, inputs), logits(family, model, inputs), atol=0, rtol=0)


def test_save_and_reload_from_a_hub_layout_base(family: Family, saved) -> None:
    needs(family, "save")
    model, processor, folder = saved
    reloaded_processor = family.reload_processor(folder)
    inputs = family.inputs(reloaded_processor, 0)
    torch.testing.assert_close(inputs["input_ids"], family.inputs(processor, 0)["input_ids"], atol=0, rtol=0)
    assert_same_model(family.reload(folder), model, family, inputs)


def test_auto_classes_and_auto_processor_reload(family: Family, saved) -> None:
    needs(family, "auto")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from anchor_former.adapters.transformers import register_auto_classes

    model, processor, folder = saved
    register_auto_classes()
    inputs = family.inputs(processor, 0)
    assert_same_model(AutoModelForImageTextToText.from_pretrained(folder).eval(), model, family, inputs)
    if "auto_processor" in family.supports:
        auto = AutoProcessor.from_pretrained(folder)
        torch.testing.assert_close(family.inputs(auto, 0)["input_ids"], inputs["input_ids"], atol=0, rtol=0)


def test_pipeline_from_the_folder(family: Family, saved) -> None:
    """``pipeline("image-text-to-text", model=folder)`` loads the attached model and its processor and runs."""
    needs(family, "pipeline")
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    from anchor_former.adapters.transformers import register_auto_classes

    _, _, folder = saved
    register_auto_classes()
    pipe = pipeline("image-text-to-text", model=str(folder))
    assert type(pipe.model) is family.attached_class
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    out = pipe(images=image, text=family.prompt, max_new_tokens=2)
    assert isinstance(out, list) and out and "generated_text" in out[0]


# --- wrapped towers: LoRA, 8-bit, offload ---------------------------------------------------------------


def test_lora_on_the_tower_queries_and_keys(family: Family, request) -> None:
    """PEFT LoRA on the tower's q/k projections: the attached model equals the same model after
    ``merge_and_unload`` (anchors come from what the wrapped projections compute)."""
    needs(family, "lora", request)
    peft = pytest.importorskip("peft", reason="LoRA needs peft")
    _, model, processor = stock_and_attached(family, family.reduced)
    inputs = family.inputs(processor, 0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=family.q_k_modules[0], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        lora = wrapped(**inputs).logits
    merged = wrapped.merge_and_unload()
    torch.testing.assert_close(lora, logits(family, merged, inputs), atol=1e-5, rtol=1e-5)


def test_offloaded_tower_equals_the_resident_one(family: Family, request) -> None:
    """accelerate ``cpu_offload`` of the vision tower (weights on ``meta``, loaded per forward by hooks)."""
    needs(family, "offload", request)
    accelerate = pytest.importorskip("accelerate", reason="offload needs accelerate")
    _, model, processor = stock_and_attached(family, family.reduced)
    inputs = family.inputs(processor, 0)
    expected = logits(family, model, inputs)
    accelerate.cpu_offload(family.tower(model), execution_device=torch.device("cpu"))
    assert next(family.tower(model).parameters()).device.type == "meta"
    torch.testing.assert_close(logits(family, model, inputs), expected, atol=1e-6, rtol=1e-6)


def test_offloaded_projector_is_refused_at_attach(family: Family) -> None:
    """An offloaded projector (weights on ``meta``) would make attach build the connector on ``meta``: refused."""
    needs(family, "offload")
    if family.projector is None:
        pytest.skip(family.skip.get("offload_projector", "no projector"))
    accelerate = pytest.importorskip("accelerate", reason="offload needs accelerate")
    processor = family.make_processor()
    model = family.make_model(processor)
    accelerate.cpu_offload(family.projector(model), execution_device=torch.device("cpu"))
    before = snapshot(model, processor)
    with pytest.raises(
        ValueError,
        match=r"multi_modal_projector must hold its weights to attach \(they are on the "
        r"'meta' device",
    ):
        family.attach(model, processor, **family.reduced)
    assert_unchanged(model, processor, before)


def test_8bit_tower(family: Family, request) -> None:
    """The tower's linears in bitsandbytes 8-bit: the full-budget model equals the stock model with the same
    8-bit tower; a reduced model's image tokens equal those with anchors from the 8-bit tower's own eager
    attention (where the family has that reference)."""
    needs(family, "bnb", request)
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    processor = family.make_processor()
    stock = family.make_model(processor)
    try:
        _quantize_8bit(family.tower(stock), bnb)
        inputs = family.inputs(processor, 0)
        expected = logits(family, stock, inputs)
    except Exception as error:  # no 8-bit kernel for this device / build
        pytest.skip(f"bitsandbytes cannot run 8-bit linears here: {type(error).__name__}: {error}")
    attached = family.attach(copy.deepcopy(stock), processor, **family.full)
    torch.testing.assert_close(logits(family, attached, inputs), expected, atol=0, rtol=0)
    reduced_processor = family.make_processor()
    reduced = family.attach(copy.deepcopy(stock), reduced_processor, **family.reduced)
    inputs = family.inputs(reduced_processor, 0)
    if family.eager_tokens is not None:
        with torch.no_grad():
            got = torch.stack(list(reduced(**inputs).image_outputs.pooler_output))
        torch.testing.assert_close(got, family.eager_tokens(reduced, inputs), atol=1e-5, rtol=1e-5)
    else:
        logits(family, reduced, inputs)  # runs


def _quantize_8bit(tower: nn.Module, bnb) -> None:
    """Every ``nn.Linear`` of ``tower`` replaced by ``bnb.nn.Linear8bitLt`` holding the same weights (int8)."""
    for module in list(tower.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False
                )
                q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(module, child_name, q.to("cpu"))


# --- precomputed features -------------------------------------------------------------------------------


def test_mm_encoder_outputs_keep_the_true_positions(family: Family) -> None:
    needs(family, "mm_encoder_outputs")
    if not family.name.startswith("qwen"):
        pytest.skip("mm_encoder_outputs: Qwen-VL's transformers 5 argument")
    stock, model, processor = stock_and_attached(family, family.reduced)
    inputs = family.inputs(processor, 0)
    text = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    got = logits(family, model, {**text, "mm_encoder_outputs": {"image": features}})
    torch.testing.assert_close(got, logits(family, model, inputs), atol=0, rtol=0)
    with torch.no_grad():
        foreign = stock.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    with pytest.raises(
        ValueError, match=r"mm_encoder_outputs\['image'\] must come from this model's get_image_features"
    ):
        logits(family, model, {**text, "mm_encoder_outputs": {"image": foreign}})
