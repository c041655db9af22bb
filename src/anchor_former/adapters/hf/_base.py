"""What every transformers family shares on top of :class:`~anchor_former.adapters._host.Host`: the model
check, the config and class swap, the Auto-class and key-conversion registration, and the output type
that carries the kept token indices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from anchor_former.adapters._host import Host, Plan, register_key_conversions
from anchor_former.adapters.settings import CONFIG_KEY, AnchorSettings

__all__ = ["AnchorImageOutput", "TransformersHost"]


@dataclass
class AnchorImageOutput(BaseModelOutputWithPooling):
    """The vision tower's output with ``pooler_output`` = a tuple/list of ``(T_i, llm_dim)`` LLM tokens per
    image and ``kept_indices``: per image, the ascending indices of the tokens the model kept (see the
    family's ``get_image_features``), or None where the connector keeps no tokens (pooling, resamplers
    without anchors)."""

    pooler_output: Any = None  # a tuple/list of per-image tensors here, not the stock single tensor
    kept_indices: tuple[torch.Tensor, ...] | None = None


class TransformersHost(Host):
    """A transformers family: ``stock`` outer class -> ``(config class, inner model class, outer class)``.

    Subclasses set :attr:`classes` and implement ``plan`` / ``settings`` (and ``build`` /
    ``switch_processor`` where they have a connector module / a processor); ``install`` swaps the config
    and the classes and puts the connector at :attr:`connector_slot` of the inner model.
    """

    #: stock outer class -> (attached config class, attached inner model class, attached outer class)
    classes: ClassVar[dict[type[Any], tuple[type[Any], type[Any], type[Any]]]] = {}
    #: attribute of the inner model holding the connector (None: the family has no connector module)
    connector_slot: ClassVar[str | None] = "multi_modal_projector"

    def stock_of(self, model: nn.Module) -> type[Any] | None:
        """The stock class ``model`` is (or was, before an attach), or None."""
        for stock, (_, _, outer) in self.classes.items():
            if type(model) in (stock, outer):
                return stock
        return None

    def check_model(self, model: nn.Module) -> None:
        stock = self.stock_of(model)
        if stock is None or not isinstance(getattr(model, "model", None), nn.Module):
            names = " or ".join(cls.__name__ for cls in self.classes)
            raise ValueError(
                f"model must be a transformers {names}, got {type(model).__module__}.{type(model).__qualname__}"
            )

    def recorded(self, model: nn.Module) -> AnchorSettings | None:
        stock = self.stock_of(model)
        if stock is None or type(model) is stock:
            return None
        return AnchorSettings.of(model.config)

    def modules_to_restore(self, model: nn.Module) -> tuple[nn.Module, ...]:
        return (model, cast(nn.Module, model.model))

    def config_updates(self, settings: AnchorSettings, plan: Plan, connector: nn.Module | None) -> dict[str, Any]:
        """Stock config entries the attached model changes (LLaVA-1.5: ``image_seq_length``)."""
        return {}

    def install(self, model: nn.Module, settings: AnchorSettings, plan: Plan, connector: nn.Module | None) -> None:
        stock = self.stock_of(model)
        assert stock is not None, "install runs after check_model"
        config_class, inner_class, outer_class = self.classes[stock]
        old: Any = model.config
        inner: Any = model.model
        data = {k: v for k, v in old.to_dict().items() if k not in ("model_type", CONFIG_KEY)}
        data.update(self.config_updates(settings, plan, connector))
        config = config_class(**data, **{CONFIG_KEY: settings.to_dict()})
        config.vision_config, config.text_config = old.vision_config, old.text_config  # the submodules' own objects
        model.__class__ = outer_class
        inner.__class__ = inner_class
        model.config = inner.config = config
        if connector is not None and self.connector_slot is not None:
            setattr(inner, self.connector_slot, connector)

    @classmethod
    def register(cls, processors: dict[type, type] | None = None) -> None:
        """Register the attached classes with the Auto classes (``AutoConfig``, ``AutoModel``,
        ``AutoModelForImageTextToText``, ``AutoProcessor`` with ``processors[stock]``); idempotent."""
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForImageTextToText,
            AutoProcessor,
        )

        for stock, (config_class, inner_class, outer_class) in cls.classes.items():
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModel.register(config_class, inner_class, exist_ok=True)
            AutoModelForImageTextToText.register(config_class, outer_class, exist_ok=True)
            if processors and stock in processors:
                AutoProcessor.register(config_class, processors[stock], exist_ok=True)

    @classmethod
    def register_key_conversions(cls) -> None:
        """The stock families' checkpoint key conversions under our model types and class names."""
        pairs = {}
        for stock, (config_class, inner_class, outer_class) in cls.classes.items():
            pairs[config_class.model_type] = stock.config_class.model_type
            pairs[outer_class.__name__] = stock.__name__
            pairs[inner_class.__name__] = stock_inner_name(inner_class)
        register_key_conversions(pairs)


def stock_inner_name(inner_class: type) -> str:
    """The stock inner model class an attached inner class derives from (its first transformers base)."""
    for base in inner_class.__mro__[1:]:
        if base.__module__.startswith("transformers."):
            return base.__name__
    raise ValueError(f"{inner_class.__name__} derives from no transformers class")
