"""Analytic LLaVA-NeXT (anyres) rows: what anchors per view save on a 672×672 image.

    python -m benchmarks.anyres_rows            # prints the analytic table (markdown); writes nothing
    python -m benchmarks.anyres_rows --measure  # also times the scaled-down pipeline (prints JSON)

:func:`analytic_anyres` counts, per sample, the tokens the LLM sees for one image under LLaVA-NeXT's
layout (:mod:`anchor_former.views`, the same rules the adapters use), the matmul FLOPs of the ViT over
every view, the [CLS] probe, the connector and the LLM prefill at LLaMA-7B/Vicuna-7B and 13B shapes, and
the fp16 KV cache, for:

* ``stock``: the unmodified model (every patch of every view, unpadded, plus one ``image_newline`` per
  row of the high-resolution grid);
* ``select-K/view``: the training-free connector, K anchors per view (the newlines stay);
* ``select-B/image``: one budget B per image spread over the views;
* ``acformer-K/view``: AcFormer per view, K + 1 tokens per view, one newline per row of crops.

:func:`measured_anyres` times one anyres case end to end (vision tower over all views + connector +
LLM prefill, one forward of random-init transformers models scaled down from CLIP ViT-L/14-336 +
LLaMA-7B): the stock ``LlavaNextForConditionalGeneration`` against the same model switched to
``connector="select"`` with K anchors per view, on one image whose pinpoint gives 2×2 crops.

Counting conventions are those of :func:`anchor_former.flops.pipeline_flops` (2 FLOPs per multiply-add, dense
attention, LM head on the last token). Nothing is timed, so the numbers do not depend on the machine.
"""

from __future__ import annotations

import sys
from typing import Any

from anchor_former import build_connector, flops
from anchor_former._projector import projector_flops
from anchor_former.views import anyres_views, num_fixed_tokens, num_selected_tokens, view_budgets

__all__ = ["LLAVA_NEXT_PINPOINTS", "analytic_anyres", "measured_anyres", "to_markdown"]

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
    views = anyres_views(
        image_size, grid_pinpoints=LLAVA_NEXT_PINPOINTS, view_size=vit.image_size, patch_size=vit.patch_size
    )
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
                connector = build_connector(
                    "acformer", vit.hidden_size, llm.hidden_size, num_anchors=case["num_anchors"], device="meta"
                )
                per = connector.num_output_tokens(vit.num_tokens)
                tokens = num_fixed_tokens(views, per)
                newlines = tokens - v * per
                connector_flops = v * connector.analytic_flops(vit.num_tokens)
                uses_anchors = True
            llm_flops = flops.llm_prefill_flops(llm, tokens + text_tokens)
            row = {
                "llm_shape": llm.name,
                "case": case["label"],
                "visual_tokens": tokens,
                "newline_tokens": newlines,
                "vit_flops": flops.vit_forward_flops(vit, batch=v),  # the ViT and the probe run on every view
                "probe_flops": flops.cls_probe_flops(vit, batch=v) if uses_anchors else 0,
                "connector_flops": connector_flops,
                "llm_flops": llm_flops,
                "kv_cache_bytes": flops.kv_cache_bytes(
                    llm, tokens + text_tokens, bytes_per_element=KV_BYTES_PER_ELEMENT
                ),
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


#: scaled-down shapes of the measured case: {"vit": CLIPVisionConfig kwargs, "llm": LlamaConfig kwargs}
MEASURED_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vit": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=4,
        ),
        "llm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    },
    "default": {
        "vit": dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=8,
            image_size=112,
            patch_size=14,
        ),
        "llm": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8),
    },
}


def measured_anyres(
    *,
    preset: str = "default",
    per_view: int = 16,
    text_tokens: int = TEXT_TOKENS,
    device: str = "cpu",
    rounds: int = 5,
    min_block_s: float = 0.2,
) -> dict[str, Any]:
    """Median forward latency (prefill) of the stock scaled-down LLaVA-NeXT and of ``select`` K per view.

    One square image at twice the view size (pinpoint 2×2: 5 views), ``text_tokens`` text tokens, batch 1,
    fp32. Returns ``{"preset", "shapes", "views", "environment", "results": {case: {"visual_tokens",
    "median_ms", "iqr_ms", ...}}}``; timings via :func:`benchmarks._common.measure_interleaved`.
    """
    import copy

    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from anchor_former.adapters.hf.llava_next import attach_anchor_former as attach_llava_next
    from benchmarks._common import environment, measure_interleaved, parse_device

    shapes = MEASURED_PRESETS[preset]
    side = shapes["vit"]["image_size"]
    pinpoints = [[side * h // 336, side * w // 336] for h, w in LLAVA_NEXT_PINPOINTS]
    dev = parse_device(device)
    torch.manual_seed(0)
    vocab, image_token = 1000, 999
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**shapes["vit"]),
        text_config=LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, **shapes["llm"]),
        image_token_index=image_token,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
    )
    stock = LlavaNextForConditionalGeneration(config).eval().to(dev)
    patches = (side // shapes["vit"]["patch_size"]) ** 2
    select = attach_llava_next(copy.deepcopy(stock), connector="select", num_anchors=min(per_view, patches))
    views = anyres_views(
        (2 * side, 2 * side), grid_pinpoints=pinpoints, view_size=side, patch_size=shapes["vit"]["patch_size"]
    )
    pixel_values = torch.randn(1, views.num_views, 3, side, side, device=dev)
    image_sizes = torch.tensor([[2 * side, 2 * side]], device=dev)

    from anchor_former.adapters.hf.llava_next import anyres_token_count as anyres_count

    def inputs(model) -> dict[str, torch.Tensor]:
        settings = (getattr(model.config, "anchor_former", None) or {}).get("extras", {}).get("anyres")
        tokens = (
            anyres_count(settings, views)
            if settings
            else num_selected_tokens(views, view_budgets(views.num_candidates(), per_view=patches))
        )
        ids = torch.randint(0, vocab - 1, (1, tokens + text_tokens), generator=torch.Generator().manual_seed(1))
        ids[0, 1 : 1 + tokens] = image_token
        return {"input_ids": ids.to(dev), "pixel_values": pixel_values, "image_sizes": image_sizes}

    cases = {"stock": (stock, inputs(stock)), f"select-{per_view}/view": (select, inputs(select))}

    def runner(model, batch):
        def fn():
            with torch.no_grad():
                return model(**batch, logits_to_keep=1)

        return fn

    timed = measure_interleaved(
        {name: runner(m, b) for name, (m, b) in cases.items()}, dev, rounds=rounds, min_block_s=min_block_s
    )
    results = {}
    for name, (_, batch) in cases.items():
        visual = int((batch["input_ids"] == image_token).sum())
        results[name] = {"visual_tokens": visual, "sequence_tokens": visual + text_tokens, **timed[name]}
    base = results["stock"]["median_ms"]
    for row in results.values():
        row["vs_stock"] = row["median_ms"] / base
    return {
        "preset": preset,
        "shapes": shapes,
        "views": views.num_views,
        "grid": list(views.grid),
        "text_tokens": text_tokens,
        "environment": environment(dev),
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also time the scaled-down pipeline")
    parser.add_argument("--preset", default="default", choices=sorted(MEASURED_PRESETS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    sys.stdout.write(to_markdown(analytic_anyres()))
    if args.measure:
        sys.stdout.write(json.dumps(measured_anyres(preset=args.preset, device=args.device), indent=2) + "\n")


if __name__ == "__main__":
    main()
