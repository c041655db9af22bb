"""Serving benchmark: what fewer visual tokens buy in vLLM (prompt throughput and time to first token).

One vLLM engine serves a LLaVA-1.5-shaped model through the ``anchor_former.vllm`` plugin; the stock
model is the same engine at K = every patch (576 for CLIP ViT-L/14-336, which serves exactly the stock
model's tokens: tests/vllm_plugin/test_vllm_llava.py). Per-request budgets (``mm_processor_kwargs``) give stock,
K = 64, 144 and 192 the same engine settings, and they are measured in interleaved rounds, so load that
comes and goes on a shared machine hits all of them alike:

* ``prompt_tok_per_s``: a batch of ``batch`` requests, one image each, one generated token, timed
  end to end (vision tower, anchor search, prefill): prompt tokens over wall time;
* ``ttft_ms``: one request, one generated token: the time to the first token;
* ``throughput_x`` / ``ttft_x``: ratios to stock, median over rounds with the min and max.

Every request carries a new random image and the prefix cache is off, so nothing is served from a
cache. Runs only where vLLM is importable (``scripts/test_vllm.sh`` builds such an environment)::

    python -m benchmarks.bench_serving --preset default --output benchmarks/results/serving-cpu
    python -m benchmarks.bench_serving --preset llava-1.5-7b --device cuda   # the same on a GPU

Presets: ``tiny`` (seconds of measurement), ``default`` (scaled-down widths and depths, real token
counts: 336 px images, 14 px patches, 576 patches), ``llava-1.5-7b`` (LLaVA-1.5-7B shapes, random weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["BUDGETS", "run", "to_markdown"]

BUDGETS = (64, 144, 192)
# (vision hidden, vision layers, vision heads, llm hidden, llm layers, llm heads, batch, rounds)
_SHAPES = {
    "tiny": (64, 2, 4, 128, 2, 2, 2, 2),
    "default": (128, 4, 4, 256, 4, 4, 4, 5),
    "llava-1.5-7b": (1024, 24, 16, 4096, 32, 32, 8, 5),
}
_IMAGE, _PATCH = 336, 14
_PROMPT = "USER: <image> what is in the picture ? ASSISTANT:"


def _vllm_available() -> bool:
    try:
        from vllm import LLM  # noqa: F401  (a name: a folder called vllm on sys.path imports as a namespace)
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def _save_model(folder: Path, preset: str) -> None:
    """A LLaVA-1.5-shaped random model in the llava-hf layout, with a processor, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vd, vl, vh, ld, ll, lh, _, _ = _SHAPES[preset]
    words = ["USER:", "ASSISTANT:", "what", "is", "in", "the", "picture", "?"]
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<image>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
    )
    images = CLIPImageProcessor(size={"shortest_edge": _IMAGE}, crop_size={"height": _IMAGE, "width": _IMAGE})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=vd,
        intermediate_size=4 * vd,
        num_hidden_layers=vl,
        num_attention_heads=vh,
        image_size=_IMAGE,
        patch_size=_PATCH,
    )
    text = LlamaConfig(
        vocab_size=32064 if preset == "llava-1.5-7b" else 1024,
        hidden_size=ld,
        intermediate_size=ld * 11 // 4,
        num_hidden_layers=ll,
        num_attention_heads=lh,
        num_key_value_heads=lh,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def _images(count: int, seed: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (_IMAGE, _IMAGE, 3), dtype=np.uint8)) for _ in range(count)]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(*, preset: str = "default", device: Any = None) -> dict[str, Any]:
    """Measure stock and each budget of :data:`BUDGETS`; ``{"skipped": ...}`` without vLLM."""
    if not _vllm_available():
        return {"skipped": "vLLM is not importable here (scripts/test_vllm.sh builds an environment with it)"}
    import vllm
    from vllm import LLM, SamplingParams

    import anchor_former.vllm as afv

    *_, batch, rounds = _SHAPES[preset]
    patches = (_IMAGE // _PATCH) ** 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _save_model(folder, preset)
        dtype = "bfloat16" if preset == "llava-1.5-7b" else "float32"
        settings = dict(
            dtype=dtype,
            enforce_eager=True,
            max_model_len=2048,
            max_num_seqs=batch,
            kv_cache_memory_bytes=1 << 30,
            enable_prefix_caching=False,
            mm_processor_cache_gb=0,
            limit_mm_per_prompt={"image": 1},
            seed=0,
        )
        llm = LLM(model=str(folder), hf_overrides=afv.hf_overrides(num_anchors=144), **settings)
        params = SamplingParams(temperature=0.0, max_tokens=1)
        configs = {"stock": patches, **{f"K={k}": k for k in BUDGETS}}
        seed = iter(range(10**6))

        def requests(k: int, count: int) -> list[dict]:
            return [
                {"prompt": _PROMPT, "multi_modal_data": {"image": im}, "mm_processor_kwargs": {"num_anchors": k}}
                for im in _images(count, next(seed))
            ]

        def timed(k: int, count: int) -> tuple[float, int]:
            reqs = requests(k, count)
            start = time.perf_counter()
            outs = llm.generate(reqs, params, use_tqdm=False)  # noqa: F821 (the engine, deleted after the rounds)
            return time.perf_counter() - start, sum(len(o.prompt_token_ids) for o in outs)

        for k in configs.values():  # warm-up: every budget once
            timed(k, batch)
        samples: dict[str, dict[str, list[float]]] = {n: {"tok_s": [], "ttft_ms": []} for n in configs}
        tokens: dict[str, int] = {}
        for r in range(rounds):
            for name, k in configs.items():
                seconds, count = timed(k, batch)
                samples[name]["tok_s"].append(count / seconds)
                tokens[name] = count // batch
                samples[name]["ttft_ms"].append(timed(k, 1)[0] * 1e3)
            print(f"[bench] serving: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        del llm
    rows = []
    for name in configs:
        tok_s, ttft = samples[name]["tok_s"], samples[name]["ttft_ms"]
        stock_tok, stock_ttft = samples["stock"]["tok_s"], samples["stock"]["ttft_ms"]
        rows.append(
            {
                "config": name,
                "prompt_tokens": tokens[name],
                "prompt_tok_per_s": _spread(tok_s),
                "ttft_ms": _spread(ttft),
                "throughput_x": _spread([a / b for a, b in zip(tok_s, stock_tok)]),  # same round
                "ttft_x": _spread([a / b for a, b in zip(ttft, stock_ttft)]),
                "requests_per_s_x": _spread(
                    [(a / tokens[name]) / (b / tokens["stock"]) for a, b in zip(tok_s, stock_tok)]
                ),
            }
        )
    return {
        "vllm": vllm.__version__,
        "preset": preset,
        "dtype": dtype,
        "batch": batch,
        "rounds": rounds,
        "patches": patches,
        "engine": {k: v for k, v in settings.items() if k != "limit_mm_per_prompt"},
        "rows": rows,
    }


def _fmt(spread: dict[str, float], digits: int = 2) -> str:
    return f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}, {spread['max']:.{digits}f}]"


def to_markdown(result: dict[str, Any]) -> str:
    """The table of one run (median [min, max] over rounds)."""
    if "rows" not in result:
        return f"- skipped: {result.get('skipped', result.get('error'))}"
    lines = [
        f"vLLM {result['vllm']}, preset {result['preset']}, {result['dtype']}, batch {result['batch']}, "
        f"{result['rounds']} interleaved rounds; median [min, max] over rounds; ratios to stock (K = every patch, "
        f"{result['patches']}) within each round.",
        "",
        "| config | prompt tokens / request | prompt tok/s | requests/s vs stock | TTFT ms | TTFT vs stock |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['config']} | {row['prompt_tokens']} | {_fmt(row['prompt_tok_per_s'], 0)} | "
            f"{_fmt(row['requests_per_s_x'])}x | {_fmt(row['ttft_ms'], 0)} | {_fmt(row['ttft_x'])}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(_SHAPES), default="default")
    parser.add_argument("--device", default="auto", help="informational: vLLM serves on its platform's device")
    parser.add_argument("--output", type=Path, default=None, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    import torch

    from benchmarks._common import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run(preset=args.preset, device=device)
    report: dict[str, Any] = {"suite": "anchor-former serving", "environment": environment(device), "serving": result}
    text = to_markdown(result)
    print(text)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        env = report["environment"]
        header = f"# Serving benchmark\n\nDevice: {env['device']}; torch {env['torch']}; {env['date_utc']}.\n\n"
        (args.output / "results.md").write_text(header + text + "\n")
    return 0 if "rows" in result or "skipped" in result else 1


if __name__ == "__main__":
    sys.exit(main())
