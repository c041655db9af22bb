"""Anchor scores of a vLLM vision layer, captured from its fused ``qkv_proj`` output.

vLLM's CLIP and SigLIP layers compute queries, keys and values with one ``QKVParallelLinear`` and never
form the attention map. A forward hook on that projection, attached for one tower forward, sees the
queries and keys the layer really computed (whatever the weights' storage: quantized, LoRA, offloaded)
and turns them into the per-head scores the package's anchor search ranks: the [CLS] query's
probabilities (``"cls"``, CLIP) or the attention each token receives averaged over all queries
(``"received"``, SigLIP: no [CLS]; the same :func:`~anchor_former.probes.received_attention` the
transformers adapters' probe computes). Under tensor parallelism the scores of all ranks are gathered
(:mod:`anchor_former.vllm._tp`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from anchor_former.probes import received_attention
from anchor_former.vllm._tp import gather_heads

__all__ = ["cls_rows", "received_rows", "run_with_cls_rows", "run_with_scores"]


def cls_rows(qkv: torch.Tensor, *, local_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """The [CLS] query's attention probabilities over all tokens, per head, float32.

    Args:
        qkv: ``(B, N, 3 * H_r * E)`` the fused projection's output on this rank (``[q | k | v]``).
        local_heads: H_r, the heads of this rank.
        head_dim: E.
        scale: the layer's logit scale.

    Returns:
        ``(B, H_r, N)`` float32, each row a softmax over the N tokens.
    """
    q, k = _queries_keys(qkv, local_heads=local_heads, head_dim=head_dim)  # (B, H_r, N, E) each
    with torch.no_grad():
        logits = torch.einsum("bhe,bhne->bhn", q[:, :, 0].float(), k.float()) * scale  # (B, H_r, N), [CLS] query
        return torch.softmax(logits, dim=-1)


def received_rows(qkv: torch.Tensor, *, local_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """The attention each token receives, averaged over all N queries, per head, float32.

    Args:
        qkv: ``(B, N, 3 * H_r * E)`` the fused projection's output on this rank (``[q | k | v]``).
        local_heads: H_r, the heads of this rank.
        head_dim: E.
        scale: the layer's logit scale.

    Returns:
        ``(B, H_r, N)`` float32, each row summing to 1 (:func:`~anchor_former.probes.received_attention`).
    """
    q, k = _queries_keys(qkv, local_heads=local_heads, head_dim=head_dim)  # (B, H_r, N, E) each
    return received_attention(q, k, scale=scale)


def _queries_keys(qkv: torch.Tensor, *, local_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N, 3 * H_r * E)`` fused ``[q | k | v]`` -> queries and keys ``(B, H_r, N, E)`` each (views)."""
    width = local_heads * head_dim
    if qkv.ndim != 3 or qkv.shape[-1] != 3 * width:
        raise ValueError(f"qkv must have shape (B, N, 3 * H_r * E) = (B, N, {3 * width}), got {tuple(qkv.shape)}")
    b, n, _ = qkv.shape
    q = qkv[..., :width].view(b, n, local_heads, head_dim).transpose(1, 2)
    k = qkv[..., width : 2 * width].view(b, n, local_heads, head_dim).transpose(1, 2)
    return q, k


#: score name -> the function turning a fused projection's output into per-head scores
_SCORES = {"cls": cls_rows, "received": received_rows}


def run_with_cls_rows(attention: Any, run: Callable[[], Any]) -> tuple[Any, torch.Tensor]:
    """:func:`run_with_scores` with ``score="cls"``: ``(run's output, (B, H, N) float32 [CLS] rows)``."""
    return run_with_scores(attention, run, score="cls")


def run_with_scores(attention: Any, run: Callable[[], Any], *, score: str) -> tuple[Any, torch.Tensor]:
    """Run ``run()`` (one tower forward) with a hook on ``attention.qkv_proj``; returns ``(output, scores)``.

    Args:
        attention: a vLLM CLIP- or SigLIP-style attention module (``qkv_proj``, ``num_heads``,
            ``num_heads_per_partition``, ``head_dim``, ``scale``): the layer whose attention ranks the patches.
        run: calls the tower once.
        score: ``"cls"`` (:func:`cls_rows`) or ``"received"`` (:func:`received_rows`).

    Returns:
        ``(run's output, (B, H, N) float32 scores of all H heads)``.

    Raises:
        ValueError: an unknown ``score``.
        RuntimeError: the layer did not run exactly once.
    """
    if score not in _SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, _SCORES))}, got {score!r}")
    rows: list[torch.Tensor] = []
    local = int(attention.num_heads_per_partition)
    scores = _SCORES[score]

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        qkv = output[0] if isinstance(output, tuple) else output
        rows.append(scores(qkv, local_heads=local, head_dim=int(attention.head_dim), scale=float(attention.scale)))

    handle = attention.qkv_proj.register_forward_hook(hook)
    try:
        output = run()
    finally:
        handle.remove()
    if len(rows) != 1:
        raise RuntimeError(f"the probed attention layer ran {len(rows)} times in one tower forward, expected once")
    return output, gather_heads(rows[0], local_heads=local, total_heads=int(attention.num_heads))
