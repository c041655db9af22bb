"""The resampler layer shared by :class:`~anchor_former.AnchorFormer` and the learned-query Perceiver.

One layer (as in the authors' Perceiver-resampler patch to LLaVA-1.5): ``q = q + Attn(LN_q(q), LN_kv(x))`` then ``q = q + FF(q)`` with
``FF = LayerNorm, Linear(no bias), GELU, Linear(no bias)``. Only where the queries come from differs
between the two connectors (anchor tokens vs learned latents), which is the paper's main ablation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from anchor_former._attention import CrossAttention

__all__ = ["ResamplerLayer", "feed_forward", "resampler_flops", "run_layers"]


def feed_forward(
    dim: int, *, mult: int = 4, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Sequential:
    """``Sequential(LayerNorm(D), Linear(D, mult*D, bias=False), GELU, Linear(mult*D, D, bias=False))``.

    State-dict keys ``0.*`` (norm), ``1.weight``, ``3.weight``, as in the reference.
    """
    dd: dict[str, Any] = {"device": device, "dtype": dtype}
    return nn.Sequential(
        nn.LayerNorm(dim, **dd),
        nn.Linear(dim, dim * mult, bias=False, **dd),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False, **dd),
    )


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention over the context, then a feed-forward block, both residual.

    Args:
        dim: query width D (= context width).
        heads, dim_head: attention heads H and per-head width d.
        ff_mult: hidden width of the feed-forward block is ``ff_mult * D``.
        fused_attn: SDPA (True) or the explicit attention path (False).
        kv_include_queries: keys/values are ``cat(context, queries)`` (Flamingo) instead of the context.
        device, dtype: where and how the parameters are created.

    Submodules: ``attn`` (:class:`~anchor_former._attention.CrossAttention`) and ``ff``
    (:func:`feed_forward`).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        fused_attn: bool = True,
        kv_include_queries: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.attn = CrossAttention(
            dim, heads=heads, dim_head=dim_head, fused_attn=fused_attn, kv_include_queries=kv_include_queries, **dd
        )
        self.ff = feed_forward(dim, mult=ff_mult, **dd)

    def forward(
        self, queries: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``queries (B, K, D)``, ``context (B, N, D)``, ``key_padding_mask (B, N)`` → ``(B, K, D)``."""
        queries = queries + self.attn(queries, context, key_padding_mask=key_padding_mask)
        out: torch.Tensor = queries + self.ff(queries)
        return out


def run_layers(
    layers: nn.ModuleList,
    queries: torch.Tensor,
    context: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    gradient_checkpointing: bool,
) -> torch.Tensor:
    """Apply ``layers`` in order; with ``gradient_checkpointing`` each layer's activations are recomputed
    in the backward pass (only while gradients are being recorded).

    Shapes: ``queries (B, K, D)``, ``context (B, N, D)``, ``key_padding_mask (B, N)`` → ``(B, K, D)``.
    """
    recompute = gradient_checkpointing and torch.is_grad_enabled()
    for layer in layers:
        if recompute:
            queries = checkpoint(layer, queries, context, key_padding_mask, use_reentrant=False)
        else:
            queries = layer(queries, context, key_padding_mask)
    return queries


def resampler_flops(
    *,
    num_queries: int,
    num_tokens: int,
    dim: int,
    depth: int,
    heads: int,
    dim_head: int,
    ff_mult: int,
    kv_include_queries: bool = False,
) -> int:
    """Forward FLOPs per sample of ``depth`` :class:`ResamplerLayer` s (2 per multiply-add; matmuls only).

    ``num_queries`` = K queries, ``num_tokens`` = N context tokens of width ``dim`` = D. Norms, softmax,
    GELU and residual adds are not counted (as in :class:`~torch.utils.flop_counter.FlopCounterMode`).
    """
    inner = heads * dim_head
    keys = num_tokens + (num_queries if kv_include_queries else 0)
    per_layer = (
        num_queries * dim * inner  # to_q
        + keys * dim * 2 * inner  # to_kv
        + 2 * num_queries * keys * inner  # q k^T and probs v
        + num_queries * inner * dim  # to_out
        + 2 * num_queries * dim * ff_mult * dim  # feed-forward
    )
    return 2 * depth * per_layer
