"""Perceiver Resampler with learned queries: AnchorFormer's layers, with queries that ignore the image.

The paper's main ablation: the same aggregator (:class:`~anchor_former._layers.ResamplerLayer` stack,
final LayerNorm, LLaVA projector) fed with ``num_queries`` learned latent vectors instead of the anchor
tokens. State-dict keys equal :class:`~anchor_former.AnchorFormer`'s plus ``latents (K, D)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from anchor_former._validation import check_positive_int
from anchor_former.connectors._base import ConnectorConfig
from anchor_former.connectors._resampler import ResamplerConnector

__all__ = ["PerceiverResampler", "PerceiverResamplerConfig"]


@dataclass(frozen=True)
class PerceiverResamplerConfig(ConnectorConfig):
    """Configuration of :class:`PerceiverResampler`."""

    vision_dim: int = 1024
    llm_dim: int = 4096
    num_queries: int = 144
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    projector: str = "mlp2x_gelu"
    num_prefix_tokens: int = 1
    kv_include_queries: bool = False
    fused_attn: bool = True
    gradient_checkpointing: bool = False


class PerceiverResampler(ResamplerConnector):
    """``num_queries`` learned latents attend over all tokens, then the LLaVA projector.

    Consumes all N tokens as keys/values (prefix tokens included, as AnchorFormer does). Ignores
    ``anchor_idx`` and ``attention``. ``key_padding_mask`` removes padded tokens from the keys, so a padded
    batch equals running each sample alone.

    Args: as :class:`~anchor_former.AnchorFormer`, with ``num_queries`` learned queries (default 144; the
    AcFormer default yields 145 tokens, [CLS] + 144 anchors) instead of the anchor search.
    ``kv_include_queries=True`` gives Flamingo's resampler (latents join the keys/values).

    Shapes:
        ``forward(features (B, N, D))`` → ``(B, num_queries, llm_dim)``.
    """

    uses_anchors = False
    config_class = PerceiverResamplerConfig
    _config: PerceiverResamplerConfig

    def __init__(
        self,
        vision_dim: int = 1024,
        llm_dim: int = 4096,
        *,
        num_queries: int = 144,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        projector: str = "mlp2x_gelu",
        num_prefix_tokens: int = 1,
        kv_include_queries: bool = False,
        fused_attn: bool = True,
        gradient_checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_widths(vision_dim, llm_dim, num_prefix_tokens)
        check_positive_int("num_queries", num_queries)
        self._build_resampler(
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            ff_mult=ff_mult,
            projector=projector,
            kv_include_queries=kv_include_queries,
            fused_attn=fused_attn,
            gradient_checkpointing=gradient_checkpointing,
            device=device,
            dtype=dtype,
        )
        self._config = PerceiverResamplerConfig(
            vision_dim=vision_dim,
            llm_dim=llm_dim,
            num_queries=num_queries,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            ff_mult=ff_mult,
            projector=projector,
            num_prefix_tokens=num_prefix_tokens,
            kv_include_queries=kv_include_queries,
        )
        self.latents = nn.Parameter(torch.empty(num_queries, vision_dim, device=device, dtype=dtype))
        nn.init.normal_(self.latents, std=0.02)

    @property
    def config(self) -> PerceiverResamplerConfig:
        """The current configuration, runtime switches included."""
        return dataclasses.replace(
            self._config, fused_attn=self.fused_attn, gradient_checkpointing=self.gradient_checkpointing
        )

    def num_output_tokens(self, num_input_tokens: int) -> int:
        self._num_patches(num_input_tokens)
        return self._config.num_queries

    def analytic_flops(self, num_input_tokens: int) -> int:
        return self._resampler_flops(self.num_output_tokens(num_input_tokens), num_input_tokens)

    def forward(
        self,
        features: torch.Tensor,
        anchor_idx: torch.Tensor | None = None,
        *,
        attention: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``features (B, N, D)``, ``key_padding_mask (B, N)`` (True = real) → ``(B, num_queries, llm_dim)``."""
        self._check_features(features)
        self._check_mask(key_padding_mask, features)
        self._require_real_tokens(key_padding_mask)
        queries = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)  # (B, K, D)
        return self._resample(queries, features, key_padding_mask)  # (B, K, llm_dim)
