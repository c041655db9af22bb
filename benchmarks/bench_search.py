"""Anchor-search benchmark: the batched search against the reference's per-sample, per-head Python loop.

Run alone: ``python benchmarks/bench_search.py [--preset default] [--device cpu]``; the suite
(``benchmarks/run.py``) folds :func:`run` into its report. The issue's shapes are B=32, H=16, N=577
(CLIP ViT-L/14-336: [CLS] + 24×24 patches), K=256 and K=144.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

from anchor_former.search import _resolve_method, anchor_search, native_search_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name  # noqa: E402

__all__ = ["reference_loop", "run", "PRESETS"]

# batch, heads, tokens, anchors, timed repeats budget (seconds per measurement)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 4, "heads": 4, "tokens": 65, "anchors": [16], "min_run_time": 0.05},
    "default": {"batch": 32, "heads": 16, "tokens": 577, "anchors": [256, 144], "min_run_time": 0.5},
    "llava-1.5-7b": {"batch": 32, "heads": 16, "tokens": 577, "anchors": [256, 144], "min_run_time": 1.0},
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


def _time(fn, *, min_run_time: float, label: str) -> float:
    """Median seconds of ``fn()`` (torch.utils.benchmark synchronises CUDA)."""
    fn()  # warm-up (and compilation)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def run(*, preset: str = "default", device: torch.device | str = "cpu", compile: bool = True) -> dict[str, Any]:
    """Time the reference loop and each batched method at the preset's shapes; ratios are loop / method."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    device = torch.device(device)
    cfg = PRESETS[preset]
    b, h, n = cfg["batch"], cfg["heads"], cfg["tokens"]
    gen = torch.Generator().manual_seed(0)
    row = torch.softmax(torch.randn(b, h, n, generator=gen), dim=-1).to(device)
    results: list[dict[str, Any]] = []
    for k in cfg["anchors"]:
        # Same anchors as the loop when K % H == 0 and there are no ties (random softmax rows).
        ref = torch.tensor(reference_loop(row, k))
        assert torch.equal(anchor_search(row, k).cpu(), ref), "batched search disagrees with the reference loop"
        entry: dict[str, Any] = {"batch": b, "heads": h, "tokens": n, "anchors": k}
        loop_s = _time(lambda: reference_loop(row, k), min_run_time=cfg["min_run_time"], label="loop")
        entry["reference_loop_ms"] = loop_s * 1e3
        variants = {
            # What a user gets by default: method="auto" + the finite check.
            "default": lambda: anchor_search(row, k),
            "masked": lambda: anchor_search(row, k, method="masked", check_finite=False),
            "sorted": lambda: anchor_search(row, k, method="sorted", check_finite=False),
        }
        if device.type == "cpu" and native_search_available():
            variants["native"] = lambda: anchor_search(row, k, method="native", check_finite=False)
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            # The opt-in kernel has not met a real GPU before: a failure is recorded, not fatal, so the
            # other methods' numbers still come out of a scarce GPU run.
            try:
                entry["triton_matches_loop"] = torch.equal(anchor_search(row, k, method="triton").cpu(), ref)
            except Exception as exc:  # noqa: BLE001 - any build or launch error
                entry["triton_error"] = f"{type(exc).__name__}: {exc}"[:1000]
            if entry.get("triton_matches_loop"):
                variants["triton"] = lambda: anchor_search(row, k, method="triton", check_finite=False)
        if compile:
            torch._dynamo.reset()
            compiled = torch.compile(lambda a: anchor_search(a, k, check_finite=False), fullgraph=True, dynamic=False)
            variants["compiled"] = lambda: compiled(row)
        for name, fn in variants.items():
            seconds = _time(fn, min_run_time=cfg["min_run_time"], label=name)
            entry[f"{name}_ms"] = seconds * 1e3
            entry[f"{name}_speedup"] = loop_s / seconds
        results.append(entry)
    return {
        "benchmark": "anchor_search",
        "preset": preset,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "auto_method": _resolve_method("auto", row),  # what "default" ran
        "native_built": native_search_available(),
        "results": results,
        "target_speedup": 300 if device.type == "cuda" else 30,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """A markdown table of :func:`run`'s result."""
    lines = [
        f"Anchor search on {result['device']} ({result['device_type']}, torch {result['torch']}); "
        "speed-up = reference loop time / method time in the same run, "
        f"target >= {result['target_speedup']}x. `default` is `method=\"auto\"` (here "
        f"`{result.get('auto_method', '?')}`) with the finite check; the others skip it.",
        "",
        "| B | H | N | K | loop ms | default ms (x) | native ms (x) | triton ms (x) | masked ms (x) | sorted ms (x) "
        "| compiled auto ms (x) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        cells = [str(r[key]) for key in ("batch", "heads", "tokens", "anchors")] + [f"{r['reference_loop_ms']:.1f}"]
        for name in ("default", "native", "triton", "masked", "sorted", "compiled"):
            cells.append(f"{r[name + '_ms']:.3f} ({r[name + '_speedup']:.0f}x)" if f"{name}_ms" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for r in result["results"]:
        if "triton_error" in r:
            lines += ["", f"`triton` at K = {r['anchors']} failed (not timed): {r['triton_error']}"]
        elif r.get("triton_matches_loop") is False:
            lines += ["", f"`triton` at K = {r['anchors']} disagrees with the reference loop (not timed)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    result = run(preset=args.preset, device=args.device, compile=not args.no_compile)
    print(to_markdown(result))
    json.dump(result, sys.stderr, indent=1)


if __name__ == "__main__":
    main()
