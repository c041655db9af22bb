"""Attention probes: anchors from real ViTs without ``output_attentions`` (see ``docs/probes.md``).

Importing this package registers the built-in encoder families (``registered_families()`` lists them:
transformers CLIP and its clones, DINOv2, DINOv3, SigLIP, SigLIP2, InternViT, BLIP-2, AIMv2; timm
ViT and Eva; open_clip); none of them imports transformers, timm or open_clip.

The public names are below; :mod:`anchor_former.probes.registry` is the extension API for adding an
encoder family (everything else in this package is internal: the hook object, the score math, one module
per built-in family).
"""

from __future__ import annotations

from anchor_former.probes import (  # noqa: F401  (register the families)
    _aimv2,
    _blip2,
    _clip,
    _clip_clones,
    _dinov2,
    _dinov3,
    _eva,
    _internvit,
    _openclip,
    _siglip,
    _siglip2,
    _timm_vit,
)
from anchor_former.probes._extract import AnchorExtraction, extract_anchors
from anchor_former.probes._probe import AttentionProbe, ProbeCapture, Score
from anchor_former.probes._scores import DEFAULT_BLOCK_SIZE, attention_row, received_attention, token_norm_scores
from anchor_former.probes._spec import EncoderSpec
from anchor_former.probes.registry import detect_encoder, registered_families

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "AnchorExtraction",
    "AttentionProbe",
    "EncoderSpec",
    "ProbeCapture",
    "Score",
    "attention_row",
    "detect_encoder",
    "extract_anchors",
    "received_attention",
    "registered_families",
    "token_norm_scores",
]
