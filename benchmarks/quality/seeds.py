"""The quality table over training seeds: several runs of the quality section, one per training seed.

    python -m benchmarks.quality.train --seed 1 --output /tmp/quality-seed1          # weights of seed 1
    python -m benchmarks.quality.bench --weights /tmp/quality-seed1 --output /tmp/quality-bench-seed1
    python -m benchmarks.quality.seeds benchmarks/results/quality-cpu /tmp/quality-bench-seed1 \\
        /tmp/quality-bench-seed2 --seeds 0 1 2 --output benchmarks/results/quality-seeds-cpu

Each input is a result folder (or its ``results.json``) of ``benchmarks.quality.bench`` or of
``benchmarks.run --section quality``. A run gives, per method and budget, the mean accuracy over its
evaluation seeds; this module gives, per method and budget, the mean ± standard deviation of those means
over the training seeds, and keeps every run's numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.quality.bench import METHODS
from benchmarks.quality.model import NUM_PATCHES

__all__ = ["aggregate", "load_run", "main", "to_markdown"]

#: the settings every run must share
_SHARED = ("eval_seeds", "questions_per_seed", "budgets")


def load_run(path: Path) -> dict[str, Any]:
    """The quality result in ``path`` (a folder holding ``results.json``, or the file itself)."""
    path = path / "results.json" if path.is_dir() else path
    data = json.loads(path.read_text())
    if "rows" in data:
        return data
    quality = data.get("benchmarks", {}).get("quality")
    if quality is None or "rows" not in quality:
        raise ValueError(f"path must hold a quality result (rows, or benchmarks.quality.rows), got {str(path)!r}")
    return quality


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _check(runs: list[dict[str, Any]], seeds: list[int]) -> None:
    if len(runs) < 1 or len(seeds) != len(runs):
        raise ValueError(f"seeds must name one training seed per run ({len(runs)} runs), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    for key in _SHARED:
        values = [run[key] for run in runs]
        if any(v != values[0] for v in values):
            raise ValueError(f"runs must share {key}, got {values!r}")
    keys = [sorted((r["method"], r["budget"]) for r in run["rows"]) for run in runs]
    if any(k != keys[0] for k in keys):
        raise ValueError("runs must have the same (method, budget) rows, got differing rows")


def _row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One method and budget over the training seeds (``rows``: that row of every run, in seed order)."""
    accuracy, accuracy_std = _mean_std([r["accuracy"] for r in rows])
    retention, retention_std = _mean_std([r["retention"] for r in rows])
    return {
        "method": rows[0]["method"],
        "group": rows[0]["group"],
        "budget": rows[0]["budget"],
        "accuracy": accuracy,
        "accuracy_std": accuracy_std,
        "retention": retention,
        "retention_std": retention_std,
        "accuracy_per_training_seed": [r["accuracy"] for r in rows],
        "retention_per_training_seed": [r["retention"] for r in rows],
        "accuracy_per_eval_seed": [r["accuracy_per_seed"] for r in rows],
        "by_type_per_training_seed": [r["by_type"] for r in rows],
    }


def aggregate(runs: list[dict[str, Any]], *, seeds: list[int], sources: list[str] | None = None) -> dict[str, Any]:
    """Mean ± standard deviation (``statistics.stdev``) over training seeds of each run's mean accuracy.

    ``runs[i]``: the quality result (``rows`` as ``benchmarks.quality.bench.run`` returns them) of the
    weights trained with seed ``seeds[i]``; every run must have the same evaluation seeds, questions,
    budgets and rows. Rows keep the runs' order (the first run's).
    """
    _check(runs, seeds)
    index = [{(r["method"], r["budget"]): r for r in run["rows"]} for run in runs]
    rows = [_row([ix[(r["method"], r["budget"])] for ix in index]) for r in runs[0]["rows"]]
    out: dict[str, Any] = {"training_seeds": list(seeds)}
    if sources is not None:
        out["sources"] = list(sources)
    return {**out, **{key: runs[0][key] for key in _SHARED}, "methods": runs[0].get("methods", {}), "rows": rows}


def _find(result: dict[str, Any], method: str, budget: int) -> dict[str, Any]:
    return next(r for r in result["rows"] if r["method"] == method and r["budget"] == budget)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(result: dict[str, Any], cell: Any) -> list[str]:
    budgets = result["budgets"]
    head = " | ".join(f"{b} ({100 * b / NUM_PATCHES:.1f} %)" for b in budgets)
    out = [f"| method (tokens →) | {head} |", "|---|" + "---|" * len(budgets)]
    methods = [m for m in METHODS if any(r["method"] == m for r in result["rows"])]
    for method in methods:
        out.append(f"| {method} | " + " | ".join(cell(_find(result, method, b)) for b in budgets) + " |")
    return out


def to_markdown(result: dict[str, Any]) -> str:
    """Mean ± std over training seeds (retention in brackets), then every training seed's numbers."""
    seeds = result["training_seeds"]
    full, blind = _find(result, "full", NUM_PATCHES), _find(result, "no image", 0)

    def per_seed(values: list[float]) -> str:
        return " / ".join(_pct(v) for v in values)

    out = [
        (
            f"Toy LLaVA trained with seeds {seeds} (one run of the quality section per seed: "
            f"{result['questions_per_seed']} questions per evaluation seed, evaluation seeds {result['eval_seeds']}). "
            "Accuracy in %: for each training seed the mean over its evaluation seeds, then mean ± standard "
            "deviation of those means over the training seeds; retention (accuracy / that seed's full-budget "
            "accuracy, in %) in brackets, averaged the same way."
        ),
        "",
        f"Full budget ({NUM_PATCHES} tokens): **{_pct(full['accuracy'])} ± {_pct(full['accuracy_std'])}** "
        f"(per training seed {per_seed(full['accuracy_per_training_seed'])}); no image tokens: "
        f"{_pct(blind['accuracy'])} ± {_pct(blind['accuracy_std'])} "
        f"(per training seed {per_seed(blind['accuracy_per_training_seed'])}).",
        "",
        *_table(
            result,
            lambda r: f"{_pct(r['accuracy'])} ± {_pct(r['accuracy_std'])} ({_pct(r['retention'])})",
        ),
        "",
        f"Accuracy per training seed ({' / '.join(str(s) for s in seeds)}), each the mean over the evaluation seeds:",
        "",
        *_table(result, lambda r: per_seed(r["accuracy_per_training_seed"])),
        "",
        f"Retention per training seed ({' / '.join(str(s) for s in seeds)}):",
        "",
        *_table(result, lambda r: per_seed(r["retention_per_training_seed"])),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the quality table over training seeds")
    parser.add_argument("runs", type=Path, nargs="+", help="result folders (or results.json) of the quality section")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seed of each run (0, 1, ...)")
    parser.add_argument("--output", type=Path, default=None, help="folder for results.json/.md")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else list(range(len(args.runs)))
    result = aggregate([load_run(p) for p in args.runs], seeds=seeds, sources=[str(p) for p in args.runs])
    text = to_markdown(result)
    print(text)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.output / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
