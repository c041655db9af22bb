"""HF transformers DINOv2 encoders: ``Dinov2Model`` and ``Dinov2WithRegistersModel``.

Token 0 is [CLS]; with registers the next ``config.num_register_tokens`` tokens are registers, so
``num_prefix_tokens = 1 + num_register_tokens`` (never anchors). The attention module differs between
transformers versions and is read by attributes: 5.x ``layer.attention.{q_proj, k_proj}`` with
``scaling``; 4.x ``layer.attention.attention.{query, key}`` (eager or SDPA subclass) scaled by
``attention_head_size ** -0.5``. The site is ``layer.attention`` in both; its queries and keys are
the outputs of those projection modules.
"""

from __future__ import annotations

from dataclasses import replace
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

__all__ = ["Dinov2Family"]

_PLAIN = "transformers.models.dinov2.modeling_dinov2"
_REGISTERS = "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers"


def _site(layer: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    attn = layer.attention
    if hasattr(attn, "q_proj"):  # transformers 5.x
        return hf_linear_site(attn, num_heads=attn.num_attention_heads, scale=attn.scaling)
    inner = attn.attention  # transformers 4.x: Dinov2SelfAttention / Dinov2SdpaSelfAttention
    site = hf_linear_site(
        inner, query="query", key="key", num_heads=inner.num_attention_heads, scale=inner.attention_head_size**-0.5
    )
    return replace(site, module=attn)  # the projections run inside the outer module's call


class Dinov2Family(EncoderFamily):
    name = "dinov2"
    description = "transformers Dinov2Model, Dinov2WithRegistersModel"

    def _classes(self) -> tuple[type, ...]:
        return loaded_classes(_PLAIN, ("Dinov2Model",)) + loaded_classes(_REGISTERS, ("Dinov2WithRegistersModel",))

    def matches(self, model: nn.Module) -> bool:
        classes = self._classes()
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        layer_classes = loaded_classes(_PLAIN, ("Dinov2Layer",)) + loaded_classes(
            _REGISTERS, ("Dinov2WithRegistersLayer",)
        )
        blocks = modules_of_type(model, layer_classes)
        config: Any = model.config
        patch = config.patch_size
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b) for b in blocks),
            num_prefix_tokens=1 + int(getattr(config, "num_register_tokens", 0)),
            has_cls=True,
            patch_size=int(patch if isinstance(patch, int) else patch[0]),
            num_channels=int(config.num_channels),
            run=lambda pixel_values: model(pixel_values=pixel_values),
        )


register_encoder_family(Dinov2Family())
