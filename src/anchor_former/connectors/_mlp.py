"""LLaVA's own connector: the projector applied to every patch token (576 tokens for CLIP-L/336)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anchor_former._projector import build_projector, projector_flops
from anchor_former.connectors._base import Connector, ConnectorConfig

__all__ = ["MLPConnector", "MLPConnectorConfig"]


@dataclass(frozen=True)
class MLPConnectorConfig(ConnectorConfig):
    """Configuration of :class:`MLPConnector`."""

    vision_dim: int = 1024
    llm_dim: int = 4096
    projector: str = "mlp2x_gelu"
    num_prefix_tokens: int = 1


class MLPConnector(Connector):
    """LLaVA's projector on the patch tokens, token by token.

    Consumes the ``N - num_prefix_tokens`` patch tokens (LLaVA's ``mm_vision_select_feature="patch"``
    drops [CLS]); ``num_prefix_tokens=0`` keeps every token (LLaVA's ``"cls_patch"``). Ignores
    ``anchor_idx`` and ``attention``. Tokens are independent, so ``key_padding_mask`` is only checked:
    outputs at padded positions are meaningless and the caller drops them.

    Args:
        vision_dim: D, feature width.
        llm_dim: output width.
        projector: ``"mlp2x_gelu"`` (LLaVA-1.5), ``"linear"`` (LLaVA-1), ``"mlp{N}x_gelu"``, ``"identity"``.
        num_prefix_tokens: leading tokens to drop ([CLS] + registers).
        device, dtype: where and how the parameters are created.

    The projector is the submodule ``projector`` with LLaVA's keys (``projector.0.*``, ``projector.2.*``),
    so ``connector.projector.load_state_dict(llava_mm_projector_state_dict)`` warm-starts it.

    Shapes:
        ``forward(features (B, N, D))`` → ``(B, N - num_prefix_tokens, llm_dim)``.
    """

    uses_anchors = False
    config_class = MLPConnectorConfig
    _config: MLPConnectorConfig

    def __init__(
        self,
        vision_dim: int = 1024,
        llm_dim: int = 4096,
        *,
        projector: str = "mlp2x_gelu",
        num_prefix_tokens: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_widths(vision_dim, llm_dim, num_prefix_tokens)
        self._config = MLPConnectorConfig(vision_dim, llm_dim, projector, num_prefix_tokens)
        self.projector = build_projector(projector, vision_dim, llm_dim, device=device, dtype=dtype)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self._num_patches(num_input_tokens)

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
        """``features (B, N, D)`` → ``(B, N - num_prefix_tokens, llm_dim)``; anchors are ignored."""
        self._check_features(features)
        self._check_mask(key_padding_mask, features)
        tokens: torch.Tensor = self.projector(features[:, self.num_prefix_tokens :])  # (B, N - P, llm_dim)
        return tokens
