"""HF transformers BLIP-2 vision tower: ``Blip2VisionModel`` (EVA ViT-g layout).

Pre-norm layers (``Blip2EncoderLayer``: ``layer_norm1`` -> ``self_attn``); the attention has one fused
``qkv`` linear whose bias is ``[q_bias, 0, v_bias]`` (or none); token 0 is [CLS], no registers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    Projection,
    QueryKeySite,
    fused_heads,
    loaded_classes,
    modules_of_type,
    register_encoder_family,
    submodule,
)

__all__ = ["Blip2Family"]

_MODULE = "transformers.models.blip_2.modeling_blip_2"


def _site(attn: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    qkv = submodule(attn, "qkv")  # output (B, N, 3 * H * E): q, k, v
    return QueryKeySite(
        module=attn,
        query=Projection(qkv, fused_heads(0, attn.num_heads)),
        key=Projection(qkv, fused_heads(1, attn.num_heads)),
        scale=float(attn.scale),
    )


class Blip2Family(EncoderFamily):
    name = "blip2"
    description = "transformers Blip2VisionModel"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("Blip2VisionModel",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("Blip2EncoderLayer",)))
        config: Any = model.config
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b.self_attn) for b in blocks),
            num_prefix_tokens=1,
            has_cls=True,
            patch_size=int(config.patch_size),
            num_channels=3,  # Blip2VisionEmbeddings' patch conv is built with 3 input channels
            run=lambda pixel_values: model(pixel_values=pixel_values),
        )


register_encoder_family(Blip2Family())
