"""Tiny real LLaVA-NeXT models and processors built offline for the LLaVA-NeXT adapter tests."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

VISION_DIM, LLM_DIM, IMAGE, PATCH = 32, 48, 28, 4  # 7 x 7 = 49 patches per view, 4 heads
SIDE = IMAGE // PATCH
NUM_PATCHES = SIDE * SIDE
# LLaVA-NeXT's five pinpoints ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]) scaled to 28-px views
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
WORDS = ["USER:", "ASSISTANT:", "what", "is", "in", "the", "picture", "?", "a", "cat", "dog"]
# (height, width): square, wide, tall, each pinpoint, and ones that unpad rows or columns
SIZES = [
    (28, 28),
    (56, 56),
    (30, 90),
    (90, 30),
    (40, 70),
    (70, 40),
    (33, 100),
    (100, 45),
    (17, 120),
    (45, 25),
    (64, 61),
]


def make_processor() -> LlavaNextProcessor:
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
    images = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=PINPOINTS
    )
    # as llava-hf/llava-v1.6-*: default strategy (drop [CLS]), one additional token ([CLS]) in the count
    return LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def make_model(processor: LlavaNextProcessor, **overrides) -> LlavaNextForConditionalGeneration:
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
        max_position_embeddings=512,
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
        image_grid_pinpoints=PINPOINTS,
    )
    settings.update(overrides)
    return LlavaNextForConditionalGeneration(LlavaNextConfig(**settings)).eval()


def pixels(sizes) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


PROMPTS = ["USER: <image> what is in the picture ? ASSISTANT:", "USER: what is <image> in the ? ASSISTANT: a"]


def inputs_for(processor, sizes=((17, 120), (70, 40))):
    prompts = [PROMPTS[i % 2] for i in range(len(sizes))]
    return processor(text=prompts, images=pixels(sizes), return_tensors="pt", padding=True)
