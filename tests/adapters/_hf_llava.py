"""Tiny real LLaVA models and processors built offline for the transformers-adapter tests."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

VISION_DIM, LLM_DIM, IMAGE, PATCH, K = 32, 48, 28, 4, 8  # 7 x 7 = 49 patches, 4 heads
NUM_PATCHES = (IMAGE // PATCH) ** 2
CONNECTOR = {"depth": 2, "heads": 2, "dim_head": 8}
WORDS = ["USER:", "ASSISTANT:", "what", "is", "in", "the", "picture", "?", "a", "cat", "dog"]


def make_processor() -> LlavaProcessor:
    """A real LlavaProcessor built offline: a WordLevel tokenizer from ``tokenizers`` + CLIPImageProcessor."""
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
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    # as llava-hf/llava-1.5-7b-hf: default strategy (drop [CLS]) and one additional token ([CLS])
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def make_model(processor: LlavaProcessor, **overrides) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=VISION_DIM,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=LLM_DIM,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    settings = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=NUM_PATCHES,
    )
    settings.update(overrides)
    return LlavaForConditionalGeneration(LlavaConfig(**settings)).eval()


def pixels(batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (IMAGE + 6, IMAGE + 2, 3), dtype=np.uint8) for _ in range(batch)]


PROMPTS = ["USER: <image> what is in the picture ? ASSISTANT:", "USER: what is <image> in the ? ASSISTANT: a"]


def inputs_for(processor, batch: int = 2):
    return processor(text=PROMPTS[:batch], images=pixels(batch), return_tensors="pt", padding=True)
