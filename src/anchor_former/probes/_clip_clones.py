"""CLIP-architecture vision towers of other transformers models: AltCLIP, ChineseCLIP, MetaCLIP 2 and
IDEFICS (v1).

Each is CLIP's vision transformer under another name: pre-norm layers (``layer_norm1`` -> ``self_attn``
with separate ``q_proj`` / ``k_proj`` and ``scale``), token 0 [CLS] (``class_embedding``), no registers.
One family per model, each matching its own classes; layers are found by type, as for ``clip``.
IDEFICS's ``IdeficsVisionTransformer`` returns no ``hidden_states`` / ``attentions`` in transformers 5.x;
the probe needs neither.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anchor_former.probes.registry import (
    EncoderFamily,
    EncoderSpec,
    QueryKeySite,
    hf_linear_site,
    loaded_classes,
    modules_of_type,
    register_encoder_family,
)

__all__ = ["CLIPCloneFamily"]


def _site(block: Any) -> QueryKeySite:  # a transformers module: its attributes are untyped
    attn = block.self_attn
    return hf_linear_site(attn, num_heads=attn.num_heads, scale=attn.scale)


class CLIPCloneFamily(EncoderFamily):
    """A transformers vision tower built like CLIP's, named by its module, model classes and layer class."""

    def __init__(self, *, name: str, module: str, models: tuple[str, ...], layer: str) -> None:
        self.name = name
        self.description = "transformers " + ", ".join(models)
        self._module = module
        self._models = models
        self._layer = layer

    def matches(self, model: nn.Module) -> bool:
        classes = loaded_classes(self._module, self._models)
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module) -> EncoderSpec:
        blocks = modules_of_type(model, loaded_classes(self._module, (self._layer,)))
        config: Any = model.config
        patch = config.patch_size
        return EncoderSpec(
            family=self.name,
            blocks=blocks,
            sites=tuple(_site(b) for b in blocks),
            num_prefix_tokens=1,
            has_cls=True,
            patch_size=int(patch if isinstance(patch, int) else patch[0]),
            num_channels=int(config.num_channels),
            run=lambda pixel_values: model(pixel_values=pixel_values),
        )


_MODELS = "transformers.models."
for _family in (
    CLIPCloneFamily(
        name="altclip",
        module=_MODELS + "altclip.modeling_altclip",
        models=("AltCLIPVisionModel",),
        layer="AltCLIPEncoderLayer",
    ),
    CLIPCloneFamily(
        name="chinese_clip",
        module=_MODELS + "chinese_clip.modeling_chinese_clip",
        models=("ChineseCLIPVisionModel",),
        layer="ChineseCLIPVisionLayer",
    ),
    CLIPCloneFamily(
        name="metaclip_2",
        module=_MODELS + "metaclip_2.modeling_metaclip_2",
        models=("MetaClip2VisionModel", "MetaClip2VisionModelWithProjection"),
        layer="MetaClip2EncoderLayer",
    ),
    CLIPCloneFamily(
        name="idefics",
        module=_MODELS + "idefics.vision",
        models=("IdeficsVisionTransformer",),
        layer="IdeficsVisionEncoderLayer",
    ),
):
    register_encoder_family(_family)
