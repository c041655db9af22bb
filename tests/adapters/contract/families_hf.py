"""The transformers families of the contract suite (main environment: transformers >= 5)."""

from __future__ import annotations

import copy

import _hf_llava as llava
import _hf_llava_next as llava_next
import _hf_llava_onevision as onevision
import _hf_qwen as qwen
import numpy as np
import torch
from family import Family
from transformers import AutoProcessor, LlavaProcessor

from anchor_former.adapters.hf import llava as hf_llava
from anchor_former.adapters.hf import llava_next as hf_next
from anchor_former.adapters.hf import llava_onevision as hf_onevision
from anchor_former.adapters.hf import qwen_vl as hf_qwen

CONNECTOR = {"depth": 1, "heads": 2, "dim_head": 8}


def _image(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _llava_tokens(model, inputs):
    """``<image>`` tokens per sample written by the processor, and the tokens the model gives per image."""
    with torch.no_grad():
        out = model(**inputs)
    image = model.config.image_token_id
    return (inputs["input_ids"] == image).sum(dim=1).tolist(), [
        int(t.shape[0]) for t in out.image_outputs.pooler_output
    ]


def _qwen_tokens(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    pads = int((inputs["input_ids"] == model.config.image_token_id).sum())
    return [pads], [sum(int(t.shape[0]) for t in out.image_outputs.pooler_output)]


def _auto_reload(folder):
    from transformers import AutoModelForImageTextToText

    from anchor_former.adapters.transformers import register_auto_classes

    register_auto_classes()
    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def _auto_processor(folder):
    from anchor_former.adapters.transformers import register_auto_classes

    register_auto_classes()
    return AutoProcessor.from_pretrained(folder)


_LLAVA_TOWER = r".*vision_tower.*\.(q_proj|k_proj)"


def _llava_eager_tokens(model, inputs):
    """LLaVA-1.5's image tokens with the anchors of the tower's own eager attention: ``output_attentions`` of
    a copy of the tower in eager mode, the [CLS] row of ``vision_feature_layer``, the connector's search."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    layer = model.config.vision_feature_layer
    connector = model.model.multi_modal_projector
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        idx = connector.search(out.attentions[layer][:, :, 0].float(), layout="b h n")  # (B, K + 1)
        return connector(out.hidden_states[layer], idx)  # (B, K + 1, llm_dim)


LLAVA = Family(
    name="llava",
    make_processor=llava.make_processor,
    make_model=llava.make_model,
    inputs=lambda p, seed: p(
        text=llava.PROMPTS[:1], images=[_image(seed, (llava.IMAGE + 6, llava.IMAGE + 2))], return_tensors="pt"
    ),
    attach=hf_llava.attach_anchor_former,
    host=hf_llava.HOST,
    full={"connector": "select", "num_anchors": llava.NUM_PATCHES},
    reduced={"connector": "acformer", "num_anchors": 8, **CONNECTOR},
    reattach={"num_anchors": 4},
    reattach_bad=(
        {"num_anchors": 4, "depth": 3},
        r"architecture must stay the same \(attached now: connector='acformer', num_anchors=8",
    ),
    bad=({"num_anchors": 50}, r"num_anchors must be at most the 49 patch tokens of the vision tower, got 50"),
    tokens=_llava_tokens,
    tower=lambda m: m.model.vision_tower,
    projector=lambda m: m.model.multi_modal_projector,
    q_k_modules=(_LLAVA_TOWER,),
    stock_class=hf_llava.LlavaForConditionalGeneration,
    attached_class=hf_llava.AnchorFormerLlavaForConditionalGeneration,
    reload=lambda folder: hf_llava.AnchorFormerLlavaForConditionalGeneration.from_pretrained(folder).eval(),
    reload_processor=lambda folder: LlavaProcessor.from_pretrained(folder),  # the stock class: only counts change
    prompt=llava.PROMPTS[0],
    eager_tokens=_llava_eager_tokens,
)

LLAVA_NEXT = Family(
    name="llava_next",
    make_processor=llava_next.make_processor,
    make_model=llava_next.make_model,
    inputs=lambda p, seed: p(text=llava_next.PROMPTS[:1], images=[_image(seed, (40, 70))], return_tensors="pt"),
    attach=hf_next.attach_anchor_former,
    host=hf_next.HOST,
    full={"connector": "select", "num_anchors": llava_next.NUM_PATCHES},
    reduced={"connector": "acformer", "num_anchors": 6, **CONNECTOR},
    reattach={"num_anchors": 4},
    reattach_bad=(
        {"connector": "perceiver", "num_queries": 6},
        r"connector must stay 'acformer' when re-attaching \(the model is already attached: "
        r"connector='acformer', num_anchors=6",
    ),
    bad=({"connector": "select", "num_anchors": 50}, r"num_anchors \+ num_context must be at most the 49 patch tokens"),
    tokens=_llava_tokens,
    tower=lambda m: m.model.vision_tower,
    projector=lambda m: m.model.multi_modal_projector,
    q_k_modules=(_LLAVA_TOWER,),
    stock_class=hf_next.LlavaNextForConditionalGeneration,
    attached_class=hf_next.AnchorFormerLlavaNextForConditionalGeneration,
    reload=lambda folder: hf_next.AnchorFormerLlavaNextForConditionalGeneration.from_pretrained(folder).eval(),
    reload_processor=lambda folder: hf_next.AnchorFormerLlavaNextProcessor.from_pretrained(folder),
    prompt=llava_next.PROMPTS[0],
)

ONEVISION = Family(
    name="onevision",
    make_processor=onevision.make_processor,
    make_model=onevision.make_model,
    inputs=lambda p, seed: p(text=[onevision.IMAGE_PROMPT], images=[_image(seed, (30, 90))], return_tensors="pt"),
    attach=hf_onevision.attach_anchor_former,
    host=hf_onevision.HOST,
    full={"connector": "select", "num_anchors": onevision.NUM_PATCHES},
    reduced={"connector": "acformer", "num_anchors": 6, **CONNECTOR},
    reattach={"num_anchors": 4},
    reattach_bad=(
        {"connector": "select", "num_anchors": 4},
        r"connector must stay 'acformer' when re-attaching \(the model is already attached: "
        r"connector='acformer', num_anchors=6, score='received'",
    ),
    bad=({"num_anchors": 4, "score": "cls"}, r"score='cls' needs a \[CLS\] token"),
    tokens=_llava_tokens,
    tower=lambda m: m.model.vision_tower,
    projector=lambda m: m.model.multi_modal_projector,
    q_k_modules=(_LLAVA_TOWER,),
    stock_class=hf_onevision.LlavaOnevisionForConditionalGeneration,
    attached_class=hf_onevision.AnchorFormerLlavaOnevisionForConditionalGeneration,
    reload=lambda folder: hf_onevision.AnchorFormerLlavaOnevisionForConditionalGeneration.from_pretrained(
        folder
    ).eval(),
    reload_processor=lambda folder: hf_onevision.AnchorFormerLlavaOnevisionProcessor.from_pretrained(folder),
    prompt=onevision.IMAGE_PROMPT,
)


def _qwen(name: str, family: str) -> Family:
    attached = {
        "qwen2_vl": hf_qwen.AnchorFormerQwen2VLForConditionalGeneration,
        "qwen2_5_vl": hf_qwen.AnchorFormerQwen2_5_VLForConditionalGeneration,
        "qwen3_vl": hf_qwen.AnchorFormerQwen3VLForConditionalGeneration,
    }[family]
    processor_class = {
        "qwen2_vl": hf_qwen.AnchorFormerQwen2VLProcessor,
        "qwen2_5_vl": hf_qwen.AnchorFormerQwen2_5_VLProcessor,
        "qwen3_vl": hf_qwen.AnchorFormerQwen3VLProcessor,
    }[family]
    return Family(
        name=name,
        make_processor=lambda: qwen.make_processor(family),
        make_model=lambda p: qwen.make_model(p, family),
        inputs=lambda p, seed: p(text=[qwen.PROMPTS[0]], images=[_image(seed, (48, 64))], return_tensors="pt"),
        attach=hf_qwen.attach_anchor_former,
        host=hf_qwen.HOST,
        full={"num_anchors": 1.0},
        reduced={"num_anchors": 0.5},
        reattach={"num_anchors": 3},
        reattach_bad=({"num_anchors": 3, "connector": "acformer"}, r"connector must be 'select' for Qwen-VL"),
        bad=({"num_anchors": 0}, r"num_anchors must be an int K >= 1 or a float in \(0, 1\], got 0"),
        tokens=_qwen_tokens,
        tower=lambda m: m.model.visual,
        projector=None,
        q_k_modules=(r".*visual.*attn\.qkv",),
        stock_class=qwen.FAMILIES[family][2],
        attached_class=attached,
        reload=lambda folder: attached.from_pretrained(folder).eval(),
        reload_processor=lambda folder: processor_class.from_pretrained(folder),
        prompt=qwen.PROMPTS[0],
        skip={"offload_projector": "Qwen-VL builds no connector (the merger is the projector)"},
    )


FAMILIES = [
    LLAVA,
    LLAVA_NEXT,
    ONEVISION,
    _qwen("qwen2", "qwen2_vl"),
    _qwen("qwen2_5", "qwen2_5_vl"),
    _qwen("qwen3", "qwen3_vl"),
]
