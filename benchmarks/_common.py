"""Shared pieces of the benchmark scripts: the connector line-up, devices, timing, memory, environment.

Not part of the installed package: the modules of the ``benchmarks`` package (run from the repository
root, ``python -m benchmarks.run``) import it as ``benchmarks._common``.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import benchmark

from anchor_former.connectors import Connector

__all__ = [
    "BASELINE",
    "BENCH_CONNECTORS",
    "BUDGET_FORMS",
    "BenchConnector",
    "connector_spec",
    "device_name",
    "device_slug",
    "environment",
    "format_count",
    "format_flops",
    "format_ms",
    "measure_interleaved",
    "num_anchors",
    "parse_device",
    "progress",
    "resolve_connectors",
    "seeded",
    "spread_warnings",
]

# A timing whose interquartile range exceeds this share of its median is flagged in results.md.
SPREAD_WARN_RATIO = 0.2


@dataclass(frozen=True)
class BenchConnector:
    """One entry of the line-up: a label, the factory name and its keyword arguments."""

    label: str
    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_resampler(self) -> bool:
        """Cross-attention resamplers (Perceiver, AcFormer): the ones ``resampler`` overrides apply to."""
        return self.factory in ("perceiver", "acformer")

    def build_kwargs(self, resampler: dict[str, Any] | None = None) -> dict[str, Any]:
        """The factory's keyword arguments, with ``resampler`` overrides (depth, heads, ...) if it is one."""
        return {**self.kwargs, **(resampler or {})} if self.is_resampler else dict(self.kwargs)

    def build(
        self, vision_dim: int, llm_dim: int, *, resampler: dict[str, Any] | None = None, **extra: Any
    ) -> Connector:
        """``anchor_former.build_connector(factory, vision_dim, llm_dim, **kwargs, **extra)``."""
        from anchor_former import build_connector

        return build_connector(self.factory, vision_dim, llm_dim, **self.build_kwargs(resampler), **extra)


# The issue's line-up; MLP-576 (LLaVA-1.5's projector) is the baseline every ratio is taken against.
BENCH_CONNECTORS: dict[str, BenchConnector] = {
    c.label: c
    for c in (
        BenchConnector("mlp-576", "mlp2x_gelu"),
        BenchConnector("avgpool-144", "avgpool"),
        BenchConnector("cabstractor-144", "cabstractor"),
        BenchConnector("perceiver-144", "perceiver", {"num_queries": 144}),
        BenchConnector("acformer-144", "acformer", {"num_anchors": 144}),
        BenchConnector("acformer-256", "acformer", {"num_anchors": 256}),
        # training-free: the anchor patches through the checkpoint's own projector (no new parameters)
        BenchConnector("select-64", "select", {"num_anchors": 64}),
        BenchConnector("select-144", "select", {"num_anchors": 144}),
        BenchConnector("select-192", "select", {"num_anchors": 192}),
        BenchConnector("select-128+16", "select", {"num_anchors": 128, "num_context": 16}),
    )
}
BASELINE = "mlp-576"

# Any budget of a family: ``FAMILY-BUDGET`` labels beside the line-up's. The patch grid of the suite's
# encoder shapes (CLIP ViT-L/14-336 tokens: 24 x 24 patches + [CLS]) sets what avgpool and cabstractor can give.
_GRID = 24
_BUDGET = re.compile(r"^(?P<family>[a-z]+)-(?P<k>\d+)(?:\+(?P<m>\d+))?$")
BUDGET_FORMS = (
    "acformer-K (K <= 576 anchors + [CLS])",
    "perceiver-K (K learned queries)",
    "select-K or select-K+M (K anchors + M merged context tokens, K + M <= 576)",
    "cabstractor-T (T a square: 144, 64, ...)",
    f"avgpool-T (T = ceil({_GRID}/pool)^2: 144, 64, 36, ...)",
    "mlp-576",
)


def _avgpool_pool(tokens: int) -> int | None:
    """The pool size whose ``ceil(24 / pool) ** 2`` cells equal ``tokens``, or None."""
    return next((p for p in range(1, _GRID + 1) if math.ceil(_GRID / p) ** 2 == tokens), None)


def _parse_budget(label: str) -> BenchConnector | None:
    """``BenchConnector`` for a ``FAMILY-BUDGET`` label, None when the label has no such form."""
    match = _BUDGET.match(label)
    if match is None:
        return None
    family, k, m = match["family"], int(match["k"]), match["m"]
    if k < 1 or (family in ("acformer", "select") and k + int(m or 0) > _GRID * _GRID):
        return None
    if m is not None:
        return (
            BenchConnector(label, "select", {"num_anchors": k, "num_context": int(m)}) if family == "select" else None
        )
    if family == "acformer":
        return BenchConnector(label, "acformer", {"num_anchors": k})
    if family == "perceiver":
        return BenchConnector(label, "perceiver", {"num_queries": k})
    if family == "select":
        return BenchConnector(label, "select", {"num_anchors": k})
    if family == "cabstractor" and math.isqrt(k) ** 2 == k:
        return BenchConnector(label, "cabstractor", {"grid": math.isqrt(k)})
    if family == "avgpool" and _avgpool_pool(k) is not None:
        return BenchConnector(label, "avgpool", {"pool": _avgpool_pool(k)})
    if family == "mlp" and k == _GRID * _GRID:
        return BENCH_CONNECTORS[BASELINE]
    return None


def num_anchors(connector: Connector) -> int | None:
    """The anchors an anchor connector searches for (its config's ``num_anchors``); None for the others."""
    return getattr(connector.config, "num_anchors", None) if connector.uses_anchors else None


def connector_spec(label: str) -> BenchConnector:
    """The line-up's entry for ``label``, or one parsed from ``FAMILY-BUDGET`` (``select-96``, ``acformer-100``)."""
    spec = BENCH_CONNECTORS.get(label) or _parse_budget(label)
    if spec is None:
        raise ValueError(f"unknown connector {label!r}; valid: {', '.join(BUDGET_FORMS)}")
    return spec


def resolve_connectors(spec: str | None) -> list[str]:
    """Labels from a comma-separated ``spec`` (None or ``"all"``: the line-up), the baseline first.

    A label is one of the line-up's or any budget of a family (:data:`BUDGET_FORMS`, e.g. ``select-96``,
    ``acformer-100``). The baseline is always included, because every ratio is taken against it; the
    others keep the order given.
    """
    if spec is None or spec.strip() == "all":
        return list(BENCH_CONNECTORS)
    wanted = list(dict.fromkeys(s.strip().lower() for s in spec.split(",") if s.strip()))
    unknown = [w for w in wanted if w not in BENCH_CONNECTORS and _parse_budget(w) is None]
    if unknown or not wanted:
        raise ValueError(
            f"unknown connector(s) {unknown or [spec]}; valid values (comma-separated): the line-up "
            f"{', '.join(BENCH_CONNECTORS)}, 'all', or any budget: {'; '.join(BUDGET_FORMS)}"
        )
    return [BASELINE, *(w for w in wanted if w != BASELINE)]


def parse_device(spec: str) -> torch.device:
    """A usable ``torch.device`` from ``spec`` or a ``ValueError`` that says what is valid here."""
    valid = ["cpu"]
    if torch.cuda.is_available():
        valid += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {spec!r}; valid values on this machine: {', '.join(valid)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} asks for CUDA, but torch.cuda.is_available() is False here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}, no GPU visible); "
                f"valid values on this machine: {', '.join(valid)}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s); valid values: "
                f"{', '.join(valid)}"
            )
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device.type != "cpu":
        raise ValueError(
            f"device type {device.type!r} is not supported; valid values on this machine: {', '.join(valid)}"
        )
    return device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human name: the GPU's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Short file-name-safe kind: ``cpu`` or e.g. ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "git_commit": commit,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def progress(message: str) -> None:
    """One line of progress on stderr (stdout carries the report)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def seeded(seed: int = 0) -> torch.Generator:
    """Seed torch's global generator (module init) and return a CPU generator for inputs."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, float | None]:
    """Peak CUDA memory of one call: absolute, and the increase over what was allocated before it."""
    if device.type != "cuda":
        fn()
        return {"peak_mem_mib": None, "peak_extra_mib": None}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_mib": peak / 2**20, "peak_extra_mib": (peak - before) / 2**20}


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    rounds: int,
    min_block_s: float,
    label: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Median latency of each ``fn()``, timed in interleaved rounds, and peak memory on CUDA.

    Each function is called once to warm up and calibrate a block of ``number`` calls lasting at least
    ``min_block_s``. On CUDA every function is first run once (so one-time allocations such as cuBLAS
    workspaces are not charged to whichever runs first) and then once more to measure its peak memory: the
    allocator's peak and its increase over what was allocated before the call. Then, ``rounds`` times, every function runs one
    block (:meth:`torch.utils.benchmark.Timer.timeit`, which synchronises CUDA). Interleaving makes the
    ratios between functions robust to load that comes and goes on a shared machine. Returns per name
    ``median_ms`` (per call, over rounds), ``iqr_ms``, ``calls`` (timed) and ``peak_mem_mib`` /
    ``peak_extra_mib`` (``None`` on CPU, where the allocator keeps no statistics). With ``label``, prints
    an estimate of the whole measurement after calibration and one progress line per round (stderr).
    """
    threads = torch.get_num_threads()
    timers, numbers, block_s = {}, {}, {}
    out: dict[str, dict[str, Any]] = {}
    if device.type == "cuda":
        for fn in fns.values():
            fn()
    for name, fn in fns.items():
        no_stats = {"peak_mem_mib": None, "peak_extra_mib": None}
        out[name] = _peak_memory(fn, device) if device.type == "cuda" else no_stats
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=name, num_threads=threads)
        first = timers[name].timeit(1).median
        numbers[name] = max(1, math.ceil(min_block_s / max(first, 1e-9)))
        block_s[name] = numbers[name] * first
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    if label:
        per_round = sum(block_s.values())
        progress(f"{label}: {len(fns)} functions x {rounds} interleaved rounds, about {rounds * per_round:.0f} s")
    for r in range(rounds):
        for name in fns:
            times[name].append(timers[name].timeit(numbers[name]).median)
        if label:
            elapsed = time.perf_counter() - start
            progress(
                f"{label}: round {r + 1}/{rounds} done, {elapsed:.1f} s, "
                f"~{elapsed / (r + 1) * (rounds - r - 1):.0f} s left"
            )
    for name, samples in times.items():
        q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
        out[name].update(median_ms=median * 1e3, iqr_ms=(q3 - q1) * 1e3, calls=rounds * numbers[name])
    return out


def format_flops(value: float | None) -> str:
    """``12.3 G`` style (FLOPs); ``-`` for None."""
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f}"


def format_ms(median_ms: float, iqr_ms: float | None, digits: int = 2) -> str:
    """``12.34 ± 0.56``: a median in milliseconds with its interquartile range (``-`` when unknown)."""
    iqr = "-" if iqr_ms is None else f"{iqr_ms:.{digits}f}"
    return f"{median_ms:.{digits}f} ± {iqr}"


def spread_warnings(result: Any, *, ratio: float = SPREAD_WARN_RATIO) -> list[str]:
    """Timings in ``result`` (any nesting of dicts and lists) whose IQR exceeds ``ratio`` of the median.

    A timing is a dict with ``median_ms`` and ``iqr_ms``; it is named by its ``connector`` / ``name`` field,
    else by the nearest enclosing labelled dict (a connector, or a search case ``input`` + ``anchors``)
    and its key. Returns one sentence per flagged timing.
    """
    found: list[str] = []

    def label(node: dict[str, Any]) -> str | None:
        if "input" in node and "anchors" in node:
            return f"{node['input']} K={node['anchors']}"
        return node.get("connector") or node.get("name")

    def walk(node: Any, key: str, context: str) -> None:
        if isinstance(node, dict):
            own = label(node)
            median, iqr = node.get("median_ms"), node.get("iqr_ms")
            if (
                isinstance(median, (int, float))
                and isinstance(iqr, (int, float))
                and median > 0
                and iqr > ratio * median
            ):
                name = own or " ".join(part for part in (context, key) if part)
                found.append(f"`{name}`: IQR {iqr:.3g} ms is {100 * iqr / median:.0f} % of the median {median:.3g} ms")
            for child_key, value in node.items():
                walk(value, str(child_key), own or context)
        elif isinstance(node, list):
            for value in node:
                walk(value, key, context)

    walk(result, "", "")
    return found


def format_count(value: int) -> str:
    """``84.2 M`` style (parameters)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return str(value)


def connector_benchmark_main(
    argv: list[str] | None,
    *,
    description: str,
    presets: Any,
    run: Callable[..., dict[str, Any]],
    to_markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Command line shared by the per-connector benchmarks: table on stdout, JSON on stderr."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="default", choices=list(presets))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--connectors", default=None, help=f"comma-separated subset of: {', '.join(BENCH_CONNECTORS)}")
    args = parser.parse_args(argv)
    try:
        device = parse_device(args.device)
        resolve_connectors(args.connectors)
    except ValueError as err:
        parser.error(str(err))
    result = run(preset=args.preset, device=device, connectors=args.connectors)
    print(to_markdown(result))
    json.dump(result, sys.stderr, indent=1, default=str)
