"""Anchor scores computed from tensors alone (no model, no hooks): one query's attention row, received
attention and token norms.

All are float32 and detached; they are what :func:`anchor_former.anchor_search` ranks. The probe
(:class:`anchor_former.probes.AttentionProbe`) calls them on the queries and keys its hooks read from the
attention's own projections; adapters that compute a layer's queries and keys themselves (e.g. with their
own rotary embedding, per image of a packed sequence) call :func:`received_attention` directly.
"""

from __future__ import annotations

import torch

from anchor_former._validation import check_floating, check_ndim, check_positive_int, shape_str

__all__ = ["DEFAULT_BLOCK_SIZE", "attention_row", "received_attention", "token_norm_scores"]

#: query rows whose attention logits are held at once by :func:`received_attention`: 4096 rows of N
#: float32 logits, 9 MiB at N = 577 (ViT-L/14-336), 60 MiB at N = 3840 (a 32-frame video of 120 tokens).
DEFAULT_BLOCK_SIZE = 4096


def _check_padding(key_padding_mask: torch.Tensor | None, batch: int, num: int) -> None:
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, num)
    ):
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape ({batch}, {num}) (B, N), got "
            f"{key_padding_mask.dtype} of shape {shape_str(key_padding_mask)}"
        )


def attention_row(
    query: torch.Tensor, k: torch.Tensor, *, scale: float, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One query's attention probabilities over all keys, per head: ``softmax_j(scale * query[b, h] . k[b, h, j])``.

    Float32 with autocast off and without autograd; the work is ``B * H * N * E`` multiply-adds and nothing
    ``(N, N)`` exists.

    Args:
        query: ``(B, H, E)`` the query of each image and head (the [CLS] token's, or a pooling head's
            learned probe) after every transform the layer applies, before the scale.
        k: ``(B, H, N, E)`` the layer's keys, likewise.
        scale: the logit scale the layer uses (usually ``E ** -0.5``).
        key_padding_mask: ``(B, N)`` bool, True = real token (as in :func:`received_attention`); padding
            keys get probability 0, and an image with only padding gets all zeros.

    Returns:
        ``(B, H, N)`` float32, each ``(b, h)`` row summing to 1 over its real tokens.

    Raises:
        ValueError: ``query`` / ``k`` not floating tensors of shapes ``(B, H, E)`` / ``(B, H, N, E)``,
            ``key_padding_mask`` not a bool ``(B, N)`` tensor.
    """
    check_ndim("k", k, (4,), "(B, H, N, E)")
    check_floating("k", k)
    check_floating("query", query)
    batch, heads, num, width = k.shape
    if tuple(query.shape) != (batch, heads, width):
        raise ValueError(
            f"query must have shape ({batch}, {heads}, {width}) (B, H, E) to match k of shape {shape_str(k)}, "
            f"got shape {shape_str(query)}"
        )
    _check_padding(key_padding_mask, batch, num)
    with torch.no_grad(), torch.autocast(device_type=k.device.type, enabled=False):
        logits = torch.einsum("bhe,bhne->bhn", query.detach().float(), k.detach().float()) * scale  # (B, H, N)
        if key_padding_mask is None:
            return torch.softmax(logits, dim=-1)
        padding = ~key_padding_mask.to(logits.device).unsqueeze(1)  # (B, 1, N) True = padding
        probs = torch.softmax(logits.masked_fill(padding & ~padding.all(-1, keepdim=True), float("-inf")), dim=-1)
        return probs.masked_fill(padding, 0.0)  # an image with only padding: all zeros


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention each token receives, averaged over all queries, per head, without the N x N map.

    ``received[b, h, j] = mean_i softmax_j(scale * q[b, h, i] . k[b, h, j])``: the column mean of the
    layer's attention probabilities (rows are queries). Each ``(b, h)`` row sums to 1. Computed in float32
    with autocast off and without autograd, in blocks of query rows: at most ``block_size`` rows of N
    logits (and their probabilities) exist at once, so the extra memory is ``O(B * H * N + block_size * N)``
    besides float32 copies of ``q`` and ``k``; the work is ``2 * B * H * N * N * E`` multiply-adds, the
    same matmul as the layer's own ``q @ k^T``.

    Args:
        q: ``(B, H, N, E)`` queries of the layer after every transform the layer applies (bias, q-norm,
            rotary embedding), before the scale; B images, H heads, N tokens, E head width.
        k: ``(B, H, N, E)`` keys, likewise.
        scale: the logit scale the layer uses (usually ``E ** -0.5``).
        block_size: query rows per step (>= 1); one step holds ``min(block_size, N)`` queries of
            ``max(1, block_size // N)`` (image, head) pairs. Only memory and speed depend on it.
        key_padding_mask: ``(B, N)`` bool, **True = real token**, False = padding (the convention of every
            ``key_padding_mask`` in this package: connectors, :func:`~anchor_former.anchor_search`; the
            opposite of ``nn.MultiheadAttention``'s). Padding tokens are masked out as keys (they receive 0)
            and are left out of the mean over queries; an image with only padding gets all zeros.

    Returns:
        ``(B, H, N)`` float32, each ``(b, h)`` row summing to 1 over its non-padding tokens.

    Raises:
        ValueError: ``q`` / ``k`` not floating ``(B, H, N, E)`` tensors of the same shape, ``block_size``
            not a positive int, ``key_padding_mask`` not a bool ``(B, N)`` tensor.
    """
    check_ndim("q", q, (4,), "(B, H, N, E)")
    check_floating("q", q)
    check_floating("k", k)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {shape_str(q)} (B, H, N, E), got shape {shape_str(k)}")
    check_positive_int("block_size", block_size)
    batch, heads, num, width = q.shape
    _check_padding(key_padding_mask, batch, num)
    with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
        qf = q.detach().float().reshape(batch * heads, num, width)  # (B*H, N, E)
        kt = k.detach().float().reshape(batch * heads, num, width).transpose(1, 2)  # (B*H, E, N)
        if key_padding_mask is None:
            keep = None
            weight = torch.full((batch * heads, 1, num), 1.0 / max(num, 1), device=q.device)  # (B*H, 1, N)
            key_bias = torch.zeros(1, 1, num, device=q.device)  # (1, 1, N)
        else:
            keep = key_padding_mask.to(q.device)  # (B, N) True = real token
            counts = keep.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
            weight = (keep.float() / counts).repeat_interleave(heads, 0).unsqueeze(1)  # (B*H, 1, N) query weights
            # -inf at padding keys; an image with only padding keeps finite logits (its query weights are 0)
            key_bias = torch.zeros(batch, num, device=q.device).masked_fill(
                ~keep & keep.any(-1, keepdim=True), float("-inf")
            )
            key_bias = key_bias.repeat_interleave(heads, 0).unsqueeze(1)  # (B*H, 1, N) added to every logit row
        out = torch.zeros(batch * heads, 1, num, device=q.device)  # (B*H, 1, N)
        rows = min(block_size, num) if num else 1
        pairs = max(1, block_size // max(num, 1))
        for g0 in range(0, batch * heads, pairs):
            g1 = min(g0 + pairs, batch * heads)
            for i0 in range(0, num, rows):
                i1 = min(i0 + rows, num)
                bias = key_bias if keep is None else key_bias[g0:g1]
                # one fused op for scale * q k^T + key bias, so a block holds two (g, rows, N) buffers at most
                logits = torch.baddbmm(bias, qf[g0:g1, i0:i1], kt[g0:g1], alpha=scale)  # (g, rows, N)
                probs = torch.softmax(logits, dim=-1)
                del logits
                out[g0:g1] += torch.bmm(weight[g0:g1, :, i0:i1], probs)  # (g, 1, N) weighted column sums
        return out.view(batch, heads, num)


def token_norm_scores(features: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm, a [CLS]-free anchor score: the high-norm tokens of a ViT layer.

    Large ViTs trained without registers grow a few high-norm "artifact" tokens that carry global
    information (Darcet et al., "Vision Transformers Need Registers"); they are probably the tokens the
    [CLS] query attends to, and this score finds them in any encoder, with or without [CLS].

    Args:
        features: ``(B, N, D)`` hidden states of one layer.

    Returns:
        ``(B, N)`` float32 norms, without autograd; pass to ``anchor_search`` as one score per token.
    """
    check_ndim("features", features, (3,), "(B, N, D)")
    check_floating("features", features)
    with torch.no_grad():
        norms: torch.Tensor = torch.linalg.vector_norm(features.detach(), dim=-1, dtype=torch.float32)
        return norms
