"""Tensor parallelism: the anchor scores must not depend on how many ranks share the vision tower.

vLLM splits a vision attention layer's heads over the tensor-parallel ranks (``QKVParallelLinear``: rank
r computes heads ``r * H_r ... (r + 1) * H_r - 1``). A hook on that layer's projection sees only its
rank's heads, so each rank would rank the patches by a different subset of heads and pick different
anchors. :func:`gather_heads` all-gathers the per-head scores in head order, so every rank ranks with
all H heads, exactly as with one rank.
"""

from __future__ import annotations

import torch

__all__ = ["gather_heads"]


def gather_heads(scores: torch.Tensor, *, local_heads: int, total_heads: int, dim: int = 1) -> torch.Tensor:
    """All H heads' scores from each rank's ``local_heads`` (a no-op when the layer is not split).

    Args:
        scores: this rank's per-head scores, heads along ``dim``, e.g. ``(B, H_r, N)``.
        local_heads: H_r, the heads of this rank.
        total_heads: H, the layer's heads.
        dim: the head dimension of ``scores``.

    Returns:
        ``scores`` with H heads along ``dim`` (rank order = head order), identical on every rank.

    Raises:
        ValueError: ``scores`` has not ``local_heads`` heads, or the gather does not give ``total_heads``.
    """
    if scores.shape[dim] != local_heads:
        raise ValueError(
            f"scores must hold local_heads={local_heads} heads along dim {dim}, got shape {tuple(scores.shape)}"
        )
    if local_heads == total_heads:
        return scores
    from vllm.distributed import tensor_model_parallel_all_gather

    gathered = tensor_model_parallel_all_gather(scores.contiguous(), dim=dim)
    if gathered.shape[dim] != total_heads:
        raise ValueError(
            f"gathering {local_heads} heads per rank gave {gathered.shape[dim]} heads, expected total_heads={total_heads}"
        )
    return gathered
