"""timm ``VisionTransformer`` (and subclasses) with pre-norm ``Block`` s and the standard fused-qkv
``Attention`` (``fused_attn`` on or off; qk-norm supported).

Prefix tokens come from the model: ``num_prefix_tokens`` = [CLS] (``class_token``) + ``reg_tokens``
(+ a distillation token where a subclass adds one); token 0 is [CLS] when ``cls_token`` exists.
``score="map"`` uses the latent query of an ``AttentionPoolLatent`` head (``global_pool="map"``, e.g.
timm's SigLIP ViTs; the first latent when there are several). The forward run is ``model(pixel_values)``
(features and pooling head; the classifier, if any, is one linear layer).

Queries and keys are read from the outputs of the attention's ``q_norm`` / ``k_norm`` (``(B, H, N, E)``;
an ``nn.Identity`` without qk-norm, still called): the final queries and keys, however ``qkv`` computed
them (fused or separate, quantized or LoRA-wrapped).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    Projection,
    QueryKeySite,
    loaded_classes,
    register_encoder_family,
    submodule,
)

__all__ = ["TimmViTFamily", "latent_pool_site", "normed_query_key_site"]

_MODULE = "timm.models.vision_transformer"
_ATTENTION = "timm.layers.attention"
_POOL = "timm.layers.attention_pool"


def normed_query_key_site(attn: nn.Module) -> QueryKeySite:
    """A timm attention (``Attention``, ``EvaAttention``, ``AttentionPoolLatent``) read at the outputs of its
    ``q_norm`` / ``k_norm``, ``(B, H, N, E)`` (``(B, H, L, E)`` latent queries for the pool: row 0 is the
    first latent)."""
    scale: Any = attn.scale  # a timm attribute: untyped
    return QueryKeySite(
        module=attn,
        query=Projection(submodule(attn, "q_norm")),
        key=Projection(submodule(attn, "k_norm")),
        scale=float(scale),
    )


def latent_pool_site(pool: nn.Module) -> QueryKeySite:
    """The site of timm's ``AttentionPoolLatent``: its first latent query over the tokens it pools."""
    return normed_query_key_site(pool)


class TimmViTFamily(EncoderFamily):
    name = "timm_vit"
    description = "timm VisionTransformer with pre-norm Blocks and fused-qkv Attention"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("VisionTransformer",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        vit: Any = model  # a timm module: its attributes are untyped
        blocks = tuple(vit.blocks)
        block_cls = loaded_classes(_MODULE, ("Block",))
        attn_cls = loaded_classes(_ATTENTION, ("Attention",))
        for i, b in enumerate(blocks):
            if not (isinstance(b, block_cls) and isinstance(b.attn, attn_cls)):
                raise ValueError(
                    f"vision_model is a timm VisionTransformer whose block {i} is {type(b).__name__} with "
                    f"{type(getattr(b, 'attn', None)).__name__} attention; supported: pre-norm "
                    f"timm.models.vision_transformer.Block with timm.layers.Attention"
                )
        patch_embed = vit.patch_embed
        pool = getattr(model, "attn_pool", None)
        pool_classes = loaded_classes(_POOL, ("AttentionPoolLatent",))
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(normed_query_key_site(b.attn) for b in blocks),
            num_prefix_tokens=int(vit.num_prefix_tokens),
            has_cls=vit.cls_token is not None,
            patch_size=int(patch_embed.patch_size[0]),
            num_channels=int(patch_embed.proj.in_channels),
            run=lambda pixel_values: model(pixel_values),
            # timm's own grid: dynamic_img_pad rounds up
            grid=lambda height, width: tuple(patch_embed.dynamic_feat_size((height, width))),
            pool_site=latent_pool_site(pool) if pool_classes and isinstance(pool, pool_classes) else None,
        )


register_encoder_family(TimmViTFamily())
