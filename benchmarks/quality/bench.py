"""The quality section: answer accuracy of the shipped toy LLaVA against the visual-token budget.

    python -m benchmarks.run --section quality --output benchmarks/results/quality-cpu
    python -m benchmarks.quality.bench --preset tiny        # this section alone

For every budget T of :data:`~benchmarks.quality.train.BUDGETS` (50 / 25 / 12.5 / 6.25 % of the 64
patches) and every evaluation seed: the package's ``select`` connector with the ``cls``, ``received``
and ``norm`` scores, without and with context tokens (T = K + M, M as VisionZip splits it), the
AcFormer connector trained at that budget, the peer rules of :mod:`benchmarks.quality.rules`
(VisionZip, DivPrune, random, first-K, average pooling), and the wrong variants the tests reject;
the full model (64 tokens) and the model with no image tokens bound the table. Retention is a rule's
accuracy over the full model's, per evaluation seed, then averaged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict, cast

import torch

from benchmarks.quality import rules
from benchmarks.quality.evaluate import (
    EvalSet,
    Score,
    acformer_model,
    eval_set,
    package_accuracy,
    rule_accuracy,
    select_model,
    tower_output,
)
from benchmarks.quality.model import NUM_PATCHES, WEIGHTS, load_acformer, load_llava
from benchmarks.quality.rules import visionzip_split
from benchmarks.quality.task import QUESTION_TYPES
from benchmarks.quality.train import BUDGETS

__all__ = ["METHODS", "PRESETS", "run", "to_markdown", "write_chart"]


class _Preset(TypedDict):
    seeds: tuple[int, ...]
    questions: int


PRESETS: dict[str, _Preset] = {
    "tiny": {"seeds": (0,), "questions": 64},
    "default": {"seeds": (0, 1, 2), "questions": 500},
    "llava-1.5-7b": {"seeds": (0, 1, 2), "questions": 500},
}

# label -> (group, description); the order is the table's
METHODS = {
    "select cls": ("package", "select, score cls (per-head [CLS] anchor search)"),
    "select cls + ctx": ("package", "select, score cls, K + M context tokens"),
    "select received": ("package", "select, score received (attention received, all queries)"),
    "select received + ctx": ("package", "select, score received, K + M context tokens"),
    "select norm": ("package", "select, score norm (token norms)"),
    "select norm + ctx": ("package", "select, score norm, K + M context tokens"),
    "acformer": ("package", "AcFormer connector trained at that budget ([CLS] + T - 1 anchors)"),
    "visionzip": ("peer", "VisionZip: head-summed [CLS] top-K + M merged contextual tokens"),
    "divprune": ("peer", "DivPrune: max-min cosine diversity of the projected tokens"),
    "random": ("peer", "random K (seeded), raster order"),
    "first": ("peer", "first K in raster order"),
    "avgpool": ("peer", "average pooling of the patch grid to T cells"),
    "wrong: reversed": ("wrong", "select cls anchors in reverse order"),
    "wrong: shuffled": ("wrong", "select cls anchors in random order"),
    "wrong: lowest": ("wrong", "the K lowest-scored patches"),
}
_RULES = {
    "visionzip": rules.visionzip,
    "divprune": rules.divprune,
    "random": rules.random_k,
    "first": rules.first_k,
    "avgpool": rules.avg_pool,
    "wrong: reversed": rules.select_reversed,
    "wrong: shuffled": rules.select_shuffled,
    "wrong: lowest": rules.select_lowest,
}


def _progress(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


def _package_scorer(
    model: torch.nn.Module, acformer: dict[int, dict], method: str, budget: int
) -> Callable[[EvalSet], Score]:
    """The method's model for ``budget`` (built once) and how to score an evaluation set with it."""
    if method == "acformer":
        reduced = acformer_model(model, acformer[budget], budget)
    else:
        score = method.split()[1]
        anchors, context = visionzip_split(budget) if method.endswith("+ ctx") else (budget, 0)
        reduced = select_model(model, num_anchors=anchors, num_context=context, score=score)
    return lambda data: package_accuracy(reduced, data, budget)


def _summary(scores: list[Score], full: list[Score]) -> dict[str, Any]:
    acc = [s.accuracy for s in scores]
    retention = [s.accuracy / f.accuracy for s, f in zip(scores, full)]
    return {
        "accuracy": statistics.fmean(acc),
        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "accuracy_per_seed": acc,
        "retention": statistics.fmean(retention),
        "retention_std": statistics.stdev(retention) if len(retention) > 1 else 0.0,
        "by_type": {
            k: statistics.fmean(s.by_type[k] for s in scores)
            for k in QUESTION_TYPES
            if all(k in s.by_type for s in scores)
        },
    }


def run(
    *,
    preset: str = "default",
    device: torch.device | None = None,
    weights: Path = WEIGHTS,
    budgets: tuple[int, ...] = BUDGETS,
) -> dict[str, Any]:
    """The quality table as a dict (``rows``: one per method and budget, plus ``full`` and ``no image``).

    ``budgets``: a subset of :data:`~benchmarks.quality.train.BUDGETS` (the budgets AcFormer was trained at).
    """
    if not set(budgets) <= set(BUDGETS) or not budgets:
        raise ValueError(f"budgets must be a non-empty subset of {BUDGETS}, got {budgets!r}")
    if device is not None and torch.device(device).type != "cpu":
        _progress(f"the toy model is evaluated on the CPU (asked for {device})")
    settings = PRESETS[preset]
    model = load_llava(weights)
    acformer = load_acformer(weights)
    sets = [eval_set(seed, settings["questions"]) for seed in settings["seeds"]]
    start = time.perf_counter()
    outputs = [tower_output(model, d.batch.pixel_values) for d in sets]
    full = [package_accuracy(model, d) for d in sets]
    blind = [rule_accuracy(model, d, None, 0) for d in sets]
    rows = [
        {"method": "full", "group": "reference", "budget": NUM_PATCHES, **_summary(full, full)},
        {"method": "no image", "group": "reference", "budget": 0, **_summary(blind, full)},
    ]
    for budget in budgets:
        for method, (group, _) in METHODS.items():
            if group == "package":
                scorer = _package_scorer(model, acformer, method, budget)
                scores = [scorer(d) for d in sets]
            else:
                scores = [rule_accuracy(model, d, _RULES[method], budget, out) for d, out in zip(sets, outputs)]
            rows.append({"method": method, "group": group, "budget": budget, **_summary(scores, full)})
        _progress(f"budget {budget} done ({time.perf_counter() - start:.0f} s)")
    return {
        "model": {
            "weights": str(weights.relative_to(Path.cwd()) if weights.is_relative_to(Path.cwd()) else weights),
            "patches": NUM_PATCHES,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "eval_seeds": list(settings["seeds"]),
        "questions_per_seed": settings["questions"],
        "budgets": list(budgets),
        "methods": {k: v[1] for k, v in METHODS.items()},
        "rows": rows,
    }


def _row(result: dict[str, Any], method: str, budget: int) -> dict[str, Any]:
    return next(r for r in result["rows"] if r["method"] == method and r["budget"] == budget)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def to_markdown(result: dict[str, Any]) -> str:
    """The accuracy table, the per-question-type table at 25 %, and where ``select`` trails a peer."""
    budgets, seeds = result["budgets"], result["eval_seeds"]
    full, blind = _row(result, "full", NUM_PATCHES), _row(result, "no image", 0)
    head = " | ".join(f"{b} ({100 * b / NUM_PATCHES:.1f} %)" for b in budgets)
    out = [
        (
            f"Toy LLaVA ({result['model']['parameters'] / 1e6:.2f} M parameters, shipped weights), "
            f"{result['questions_per_seed']} questions per evaluation seed, seeds {seeds}; accuracy in % as mean ± "
            f"standard deviation over the seeds, (retention = accuracy / full-budget accuracy, in %). "
            f"Full budget ({NUM_PATCHES} tokens): **{_pct(full['accuracy'])} ± {_pct(full['accuracy_std'])}**; "
            f"no image tokens: {_pct(blind['accuracy'])} ± {_pct(blind['accuracy_std'])}."
        ),
        "",
        f"| method (tokens →) | {head} |",
        "|---|" + "---|" * len(budgets),
    ]
    best_peer = {
        b: max((r for r in result["rows"] if r["budget"] == b and r["group"] == "peer"), key=lambda r: r["accuracy"])
        for b in budgets
    }
    for method, (group, _) in METHODS.items():
        cells = []
        for b in budgets:
            r = _row(result, method, b)
            cell = f"{_pct(r['accuracy'])} ± {_pct(r['accuracy_std'])} ({_pct(r['retention'])})"
            cells.append(f"**{cell}**" if r is best_peer[b] else cell)
        label = {"package": f"`{method}`", "peer": method, "wrong": f"*{method}*"}[group]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += [
        "",
        (
            "Bold: the best peer rule at that budget. *wrong:* rows are deliberately broken variants of "
            "`select cls` (what the tests must reject)."
        ),
    ]
    out += ["", "Where the package's selection trails the best peer rule (difference in points, mean over seeds):", ""]
    behind = []
    for b in budgets:
        peer = best_peer[b]
        for method in (
            "select cls",
            "select cls + ctx",
            "select received",
            "select received + ctx",
            "select norm",
            "select norm + ctx",
        ):
            r = _row(result, method, b)
            if r["accuracy"] < peer["accuracy"]:
                behind.append(
                    f"- {b} tokens: `{method}` {_pct(r['accuracy'])} < {peer['method']} "
                    f"{_pct(peer['accuracy'])} ({_pct(r['accuracy'] - peer['accuracy'])})"
                )
    out += behind or ["- nowhere: every `select` variant is at or above every peer rule at every budget."]
    b25 = budgets[min(1, len(budgets) - 1)]  # 25 % in the full table
    out += [
        "",
        f"Accuracy by question type at {b25} tokens (%; chance: colour 16.7, shape 25, exists 50, above 50 between its two colours):",
        "",
        "| method | " + " | ".join(QUESTION_TYPES) + " |",
        "|---|" + "---|" * len(QUESTION_TYPES),
    ]
    for method, budget in [("full", NUM_PATCHES), ("no image", 0)] + [(m, b25) for m in METHODS]:
        r = _row(result, method, budget)
        out.append(
            f"| {method} | " + " | ".join(_pct(r["by_type"].get(k, float("nan"))) for k in QUESTION_TYPES) + " |"
        )
    return "\n".join(out)


def write_chart(result: dict[str, Any], path: Path) -> bool:
    """Accuracy against budget, one line per method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    budgets = result["budgets"]
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    styles = {"package": ("-", "o", 1.8), "peer": ("--", "s", 1.2), "wrong": (":", "x", 1.0)}
    colours = iter(cast(Any, plt.cm.tab20).colors)  # a ListedColormap; its colors are typed ArrayLike
    for method, (group, _) in METHODS.items():
        rows = [_row(result, method, b) for b in budgets]
        ls, marker, lw = styles[group]
        ax.errorbar(
            budgets,
            [100 * r["accuracy"] for r in rows],
            yerr=[100 * r["accuracy_std"] for r in rows],
            ls=ls,
            marker=marker,
            lw=lw,
            ms=4,
            capsize=2,
            label=method,
            color="gray" if group == "wrong" else next(colours),
            alpha=0.6 if group == "wrong" else 1.0,
        )
    full, blind = _row(result, "full", NUM_PATCHES), _row(result, "no image", 0)
    ax.axhline(100 * full["accuracy"], color="black", lw=0.8, label=f"full ({NUM_PATCHES} tokens)")
    ax.axhline(100 * blind["accuracy"], color="black", lw=0.8, ls="-.", label="no image tokens")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [f"{b}\n({100 * b / NUM_PATCHES:.1f} %)" for b in budgets])
    ax.set(
        xlabel="visual tokens given to the LLM (share of the 64 patches)",
        ylabel="answer accuracy (%)",
        title=f"toy LLaVA: accuracy vs visual-token budget (mean ± std over {len(result['eval_seeds'])} "
        "evaluation seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="toy VLM quality benchmark (this section alone)")
    parser.add_argument("--preset", default="default", choices=tuple(PRESETS))
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--output", type=Path, default=None, help="folder for results.json/.md/chart.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(preset=args.preset, weights=args.weights)
    text = to_markdown(result)
    print(text)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.output / "results.md").write_text(text + "\n")
        write_chart(result, args.output / "chart.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
