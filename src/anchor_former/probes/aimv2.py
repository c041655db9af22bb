"""HF transformers AIMv2 vision tower: ``Aimv2VisionModel`` (no [CLS]).

Pre-norm layers (``Aimv2EncoderLayer``: ``rms_norm1`` -> ``attention`` with ``q_proj`` / ``k_proj``); no
[CLS] token and no registers (``num_prefix_tokens = 0``), so the scores are ``"received"``, ``"norm"`` and,
with the pooling head (``config.use_head``), ``"map"``: the head's learned ``cls_token`` is its query
as is (no query projection), over the ``k_proj`` keys of the final (``rms_norm``-ed) tokens, at SDPA's
default scale ``E ** -0.5``.
"""

from __future__ import annotations

import torch
from torch import nn

from anchor_former.probes.base import (
    EncoderFamily,
    EncoderSpec,
    QueryKeySite,
    hf_linear_site,
    loaded_classes,
    modules_of_type,
    positional_or_keyword,
    register_encoder_family,
)

__all__ = ["Aimv2Family"]

_MODULE = "transformers.models.aimv2.modeling_aimv2"


def _head_site(head: nn.Module) -> QueryKeySite:
    k = head.k_proj
    width = head.hidden_size // head.num_heads

    def projections():
        eye = torch.eye(head.hidden_size, device=k.weight.device, dtype=k.weight.dtype)  # the query is used as is
        return eye, None, k.weight, k.bias

    return QueryKeySite(module=head, tokens=positional_or_keyword("hidden_states"), projections=projections,
                        num_heads=head.num_heads, head_dim=width, scale=width**-0.5,
                        query=lambda: head.cls_token.reshape(-1))


class Aimv2Family(EncoderFamily):
    name = "aimv2"
    description = "transformers Aimv2VisionModel (no [CLS])"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("Aimv2VisionModel",))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("Aimv2EncoderLayer",)))
        heads = modules_of_type(model, loaded_classes(_MODULE, ("Aimv2AttentionPoolingHead",)))
        config = model.config
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(
                hf_linear_site(b.attention, b.attention.q_proj, b.attention.k_proj, num_heads=b.attention.num_heads,
                               scale=b.attention.scale)
                for b in blocks
            ),
            num_prefix_tokens=0,
            has_cls=False,
            patch_size=int(config.patch_size),
            num_channels=int(config.num_channels),
            run=lambda pixel_values: model(pixel_values=pixel_values),
            pool_site=_head_site(heads[0]) if heads else None,
        )


register_encoder_family(Aimv2Family())
