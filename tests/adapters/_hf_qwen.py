"""Tiny real Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and processors built offline for the Qwen adapter tests."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

PATCH, MERGE = 8, 2
SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ["what", "is", "this", "?", "a", "cat", "dog", "and"]
# image (H, W) in pixels -> patch grid (H/8, W/8) -> merged grid (H/16, W/16)
IMAGE_SIZES = [(48, 64), (32, 32)]  # 3 x 4 = 12 and 2 x 2 = 4 merged tokens
VIDEO_SHAPE = (4, 32, 48)  # 4 frames -> 2 temporal steps of 2 x 3 = 6 merged tokens
PROMPTS = [
    "<|vision_start|><|image_pad|><|vision_end|> what is this ?",
    "a <|vision_start|><|image_pad|><|vision_end|> cat and <|vision_start|><|video_pad|><|vision_end|> dog ?",
]
FAMILIES = {
    "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen2_vl": (Qwen2VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def make_processor(family: str = "qwen2_5_vl"):
    """A real Qwen processor built offline: a WordLevel tokenizer + Qwen2-VL image and video processors."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<|im_end|>", *SPECIAL, *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL,
    )
    sizes = dict(
        min_pixels=PATCH * PATCH * 4,
        max_pixels=PATCH * PATCH * 256,
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
    )
    images = Qwen2VLImageProcessor(**sizes)
    if family == "qwen3_vl":  # frames given as they are (no fps resampling); timestamps at 24 fps
        videos = Qwen3VLVideoProcessor(
            size={"shortest_edge": sizes["min_pixels"], "longest_edge": sizes["max_pixels"]},
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=2,
            do_sample_frames=False,
        )
    else:
        videos = Qwen2VLVideoProcessor(**sizes, cap_pixels_per_frame=False)
    return FAMILIES[family][0](image_processor=images, tokenizer=tokenizer, video_processor=videos)


def make_model(processor, family: str = "qwen2_5_vl", **vision):
    torch.manual_seed(0)
    _, config_class, model_class = FAMILIES[family]
    if family == "qwen2_5_vl":
        # window 32 px = 2 x 2 merged tokens per window, so the 3 x 4 image has several windows
        vision_config = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            window_size=32,
            out_hidden_size=48,
            fullatt_block_indexes=[1, 3],
        )
    elif family == "qwen3_vl":
        # deepstack features of blocks 0 and 1 are added to the first two LLM layers
        vision_config = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=48,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        )
    else:
        vision_config = dict(depth=3, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=4)
    vision_config.update(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, **vision)
    text = dict(
        vocab_size=len(processor.tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 3]},
    )
    if family == "qwen3_vl":
        text.update(head_dim=12, rope_parameters={**text["rope_parameters"], "mrope_interleaved": True})
    config = config_class(
        vision_config=vision_config,
        text_config=text,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"),
    )
    return sharpen(model_class(config).eval())


def sharpen(model, factor: float = 8.0):
    """Scale every query and key projection by ``factor``: random init gives near-uniform attention (every
    score ~1/n, positions barely matter); peaked attention, as in a trained model, makes the tests bite."""
    with torch.no_grad():
        for block in model.model.visual.blocks:
            width = block.attn.qkv.out_features // 3
            block.attn.qkv.weight[: 2 * width] *= factor
            block.attn.qkv.bias[: 2 * width] *= factor
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight *= factor
                if proj.bias is not None:
                    proj.bias *= factor
    return model


def media():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]
    video = rng.integers(0, 256, (*VIDEO_SHAPE, 3), dtype=np.uint8)
    return images, video


def inputs_for(processor, *, padding_side: str = "right"):
    """Sample 0: image 0 then text; sample 1: text, image 1, text, a video, text."""
    images, video = media()
    processor.tokenizer.padding_side = padding_side
    return processor(text=PROMPTS, images=images, videos=[video], return_tensors="pt", padding=True)
