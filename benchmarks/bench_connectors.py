"""Connector benchmark: tokens, parameters, FLOPs (measured and analytic), latency and GPU memory.

Every connector of the line-up (MLP-576, AvgPool-144, C-Abstractor-144, Perceiver-144, AcFormer-144,
AcFormer-256) at LLaVA-1.5 shapes: features ``(B, 577, 1024)`` (CLIP ViT-L/14-336 penultimate layer,
[CLS] included) to ``4096``-wide LLM tokens. Ratios are to MLP-576 (LLaVA-1.5's ``mlp2x_gelu``) in the
same run.

* FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a meta-device twin built
  with the manual attention path (``fused_attn=False``; the counter sees CPU SDPA as 0 FLOPs) and
  cross-checked against the connector's own ``analytic_flops(N)``.
* Latency: inference (``torch.inference_mode``), the default (SDPA) path, median of
  :class:`torch.utils.benchmark.Timer` repeats; peak memory from the CUDA allocator (GPU only).
* Anchor connectors get ``anchor_idx`` from ``anchor_search`` on a random [CLS] attention row (the
  search itself is timed in ``bench_search.py``, the probe in ``bench_probe.py``).

Run alone from the repository root: ``python -m benchmarks.bench_connectors [--preset default] [--device cpu]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from anchor_former.connectors import Connector
from benchmarks._common import (
    BASELINE,
    connector_benchmark_main,
    connector_spec,
    format_count,
    format_flops,
    format_ms,
    measure_interleaved,
    num_anchors,
    progress,
    resolve_connectors,
    seeded,
)

__all__ = ["PRESETS", "run", "summarize", "to_markdown"]

# Shapes per preset. ``dtype`` maps device type -> dtype (LLaVA runs fp16 on GPU). ``resampler`` overrides
# the Perceiver/AcFormer defaults (tiny only, so that the smoke run takes milliseconds). Timing:
# ``rounds`` interleaved rounds of blocks lasting at least ``min_block_s``.
_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision_dim": 64,
        "llm_dim": 128,
        "tokens": 577,
        "heads": 16,
        "batch": 1,
        "rounds": 2,
        "min_block_s": 0.0,
        "dtype": _DTYPE,
        "resampler": {"depth": 1, "heads": 2, "dim_head": 16},
    },
    "quick": {
        "vision_dim": 1024,
        "llm_dim": 4096,
        "tokens": 577,
        "heads": 16,
        "batch": 1,
        "rounds": 2,
        "min_block_s": 0.0,
        "dtype": _DTYPE,
        "resampler": {},
    },
    "default": {
        "vision_dim": 1024,
        "llm_dim": 4096,
        "tokens": 577,
        "heads": 16,
        "batch": 1,
        "rounds": 5,
        "min_block_s": 0.05,
        "dtype": _DTYPE,
        "resampler": {},
    },
    "llava-1.5-7b": {
        "vision_dim": 1024,
        "llm_dim": 4096,
        "tokens": 577,
        "heads": 16,
        "batch": 32,
        "rounds": 10,
        "min_block_s": 0.05,
        "dtype": _DTYPE,
        "resampler": {},
    },
}


def _config_fields(module: torch.nn.Module) -> set[str]:
    config = getattr(module, "config", None)
    return set(config.to_dict()) if config is not None else set()


def random_anchor_idx(
    batch: int, heads: int, tokens: int, num_anchors: int, *, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``(B, K + 1)`` anchors ([CLS] first) from a random [CLS] attention row ``(B, H, N)``."""
    from anchor_former import anchor_search

    row = torch.randn(batch, heads, tokens, generator=generator).softmax(-1)
    return anchor_search(row, num_anchors).to(device)


def _build(label: str, cfg: dict[str, Any], device: torch.device) -> Connector:
    dtype = cfg["dtype"][device.type]
    spec = connector_spec(label)
    return spec.build(cfg["vision_dim"], cfg["llm_dim"], resampler=cfg["resampler"], device=device, dtype=dtype).eval()


def count_flops(
    label: str,
    connector: Connector,
    features: torch.Tensor,
    anchor_idx: torch.Tensor | None,
    *,
    cfg: dict[str, Any],
) -> dict[str, Any]:
    """FLOPs per sample by FlopCounterMode, and the connector's own analytic count.

    Counted on a twin on the meta device (shapes only: no memory, no compute) built with the explicit
    attention path (``fused_attn=False``: the counter sees CPU SDPA as 0 FLOPs) and without the anchor
    range check (a data-dependent read a meta tensor cannot answer).
    """
    fields = _config_fields(connector)
    extra = {key: False for key in ("fused_attn", "check_indices") if key in fields}
    twin = (
        connector_spec(label)
        .build(
            cfg["vision_dim"], cfg["llm_dim"], resampler=cfg["resampler"], device="meta", dtype=features.dtype, **extra
        )
        .eval()
    )
    meta_idx = None if anchor_idx is None else anchor_idx.to("meta")
    # Grad mode stays on: FlopCounterMode's module tracker asserts on a Parameter passed between modules
    # (the Perceiver's learned queries) under no_grad/inference_mode. Only the forward runs.
    with FlopCounterMode(display=False) as counter:
        out = twin(features.to("meta"), meta_idx)
    b, n = features.shape[:2]
    tokens = connector.num_output_tokens(n)
    if tuple(out.shape) != (b, tokens, cfg["llm_dim"]):
        expected = (b, tokens, cfg["llm_dim"])
        raise RuntimeError(f"{label}: output shape {tuple(out.shape)} != (B, T, llm_dim) = {expected}")
    measured = counter.get_total_flops() // b
    analytic = connector.analytic_flops(n)
    return {
        "visual_tokens": tokens,
        "flops_measured": measured,
        "flops_analytic": analytic,
        "flops_match": measured == analytic,
        "flops_counted_on": "meta device, "
        + ("manual attention (fused_attn=False)" if "fused_attn" in extra else "default path"),
    }


def _add_ratios(results: dict[str, dict[str, Any]], timings: dict[str, dict[str, Any]]) -> None:
    """Timings into each result row, and every figure as a ratio to the baseline (MLP-576)."""
    base = results[BASELINE]
    base_ms = timings[BASELINE]["median_ms"]
    for label, r in results.items():
        r.update(timings[label])
        r["tokens_vs_baseline"] = r["visual_tokens"] / base["visual_tokens"]
        r["token_reduction"] = 1 - r["tokens_vs_baseline"]
        r["params_vs_baseline"] = r["params"] / base["params"]
        r["flops_vs_baseline"] = r["flops_measured"] / base["flops_measured"]
        r["latency_vs_baseline"] = r["median_ms"] / base_ms
        progress(
            f"connectors: {label}: {r['visual_tokens']} tokens, {format_flops(r['flops_measured'])}FLOPs, "
            f"{r['median_ms']:.2f} ms"
        )


def run(
    *, preset: str = "default", device: torch.device | str = "cpu", connectors: str | None = None
) -> dict[str, Any]:
    """Benchmark the connectors (comma-separated labels, default all) at the preset's shapes.

    Returns ``{"benchmark": "connectors", "preset", "shapes", "dtype", "results": [...]}``; each result has
    ``visual_tokens``, ``params``, ``flops_measured``/``flops_analytic`` per sample, ``median_ms`` for the
    batch, ``peak_mem_mib`` (GPU), and ``*_vs_baseline`` ratios to MLP-576.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    device = torch.device(device)
    cfg = PRESETS[preset]
    dtype = cfg["dtype"][device.type]
    generator = seeded(0)
    b, n = cfg["batch"], cfg["tokens"]
    features = torch.randn(b, n, cfg["vision_dim"], generator=generator).to(device=device, dtype=dtype)
    results, calls = {}, {}
    for label in resolve_connectors(connectors):
        progress(f"connectors: {label}: build and count FLOPs ({b}x{n}x{cfg['vision_dim']} -> {cfg['llm_dim']})")
        connector = _build(label, cfg, device)
        anchor_idx = None
        if connector.uses_anchors:
            anchor_idx = random_anchor_idx(
                b, cfg["heads"], n, int(num_anchors(connector) or 0), generator=generator, device=device
            )
        results[label] = {
            "connector": label,
            "factory": connector_spec(label).factory,
            "kwargs": connector_spec(label).build_kwargs(cfg["resampler"]),
            "params": sum(p.numel() for p in connector.parameters()),
            **count_flops(label, connector, features, anchor_idx, cfg=cfg),
        }
        calls[label] = (lambda c, a: lambda: c(features, a))(connector, anchor_idx)
    with torch.inference_mode():
        timings = measure_interleaved(
            calls, device, rounds=cfg["rounds"], min_block_s=cfg["min_block_s"], label="connectors: timing"
        )
    _add_ratios(results, timings)
    return {
        "benchmark": "connectors",
        "preset": preset,
        "device_type": device.type,
        "shapes": {k: cfg[k] for k in ("batch", "tokens", "vision_dim", "llm_dim")},
        "dtype": str(dtype).removeprefix("torch."),
        "timing": {"rounds": cfg["rounds"], "min_block_s": cfg["min_block_s"], "mode": "inference_mode, default path"},
        "results": list(results.values()),
        "target": "AcFormer-144 connector latency <= 1.5x MLP-576 on GPU (project target)",
    }


def to_markdown(result: dict[str, Any]) -> str:
    """A markdown table of :func:`run`'s result."""
    s = result["shapes"]
    mem = result["device_type"] == "cuda"
    lines = [
        f"Connectors at features ({s['batch']}, {s['tokens']}, {s['vision_dim']}) -> {s['llm_dim']}, "
        f"{result['dtype']}, inference. FLOPs per sample, counted by FlopCounterMode (meta-device twin, manual "
        f"attention path) and checked against the connector's `analytic_flops`; latency = median ± IQR for the batch "
        f"over interleaved rounds; "
        f"(x) = ratio to {BASELINE}. "
        f"Target: {result['target']}.",
        "",
        "| connector | visual tokens | reduction | params | FLOPs/sample (x) | analytic = counted "
        "| latency ms ± IQR (x) |" + (" peak extra MiB |" if mem else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if mem else ""),
    ]
    for r in result["results"]:
        row = (
            f"| {r['connector']} | {r['visual_tokens']} | {100 * r['token_reduction']:.0f}% "
            f"| {format_count(r['params'])} "
            f"| {format_flops(r['flops_measured'])} ({r['flops_vs_baseline']:.2f}x) "
            f"| {'yes' if r['flops_match'] else 'NO: ' + format_flops(r['flops_analytic'])} "
            f"| {format_ms(r['median_ms'], r['iqr_ms'])} ({r['latency_vs_baseline']:.2f}x) |"
        )
        if mem:
            row += f" {r['peak_extra_mib']:.0f} |"
        lines.append(row)
    return "\n".join(lines)


def _headline(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row a summary speaks of: AcFormer-144 if it ran, else the first anchor connector, else any."""
    others = [r for r in rows if r["connector"] != BASELINE]
    return next(
        (r for r in others if r["connector"] == "acformer-144"),
        next((r for r in others if r["factory"] in ("acformer", "select")), others[0] if others else None),
    )


def summarize(result: dict[str, Any]) -> list[str]:
    """One sentence for the run's summary."""
    row = _headline(result["results"])
    if row is None:
        return []
    s = result["shapes"]
    return [
        f"Connector alone, features ({s['batch']}, {s['tokens']}, {s['vision_dim']}) -> {s['llm_dim']}: "
        f"{row['connector']} gives the LLM {row['visual_tokens']} visual "
        f"tokens instead of {BASELINE}'s 576 ({100 * row['token_reduction']:.0f} % fewer) for "
        f"{row['flops_vs_baseline']:.2f}x its FLOPs and {row['latency_vs_baseline']:.2f}x its time."
    ]


def main(argv: list[str] | None = None) -> None:
    connector_benchmark_main(
        argv, description=__doc__.splitlines()[0], presets=PRESETS, run=run, to_markdown=to_markdown
    )


if __name__ == "__main__":
    main()
