"""HF transformers SigLIP vision encoders: ``SiglipVisionModel`` and ``SiglipVisionTransformer`` (4.x).

SigLIP has no [CLS] token (``num_prefix_tokens = 0``), so ``score="cls"`` is refused. Two scores work:

* ``score="map"``: the attention of the multihead-attention-pooling head's learned probe query over
  the final tokens (after ``post_layernorm``), per head — the closest analogue of [CLS] attention,
  available when the model has the head (``vision_use_head``, the default);
* ``score="norm"``: per-token L2 norms of the selected layer (:func:`token_norm_scores`), any model.
"""

from __future__ import annotations

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

__all__ = ["SiglipFamily", "pooling_head_site"]

_MODULE = "transformers.models.siglip.modeling_siglip"


def pooling_head_site(head: nn.Module) -> QueryKeySite:
    """The site of a SigLIP-style pooling head: its learned ``probe`` query over the tokens it is called with,
    through its ``attention`` (``torch.nn.MultiheadAttention``, packed ``in_proj``)."""
    mha = head.attention  # torch.nn.MultiheadAttention(batch_first=True), packed in_proj
    dim = mha.embed_dim

    def projections():
        w, b = mha.in_proj_weight, mha.in_proj_bias
        return w[:dim], None if b is None else b[:dim], w[dim : 2 * dim], None if b is None else b[dim : 2 * dim]

    return QueryKeySite(
        module=head,
        tokens=positional_or_keyword("hidden_state"),
        projections=projections,
        num_heads=mha.num_heads,
        head_dim=mha.head_dim,
        scale=mha.head_dim**-0.5,
        query=lambda: head.probe.reshape(-1),  # (D,)
    )


class SiglipFamily(EncoderFamily):
    name = "siglip"
    description = "transformers SiglipVisionModel, SiglipVisionTransformer (no [CLS])"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("SiglipVisionModel", "SiglipVisionTransformer"))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("SiglipEncoderLayer",)))
        heads = modules_of_type(model, loaded_classes(_MODULE, ("SiglipMultiheadAttentionPoolingHead",)))
        config = model.config
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(
                hf_linear_site(b.self_attn, b.self_attn.q_proj, b.self_attn.k_proj,
                               num_heads=b.self_attn.num_heads, scale=b.self_attn.scale)
                for b in blocks
            ),
            num_prefix_tokens=0,
            has_cls=False,
            patch_size=int(config.patch_size),
            num_channels=int(config.num_channels),
            run=lambda pixel_values: model(pixel_values=pixel_values),
            pool_site=pooling_head_site(heads[0]) if heads else None,
        )


register_encoder_family(SiglipFamily())
