"""The quality table over training seeds (``benchmarks.quality.seeds``), on small hand-made runs.

Every expected number is computed by hand in the comments: three training seeds whose `select cls`
accuracies (each already a mean over evaluation seeds) are 0.5 / 0.6 / 0.7 give 0.6 ± 0.1 (sample
standard deviation: sqrt((0.01 + 0 + 0.01) / 2) = 0.1), whatever the spread over the evaluation seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.quality.seeds import aggregate, load_run, main, to_markdown


def _row(method: str, group: str, budget: int, accuracy: float, retention: float, spread: float) -> dict[str, Any]:
    return {
        "method": method,
        "group": group,
        "budget": budget,
        "accuracy": accuracy,
        "accuracy_std": spread,
        "accuracy_per_seed": [accuracy - spread, accuracy, accuracy + spread],
        "retention": retention,
        "retention_std": 0.0,
        "by_type": {"above": accuracy},
    }


def _run(full: float, select: float, divprune: float, budgets: tuple[int, ...] = (16,)) -> dict[str, Any]:
    rows = [_row("full", "reference", 64, full, 1.0, 0.01), _row("no image", "reference", 0, 0.3, 0.3 / full, 0.02)]
    for b in budgets:
        rows.append(_row("select cls", "package", b, select, select / full, 0.05))
        rows.append(_row("divprune", "peer", b, divprune, divprune / full, 0.0))
    return {"eval_seeds": [0, 1, 2], "questions_per_seed": 10, "budgets": list(budgets), "rows": rows}


RUNS = [_run(1.0, 0.5, 0.8), _run(0.8, 0.6, 0.8), _run(0.5, 0.7, 0.5)]


def _find(result: dict[str, Any], method: str, budget: int) -> dict[str, Any]:
    return next(r for r in result["rows"] if r["method"] == method and r["budget"] == budget)


def test_mean_and_std_over_training_seeds_match_a_hand_computation() -> None:
    result = aggregate(RUNS, seeds=[0, 1, 2])
    select = _find(result, "select cls", 16)
    # accuracy 0.5 / 0.6 / 0.7 -> 0.6 ± 0.1; retention 0.5 / 0.75 / 1.4 -> 0.88333 ± sqrt(sum sq dev / 2)
    assert math.isclose(select["accuracy"], 0.6) and math.isclose(select["accuracy_std"], 0.1)
    assert math.isclose(select["retention"], (0.5 + 0.75 + 1.4) / 3)
    dev = [x - (0.5 + 0.75 + 1.4) / 3 for x in (0.5, 0.75, 1.4)]
    assert math.isclose(select["retention_std"], math.sqrt(sum(d * d for d in dev) / 2))
    assert select["accuracy_per_training_seed"] == [0.5, 0.6, 0.7]
    assert select["accuracy_per_eval_seed"][1] == pytest.approx([0.55, 0.6, 0.65])
    divprune = _find(result, "divprune", 16)
    # 0.8 / 0.8 / 0.5 -> 0.7 ± sqrt((0.01 + 0.01 + 0.04) / 2) = sqrt(0.03)
    assert math.isclose(divprune["accuracy"], 0.7) and math.isclose(divprune["accuracy_std"], math.sqrt(0.03))
    full = _find(result, "full", 64)
    # 1.0 / 0.8 / 0.5 -> 0.76667 ± sqrt(((0.23333)^2 + (0.03333)^2 + (0.26667)^2) / 2) = 0.25166
    assert math.isclose(full["accuracy"], 2.3 / 3) and math.isclose(full["accuracy_std"], 0.2516611, rel_tol=1e-6)
    assert result["training_seeds"] == [0, 1, 2] and result["budgets"] == [16]


def test_markdown_shows_mean_std_retention_and_every_seed() -> None:
    text = to_markdown(aggregate(RUNS, seeds=[0, 4, 7]))
    assert "| select cls | 60.0 ± 10.0 (88.3) |" in text
    assert "| divprune | 70.0 ± 17.3 (93.3) |" in text  # sqrt(0.03) = 0.1732; (0.8 + 1.0 + 1.0) / 3
    assert "| select cls | 50.0 / 60.0 / 70.0 |" in text
    assert "| select cls | 50.0 / 75.0 / 140.0 |" in text
    assert "**76.7 ± 25.2** (per training seed 100.0 / 80.0 / 50.0)" in text
    assert "(0 / 4 / 7)" in text


def test_rows_are_matched_by_method_and_budget_not_position() -> None:
    shuffled = {**RUNS[1], "rows": list(reversed(RUNS[1]["rows"]))}
    assert aggregate([RUNS[0], shuffled, RUNS[2]], seeds=[0, 1, 2]) == aggregate(RUNS, seeds=[0, 1, 2])


@pytest.mark.parametrize(
    ("runs", "seeds", "match"),
    [
        (RUNS, [0, 1], r"seeds must name one training seed per run \(3 runs\), got \[0, 1\]"),
        (RUNS, [0, 1, 1], r"seeds must be distinct, got \[0, 1, 1\]"),
        ([RUNS[0], _run(1.0, 0.5, 0.8, budgets=(8,))], [0, 1], r"runs must share budgets, got \[\[16\], \[8\]\]"),
        ([RUNS[0], {**RUNS[1], "eval_seeds": [5]}], [0, 1], r"runs must share eval_seeds, got \[\[0, 1, 2\], \[5\]\]"),
        ([RUNS[0], {**RUNS[1], "rows": RUNS[1]["rows"][:-1]}], [0, 1], "runs must have the same"),
    ],
)
def test_bad_input_raises_value_error(runs: list[dict[str, Any]], seeds: list[int], match: str) -> None:
    before = json.dumps(runs)
    with pytest.raises(ValueError, match=match):
        aggregate(runs, seeds=seeds)
    assert json.dumps(runs) == before


def test_cli_reads_both_result_layouts_and_writes_the_table(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps(RUNS[0]))  # benchmarks.quality.bench --output
    (tmp_path / "report.json").write_text(json.dumps({"benchmarks": {"quality": RUNS[1]}}))  # benchmarks.run
    (tmp_path / "third.json").write_text(json.dumps(RUNS[2]))
    (tmp_path / "other.json").write_text(json.dumps({"benchmarks": {"pipeline": {}}}))
    assert load_run(tmp_path / "report.json") == RUNS[1]
    with pytest.raises(ValueError, match="path must hold a quality result"):
        load_run(tmp_path / "other.json")
    paths = [tmp_path / "bench", tmp_path / "report.json", tmp_path / "third.json"]
    assert main([*map(str, paths), "--output", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["training_seeds"] == [0, 1, 2] and written["sources"] == [str(p) for p in paths]
    assert _find(written, "select cls", 16)["accuracy_per_training_seed"] == [0.5, 0.6, 0.7]
    assert "| select cls | 60.0 ± 10.0 (88.3) |" in (tmp_path / "out" / "results.md").read_text()
