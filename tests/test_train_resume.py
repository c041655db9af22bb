"""``--resume_from_checkpoint`` continues exactly: 2 steps + 2 resumed steps equal 4 uninterrupted steps
(connector weights bit for bit, optimizer step, loss history), on a tiny LLaVA-1.5 whose default save
layout renames keys (the case that used to restart from the initial weights)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("anchor_former.train uses the transformers adapter (transformers >= 5)", allow_module_level=True)
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from anchor_former.train import connector_digest, parse_args, train  # noqa: E402
from tests._train_helpers import run_args, save_data, save_family, weights  # noqa: E402

STEPS = (
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "2",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--learning_rate",
    "1e-3",
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_family(root, "llava")
    save_data(root, sizes=((28, 28), (30, 40), (40, 30), (28, 28)), prompt="what is in the picture ?")
    return root


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("mode", ["stage1", "lora"])
def test_resumed_run_equals_uninterrupted_run(root, mode) -> None:
    """Stage 1 (full weights in the checkpoint) and LoRA stage 2 (peft's adapter files, the connector as a
    modules_to_save copy): 2 + 2 resumed steps end where 4 uninterrupted steps end, bit for bit."""
    if mode == "lora":
        pytest.importorskip("peft")
    steps = (*STEPS, "--stage", "2", "--lora_r", "4") if mode == "lora" else STEPS
    data = root / "data.json"
    full = train(*parse_args(run_args(root / "llava", data, root / f"{mode}_full", *steps)))
    checkpoint = root / f"{mode}_full" / "checkpoint-2"
    if mode == "stage1":  # the running model's keys: a raw load_state_dict (the Trainer's resume) reads them all
        assert set(load_file(checkpoint / "model.safetensors")) == set(full.model.state_dict())
    else:  # peft's checkpoint holds the LoRA weights and the connector copy
        assert any("multi_modal_projector" in k for k in load_file(checkpoint / "adapter_model.safetensors"))

    resumed = train(
        *parse_args(
            run_args(
                root / "llava", data, root / f"{mode}_resumed", *steps, "--resume_from_checkpoint", str(checkpoint)
            )
        )
    )
    assert resumed.state.global_step == full.state.global_step == 4
    assert losses(resumed)[-2:] == losses(full)[-2:]  # steps 3 and 4, logged by the resumed run
    one, two = weights(root / f"{mode}_full"), weights(root / f"{mode}_resumed")  # every weight, LLM included
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=0, rtol=0, msg=key)
    assert connector_digest(resumed.model) == connector_digest(full.model)
    state = json.loads((root / f"{mode}_resumed" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_from_a_checkpoint_that_lacks_trained_weights_raises(root) -> None:
    """The same checkpoint re-saved in transformers' default (renamed) key layout is what the Trainer's raw
    ``load_state_dict(strict=False)`` could not read: every renamed weight was skipped with a warning and the
    run went on from the initial weights. Now it stops, naming the missing weights."""
    from anchor_former.adapters.hf.llava import AnchorFormerLlavaForConditionalGeneration

    checkpoint = root / "renamed"
    shutil.copytree(root / "stage1_full" / "checkpoint-2", checkpoint)
    loaded = AnchorFormerLlavaForConditionalGeneration.from_pretrained(checkpoint)
    fresh = AnchorFormerLlavaForConditionalGeneration(loaded.config)  # built, not loaded: the default layout
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(checkpoint)
    on_disk = set(load_file(checkpoint / "model.safetensors"))
    assert on_disk != set(loaded.state_dict()) and any(k.startswith("multi_modal_projector.") for k in on_disk)
    with pytest.raises(
        ValueError,
        match=r"--resume_from_checkpoint .*renamed.* must hold every weight this run "
        r"trains, got \d+ missing \(e\.g\. \['model\.multi_modal_projector",
    ):
        train(
            *parse_args(
                run_args(
                    root / "llava",
                    root / "data.json",
                    root / "resumed_renamed",
                    *STEPS,
                    "--resume_from_checkpoint",
                    str(checkpoint),
                )
            )
        )
