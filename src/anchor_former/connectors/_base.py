"""The interface every vision-language connector in this package implements.

A connector maps the selected ViT layer's tokens to LLM input tokens::

    tokens = connector(features, anchor_idx, attention=None, key_padding_mask=None)  # (B, T, llm_dim)

* ``features (B, N, vision_dim)``: all tokens of the selected layer, prefix tokens included ([CLS] at 0,
  then registers if any, then the patch grid in raster order). Each connector documents which of them it
  consumes (``num_prefix_tokens`` says how many lead the sequence).
* ``anchor_idx (B, K)`` / ``attention``: only for connectors with ``uses_anchors = True``; the others
  accept and ignore them so a caller can swap connectors without changing the call.
* ``key_padding_mask (B, N)``: bool, **True = real token**, False = padding.

Every connector also gives ``num_output_tokens(N) -> T`` and ``analytic_flops(N)``: forward FLOPs per
sample, 2 per multiply-add, counting matrix products and convolutions (attention matmuls included) but
not norms, activations, softmax or pooling; the convention of
:class:`torch.utils.flop_counter.FlopCounterMode`, which agrees exactly on the explicit attention path.

And every connector is rebuilt from its configuration the same way, and reads the checkpoint layouts it
comes from::

    clone = type(connector).from_config(connector.config, device=None, dtype=None)  # same architecture
    state, layout = connector.convert_checkpoint(state_dict)  # a known layout -> this connector's keys
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar, TypedDict, TypeVar

import torch
from torch import nn

from anchor_former._state_keys import Layout, StateDict, own_or_llava_keys
from anchor_former._validation import (
    check_floating,
    check_ndim,
    check_nonnegative_int,
    check_positive_int,
    shape_str,
)

__all__ = ["Connector", "ConnectorConfig", "grid_side"]


class FactoryKwargs(TypedDict, total=False):
    """The ``device`` / ``dtype`` factory keywords a connector passes on to the modules it builds."""

    device: torch.device | str | None
    dtype: torch.dtype | None


C = TypeVar("C", bound="ConnectorConfig")
M = TypeVar("M", bound="Connector")


class ConnectorConfig:
    """Mixin for connector config dataclasses: round trip through a plain dict and JSON."""

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict of the fields."""
        fields: dict[str, Any] = dataclasses.asdict(self)  # type: ignore[call-overload]  # self: a dataclass subclass
        return fields

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from :meth:`to_dict`'s output; missing keys take their defaults.

        Raises:
            ValueError: ``data`` is not a mapping, or has keys that are not fields (named, with the known ones).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"data must be a mapping of {cls.__name__} fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))


def grid_side(num_patches: int, *, connector: str) -> int:
    """Side ``s`` of a square patch grid with ``s * s == num_patches``; ValueError otherwise."""
    side = math.isqrt(max(num_patches, 0))
    if num_patches < 1 or side * side != num_patches:
        raise ValueError(
            f"{connector} needs a square grid of patch tokens, got {num_patches} patch tokens "
            "(N minus num_prefix_tokens), which is not a perfect square"
        )
    return side


class Connector(nn.Module):
    """Base class: ``forward(features, anchor_idx=None, *, attention=None, key_padding_mask=None)``.

    Attributes:
        uses_anchors: whether ``anchor_idx`` / ``attention`` change the output.
        config_class: the connector's config dataclass (what :attr:`config` returns and
            :meth:`from_config` takes); its fields are the constructor's keyword arguments.
        vision_dim: width of the features.
        llm_dim: width of the output tokens.
        num_prefix_tokens: leading non-patch tokens of ``features`` ([CLS] + registers).
    """

    uses_anchors: ClassVar[bool] = False
    config_class: ClassVar[type[ConnectorConfig]]
    vision_dim: int
    llm_dim: int
    num_prefix_tokens: int
    _config: ConnectorConfig

    @property
    def config(self) -> ConnectorConfig:
        """The configuration (an instance of :attr:`config_class`): ``from_config(config)`` builds the same
        architecture, with fresh parameters. Runtime switches (``fused_attn``, ...) at their current values."""
        return self._config

    @classmethod
    def from_config(
        cls: type[M],
        config: ConnectorConfig | Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> M:
        """Build from a :attr:`config_class` instance or its dict (:meth:`ConnectorConfig.to_dict`).

        Raises:
            ValueError: ``config`` is a config of another connector or not a config/mapping, a dict with
                unknown keys (named), or a value the constructor refuses (named by the constructor).
        """
        if isinstance(config, Mapping):
            config = cls.config_class.from_dict(config)
        elif type(config) is not cls.config_class:
            raise ValueError(
                f"config must be a {cls.config_class.__name__} (or its dict) for {cls.__name__}, got "
                f"{type(config).__name__}"
            )
        return cls(**config.to_dict(), device=device, dtype=dtype)

    def convert_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, Layout]:
        """A checkpoint in a layout this connector knows -> ``(state dict with this connector's keys, layout)``.

        Known to every connector with an output projector at ``.projector``: LLaVA's projector weights
        (``mm_projector.{j}.*`` / transformers' ``multi_modal_projector.linear_{n}.*`` -> ``projector.{j}.*``,
        layout ``"llava_mlp"``, a warm start of the projector only) and this package's own state dict
        (under any prefix up to ``mm_projector.`` and ``connector.``; layout ``"anchor_former"``). A
        connector trained elsewhere in another layout overrides this (:class:`~anchor_former.AnchorFormer`
        reads the reference AcFormer patch). :func:`anchor_former.checkpoint.load_connector_weights` loads
        the result, checking every key and shape.
        """
        return own_or_llava_keys(state_dict)

    def forward(
        self,
        features: torch.Tensor,
        anchor_idx: torch.Tensor | None = None,
        *,
        attention: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """T, the number of output tokens for N input tokens (prefix tokens included)."""
        raise NotImplementedError

    def analytic_flops(self, num_input_tokens: int) -> int:
        """Forward FLOPs per sample for N input tokens (prefix tokens included); see the module doc."""
        raise NotImplementedError

    # --- shared input checks ---------------------------------------------------------------------------

    def _set_widths(self, vision_dim: int, llm_dim: int, num_prefix_tokens: int) -> None:
        """Check and set the interface attributes every connector has (called first in ``__init__``)."""
        check_positive_int("vision_dim", vision_dim)
        check_positive_int("llm_dim", llm_dim)
        check_nonnegative_int("num_prefix_tokens", num_prefix_tokens)
        self.vision_dim = vision_dim
        self.llm_dim = llm_dim
        self.num_prefix_tokens = num_prefix_tokens

    def _num_patches(self, num_input_tokens: int) -> int:
        """``N - num_prefix_tokens``, raising unless it is >= 1."""
        if isinstance(num_input_tokens, bool) or not isinstance(num_input_tokens, int):
            raise ValueError(f"num_input_tokens must be an int, got {num_input_tokens!r}")
        patches = num_input_tokens - self.num_prefix_tokens
        if patches < 1:
            raise ValueError(
                f"num_input_tokens must exceed num_prefix_tokens={self.num_prefix_tokens}, got {num_input_tokens}"
            )
        return patches

    def _check_features(self, features: torch.Tensor) -> None:
        check_ndim("features", features, (3,), f"(B, N, vision_dim={self.vision_dim})")
        check_floating("features", features)
        if features.shape[-1] != self.vision_dim:
            raise ValueError(
                f"features must have shape (B, N, vision_dim={self.vision_dim}), got shape {shape_str(features)} "
                f"(width {features.shape[-1]} != vision_dim {self.vision_dim})"
            )
        self._num_patches(features.shape[1])
        # A dtype mismatch would fail deep inside a matmul with a message naming no argument; under
        # torch.autocast mixed dtypes are the point, so they pass.
        param = next(self.parameters(), None)
        if param is not None and features.dtype != param.dtype and not torch.is_autocast_enabled(features.device.type):
            raise ValueError(
                f"features must have the dtype of {type(self).__name__}'s parameters ({param.dtype}), got dtype "
                f"{features.dtype} with shape {shape_str(features)}; cast one to the other "
                f"(features.to({param.dtype}) or connector.to({features.dtype})) or run under torch.autocast"
            )

    @staticmethod
    def _check_mask(key_padding_mask: torch.Tensor | None, features: torch.Tensor) -> None:
        if key_padding_mask is None:
            return
        b, n = features.shape[:2]
        expected = f"(B, N) = ({b}, {n}) bool, True = real token, matching features of shape {shape_str(features)}"
        check_ndim("key_padding_mask", key_padding_mask, (2,), expected)
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape {expected}, got dtype {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (b, n):
            raise ValueError(f"key_padding_mask must have shape {expected}, got shape {shape_str(key_padding_mask)}")
        if key_padding_mask.device != features.device:
            raise ValueError(
                f"key_padding_mask must be on the device of features ({features.device}), got "
                f"{key_padding_mask.device} (shape {shape_str(key_padding_mask)})"
            )

    @staticmethod
    def _require_real_tokens(key_padding_mask: torch.Tensor | None) -> None:
        """Every sample needs a real token to attend to (checked outside compile only)."""
        if key_padding_mask is None or torch.compiler.is_compiling():
            return
        empty = ~key_padding_mask.any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"key_padding_mask of shape {shape_str(key_padding_mask)} has samples with no real token "
                f"(all False): {empty.nonzero().flatten().tolist()}"
            )

    @staticmethod
    def _require_no_padding(key_padding_mask: torch.Tensor | None, *, connector: str) -> None:
        """Grid connectors cannot drop tokens: a mask must be all True (checked outside compile only)."""
        if key_padding_mask is None or torch.compiler.is_compiling():
            return
        if not bool(key_padding_mask.all()):
            raise ValueError(
                f"{connector} pools a fixed patch grid and cannot ignore padded tokens; key_padding_mask of shape "
                f"{shape_str(key_padding_mask)} has {int((~key_padding_mask).sum())} False entries"
            )
