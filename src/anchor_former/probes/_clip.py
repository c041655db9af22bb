"""HF transformers CLIP vision encoders: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
``CLIPVisionTransformer`` (transformers 4.x).

Both layouts are found by type, not by path: ``model.vision_model.encoder.layers`` (transformers 4.x and
5.0-5.5) and ``model.encoder.layers`` (5.6+). Token 0 is [CLS]; no registers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    QueryKeySite,
    hf_linear_site,
    loaded_classes,
    modules_of_type,
    register_encoder_family,
)

__all__ = ["CLIPFamily"]

_MODULE = "transformers.models.clip.modeling_clip"


def _site(block: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    attn = block.self_attn
    return hf_linear_site(attn, num_heads=attn.num_heads, scale=attn.scale)


class CLIPFamily(EncoderFamily):
    name = "clip"
    description = "transformers CLIPVisionModel, CLIPVisionModelWithProjection, CLIPVisionTransformer"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPVisionTransformer"))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("CLIPEncoderLayer",)))
        sites = tuple(_site(b) for b in blocks)
        config: Any = model.config
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=sites,
            num_prefix_tokens=1,
            has_cls=True,
            patch_size=int(config.patch_size),
            num_channels=int(config.num_channels),
            run=lambda pixel_values: model(pixel_values=pixel_values),
        )


register_encoder_family(CLIPFamily())
