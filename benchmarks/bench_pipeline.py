"""Pipeline benchmark: what each connector's token count costs the whole LLaVA-style pipeline.

Two parts, both per connector and as a ratio to the MLP-576 (LLaVA-1.5) pipeline:

* **Analytic** (every preset, always at full shapes): ViT (CLIP ViT-L/14-336) + [CLS] probe (anchor
  connectors) + connector + LLM prefill over ``visual + text`` tokens at LLaMA-7B and LLaMA-13B shapes,
  from :mod:`anchor_former.flops` and each connector's ``analytic_flops``; and the KV cache each sample
  leaves for decoding (fp16).
* **Measured**: random-init HF ``CLIPVisionModel`` (SDPA) → features of the penultimate layer (anchor
  connectors: :func:`anchor_former.extract_anchors` in the same forward) → connector → HF
  ``LlamaForCausalLM`` (SDPA) prefill of ``inputs_embeds = [visual tokens, text embeddings]`` with a KV
  cache and last-token logits, timed end to end (median, ``torch.utils.benchmark``), plus each stage
  alone. The ``llava-1.5-7b`` preset uses the real shapes (CLIP ViT-L/14-336, LLaMA-7B, batch 16, 64 text
  tokens, fp16; for a GPU); ``default`` and ``tiny`` use SCALED-DOWN models that keep the token counts
  (577 ViT tokens, 576/144/... visual tokens) but shrink widths and depths so a CPU finishes in seconds;
  their output says so.

Run alone from the repository root: ``python -m benchmarks.bench_pipeline [--preset default] [--device cpu]``.
"""

from __future__ import annotations

from typing import Any

import torch

from anchor_former import flops
from anchor_former.connectors import Connector
from benchmarks._common import (
    BASELINE,
    connector_benchmark_main,
    connector_spec,
    format_flops,
    format_ms,
    measure_interleaved,
    num_anchors,
    progress,
    resolve_connectors,
    seeded,
)

__all__ = ["PRESETS", "analytic", "measured", "run", "summarize", "to_markdown"]

_VIT_L14_336 = {
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
}
_LLAMA_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}

# ``vit`` / ``llm``: HF config fields of the measured models; ``scaled``: whether they are smaller than
# LLaVA-1.5-7B (said in the output); ``resampler``: Perceiver/AcFormer overrides (scaled presets). ``dtype``: per
# device type. Timing: ``rounds`` interleaved rounds of blocks lasting at least ``min_block_s``.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vit": {
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "llm": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 1000,
        },
        "resampler": {"depth": 1, "heads": 2, "dim_head": 16},
        "scaled": True,
        "batch": 1,
        "text_tokens": 8,
        "rounds": 2,
        "min_block_s": 0.0,
        "stages": True,
        "dtype": {"cpu": torch.float32, "cuda": torch.float16},
    },
    "quick": {  # the default's models, fewer timed rounds, no per-stage timings
        "vit": {
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 512,
        },
        "llm": {
            "hidden_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "intermediate_size": 1376,
            "vocab_size": 32000,
        },
        "resampler": {"heads": 4, "dim_head": 32},
        "scaled": True,
        "batch": 1,
        "text_tokens": 64,
        "rounds": 2,
        "min_block_s": 0.0,
        "stages": False,
        "dtype": {"cpu": torch.float32, "cuda": torch.float16},
    },
    "default": {
        # ~1/8 of the widths, fewer layers; ViT : LLM FLOPs about 1 : 12 (LLaVA-1.5-7B: 1 : 22).
        "vit": {
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 512,
        },
        "llm": {
            "hidden_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "intermediate_size": 1376,
            "vocab_size": 32000,
        },
        "resampler": {"heads": 4, "dim_head": 32},
        "scaled": True,
        "batch": 1,
        "text_tokens": 64,
        "rounds": 6,
        "min_block_s": 0.1,
        "stages": True,
        "dtype": {"cpu": torch.float32, "cuda": torch.float16},
    },
    "llava-1.5-7b": {
        "vit": _VIT_L14_336,
        "llm": _LLAMA_7B,
        "scaled": False,
        "batch": 16,
        "text_tokens": 64,
        "rounds": 10,
        "min_block_s": 0.05,
        "stages": True,
        "dtype": {"cpu": torch.float32, "cuda": torch.float16},
    },
}
ANALYTIC_TEXT_TOKENS = 64
ANALYTIC_LLMS = (flops.LLAMA_7B, flops.LLAMA_13B)
KV_BYTES_PER_ELEMENT = 2  # fp16 / bf16 cache


def _build_meta(label: str, vision_dim: int, llm_dim: int) -> Connector:
    """The connector on the meta device: shapes and ``analytic_flops`` without memory."""
    return connector_spec(label).build(vision_dim, llm_dim, device="meta")


def analytic(labels: list[str], *, text_tokens: int = ANALYTIC_TEXT_TOKENS) -> dict[str, Any]:
    """Per-sample pipeline FLOPs and KV-cache bytes at CLIP ViT-L/14-336 + LLaMA-7B/13B shapes."""
    vit = flops.CLIP_VIT_L14_336
    rows: list[dict[str, Any]] = []
    for llm in ANALYTIC_LLMS:
        for label in labels:
            connector = _build_meta(label, vit.hidden_size, llm.hidden_size)
            tokens = connector.num_output_tokens(vit.num_tokens)
            total = flops.pipeline_flops(
                vit=vit,
                llm=llm,
                visual_tokens=tokens,
                text_tokens=text_tokens,
                connector_flops=connector.analytic_flops(vit.num_tokens),
                uses_anchors=connector.uses_anchors,
            )
            rows.append(
                {
                    "llm_shape": llm.name,
                    "connector": label,
                    "visual_tokens": tokens,
                    **{f"{stage}_flops": value for stage, value in total.to_dict().items()},
                    "kv_cache_bytes": flops.kv_cache_bytes(
                        llm, tokens + text_tokens, bytes_per_element=KV_BYTES_PER_ELEMENT
                    ),
                }
            )
    for row in rows:
        base = next(r for r in rows if r["llm_shape"] == row["llm_shape"] and r["connector"] == BASELINE)
        row["total_vs_baseline"] = row["total_flops"] / base["total_flops"]
        row["llm_vs_baseline"] = row["llm_flops"] / base["llm_flops"]
        row["kv_cache_vs_baseline"] = row["kv_cache_bytes"] / base["kv_cache_bytes"]
    return {
        "vit": vit.to_dict(),
        "llms": [llm.to_dict() for llm in ANALYTIC_LLMS],
        "text_tokens": text_tokens,
        "convention": "matmul FLOPs per sample, 2 per multiply-add, dense attention, LM head on the last token; "
        "KV cache in fp16",
        "results": rows,
    }


def _extract_anchors():
    try:
        from anchor_former import extract_anchors
    except ImportError:
        from anchor_former.probes import extract_anchors
    return extract_anchors


def _models(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        # attn_implementation reaches the configs through **kwargs, which their typed signatures do not show
        vit = CLIPVisionModel._from_config(CLIPVisionConfig(**cfg["vit"], attn_implementation="sdpa"), dtype=dtype)  # type: ignore[call-arg]
        llm = LlamaForCausalLM._from_config(LlamaConfig(**cfg["llm"], attn_implementation="sdpa"), dtype=dtype)  # type: ignore[call-arg]
    return vit.eval(), llm.eval()


class _Pipeline:
    """The random-init ViT and LLM of one preset, with the stage functions every connector shares."""

    def __init__(self, cfg: dict[str, Any], device: torch.device) -> None:
        self.dtype = cfg["dtype"][device.type]
        self.batch, self.text = cfg["batch"], cfg["text_tokens"]
        generator = seeded(0)
        progress(
            f"pipeline: building ViT {cfg['vit']['hidden_size']}x{cfg['vit']['num_hidden_layers']} and LLM "
            f"{cfg['llm']['hidden_size']}x{cfg['llm']['num_hidden_layers']} ({self.dtype}, {device})"
        )
        self.vit, self.llm = _models(cfg, device, self.dtype)
        self.vit_shape = flops.ViTShape.from_hf_config(self.vit.config, name="measured-vit")
        self.llm_shape = flops.LLMShape.from_hf_config(self.llm.config, name="measured-llm")
        self._extract_anchors = _extract_anchors()
        size = cfg["vit"]["image_size"]
        self.pixels = torch.randn(self.batch, 3, size, size, generator=generator).to(device=device, dtype=self.dtype)
        self.text_ids = torch.randint(0, cfg["llm"]["vocab_size"], (self.batch, self.text), generator=generator).to(
            device
        )

    def vision(self, k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, N, D)`` features of layer -2 and, for ``k`` anchors, ``(B, k + 1)`` anchor indices."""
        if k is None:  # LLaVA's way: hidden_states[-2]
            return self.vit(pixel_values=self.pixels, output_hidden_states=True).hidden_states[-2], None
        found = self._extract_anchors(self.vit, self.pixels, num_anchors=k, layer=-2)
        return found.features, found.anchor_idx

    def prefill(self, visual: torch.Tensor) -> torch.Tensor:
        """Last-token logits of the LLM over ``[visual (B, T, d_llm), text]`` with a KV cache."""
        embeds = torch.cat([visual, self.llm.get_input_embeddings()(self.text_ids)], dim=1)  # (B, T + text, d_llm)
        return self.llm(inputs_embeds=embeds, logits_to_keep=1, use_cache=True).logits


def _cases(pipe: _Pipeline, labels: list[str], cfg: dict[str, Any], device: torch.device):
    """Per connector: its result row, its end-to-end function, and (``cfg["stages"]``) each stage alone."""
    rows: list[dict[str, Any]] = []
    pipelines: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    n = pipe.vit_shape.num_tokens
    for label in labels:
        progress(f"pipeline: building {label}")
        connector = (
            connector_spec(label)
            .build(
                pipe.vit_shape.hidden_size,
                pipe.llm_shape.hidden_size,
                resampler=cfg.get("resampler"),
                device=device,
                dtype=pipe.dtype,
            )
            .eval()
        )
        k = num_anchors(connector)
        tokens = connector.num_output_tokens(n)
        total = flops.pipeline_flops(
            vit=pipe.vit_shape,
            llm=pipe.llm_shape,
            visual_tokens=tokens,
            text_tokens=pipe.text,
            connector_flops=connector.analytic_flops(n),
            uses_anchors=connector.uses_anchors,
            batch=pipe.batch,
        )
        rows.append({"connector": label, "visual_tokens": tokens, "num_anchors": k, "analytic_flops": total.to_dict()})
        pipelines[label] = (lambda c, kk: lambda: pipe.prefill(c(*pipe.vision(kk))))(connector, k)
        if cfg["stages"]:  # each stage alone, on the inputs it gets in the pipeline
            features, anchor_idx = pipe.vision(k)
            visual = connector(features, anchor_idx)
            stages.setdefault(f"vision/{k}", (lambda kk: lambda: pipe.vision(kk))(k))
            stages[f"connector/{label}"] = (lambda c, f, a: lambda: c(f, a))(connector, features, anchor_idx)
            stages.setdefault(f"llm/{tokens}", (lambda v: lambda: pipe.prefill(v))(visual))
    return rows, pipelines, stages


def measured(labels: list[str], *, preset: str, device: torch.device) -> dict[str, Any]:
    """End-to-end pipeline latency per connector with random-init HF models at the preset's shapes."""
    cfg = PRESETS[preset]
    pipe = _Pipeline(cfg, device)
    timing = {"rounds": cfg["rounds"], "min_block_s": cfg["min_block_s"]}
    with torch.inference_mode():
        rows, pipelines, stages = _cases(pipe, labels, cfg, device)
        timed = measure_interleaved(
            pipelines,
            device,
            **timing,
            label=f"pipeline: end to end ({pipe.batch} images, visual + {pipe.text} text tokens)",
        )
        timed_stages = measure_interleaved(stages, device, **timing, label="pipeline: stages alone") if stages else {}
    for row in rows:
        row.update(timed[row["connector"]])
        for stage, key in (
            ("vision", f"vision/{row['num_anchors']}"),
            ("connector", f"connector/{row['connector']}"),
            ("llm", f"llm/{row['visual_tokens']}"),
        ):
            if key in timed_stages:
                row[f"{stage}_ms"] = timed_stages[key]["median_ms"]
                row[f"{stage}_iqr_ms"] = timed_stages[key]["iqr_ms"]
        progress(f"pipeline: {row['connector']}: {row['median_ms']:.1f} ms")
    base = next(r for r in rows if r["connector"] == BASELINE)
    for r in rows:
        r["latency_vs_baseline"] = r["median_ms"] / base["median_ms"]
        r["analytic_vs_baseline"] = r["analytic_flops"]["total"] / base["analytic_flops"]["total"]
    return {
        "scaled_down": cfg["scaled"],
        "vit": pipe.vit_shape.to_dict(),
        "llm": pipe.llm_shape.to_dict(),
        "batch": pipe.batch,
        "text_tokens": pipe.text,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "timing": {**timing, "mode": "inference_mode"},
        "results": rows,
        "target": "AcFormer-144 pipeline <= 0.40x MLP-576 pipeline (project target; GPU, LLaVA-1.5-7B shapes)",
    }


def run(
    *,
    preset: str = "default",
    device: torch.device | str = "cpu",
    connectors: str | None = None,
    measure_pipeline: bool = True,
) -> dict[str, Any]:
    """Analytic pipeline costs at LLaMA-7B/13B shapes and, unless disabled, the measured pipeline."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    device = torch.device(device)
    labels = resolve_connectors(connectors)
    progress("pipeline: analytic FLOPs and KV cache at LLaMA-7B/13B shapes")
    result: dict[str, Any] = {
        "benchmark": "pipeline",
        "preset": preset,
        "device_type": device.type,
        "analytic": analytic(labels),
    }
    if measure_pipeline:
        result["measured"] = measured(labels, preset=preset, device=device)
    return result


def summarize(result: dict[str, Any]) -> list[str]:
    """One or two sentences for the run's summary: the analytic 7B pipeline and the measured one."""
    rows = [r for r in result["analytic"]["results"] if r["llm_shape"] == "llama-7b" and r["connector"] != BASELINE]
    if not rows:
        return []
    row = next((r for r in rows if r["connector"] == "acformer-144"), rows[0])
    out = [
        f"Whole pipeline at LLaVA-1.5-7B shapes (analytic): {row['connector']} costs {row['total_vs_baseline']:.2f}x "
        f"the FLOPs of the {BASELINE} pipeline per sample and leaves {row['kv_cache_vs_baseline']:.2f}x its KV cache."
    ]
    m = result.get("measured")
    if m:
        measured = {r["connector"]: r for r in m["results"]}
        if row["connector"] in measured:
            r = measured[row["connector"]]
            shapes = "scaled-down models" if m["scaled_down"] else "LLaVA-1.5-7B shapes"
            out.append(
                f"Measured here ({shapes}, batch {m['batch']}), that pipeline took "
                f"{r['latency_vs_baseline']:.2f}x the time of the {BASELINE} one (analytic "
                f"{r['analytic_vs_baseline']:.2f}x at those shapes)."
            )
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def to_markdown(result: dict[str, Any]) -> str:
    """Markdown tables of :func:`run`'s result."""
    a = result["analytic"]
    lines = [
        f"Analytic pipeline cost per sample: CLIP ViT-L/14-336 + [CLS] probe (anchor connectors) + connector + "
        f"LLM prefill over visual + {a['text_tokens']} text tokens ({a['convention']}); (x) = ratio to {BASELINE}.",
        "",
        "| LLM | connector | visual tokens | ViT | connector | LLM prefill (x) | total (x) | KV cache/sample (x) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in a["results"]:
        lines.append(
            f"| {r['llm_shape']} | {r['connector']} | {r['visual_tokens']} "
            f"| {format_flops(r['vit_flops'] + r['probe_flops'])} "
            f"| {format_flops(r['connector_flops'])} | {format_flops(r['llm_flops'])} ({r['llm_vs_baseline']:.3f}x) "
            f"| {format_flops(r['total_flops'])} ({r['total_vs_baseline']:.3f}x) "
            f"| {_mib(r['kv_cache_bytes'])} ({r['kv_cache_vs_baseline']:.3f}x) |"
        )
    m = result.get("measured")
    if m:
        v, llm = m["vit"], m["llm"]
        shapes = (
            f"ViT {v['hidden_size']} wide x {v['num_layers']} layers on "
            f"{v['image_size'] // v['patch_size']}^2+1 tokens, "
            f"LLM {llm['hidden_size']} wide x {llm['num_layers']} layers (vocab {llm['vocab_size']})"
        )
        scaled = (
            "**Scaled-down models** (token counts as LLaVA-1.5, widths/depths reduced so a CPU finishes): "
            if m["scaled_down"]
            else "LLaVA-1.5-7B shapes: "
        )
        mem = any(r.get("peak_mem_mib") is not None for r in m["results"])
        lines += [
            "",
            f"Measured pipeline, random-init HF models, SDPA, {m['dtype']}, batch {m['batch']}, "
            f"{m['text_tokens']} text "
            f"tokens. {scaled}{shapes}. Latency = median ± IQR for the batch over interleaved rounds; stages timed "
            f"alone. Target: {m['target']}.",
            "",
            "| connector | visual tokens | pipeline ms ± IQR (x) | analytic FLOPs (x) | vision ms | connector ms "
            "| LLM prefill ms |" + (" peak MiB |" if mem else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if mem else ""),
        ]
        for r in m["results"]:
            row = (
                f"| {r['connector']} | {r['visual_tokens']} | {format_ms(r['median_ms'], r['iqr_ms'], 1)} "
                f"({r['latency_vs_baseline']:.3f}x) "
                f"| {format_flops(r['analytic_flops']['total'])} ({r['analytic_vs_baseline']:.3f}x) | "
                + " | ".join(
                    _fmt_ms(r.get(f"{stage}_ms"), r.get(f"{stage}_iqr_ms")) for stage in ("vision", "connector", "llm")
                )
                + " |"
            )
            if mem:
                row += f" {r['peak_mem_mib']:.0f} |"
            lines.append(row)
    return "\n".join(lines)


def _fmt_ms(value: float | None, iqr: float | None) -> str:
    return "-" if value is None else format_ms(value, iqr, 1)


def main(argv: list[str] | None = None) -> None:
    connector_benchmark_main(
        argv, description=__doc__.splitlines()[0], presets=PRESETS, run=run, to_markdown=to_markdown
    )


if __name__ == "__main__":
    main()
