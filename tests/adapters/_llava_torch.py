"""Tiny real LLaVA (llava-torch) models built offline for the LLaVA-adapter tests (llava env only)."""

from __future__ import annotations

import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

VISION_DIM, LLM_DIM, IMAGE, PATCH, K = 32, 48, 28, 4, 8  # 7 x 7 = 49 patches, 4 heads
NUM_PATCHES = (IMAGE // PATCH) ** 2
CONNECTOR = {"depth": 2, "heads": 2, "dim_head": 8}


def save_tiny_tower(path) -> str:
    """Save a tiny CLIPVisionModel + CLIPImageProcessor to ``path``, what ``mm_vision_tower`` points at."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=VISION_DIM,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=16,
    )
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    return str(path)


def llava_config(tower_dir: str, **overrides) -> LlavaConfig:
    settings = dict(
        vocab_size=64,
        hidden_size=LLM_DIM,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        mm_vision_tower=tower_dir,
        mm_hidden_size=VISION_DIM,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        use_mm_proj=True,
    )
    settings.update(overrides)
    return LlavaConfig(**settings)


def make_model(tower_dir: str, **overrides) -> LlavaLlamaForCausalLM:
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(llava_config(tower_dir, **overrides))
    model.get_vision_tower().load_model()
    return model.eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def prompt(batch: int = 2) -> torch.Tensor:
    ids = torch.randint(1, 64, (batch, 7), generator=torch.Generator().manual_seed(2))
    ids[:, 2] = IMAGE_TOKEN_INDEX
    return ids
