"""``python -m anchor_former.train`` (transformers.Trainer) on a tiny LlavaForConditionalGeneration, CPU.

Covers: stage 1 trains only the connector, stage 2 the connector and the language model, both output
folders reload with ``from_pretrained``; a 4-sample overfitting run (and its failure when no gradient
reaches the connector); ``torchrun --nproc_per_node 2`` on gloo equals a single process with the same
global batch; data errors stop the run before the model loads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("anchor_former.train uses the transformers adapter (transformers >= 5)", allow_module_level=True)
pytest.importorskip("accelerate")  # transformers.Trainer needs it

from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import anchor_former.train as train_module  # noqa: E402
from anchor_former.adapters.hf.llava import AnchorFormerLlavaForConditionalGeneration  # noqa: E402
from anchor_former.train import connector_digest, parse_args, train  # noqa: E402

IMAGE, PATCH, K = 28, 4, 8  # 7 x 7 = 49 patches; the LLM sees K + 1 = 9 image tokens
CONNECTOR = '{"depth": 2, "heads": 2, "dim_head": 8}'
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
WORDS = ["USER", "ASSISTANT", ":", "what", "is", "this", "?", *COLOURS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny Llava model + processor (``base/``), 4 drawn images and a 4-sample LLaVA JSON: a
    coloured square on black, answered by its colour (one token)."""
    root = tmp_path_factory.mktemp("train")
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<image>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=16,
    )
    # initializer_range 0.3: a random LLM with the default 0.02 has logits bounded near +-1 (RMSNorm times
    # tiny lm_head rows), so no input could make it confident; a trained LLM is not like that
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.3,
    )
    model = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=processor.image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=49,
        )
    )
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    (root / "images").mkdir()
    data = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[8:24, 8:24] = rgb
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        data.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat is this ?"},
                    {"from": "gpt", "value": name},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(data))
    return root


def args(workdir, output: str, *extra: str, model: str = "base") -> list[str]:
    return [
        "--model_name_or_path",
        str(workdir / model),
        "--num_anchors",
        str(K),
        "--connector_config",
        CONNECTOR,
        "--data_path",
        str(workdir / "data.json"),
        "--image_folder",
        str(workdir / "images"),
        "--output_dir",
        str(workdir / output),
        "--learning_rate",
        "1e-2",
        "--lr_scheduler_type",
        "constant",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"connector": {}, "vision": {}, "language": {}}
    for key, value in state.items():
        part = "connector" if "multi_modal_projector" in key else "vision" if "vision_tower" in key else "language"
        parts[part][key] = value
    return parts


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    assert before.keys() == after.keys()
    return any(not torch.equal(before[k], after[k]) for k in before)


# --- stages and reload ------------------------------------------------------------------------------------


def test_stage_1_trains_only_the_connector_and_stage_2_the_llm_too(workdir) -> None:
    base = split(LlavaForConditionalGeneration.from_pretrained(workdir / "base").state_dict())
    stage1 = train(
        *parse_args(args(workdir, "stage1", "--stage", "1", "--max_steps", "2", "--per_device_train_batch_size", "4"))
    )
    saved1 = split(load_file(workdir / "stage1" / "model.safetensors"))
    assert not changed(base["vision"], saved1["vision"]) and not changed(base["language"], saved1["language"])
    assert len(saved1["connector"]) > 0 and not (base["connector"].keys() & saved1["connector"].keys())  # new module

    reloaded = AnchorFormerLlavaForConditionalGeneration.from_pretrained(workdir / "stage1")
    trained = stage1.model.state_dict()
    assert reloaded.state_dict().keys() == trained.keys()
    for key, value in reloaded.state_dict().items():  # every weight, the language model's included
        torch.testing.assert_close(value, trained[key], atol=0, rtol=0, msg=key)
    assert connector_digest(reloaded) == connector_digest(stage1.model)
    assert reloaded.config.anchor_former["connector"] == "acformer" and reloaded.config.image_seq_length == K + 1
    processor = LlavaProcessor.from_pretrained(workdir / "stage1")
    image = Image.open(workdir / "images" / "2.png").convert("RGB")
    inputs = processor(text="USER: <image>\nwhat is this ? ASSISTANT :", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == reloaded.config.image_token_id).sum()) == K + 1
    out = reloaded.eval().generate(**inputs, max_new_tokens=2, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 2

    train(
        *parse_args(
            args(
                workdir,
                "stage2",
                "--stage",
                "2",
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "4",
                model="stage1",
            )
        )
    )
    saved2 = split(load_file(workdir / "stage2" / "model.safetensors"))
    assert not changed(saved1["vision"], saved2["vision"])
    assert changed(saved1["language"], saved2["language"]) and changed(saved1["connector"], saved2["connector"])
    assert AnchorFormerLlavaForConditionalGeneration.from_pretrained(workdir / "stage2").config.anchor_former == (
        reloaded.config.anchor_former
    )


# --- overfitting --------------------------------------------------------------------------------------------

OVERFIT_STEPS, OVERFIT_RATIO = 12, 0.1  # measured: 0.8 % of the initial loss after 12 steps (ratio 0.008)


def test_overfits_four_samples(workdir) -> None:
    trainer = train(
        *parse_args(
            args(
                workdir,
                "overfit",
                "--stage",
                "1",
                "--max_steps",
                str(OVERFIT_STEPS),
                "--per_device_train_batch_size",
                "4",
            )
        )
    )
    history = losses(trainer)
    assert len(history) == OVERFIT_STEPS
    assert history[-1] < OVERFIT_RATIO * history[0], history


def test_overfitting_fails_when_no_gradient_reaches_the_connector(workdir, monkeypatch) -> None:
    """The same run with the connector's output cut from the graph (zero gradient, same forward): the
    criterion above must fail, so it measures the connector's training."""
    original = train_module.set_trainable

    def cut(model, model_args):
        model = original(model, model_args)
        train_module._connector(model).register_forward_hook(lambda module, inputs, out: out.detach() + 0.0 * out)
        return model

    monkeypatch.setattr(train_module, "set_trainable", cut)
    trainer = train(
        *parse_args(
            args(
                workdir,
                "overfit_cut",
                "--stage",
                "1",
                "--max_steps",
                str(OVERFIT_STEPS),
                "--per_device_train_batch_size",
                "4",
            )
        )
    )
    history = losses(trainer)
    assert history[-1] > OVERFIT_RATIO * history[0], history
    torch.testing.assert_close(history[-1], history[0], atol=1e-4, rtol=0)  # nothing moved


# --- torchrun ------------------------------------------------------------------------------------------------

# SGD: the update is lr * gradient, so the weights compare the gradients (all-reduced mean of two
# half batches vs one batch). Adam would divide each gradient by its own magnitude and turn
# rounding-level gradients into +-lr steps (measured: one element 1.1e-5 apart after 2 AdamW steps).
DDP_ATOL = 5e-7  # measured max |difference| 6e-8
SGD = ("--optim", "sgd", "--stage", "1", "--max_steps", "2")


def torchrun(workdir, output: str, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "anchor_former.train",
        *args(workdir, output, *extra),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def connector_state(folder) -> dict[str, torch.Tensor]:
    return split(load_file(folder / "model.safetensors"))["connector"]


def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(workdir) -> None:
    stdout = torchrun(workdir, "ddp", *SGD, "--per_device_train_batch_size", "2")
    digests = dict(re.findall(r"\[rank (\d)/2\] connector sha256 ([0-9a-f]{64})", stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], stdout  # both ranks: identical weights

    single = train(*parse_args(args(workdir, "single", *SGD, "--per_device_train_batch_size", "4")))
    ddp, one = connector_state(workdir / "ddp"), connector_state(workdir / "single")
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], atol=DDP_ATOL, rtol=0, msg=key)
    assert digests["0"] == connector_digest(AnchorFormerLlavaForConditionalGeneration.from_pretrained(workdir / "ddp"))

    # the tolerance bites: one process with HALF the global batch (2) ends far outside it
    train(*parse_args(args(workdir, "half", *SGD, "--per_device_train_batch_size", "2")))
    half = connector_state(workdir / "half")
    assert max((half[k] - one[k]).abs().max().item() for k in one) > 100 * DDP_ATOL  # measured 4.3e-4
    del single


# --- errors -----------------------------------------------------------------------------------------------------


def test_a_missing_image_stops_before_the_model_loads(workdir, tmp_path, monkeypatch) -> None:
    data = json.loads((workdir / "data.json").read_text())
    data[3]["image"] = "gone.png"
    (tmp_path / "data.json").write_text(json.dumps(data))

    def never(model_args, plan=None):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(train_module, "load_model", never)
    argv = args(workdir, "never", "--max_steps", "1")
    argv[argv.index("--data_path") + 1] = str(tmp_path / "data.json")
    with pytest.raises(ValueError, match=r"sample 3 of .*data\.json: image file .*gone\.png does not exist"):
        train(*parse_args(argv))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stage", "1", "--lora_r", "8"], r"--lora_r applies to stage 2"),
        (["--connector_config", "[1, 2]"], r"--connector_config must be a JSON object, got '\[1, 2\]'"),
        (["--connector_config", "{depth: 2}"], r"--connector_config must be a JSON object, got '\{depth: 2\}'"),
    ],
)
def test_bad_arguments_raise_value_error(workdir, extra, message) -> None:
    with pytest.raises(ValueError, match=message):
        train(*parse_args(args(workdir, "bad", "--max_steps", "1", *extra)))


def test_lora_stage_2_saves_merged_weights(workdir) -> None:
    """--lora_r: LoRA on the language model's linear layers and the full connector; the saved folder has
    the plain model's keys (merged), so it reloads without peft."""
    pytest.importorskip("peft")
    base = split(LlavaForConditionalGeneration.from_pretrained(workdir / "base").state_dict())
    train(
        *parse_args(
            args(
                workdir,
                "lora",
                "--stage",
                "2",
                "--lora_r",
                "4",
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "4",
            )
        )
    )
    saved = split(load_file(workdir / "lora" / "model.safetensors"))
    assert not changed(base["vision"], saved["vision"])
    linear = re.compile(r".*layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
    assert {k for k in base["language"] if not torch.equal(base["language"][k], saved["language"][k])} == {
        k for k in base["language"] if linear.match(k)
    }  # the adapted linears moved, embeddings and norms did not
    reloaded = AnchorFormerLlavaForConditionalGeneration.from_pretrained(workdir / "lora")
    assert not any("lora" in key for key in reloaded.state_dict())


def test_shipped_distributed_configs() -> None:
    """configs/: DeepSpeed ZeRO-2/3 with the Trainer's "auto" values, FSDP2 wrapping the model's layers."""
    root = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
    for name, stage in (("zero2.json", 2), ("zero3.json", 3)):
        with open(os.path.join(root, name)) as handle:
            config = json.load(handle)
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    with open(os.path.join(root, "fsdp.json")) as handle:
        fsdp = json.load(handle)
    # no class list: accelerate wraps each model's own _no_split_modules (Llama/Qwen2/Mistral decoder layers,
    # CLIP/SigLIP encoder layers), so one file serves every family
    assert fsdp["version"] == 2 and fsdp["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "transformer_layer_cls_to_wrap" not in fsdp
