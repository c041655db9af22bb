"""Sweep of the CPU search methods over (B, H, N, K): the measured basis of ``method="auto"`` on CPU.

``"auto"`` runs the compiled kernel (``"native"``) on CPU whenever it can take the scores. This sweep
checks that it never loses badly to an exact alternative (``"masked"``, ``"sorted"``) anywhere:
single-head ``(B, N)`` scores, LLaVA's 16 heads, quotas far above N/16 (``K = N/2``), long sequences.
Methods are timed **interleaved**: each round times every method once on the same input, and the ratios
are medians of the per-round ratios, so load that drifts during the run hits all methods alike.

Run: ``python benchmarks/bench_search_sweep.py [--rounds 15] [--output DIR] [--old-kernel PATH.so]``;
writes ``search-sweep-cpu.json`` and ``.md`` (default ``benchmarks/results/``). ``--old-kernel`` adds a
column for an earlier build of ``_native.c`` (its pre-validation entry point), to show a regression or a
fix. Timings on a shared machine are noisy: the spread (IQR) is printed beside every median.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from anchor_former import anchor_search
from anchor_former import search as search_module

__all__ = ["CASES", "run"]

# (B, H, N, K): single-head and 16-head scores, LLaVA-1.5's N = 577, quotas up to N/2.
CASES: list[tuple[int, int, int, int]] = [
    (1, 1, 577, 144), (32, 1, 577, 144), (1, 1, 577, 288), (32, 1, 577, 288),
    (1, 1, 4097, 64), (1, 1, 4097, 2048), (8, 1, 4097, 2048),
    (1, 1, 65537, 64), (1, 1, 65537, 32768),
    (1, 16, 577, 144), (32, 16, 577, 144), (32, 16, 577, 256), (32, 16, 577, 288),
    (32, 4, 577, 288), (4, 16, 4097, 2048), (1, 16, 65537, 32768),
]  # fmt: skip
METHODS = ("native", "masked", "sorted")


def _load_old_kernel(path: str):
    loader = importlib.machinery.ExtensionFileLoader("anchor_former._native", path)
    spec = importlib.util.spec_from_loader("anchor_former._native", loader)
    if spec is None:
        raise ImportError(f"cannot load a kernel from {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class _OldEntryPoint:
    """Presents an earlier kernel build (entry point without out_width and mask arguments) with the
    current signature, so that it runs behind the same Python code of ``anchor_search``."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def search(self, *args):
        head, tail, mask = args[:11], args[12:15], args[15:]  # args[11] is out_width
        assert mask[0] == 0, "the earlier kernel takes no key_padding_mask"
        return self.kernel.search(*head, *tail)


def _old_native(kernel: _OldEntryPoint, scores: torch.Tensor, k: int) -> torch.Tensor:
    """``anchor_search(..., method="native")`` with the earlier kernel swapped in for this call only."""
    current = search_module._native
    search_module._native = kernel  # type: ignore[assignment]  # the same entry point
    try:
        return anchor_search(scores, k, method="native")
    finally:
        search_module._native = current


def _time(fn, budget_s: float) -> float:
    """Seconds per call: repeat ``fn`` until ``budget_s`` has passed (at least once), return the mean."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return elapsed / calls


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def run(*, rounds: int, budget_s: float, old_kernel: str | None = None, cases=CASES) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    kernel = _OldEntryPoint(_load_old_kernel(old_kernel)) if old_kernel else None
    rows = []
    for b, h, n, k in cases:
        scores = torch.randn(b, h, n, generator=gen)  # (B, H, N); (B, 1, N) is what (B, N) scores become
        fns: dict[str, Any] = {m: (lambda m=m, s=scores, k=k: anchor_search(s, k, method=m)) for m in METHODS}
        if kernel is not None:
            fns["native-old"] = lambda s=scores, k=k: _old_native(kernel, s, k)
        ref = anchor_search(scores, k, method="masked")
        assert all(torch.equal(fn(), ref) for fn in fns.values()), (b, h, n, k)  # warm-up and a check
        times: dict[str, list[float]] = {m: [] for m in fns}
        for _ in range(rounds):
            for m, fn in fns.items():  # interleaved: every method once per round
                times[m].append(_time(fn, budget_s))
        row: dict[str, Any] = {"B": b, "H": h, "N": n, "K": k}
        for m, ts in times.items():
            lo, med, hi = _quartiles(ts)
            row[m] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * lo, "q3_ms": 1e3 * hi}
        for m in fns:
            if m != "native":
                ratio = [n_ / o for n_, o in zip(times["native"], times[m], strict=True)]
                row[f"native/{m}"] = statistics.median(ratio)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    methods = [m for m in ("native", "native-old", "masked", "sorted") if m in rows[0]]
    ratios = [key for key in ("native/masked", "native/sorted", "native/native-old") if key in rows[0]]
    lines = [
        "# Anchor search on CPU: every method over (B, H, N, K)",
        "",
        f"{meta['cpu']}, {meta['threads']} torch threads, torch {meta['torch']}; {meta['rounds']} interleaved rounds "
        f"of {meta['budget_s']} s per method. {meta['note']}",
        "",
        "Times: median ms per call [IQR]. Ratios: median over rounds of native time / other time "
        "(below 1: native is faster).",
        "",
        "| B | H | N | K | " + " | ".join(methods) + " | " + " | ".join(ratios) + " |",
        "|---" * (4 + len(methods) + len(ratios)) + "|",
    ]
    for r in rows:
        cells = [f"{r[m]['median_ms']:.3g} [{r[m]['q1_ms']:.3g}–{r[m]['q3_ms']:.3g}]" for m in methods]
        lines.append(f"| {r['B']} | {r['H']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{r[key]:.3f}" for key in ratios) + " |")  # fmt: skip
    worst = max(rows, key=lambda r: max(r[key] for key in ratios if key != "native/native-old"))
    worst_ratio = max(worst[key] for key in ratios if key != "native/native-old")
    lines += ["", f"Worst case for native: B={worst['B']}, H={worst['H']}, N={worst['N']}, K={worst['K']} "
              f"(native / best other = {worst_ratio:.2f})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget", type=float, default=0.02, help="seconds of calls per timing")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--old-kernel", help="path of an earlier _native build to time beside the current one")
    parser.add_argument("--note", default="The machine was shared with other jobs and noisy: compare ratios, "
                        "which are measured interleaved, rather than absolute times.")  # fmt: skip
    args = parser.parse_args()
    rows = run(rounds=args.rounds, budget_s=args.budget, old_kernel=args.old_kernel)
    meta = {
        "cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
        "budget_s": args.budget, "note": args.note, "old_kernel": args.old_kernel,
    }  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "search-sweep-cpu.json").write_text(json.dumps({**meta, "results": rows}, indent=1))
    (args.output / "search-sweep-cpu.md").write_text(_markdown(meta, rows))


if __name__ == "__main__":
    main()
