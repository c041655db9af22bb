"""Analytic rows for Qwen2.5-VL-7B: what keeping K merged visual tokens buys in LLM prefill and KV cache.

    python -m benchmarks.qwen_rows            # markdown tables on stdout
    python -m benchmarks.qwen_rows --json     # the same rows as JSON
    python -m benchmarks.qwen_rows --measure  # plus the measured scaled-down pipeline (CPU, ~1 minute)

Cases: one 1280 x 720 image and a 32-frame 1280 x 720 video, each followed by ``text_tokens`` text tokens,
at full budget and at K merged tokens per image / per video step (``attach_anchor_former``'s rule;
a video step is 2 frames). Counts follow :mod:`anchor_former.flops` (matrix products only, 2 FLOPs per
multiply-add, dense attention, LM head on the last token; KV cache in bf16).

Shapes (from the published ``config.json`` / ``preprocessor_config.json`` of Qwen/Qwen2.5-VL-7B-Instruct,
written out here because no hub download is possible): LLM 28 layers, width 3584, 28 query / 4 key-value
heads of 128, MLP 18944, vocabulary 152064; vision tower 32 blocks, width 1280, 16 heads, SwiGLU MLP 3420,
patch 14, 2 x 2 merge, 112-pixel windows, full attention in blocks 7, 15, 23, 31. Token counts come from
transformers' own ``smart_resize`` with the processors' default pixel limits (images: 56*56 .. 28*28*1280
pixels; video frames: 128*28*28 .. 28*28*768 pixels), so a 1280 x 720 image is 52 x 92 patches = 1196
merged tokens and each video step 40 x 72 patches = 720 merged tokens.

The tower rows put the score probe (one extra ``qkv`` linear of the scored block plus that block's
``q @ k^T`` per attention segment, see :func:`anchor_former.adapters.hf.qwen_vl.merged_token_scores`)
beside the plain tower forward (window attention counted per window, exactly as the tower splits it).

``measured_rows()`` times a scaled-down random-init Qwen2.5-VL (same structure: windowed and full vision
blocks, M-RoPE LLM) on one 448 x 448 image: the pipeline at full budget and at K, and the tower alone vs
the tower with the probe.

Wiring into the suite: ``qwen_rows()``, ``tower_rows()`` and ``measured_rows()`` return plain lists of
dicts; a section of ``benchmarks.run`` can call them and print :func:`markdown` of each.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_window_index

from anchor_former.adapters.hf.qwen_vl import kept_per_step
from anchor_former.flops import LLMShape, kv_cache_bytes, llm_prefill_flops

__all__ = [
    "QWEN2_5_VL_7B_LLM",
    "QWEN2_5_VL_7B_VISION",
    "case_grids",
    "markdown",
    "measured_rows",
    "probe_flops",
    "qwen_rows",
    "tower_flops",
    "tower_rows",
]

QWEN2_5_VL_7B_LLM = LLMShape(
    name="Qwen2.5-VL-7B LLM",
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    head_dim=128,
)
QWEN2_5_VL_7B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "num_heads": 16,
    "intermediate_size": 3420,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": (7, 15, 23, 31),
    "out_hidden_size": 3584,
    "in_channels": 3,
}
IMAGE_PIXELS = (56 * 56, 28 * 28 * 1280)  # Qwen2VLImageProcessor defaults (min, max)
VIDEO_PIXELS = (128 * 28 * 28, 28 * 28 * 768)  # Qwen2VLVideoProcessor defaults per frame (min, max)


def _grid(height: int, width: int, pixels: tuple[int, int], steps: int = 1) -> tuple[int, int, int]:
    """(t, h, w) patch grid of ``steps`` temporal steps of a ``height x width`` frame."""
    v = QWEN2_5_VL_7B_VISION
    factor = v["patch_size"] * v["merge_size"]
    h, w = smart_resize(height, width, factor=factor, min_pixels=pixels[0], max_pixels=pixels[1])
    return steps, h // v["patch_size"], w // v["patch_size"]


def case_grids(*, height: int = 720, width: int = 1280, frames: int = 32) -> dict[str, tuple[int, int, int]]:
    """The (t, h, w) patch grids of the two cases: one image and one ``frames``-frame video."""
    return {
        f"image {width}x{height}": _grid(height, width, IMAGE_PIXELS),
        f"video {frames}x{width}x{height}": _grid(height, width, VIDEO_PIXELS, frames // 2),
    }


def qwen_rows(
    budgets: tuple[int | float | None, ...] = (None, 256, 144, 64),
    *,
    text_tokens: int = 64,
    llm: LLMShape = QWEN2_5_VL_7B_LLM,
) -> list[dict[str, Any]]:
    """One row per case and budget (``None`` = full): visual tokens, prefill FLOPs, KV-cache bytes, ratios to full."""
    rows = []
    merge = QWEN2_5_VL_7B_VISION["merge_size"] ** 2
    for case, (t, h, w) in case_grids().items():
        per_step = h * w // merge
        full = None
        for k in budgets:
            visual = t * (per_step if k is None else kept_per_step(k, per_step, what=case))
            flops = llm_prefill_flops(llm, visual + text_tokens)
            cache = kv_cache_bytes(llm, visual + text_tokens)
            full = full or (flops, cache)
            rows.append(
                {
                    "case": case,
                    "grid_thw": [t, h, w],
                    "budget": "full" if k is None else f"K={k}",
                    "visual_tokens": visual,
                    "text_tokens": text_tokens,
                    "prefill_flops": flops,
                    "prefill_ratio": flops / full[0],
                    "kv_cache_bytes_bf16": cache,
                    "kv_ratio": cache / full[1],
                }
            )
    return rows


def _segments(vision: dict[str, Any], grid: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """Patch counts of the full-attention segments (one per step) and of the attention windows."""
    t, h, w = grid
    _, cu_windows = get_vision_window_index(
        torch.tensor([grid]),
        spatial_merge_size=vision["merge_size"],
        window_size=vision["window_size"],
        patch_size=vision["patch_size"],
    )
    bounds = torch.unique_consecutive(torch.as_tensor(cu_windows)).tolist()
    return [h * w] * t, [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def tower_flops(vision: dict[str, Any], grid: tuple[int, int, int]) -> int:
    """FLOPs of a Qwen2.5-VL vision tower forward on one item of (t, h, w) patches (patch embedding,
    blocks with window or full attention as the tower splits them, merger)."""
    d, f = vision["hidden_size"], vision["intermediate_size"]
    full_segments, windows = _segments(vision, grid)
    n = sum(full_segments)
    full_pairs, window_pairs = sum(s * s for s in full_segments), sum(s * s for s in windows)
    patch_in = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    linear = 2 * n * d * 3 * d + 2 * n * d * d + 3 * 2 * n * d * f  # qkv, proj, SwiGLU per block
    blocks = sum(
        linear + 4 * d * (full_pairs if i in vision["fullatt_block_indexes"] else window_pairs)
        for i in range(vision["depth"])
    )
    merged, wide = n // vision["merge_size"] ** 2, d * vision["merge_size"] ** 2
    return 2 * n * patch_in * d + blocks + 2 * merged * wide * wide + 2 * merged * wide * vision["out_hidden_size"]


def probe_flops(vision: dict[str, Any], grid: tuple[int, int, int]) -> int:
    """FLOPs the score probe adds: the scored block's ``qkv`` linear again, its ``q @ k^T`` per
    full-attention segment of s patches, and the column sums (query weights times probabilities,
    ``2 * s * s`` per head). Both formulas are checked against ``FlopCounterMode`` on a real tiny tower
    in the tests."""
    d = vision["hidden_size"]
    full_segments, _ = _segments(vision, grid)
    n = sum(full_segments)
    return 2 * n * d * 3 * d + sum(2 * s * s * d + 2 * s * s * vision["num_heads"] for s in full_segments)


def tower_rows(vision: dict[str, Any] = QWEN2_5_VL_7B_VISION) -> list[dict[str, Any]]:
    """Per case: the vision tower's forward FLOPs and the score probe's extra FLOPs."""
    rows = []
    for case, grid in case_grids().items():
        tower, probe = tower_flops(vision, grid), probe_flops(vision, grid)
        rows.append(
            {
                "case": case,
                "patches": grid[0] * grid[1] * grid[2],
                "tower_flops": tower,
                "probe_flops": probe,
                "probe_over_tower": probe / tower,
            }
        )
    return rows


def _scaled_model(k_budgets: tuple[int | float | None, ...]) -> tuple[Any, dict[Any, Any], dict[str, torch.Tensor]]:
    """A scaled-down random-init Qwen2.5-VL (same structure: windows, full blocks, M-RoPE), one attached
    copy per budget, and one 448 x 448 image (32 x 32 patches, 256 merged tokens) between 2 x 32 text tokens."""
    import copy

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from anchor_former.adapters.hf.qwen_vl import attach_anchor_former as attach_qwen

    vision = {
        "depth": 4,
        "hidden_size": 128,
        "num_heads": 4,
        "intermediate_size": 256,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1, 3],
        "out_hidden_size": 512,
    }
    text = {
        "vocab_size": 1024,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    }
    torch.manual_seed(0)
    stock = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=1000,
            video_token_id=1001,
            vision_start_token_id=1002,
        )
    ).eval()
    models = {k: stock if k is None else attach_qwen(copy.deepcopy(stock), num_anchors=k) for k in k_budgets}
    image = torch.randint(0, 256, (448, 448, 3), dtype=torch.uint8).numpy()
    pixels = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)(images=[image], return_tensors="pt")
    return stock, models, dict(pixels)


def _inputs(image: dict[str, torch.Tensor], visual: int, text: int = 32) -> dict[str, torch.Tensor]:
    """``text`` tokens, ``visual`` image pad tokens, ``text`` tokens (batch 1)."""
    ids = torch.cat([torch.randint(0, 1000, (text,)), torch.full((visual,), 1000), torch.randint(0, 1000, (text,))])
    types = (ids == 1000).int()
    return {
        "input_ids": ids[None],
        "mm_token_type_ids": types[None],
        "attention_mask": torch.ones_like(ids)[None],
        **image,
    }


def measured_rows(
    budgets: tuple[int | float | None, ...] = (None, 64), *, rounds: int = 3, min_block_s: float = 0.0
) -> list[dict[str, Any]]:
    """Measured CPU latency of the scaled-down pipeline (tower + probe + LLM prefill, last-token logits)
    at full budget and at K, and of the tower alone vs the tower with the score probe. Timings on a shared
    machine are indicative only; ratios come from interleaved rounds."""
    from anchor_former.adapters.hf.qwen_vl import kept_per_step
    from benchmarks._common import measure_interleaved

    stock, models, image = _scaled_model(budgets)
    grid = image["image_grid_thw"]
    merged = int(grid[0].prod()) // 4
    fns: dict[str, Any] = {}
    tokens = {}
    for k, model in models.items():
        visual = merged if k is None else kept_per_step(k, merged)
        inputs = _inputs(image, visual)
        name = "pipeline full" if k is None else f"pipeline K={k}"
        tokens[name] = visual

        def run(model: Any = model, inputs: dict[str, torch.Tensor] = inputs) -> None:
            with torch.no_grad():
                model(**inputs, logits_to_keep=1)

        fns[name] = run
    reduced = next(m for k, m in models.items() if k is not None)

    def tower() -> None:
        with torch.no_grad():
            stock.model.visual(image["pixel_values"], grid_thw=grid)

    def tower_probe() -> None:
        with torch.no_grad():
            reduced.model.get_image_features(image["pixel_values"], grid)

    fns["tower"], fns["tower + probe"] = tower, tower_probe
    timed = measure_interleaved(fns, torch.device("cpu"), rounds=rounds, min_block_s=min_block_s)
    base = {"pipeline": timed["pipeline full"]["median_ms"], "tower": timed["tower"]["median_ms"]}
    return [
        {
            "what": name,
            "visual_tokens": tokens.get(name, merged),
            "median_ms": t["median_ms"],
            "iqr_ms": t["iqr_ms"],
            "ratio": t["median_ms"] / base["pipeline" if name.startswith("pipeline") else "tower"],
        }
        for name, t in timed.items()
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (large counts in G/T, ratios with 3 decimals)."""

    def cell(key: str, value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, int) and key.endswith("flops"):
            return f"{value / 1e12:.2f} T"
        if isinstance(value, int) and key.endswith("bytes_bf16"):
            return f"{value / 2**20:.1f} MiB"
        return str(value)

    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--measure", action="store_true", help="also time the scaled-down pipeline on CPU")
    args = parser.parse_args(argv)
    tables = {"prefill": qwen_rows(text_tokens=args.text_tokens), "tower": tower_rows()}
    if args.measure:
        tables["measured_cpu_scaled"] = measured_rows()
    if args.json:
        print(json.dumps(tables, indent=1))
    else:
        print(*(markdown(rows) for rows in tables.values()), sep="\n\n")


if __name__ == "__main__":
    main()
