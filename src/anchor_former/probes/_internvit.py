"""HF transformers InternViT: ``InternVLVisionModel`` (the vision tower of InternVL 2.5 / 3).

Pre-norm blocks (``InternVLVisionLayer``: ``layernorm_before`` -> ``attention``) with layer scale; token 0
is [CLS], no registers. The attention has separate ``q_proj`` / ``k_proj`` and, with
``config.use_qk_norm`` (InternViT-6B), RMS norms over ALL heads' features together (``(B, N, H * E)``),
applied before the heads are split (an ``nn.Identity`` without qk-norm): the probe reads the outputs of
``q_norm`` / ``k_norm``, which is where the queries and keys are final in both cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    Projection,
    QueryKeySite,
    loaded_classes,
    modules_of_type,
    register_encoder_family,
    split_heads,
    submodule,
)

__all__ = ["InternViTFamily"]

_MODULE = "transformers.models.internvl.modeling_internvl"


def _site(layer: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    attn = layer.attention
    heads = split_heads(attn.num_heads)  # the norms see (B, N, H * E)
    return QueryKeySite(
        module=attn,
        query=Projection(submodule(attn, "q_norm"), heads),
        key=Projection(submodule(attn, "k_norm"), heads),
        scale=float(attn.scale),
    )


def _square(value: int | Sequence[int], name: str) -> int:
    sizes = (value, value) if isinstance(value, int) else tuple(value)
    if sizes[0] != sizes[1]:
        raise ValueError(f"vision_model.config.{name} must be square for the probe's patch grid, got {value}")
    return int(sizes[0])


class InternViTFamily(EncoderFamily):
    name = "internvit"
    description = "transformers InternVLVisionModel (InternViT, with or without qk-norm)"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("InternVLVisionModel",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("InternVLVisionLayer",)))
        config: Any = model.config
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b) for b in blocks),
            num_prefix_tokens=1,
            has_cls=True,
            patch_size=_square(config.patch_size, "patch_size"),
            num_channels=int(config.num_channels),
            run=lambda pixel_values: model(pixel_values=pixel_values),
        )


register_encoder_family(InternViTFamily())
