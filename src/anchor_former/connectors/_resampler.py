"""What AnchorFormer and the learned-query Perceiver share: the resampler stack and its readout.

Both connectors are ``depth`` :class:`~anchor_former._layers.ResamplerLayer` s over all ViT tokens, a final
LayerNorm and LLaVA's projector; only where the queries come from differs (anchor tokens vs learned
latents), which is the paper's main ablation. :class:`ResamplerConnector` builds that stack once, with the
state-dict keys both connectors document (``layers.{i}.*``, ``norm.*``, ``projector.*``), runs it, and
counts its FLOPs.
"""

from __future__ import annotations

from typing import TypedDict, cast

import torch
from torch import nn

from anchor_former._layers import ResamplerLayer, resampler_flops, run_layers
from anchor_former._projector import build_projector, projector_flops
from anchor_former._validation import check_positive_int
from anchor_former.connectors._base import Connector, FactoryKwargs

__all__ = ["ResamplerConnector"]


class _Shape(TypedDict):
    """The sizes :meth:`ResamplerConnector._resampler_flops` counts with."""

    depth: int
    heads: int
    dim_head: int
    ff_mult: int
    kv_include_queries: bool
    projector: str


class ResamplerConnector(Connector):
    """Base class: ``layers`` (``depth`` resampler layers), ``norm`` and ``projector``, plus their use.

    Subclasses call :meth:`_build_resampler` in ``__init__`` and :meth:`_resample` in ``forward``.
    """

    layers: nn.ModuleList
    norm: nn.LayerNorm
    projector: nn.Module
    gradient_checkpointing: bool

    def _build_resampler(
        self,
        *,
        depth: int,
        heads: int,
        dim_head: int,
        ff_mult: int,
        projector: str,
        kv_include_queries: bool,
        fused_attn: bool,
        gradient_checkpointing: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """Check the sizes and create ``layers``, ``norm`` and ``projector`` (widths from ``_set_widths``)."""
        for name, value in (("depth", depth), ("heads", heads), ("dim_head", dim_head), ("ff_mult", ff_mult)):
            check_positive_int(name, value)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.gradient_checkpointing = gradient_checkpointing
        self._shape: _Shape = {
            "depth": depth,
            "heads": heads,
            "dim_head": dim_head,
            "ff_mult": ff_mult,
            "kv_include_queries": kv_include_queries,
            "projector": projector,
        }
        self.layers = nn.ModuleList(
            ResamplerLayer(
                self.vision_dim,
                heads=heads,
                dim_head=dim_head,
                ff_mult=ff_mult,
                fused_attn=fused_attn,
                kv_include_queries=kv_include_queries,
                **dd,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(self.vision_dim, **dd)
        self.projector = build_projector(projector, self.vision_dim, self.llm_dim, **dd)

    @property
    def fused_attn(self) -> bool:
        """Whether the layers use SDPA (else the manual attention path); set it to switch every layer."""
        return all(cast(ResamplerLayer, layer).attn.fused_attn for layer in self.layers)

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        for layer in self.layers:
            cast(ResamplerLayer, layer).attn.fused_attn = bool(value)

    def _resample(
        self, queries: torch.Tensor, features: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``queries (B, K, D)`` attend over ``features (B, N, D)`` through the layers, then norm and projector.

        Returns ``(B, K, llm_dim)``; ``key_padding_mask (B, N)`` bool, True = real token.
        """
        queries = run_layers(
            self.layers, queries, features, key_padding_mask, gradient_checkpointing=self.gradient_checkpointing
        )
        tokens: torch.Tensor = self.projector(self.norm(queries))  # (B, K, llm_dim)
        return tokens

    def _resampler_flops(self, num_queries: int, num_input_tokens: int) -> int:
        """Forward FLOPs per sample of the layers and the projector for K queries over N tokens."""
        s = self._shape
        return resampler_flops(
            num_queries=num_queries,
            num_tokens=num_input_tokens,
            dim=self.vision_dim,
            depth=s["depth"],
            heads=s["heads"],
            dim_head=s["dim_head"],
            ff_mult=s["ff_mult"],
            kv_include_queries=s["kv_include_queries"],
        ) + projector_flops(s["projector"], self.vision_dim, self.llm_dim, num_queries)
