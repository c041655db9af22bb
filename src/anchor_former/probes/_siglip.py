"""HF transformers SigLIP vision encoders: ``SiglipVisionModel`` and ``SiglipVisionTransformer`` (4.x).

SigLIP has no [CLS] token (``num_prefix_tokens = 0``), so ``score="cls"`` is refused. Two scores work:

* ``score="map"``: the attention of the multihead-attention-pooling head's learned probe query over
  the final tokens (after ``post_layernorm``), per head — the closest analogue of [CLS] attention,
  available when the model has the head (``vision_use_head``, the default);
* ``score="norm"``: per-token L2 norms of the selected layer (:func:`token_norm_scores`), any model.

The head's ``torch.nn.MultiheadAttention`` is called with a separate query and returns its own
probabilities; the probe asks for them per head and reads the probe query's row (the layers' sites read
their ``q_proj`` / ``k_proj`` outputs).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    MultiheadWeightsSite,
    QueryKeySite,
    hf_linear_site,
    loaded_classes,
    modules_of_type,
    register_encoder_family,
    submodule,
)

__all__ = ["SiglipFamily", "pooling_head_site"]

_MODULE = "transformers.models.siglip.modeling_siglip"


def pooling_head_site(head: nn.Module) -> MultiheadWeightsSite:
    """The site of a SigLIP-style pooling head: the probabilities its ``attention``
    (``torch.nn.MultiheadAttention``) returns for its learned ``probe`` query."""
    return MultiheadWeightsSite(module=submodule(head, "attention"))


def _site(block: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    attn = block.self_attn
    return hf_linear_site(attn, num_heads=attn.num_heads, scale=attn.scale)


class SiglipFamily(EncoderFamily):
    name = "siglip"
    description = "transformers SiglipVisionModel, SiglipVisionTransformer (no [CLS])"

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(_MODULE, ("SiglipVisionModel", "SiglipVisionTransformer"))
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(_MODULE, ("SiglipEncoderLayer",)))
        heads = modules_of_type(model, loaded_classes(_MODULE, ("SiglipMultiheadAttentionPoolingHead",)))
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
            pool_site=pooling_head_site(heads[0]) if heads else None,
        )


register_encoder_family(SiglipFamily())
