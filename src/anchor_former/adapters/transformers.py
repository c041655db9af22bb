"""Adapter for transformers' multimodal models (transformers >= 5.0; tested with 5.24.0).

One entry point, :func:`attach_anchor_former`, detects the model family and switches the model (and its
processor) in place; each family's rules live in its own module under :mod:`anchor_former.adapters.hf`:

* ``LlavaForConditionalGeneration`` (LLaVA-1.5): :mod:`anchor_former.adapters.hf.llava`.

The LLaVA-1.5 classes are re-exported here, so ``from anchor_former.adapters.transformers import
AnchorFormerLlavaForConditionalGeneration`` keeps working.
"""

from __future__ import annotations

from anchor_former.adapters.hf.llava import (
    AnchorFormerLlavaConfig,
    AnchorFormerLlavaForConditionalGeneration,
    AnchorFormerLlavaModel,
    attach_anchor_former,
    register_auto_classes,
)

__all__ = [
    "AnchorFormerLlavaConfig",
    "AnchorFormerLlavaForConditionalGeneration",
    "AnchorFormerLlavaModel",
    "attach_anchor_former",
    "register_auto_classes",
]
