"""open_clip vision towers: ``VisionTransformer`` (the ``.visual`` of open_clip CLIP models) and
``TimmModel`` (open_clip's wrapper of a timm trunk, unwrapped to the trunk's own family).

``VisionTransformer``: blocks are ``transformer.resblocks`` of ``ResidualAttentionBlock`` (pre-norm
``ln_1`` -> ``torch.nn.MultiheadAttention`` with packed ``in_proj``, batch-first); token 0 is [CLS]
(``class_embedding``, always present). The probe hooks the ``nn.MultiheadAttention``, whose query input
is the ``ln_1`` output. ``nn.MultiheadAttention`` keeps its in-projection in a parameter applied inside
one fused call (no module outputs q or k), so these blocks use a
:class:`~anchor_former.probes.registry.PackedProjectionSite`, which reads that parameter and refuses an
offloaded or wrapped one. ``CustomResidualAttentionBlock`` (scaled-cosine / head-scale attention) is
refused. ``TimmModel``: the probe describes ``model.trunk`` (any supported timm family) and runs the
wrapper, so the head runs as usual.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    PackedProjectionSite,
    detect_encoder,
    loaded_classes,
    register_encoder_family,
)

__all__ = ["OpenClipTimmFamily", "OpenClipViTFamily"]

_TRANSFORMER = "open_clip.transformer"
_TIMM = "open_clip.timm_model"


class OpenClipViTFamily(EncoderFamily):
    name = "open_clip"
    description = "open_clip VisionTransformer (CLIP .visual) with ResidualAttentionBlocks"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_TRANSFORMER, ("VisionTransformer",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        vit: Any = model  # an open_clip module: its attributes are untyped
        blocks = tuple(vit.transformer.resblocks)
        block_cls = loaded_classes(_TRANSFORMER, ("ResidualAttentionBlock",))
        for i, b in enumerate(blocks):
            attn = getattr(b, "attn", None)
            if not (
                isinstance(b, block_cls)
                and isinstance(attn, nn.MultiheadAttention)
                and attn.batch_first
                and attn._qkv_same_embed_dim
            ):
                raise ValueError(
                    f"vision_model is an open_clip VisionTransformer whose block {i} is {type(b).__name__} with "
                    f"{type(attn).__name__} attention; supported: ResidualAttentionBlock with batch-first "
                    f"nn.MultiheadAttention (for other blocks use score='norm')"
                )
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(PackedProjectionSite(module=b.attn) for b in blocks),
            num_prefix_tokens=1,
            has_cls=True,
            patch_size=int(vit.patch_size[0]),
            num_channels=int(vit.conv1.in_channels),
            run=lambda pixel_values: model(pixel_values),
        )


class OpenClipTimmFamily(EncoderFamily):
    name = "open_clip_timm"
    description = "open_clip TimmModel (unwrapped to its timm trunk)"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_TIMM, ("TimmModel",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        trunk: Any = model.trunk  # an open_clip attribute: untyped
        spec = detect_encoder(trunk)
        return replace(spec, run=lambda pixel_values: model(pixel_values))


register_encoder_family(OpenClipViTFamily())
register_encoder_family(OpenClipTimmFamily())
