"""timm ``Eva`` (EVA02, EVA-CLIP, Perception Encoder, DINOv3 in timm): pre-norm ``EvaBlock`` s with
``EvaAttention`` and rotary position embeddings.

The attention rotates the queries and keys of the patch tokens (not the ``num_prefix_tokens`` [CLS] /
register tokens) with the ``rope=`` tensor each block is called with, using timm's
``apply_rot_embed_cat`` (interleaved or ``rotate_half`` layout, as the module is configured); the probe
does the same to its explicitly computed keys. Fused ``qkv`` (with EVA's separate ``q_bias`` /
``k_bias``) and separate ``q_proj`` / ``k_proj`` are both read; per-head ``qk_norm`` is applied.
``score="map"`` uses an ``AttentionPoolLatent`` head (``global_pool="map"``, Perception Encoder).

Not read: an ``attn_mask`` passed to the forward (the scores ignore it), ``AttentionRope`` blocks
(``attn_type="rope"``) and post-norm blocks (``EvaBlockPostNorm``) — those are refused.
"""

from __future__ import annotations

import sys
from typing import Any

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
from anchor_former.probes.timm_vit import latent_pool_site

__all__ = ["EvaFamily"]

_MODULE = "timm.models.eva"
_POOL = "timm.layers.attention_pool"


def _norm_or_none(m: nn.Module) -> nn.Module | None:
    return None if isinstance(m, nn.Identity) else m


def _site(attn: nn.Module) -> QueryKeySite:
    width = attn.num_heads * attn.head_dim

    def projections():
        if attn.qkv is None:
            return attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias
        w = attn.qkv.weight
        return w[:width], attn.q_bias, w[width : 2 * width], attn.k_bias  # biases None without qkv_bias

    def rotary(q: torch.Tensor, k: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]):
        rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
        if rope is None:
            return q, k
        rotate = sys.modules[_MODULE].apply_rot_embed_cat  # the function the module itself calls
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        rope = rope.float()
        return tuple(
            torch.cat([t[:, :, :npt], rotate(t[:, :, npt:], rope, half=half)], dim=2) for t in (q, k)
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
        rotary=rotary,
    )


class EvaFamily(EncoderFamily):
    name = "timm_eva"
    description = "timm Eva (EVA02, EVA-CLIP, Perception Encoder, DINOv3) with pre-norm EvaBlocks and EvaAttention"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("Eva",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = tuple(model.blocks)
        block_cls = loaded_classes(_MODULE, ("EvaBlock",))
        attn_cls = loaded_classes(_MODULE, ("EvaAttention",))
        for i, b in enumerate(blocks):
            if not (isinstance(b, block_cls) and isinstance(b.attn, attn_cls)):
                raise ValueError(
                    f"vision_model is a timm Eva whose block {i} is {type(b).__name__} with "
                    f"{type(getattr(b, 'attn', None)).__name__} attention; supported: pre-norm "
                    f"timm.models.eva.EvaBlock with EvaAttention (for other blocks use score='norm' with "
                    f"anchor_former.probes.token_norm_scores on the layer's features)"
                )
        patch_embed = model.patch_embed
        pool = getattr(model, "attn_pool", None)
        pool_classes = loaded_classes(_POOL, ("AttentionPoolLatent",))
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b.attn) for b in blocks),
            num_prefix_tokens=int(model.num_prefix_tokens),
            has_cls=model.cls_token is not None,
            patch_size=int(patch_embed.patch_size[0]),
            num_channels=int(patch_embed.proj.in_channels),
            run=lambda pixel_values: model(pixel_values),
            # timm's own grid: dynamic_img_pad rounds up
            grid=lambda height, width: tuple(patch_embed.dynamic_feat_size((height, width))),
            pool_site=latent_pool_site(pool) if pool_classes and isinstance(pool, pool_classes) else None,
        )


register_encoder_family(EvaFamily())
