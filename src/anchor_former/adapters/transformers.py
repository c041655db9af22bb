"""Adapter for transformers' multimodal models (transformers >= 5.0; tested with 5.24.0).

One entry point, :func:`attach_anchor_former`, detects the model family and switches the model (and its
processor) in place; each family's rules live in its own module under :mod:`anchor_former.adapters.hf`:

* ``LlavaForConditionalGeneration`` (LLaVA-1.5): :mod:`anchor_former.adapters.hf.llava`;
* ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6, anyres): :mod:`anchor_former.adapters.hf.llava_next`;
* ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen3VLForConditionalGeneration`` (training-free only):
  :mod:`anchor_former.adapters.hf.qwen_vl`.

The LLaVA-1.5 classes are re-exported here, so ``from anchor_former.adapters.transformers import
AnchorFormerLlavaForConditionalGeneration`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from anchor_former.adapters.hf.llava import (
    AnchorFormerLlavaConfig,
    AnchorFormerLlavaForConditionalGeneration,
    AnchorFormerLlavaModel,
    register_auto_classes,
)

__all__ = [
    "AnchorFormerLlavaConfig",
    "AnchorFormerLlavaForConditionalGeneration",
    "AnchorFormerLlavaModel",
    "attach_anchor_former",
    "register_auto_classes",
    "supported_models",
]


def _families() -> tuple[tuple[tuple[type, ...], Callable[..., nn.Module]], ...]:
    """``(model classes, attach function)`` per family, most specific first."""
    from transformers import (
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    from anchor_former.adapters.hf import llava, llava_next, llava_onevision, qwen_vl

    return (
        ((LlavaNextForConditionalGeneration,), llava_next.attach_llava_next),
        ((LlavaOnevisionForConditionalGeneration,), llava_onevision.attach_llava_onevision),
        ((Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration),
         qwen_vl.attach_anchor_former_qwen),
        ((llava.LlavaForConditionalGeneration,), llava.attach_anchor_former),
    )


def supported_models() -> tuple[str, ...]:
    """Names of the transformers model classes :func:`attach_anchor_former` accepts."""
    return tuple(cls.__name__ for classes, _ in _families() for cls in classes)


def attach_anchor_former(model: nn.Module, processor: Any = None, **kwargs: Any) -> nn.Module:
    """Switch a transformers multimodal model (and its processor) in place; returns ``model``.

    Detects the family by class and calls its attach function with the same arguments:

    * LLaVA-1.5 :func:`anchor_former.adapters.hf.llava.attach_anchor_former` (``num_anchors``,
      ``connector`` = ``"acformer"`` | ``"select"`` | any :func:`~anchor_former.build_connector` name,
      ``score``, ``init_projector``, ``num_context``, connector arguments);
    * LLaVA-NeXT :func:`anchor_former.adapters.hf.llava_next.attach_llava_next` (the same, per view, plus
      ``image_budget``);
    * Qwen2-VL / Qwen2.5-VL / Qwen3-VL :func:`anchor_former.adapters.hf.qwen_vl.attach_anchor_former_qwen`
      (``num_anchors`` per image as a count or a fraction; ``connector="select"``, ``score="received"``).

    Raises:
        ValueError: a model of no supported family (the message lists them), or whatever the family's
            function raises for its arguments; the model and the processor are unchanged then.
    """
    families = _families()
    for classes, attach in families:
        if isinstance(model, classes):
            return attach(model, processor, **kwargs)
    names = ", ".join(cls.__name__ for classes, _ in families for cls in classes)
    raise ValueError(
        f"model must be one of the supported transformers models ({names}), got "
        f"{type(model).__module__}.{type(model).__qualname__}; for the original LLaVA code use "
        "anchor_former.adapters.llava.attach_anchor_former"
    )
