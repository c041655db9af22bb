"""Tiny real LLaVA-OneVision models (SigLIP tower, no [CLS]) and processors built offline for the adapter tests."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

VISION_DIM, LLM_DIM, IMAGE, PATCH = 32, 48, 28, 4  # 7 x 7 = 49 patches per view, 4 heads
SIDE = IMAGE // PATCH
NUM_PATCHES = SIDE * SIDE
POOLED = (-(-SIDE // 2)) ** 2  # a video frame after the model's 2x2 bilinear pooling: 4 x 4 = 16 tokens
# a slice of OneVision's 36 pinpoints (multiples of the 384-px view) scaled to 28-px views, up to 3 x 3 crops
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [84, 84], [56, 84], [84, 56]]
# "anyres_max_2": the model bilinearly shrinks a high-resolution grid of more than ~2.4 views' patches
MAX_VIEWS = "anyres_max_2"
WORDS = ["user", "assistant", "what", "is", "in", "the", "picture", "video", "?", "a", "cat", "dog"]
# (height, width): one view, wide, tall, unpadded rows / columns, and large ones that the model downsamples
SIZES = [(28, 28), (30, 90), (90, 30), (40, 70), (70, 40), (33, 100), (17, 120), (64, 61), (90, 90), (80, 100)]


def make_processor(vision_aspect_ratio: str = MAX_VIEWS) -> LlavaOnevisionProcessor:
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<image>", "<video>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>", "<video>"],
    )
    images = LlavaOnevisionImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=PINPOINTS)
    videos = LlavaOnevisionVideoProcessor(size={"height": IMAGE, "width": IMAGE})
    # as llava-hf/llava-onevision-*: SigLIP, "full" strategy, num_image_tokens = patches of one view
    return LlavaOnevisionProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=videos,
        num_image_tokens=NUM_PATCHES,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
    )


def make_model(processor: LlavaOnevisionProcessor, **overrides) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    # no pooling head, as every OneVision checkpoint (LlavaOnevisionConfig's SigLIP: vision_use_head=False)
    vision = SiglipVisionConfig(
        hidden_size=VISION_DIM,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(processor.tokenizer),
        hidden_size=LLM_DIM,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    settings = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=processor.vision_aspect_ratio,
    )
    settings.update(overrides)
    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**settings)).eval()


def pixels(sizes) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def video(frames: int, seed: int = 1) -> np.ndarray:
    """``(frames, 40, 50, 3)`` uint8 random frames."""
    return np.random.default_rng(seed).integers(0, 256, (frames, 40, 50, 3), dtype=np.uint8)


IMAGE_PROMPT = "user <image> what is in the picture ? assistant"
VIDEO_PROMPT = "user <video> what is in the video ? assistant a"


def image_inputs(processor, sizes=((17, 120), (90, 90))):
    return processor(text=[IMAGE_PROMPT] * len(sizes), images=pixels(sizes), return_tensors="pt", padding=True)


def mixed_inputs(processor, size=(30, 90), frames=3):
    """A batch of two samples: one image, one video of ``frames`` frames."""
    return processor(
        text=[IMAGE_PROMPT, VIDEO_PROMPT],
        images=pixels([size]),
        videos=[video(frames)],
        return_tensors="pt",
        padding=True,
    )
