"""Attention probes: anchors from real ViTs without ``output_attentions`` (see ``docs/probes.md``).

Importing this package registers the built-in encoder families (``registered_families()`` lists them:
transformers CLIP and its clones, DINOv2, DINOv3, SigLIP, SigLIP2, InternViT, BLIP-2, AIMv2; timm
ViT and Eva; open_clip); none of them imports transformers, timm or open_clip.
"""

from __future__ import annotations

from anchor_former.probes import (  # noqa: F401  (register the families)
    aimv2,
    blip2,
    clip,
    clip_clones,
    dinov2,
    dinov3,
    eva,
    internvit,
    openclip,
    siglip,
    siglip2,
    timm_vit,
)
from anchor_former.probes.base import (
    AttentionProbe,
    EncoderFamily,
    EncoderSpec,
    InputLayout,
    ProbeCapture,
    QueryKeySite,
    Score,
    cls_attention_probe,
    detect_encoder,
    hf_linear_site,
    loaded_classes,
    modules_of_type,
    positional_or_keyword,
    query_attention_row,
    query_key_states,
    register_encoder_family,
    registered_families,
    site_received_attention,
)
from anchor_former.probes.extract import AnchorExtraction, extract_anchors
from anchor_former.probes.scores import DEFAULT_BLOCK_SIZE, received_attention, token_norm_scores

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "AnchorExtraction",
    "AttentionProbe",
    "EncoderFamily",
    "EncoderSpec",
    "InputLayout",
    "ProbeCapture",
    "QueryKeySite",
    "Score",
    "cls_attention_probe",
    "detect_encoder",
    "extract_anchors",
    "hf_linear_site",
    "loaded_classes",
    "modules_of_type",
    "positional_or_keyword",
    "query_attention_row",
    "query_key_states",
    "received_attention",
    "register_encoder_family",
    "registered_families",
    "site_received_attention",
    "token_norm_scores",
]
