"""HF transformers InternViT: ``InternVLVisionModel`` (the vision tower of InternVL 2.5 / 3).

Pre-norm blocks (``InternVLVisionLayer``: ``layernorm_before`` -> ``attention``) with layer scale; token 0
is [CLS], no registers. The attention has separate ``q_proj`` / ``k_proj`` and, with
``config.use_qk_norm`` (InternViT-6B), RMS norms over ALL heads' features together (``(B, N, H * E)``),
applied before the heads are split — the probe computes its keys explicitly then.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from anchor_former.probes.base import (
    EncoderFamily,
    EncoderSpec,
    QueryKeySite,
    hf_linear_site,
    loaded_classes,
    modules_of_type,
    register_encoder_family,
)

__all__ = ["InternViTFamily"]

_MODULE = "transformers.models.internvl.modeling_internvl"


def _norm_or_none(m: nn.Module) -> nn.Module | None:
    return None if isinstance(m, nn.Identity) else m


def _site(layer: nn.Module) -> QueryKeySite:
    attn = layer.attention
    site = hf_linear_site(attn, attn.q_proj, attn.k_proj, num_heads=attn.num_heads, scale=attn.scale)
    return replace(site, q_norm=_norm_or_none(attn.q_norm), k_norm=_norm_or_none(attn.k_norm), norm_over_heads=True)


def _square(value, name: str) -> int:
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
        config = model.config
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
