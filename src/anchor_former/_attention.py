"""Multi-head cross-attention of queries over a token set, with an SDPA path and a manual path.

The block is the reference resampler's attention (the authors' patch to LLaVA-1.5): separate pre-norms for the queries
(``norm_latents``) and the keys/values (``norm_media``), bias-free ``to_q``, ``to_kv`` (split into k
and v) and ``to_out``, scale ``dim_head ** -0.5``, softmax over keys. Submodule names follow the
reference layout so its checkpoints map by a prefix rename.

``fused_attn=True`` runs :func:`torch.nn.functional.scaled_dot_product_attention`; ``False`` runs the
explicit ``softmax(q k^T * scale) v``, which is the test reference, the path whose FLOPs
:class:`torch.utils.flop_counter.FlopCounterMode` counts on CPU, and the only path that can return the
attention probabilities. Both give the same result up to rounding.

Key padding masks use one convention everywhere in this package: ``key_padding_mask (B, N)`` is a bool
tensor, **True = a real token** that takes part in attention, False = padding that is ignored (the
convention of SDPA's boolean ``attn_mask``; the opposite of :class:`torch.nn.MultiheadAttention`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["CrossAttention", "attention_probs", "cross_attention"]


def _expand_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, N)`` → ``(B, 1, 1, N)``, broadcast over heads and queries."""
    return None if key_padding_mask is None else key_padding_mask[:, None, None, :]


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities ``softmax(q k^T / sqrt(d))`` over keys, computed explicitly.

    Args:
        q: queries ``(B, H, K, d)``: batch, heads, queries, head width.
        k: keys ``(B, H, N, d)``: N keys.
        key_padding_mask: ``(B, N)`` bool, True = real key; padded keys get probability 0.

    Returns:
        ``(B, H, K, N)`` probabilities in the dtype of ``q``; the softmax runs in at least float32.
    """
    scale = q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, K, N)
    mask = _expand_mask(key_padding_mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # Half-precision scores are normalised in float32; float32/float64 stay as they are.
    weights: torch.Tensor = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    return weights.to(q.dtype)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` by SDPA (``fused=True``) or explicitly (``fused=False``).

    Args:
        q: ``(B, H, K, d)`` queries.
        k: ``(B, H, N, d)`` keys.
        v: ``(B, H, N, d)`` values.
        key_padding_mask: ``(B, N)`` bool, True = real key. Every row needs at least one True.
        fused: use :func:`torch.nn.functional.scaled_dot_product_attention`.

    Returns:
        ``(B, H, K, d)``.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_expand_mask(key_padding_mask))
    return attention_probs(q, k, key_padding_mask=key_padding_mask) @ v


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention: queries ``x`` attend over ``context``.

    Args:
        dim: query width D (and output width).
        context_dim: key/value input width; defaults to ``dim``.
        heads: H.
        dim_head: per-head width d; the inner width is ``H * d``.
        fused_attn: SDPA (True) or the explicit path (False).
        kv_include_queries: also attend over the (normed) queries, i.e. keys/values are
            ``cat(context, x)`` as in Flamingo's resampler; False in the AcFormer reference.
        device, dtype: where and how the parameters are created.

    Parameters (state-dict keys): ``norm_media`` (LayerNorm on the context), ``norm_latents`` (LayerNorm
    on the queries), ``to_q (H*d, D)``, ``to_kv (2*H*d, C)`` (k rows first, then v), ``to_out (D, H*d)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        fused_attn: bool = True,
        kv_include_queries: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        context_dim = dim if context_dim is None else context_dim
        if kv_include_queries and context_dim != dim:
            raise ValueError(
                f"kv_include_queries=True concatenates queries to the context, so context_dim must equal dim, "
                f"got context_dim={context_dim}, dim={dim}"
            )
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.fused_attn = fused_attn
        self.kv_include_queries = kv_include_queries
        self.norm_media = nn.LayerNorm(context_dim, **dd)
        self.norm_latents = nn.LayerNorm(dim, **dd)
        self.to_q = nn.Linear(dim, inner, bias=False, **dd)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False, **dd)
        self.to_out = nn.Linear(inner, dim, bias=False, **dd)

    def _qkv(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents = self.norm_latents(x)  # (B, K, D)
        media = self.norm_media(context)  # (B, N, C)
        if self.kv_include_queries:
            media = torch.cat([media, latents], dim=1)  # (B, N + K, D), Flamingo-style
        q = rearrange(self.to_q(latents), "b k (h d) -> b h k d", h=self.heads)
        k, v = rearrange(self.to_kv(media), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        return q, k, v

    def _kv_mask(self, key_padding_mask: torch.Tensor | None, num_queries: int) -> torch.Tensor | None:
        if key_padding_mask is None or not self.kv_include_queries:
            return key_padding_mask
        ones = key_padding_mask.new_ones(key_padding_mask.shape[0], num_queries)
        return torch.cat([key_padding_mask, ones], dim=1)  # (B, N + K), queries are always real

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from the queries over the context.

        Args:
            x: queries ``(B, K, D)``.
            context: keys/values ``(B, N, C)``.
            key_padding_mask: ``(B, N)`` bool, True = real token.

        Returns:
            ``(B, K, D)``, the attention output after ``to_out`` (the caller adds the residual).
        """
        q, k, v = self._qkv(x, context)
        mask = self._kv_mask(key_padding_mask, x.shape[1])
        out = cross_attention(q, k, v, key_padding_mask=mask, fused=self.fused_attn)  # (B, H, K, d)
        projected: torch.Tensor = self.to_out(rearrange(out, "b h k d -> b k (h d)"))  # (B, K, D)
        return projected

    def attention_weights(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention probabilities of :meth:`forward` (explicit path), ``(B, H, K, N)``.

        With ``kv_include_queries`` the last axis is ``N + K`` (context tokens first).
        """
        q, k, _ = self._qkv(x, context)
        mask = self._kv_mask(key_padding_mask, x.shape[1])
        return attention_probs(q, k, key_padding_mask=mask)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, dim_head={self.dim_head}, fused_attn={self.fused_attn}, "
            f"kv_include_queries={self.kv_include_queries}"
        )
