"""LLaVA's own train.py and load_pretrained_model with this package's connectors (``.venv-llava`` only).

End to end on CPU: a tiny Llama (SentencePiece tokenizer trained here, as LLaVA's slow LlamaTokenizer
needs one) and a tiny CLIP tower saved to a temp dir, four drawn images, 2 steps per stage through
``python -m anchor_former.adapters.llava.train``'s ``main``; stage 1 writes ``mm_projector.bin``, stage 2
loads it with ``--pretrain_mm_mlp_adapter`` and saves a model folder, which
``llava.model.builder.load_pretrained_model`` reloads and generates with. The training-free ``select``
connector reloads a stock LLaVA folder with no connector weights.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

llava = pytest.importorskip("llava")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

import llava.model.builder as llava_builder  # noqa: E402
import llava.train.train as llava_train  # noqa: E402
from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

from anchor_former.adapters.llava import AnchorVisionTower, LlavaConnector  # noqa: E402
from anchor_former.adapters.llava._registration import (  # noqa: E402
    DeferredAnchorVisionTower,
    register_with_llava,
    unregister_from_llava,
)
from anchor_former.adapters.llava.train import anchor_model_arguments, main  # noqa: E402
from anchor_former.connectors import AnchorFormer, SelectConnector  # noqa: E402
from anchor_former.search import anchor_search  # noqa: E402

IMAGE, PATCH, K, VISION_DIM, LLM_DIM = 28, 4, 8, 32, 48  # 7 x 7 = 49 patches, 4 heads
CONNECTOR = '{"depth": 2, "heads": 2, "dim_head": 8}'
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_train")
    lines = [SYSTEM, "USER: ASSISTANT:", "what is this?", *[f"a {c} square" for c in COLOURS]] * 20
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model_file,
        vocab_size=80,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (root / "llm").mkdir()
    (root / "llm" / "tokenizer.model").write_bytes(model_file.getvalue())
    tokenizer = LlamaTokenizer(vocab_file=str(root / "llm" / "tokenizer.model"), legacy=True)
    tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=LLM_DIM,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ).save_pretrained(root / "llm")
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=VISION_DIM,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=IMAGE,
            patch_size=PATCH,
            projection_dim=16,
        )
    ).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        root / "clip"
    )
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
                    {"from": "human", "value": "<image>\nwhat is this?"},
                    {"from": "gpt", "value": f"a {name} square"},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def registered(monkeypatch):
    """register_with_llava() for one test; LLaVA's functions and arguments are restored afterwards."""
    monkeypatch.setattr(llava_train, "ModelArguments", llava_train.ModelArguments)
    monkeypatch.setattr(
        llava_train.conversation_lib, "default_conversation", llava_train.conversation_lib.default_conversation
    )
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    register_with_llava()
    yield
    unregister_from_llava()


def run_llava_train(workdir, output: str, *extra: str) -> None:
    main(
        [
            "--model_name_or_path",
            str(workdir / "llm"),
            "--vision_tower",
            str(workdir / "clip"),
            "--data_path",
            str(workdir / "data.json"),
            "--image_folder",
            str(workdir / "images"),
            "--mm_projector_type",
            "acformer",
            "--num_anchors",
            str(K),
            "--connector_config",
            CONNECTOR,
            "--mm_vision_select_layer",
            "-2",
            "--mm_use_im_start_end",
            "False",
            "--mm_use_im_patch_token",
            "False",
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--model_max_length",
            "512",
            "--dataloader_num_workers",
            "0",
            "--output_dir",
            str(workdir / output),
            *extra,
        ]
    )


def test_stage_1_stage_2_then_load_pretrained_model_generates(workdir, registered) -> None:
    pytest.importorskip("deepspeed", reason="LLaVA's stage-1 save imports deepspeed (scripts/test.sh installs it)")
    run_llava_train(workdir, "stage1", "--version", "plain", "--tune_mm_mlp_adapter", "True")
    adapter = torch.load(workdir / "stage1" / "mm_projector.bin", weights_only=True)
    assert adapter and all(key.startswith("model.mm_projector.connector.") for key in adapter)
    config = json.loads((workdir / "stage1" / "config.json").read_text())
    assert config["mm_projector_type"] == "acformer" and config["anchor_former"]["num_anchors"] == K
    assert config["mm_vision_select_feature"] == "patch"  # LLaVA's own value: the tower reads every token itself

    run_llava_train(
        workdir,
        "tiny-llava-stage2",
        "--version",
        "v1",
        "--pretrain_mm_mlp_adapter",
        str(workdir / "stage1" / "mm_projector.bin"),
    )
    saved = load_file(workdir / "tiny-llava-stage2" / "model.safetensors")
    assert {k for k in saved if "mm_projector" in k} == set(adapter)
    assert any(not torch.equal(saved[k], adapter[k]) for k in adapter)  # stage 2 trained the connector further

    tokenizer, model, image_processor, _ = llava_builder.load_pretrained_model(
        str(workdir / "tiny-llava-stage2"), None, "tiny-llava-stage2", device="cpu"
    )
    inner = model.get_model()
    assert isinstance(inner.vision_tower, DeferredAnchorVisionTower) and inner.vision_tower.is_loaded
    assert isinstance(inner.mm_projector, LlavaConnector) and isinstance(inner.mm_projector.connector, AnchorFormer)
    state = model.state_dict()
    for key in adapter:  # every connector weight reloaded (in LLaVA's float16)
        torch.testing.assert_close(state[key], saved[key].to(state[key].dtype), atol=0, rtol=0, msg=key)

    image = Image.open(workdir / "images" / "1.png").convert("RGB")
    images = process_images([image], image_processor, model.config).to(dtype=model.dtype)
    assert model.encode_images(images).shape == (1, K + 1, LLM_DIM)
    prompt = f"{SYSTEM} USER: <image>\nwhat is this? ASSISTANT:"
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    with torch.inference_mode():
        out = model.generate(input_ids, images=images, image_sizes=[image.size], max_new_tokens=4, do_sample=False)
    assert out[0, 0] == tokenizer.bos_token_id and 2 <= out.shape[1] <= 5  # start token + new tokens (no prompt)


def test_stage_2_loads_a_stage_1_adapter_that_llava_alone_rejects(workdir, registered, tmp_path) -> None:
    """initialize_vision_modules with --pretrain_mm_mlp_adapter: after registration the connector gets the
    file's weights; LLaVA's own code (mlp2x_gelu, strict load) refuses the same file."""
    torch.manual_seed(1)
    reference = AnchorFormer(VISION_DIM, LLM_DIM, num_anchors=K, depth=2, heads=2, dim_head=8)
    adapter = {f"model.mm_projector.connector.{k}": v for k, v in reference.state_dict().items()}
    torch.save(adapter, tmp_path / "mm_projector.bin")
    arguments = anchor_model_arguments(llava_train.ModelArguments)(
        vision_tower=str(workdir / "clip"),
        mm_vision_select_layer=-2,
        mm_projector_type="acformer",
        pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.bin"),
        num_anchors=K,
        connector_config=CONNECTOR,
    )
    model = LlavaLlamaForCausalLM.from_pretrained(workdir / "llm")
    model.get_model().initialize_vision_modules(model_args=arguments, fsdp=[])
    inner = model.get_model()
    assert isinstance(inner.vision_tower, AnchorVisionTower)
    assert model.config.mm_vision_select_feature == "patch" and model.config.anchor_former["score"] == "cls"
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(inner.mm_projector.connector.state_dict()[key], value, atol=0, rtol=0, msg=key)

    unregister_from_llava()
    plain = LlavaLlamaForCausalLM.from_pretrained(workdir / "llm")
    arguments.mm_projector_type = "mlp2x_gelu"
    with pytest.raises(RuntimeError, match="Missing key"):
        plain.get_model().initialize_vision_modules(model_args=arguments, fsdp=[])


def test_connector_arguments_are_checked(workdir, registered) -> None:
    model = LlavaLlamaForCausalLM.from_pretrained(workdir / "llm")
    arguments = anchor_model_arguments(llava_train.ModelArguments)(
        vision_tower=str(workdir / "clip"), mm_vision_select_layer=-2, mm_projector_type="acformer", num_anchors=50
    )
    with pytest.raises(ValueError, match=r"num_anchors must be an integer in \[1, 49\].*got 50"):
        model.get_model().initialize_vision_modules(model_args=arguments, fsdp=[])
    arguments.num_anchors, arguments.connector_config = K, "depth=2"
    with pytest.raises(ValueError, match=r"connector_config must be a JSON object, got 'depth=2'"):
        model.get_model().initialize_vision_modules(model_args=arguments, fsdp=[])


def stock_config(workdir) -> LlavaConfig:
    """A LLaVA-1.5-style config (mlp2x_gelu projector) over the tiny Llama and CLIP tower."""
    config = LlavaConfig.from_pretrained(workdir / "llm")
    for key, value in dict(
        mm_vision_tower=str(workdir / "clip"),
        mm_hidden_size=VISION_DIM,
        use_mm_proj=True,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    ).items():
        setattr(config, key, value)  # as LLaVA's initialize_vision_modules records them
    return config


def test_fine_tuning_a_llava_model_replaces_its_projector_and_keeps_its_weights(workdir, registered) -> None:
    """Stage 2 from a LLaVA-1.5 checkpoint (it already has an mlp2x_gelu mm_projector): the connector
    replaces it, and the connector's output MLP starts from its weights."""
    torch.manual_seed(3)
    model = LlavaLlamaForCausalLM(stock_config(workdir))
    model.get_vision_tower().load_model()
    old = {k: v.clone() for k, v in model.get_model().mm_projector.state_dict().items()}
    arguments = anchor_model_arguments(llava_train.ModelArguments)(
        vision_tower=str(workdir / "clip"),
        mm_vision_select_layer=-2,
        mm_projector_type="acformer",
        num_anchors=K,
        connector_config=CONNECTOR,
    )
    model.get_model().initialize_vision_modules(model_args=arguments, fsdp=[])
    projector = model.get_model().mm_projector
    assert isinstance(projector, LlavaConnector) and isinstance(projector.connector, AnchorFormer)
    assert isinstance(model.get_model().vision_tower, AnchorVisionTower)
    for key, value in old.items():
        torch.testing.assert_close(projector.connector.projector.state_dict()[key], value, atol=0, rtol=0, msg=key)


SELECT_ATOL = 1e-4  # float16 model vs a float32 reference; measured max |difference| 1.7e-5


def test_select_reloads_a_stock_llava_folder_with_no_connector_weights(workdir, registered, tmp_path) -> None:
    """connector='select' (training-free): LLaVA's own mlp2x_gelu folder, switched at load time; the
    projector keeps the checkpoint's weights and nothing else has parameters."""
    torch.manual_seed(2)
    folder = tmp_path / "tiny-llava-base"
    LlavaLlamaForCausalLM(stock_config(workdir)).save_pretrained(folder)
    LlamaTokenizer.from_pretrained(workdir / "llm").save_pretrained(folder)
    checkpoint = load_file(folder / "model.safetensors")

    _, model, image_processor, _ = llava_builder.load_pretrained_model(
        str(folder), None, "tiny-llava-base", device="cpu", anchor_former={"connector": "select", "num_anchors": K}
    )
    connector = model.get_model().mm_projector.connector
    assert isinstance(connector, SelectConnector)
    assert {f"model.mm_projector.connector.projector.{k}" for k in connector.projector.state_dict()} == {
        f"model.mm_projector.connector.{k}" for k in connector.state_dict()
    }  # no parameters of its own
    for key, value in connector.projector.state_dict().items():
        torch.testing.assert_close(value, checkpoint[f"model.mm_projector.{key}"].half(), atol=0, rtol=0, msg=key)

    image = Image.open(workdir / "images" / "2.png").convert("RGB")
    images = process_images([image], image_processor, model.config)
    tokens = model.encode_images(images.to(dtype=model.dtype))  # (1, K, LLM_DIM)

    clip = model.get_model().vision_tower.vision_tower
    with torch.no_grad():  # reference: eager CLIP, [CLS] row of the selected layer, anchors, checkpoint MLP
        out = clip(images.to(clip.dtype), output_hidden_states=True, output_attentions=True)
        features, cls_row = out.hidden_states[-2], out.attentions[-2][:, :, 0]  # (1, N, D), (1, H, N)
        idx = anchor_search(cls_row, K, include_cls=False)  # (1, K) ascending token indices
        mlp = torch.nn.Sequential(
            torch.nn.Linear(VISION_DIM, LLM_DIM), torch.nn.GELU(), torch.nn.Linear(LLM_DIM, LLM_DIM)
        )
        mlp.load_state_dict(
            {
                k.removeprefix("model.mm_projector."): v
                for k, v in checkpoint.items()
                if k.startswith("model.mm_projector.")
            }
        )
        expected = mlp(features[0, idx[0]]).unsqueeze(0)
        first_k = mlp(features[0, 1 : K + 1]).unsqueeze(0)  # broken variant: the first K patches
    assert tokens.shape == (1, K, LLM_DIM)
    torch.testing.assert_close(tokens.float(), expected, atol=SELECT_ATOL, rtol=0)
    assert (first_k - expected).abs().max() > 10 * SELECT_ATOL  # measured 3.2e-2: the tolerance tells anchors apart
