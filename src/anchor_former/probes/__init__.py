"""Attention probes: anchors from real ViTs without ``output_attentions`` (see ``docs/probes.md``).

Importing this package registers the built-in encoder families (``registered_families()`` lists them:
transformers CLIP and its clones, DINOv2, DINOv3, SigLIP, SigLIP2, InternViT, BLIP-2, AIMv2; timm
ViT and Eva; open_clip); none of them imports transformers, timm or open_clip.

Modules: :mod:`~anchor_former.probes.probe` (the hook object), :mod:`~anchor_former.probes.extract`
(one call from pixels to anchors), :mod:`~anchor_former.probes.scores` (the score math on tensors),
:mod:`~anchor_former.probes.spec` (what a probe knows about an encoder) and
:mod:`~anchor_former.probes.registry` (family lookup, and the extension API for adding a family).
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
from anchor_former.probes.extract import AnchorExtraction, extract_anchors
from anchor_former.probes.probe import AttentionProbe, ProbeCapture, Score
from anchor_former.probes.registry import detect_encoder, registered_families
from anchor_former.probes.scores import DEFAULT_BLOCK_SIZE, attention_row, received_attention, token_norm_scores
from anchor_former.probes.spec import EncoderSpec, InputLayout

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "AnchorExtraction",
    "AttentionProbe",
    "EncoderSpec",
    "InputLayout",
    "ProbeCapture",
    "Score",
    "attention_row",
    "detect_encoder",
    "extract_anchors",
    "received_attention",
    "registered_families",
    "token_norm_scores",
]
