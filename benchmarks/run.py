"""The anchor-former benchmark suite: what AcFormer's fewer visual tokens buy, measured on this machine.

    python -m benchmarks.run                                   # default preset: CPU, about 2-3 minutes
    python -m benchmarks.run --preset tiny                     # seconds (the smoke test runs this)
    python -m benchmarks.run --preset llava-1.5-7b --device cuda   # LLaVA-1.5-7B shapes, for a GPU

(from the repository root; ``python benchmarks/run.py`` does the same from anywhere).

One run measures, side by side and as ratios to LLaVA-1.5's MLP-576 connector:

* ``connectors`` (``bench_connectors.py``): visual tokens, parameters, FLOPs (FlopCounterMode, checked
  against the analytic count), latency and GPU memory of MLP-576, AvgPool-144, C-Abstractor-144,
  Perceiver-144, AcFormer-144 and AcFormer-256 at LLaVA-1.5 shapes (577×1024 → 4096);
* ``pipeline`` (``bench_pipeline.py``): analytic ViT + probe + connector + LLM-prefill FLOPs at
  LLaMA-7B/13B shapes, KV-cache bytes per sample, and the measured end-to-end pipeline with random-init
  HF models (scaled down on the ``tiny``/``default`` presets, real shapes on ``llava-1.5-7b``);
* ``search`` (``bench_search.py``): the batched anchor search against the reference's per-sample loop, on
  independent-head, head-correlated and (random-init) CLIP attention rows;
* ``probe`` (``bench_probe.py``): anchors from the [CLS] probe against ``output_attentions``.

Writes ``results.json`` (device, versions, preset, date, every figure), ``results.md`` (the tables printed
on stdout) and, with matplotlib, ``chart.png`` (cost against visual tokens) to ``--output``, by default a
new folder ``benchmarks/out/<device>-<preset>-<UTC time>/`` (git-ignored; ``<device>`` = ``cpu`` or
``cuda-<gpu name>``), so a run never overwrites the committed reference results under
``benchmarks/results/``. The folder is checked for writing before anything runs; both files are rewritten
and the section printed as each section finishes. Every time is a median with its IQR, and results.md
flags timings whose IQR exceeds 20 % of the median. Progress goes to stderr. Exit status 1 if a benchmark
failed (its error is in the report), 2 for bad arguments or an unwritable ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

if __name__ == "__main__" and not __package__:
    # ``python benchmarks/run.py``: Python put benchmarks/ itself first on sys.path. Put the repository
    # root there instead, which is what ``python -m benchmarks.run`` from the root does, and run as that.
    import runpy

    sys.path[0] = str(HERE.parent)
    runpy.run_module("benchmarks.run", run_name="__main__", alter_sys=True)
    sys.exit(0)  # not reached: main() exits

import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    BENCH_CONNECTORS,
    SPREAD_WARN_RATIO,
    device_slug,
    environment,
    parse_device,
    progress,
    resolve_connectors,
    spread_warnings,
)

__all__ = ["BENCHMARKS", "PRESETS", "default_output", "main", "markdown_chart", "markdown_header", "markdown_section",
           "render_markdown", "run_suite", "write_chart"]

PRESETS = ("tiny", "default", "llava-1.5-7b")
# name -> module of the ``benchmarks`` package; each exposes ``run(*, preset, device) -> dict`` and
# optionally ``to_markdown``.
BENCHMARKS = {"connectors": "bench_connectors", "pipeline": "bench_pipeline", "search": "bench_search",
              "probe": "bench_probe"}
# vLLM serving throughput and time to first token; runs only where vLLM is importable (else reported skipped)
BENCHMARKS["serving"] = "bench_serving"
_TAKES_CONNECTORS = ("connectors", "pipeline")


def _parse_list(spec: str | None, valid: list[str], what: str) -> list[str]:
    if spec is None or spec.strip() == "all":
        return list(valid)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in valid]
    if unknown or not wanted:
        raise ValueError(
            f"unknown {what} {unknown or [spec]}; valid values (comma-separated): {', '.join(valid)} or 'all'"
        )
    return [v for v in valid if v in wanted]


def run_suite(*, preset: str, device: torch.device, connectors: str | None = None,
              benchmarks: list[str] | None = None,
              on_section: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the chosen benchmarks; a missing module is reported as skipped, a failing one as an error.

    ``on_section(report)`` is called after each section with the report so far (the main command writes
    and prints it then, so an error late in the run loses nothing).
    """
    report: dict[str, Any] = {
        "suite": "anchor-former",
        "preset": preset,
        "environment": environment(device),
        "connectors": resolve_connectors(connectors),
        "benchmarks": {},
    }
    for name in benchmarks or list(BENCHMARKS):
        report["benchmarks"][name] = _run_one(name, preset=preset, device=device, connectors=connectors)
        if on_section is not None:
            on_section(report)
    return report


def _run_one(name: str, *, preset: str, device: torch.device, connectors: str | None) -> dict[str, Any]:
    module_name = BENCHMARKS[name]
    if not (HERE / f"{module_name}.py").exists():
        progress(f"{name}: skipped, benchmarks/{module_name}.py not found")
        return {"skipped": f"benchmarks/{module_name}.py not found"}
    progress(f"{name}: start ({module_name}.run, preset {preset}, {device})")
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.{module_name}")
        kwargs = {"connectors": connectors} if name in _TAKES_CONNECTORS else {}
        result = module.run(preset=preset, device=device, **kwargs)
    except Exception as err:  # one failing benchmark must not lose the others' numbers
        progress(f"{name}: FAILED: {type(err).__name__}: {err}")
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    progress(f"{name}: done in {result['seconds']} s")
    return result


def _generic_markdown(result: dict[str, Any]) -> str:
    """Tables for list-of-dict / dict-of-dict values, a list for scalars (modules without to_markdown)."""
    lines, tables = [], []
    for key, value in result.items():
        rows = None
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows = value
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            rows = [{"name": k, **v} for k, v in value.items()]
        if rows is not None:
            cols = list(dict.fromkeys(c for r in rows for c, v in r.items() if not isinstance(v, (dict, list))))
            table = [f"{key}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            table += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
            tables.append("\n".join(table))
        elif not isinstance(value, (dict, list)) and key not in ("traceback",):
            lines.append(f"- {key}: {_cell(value)}")
    return "\n\n".join(["\n".join(lines)] + tables)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


_TITLES = {"connectors": "Connectors", "pipeline": "Pipeline", "search": "Anchor search", "probe": "Anchor probe"}


def markdown_header(report: dict[str, Any]) -> str:
    """The report's title, environment and how to reproduce it."""
    env = report["environment"]
    return "\n".join([
        f"# anchor-former benchmarks: preset `{report['preset']}` on {env['device']}",
        "",
        f"{env['date_utc']} · device type {env['device_type']} · torch {env['torch']} · transformers "
        f"{env['transformers']} · python {env['python']} · {env['threads']} threads · commit {env['git_commit']}",
        "",
        "Reproduce: `python -m benchmarks.run --preset " + report["preset"]
        + ("" if env["device_type"] == "cpu" else " --device cuda") + "`. Every ratio (x) is to the MLP-576 "
        "(LLaVA-1.5) connector in the same run. Times are medians over interleaved rounds on this device, "
        "with their interquartile range (± IQR).",
    ]) + "\n"


def markdown_section(name: str, result: dict[str, Any]) -> str:
    """One benchmark's section: its tables, a warning for noisy timings, and its run time."""
    out = ["", f"## {_TITLES.get(name, name)}", ""]
    if "skipped" in result:
        out.append(f"Skipped: {result['skipped']}.")
    elif "error" in result:
        out.append(f"**Failed:** `{result['error']}` (traceback in results.json).")
    else:
        module = sys.modules.get(f"benchmarks.{BENCHMARKS.get(name, name)}")
        to_md = getattr(module, "to_markdown", None)
        out.append(to_md(result) if to_md else _generic_markdown(result))
        noisy = spread_warnings(result)
        if noisy:
            out += ["", f"**Warning: noisy timings.** {len(noisy)} timing(s) have an IQR above "
                        f"{100 * SPREAD_WARN_RATIO:.0f} % of their median, so the machine was busy during this "
                        "section and its ratios are unreliable; rerun on a quiet machine. "
                        + "; ".join(noisy[:8]) + ("; ..." if len(noisy) > 8 else "") + "."]
        out.append(f"\n({result['seconds']} s)")
    return "\n".join(out) + "\n"


def markdown_chart(chart: str) -> str:
    """The chart's section (a link to the PNG beside results.md)."""
    return "\n".join(["", "## Chart", "", f"![cost against visual tokens]({chart})"]) + "\n"


def render_markdown(report: dict[str, Any], *, chart: str | None = None) -> str:
    """The whole report as markdown: environment, then one section per benchmark (and the chart)."""
    parts = [markdown_header(report)]
    parts += [markdown_section(name, result) for name, result in report["benchmarks"].items()]
    if chart:
        parts.append(markdown_chart(chart))
    return "".join(parts)


def _annotate_groups(ax, rows: list[dict[str, Any]], x: str, y: str, scale: float = 1.0) -> None:
    """Label points without overlaps: coincident points share one label, nearby labels are pushed apart."""
    top = ax.get_ylim()[1]
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:  # points within 10 tokens and 2% of the axis are one point on the chart
        groups.setdefault((round(r[x] / 10), round(r[y] / scale / (0.02 * top))), []).append(r)
    labels = sorted(
        ((min(r[x] for r in g), sum(r[y] for r in g) / scale / len(g), " / ".join(r["connector"] for r in g))
         for g in groups.values()),
        key=lambda item: (round(item[0] / 10), item[1]),
    )
    last: dict[int, float] = {}
    for px, py, text in labels:
        column = round(px / 10)
        ty = max(py, last.get(column, -1e9) + 0.045 * top)
        last[column] = ty
        ax.annotate(text, (px, py), xytext=(px + 14, ty), textcoords="data", fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"} if ty != py else None)


def _plot_analytic(ax, analytic: dict[str, Any]) -> None:
    """Analytic TFLOPs per sample against visual tokens, one curve and point set per LLM shape."""
    from anchor_former import flops

    vit = flops.ViTShape(**analytic["vit"])
    text = analytic["text_tokens"]
    for llm_dict, marker in zip(analytic["llms"], ("o", "s")):
        llm = flops.LLMShape(**llm_dict)
        grid = list(range(0, 641, 16))
        curve = [(flops.vit_forward_flops(vit) + flops.llm_prefill_flops(llm, t + text)) / 1e12 for t in grid]
        line = ax.plot(grid, curve, "--", lw=0.8, alpha=0.6, label=f"{llm.name}: ViT + LLM prefill")[0]
        rows = [r for r in analytic["results"] if r["llm_shape"] == llm.name]
        ax.scatter([r["visual_tokens"] for r in rows], [r["total_flops"] / 1e12 for r in rows], marker=marker,
                   color=line.get_color(), label=f"{llm.name}: + connector (+ probe)", zorder=3)
    ax.set(xlabel="visual tokens given to the LLM", ylabel="TFLOPs per sample (analytic)", xlim=(0, 720),
           title=f"CLIP ViT-L/14-336 + connector + LLM prefill, {text} text tokens")
    ax.set_ylim(bottom=0)
    for llm_dict in analytic["llms"]:
        rows = [r for r in analytic["results"] if r["llm_shape"] == llm_dict["name"]]
        _annotate_groups(ax, rows, "visual_tokens", "total_flops", 1e12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _plot_measured(ax, measured: dict[str, Any], device_type: str) -> None:
    """Measured pipeline time (and analytic FLOPs) as a ratio to MLP-576, against visual tokens."""
    rows = measured["results"]
    ax.scatter([r["visual_tokens"] for r in rows], [r["analytic_vs_baseline"] for r in rows], marker="x",
               color="gray", label="analytic FLOPs, same shapes")
    ax.scatter([r["visual_tokens"] for r in rows], [r["latency_vs_baseline"] for r in rows], zorder=3,
               label="measured time (median)")
    ax.axhline(0.40, color="red", lw=0.8, ls=":", label="target for AcFormer-144 (GPU, 7B): 0.40x")
    shapes = "scaled-down models" if measured["scaled_down"] else "LLaVA-1.5-7B shapes"
    ax.set(xlabel="visual tokens given to the LLM", ylabel="pipeline cost / MLP-576 pipeline",
           title=f"measured pipeline on {device_type} ({shapes}, batch {measured['batch']})")
    ax.set_ylim(0, max(1.1, *(r["latency_vs_baseline"] * 1.05 for r in rows)))
    ax.set_xlim(0, 720)
    _annotate_groups(ax, rows, "visual_tokens", "latency_vs_baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """Cost against visual tokens (analytic FLOPs at 7B/13B; measured pipeline time). False without matplotlib."""
    pipeline = report["benchmarks"].get("pipeline", {})
    if "analytic" not in pipeline:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress('chart: matplotlib not installed, no PNG (pip install "anchor-former[viz]")')
        return False
    measured = pipeline.get("measured")
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(13 if measured else 6.5, 5), squeeze=False)
    _plot_analytic(axes[0][0], pipeline["analytic"])
    if measured:
        _plot_measured(axes[0][1], measured, report["environment"]["device_type"])
    fig.suptitle(f"anchor-former benchmarks, preset {report['preset']}, {report['environment']['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="anchor-former benchmark suite (connectors, pipeline, anchor search, probe).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"connectors: {', '.join(BENCH_CONNECTORS)}\nbenchmarks: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--preset", default="default", choices=PRESETS,
                        help="tiny: seconds; default: CPU, a few minutes; llava-1.5-7b: full shapes, for a GPU")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available, else cpu)")
    parser.add_argument("--output", type=Path, default=None,
                        help="directory for results.json/.md/chart.png (default: a new, git-ignored "
                             "benchmarks/out/<device>-<preset>-<UTC time>/; the committed reference results are "
                             "written with --output benchmarks/results/<device>-<preset>)")
    parser.add_argument("--connectors", default=None,
                        help="comma-separated subset (mlp-576 is always added: it is the baseline); default all")
    parser.add_argument("--benchmarks", default=None, help="comma-separated subset; default all that exist")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 for the tiny preset, which is a "
                             "smoke run and must stay fast on a busy machine)")
    return parser


def default_output(device: torch.device, preset: str) -> Path:
    """``benchmarks/out/<device>-<preset>-<UTC time>/``: new for every run, git-ignored."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return HERE / "out" / f"{device_slug(device)}-{preset}-{stamp}"


def _prepare_output(output: Path) -> None:
    """Create ``output`` and prove it writable, before any benchmark runs; ValueError saying why not."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--output {str(output)!r} is not a writable directory: {err.strerror or err}") from None


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device,
                                                                             list[str], int | None, Path]:
    """Validate every argument (and the output folder) up front; parser.error (exit 2) on the first bad one."""
    args = parser.parse_args(argv)
    try:
        device = parse_device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
        resolve_connectors(args.connectors)
        benchmarks = _parse_list(args.benchmarks, list(BENCHMARKS), "benchmark(s)")
        threads = args.threads if args.threads is not None else (1 if args.preset == "tiny" else None)
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be an integer >= 1, got {threads}")
        output = args.output or default_output(device, args.preset)
        _prepare_output(output)
    except ValueError as err:
        parser.error(str(err))
    return args, device, benchmarks, threads, output


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, device, benchmarks, threads, output = _parse(parser, argv)
    if threads is not None:
        torch.set_num_threads(threads)
    progress(f"preset {args.preset} on {device}; results to {output}")
    if args.preset == "llava-1.5-7b" and device.type == "cpu":
        progress("warning: llava-1.5-7b on the CPU builds a 7B LLM in fp32 (~27 GB of RAM) and takes very long; "
                 "it is meant for a GPU (--device cuda)")
    printed: list[str] = []

    def save(report: dict[str, Any], chart: str | None = None) -> None:
        """Rewrite both files with everything so far and print what stdout has not shown yet."""
        (output / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (output / "results.md").write_text(render_markdown(report, chart=chart))
        if not printed:
            printed.append(markdown_header(report))
            print(printed[-1], end="", flush=True)
        for name, result in list(report["benchmarks"].items())[len(printed) - 1:]:
            printed.append(markdown_section(name, result))
            print(printed[-1], end="", flush=True)

    report = run_suite(preset=args.preset, device=device, connectors=args.connectors, benchmarks=benchmarks,
                       on_section=save)
    chart = "chart.png" if write_chart(report, output / "chart.png") else None
    save(report, chart)
    if chart:
        print(markdown_chart(chart), end="", flush=True)
    progress(f"wrote {output / 'results.json'}, {output / 'results.md'}" + (f", {output / chart}" if chart else ""))
    failed = [n for n, r in report["benchmarks"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
