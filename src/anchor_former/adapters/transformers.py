"""Adapter for transformers' multimodal models (transformers >= 5.0; tested with 5.25.0).

One entry point, :func:`attach_anchor_former`, detects the model family and switches the model (and its
processor) in place; each family's rules live in its own module under :mod:`anchor_former.adapters.hf`,
and every module exposes the same names (``attach_anchor_former``, ``register_auto_classes``):

* ``LlavaForConditionalGeneration`` (LLaVA-1.5): :mod:`anchor_former.adapters.hf.llava`;
* ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6, anyres): :mod:`anchor_former.adapters.hf.llava_next`;
* ``LlavaOnevisionForConditionalGeneration``: :mod:`anchor_former.adapters.hf.llava_onevision`;
* ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen3VLForConditionalGeneration`` (training-free only): :mod:`anchor_former.adapters.hf.qwen_vl`.

All of them run the same attach pipeline (:mod:`anchor_former.adapters._host`) and record the same
settings (:class:`~anchor_former.adapters.settings.AnchorSettings`, ``config.anchor_former``).
:func:`kept_tokens` gives the token indices an attached model keeps for given inputs.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch
from torch import nn

# registers transformers' checkpoint key-renaming rules for the attached LLaVA-1.5 classes (docs/transformers.md)
from anchor_former.adapters.hf import llava as _llava  # noqa: F401

__all__ = [
    "attach_anchor_former",
    "kept_tokens",
    "register_auto_classes",
    "supported_models",
]


def _families() -> tuple[tuple[tuple[type, ...], ModuleType], ...]:
    """``(stock model classes, family module)``, most specific first."""
    from anchor_former.adapters.hf import llava, llava_next, llava_onevision, qwen_vl

    return tuple((tuple(module.HOST.classes), module) for module in (llava_next, llava_onevision, qwen_vl, llava))


def supported_models() -> tuple[str, ...]:
    """Names of the transformers model classes :func:`attach_anchor_former` accepts."""
    return tuple(cls.__name__ for classes, _ in _families() for cls in classes)


def attach_anchor_former(model: nn.Module, processor: Any = None, **kwargs: Any) -> nn.Module:
    """Switch a transformers multimodal model (and its processor) in place; returns ``model``.

    Detects the family by class and calls its ``attach_anchor_former`` with the same arguments:

    * LLaVA-1.5 :func:`anchor_former.adapters.hf.llava.attach_anchor_former` (``num_anchors``,
      ``connector`` = ``"acformer"`` | ``"select"`` | any :func:`~anchor_former.build_connector` name,
      ``score``, ``init_projector``, ``num_context``, connector arguments);
    * LLaVA-NeXT :func:`anchor_former.adapters.hf.llava_next.attach_anchor_former` (the same, per view,
      plus ``image_budget``); OneVision :func:`anchor_former.adapters.hf.llava_onevision.attach_anchor_former`
      (plus ``frame_anchors``);
    * Qwen2-VL / Qwen2.5-VL / Qwen3-VL :func:`anchor_former.adapters.hf.qwen_vl.attach_anchor_former`
      (``num_anchors`` per image as a count or a fraction; ``connector="select"``, ``score="received"``).

    Raises:
        ValueError: a model of no supported family (the message lists them), or whatever the family's
            function raises for its arguments; the model, its config and the processor are unchanged then.
    """
    families = _families()
    for classes, module in families:
        if isinstance(model, classes):
            return module.attach_anchor_former(model, processor, **kwargs)
    names = ", ".join(cls.__name__ for classes, _ in families for cls in classes)
    raise ValueError(
        f"model must be one of the supported transformers models ({names}), got "
        f"{type(model).__module__}.{type(model).__qualname__}; for the original LLaVA code use "
        "anchor_former.adapters.llava.attach_anchor_former"
    )


def register_auto_classes() -> None:
    """Register every family's attached classes with the Auto classes (``AutoConfig``, ``AutoModel``,
    ``AutoModelForImageTextToText``, ``AutoProcessor`` where the family switches its processor class);
    idempotent. Then ``AutoModelForImageTextToText.from_pretrained(folder)``,
    ``AutoProcessor.from_pretrained(folder)`` and ``pipeline("image-text-to-text", model=folder)`` load a
    saved attached model."""
    for _, module in _families():
        module.register_auto_classes()


def kept_tokens(model: nn.Module, **inputs: Any) -> tuple[torch.Tensor, ...]:
    """The visual tokens an attached model keeps for ``inputs``, per image (no side channel: one vision
    forward of this call, thread-safe like the model's own forward).

    Args:
        model: an attached transformers model.
        **inputs: the processor's output for the call (``pixel_values`` and, per family, ``image_sizes`` /
            ``image_grid_thw``; text entries are ignored).

    Returns:
        Per image, ascending indices (``get_image_features(...).kept_indices``):

        * LLaVA-1.5 (anchor connectors): ``(K,)`` or ``(K + 1,)`` indices among the vision tower's tokens,
          [CLS] = 0 first when it is kept, patch ``(r, c)`` = ``num_prefix_tokens + r * side + c``; draw them
          with ``anchor_former.viz.plot_anchors(idx, grid_size=(side, side))``;
        * LLaVA-NeXT / OneVision (trained anchor connectors): ``(V, K)`` per view;
        * Qwen-VL: ``(T,)`` indices among the image's merged tokens (raster order of the ``h/2 x w/2`` grid,
          then time): ``plot_anchors(idx, grid_size=(h // 2, w // 2), num_prefix_tokens=0)`` for an image
          whose ``image_grid_thw`` row is ``(1, h, w)``.

    Raises:
        ValueError: the model is not attached, or its connector keeps no tokens of its own choosing
            (pooling, resamplers without anchors, LLaVA-NeXT / OneVision ``"select"`` whose per-view layout
            the logits already show).
    """
    inner = getattr(model, "model", None)
    features = getattr(inner, "get_image_features", None)
    if features is None or getattr(getattr(model, "config", None), "anchor_former", None) is None:
        raise ValueError(f"model must be attached with attach_anchor_former, got {type(model).__qualname__}")
    accepted = set(inspect.signature(features).parameters) - {"kwargs"}
    with torch.no_grad():
        out = features(**{k: v for k, v in inputs.items() if k in accepted}, return_dict=True)
    kept = getattr(out, "kept_indices", None)
    if kept is None:
        config: Any = model.config
        raise ValueError(
            f"the attached connector {config.anchor_former['connector']!r} of {type(model).__name__} reports no "
            "kept token indices (it keeps no tokens of its own choosing, or lays them out per view)"
        )
    return tuple(kept)
