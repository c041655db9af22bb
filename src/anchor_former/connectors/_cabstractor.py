"""Honeybee's C-Abstractor (Cha et al., CVPR 2024), written without timm.

``patch grid → [ResBlock] * depth → adaptive average pool to grid x grid → [ResBlock] * depth →
projector``. A ResBlock is timm's RegNet bottleneck as Honeybee configures it (``RegStage`` with SiLU
and ``LayerNorm2d``, bottleneck ratio 1, depthwise 3x3, squeeze-excitation at ratio 0.25 of the input
width): ``1x1 conv-LN-SiLU, 3x3 depthwise conv-LN-SiLU, SE, 1x1 conv-LN``, plus the shortcut
(identity, or ``1x1 conv-LN`` when the width changes), then SiLU. Convolutions have no bias; the
LayerNorms use eps 1e-5 (timm turns Honeybee's ``LayerNorm2d`` into ``LayerNormAct2d`` with that eps).
Block parameters carry timm's names (``stage1.b1.conv1.conv.weight``, ``...conv1.bn.weight``, ``se.fc1``,
``downsample``), so Honeybee's ``net.0.*`` / ``net.2.*`` become ``stage1.*`` / ``stage2.*`` by prefix.
Honeybee's readout is a SiLU MLP; here it is LLaVA's projector (``mlp2x_gelu`` by default) so every
connector in this package shares the same readout and differs only in how it reduces the tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anchor_former._projector import build_projector, projector_flops
from anchor_former._validation import check_positive_int
from anchor_former.connectors._base import Connector, ConnectorConfig, FactoryKwargs, grid_side

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is 3.11+; only mypy reads it (annotations are strings)

__all__ = ["CAbstractor", "CAbstractorConfig", "LayerNorm2d", "RegBlock"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(B, C, H, W)`` maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ConvNorm(nn.Sequential):
    """``Conv2d(bias=False)`` then ``LayerNorm2d``; keys ``conv.*`` and ``bn.*`` as in timm's ``ConvNormAct``
    (so Honeybee/timm RegNet block weights load by key; the norm is a LayerNorm despite the name)."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int, *, groups: int = 1, **dd: Unpack[FactoryKwargs]
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=False, **dd)
        self.bn = LayerNorm2d(out_chs, **dd)


class _SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(SiLU(fc1(mean_hw(x)))))`` with 1x1 convolutions (bias) as the fcs."""

    def __init__(self, chs: int, rd_chs: int, **dd: Unpack[FactoryKwargs]) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(chs, rd_chs, 1, **dd)
        self.fc2 = nn.Conv2d(rd_chs, chs, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        gate: torch.Tensor = self.fc2(F.silu(self.fc1(s))).sigmoid()  # (B, C, 1, 1)
        return x * gate


class RegBlock(nn.Module):
    """One residual RegNet bottleneck block (stride 1), ``(B, C_in, H, W)`` → ``(B, C_out, H, W)``."""

    def __init__(self, in_chs: int, out_chs: int, *, se_ratio: float = 0.25, **dd: Unpack[FactoryKwargs]) -> None:
        super().__init__()
        self.conv1 = _ConvNorm(in_chs, out_chs, 1, **dd)
        self.conv2 = _ConvNorm(out_chs, out_chs, 3, groups=out_chs, **dd)
        self.se = _SqueezeExcite(out_chs, max(1, round(in_chs * se_ratio)), **dd)
        self.conv3 = _ConvNorm(out_chs, out_chs, 1, **dd)
        self.downsample = _ConvNorm(in_chs, out_chs, 1, **dd) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.conv1(x))
        y = F.silu(self.conv2(y))
        y = self.conv3(self.se(y))
        return F.silu(y + self.downsample(x))


def _block_flops(in_chs: int, out_chs: int, hw: int, se_ratio: float) -> int:
    """Convolution FLOPs of one :class:`RegBlock` on an ``hw``-pixel map (2 per multiply-add, bias free)."""
    rd = max(1, round(in_chs * se_ratio))
    macs = hw * out_chs * in_chs + hw * out_chs * 9 + 2 * rd * out_chs + hw * out_chs * out_chs
    if in_chs != out_chs:
        macs += hw * out_chs * in_chs
    return 2 * macs


@dataclass(frozen=True)
class CAbstractorConfig(ConnectorConfig):
    """Configuration of :class:`CAbstractor`."""

    vision_dim: int = 1024
    llm_dim: int = 4096
    hidden_dim: int | None = None
    depth: int = 3
    grid: int = 12
    se_ratio: float = 0.25
    num_patches: int | None = None
    projector: str = "mlp2x_gelu"
    num_prefix_tokens: int = 1


class CAbstractor(Connector):
    """Honeybee's convolutional abstractor: residual conv blocks, adaptive pooling, residual conv blocks.

    Consumes the ``N - num_prefix_tokens`` patch tokens, which must form a square grid in raster order
    (ValueError otherwise). Ignores ``anchor_idx`` and ``attention``; a ``key_padding_mask`` must be all
    True.

    Args:
        vision_dim: D; llm_dim: output width.
        hidden_dim: width of the conv blocks (Honeybee: 1024); defaults to ``vision_dim``.
        depth: blocks before and after the pooling (Honeybee: 3).
        grid: side of the pooled grid; ``grid ** 2`` output tokens (12 → 144).
        se_ratio: squeeze-excitation width as a fraction of each block's input width.
        num_patches: if given, a learned position embedding ``(1, num_patches, D)`` is added to the patch
            tokens first (Honeybee's default) and inputs must have that many patch tokens.
        projector: LLaVA projector name for the readout.
        num_prefix_tokens: leading non-patch tokens to drop.
        device, dtype: where and how the parameters are created.

    Shapes:
        ``forward(features (B, N, D))`` → ``(B, grid ** 2, llm_dim)``.
    """

    uses_anchors = False
    config_class = CAbstractorConfig
    _config: CAbstractorConfig

    def __init__(
        self,
        vision_dim: int = 1024,
        llm_dim: int = 4096,
        *,
        hidden_dim: int | None = None,
        depth: int = 3,
        grid: int = 12,
        se_ratio: float = 0.25,
        num_patches: int | None = None,
        projector: str = "mlp2x_gelu",
        num_prefix_tokens: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_widths(vision_dim, llm_dim, num_prefix_tokens)
        for name, value in (("depth", depth), ("grid", grid)):
            check_positive_int(name, value)
        if num_patches is not None:
            grid_side(num_patches, connector="cabstractor")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        hidden = vision_dim if hidden_dim is None else hidden_dim
        self._config = CAbstractorConfig(
            vision_dim, llm_dim, hidden_dim, depth, grid, se_ratio, num_patches, projector, num_prefix_tokens
        )
        self.hidden_dim = hidden
        self.grid = grid
        if num_patches is not None:
            self.pos_emb = nn.Parameter(torch.empty(1, num_patches, vision_dim, **dd))
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        else:
            self.register_parameter("pos_emb", None)
        # Blocks named b1, b2, ... like timm's RegStage: Honeybee's net.0.* / net.2.* map to stage1.* / stage2.*.
        self.stage1 = nn.Sequential(
            OrderedDict(
                (f"b{i + 1}", RegBlock(vision_dim if i == 0 else hidden, hidden, se_ratio=se_ratio, **dd))
                for i in range(depth)
            )
        )
        self.stage2 = nn.Sequential(
            OrderedDict((f"b{i + 1}", RegBlock(hidden, hidden, se_ratio=se_ratio, **dd)) for i in range(depth))
        )
        self.projector = build_projector(projector, hidden, llm_dim, **dd)

    def _side(self, num_patches: int) -> int:
        side = grid_side(num_patches, connector="cabstractor")
        if self.pos_emb is not None and num_patches != self.pos_emb.shape[1]:
            raise ValueError(
                f"cabstractor was built with num_patches={self.pos_emb.shape[1]} (position embedding), "
                f"got {num_patches} patch tokens"
            )
        return side

    def num_output_tokens(self, num_input_tokens: int) -> int:
        self._side(self._num_patches(num_input_tokens))
        return self.grid**2

    def analytic_flops(self, num_input_tokens: int) -> int:
        c = self._config
        side = self._side(self._num_patches(num_input_tokens))
        flops = sum(
            _block_flops(self.vision_dim if i == 0 else self.hidden_dim, self.hidden_dim, side * side, c.se_ratio)
            for i in range(c.depth)
        )
        flops += c.depth * _block_flops(self.hidden_dim, self.hidden_dim, self.grid**2, c.se_ratio)
        return flops + projector_flops(c.projector, self.hidden_dim, self.llm_dim, self.grid**2)

    def forward(
        self,
        features: torch.Tensor,
        anchor_idx: torch.Tensor | None = None,
        *,
        attention: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``features (B, N, D)`` → ``(B, grid ** 2, llm_dim)``; anchors are ignored."""
        self._check_features(features)
        self._check_mask(key_padding_mask, features)
        self._require_no_padding(key_padding_mask, connector="cabstractor")
        patches = features[:, self.num_prefix_tokens :]  # (B, s*s, D)
        side = self._side(patches.shape[1])
        if self.pos_emb is not None:
            patches = patches + self.pos_emb
        x = rearrange(patches, "b (h w) d -> b d h w", h=side, w=side)
        x = self.stage1(x)  # (B, hidden, s, s)
        x = F.adaptive_avg_pool2d(x, self.grid)  # (B, hidden, grid, grid)
        x = self.stage2(x)
        tokens: torch.Tensor = self.projector(rearrange(x, "b d h w -> b (h w) d"))  # (B, grid**2, llm_dim)
        return tokens
