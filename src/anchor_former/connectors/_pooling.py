"""Average pooling of the patch grid, then LLaVA's projector (24x24 → 12x12 = 144 tokens at pool 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from anchor_former._projector import build_projector, projector_flops
from anchor_former._validation import check_positive_int
from anchor_former.connectors._base import Connector, ConnectorConfig, grid_side

__all__ = ["AvgPoolConnector", "AvgPoolConnectorConfig"]


@dataclass(frozen=True)
class AvgPoolConnectorConfig(ConnectorConfig):
    """Configuration of :class:`AvgPoolConnector`."""

    vision_dim: int = 1024
    llm_dim: int = 4096
    pool: int = 2
    projector: str = "mlp2x_gelu"
    num_prefix_tokens: int = 1


class AvgPoolConnector(Connector):
    """``pool x pool`` average pooling of the square patch grid, then the projector on each cell.

    Consumes the ``N - num_prefix_tokens`` patch tokens, which must form a square ``s x s`` grid in raster
    order (ValueError otherwise). A side not divisible by ``pool`` gets smaller edge windows, averaged over
    the tokens they hold (``ceil_mode``). Ignores ``anchor_idx`` and ``attention``; a
    ``key_padding_mask`` must be all True (a fixed grid has no padding).

    Args:
        vision_dim: D; llm_dim: output width.
        pool: window and stride of the pooling.
        projector: LLaVA projector name applied after pooling.
        num_prefix_tokens: leading non-patch tokens to drop.
        device, dtype: where and how the parameters are created.

    Shapes:
        ``forward(features (B, N, D))`` → ``(B, ceil(s / pool) ** 2, llm_dim)`` with ``s * s = N - num_prefix_tokens``.
    """

    uses_anchors = False
    config_class = AvgPoolConnectorConfig
    _config: AvgPoolConnectorConfig

    def __init__(
        self,
        vision_dim: int = 1024,
        llm_dim: int = 4096,
        *,
        pool: int = 2,
        projector: str = "mlp2x_gelu",
        num_prefix_tokens: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_widths(vision_dim, llm_dim, num_prefix_tokens)
        check_positive_int("pool", pool)
        self.pool = pool
        self._config = AvgPoolConnectorConfig(vision_dim, llm_dim, pool, projector, num_prefix_tokens)
        self.projector = build_projector(projector, vision_dim, llm_dim, device=device, dtype=dtype)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        side = grid_side(self._num_patches(num_input_tokens), connector="avgpool")
        return math.ceil(side / self.pool) ** 2

    def analytic_flops(self, num_input_tokens: int) -> int:
        t = self.num_output_tokens(num_input_tokens)
        return projector_flops(self._config.projector, self.vision_dim, self.llm_dim, t)

    def forward(
        self,
        features: torch.Tensor,
        anchor_idx: torch.Tensor | None = None,
        *,
        attention: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``features (B, N, D)`` → ``(B, T, llm_dim)``, T = ``ceil(s / pool) ** 2``; anchors are ignored."""
        self._check_features(features)
        self._check_mask(key_padding_mask, features)
        self._require_no_padding(key_padding_mask, connector="avgpool")
        patches = features[:, self.num_prefix_tokens :]  # (B, s*s, D)
        side = grid_side(patches.shape[1], connector="avgpool")
        grid = rearrange(patches, "b (h w) d -> b d h w", h=side, w=side)
        pooled = F.avg_pool2d(grid, self.pool, self.pool, ceil_mode=True)  # (B, D, s', s')
        tokens: torch.Tensor = self.projector(rearrange(pooled, "b d h w -> b (h w) d"))  # (B, s'*s', llm_dim)
        return tokens
