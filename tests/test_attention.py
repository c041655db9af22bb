"""Tests for anchor_former._attention against an explicit per-sample, per-head loop."""

from __future__ import annotations

import math

import pytest
import torch

from anchor_former._attention import CrossAttention, attention_probs, cross_attention


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Loops over samples, heads and queries; softmax written out with exp and a sum over real keys."""
    b, h, nq, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        keys = [j for j in range(k.shape[2]) if mask is None or bool(mask[bi, j])]
        for hi in range(h):
            for qi in range(nq):
                logits = torch.stack([(q[bi, hi, qi] * k[bi, hi, j]).sum() / math.sqrt(d) for j in keys])
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                out[bi, hi, qi] = sum(w * v[bi, hi, j] for w, j in zip(weights, keys, strict=True))
    return out


def random_mask(b: int, n: int) -> torch.Tensor:
    mask = torch.rand(b, n) > 0.4
    mask[:, 0] = True  # every sample keeps a real key
    return mask


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_cross_attention_matches_naive_loop(fused: bool, masked: bool) -> None:
    q = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    mask = random_mask(2, 7) if masked else None
    out = cross_attention(q, k, v, key_padding_mask=mask, fused=fused)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask), atol=1e-10, rtol=1e-10)


def test_attention_probs_are_distributions_with_zero_on_padding() -> None:
    q, k = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 9, 4)
    mask = random_mask(3, 9)
    probs = attention_probs(q, k, key_padding_mask=mask)
    assert probs.shape == (3, 2, 5, 9)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 5), atol=1e-6, rtol=0)
    assert bool((probs.masked_select(~mask[:, None, None, :].expand_as(probs)) == 0).all())


@pytest.mark.parametrize("kv_include_queries", [False, True])
def test_module_fused_equals_manual_and_weights_reproduce_output(kv_include_queries: bool) -> None:
    attn = CrossAttention(16, heads=2, dim_head=8, kv_include_queries=kv_include_queries).double()
    x, context = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    mask = random_mask(2, 6)
    fused = attn(x, context, key_padding_mask=mask)
    attn.fused_attn = False
    manual = attn(x, context, key_padding_mask=mask)
    torch.testing.assert_close(fused, manual, atol=1e-12, rtol=1e-12)

    # Rebuild the output from the returned weights and values computed by hand.
    weights = attn.attention_weights(x, context, key_padding_mask=mask)
    n_kv = 6 + (3 if kv_include_queries else 0)
    assert weights.shape == (2, 2, 3, n_kv)
    media = attn.norm_media(context)
    if kv_include_queries:
        media = torch.cat([media, attn.norm_latents(x)], dim=1)
    v = (media @ attn.to_kv.weight[16:].T).view(2, n_kv, 2, 8).transpose(1, 2)  # (B, H, N, d)
    out = (weights @ v).transpose(1, 2).reshape(2, 3, 16) @ attn.to_out.weight.T
    torch.testing.assert_close(manual, out, atol=1e-12, rtol=1e-12)


def test_module_shapes_and_bias_free_layout() -> None:
    attn = CrossAttention(12, context_dim=20, heads=3, dim_head=4)
    shapes = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert shapes == {
        "norm_media.weight": (20,),
        "norm_media.bias": (20,),
        "norm_latents.weight": (12,),
        "norm_latents.bias": (12,),
        "to_q.weight": (12, 12),
        "to_kv.weight": (24, 20),
        "to_out.weight": (12, 12),
    }
    assert attn(torch.randn(2, 5, 12), torch.randn(2, 9, 20)).shape == (2, 5, 12)


def test_kv_include_queries_needs_equal_widths() -> None:
    with pytest.raises(ValueError, match="context_dim must equal dim"):
        CrossAttention(12, context_dim=20, kv_include_queries=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fused_matches_manual_in_half_precision(dtype: torch.dtype) -> None:
    attn = CrossAttention(64, heads=4, dim_head=16, device="cuda", dtype=dtype)
    x, context = torch.randn(4, 9, 64, device="cuda", dtype=dtype), torch.randn(4, 50, 64, device="cuda", dtype=dtype)
    mask = random_mask(4, 50).cuda()
    fused = attn(x, context, key_padding_mask=mask)
    attn.fused_attn = False
    manual = attn(x, context, key_padding_mask=mask)
    torch.testing.assert_close(fused.float(), manual.float(), atol=2e-2, rtol=2e-2)
