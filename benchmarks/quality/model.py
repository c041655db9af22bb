"""The toy VLM: a tiny CLIP vision tower and a tiny LLaVA (transformers classes, built from configs).

* tower: ``CLIPVisionModel``, 64 x 64 images, patch 8 (64 patches + [CLS]), width 64, 4 layers, 4 heads.
  Its position embedding is zero and frozen: a patch's features say what is in it, not where it is, so
  the only place an object's position reaches the language model is its token's place in the sequence.
  That is what makes reduced paths that reorder or shuffle the kept tokens lose the ``above`` questions
  (a real CLIP tower also writes position into its features, so there an order mistake may cost less);
* LLaVA: ``LlavaForConditionalGeneration`` with that tower, layer -2 features, the ``"default"`` feature
  selection (patch tokens only, as LLaVA-1.5), transformers' ``mlp2x_gelu`` projector and a 3-layer,
  width-128 Llama over :data:`~benchmarks.quality.task.VOCAB`.

The trained weights live in ``weights/`` beside this file: ``config.json`` + ``model.safetensors`` (the
LLaVA, tower included, as ``save_pretrained`` writes them) and ``acformer.safetensors`` +
``acformer.json`` (one AcFormer connector per budget). ``python -m benchmarks.quality.train`` makes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from benchmarks.quality.task import GRID, IMAGE_ID, IMAGE_SIZE, PAD_ID, PATCH, VOCAB

__all__ = [
    "ACFORMER_KWARGS",
    "WEIGHTS",
    "build_llava",
    "build_tower",
    "load_acformer",
    "load_llava",
    "save_acformer",
    "tower_config",
]

WEIGHTS = Path(__file__).resolve().parent / "weights"
NUM_PATCHES = GRID * GRID
#: the AcFormer connector trained per budget (besides ``num_anchors``): a small resampler at the toy's widths
ACFORMER_KWARGS = {"depth": 2, "heads": 4, "dim_head": 16}


def tower_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        num_channels=3,
        projection_dim=64,
    )


def build_tower(seed: int) -> CLIPVisionModel:
    """A fresh tower from ``seed``, its position embedding zero and frozen."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(tower_config())
    embedding = tower.embeddings.position_embedding
    with torch.no_grad():
        embedding.weight.zero_()
    embedding.weight.requires_grad_(False)
    return tower


def llava_config(layers: int = 3) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=tower_config(),
        text_config=text,
        image_token_index=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=NUM_PATCHES,
    )


def build_llava(tower: CLIPVisionModel, seed: int, *, layers: int = 3) -> LlavaForConditionalGeneration:
    """A fresh LLaVA from ``seed`` around a copy of ``tower``'s weights (frozen), a ``layers``-layer Llama."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(layers))
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.vision_tower.requires_grad_(False)
    return model


def load_llava(path: Path = WEIGHTS) -> LlavaForConditionalGeneration:
    """The shipped toy LLaVA (float32, eval mode)."""
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def save_acformer(connectors: dict[int, torch.nn.Module], path: Path = WEIGHTS) -> None:
    """One trained AcFormer connector per ``num_anchors``, as ``acformer.safetensors`` + ``acformer.json``."""
    from safetensors.torch import save_file

    state = {
        f"{k}.{name}": t.detach().contiguous() for k, c in connectors.items() for name, t in c.state_dict().items()
    }
    save_file(state, str(path / "acformer.safetensors"))
    (path / "acformer.json").write_text(json.dumps({"num_anchors": sorted(connectors), **ACFORMER_KWARGS}) + "\n")


def load_acformer(path: Path = WEIGHTS) -> dict[int, dict[str, torch.Tensor]]:
    """``{num_anchors: connector state dict}`` of the shipped AcFormer connectors."""
    from safetensors.torch import load_file

    state = load_file(str(path / "acformer.safetensors"))
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        k, name = key.split(".", 1)
        out.setdefault(int(k), {})[name] = tensor
    return out
