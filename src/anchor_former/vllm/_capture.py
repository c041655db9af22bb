"""The [CLS] attention row of a vLLM vision layer, captured from its fused ``qkv_proj`` output.

vLLM's CLIP layers compute queries, keys and values with one ``QKVParallelLinear`` and never form the
attention map. A forward hook on that projection, attached for one tower forward, sees the queries and
keys the layer really computed (whatever the weights' storage: quantized, LoRA, offloaded) and turns
the [CLS] query's logits into the per-head probabilities the package's anchor search ranks. Under
tensor parallelism the rows of all ranks are gathered (:mod:`anchor_former.vllm._tp`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from anchor_former.vllm._tp import gather_heads

__all__ = ["cls_rows", "run_with_cls_rows"]


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
    width = local_heads * head_dim
    if qkv.ndim != 3 or qkv.shape[-1] != 3 * width:
        raise ValueError(f"qkv must have shape (B, N, 3 * H_r * E) = (B, N, {3 * width}), got {tuple(qkv.shape)}")
    b, n, _ = qkv.shape
    with torch.no_grad():
        q = qkv[:, 0, :width].float().view(b, local_heads, head_dim)  # (B, H_r, E) the [CLS] query
        k = qkv[:, :, width : 2 * width].float().view(b, n, local_heads, head_dim)  # (B, N, H_r, E)
        logits = torch.einsum("bhe,bnhe->bhn", q, k) * scale  # (B, H_r, N)
        return torch.softmax(logits, dim=-1)


def run_with_cls_rows(attention: Any, run: Callable[[], Any]) -> tuple[Any, torch.Tensor]:
    """Run ``run()`` (one tower forward) with a hook on ``attention.qkv_proj``; returns ``(output, rows)``.

    Args:
        attention: a vLLM CLIP-style attention module (``qkv_proj``, ``num_heads``,
            ``num_heads_per_partition``, ``head_dim``, ``scale``): the layer whose [CLS] row ranks the patches.
        run: calls the tower once.

    Returns:
        ``(run's output, (B, H, N) float32 [CLS] rows of all H heads)``.

    Raises:
        RuntimeError: the layer did not run exactly once.
    """
    rows: list[torch.Tensor] = []
    local = int(attention.num_heads_per_partition)

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        qkv = output[0] if isinstance(output, tuple) else output
        rows.append(cls_rows(qkv, local_heads=local, head_dim=int(attention.head_dim), scale=float(attention.scale)))

    handle = attention.qkv_proj.register_forward_hook(hook)
    try:
        output = run()
    finally:
        handle.remove()
    if len(rows) != 1:
        raise RuntimeError(f"the probed attention layer ran {len(rows)} times in one tower forward, expected once")
    return output, gather_heads(rows[0], local_heads=local, total_heads=int(attention.num_heads))
