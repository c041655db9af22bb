"""timm ``VisionTransformer`` (and subclasses) with pre-norm ``Block`` s and the standard fused-qkv
``Attention`` (``fused_attn`` on or off; qk-norm supported).

Prefix tokens come from the model: ``num_prefix_tokens`` = [CLS] (``class_token``) + ``reg_tokens``
(+ a distillation token where a subclass adds one); token 0 is [CLS] when ``cls_token`` exists.
The forward run is ``model.forward_features`` (no classifier head needed).
"""

from __future__ import annotations

from torch import nn

from anchor_former.probes.base import (
    EncoderFamily,
    EncoderSpec,
    QueryKeySite,
    loaded_classes,
    positional_or_keyword,
    register_encoder_family,
)

__all__ = ["TimmViTFamily"]

_MODULE = "timm.models.vision_transformer"
_ATTENTION = "timm.layers.attention"


def _site(block: nn.Module) -> QueryKeySite:
    attn = block.attn
    qkv = attn.qkv
    width = attn.num_heads * attn.head_dim

    def projections():
        bias = qkv.bias
        return (
            qkv.weight[:width],
            None if bias is None else bias[:width],
            qkv.weight[width : 2 * width],
            None if bias is None else bias[width : 2 * width],
        )

    def norm_or_none(m: nn.Module) -> nn.Module | None:
        return None if isinstance(m, nn.Identity) else m

    return QueryKeySite(
        module=attn,
        tokens=positional_or_keyword("x"),
        projections=projections,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scale=float(attn.scale),
        q_norm=norm_or_none(attn.q_norm),
        k_norm=norm_or_none(attn.k_norm),
    )


class TimmViTFamily(EncoderFamily):
    name = "timm_vit"
    description = "timm VisionTransformer with pre-norm Blocks and fused-qkv Attention"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("VisionTransformer",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = tuple(model.blocks)
        block_cls = loaded_classes(_MODULE, ("Block",))
        attn_cls = loaded_classes(_ATTENTION, ("Attention",))
        for i, b in enumerate(blocks):
            if not (isinstance(b, block_cls) and isinstance(b.attn, attn_cls)):
                raise ValueError(
                    f"vision_model is a timm VisionTransformer whose block {i} is {type(b).__name__} with "
                    f"{type(getattr(b, 'attn', None)).__name__} attention; supported: pre-norm "
                    f"timm.models.vision_transformer.Block with timm.layers.Attention"
                )
        patch_embed = model.patch_embed
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b) for b in blocks),
            num_prefix_tokens=int(model.num_prefix_tokens),
            has_cls=model.cls_token is not None,
            patch_size=int(patch_embed.patch_size[0]),
            num_channels=int(patch_embed.proj.in_channels),
            run=model.forward_features,
        )


register_encoder_family(TimmViTFamily())
