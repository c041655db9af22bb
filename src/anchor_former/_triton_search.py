"""The anchor search as one Triton kernel (``anchor_search(..., method="triton")``; CUDA, opt-in).

One program per sample holds the sample's keys in registers and walks the heads in order: per head it
loads the [CLS] row, strikes out the tokens earlier heads took, finds the quota-th best key with one
``tl.topk`` and marks every key at least that large. The result rows are written by a cumulative sum
over the taken mask. Keys are those of the PyTorch paths — the order-preserving integer image of the
float32 score in the high 32 bits, ``N - 1 - token`` in the low ones — so the result is identical,
ties included.

Imported only when the method is asked for: Triton is optional (it ships with CUDA builds of PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_search"]

_INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))
_INT64_MAX: tl.constexpr = tl.constexpr(2**63 - 1)
_PADDED: tl.constexpr = tl.constexpr(-(2**63) + 1)


@triton.jit
def _search_kernel(
    scores_ptr,  # (B, H, N) scores, any float dtype read as float32
    out_ptr,  # (B, K + include_cls) int64
    bad_ptr,  # (B,) int32: non-finite scores seen per sample
    mask_ptr,  # (B, N) bool, True = real token (read only when HAS_MASK)
    num_heads,
    num_tokens,
    num_prefix,
    quota_base,  # every head adds quota_base, the first quota_extra heads one more
    quota_extra,
    stride_b,
    stride_h,
    stride_n,
    out_stride_b,
    mask_stride_b,
    mask_stride_n,
    HAS_MASK: tl.constexpr,
    INCLUDE_CLS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= N
    TOP: tl.constexpr,  # next power of two >= the largest quota
):
    # Offsets in int64: h * stride_h and t * stride_n pass 2**31 for full maps beyond ~12k tokens.
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_N)  # token index
    t64 = t.to(tl.int64)
    in_row = t < num_tokens
    candidate = in_row & (t >= num_prefix)
    rank = (num_tokens - 1 - t).to(tl.int64)  # ties: lower token index first
    if HAS_MASK:
        real = tl.load(mask_ptr + b * mask_stride_b + t64 * mask_stride_n, mask=in_row, other=0) != 0
    else:
        real = in_row
    taken = tl.zeros([BLOCK_N], dtype=tl.int1)
    bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    slot = tl.arange(0, TOP)
    row_ptr = scores_ptr + b * stride_b  # advanced by stride_h per head: never h * stride_h in 32 bits
    for h in range(num_heads):
        x = tl.load(row_ptr + t64 * stride_n, mask=in_row, other=0.0)
        row_ptr += stride_h
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bad += ((bits & 0x7F800000) == 0x7F800000).to(tl.int32)
        sign = bits >> 31  # -1 for negative floats, else 0
        ordered = (bits ^ (sign & 0x7FFFFFFF)) - sign  # same order as the floats; -0.0 == +0.0
        key = (ordered.to(tl.int64) << 32) | rank
        # Padded tokens sit below every real key but stay distinct (_PADDED + rank); taken ones lowest.
        key = tl.where(real, key, _PADDED + rank)
        key = tl.where(candidate & (taken == 0), key, _INT64_MIN)
        quota = quota_base + (h < quota_extra).to(tl.int32)
        best = tl.topk(key, TOP)  # (TOP,) best first
        worst_kept = tl.min(tl.where(slot < quota, best, _INT64_MAX))  # the quota-th best key
        taken = taken | (key >= worst_kept)
    tl.store(bad_ptr + b, tl.sum(bad))
    position = tl.cumsum(taken.to(tl.int32), 0) - 1 + INCLUDE_CLS  # output column of each taken token
    row_out = out_ptr + b * out_stride_b
    tl.store(row_out + position, t.to(tl.int64), mask=taken)
    if INCLUDE_CLS:
        tl.store(row_out, tl.zeros([], dtype=tl.int64))


def triton_search(
    scores: torch.Tensor,
    quotas: tuple[int, ...],
    *,
    num_prefix_tokens: int,
    include_cls: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on ``scores (B, H, N)`` (float32/fp16/bf16, any strides); padded tokens
    (``key_padding_mask (B, N)`` False) are never anchors.

    Returns ``anchors (B, K + 1)`` or ``(B, K)`` and ``bad (B,)``, the number of non-finite scores per
    sample (left on the device: reading it is the caller's choice).
    """
    b, h, n = scores.shape
    base, extra = quotas[-1], sum(1 for q in quotas if q > quotas[-1])  # anchor_quotas' spread
    out = torch.empty(b, sum(quotas) + int(include_cls), dtype=torch.int64, device=scores.device)
    bad = torch.empty(b, dtype=torch.int32, device=scores.device)
    if b == 0:
        return out, bad
    block_n = max(triton.next_power_of_2(n), 2)  # tl.topk needs at least two elements
    top = max(triton.next_power_of_2(max(quotas)), 2)  # <= block_n: a quota never exceeds N
    mask = bad if key_padding_mask is None else key_padding_mask  # a placeholder pointer without a mask
    mask_strides = (0, 0) if key_padding_mask is None else key_padding_mask.stride()
    _search_kernel[(b,)](
        scores, out, bad, mask, h, n, num_prefix_tokens, base, extra,
        *scores.stride(), out.stride(0), *mask_strides,
        HAS_MASK=key_padding_mask is not None, INCLUDE_CLS=int(include_cls), BLOCK_N=block_n, TOP=top,
        num_warps=4 if block_n <= 1024 else 8,
    )  # fmt: skip
    return out, bad
