"""HF transformers DINOv3 ViTs: ``DINOv3ViTModel`` (rotary position embeddings, [CLS] + registers).

Pre-norm blocks (``DINOv3ViTLayer``: ``norm1`` -> ``attention``). The attention rotates queries and keys
of the PATCH tokens with the ``position_embeddings=(cos, sin)`` it is called with ([CLS] and registers
are not rotated); the probe applies the module's own ``apply_rotary_pos_emb`` to the ``q_proj`` /
``k_proj`` outputs it reads, with the same ``(cos, sin)``. Token 0 is [CLS], then
``config.num_register_tokens`` registers (never anchors).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import torch
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

__all__ = ["Dinov3Family"]

_MODULE = "transformers.models.dinov3_vit.modeling_dinov3_vit"


def _rotary(
    q: torch.Tensor, k: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
    # the function the module itself calls
    rotated: tuple[torch.Tensor, torch.Tensor] = sys.modules[_MODULE].apply_rotary_pos_emb(q, k, cos, sin)
    return rotated


def _site(layer: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    attn = layer.attention
    site = hf_linear_site(attn, num_heads=attn.num_heads, scale=attn.scaling)
    return replace(site, rotary=_rotary)


class Dinov3Family(EncoderFamily):
    name = "dinov3"
    description = "transformers DINOv3ViTModel (rotary, [CLS] + registers)"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("DINOv3ViTModel",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("DINOv3ViTLayer",)))
        config: Any = model.config
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b) for b in blocks),
            num_prefix_tokens=1 + int(config.num_register_tokens),
            has_cls=True,
            patch_size=int(config.patch_size),
            num_channels=int(config.num_channels),
            run=lambda pixel_values: model(pixel_values=pixel_values),
        )


register_encoder_family(Dinov3Family())
