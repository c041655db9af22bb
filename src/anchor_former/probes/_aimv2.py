"""HF transformers AIMv2 vision tower: ``Aimv2VisionModel`` (no [CLS]).

Pre-norm layers (``Aimv2EncoderLayer``: ``rms_norm1`` -> ``attention`` with ``q_proj`` / ``k_proj``); no
[CLS] token and no registers (``num_prefix_tokens = 0``), so the scores are ``"received"``, ``"norm"`` and,
with the pooling head (``config.use_head``), ``"map"``: the head's learned ``cls_token`` is its query
as is (no query projection), over the ``k_proj`` keys of the final (``rms_norm``-ed) tokens, at SDPA's
default scale ``E ** -0.5``. The head's keys are read from its ``k_proj`` output; its query, a
parameter with no projection, is read inside that module's hook, while the head runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    Projection,
    QueryKeySite,
    hf_linear_site,
    loaded_classes,
    modules_of_type,
    register_encoder_family,
    split_heads,
    submodule,
)

__all__ = ["Aimv2Family"]

_MODULE = "transformers.models.aimv2.modeling_aimv2"


def _head_site(head: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    k_proj = submodule(head, "k_proj")
    heads = head.num_heads
    width = head.hidden_size // heads

    def learned_query(output: torch.Tensor) -> torch.Tensor:
        query: torch.Tensor = head.cls_token.reshape(1, 1, heads, width)
        return query.transpose(1, 2)  # (1, H, 1, E), as the head reshapes it

    return QueryKeySite(
        module=head,
        query=Projection(k_proj, learned_query),
        key=Projection(k_proj, split_heads(heads)),
        scale=width**-0.5,
    )


def _site(block: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    attn = block.attention
    return hf_linear_site(attn, num_heads=attn.num_heads, scale=attn.scale)


class Aimv2Family(EncoderFamily):
    name = "aimv2"
    description = "transformers Aimv2VisionModel (no [CLS])"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("Aimv2VisionModel",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("Aimv2EncoderLayer",)))
        heads = modules_of_type(model, loaded_classes(_MODULE, ("Aimv2AttentionPoolingHead",)))
        config: Any = model.config
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b) for b in blocks),
            num_prefix_tokens=0,
            has_cls=False,
            patch_size=int(config.patch_size),
            num_channels=int(config.num_channels),
            run=lambda pixel_values: model(pixel_values=pixel_values),
            pool_site=_head_site(heads[0]) if heads else None,
        )


register_encoder_family(Aimv2Family())
