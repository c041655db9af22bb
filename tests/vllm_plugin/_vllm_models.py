"""Tiny real models for the vLLM tests, built offline and saved in the layouts vLLM loads.

vLLM's CPU attention accepts head sizes 32, 64, 80, ... so the language models here have 2 heads of 32.
The tokenizer is a WordLevel ``tokenizers`` model with a chat template (for the OpenAI-compatible server).
"""

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

VISION_DIM, LLM_DIM, IMAGE, PATCH = 32, 64, 28, 4  # 7 x 7 = 49 patches, 4 vision heads; 2 LLM heads of 32
NUM_PATCHES = (IMAGE // PATCH) ** 2
WORDS = [
    "USER:",
    "ASSISTANT:",
    "what",
    "is",
    "in",
    "the",
    "picture",
    "?",
    "a",
    "cat",
    "dog",
    "and",
    "red",
    "blue",
    "green",
    "one",
    "two",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% else %}<image> {% endif %}"
    "{% endfor %}{% endif %}{% else %}ASSISTANT: {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PROMPTS = ["USER: <image> what is in the picture ? ASSISTANT:", "USER: what is <image> in the ? ASSISTANT: a"]


def make_tokenizer(special: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *special, *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=special,
        chat_template=CHAT_TEMPLATE,
    )


def text_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=LLM_DIM,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )


def llava_processor() -> LlavaProcessor:
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=make_tokenizer(["<image>"]),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def llava_model(processor: LlavaProcessor) -> LlavaForConditionalGeneration:
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
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(len(processor.tokenizer)),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=NUM_PATCHES,
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the init's, so that the tokens differ clearly between images
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model


def images(count: int, seed: int = 0, size: tuple[int, int] = (IMAGE + 6, IMAGE + 2)) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def save(model, processor, folder) -> str:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def hf_greedy(
    model, processor, prompt: str, image, max_tokens: int, *, video=None
) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """transformers' greedy decode: ``(prompt ids, generated ids, per step (V,) float32 log-probs)``.

    The log-probs are those of the raw logits, as vLLM reports them (``min_new_tokens`` suppresses the end
    token in the processed scores, not in the logits). ``video``: ``(F, H, W, 3)`` frames instead of ``image``."""
    media = {"images": image} if video is None else {"videos": [video]}
    inputs = processor(text=prompt, **media, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            min_new_tokens=max_tokens,
        )
    prompt_ids = inputs["input_ids"][0].tolist()
    generated = out.sequences[0, len(prompt_ids) :].tolist()
    return prompt_ids, generated, [torch.log_softmax(s[0].float(), dim=-1) for s in out.logits]


def assert_same_as_hf(output, reference, *, atol: float, top: int = 5) -> float:
    """vLLM's ``RequestOutput`` gives the reference's prompt ids, greedy tokens and top-``top`` log-probs;
    returns the largest log-prob difference."""
    prompt_ids, generated, logprobs = reference
    assert list(output.prompt_token_ids) == prompt_ids, f"prompt ids {list(output.prompt_token_ids)} != {prompt_ids}"
    completion = output.outputs[0]
    assert list(completion.token_ids) == generated, f"greedy tokens {list(completion.token_ids)} != {generated}"
    worst = 0.0
    for step, expected in zip(completion.logprobs, logprobs):
        best = torch.topk(expected, top)
        for value, token in zip(best.values.tolist(), best.indices.tolist()):
            assert token in step, f"top-{top} token {token} missing from vLLM's log-probs {sorted(step)}"
            worst = max(worst, abs(step[token].logprob - value))
    assert worst <= atol, f"log-probs differ by {worst:.3g} > {atol}"
    print(f"max |dlogprob| vs transformers: {worst:.2e}")  # shown with pytest -s: the measured error
    return worst


# LLaVA-NeXT's five pinpoints scaled to 28-px views
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def llava_next_processor():
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    images = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=PINPOINTS
    )
    return LlavaNextProcessor(
        image_processor=images,
        tokenizer=make_tokenizer(["<image>"]),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def llava_next_model(processor):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

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
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text_config(len(processor.tokenizer)),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
        model.model.image_newline.normal_()
    return model


# --- Qwen2.5-VL ---------------------------------------------------------------------------------------------
# 8-px patches merged 2 x 2: one merged token per 16 x 16 pixels; windows of 2 x 2 merged tokens (32 px). The
# vision heads are 4 of 8 (vLLM's vision attention takes any size), the LLM's 2 of 32 (its CPU attention's).
QWEN_PATCH, QWEN_MERGE = 8, 2
QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_WORDS = ["what", "is", "this", "?", "a", "cat", "dog", "and", "red", "blue"]
#: (height, width) pixels: landscape 3 x 5 = 15 merged tokens, portrait 6 x 2 = 12
QWEN_LANDSCAPE, QWEN_PORTRAIT = (48, 80), (96, 32)


def qwen_processor(family: str = "qwen2_5_vl"):
    """A real Qwen2.5-VL (or Qwen3-VL) processor built offline: a WordLevel tokenizer + Qwen's image processor."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<|im_end|>", *QWEN_SPECIAL, *QWEN_WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=QWEN_SPECIAL,
    )
    sizes = dict(
        min_pixels=QWEN_PATCH**2 * 4,
        max_pixels=QWEN_PATCH**2 * 256,
        patch_size=QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=2,
    )
    if family == "qwen3_vl":
        videos = Qwen3VLVideoProcessor(
            size={"shortest_edge": sizes["min_pixels"], "longest_edge": sizes["max_pixels"]},
            patch_size=QWEN_PATCH,
            merge_size=QWEN_MERGE,
            temporal_patch_size=2,
        )
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer, video_processor=videos
        )
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
    )


def qwen_model(processor, family: str = "qwen2_5_vl"):
    """A random Qwen2.5-VL (or Qwen3-VL) with peaked attention (queries and keys scaled up, as in a trained
    model), so that the anchor scores and the positions both matter."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    torch.manual_seed(0)
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        out_hidden_size=LLM_DIM,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=2,
    )
    if family == "qwen3_vl":  # no windows; deepstack features of blocks 0 and 1 go to the first two LLM layers
        vision.update(depth=3, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    else:  # windows of 2 x 2 merged tokens; blocks 1 and 3 attend over the whole image
        vision.update(depth=4, window_size=32, fullatt_block_indexes=[1, 3])
    text = dict(
        vocab_size=len(processor.tokenizer),
        hidden_size=LLM_DIM,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    )
    config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    extra = {}
    if family == "qwen3_vl":
        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        text.update(head_dim=LLM_DIM // 2, rope_parameters={**text["rope_parameters"], "mrope_interleaved": True})
        extra["vision_end_token_id"] = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        **extra,
    )
    model = model_class(config).eval()
    with torch.no_grad():
        for block in model.model.visual.blocks:
            width = block.attn.qkv.out_features // 3
            block.attn.qkv.weight[: 2 * width] *= 8.0
            block.attn.qkv.bias[: 2 * width] *= 8.0
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight *= 8.0
                if proj.bias is not None:
                    proj.bias *= 8.0
    return model


# --- LLaVA-OneVision ----------------------------------------------------------------------------------------
# SigLIP views of 28 px (7 x 7 patches, no [CLS]); pinpoints up to 4 x 4 crops, so that a 112 x 112 image's
# 28 x 28 patch grid exceeds "anyres_max_9" (r = sqrt(784 / (9 * 49)) = 1.33 > 1.1) and is shrunk to 21 x 21
OV_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [84, 84], [84, 112], [112, 84], [112, 112]]


def llava_onevision_processor():
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    images = LlavaOnevisionImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=OV_PINPOINTS)
    videos = LlavaOnevisionVideoProcessor(size={"height": IMAGE, "width": IMAGE})
    return LlavaOnevisionProcessor(
        image_processor=images,
        tokenizer=make_tokenizer(["<image>", "<video>"]),
        video_processor=videos,
        num_image_tokens=NUM_PATCHES,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHAT_TEMPLATE,
    )


def llava_onevision_model(processor):
    """A random LLaVA-OneVision (SigLIP without head, Qwen2 with 2 heads of 32) with peaked vision attention."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
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
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
        model.model.image_newline.normal_()
    return model


def save_llava_hf_layout(model, processor, folder) -> str:
    """Save as the llava-hf OneVision checkpoints are laid out (``vision_tower.vision_model.*``), which stock vLLM
    loads; transformers 5 writes ``vision_tower.*`` (the plugin reads both)."""
    from safetensors.torch import load_file, save_file

    M_path = save(model, processor, folder)
    path = f"{M_path}/model.safetensors"
    weights = load_file(path)
    renamed = {
        ("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") else k): v
        for k, v in weights.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})
    return M_path
