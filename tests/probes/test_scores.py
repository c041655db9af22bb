"""``received_attention`` against the column mean of a fully materialised attention map."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchor_former.probes import attention_row, received_attention

# float32 blocked sums against a float64 reference: measured max error 6e-8 on these sizes
ATOL = 1e-6


def reference_received(q, k, scale, padding=None):
    """Column mean of softmax(scale * q k^T) over the non-padding queries, in float64, the obvious way."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale  # (B, H, N, N), rows are queries
    if padding is not None:
        logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    if padding is None:
        return probs.mean(2)
    keep = (~padding).double()[:, None, :, None]  # (B, 1, N, 1) query weights
    return (probs * keep).sum(2) / keep.sum(2).clamp_min(1)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    tokens=st.integers(1, 24),
    width=st.integers(1, 8),
    block=st.integers(1, 60),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_column_mean(batch, heads, tokens, width, block, padded, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, batch, heads, tokens, width, generator=g)
    padding = None
    if padded:
        lengths = torch.randint(1, tokens + 1, (batch,), generator=g)
        padding = torch.arange(tokens)[None, :] >= lengths[:, None]  # (B, N) True = padding
    scale = width**-0.5
    real = None if padding is None else ~padding  # the package's convention: True = real token
    got = received_attention(q, k, scale=scale, block_size=block, key_padding_mask=real)
    assert got.shape == (batch, heads, tokens) and got.dtype == torch.float32
    expected = reference_received(q, k, scale, padding)
    torch.testing.assert_close(got, expected.float(), atol=ATOL, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(batch, heads), atol=1e-5, rtol=0)
    if padding is not None:
        assert (got.masked_select(padding[:, None, :]) == 0).all()


def test_tolerance_bites_on_broken_variants() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 4, 50, 16, generator=g) * 2
    expected = reference_received(q, k, 16**-0.5).float()
    row_mean = ((q @ k.transpose(-1, -2)) * 16**-0.5).softmax(-1).mean(3)  # mean over keys: uniform 1/N rows
    wrong_scale = received_attention(q, k, scale=1.0)  # the 1/sqrt(E) forgotten
    wrong_rows = ((q @ k.transpose(-1, -2)) * 16**-0.5).softmax(-2).mean(3)  # softmax over queries
    for broken in (row_mean.expand_as(expected), wrong_scale, wrong_rows):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(broken, expected, atol=ATOL, rtol=0)


def test_block_size_changes_nothing_but_memory() -> None:
    q, k = torch.randn(2, 3, 5, 40, 8)
    full = received_attention(q, k, scale=0.3, block_size=10_000)
    for block in (1, 7, 40, 41, 120):
        torch.testing.assert_close(received_attention(q, k, scale=0.3, block_size=block), full, atol=1e-7, rtol=0)


def test_only_padding_gives_zeros_half_precision_and_autocast() -> None:
    q, k = torch.randn(2, 2, 3, 6, 4)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1] = True
    got = received_attention(q, k, scale=0.5, key_padding_mask=~padding)
    assert torch.isfinite(got).all() and (got[1] == 0).all()
    half = received_attention(q.bfloat16(), k.bfloat16(), scale=0.5)
    assert half.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = received_attention(q, k, scale=0.5)
    torch.testing.assert_close(mixed, received_attention(q, k, scale=0.5), atol=0, rtol=0)


def test_no_autograd() -> None:
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    assert not received_attention(q, q, scale=0.5).requires_grad


def test_errors() -> None:
    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, N, E\), got shape \(3, 5, 4\)"):
        received_attention(q[0], q[0], scale=1.0)
    with pytest.raises(ValueError, match=r"k must have the shape of q \(2, 3, 5, 4\).*got shape \(2, 3, 4, 4\)"):
        received_attention(q, q[:, :, :4], scale=1.0)
    with pytest.raises(ValueError, match="q must be a floating-point tensor"):
        received_attention(q.long(), q.long(), scale=1.0)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        received_attention(q, q, scale=1.0, block_size=0)
    with pytest.raises(
        ValueError,
        match=r"key_padding_mask must be a bool tensor of shape \(2, 5\) \(B, N\), got "
        r"torch.float32 of shape \(2, 5\)",
    ):
        received_attention(q, q, scale=1.0, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"got torch.bool of shape \(2, 4\)"):
        received_attention(q, q, scale=1.0, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def reference_row(q0, k, scale, padding=None):
    """softmax(scale * q0 . k_j) over j, in float64, the obvious way: one (b, h) at a time."""
    batch, heads, num, _ = k.shape
    out = torch.zeros(batch, heads, num, dtype=torch.float64)
    for b in range(batch):
        real = torch.ones(num, dtype=torch.bool) if padding is None else padding[b]
        for h in range(heads):
            if not real.any():
                continue
            logits = (k[b, h, real].double() @ q0[b, h].double()) * scale
            out[b, h, real] = logits.softmax(-1)
    return out


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 20),
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 8),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_row_equals_explicit_attention(batch, tokens, heads, head_dim, padded, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    q0 = torch.randn(batch, heads, head_dim, generator=g)
    k = torch.randn(batch, heads, tokens, head_dim, generator=g)
    real = torch.rand(batch, tokens, generator=g) > 0.3 if padded else None
    row = attention_row(q0, k, scale=head_dim**-0.5, key_padding_mask=real)
    assert row.shape == (batch, heads, tokens) and row.dtype == torch.float32
    torch.testing.assert_close(row, reference_row(q0, k, head_dim**-0.5, real).float(), atol=1e-6, rtol=1e-5)


def test_row_refuses_bad_shapes() -> None:
    k = torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match=r"query must have shape \(2, 4, 8\) \(B, H, E\).*got shape \(2, 8\)"):
        attention_row(torch.randn(2, 8), k, scale=1.0)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \(2, 5\)"):
        attention_row(torch.randn(2, 4, 8), k, scale=1.0, key_padding_mask=torch.ones(2, 5))
