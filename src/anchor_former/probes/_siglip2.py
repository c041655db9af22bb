"""HF transformers SigLIP2 (NaFlex) vision encoders: ``Siglip2VisionModel`` and ``Siglip2VisionTransformer``.

NaFlex feeds each image at its own aspect ratio: ``pixel_values (B, N, C * P * P)`` are patch rows, the
first ``rows * cols`` of image b real (``spatial_shapes[b] = (rows, cols)``, row-major) and the rest
padding (``pixel_attention_mask[b] = 0``). There is no [CLS] token: the scores are ``"received"``
(padding tokens excluded as keys and as queries), ``"map"`` (the pooling head's probe row, padding
masked) and ``"norm"``.

The padding mask of a layer is read from the ``attention_mask`` its attention module is called with,
in whichever form the attention implementation got it: ``None`` (no padding), a bool ``(B, 1, N, N)``
(True = attend, SDPA/flex), an additive float ``(B, 1, N, N)`` (eager) or the 2-D ``(B, N)`` mask
(flash). Its first query row is a real token's, and with key padding only every row is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from anchor_former._validation import check_floating, check_ndim, shape_str
from anchor_former.probes._siglip import pooling_head_site
from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    InputLayout,
    QueryKeySite,
    hf_linear_site,
    loaded_classes,
    modules_of_type,
    register_encoder_family,
)

__all__ = ["Siglip2Family", "padding_from_attention_mask"]

_MODULE = "transformers.models.siglip2.modeling_siglip2"


def padding_from_attention_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, N)`` bool padding (True = padding key) from the mask an HF attention module is called with.

    Args:
        mask: None; ``(B, N)`` 1/0 or bool (1 = real token); ``(B, 1, N_q, N)`` bool (True = attend); or
            ``(B, 1, N_q, N)`` additive float (large negative = masked).
    """
    if mask is None:
        return None
    if mask.ndim == 2:
        return mask == 0
    row = mask[:, 0, 0, :]  # (B, N): the keys query 0 may attend to
    if row.dtype == torch.bool:
        return ~row
    return row < torch.finfo(row.dtype).min / 2


def _layer_padding(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return padding_from_attention_mask(mask)


def _layout(num_channels: int, patch: int) -> Callable[[torch.Tensor, dict[str, Any]], InputLayout]:
    width = num_channels * patch * patch

    def layout(pixel_values: torch.Tensor, inputs: dict[str, Any]) -> InputLayout:
        check_ndim("pixel_values", pixel_values, (3,), f"(B, N, {width}) (NaFlex patch rows)")
        check_floating("pixel_values", pixel_values)
        batch, num = pixel_values.shape[:2]
        if pixel_values.shape[2] != width:
            raise ValueError(
                f"pixel_values must have shape (B, N, {width}) (NaFlex patch rows of {num_channels} x {patch} x "
                f"{patch}), got shape {shape_str(pixel_values)}"
            )
        if set(inputs) != {"pixel_attention_mask", "spatial_shapes"}:
            raise ValueError(
                f"inputs must hold exactly pixel_attention_mask (B, N) and spatial_shapes (B, 2) for a SigLIP2 "
                f"encoder (as its processor returns them), got keys {sorted(inputs)}"
            )
        mask, shapes = inputs["pixel_attention_mask"], inputs["spatial_shapes"]
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, num):
            raise ValueError(
                f"inputs['pixel_attention_mask'] must have shape ({batch}, {num}) (B, N), got "
                f"{shape_str(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        if not isinstance(shapes, torch.Tensor) or tuple(shapes.shape) != (batch, 2):
            raise ValueError(
                f"inputs['spatial_shapes'] must have shape ({batch}, 2) (B, (rows, cols)), got "
                f"{shape_str(shapes) if isinstance(shapes, torch.Tensor) else type(shapes).__name__}"
            )
        grids = tuple((int(r), int(c)) for r, c in shapes.tolist())
        real = mask.ne(0).sum(-1).tolist()
        for b, ((rows, cols), n) in enumerate(zip(grids, real, strict=True)):
            if rows * cols != n:
                raise ValueError(
                    f"inputs['spatial_shapes'][{b}] = ({rows}, {cols}) must cover the {n} real patches that "
                    f"inputs['pixel_attention_mask'][{b}] marks, got {rows * cols}"
                )
        return InputLayout(grid_sizes=grids, padding=mask == 0)

    return layout


def _site(block: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    attn = block.self_attn
    return hf_linear_site(attn, num_heads=attn.num_heads, scale=attn.scale)


class Siglip2Family(EncoderFamily):
    name = "siglip2"
    description = "transformers Siglip2VisionModel, Siglip2VisionTransformer (NaFlex, no [CLS])"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("Siglip2VisionModel", "Siglip2VisionTransformer"))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("Siglip2EncoderLayer",)))
        heads = modules_of_type(model, loaded_classes(_MODULE, ("Siglip2MultiheadAttentionPoolingHead",)))
        config: Any = model.config
        sites = tuple(replace(_site(b), padding_mask=_layer_padding) for b in blocks)
        pool_site = pooling_head_site(heads[0]) if heads else None

        def run(pixel_values: torch.Tensor, **inputs: Any) -> Any:
            return model(pixel_values=pixel_values, **inputs)

        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=sites,
            num_prefix_tokens=0,
            has_cls=False,
            patch_size=int(config.patch_size),
            num_channels=int(config.num_channels),
            run=run,
            pool_site=pool_site,
            layout=_layout(int(config.num_channels), int(config.patch_size)),
        )


register_encoder_family(Siglip2Family())
