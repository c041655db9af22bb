"""The anchor-former benchmark suite: what AcFormer's fewer visual tokens buy, measured on this machine.

    python -m benchmarks.run                                   # default preset: the reference CPU run
    python -m benchmarks.run --quick                           # a shorter first look
    python -m benchmarks.run --preset tiny                     # seconds (the smoke test runs this)
    python -m benchmarks.run --preset llava-1.5-7b --device cuda   # LLaVA-1.5-7B shapes, for a GPU
    python -m benchmarks.run --section quality                 # answer accuracy of the toy VLM, a few minutes

(from the repository root; ``python benchmarks/run.py`` does the same from anywhere). How long a run
takes: the summary at the end of every results.md says it, with the machine and its load; the committed
runs are ``benchmarks/results/cpu-default/results.md`` and ``benchmarks/results/cpu-quick/results.md``.

One run measures, side by side and as ratios to LLaVA-1.5's MLP-576 connector:

* ``connectors`` (``bench_connectors.py``): visual tokens, parameters, FLOPs (FlopCounterMode, checked
  against the analytic count), latency and GPU memory of the line-up (MLP-576, AvgPool-144,
  C-Abstractor-144, Perceiver-144, AcFormer-144/256, training-free select-64/144/192/128+16) or of any
  budget given with ``--connectors`` (``select-96``, ``acformer-100``, ...) at LLaVA-1.5 shapes
  (577×1024 → 4096);
* ``pipeline`` (``bench_pipeline.py``): analytic ViT + probe + connector + LLM-prefill FLOPs at
  LLaMA-7B/13B shapes, KV-cache bytes per sample, and the measured end-to-end pipeline with random-init
  HF models (scaled down on the ``tiny``/``default`` presets, real shapes on ``llava-1.5-7b``);
* ``search`` (``bench_search.py``): the batched anchor search against the reference's per-sample loop, on
  independent-head, head-correlated and (random-init) CLIP attention rows;
* ``probe`` (``bench_probe.py``): anchors from the [CLS] probe against ``output_attentions``;
* ``quality`` (``quality/bench.py``, only when named: ``--section quality``): answer accuracy of a trained
  toy LLaVA against the visual-token budget, for the package's ``select`` / AcFormer and peer rules.

Writes ``results.json`` (device, versions, preset, date, every figure), ``results.md`` (the tables printed
on stdout) and, with matplotlib, ``chart.png`` (cost against visual tokens) to ``--output``, by default a
new folder ``benchmarks/out/<device>-<preset>-<UTC time>/`` (git-ignored; ``<device>`` = ``cpu`` or
``cuda-<gpu name>``), so a run never overwrites the committed reference results under
``benchmarks/results/``. The folder is checked for writing before anything runs; both files are rewritten
and the section printed as each section finishes; every section reports progress on stderr, and the run
ends with a one-paragraph summary (each section's headline figure, the run time, the machine and its load
average). The sections are the ``SECTIONS`` table below: adding one is one line. Every time is a median with its IQR, and results.md
flags timings whose IQR exceeds 20 % of the median. Exit status 1 if a benchmark
failed (its error is in the report), 2 for bad arguments or an unwritable ``--output``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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
    BUDGET_FORMS,
    SPREAD_WARN_RATIO,
    device_slug,
    environment,
    parse_device,
    progress,
    resolve_connectors,
    spread_warnings,
)

__all__ = [
    "BENCHMARKS",
    "OPT_IN",
    "PRESETS",
    "QUICK_CONNECTORS",
    "SECTIONS",
    "Section",
    "default_output",
    "main",
    "markdown_chart",
    "markdown_header",
    "markdown_section",
    "markdown_summary",
    "render_markdown",
    "run_suite",
    "write_chart",
]

# tiny: seconds, the smoke test; quick: a first look with four connectors, fewer rounds and smaller probe
# towers (sized for about a minute on an idle 2-core CPU); default: the reference CPU run; llava-1.5-7b:
# full shapes, for a GPU.
PRESETS = ("tiny", "quick", "default", "llava-1.5-7b")
# --quick's line-up unless --connectors says otherwise: the baseline, a pooling peer, AcFormer, training-free
QUICK_CONNECTORS = "mlp-576,avgpool-144,acformer-144,select-144"


@dataclass(frozen=True)
class Section:
    """One section of the suite: a module of the ``benchmarks`` package and how the report shows it.

    The module exposes ``run(*, preset, device[, connectors]) -> dict`` and may expose ``PRESETS`` (the
    presets it knows: one it lacks runs as ``"tiny"``, and the report says so), ``to_markdown(result) -> str``
    (its tables) and ``summarize(result) -> list[str]`` (sentences for the run's closing summary).
    """

    name: str  # the --benchmarks value and the key in results.json
    module: str  # benchmarks/<module>.py
    title: str  # its heading in results.md
    takes_connectors: bool = False  # run() takes connectors= (the --connectors line-up)
    opt_in: bool = False  # runs only when named (--section NAME), not in the default "all"


# Run order. Adding a section is adding its line here.
SECTIONS: tuple[Section, ...] = (
    Section("connectors", "bench_connectors", "Connectors", takes_connectors=True),
    Section("pipeline", "bench_pipeline", "Pipeline", takes_connectors=True),
    Section("search", "bench_search", "Anchor search"),
    Section("probe", "bench_probe", "Anchor probe"),
    # vLLM serving throughput and time to first token; runs only where vLLM is importable (else reported skipped)
    Section("serving", "bench_serving", "Serving (vLLM)"),
    Section("quality", "quality.bench", "Answer quality (trained toy VLM)", opt_in=True),
)
BENCHMARKS: dict[str, Section] = {section.name: section for section in SECTIONS}
# sections that run only when named (``--section quality``), not in the default "all"
OPT_IN = tuple(section.name for section in SECTIONS if section.opt_in)


def _parse_list(spec: str | None, valid: list[str], what: str) -> list[str]:
    if spec is None or spec.strip() == "all":
        return [v for v in valid if v not in OPT_IN]
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in valid]
    if unknown or not wanted:
        raise ValueError(
            f"unknown {what} {unknown or [spec]}; valid values (comma-separated): {', '.join(valid)} or 'all'"
        )
    return [v for v in valid if v in wanted]


def run_suite(
    *,
    preset: str,
    device: torch.device,
    connectors: str | None = None,
    benchmarks: list[str] | None = None,
    on_section: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the chosen benchmarks; a missing module is reported as skipped, a failing one as an error.

    ``on_section(report)`` is called after each section with the report so far (the main command writes
    and prints it then, so an error late in the run loses nothing). ``report["seconds"]`` is the run's wall
    time so far.
    """
    report: dict[str, Any] = {
        "suite": "anchor-former",
        "preset": preset,
        "environment": environment(device),
        "connectors": resolve_connectors(connectors),
        "benchmarks": {},
        "seconds": 0.0,
    }
    if hasattr(os, "getloadavg"):  # how busy the machine was (Unix): the times depend on it
        report["load_average"] = {"start": os.getloadavg()[0], "end": None, "cpus": os.cpu_count()}
    names = benchmarks or list(BENCHMARKS)
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        progress(f"section {i}/{len(names)}: {name} ({time.perf_counter() - start:.0f} s into the run)")
        report["benchmarks"][name] = _run_one(BENCHMARKS[name], preset=preset, device=device, connectors=connectors)
        report["seconds"] = round(time.perf_counter() - start, 1)
        if "load_average" in report:
            report["load_average"]["end"] = os.getloadavg()[0]
        if on_section is not None:
            on_section(report)
    return report


def _run_one(section: Section, *, preset: str, device: torch.device, connectors: str | None) -> dict[str, Any]:
    path = section.module.replace(".", "/") + ".py"
    if not (HERE / path).exists():
        progress(f"{section.name}: skipped, benchmarks/{path} not found")
        return {"skipped": f"benchmarks/{path} not found"}
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.{section.module}")
        own = preset if preset in getattr(module, "PRESETS", (preset,)) else "tiny"
        if own != preset:
            progress(f"{section.name}: has no preset {preset!r}, runs its 'tiny' preset")
        progress(f"{section.name}: start ({section.module}.run, preset {own}, {device})")
        kwargs: dict[str, Any] = {"connectors": connectors} if section.takes_connectors else {}
        result = module.run(preset=own, device=device, **kwargs)
        if own != preset:
            result["preset_run"] = own
    except Exception as err:  # one failing benchmark must not lose the others' numbers
        progress(f"{section.name}: FAILED: {type(err).__name__}: {err}")
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    progress(f"{section.name}: done in {result['seconds']} s")
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


def markdown_header(report: dict[str, Any]) -> str:
    """The report's title, environment and how to reproduce it."""
    env = report["environment"]
    return (
        "\n".join(
            [
                f"# anchor-former benchmarks: preset `{report['preset']}` on {env['device']}",
                "",
                f"{env['date_utc']} · device type {env['device_type']} · torch {env['torch']} · transformers "
                f"{env['transformers']} · python {env['python']} · {env['threads']} threads · commit {env['git_commit']}",
                "",
                "Reproduce: `python -m benchmarks.run --preset "
                + report["preset"]
                + ("" if env["device_type"] == "cpu" else " --device cuda")
                + "".join(f" --section {name}" for name in report["benchmarks"] if name in OPT_IN)
                + "`. Every ratio (x) is to the MLP-576 "
                "(LLaVA-1.5) connector in the same run. Times are medians over interleaved rounds on this device, "
                "with their interquartile range (± IQR).",
            ]
        )
        + "\n"
    )


def markdown_section(name: str, result: dict[str, Any]) -> str:
    """One benchmark's section: its tables, a warning for noisy timings, and its run time."""
    section = BENCHMARKS.get(name)
    out = ["", f"## {section.title if section else name}", ""]
    if "skipped" in result:
        out.append(f"Skipped: {result['skipped']}.")
    elif "error" in result:
        out.append(f"**Failed:** `{result['error']}` (traceback in results.json).")
    else:
        if "preset_run" in result:
            out += [f"(This section has no such preset; it ran its `{result['preset_run']}` preset.)", ""]
        module = sys.modules.get(f"benchmarks.{section.module}") if section else None
        to_md = getattr(module, "to_markdown", None)
        out.append(to_md(result) if to_md else _generic_markdown(result))
        noisy = spread_warnings(result)
        if noisy:
            out += [
                "",
                f"**Warning: noisy timings.** {len(noisy)} timing(s) have an IQR above "
                f"{100 * SPREAD_WARN_RATIO:.0f} % of their median, so the machine was busy during this "
                "section and its ratios are unreliable; rerun on a quiet machine. "
                + "; ".join(noisy[:8])
                + ("; ..." if len(noisy) > 8 else "")
                + ".",
            ]
        out.append(f"\n({result['seconds']} s)")
    return "\n".join(out) + "\n"


def markdown_chart(chart: str, alt: str = "cost against visual tokens") -> str:
    """The chart's section (a link to the PNG beside results.md)."""
    return "\n".join(["", "## Chart", "", f"![{alt}]({chart})"]) + "\n"


def _chart_alt(report: dict[str, Any]) -> str:
    """What the chart shows: cost (pipeline section) or, in a quality-only run, accuracy."""
    sections = report["benchmarks"]
    return (
        "answer accuracy against visual tokens"
        if "quality" in sections and "pipeline" not in sections
        else "cost against visual tokens"
    )


def markdown_summary(report: dict[str, Any]) -> str:
    """The closing paragraph: what each section found, in a sentence or two, and how long the run took."""
    sentences: list[str] = []
    for name, result in report["benchmarks"].items():
        section = BENCHMARKS.get(name)
        module = sys.modules.get(f"benchmarks.{section.module}") if section else None
        summarize = getattr(module, "summarize", None)
        if "error" in result:
            sentences.append(f"The {name} section failed ({result['error']}).")
        elif summarize is not None and "skipped" not in result:
            try:
                sentences += summarize(result)
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # a summary must not lose the report
                sentences.append(f"(The {name} summary could not be written: {type(err).__name__}: {err}.)")
    env = report["environment"]
    parts = ", ".join(f"{name} {result.get('seconds', 0):.0f} s" for name, result in report["benchmarks"].items())
    load = report.get("load_average")
    busy = (
        f"; load average {load['start']:.1f} at the start and {load['end']:.1f} at the end on {load['cpus']} CPUs"
        if load
        else "; the machine's load was not recorded"
    )
    sentences.append(
        f"The run took {report['seconds']:.0f} s ({parts}) on {env['device']}, preset `{report['preset']}`, "
        f"{env['date_utc']}{busy}."
    )
    return "\n".join(["", "## Summary", "", " ".join(sentences)]) + "\n"


def render_markdown(report: dict[str, Any], *, chart: str | None = None, summary: bool = False) -> str:
    """The whole report as markdown: environment, one section per benchmark, the chart and the summary."""
    parts = [markdown_header(report)]
    parts += [markdown_section(name, result) for name, result in report["benchmarks"].items()]
    if chart:
        parts.append(markdown_chart(chart, _chart_alt(report)))
    if summary:
        parts.append(markdown_summary(report))
    return "".join(parts)


def _point_numbers(report: dict[str, Any]) -> dict[str, int]:
    """One number per connector, in line-up order: the chart labels points with it, the table spells it out."""
    return {label: i for i, label in enumerate(report["connectors"], 1)}


def _label_points(ax: Any, points: list[tuple[float, float, int]]) -> None:
    """Number every point; points that overlap on the canvas share one label (``3, 4, 5``), and labels are
    pushed apart vertically so that none covers another. ``points``: (x, y, number) in data coordinates."""
    ax.figure.canvas.draw()  # fixes the axis limits, so data -> pixel conversion is final
    to_px = ax.transData.transform
    groups: list[list[tuple[float, float, int]]] = []
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        px = to_px((point[0], point[1]))
        for group in groups:  # markers within 7 px of a group's first point are drawn on top of each other
            gx = to_px((group[0][0], group[0][1]))
            if abs(px[0] - gx[0]) < 7 and abs(px[1] - gx[1]) < 7:
                group.append(point)
                break
        else:
            groups.append([point])
    placed: list[tuple[float, float]] = []  # label anchors in pixels
    for group in sorted(groups, key=lambda g: (g[0][0], g[0][1])):
        x, y = group[0][0], sum(p[1] for p in group) / len(group)
        px, py = to_px((x, y))
        ty = py
        while any(abs(ty - oy) < 11 and abs(px - ox) < 40 for ox, oy in placed):
            ty += 11  # one text line up
        placed.append((px, ty))
        text = ", ".join(str(p[2]) for p in sorted(group, key=lambda p: p[2]))
        ax.annotate(
            text,
            (x, y),
            xytext=(8, ty - py),
            textcoords="offset pixels",
            fontsize=8,
            va="center",
            fontweight="bold",
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"} if ty != py else None,
        )


def _plot_analytic(ax: Any, analytic: dict[str, Any], numbers: dict[str, int]) -> None:
    """Analytic TFLOPs per sample against visual tokens, one curve and point set per LLM shape."""
    from anchor_former import flops

    vit = flops.ViTShape(**analytic["vit"])
    text = analytic["text_tokens"]
    points = []
    for llm_dict, marker in zip(analytic["llms"], ("o", "s"), strict=False):
        llm = flops.LLMShape(**llm_dict)
        grid = list(range(0, 641, 16))
        curve = [(flops.vit_forward_flops(vit) + flops.llm_prefill_flops(llm, t + text)) / 1e12 for t in grid]
        line = ax.plot(grid, curve, "--", lw=0.8, alpha=0.6, label=f"{llm.name}: ViT + LLM prefill")[0]
        rows = [r for r in analytic["results"] if r["llm_shape"] == llm.name]
        ax.scatter(
            [r["visual_tokens"] for r in rows],
            [r["total_flops"] / 1e12 for r in rows],
            marker=marker,
            color=line.get_color(),
            label=f"{llm.name}: + connector (+ probe)",
            zorder=3,
        )
        points += [(r["visual_tokens"], r["total_flops"] / 1e12, numbers[r["connector"]]) for r in rows]
    ax.set(
        xlabel="visual tokens given to the LLM",
        ylabel="TFLOPs per sample (analytic)",
        xlim=(0, 720),
        title=f"CLIP ViT-L/14-336 + connector + LLM prefill, {text} text tokens",
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    _label_points(ax, points)


def _plot_measured(ax: Any, measured: dict[str, Any], device_type: str, numbers: dict[str, int]) -> None:
    """Measured pipeline time (and analytic FLOPs) as a ratio to MLP-576, against visual tokens."""
    rows = measured["results"]
    ax.scatter(
        [r["visual_tokens"] for r in rows],
        [r["analytic_vs_baseline"] for r in rows],
        marker="x",
        color="gray",
        label="analytic FLOPs, same shapes",
    )
    ax.scatter(
        [r["visual_tokens"] for r in rows],
        [r["latency_vs_baseline"] for r in rows],
        zorder=3,
        label="measured time (median)",
    )
    ax.axhline(0.40, color="red", lw=0.8, ls=":", label="target for AcFormer-144 (GPU, 7B): 0.40x")
    shapes = "scaled-down models" if measured["scaled_down"] else "LLaVA-1.5-7B shapes"
    ax.set(
        xlabel="visual tokens given to the LLM",
        ylabel="pipeline cost / MLP-576 pipeline",
        title=f"measured pipeline on {device_type} ({shapes}, batch {measured['batch']})",
    )
    ax.set_ylim(0, max(1.1, *(r["latency_vs_baseline"] * 1.05 for r in rows)))
    ax.set_xlim(0, 720)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    _label_points(ax, [(r["visual_tokens"], r["latency_vs_baseline"], numbers[r["connector"]]) for r in rows])


def _chart_table(ax: Any, pipeline: dict[str, Any], numbers: dict[str, int]) -> None:
    """The numbers of the points spelt out: connector, visual tokens and each plotted value."""
    analytic = {(r["llm_shape"], r["connector"]): r for r in pipeline["analytic"]["results"]}
    llms = [llm["name"] for llm in pipeline["analytic"]["llms"]]
    measured = {r["connector"]: r for r in pipeline.get("measured", {}).get("results", [])}
    header = ["#", "connector", "tokens", *(f"{name} TFLOPs" for name in llms)] + (["measured x"] if measured else [])
    cells = []
    for label, number in numbers.items():
        row = analytic.get((llms[0], label))
        if row is None:
            continue
        cells.append(
            [
                str(number),
                label,
                str(row["visual_tokens"]),
                *(f"{analytic[(name, label)]['total_flops'] / 1e12:.2f}" for name in llms),
            ]
            + ([f"{measured[label]['latency_vs_baseline']:.2f}" if label in measured else "-"] if measured else [])
        )
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="right", colLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(header))))
    table.scale(1, 1.3)
    ax.set_title("points by number (x: ratio to mlp-576)", fontsize=9)


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """Cost against visual tokens (analytic FLOPs at 7B/13B; measured pipeline time), points numbered, with a
    table of the numbers beside. False without matplotlib or without the pipeline section."""
    pipeline = report["benchmarks"].get("pipeline", {})
    quality = report["benchmarks"].get("quality", {})
    if "analytic" not in pipeline and "rows" in quality:  # a quality-only run: accuracy against budget
        from benchmarks.quality.bench import write_chart as write_quality_chart

        return write_quality_chart(quality, path)
    if "analytic" not in pipeline:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress('chart: matplotlib not installed, no PNG (pip install "anchor-former[viz]")')
        return False
    numbers = _point_numbers(report)
    measured = pipeline.get("measured")
    widths = [1.0, 1.0, 0.85] if measured else [1.0, 0.85]
    fig, axes = plt.subplots(
        1, len(widths), figsize=(6 * sum(widths) + 1, 5.5), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    _plot_analytic(axes[0][0], pipeline["analytic"], numbers)
    if measured:
        _plot_measured(axes[0][1], measured, report["environment"]["device_type"], numbers)
    _chart_table(axes[0][-1], pipeline, numbers)
    fig.suptitle(f"anchor-former benchmarks, preset {report['preset']}, {report['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="anchor-former benchmark suite (connectors, pipeline, anchor search, probe).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"connectors: {', '.join(BENCH_CONNECTORS)}, or any budget: {'; '.join(BUDGET_FORMS)}\n"
        f"benchmarks: {', '.join(BENCHMARKS)}\n"
        "how long: the summary at the end of benchmarks/results/cpu-default/results.md (and cpu-quick/) "
        "gives the measured run time and the machine",
    )
    parser.add_argument(
        "--preset",
        default="default",
        choices=PRESETS,
        help="tiny: seconds (the smoke test); quick: a shorter first look; "
        "default: the reference CPU run, minutes; llava-1.5-7b: full shapes, for a GPU",
    )
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available, else cpu)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="directory for results.json/.md/chart.png (default: a new, git-ignored "
        "benchmarks/out/<device>-<preset>-<UTC time>/; the committed reference results are "
        "written with --output benchmarks/results/<device>-<preset>)",
    )
    parser.add_argument(
        "--connectors",
        default=None,
        help="comma-separated labels of the line-up or any budget, e.g. select-96,acformer-100 "
        "(mlp-576 is always added: it is the baseline); default: the line-up",
    )
    parser.add_argument(
        "--benchmarks",
        "--section",
        dest="benchmarks",
        default=None,
        help="comma-separated subset; default all that exist except " + ", ".join(OPT_IN) + " (run only when named)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 for the tiny preset, which is a "
        "smoke run and must stay fast on a busy machine)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="DIR",
        help="measure nothing: rewrite DIR/results.md and DIR/chart.png from DIR/results.json "
        "(after a change to the report's layout; the figures stay those of the run)",
    )
    return parser


def render(folder: Path) -> int:
    """Rewrite ``folder``'s results.md (and chart.png) from its results.json; no benchmark runs."""
    report = json.loads((folder / "results.json").read_text())
    for name in report["benchmarks"]:  # their to_markdown and summarize
        if name in BENCHMARKS and (HERE / (BENCHMARKS[name].module.replace(".", "/") + ".py")).exists():
            importlib.import_module(f"benchmarks.{BENCHMARKS[name].module}")
    # reports written before the run time was recorded: the sum of the sections' times
    report.setdefault("seconds", round(sum(r.get("seconds", 0) for r in report["benchmarks"].values()), 1))
    report.setdefault(
        "connectors", [r["connector"] for r in report["benchmarks"].get("connectors", {}).get("results", [])]
    )
    chart = "chart.png" if write_chart(report, folder / "chart.png") else None
    (folder / "results.md").write_text(render_markdown(report, chart=chart, summary=True))
    progress(f"rewrote {folder / 'results.md'}" + (f" and {folder / chart}" if chart else "") + " from results.json")
    return 0


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


def _parse(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, torch.device, list[str], int | None, Path]:
    """Validate every argument (and the output folder) up front; parser.error (exit 2) on the first bad one."""
    args = parser.parse_args(argv)
    if args.quick:
        if args.preset not in ("default", "quick"):
            parser.error(f"--quick is --preset quick; it cannot be combined with --preset {args.preset}")
        args.preset = "quick"
    try:
        device = parse_device(
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else "cpu"
            if args.device == "auto"
            else args.device
        )
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
    if "--render" in (argv if argv is not None else sys.argv[1:]):
        args = parser.parse_args(argv)
        if not (args.render / "results.json").is_file():
            parser.error(f"--render {str(args.render)!r}: no results.json there")
        return render(args.render)
    args, device, benchmarks, threads, output = _parse(parser, argv)
    if threads is not None:
        torch.set_num_threads(threads)
    progress(f"preset {args.preset} on {device}; results to {output}")
    if args.preset == "llava-1.5-7b" and device.type == "cpu":
        progress(
            "warning: llava-1.5-7b on the CPU builds a 7B LLM in fp32 (~27 GB of RAM) and takes very long; "
            "it is meant for a GPU (--device cuda)"
        )
    printed: list[str] = []

    def save(report: dict[str, Any], chart: str | None = None, summary: bool = False) -> None:
        """Rewrite both files with everything so far and print what stdout has not shown yet."""
        (output / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (output / "results.md").write_text(render_markdown(report, chart=chart, summary=summary))
        if not printed:
            printed.append(markdown_header(report))
            print(printed[-1], end="", flush=True)
        for name, result in list(report["benchmarks"].items())[len(printed) - 1 :]:
            printed.append(markdown_section(name, result))
            print(printed[-1], end="", flush=True)

    connectors = QUICK_CONNECTORS if args.preset == "quick" and args.connectors is None else args.connectors
    report = run_suite(preset=args.preset, device=device, connectors=connectors, benchmarks=benchmarks, on_section=save)
    chart = "chart.png" if write_chart(report, output / "chart.png") else None
    save(report, chart, summary=True)
    if chart:
        print(markdown_chart(chart, _chart_alt(report)), end="", flush=True)
    print(markdown_summary(report), end="", flush=True)
    progress(f"wrote {output / 'results.json'}, {output / 'results.md'}" + (f", {output / chart}" if chart else ""))
    failed = [n for n, r in report["benchmarks"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
