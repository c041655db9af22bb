"""Analytic rows for a LLaVA-OneVision video: every pooled token per frame vs K anchors per frame.

    python -m benchmarks.video_rows                  # markdown table on stdout
    python -m benchmarks.video_rows --json           # the rows as JSON

The stock LLaVA-OneVision-7B feeds each frame through SigLIP-so400m/14 at 384 px (27 x 27 = 729 patches),
its projector, and a 2x2 bilinear pooling to 14 x 14 = 196 tokens; a clip of F frames costs ``196 F + 1``
LLM tokens (one ``image_newline`` closes the clip). The training-free adapter (``connector="select"``)
keeps K of the 196 pooled tokens per frame (``K F + 1`` tokens), chosen by the received-attention score.
Counted per sample, with :mod:`anchor_former.flops`'s convention (matmul FLOPs, 2 per multiply-add, dense
attention, LM head on the last token; KV cache in bf16):

* ``vit``: the tower over every frame (the same in every row);
* ``probe``: the ``"received"`` score of the selected layer (reduced rows only): its query and key
  projections ``2 * 2 N D^2`` and the score product ``2 N^2 D`` per frame (no [CLS]: every query row);
* ``projector``: the model's ``mlp2x_gelu`` on all 729 tokens of every frame (it runs before the pooling,
  so reducing after the pooling does not shrink it);
* ``llm``: the prefill of the visual tokens plus ``text_tokens`` text tokens; ``kv_cache_bytes`` after it.

Shapes: Qwen2-7B (LLaVA-OneVision-7B's LLM) and SigLIP-so400m-patch14-384 with 26 layers (the model drops
the tower's last one) as published in the ``Qwen/Qwen2-7B`` and ``llava-hf/llava-onevision-qwen2-7b-ov-hf``
configs; :data:`~anchor_former.flops.LLAMA_7B` is also accepted as ``llm``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from anchor_former import flops

__all__ = ["QWEN2_7B", "SIGLIP_SO400M_384", "to_markdown", "video_rows"]

QWEN2_7B = flops.LLMShape(
    name="qwen2-7b",
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
)
"""Qwen2-7B, LLaVA-OneVision-7B's LLM (grouped-query attention: 4 key/value heads)."""

SIGLIP_SO400M_384 = flops.ViTShape(
    name="siglip-so400m-14-384",
    image_size=378,
    patch_size=14,
    hidden_size=1152,
    num_layers=26,
    num_heads=16,
    intermediate_size=4304,
    num_prefix_tokens=0,
)
"""SigLIP-so400m/14 at 384 px as LLaVA-OneVision uses it: 27 x 27 = 729 patches, no [CLS], 26 layers
(``image_size=378``: the 27 * 14 px its stride-14 patch embedding covers; the last 6 px add no patch)."""

KV_BYTES_PER_ELEMENT = 2  # bf16 cache


def _received_probe_flops(vit: flops.ViTShape) -> int:
    """Per frame: query and key projections of every token plus the full score product (``2 N^2 D``)."""
    n, d = vit.num_tokens, vit.hidden_size
    return 2 * 2 * n * d * d + 2 * n * n * d


def video_rows(
    *,
    frames: int = 32,
    frame_budgets: tuple[int, ...] = (196, 64, 36, 16),
    llm: flops.LLMShape = QWEN2_7B,
    vit: flops.ViTShape = SIGLIP_SO400M_384,
    text_tokens: int = 64,
) -> list[dict[str, Any]]:
    """One row per per-frame budget: tokens, FLOPs per stage, KV cache, and ratios to the full budget.

    Args:
        frames: ``F`` frames per clip.
        frame_budgets: K per frame; the largest pooled count (``ceil(s/2)^2``, 196 here) is the stock model.
        llm: the LLM's shapes.
        vit: the vision tower's shapes (``s = image_size / patch_size`` patches per side).
        text_tokens: text tokens of the prompt.

    Returns:
        Dicts with ``frames``, ``tokens_per_frame``, ``visual_tokens`` (``K F + 1``), ``vit_flops``,
        ``probe_flops``, ``projector_flops``, ``llm_flops``, ``total_flops``, ``kv_cache_bytes`` and
        ``llm_vs_full`` / ``kv_cache_vs_full`` / ``total_vs_full``.

    Raises:
        ValueError: ``frames < 1``, or a budget outside ``[1, ceil(s/2)^2]``.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
    pooled = math.ceil(vit.grid_size / 2) ** 2
    for k in frame_budgets:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= pooled:
            raise ValueError(
                f"frame_budgets entries must be integers in [1, {pooled}] (pooled tokens per frame), got {k!r}"
            )
    vit_flops = frames * flops.vit_forward_flops(vit)
    d, w = vit.hidden_size, llm.hidden_size
    projector = frames * 2 * vit.num_tokens * (d * w + w * w)
    rows: list[dict[str, Any]] = []
    for k in (pooled, *[k for k in frame_budgets if k != pooled]):
        visual = frames * k + 1
        probe = 0 if k == pooled else frames * _received_probe_flops(vit)
        llm_flops = flops.llm_prefill_flops(llm, visual + text_tokens)
        rows.append(
            {
                "llm_shape": llm.name,
                "vit_shape": vit.name,
                "frames": frames,
                "tokens_per_frame": k,
                "visual_tokens": visual,
                "vit_flops": vit_flops,
                "probe_flops": probe,
                "projector_flops": projector,
                "llm_flops": llm_flops,
                "total_flops": vit_flops + probe + projector + llm_flops,
                "kv_cache_bytes": flops.kv_cache_bytes(
                    llm, visual + text_tokens, bytes_per_element=KV_BYTES_PER_ELEMENT
                ),
            }
        )
    full = rows[0]
    for row in rows:
        for key in ("llm", "kv_cache", "total"):
            name = f"{key}_flops" if key != "kv_cache" else "kv_cache_bytes"
            row[f"{key}_vs_full"] = row[name] / full[name]
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (TFLOPs, GiB)."""
    lines = [
        f"Video: {rows[0]['frames']} frames, {rows[0]['vit_shape']} + {rows[0]['llm_shape']} (analytic, per sample)",
        "",
        "| K / frame | visual tokens | ViT TFLOPs | probe TFLOPs | projector TFLOPs | LLM prefill TFLOPs | total TFLOPs "
        "| KV cache GiB | LLM vs full | KV vs full |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens_per_frame']} | {r['visual_tokens']} | {r['vit_flops'] / 1e12:.2f} | {r['probe_flops'] / 1e12:.2f} "
            f"| {r['projector_flops'] / 1e12:.2f} | {r['llm_flops'] / 1e12:.2f} | {r['total_flops'] / 1e12:.2f} "
            f"| {r['kv_cache_bytes'] / 2**30:.3f} | {r['llm_vs_full']:.3f} | {r['kv_cache_vs_full']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = video_rows(frames=args.frames)
    print(json.dumps(rows, indent=2) if args.json else to_markdown(rows))


if __name__ == "__main__":
    main()
