"""Anchor-search benchmark: the batched search against the reference's per-sample, per-head Python loop.

Run alone from the repository root: ``python -m benchmarks.bench_search [--preset default] [--device cpu]``;
the suite (``python -m benchmarks.run``) folds :func:`run` into its report. The shapes are B=32, H=16,
N=577 (CLIP ViT-L/14-336: [CLS] + 24×24 patches), K=256 and K=144, on three kinds of [CLS] rows:

* ``random``: a softmax of independent Gaussian logits per head: heads disagree, so each head's top
  tokens are rarely taken already and the reference loop's widening window stays short;
* ``correlated``: the heads share most of their logits (``0.9 · shared + 0.45 · own`` Gaussians), as real
  attention heads agree on the salient tokens; the reference loop then widens its window far more often;
* ``clip``: the [CLS] rows of layer -2 of a **random-init** HF ``CLIPVisionModel`` (16 heads, 577 tokens,
  width and depth reduced so a CPU builds it in seconds) on random pixels, taken with ``output_attentions``.
  Random weights, not a trained model: it shows the search on attention-shaped rows, not trained heads.

Every method, the reference loop included, is timed in interleaved rounds (``measure_interleaved``), so
load that comes and goes on a shared machine hits all of them alike; each time is a median with its IQR.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from anchor_former.search import _resolve_method, anchor_search, native_search_available
from benchmarks._common import device_name, format_ms, measure_interleaved, parse_device, progress

__all__ = ["INPUTS", "PRESETS", "make_scores", "reference_loop", "run", "summarize", "to_markdown"]

# batch, heads, tokens, anchors; ``clip``: HF CLIPVisionConfig of the random-init model for the ``clip``
# rows (its image/patch sizes give the same token count); timing: interleaved rounds of blocks >= min_block_s.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "batch": 4,
        "heads": 4,
        "tokens": 65,
        "anchors": [16],
        "rounds": 2,
        "min_block_s": 0.0,
        "compile": False,  # the smoke run; tests/test_search.py compiles the search itself
        "clip": {
            "image_size": 56,
            "patch_size": 7,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    },
    "quick": {
        "batch": 32,
        "heads": 16,
        "tokens": 577,
        "anchors": [144],
        "rounds": 3,
        "min_block_s": 0.02,
        "compile": False,  # torch.compile alone would take most of a quick run
        "clip": {
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,  # the rows are layer -2's
            "num_attention_heads": 16,
        },
    },
    "default": {
        "batch": 32,
        "heads": 16,
        "tokens": 577,
        "anchors": [256, 144],
        "rounds": 7,
        "min_block_s": 0.05,
        "clip": {
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 2,
            "num_attention_heads": 16,
        },
    },
    "llava-1.5-7b": {
        "batch": 32,
        "heads": 16,
        "tokens": 577,
        "anchors": [256, 144],
        "rounds": 10,
        "min_block_s": 0.1,
        "clip": {
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 4,
            "num_attention_heads": 16,
        },
    },
}
INPUTS = {
    "random": "independent Gaussian logits per head, softmax",
    "correlated": "heads share most logits: softmax(0.9 * shared + 0.45 * own), Gaussian",
    "clip": "[CLS] rows of layer -2 of a random-init HF CLIPVisionModel on random pixels (not trained weights)",
}


def reference_loop(attention_row: torch.Tensor, num_anchors: int) -> list[list[int]]:
    """The reference's way, step for step: per sample and per head, an ascending ``argsort`` of the
    head's patch scores read back with ``.cpu().tolist()``, then the chosen set rebuilt as the union of
    the earlier anchors, [CLS] and the head's last ``per_head + c`` sorted tokens, widening ``c`` by one
    until the head has added ``per_head`` new tokens.

    ``attention_row (B, H, N)``; returns ``B`` lists ``[0] + sorted(anchors)`` with ``H * (K // H)``
    anchors, as the reference does.
    """
    b, h, _ = attention_row.shape
    per_head = num_anchors // h
    out = []
    for i in range(b):
        anchors: list[int] = []
        for j in range(h):
            ascending = (torch.argsort(attention_row[i, j, 1:]) + 1).cpu().tolist()
            target = (j + 1) * per_head + 1  # earlier anchors + this head's quota + [CLS]
            width = per_head
            merged = set(anchors) | set(ascending[-width:]) | {0}
            while len(merged) < target:
                width += 1
                merged = set(anchors) | set(ascending[-width:]) | {0}
            anchors = sorted(merged)
        out.append(anchors)
    return out


def _clip_rows(cfg: dict[str, Any], generator: torch.Generator) -> torch.Tensor | None:
    """``(B, H, N)`` [CLS] rows of layer -2 of a random-init CLIP; None without transformers."""
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel
    except ImportError:
        return None
    torch.manual_seed(0)
    config = CLIPVisionConfig(**cfg["clip"], attn_implementation="eager")  # type: ignore[call-arg]  # a **kwargs field
    model = CLIPVisionModel(config).eval()
    size = cfg["clip"]["image_size"]
    pixels = torch.randn(cfg["batch"], 3, size, size, generator=generator)
    with torch.no_grad():
        attentions = model(pixel_values=pixels, output_attentions=True).attentions
    return attentions[-2][:, :, 0, :].contiguous()  # (B, H, N): the [CLS] query's row per head


def make_scores(kind: str, cfg: dict[str, Any]) -> torch.Tensor | None:
    """``(B, H, N)`` float32 [CLS] rows of one input kind (see :data:`INPUTS`); None if it cannot be built."""
    b, h, n = cfg["batch"], cfg["heads"], cfg["tokens"]
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        return torch.softmax(torch.randn(b, h, n, generator=gen), dim=-1)
    if kind == "correlated":
        shared = torch.randn(b, 1, n, generator=gen)
        return torch.softmax(0.9 * shared + 0.45 * torch.randn(b, h, n, generator=gen), dim=-1)
    if kind == "clip":
        return _clip_rows(cfg, gen)
    raise ValueError(f"kind must be one of {sorted(INPUTS)}, got {kind!r}")


def _methods(
    row: torch.Tensor, k: int, entry: dict[str, Any], compiled: Callable | None, ref: torch.Tensor
) -> dict[str, Callable[[], Any]]:
    """The timed functions for one case: the reference loop and every batched method available here."""
    fns: dict[str, Callable[[], Any]] = {
        "loop": lambda: reference_loop(row, k),
        # What a user gets by default: method="auto" + the finite check.
        "default": lambda: anchor_search(row, k),
        "masked": lambda: anchor_search(row, k, method="masked", check_finite=False),
        "sorted": lambda: anchor_search(row, k, method="sorted", check_finite=False),
    }
    if row.device.type == "cpu" and native_search_available():
        fns["native"] = lambda: anchor_search(row, k, method="native", check_finite=False)
    if row.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        # The opt-in kernel has not met a real GPU before: a failure is recorded, not fatal, so the
        # other methods' numbers still come out of a scarce GPU run.
        try:
            entry["triton_matches_loop"] = torch.equal(anchor_search(row, k, method="triton").cpu(), ref)
        except Exception as exc:  # noqa: BLE001 - any build or launch error
            entry["triton_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        if entry.get("triton_matches_loop"):
            fns["triton"] = lambda: anchor_search(row, k, method="triton", check_finite=False)
    if compiled is not None:
        fns["compiled"] = lambda: compiled(row)
    return fns


def _time_case(kind: str, row: torch.Tensor, k: int, cfg: dict[str, Any], compiled: Callable | None) -> dict[str, Any]:
    """One (input kind, K) case: agreement with the loop, then every method timed interleaved."""
    b, h, n = row.shape
    ref = torch.tensor(reference_loop(row, k))
    entry: dict[str, Any] = {
        "input": kind,
        "batch": b,
        "heads": h,
        "tokens": n,
        "anchors": k,
        # ties (the loop's argsort is unstable) or K % H != 0 can make them differ
        "matches_loop": torch.equal(anchor_search(row, k).cpu(), ref),
    }
    fns = _methods(row, k, entry, compiled, ref)
    times = measure_interleaved(
        fns, row.device, rounds=cfg["rounds"], min_block_s=cfg["min_block_s"], label=f"search: {kind} K={k}"
    )
    entry["times"] = {name: {key: t[key] for key in ("median_ms", "iqr_ms", "calls")} for name, t in times.items()}
    loop_ms = times["loop"]["median_ms"]
    entry["speedup"] = {name: loop_ms / t["median_ms"] for name, t in times.items() if name != "loop"}
    return entry


def run(*, preset: str = "default", device: torch.device | str = "cpu", compile: bool = True) -> dict[str, Any]:
    """Time the reference loop and each batched method on each input kind; ratios are loop / method."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    device = torch.device(device)
    cfg = PRESETS[preset]
    rows, skipped = {}, {}
    for kind in INPUTS:
        progress(f"search: building the {kind!r} rows ({INPUTS[kind]})")
        row = make_scores(kind, cfg)
        if row is None:
            skipped[kind] = "needs transformers (the bench extra)"
            continue
        rows[kind] = row.to(device)
    results: list[dict[str, Any]] = []
    compile = compile and cfg.get("compile", True)  # the tiny and quick presets skip torch.compile
    for k in cfg["anchors"]:
        compiled = None
        if compile:
            progress(f"search: compiling anchor_search for K={k}")
            torch._dynamo.reset()
            compiled = torch.compile(
                lambda a, k=k: anchor_search(a, k, check_finite=False), fullgraph=True, dynamic=False
            )
        for kind, row in rows.items():
            if compiled is not None:
                for _ in range(3):  # compile and load the kernels before timing: none of that is timed
                    compiled(row)
            entry = _time_case(kind, row, k, cfg, compiled)
            progress(
                f"search: {kind} K={k}: loop {entry['times']['loop']['median_ms']:.1f} ms, default "
                f"{entry['times']['default']['median_ms']:.3f} ms ({entry['speedup']['default']:.0f}x)"
            )
            results.append(entry)
    any_row = next(iter(rows.values()))
    return {
        "benchmark": "anchor_search",
        "preset": preset,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "auto_method": _resolve_method("auto", any_row),  # what "default" ran
        "native_built": native_search_available(),
        "inputs": {kind: INPUTS[kind] for kind in rows},
        "skipped_inputs": skipped,
        "timing": {"rounds": cfg["rounds"], "min_block_s": cfg["min_block_s"], "mode": "interleaved, loop included"},
        "results": results,
        "target_speedup": 300 if device.type == "cuda" else 30,
    }


_COLUMNS = ("default", "native", "triton", "masked", "sorted", "compiled")


def to_markdown(result: dict[str, Any]) -> str:
    """A markdown table of :func:`run`'s result: median ± IQR per method, and the speed-up over the loop."""
    lines = [
        f"Anchor search on {result['device']} ({result['device_type']}, torch {result['torch']}); every method "
        "and the reference loop timed in the same interleaved rounds; ms = median ± IQR for the whole batch; "
        f"(x) = loop time / method time, target >= {result['target_speedup']}x. `default` is "
        f'`method="auto"` (here `{result.get("auto_method", "?")}`) with the finite check; the others skip it. '
        "Inputs: " + "; ".join(f"`{k}`: {v}" for k, v in result["inputs"].items()) + ".",
        "",
        "| input | B | H | N | K | same anchors as loop | loop ms | "
        + " | ".join(f"{c} ms (x)" for c in _COLUMNS)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(_COLUMNS),
    ]
    for r in result["results"]:
        t = r["times"]
        cells = [r["input"]] + [str(r[key]) for key in ("batch", "heads", "tokens", "anchors")]
        cells += ["yes" if r["matches_loop"] else "no", format_ms(t["loop"]["median_ms"], t["loop"]["iqr_ms"], 1)]
        for name in _COLUMNS:
            cells.append(
                f"{format_ms(t[name]['median_ms'], t[name]['iqr_ms'], 3)} ({r['speedup'][name]:.0f}x)"
                if name in t
                else "-"
            )
        lines.append("| " + " | ".join(cells) + " |")
    for kind, why in result.get("skipped_inputs", {}).items():
        lines += ["", f"`{kind}` rows skipped: {why}."]
    for r in result["results"]:
        if "triton_error" in r:
            lines += ["", f"`triton` at K = {r['anchors']} ({r['input']}) failed (not timed): {r['triton_error']}"]
        elif r.get("triton_matches_loop") is False:
            lines += [
                "",
                f"`triton` at K = {r['anchors']} ({r['input']}) disagrees with the reference loop (not timed).",
            ]
    return "\n".join(lines)


def summarize(result: dict[str, Any]) -> list[str]:
    """One sentence for the run's summary: the default method's speed-up over the reference loop."""
    rows = result["results"]
    if not rows:
        return []
    speedups = [r["speedup"]["default"] for r in rows]
    same = sum(bool(r["matches_loop"]) for r in rows)
    return [
        f'Anchor search: the batched search (`method="auto"`, here `{result.get("auto_method", "?")}`) ran '
        f"{min(speedups):.0f}x to {max(speedups):.0f}x faster than the reference's per-sample loop over "
        f"{len(rows)} case(s) ({', '.join(sorted({r['input'] for r in rows}))} rows, K = "
        f"{', '.join(str(k) for k in sorted({r['anchors'] for r in rows}))}) and chose the same anchors in "
        f"{same} of them."
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    try:
        device = parse_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    result = run(preset=args.preset, device=device, compile=not args.no_compile)
    print(to_markdown(result))
    json.dump(result, sys.stderr, indent=1)


if __name__ == "__main__":
    main()
