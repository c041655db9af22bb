"""The analytic LLaVA-OneVision video rows (``benchmarks/video_rows.py``) against hand-written formulas."""

from __future__ import annotations

import pytest

from benchmarks.video_rows import QWEN2_7B, SIGLIP_SO400M_384, to_markdown, video_rows


def _prefill(s: int) -> int:
    """Qwen2-7B prefill of ``s`` tokens, written out: q/k/v/o, dense attention, SwiGLU, LM head on one token."""
    d, layers, heads, kv, f, vocab, h = 3584, 28, 28, 4, 18944, 152064, 128
    layer = 2 * s * d * (heads * h + 2 * kv * h) + 2 * s * heads * h * d + 4 * s * s * heads * h + 6 * s * d * f
    return layers * layer + 2 * d * vocab


def test_rows_for_32_frames() -> None:
    rows = video_rows(frames=32, frame_budgets=(64, 16), text_tokens=64)
    assert [r["tokens_per_frame"] for r in rows] == [196, 64, 16]  # the stock row first
    assert [r["visual_tokens"] for r in rows] == [32 * 196 + 1, 32 * 64 + 1, 32 * 16 + 1]
    for r in rows:
        s = r["visual_tokens"] + 64
        assert r["llm_flops"] == _prefill(s)
        assert r["kv_cache_bytes"] == 2 * 28 * s * 4 * 128 * 2  # K and V, 28 layers, 4 kv heads x 128, bf16
        assert r["projector_flops"] == 32 * 2 * 729 * (1152 * 3584 + 3584 * 3584)  # before the pooling: all 729
    assert rows[0]["probe_flops"] == 0 and rows[1]["probe_flops"] == 32 * (4 * 729 * 1152**2 + 2 * 729**2 * 1152)
    assert rows[0]["llm_vs_full"] == 1.0 and 0.07 < rows[2]["llm_vs_full"] < 0.09
    assert SIGLIP_SO400M_384.num_patches == 729 and QWEN2_7B.head_dim == 128
    assert "| 196 | 6273 |" in to_markdown(rows)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"frames": 0}, "frames must be an integer >= 1, got 0"),
        (
            {"frame_budgets": (197,)},
            r"frame_budgets entries must be integers in "
            r"\[1, 196\].*got 197",
        ),
    ],
)
def test_bad_input(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        video_rows(**kwargs)
