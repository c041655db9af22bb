"""timm ``VisionTransformer`` (and subclasses) with pre-norm ``Block`` s and the standard fused-qkv
``Attention`` (``fused_attn`` on or off; qk-norm supported).

Prefix tokens come from the model: ``num_prefix_tokens`` = [CLS] (``class_token``) + ``reg_tokens``
(+ a distillation token where a subclass adds one); token 0 is [CLS] when ``cls_token`` exists.
``score="map"`` uses the latent query of an ``AttentionPoolLatent`` head (``global_pool="map"``, e.g.
timm's SigLIP ViTs; the first latent when there are several). The forward run is ``model(pixel_values)``
(features and pooling head; the classifier, if any, is one linear layer).
"""

from __future__ import annotations

import torch
from torch import nn

from anchor_former.probes.base import (
    EncoderFamily,
    EncoderSpec,
    QueryKeySite,
    loaded_classes,
    positional_or_keyword,
    register_encoder_family,
)

__all__ = ["TimmViTFamily", "latent_pool_site"]

_MODULE = "timm.models.vision_transformer"
_ATTENTION = "timm.layers.attention"
_POOL = "timm.layers.attention_pool"


def _norm_or_none(m: nn.Module) -> nn.Module | None:
    return None if isinstance(m, nn.Identity) else m


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

    return QueryKeySite(
        module=attn,
        tokens=positional_or_keyword("x"),
        projections=projections,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scale=float(attn.scale),
        q_norm=_norm_or_none(attn.q_norm),
        k_norm=_norm_or_none(attn.k_norm),
    )


def latent_pool_site(pool: nn.Module) -> QueryKeySite:
    """The site of timm's ``AttentionPoolLatent``: its first latent query over the tokens it pools."""
    kv = pool.kv
    width = pool.num_heads * pool.head_dim

    def tokens(args, kwargs):
        x = positional_or_keyword("x")(args, kwargs)
        return x if pool.pos_embed is None else x + pool.pos_embed.unsqueeze(0).to(x.dtype)  # as the pool does

    def projections():
        if isinstance(pool.q, nn.Identity):  # the latent is the query itself
            w_q = torch.eye(width, device=kv.weight.device, dtype=kv.weight.dtype)
            b_q = None
        else:
            w_q, b_q = pool.q.weight, pool.q.bias
        bias = kv.bias
        return w_q, b_q, kv.weight[:width], None if bias is None else bias[:width]

    return QueryKeySite(
        module=pool,
        tokens=tokens,
        projections=projections,
        num_heads=pool.num_heads,
        head_dim=pool.head_dim,
        scale=float(pool.scale),
        query=lambda: pool.latent[0, 0],  # (latent_dim,)
        q_norm=_norm_or_none(pool.q_norm),
        k_norm=_norm_or_none(pool.k_norm),
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
        pool = getattr(model, "attn_pool", None)
        pool_classes = loaded_classes(_POOL, ("AttentionPoolLatent",))
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b) for b in blocks),
            num_prefix_tokens=int(model.num_prefix_tokens),
            has_cls=model.cls_token is not None,
            patch_size=int(patch_embed.patch_size[0]),
            num_channels=int(patch_embed.proj.in_channels),
            run=lambda pixel_values: model(pixel_values),
            # timm's own grid: dynamic_img_pad rounds up
            grid=lambda height, width: tuple(patch_embed.dynamic_feat_size((height, width))),
            pool_site=latent_pool_site(pool) if pool_classes and isinstance(pool, pool_classes) else None,
        )


register_encoder_family(TimmViTFamily())
