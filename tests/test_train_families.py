"""``python -m anchor_former.train`` on the anyres families (LLaVA-NeXT, LLaVA-OneVision), tiny models, CPU.

Stage 1 -> stage 2 (full on NeXT, LoRA on OneVision) -> reload through the documented classes -> generate,
per family; the per-view token
layout of the attached model reaches the data (each image gets the count the attached processor writes);
``torchrun --nproc_per_node 2`` on LLaVA-NeXT equals one process with the same global batch.
"""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("anchor_former.train uses the transformers adapter (transformers >= 5)", allow_module_level=True)
pytest.importorskip("accelerate")  # transformers.Trainer needs it

from PIL import Image  # noqa: E402

from anchor_former.train import connector_digest, parse_args, train  # noqa: E402
from tests._train_helpers import (  # noqa: E402
    K,
    connector_state,
    run_args,
    save_data,
    save_family,
    torchrun,
)

FAMILIES = {
    # family: (builder name, reload classes, tokens per view, prompt, stage-2 flags)
    "llava_next": (
        "llava_next",
        "AnchorFormerLlavaNext",
        K + 1,
        "USER: <image> what is in the picture ? ASSISTANT:",
        (),
    ),
    "onevision": (
        "onevision",
        "AnchorFormerLlavaOnevision",
        K,
        "user <image> what is in the picture ? assistant",
        ("--lora_r", "4"),
    ),  # LoRA on the Qwen2 language model, merged before saving
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        save_family(root, family)
    save_data(root)
    return root


def reload(family: str, folder):
    if family == "llava_next":
        from anchor_former.adapters.hf import llava_next as module
    else:
        from anchor_former.adapters.hf import llava_onevision as module
    prefix = FAMILIES[family][1]
    model = getattr(module, f"{prefix}ForConditionalGeneration").from_pretrained(folder)
    processor = getattr(module, f"{prefix}Processor").from_pretrained(folder)
    return model.eval(), processor


def split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"connector": {}, "vision": {}, "language": {}}
    for key, value in state.items():
        part = (
            "connector"
            if "multi_modal_projector" in key or "image_newline" in key
            else "vision"
            if "vision_tower" in key
            else "language"
        )
        parts[part][key] = value
    return parts


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    assert before.keys() == after.keys()
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stage_1_then_stage_2_then_reload_and_generate(root, family) -> None:
    builder, _, per_view, prompt, stage2 = FAMILIES[family]
    data = root / "data.json"
    stock = transformers.AutoModelForImageTextToText.from_pretrained(root / builder).state_dict()
    base = split({k: v for k, v in stock.items() if "multi_modal_projector" not in k})

    stage1 = train(
        *parse_args(
            run_args(
                root / builder,
                data,
                root / f"{family}_s1",
                "--stage",
                "1",
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "2",
            )
        )
    )
    model1, processor = reload(family, root / f"{family}_s1")
    saved1 = split(model1.state_dict())
    # stage 1: the tower and the language model are the stock weights, bit for bit; the connector is new
    assert not changed(base["vision"], saved1["vision"]) and not changed(base["language"], saved1["language"])
    assert connector_digest(model1) == connector_digest(stage1.model)
    settings = model1.config.anchor_former
    assert settings["connector"] == "acformer" and settings["extras"]["anyres"] == {
        "layout": "fixed",
        "tokens_per_view": per_view,
    }

    # the data used the attached layout: a 40 x 70 image's tokens as the processor writes them
    sample = stage1.train_dataset[0]
    written = processor(
        text=processor.image_token, images=Image.open(root / "images" / "0.png").convert("RGB"), return_tensors="pt"
    )["input_ids"]
    count = int((sample["input_ids"] == model1.config.image_token_id).sum())
    assert count == int((written == model1.config.image_token_id).sum())
    views = sample["pixel_values"].shape[0]
    assert views > 1 and count >= views * per_view  # several views, K (+1) tokens each, plus row newlines

    train(
        *parse_args(
            run_args(
                root / f"{family}_s1",
                data,
                root / f"{family}_s2",
                "--stage",
                "2",
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "2",
                *stage2,
            )
        )
    )
    model2, processor2 = reload(family, root / f"{family}_s2")
    saved2 = split(model2.state_dict())
    assert not changed(saved1["vision"], saved2["vision"])
    assert changed(saved1["language"], saved2["language"]) and changed(saved1["connector"], saved2["connector"])
    assert model2.config.anchor_former == settings
    assert not any("lora" in key or "modules_to_save" in key for key in model2.state_dict())  # plain, merged

    image = Image.open(root / "images" / "2.png").convert("RGB")  # 30 x 90: a 1 x 3 crop grid
    inputs = processor2(text=prompt, images=image, return_tensors="pt")
    out = model2.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 2


# --- torchrun ------------------------------------------------------------------------------------------------

# SGD: the weights compare the gradients (the all-reduced mean of two 1-sample batches vs one 2-sample batch)
DDP_ATOL = 5e-7
SGD = ("--optim", "sgd", "--stage", "1", "--max_steps", "2")


def test_torchrun_two_processes_on_llava_next_equal_one_process(root) -> None:
    data = root / "data.json"
    stdout = torchrun(
        run_args(root / "llava_next", data, root / "next_ddp", *SGD, "--per_device_train_batch_size", "1")
    )
    digests = dict(re.findall(r"\[rank (\d)/2\] connector sha256 ([0-9a-f]{64})", stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout

    train(
        *parse_args(run_args(root / "llava_next", data, root / "next_one", *SGD, "--per_device_train_batch_size", "2"))
    )
    ddp, one = connector_state(root / "next_ddp"), connector_state(root / "next_one")
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], atol=DDP_ATOL, rtol=0, msg=key)
    # the tolerance bites: one process with half the global batch ends outside it
    train(
        *parse_args(run_args(root / "llava_next", data, root / "next_half", *SGD, "--per_device_train_batch_size", "1"))
    )
    half = connector_state(root / "next_half")
    assert max((half[k] - one[k]).abs().max().item() for k in one) > 100 * DDP_ATOL
