"""Analytic LLaVA-NeXT (anyres) rows: what anchors per view save on a 672×672 image.

    python -m benchmarks.anyres_rows            # prints the table (markdown) and writes nothing

:func:`analytic_anyres` counts, per sample, the tokens the LLM sees for one image under LLaVA-NeXT's
layout (:mod:`anchor_former.views`, the same rules the adapters use), the matmul FLOPs of the ViT over
every view, the [CLS] probe, the connector and the LLM prefill at LLaMA-7B/Vicuna-7B and 13B shapes, and
the fp16 KV cache, for:

* ``stock``: the unmodified model (every patch of every view, unpadded, plus one ``image_newline`` per
  row of the high-resolution grid);
* ``select-K/view``: the training-free connector, K anchors per view (the newlines stay);
* ``select-B/image``: one budget B per image spread over the views;
* ``acformer-K/view``: AcFormer per view, K + 1 tokens per view, one newline per row of crops.

Counting conventions are those of :func:`anchor_former.flops.pipeline_flops` (2 FLOPs per multiply-add, dense
attention, LM head on the last token). Nothing is timed, so the numbers do not depend on the machine.
"""

from __future__ import annotations

import sys
from typing import Any

from anchor_former import build_connector, flops
from anchor_former.projector import projector_flops
from anchor_former.views import anyres_views, num_fixed_tokens, num_selected_tokens, view_budgets

__all__ = ["LLAVA_NEXT_PINPOINTS", "analytic_anyres", "to_markdown"]

#: LLaVA-NeXT's grid pinpoints, ``(height, width)`` pixels
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TEXT_TOKENS = 64
KV_BYTES_PER_ELEMENT = 2  # fp16 / bf16 cache


def _cases(per_view: tuple[int, ...], per_image: tuple[int, ...], acformer: tuple[int, ...]) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = [{"label": "stock", "kind": "select", "per_view": None}]
    cases += [{"label": f"select-{k}/view", "kind": "select", "per_view": k} for k in per_view]
    cases += [{"label": f"select-{b}/image", "kind": "select", "per_image": b} for b in per_image]
    cases += [{"label": f"acformer-{k}/view", "kind": "acformer", "num_anchors": k} for k in acformer]
    return cases


def analytic_anyres(
    *,
    image_size: tuple[int, int] = (672, 672),
    per_view: tuple[int, ...] = (144, 64),
    per_image: tuple[int, ...] = (576,),
    acformer: tuple[int, ...] = (144,),
    text_tokens: int = TEXT_TOKENS,
) -> dict[str, Any]:
    """Per-sample tokens, FLOPs and KV cache of one ``image_size`` image under each case, 7B and 13B.

    Returns:
        ``{"image_size", "views", "grid", "text_tokens", "convention", "results": [row, ...]}``; a row has
        ``llm_shape``, ``case``, ``visual_tokens``, ``newline_tokens``, ``vit_flops``, ``probe_flops``,
        ``connector_flops``, ``llm_flops``, ``total_flops``, ``kv_cache_bytes`` and ratios to ``stock``.
    """
    vit = flops.CLIP_VIT_L14_336
    views = anyres_views(image_size, grid_pinpoints=LLAVA_NEXT_PINPOINTS, view_size=vit.image_size,
                         patch_size=vit.patch_size)
    candidates = views.num_candidates()
    v = views.num_views
    rows = []
    for llm in (flops.LLAMA_7B, flops.LLAMA_13B):
        for case in _cases(per_view, per_image, acformer):
            if case["kind"] == "select":
                if case.get("per_image") is not None:
                    budgets = view_budgets(candidates, per_image=case["per_image"])
                else:
                    budgets = view_budgets(candidates, per_view=case["per_view"] or vit.num_patches)
                tokens = num_selected_tokens(views, budgets)
                newlines = views.num_newlines
                connector_flops = projector_flops("mlp2x_gelu", vit.hidden_size, llm.hidden_size, tokens - newlines)
                uses_anchors = case["label"] != "stock"
            else:
                connector = build_connector("acformer", vit.hidden_size, llm.hidden_size,
                                            num_anchors=case["num_anchors"], device="meta")
                per = connector.num_output_tokens(vit.num_tokens)
                tokens = num_fixed_tokens(views, per)
                newlines = tokens - v * per
                connector_flops = v * connector.analytic_flops(vit.num_tokens)
                uses_anchors = True
            llm_flops = flops.llm_prefill_flops(llm, tokens + text_tokens)
            row = {
                "llm_shape": llm.name, "case": case["label"], "visual_tokens": tokens, "newline_tokens": newlines,
                "vit_flops": flops.vit_forward_flops(vit, batch=v),  # the ViT and the probe run on every view
                "probe_flops": flops.cls_probe_flops(vit, batch=v) if uses_anchors else 0,
                "connector_flops": connector_flops, "llm_flops": llm_flops,
                "kv_cache_bytes": flops.kv_cache_bytes(llm, tokens + text_tokens, bytes_per_element=KV_BYTES_PER_ELEMENT),
            }
            row["total_flops"] = row["vit_flops"] + row["probe_flops"] + connector_flops + llm_flops
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["llm_shape"] == row["llm_shape"] and r["case"] == "stock")
        for key in ("visual_tokens", "llm_flops", "total_flops", "kv_cache_bytes"):
            row[f"{key}_vs_stock"] = row[key] / base[key]
    return {
        "image_size": list(image_size),
        "views": v,
        "grid": list(views.grid),
        "text_tokens": text_tokens,
        "convention": "matmul FLOPs per sample (one image, all its views), 2 per multiply-add, dense attention, "
                      "LM head on the last token; KV cache in fp16; CLIP ViT-L/14-336 views",
        "results": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """The rows as a markdown table."""
    h, w = result["image_size"]
    r, c = result["grid"]
    lines = [
        f"LLaVA-NeXT, one {h}×{w} image: {result['views']} views (base + {r}×{c} crops), "
        f"{result['text_tokens']} text tokens. {result['convention']}.",
        "",
        "| LLM | case | visual tokens (newlines) | LLM prefill TFLOPs | total TFLOPs | KV cache MiB | tokens vs stock |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        lines.append(
            f"| {row['llm_shape']} | {row['case']} | {row['visual_tokens']} ({row['newline_tokens']}) | "
            f"{row['llm_flops'] / 1e12:.2f} | {row['total_flops'] / 1e12:.2f} | "
            f"{row['kv_cache_bytes'] / 2**20:.0f} | {row['visual_tokens_vs_stock']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    del argv
    sys.stdout.write(to_markdown(analytic_anyres()))


if __name__ == "__main__":
    main()
