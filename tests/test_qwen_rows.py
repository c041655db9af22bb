"""Smoke and formula checks of ``benchmarks/qwen_rows.py`` (analytic Qwen2.5-VL-7B rows)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(
        "Qwen2.5-VL needs transformers >= 5 (the benchmark's shapes come from its processor)", allow_module_level=True
    )
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from anchor_former.adapters.hf.qwen_vl import merged_token_scores  # noqa: E402
from anchor_former.flops import kv_cache_bytes, llm_prefill_flops  # noqa: E402
from benchmarks.qwen_rows import QWEN2_5_VL_7B_LLM, probe_flops, qwen_rows, tower_flops, tower_rows  # noqa: E402


def test_rows_count_the_kept_tokens() -> None:
    rows = qwen_rows(text_tokens=64)
    image = [r for r in rows if r["case"].startswith("image")]
    video = [r for r in rows if r["case"].startswith("video")]
    assert [r["visual_tokens"] for r in image] == [1196, 256, 144, 64]  # 52 x 92 patches / 4
    assert [r["visual_tokens"] for r in video] == [11520, 16 * 256, 16 * 144, 16 * 64]  # 16 steps of 40 x 72 / 4
    for r in rows:
        assert r["prefill_flops"] == llm_prefill_flops(QWEN2_5_VL_7B_LLM, r["visual_tokens"] + 64)
        assert r["kv_cache_bytes_bf16"] == kv_cache_bytes(QWEN2_5_VL_7B_LLM, r["visual_tokens"] + 64)
    assert all(0 < r["probe_over_tower"] < 0.05 for r in tower_rows())


def test_tower_and_probe_formulas_match_the_flop_counter() -> None:
    """The formulas at a tiny Qwen2.5-VL tower's shapes against FlopCounterMode on the real module."""
    vision = {
        "depth": 4,
        "hidden_size": 32,
        "num_heads": 4,
        "intermediate_size": 48,
        "patch_size": 8,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 32,
        "fullatt_block_indexes": (1, 3),
        "out_hidden_size": 48,
        "in_channels": 3,
    }
    config = Qwen2_5_VLConfig(
        vision_config={k: list(v) if isinstance(v, tuple) else v for k, v in vision.items() if k not in ("merge_size",)}
        | {"spatial_merge_size": 2},
        text_config={
            "vocab_size": 16,
            "hidden_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 32,
        },
    )
    tower = Qwen2_5_VLForConditionalGeneration(config).model.visual.eval()
    tower.set_attn_implementation("eager")  # every attention product is a counted matmul
    grid = (2, 6, 8)
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 8 * 8)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tower(pixels, grid_thw=torch.tensor([grid]))
    assert counter.get_total_flops() == tower_flops(vision, grid)
    captured = {}
    block = vision["fullatt_block_indexes"][-1]
    handle = tower.blocks[block].attn.register_forward_pre_hook(
        lambda m, a, kw: captured.update(x=a[0], cu=kw["cu_seqlens"], pe=kw["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        tower(pixels, grid_thw=torch.tensor([grid]))
    handle.remove()
    with FlopCounterMode(display=False) as counter:
        merged_token_scores(tower.blocks[block].attn, captured["x"], captured["cu"], captured["pe"], merge_unit=4)
    assert counter.get_total_flops() == probe_flops(vision, grid)
