"""timm ``Eva`` (EVA02, EVA-CLIP, Perception Encoder, DINOv3 in timm): pre-norm ``EvaBlock`` s with
``EvaAttention`` and rotary position embeddings.

The attention rotates the queries and keys of the patch tokens (not the ``num_prefix_tokens`` [CLS] /
register tokens) with the ``rope=`` tensor each block is called with, using timm's
``apply_rot_embed_cat`` (interleaved or ``rotate_half`` layout, as the module is configured); the probe
does the same to the outputs of ``q_norm`` / ``k_norm`` it reads (the final queries and keys before the
rotation, whether fused ``qkv`` with EVA's separate ``q_bias`` / ``k_bias`` or separate ``q_proj`` /
``k_proj`` made them).
``score="map"`` uses an ``AttentionPoolLatent`` head (``global_pool="map"``, Perception Encoder).

Not read: an ``attn_mask`` passed to the forward (the scores ignore it), ``AttentionRope`` blocks
(``attn_type="rope"``) and post-norm blocks (``EvaBlockPostNorm``) — those are refused.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from anchor_former.probes._timm_vit import latent_pool_site, normed_query_key_site
from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    QueryKeySite,
    loaded_classes,
    register_encoder_family,
)

__all__ = ["EvaFamily"]

_MODULE = "timm.models.eva"
_POOL = "timm.layers.attention_pool"


def _site(attn: Any) -> QueryKeySite:  # a timm module: its attributes are untyped
    def rotary(
        q: torch.Tensor, k: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
        if rope is None:
            return q, k
        rotate = sys.modules[_MODULE].apply_rot_embed_cat  # the function the module itself calls
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        # as EvaAttention.forward: prefix tokens unrotated, back to the tokens' dtype
        q, k = (torch.cat([t[:, :, :npt], rotate(t[:, :, npt:], rope, half=half)], dim=2).type_as(t) for t in (q, k))
        return q, k

    return replace(normed_query_key_site(attn), rotary=rotary)


class EvaFamily(EncoderFamily):
    name = "timm_eva"
    description = "timm Eva (EVA02, EVA-CLIP, Perception Encoder, DINOv3) with pre-norm EvaBlocks and EvaAttention"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("Eva",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        vit: Any = model  # a timm module: its attributes are untyped
        blocks = tuple(vit.blocks)
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
        patch_embed = vit.patch_embed
        pool = getattr(model, "attn_pool", None)
        pool_classes = loaded_classes(_POOL, ("AttentionPoolLatent",))
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b.attn) for b in blocks),
            num_prefix_tokens=int(vit.num_prefix_tokens),
            has_cls=vit.cls_token is not None,
            patch_size=int(patch_embed.patch_size[0]),
            num_channels=int(patch_embed.proj.in_channels),
            run=lambda pixel_values: model(pixel_values),
            # timm's own grid: dynamic_img_pad rounds up
            grid=lambda height, width: tuple(patch_embed.dynamic_feat_size((height, width))),
            pool_site=latent_pool_site(pool) if pool_classes and isinstance(pool, pool_classes) else None,
        )


register_encoder_family(EvaFamily())
