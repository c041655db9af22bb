"""Smoke test: the probe benchmark runs its tiny preset and reports every path (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")  # the benchmark switches attention implementations

bench_probe = pytest.importorskip("benchmarks.bench_probe")


def test_tiny_preset_runs() -> None:
    report = bench_probe.run(preset="tiny", device=torch.device("cpu"))
    json.dumps(report)  # JSON-serialisable
    assert report["probe_anchors_equal_reference"] is True
    assert set(report["paths"]) == {
        "sdpa",
        "sdpa+hidden_states",
        "probe",
        "probe+hidden_states",
        "reference",
        "received",
        "eager_received",
    }
    assert set(report["siglip"]["paths"]) == {"sdpa", "received", "eager_received"}
    for entry in [*report["paths"].values(), *report["siglip"]["paths"].values()]:
        assert entry["median_ms"] > 0 and entry["peak_extra_mib"] > 0
    assert report["paths"]["sdpa"]["time_ratio"] == 1.0
    assert report["probe_parts_ms"]["received"] > 0 and report["received_part_peak_mib"] > 0
    assert 0 <= report["received_anchor_overlap_with_eager"] <= 1
    rows = report["families"]["rows"]
    assert {"clip", "internvit", "siglip2", "dinov3", "aimv2", "blip2", "idefics"} <= set(rows)
    assert all(r["probe_ms"] > 0 and r["peak_ratio"] > 0 for r in rows.values())
    assert rows["siglip2"]["score"] == "received" and rows["internvit"]["score"] == "cls"
    markdown = bench_probe.to_markdown(report)
    assert "SigLIP (no [CLS])" in markdown and "| internvit | cls |" in markdown
    with pytest.raises(ValueError, match="preset must be one of"):
        bench_probe.run(preset="huge", device=torch.device("cpu"))
