"""Smoke test of the analytic LLaVA-NeXT rows (``benchmarks/anyres_rows.py``), checked by hand counts."""

from __future__ import annotations

import pytest

from anchor_former import flops
from benchmarks.anyres_rows import analytic_anyres, to_markdown


def test_672_image_rows_match_hand_counts() -> None:
    result = analytic_anyres()
    assert result["views"] == 5 and result["grid"] == [2, 2]
    rows = {(r["llm_shape"], r["case"]): r for r in result["results"]}
    # stock: 576 base + a 48 x 48 grid + one newline per grid row; select K/view: 5 K + 48 newlines;
    # acformer: 5 (K + 1) + one newline per row of crops
    expected = {
        "stock": 576 + 48 * 48 + 48,
        "select-144/view": 5 * 144 + 48,
        "select-64/view": 5 * 64 + 48,
        "select-576/image": 576 + 48,
        "acformer-144/view": 5 * 145 + 2,
    }
    for case, tokens in expected.items():
        row = rows[("llama-7b", case)]
        assert row["visual_tokens"] == tokens
        assert row["llm_flops"] == flops.llm_prefill_flops(flops.LLAMA_7B, tokens + 64)
        assert row["vit_flops"] == 5 * flops.vit_forward_flops(flops.CLIP_VIT_L14_336)
    assert rows[("llama-13b", "stock")]["kv_cache_bytes"] == flops.kv_cache_bytes(flops.LLAMA_13B, 2928 + 64)
    assert "| llama-7b | select-144/view | 768 (48) |" in to_markdown(result)


def test_measured_case_runs_and_counts_tokens() -> None:
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the LLaVA-NeXT adapter needs transformers >= 5")
    from benchmarks.anyres_rows import measured_anyres

    result = measured_anyres(preset="tiny", per_view=4, rounds=1, min_block_s=0.0)
    rows = result["results"]
    # tiny: 7 x 7 patches per view, 2 x 2 crops, no unpadding: 49 + 14 * 14 + 14 newlines; select: 5 * 4 + 14
    assert rows["stock"]["visual_tokens"] == 49 + 14 * 14 + 14
    assert rows["select-4/view"]["visual_tokens"] == 5 * 4 + 14
    assert all(row["median_ms"] > 0 for row in rows.values())
