"""Smoke test of the benchmark suite (``python -m benchmarks.run``) and its argument errors. No timing assertions.

``benchmarks`` is a package at the repository root (pytest puts the root on the path: ``pythonpath`` in
pyproject.toml).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import run as bench_run  # noqa: E402
from benchmarks._common import BENCH_CONNECTORS, connector_spec, resolve_connectors, spread_warnings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONNECTORS = [
    "mlp-576",
    "avgpool-144",
    "cabstractor-144",
    "perceiver-144",
    "acformer-144",
    "acformer-256",
    "select-64",
    "select-144",
    "select-192",
    "select-128+16",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--preset", "tiny", "--device", "cpu", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    return proc, out


def test_tiny_preset_writes_json_markdown_and_chart(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    env = report["environment"]
    assert report["preset"] == "tiny" and env["device_type"] == "cpu"
    for key in ("device", "torch", "transformers", "date_utc", "threads"):
        assert env[key], key
    assert "[bench]" in proc.stderr  # progress goes to stderr
    markdown = (out / "results.md").read_text()
    assert proc.stdout.strip() == markdown.strip()  # the report is printed too
    assert markdown.startswith("# anchor-former benchmarks: preset `tiny`")
    assert "| connector | visual tokens |" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![cost against visual tokens](chart.png)" in markdown
    for name, result in report["benchmarks"].items():
        assert "error" not in result, (name, result.get("traceback"))


def test_every_section_reports_progress_and_the_run_ends_with_a_summary(tiny_run):
    proc, out = tiny_run
    report = json.loads((out / "results.json").read_text())
    sections = list(report["benchmarks"])
    assert sections == [s.name for s in bench_run.SECTIONS if not s.opt_in]  # opt-in sections run when named
    for i, name in enumerate(sections, 1):
        assert f"[bench] section {i}/{len(sections)}: {name} (" in proc.stderr
        if "skipped" in report["benchmarks"][name]:  # e.g. serving where vLLM is not installed
            continue
        # besides start and done, each section says what it is doing while it runs
        own = [
            line
            for line in proc.stderr.splitlines()
            if line.startswith(f"[bench] {name}: ")
            and not line.startswith((f"[bench] {name}: start", f"[bench] {name}: done"))
        ]
        assert len(own) >= 3, (name, own)
    assert "[bench] probe: CLIP sdpa" in proc.stderr and "round 2/2 done" in proc.stderr  # timing rounds
    markdown = (out / "results.md").read_text()
    summary = markdown.split("## Summary\n\n", 1)[1].strip()
    assert "\n" not in summary  # one paragraph, the last thing in the report
    assert f"The run took {report['seconds']:.0f} s (connectors " in summary
    assert report["environment"]["device"] in summary
    for start in ("Connector alone", "Whole pipeline", "Anchor search:", "Anchor probe"):
        assert start in summary, start
    assert proc.stdout.rstrip().endswith(summary)


def test_a_section_is_one_line_of_the_table():
    """Every section of the table is a module with the suite's interface (a preset it lacks runs as tiny)."""
    assert list(bench_run.BENCHMARKS)[:4] == ["connectors", "pipeline", "search", "probe"]
    for section in bench_run.SECTIONS:
        module = importlib.import_module(f"benchmarks.{section.module}")
        assert callable(module.run) and callable(getattr(module, "to_markdown", None)), section.name
        assert "tiny" in getattr(module, "PRESETS", ("tiny",)), section.name
    for name in ("connectors", "pipeline", "search", "probe"):  # these four know every preset and summarize
        module = importlib.import_module(f"benchmarks.{bench_run.BENCHMARKS[name].module}")
        assert set(bench_run.PRESETS) <= set(module.PRESETS) and callable(module.summarize), name


def test_tiny_connector_figures_are_consistent(tiny_run):
    _, out = tiny_run
    connectors = json.loads((out / "results.json").read_text())["benchmarks"]["connectors"]
    rows = {r["connector"]: r for r in connectors["results"]}
    assert list(rows) == CONNECTORS
    # FlopCounterMode on the manual attention path agrees with every connector's analytic count.
    assert all(r["flops_measured"] == r["flops_analytic"] > 0 for r in rows.values())
    assert {label: r["visual_tokens"] for label, r in rows.items()} == {
        "mlp-576": 576,
        "avgpool-144": 144,
        "cabstractor-144": 144,
        "perceiver-144": 144,
        "acformer-144": 145,
        "acformer-256": 257,
        "select-64": 64,
        "select-144": 144,
        "select-192": 192,
        "select-128+16": 144,
    }
    base = rows["mlp-576"]
    for r in rows.values():
        assert r["median_ms"] > 0 and r["peak_mem_mib"] is None  # no allocator statistics on CPU
        assert r["latency_vs_baseline"] == pytest.approx(r["median_ms"] / base["median_ms"])
        assert r["flops_vs_baseline"] == pytest.approx(r["flops_measured"] / base["flops_measured"])


def test_tiny_pipeline_figures_are_consistent(tiny_run):
    _, out = tiny_run
    pipeline = json.loads((out / "results.json").read_text())["benchmarks"]["pipeline"]
    analytic = pipeline["analytic"]["results"]
    assert {(r["llm_shape"], r["connector"]) for r in analytic} == {
        (llm, c) for llm in ("llama-7b", "llama-13b") for c in CONNECTORS
    }
    for r in analytic:
        assert r["total_flops"] == r["vit_flops"] + r["probe_flops"] + r["connector_flops"] + r["llm_flops"]
        assert (r["probe_flops"] > 0) == r["connector"].startswith(("acformer", "select"))
        if r["connector"] == "mlp-576":
            assert r["total_vs_baseline"] == 1.0
    measured = pipeline["measured"]
    assert measured["scaled_down"] is True  # CPU presets say they are not LLaVA-1.5-7B shapes
    assert [r["connector"] for r in measured["results"]] == CONNECTORS
    assert all(r["median_ms"] > 0 and r["llm_ms"] > 0 for r in measured["results"])


@pytest.mark.parametrize(
    ("argv", "messages"),
    [
        (["--preset", "huge"], ["invalid choice: 'huge'", "tiny", "default", "llava-1.5-7b"]),
        (
            ["--connectors", "mlp-576,qformer-32"],
            ["unknown connector(s) ['qformer-32']", *CONNECTORS, "acformer-K", "select-K+M", "cabstractor-T"],
        ),
        (
            ["--connectors", "select-0,acformer-600,cabstractor-150,avgpool-100,mlp-144"],
            ["unknown connector(s) ['select-0', 'acformer-600', 'cabstractor-150', 'avgpool-100', 'mlp-144']"],
        ),
        (["--quick", "--preset", "tiny"], ["--quick is --preset quick; it cannot be combined with --preset tiny"]),
        (["--benchmarks", "speed"], ["unknown benchmark(s) ['speed']", "connectors", "pipeline", "search", "probe"]),
        (["--device", "tpu"], ["unknown device 'tpu'", "valid values on this machine: cpu"]),
        (["--device", "cpu", "--threads", "0"], ["--threads must be an integer >= 1, got 0"]),
    ],
)
def test_bad_arguments_exit_with_the_valid_values(argv: list[str], messages: list[str], capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as exc:
        bench_run.main([*argv, "--output", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_gpu_is_a_clear_error(device: str, capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--preset", "tiny", "--device", device, "--output", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"device {device!r} asks for CUDA, but torch.cuda.is_available() is False" in err
    assert "valid values on this machine: cpu" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_preset_on_cuda_reports_gpu_and_memory(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--preset",
            "tiny",
            "--device",
            "cuda",
            "--output",
            str(tmp_path),
            "--benchmarks",
            "connectors,pipeline",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["environment"]["device_type"] == "cuda"
    assert report["environment"]["device"] == torch.cuda.get_device_name()
    rows = report["benchmarks"]["connectors"]["results"] + report["benchmarks"]["pipeline"]["measured"]["results"]
    assert all(r["peak_mem_mib"] > 0 for r in rows)


def test_tiny_search_rows_cover_every_input_and_show_spread(tiny_run):
    _, out = tiny_run
    search = json.loads((out / "results.json").read_text())["benchmarks"]["search"]
    assert [(r["input"], r["anchors"]) for r in search["results"]] == [("random", 16), ("correlated", 16), ("clip", 16)]
    for r in search["results"]:
        assert {"loop", "default", "masked", "sorted"} <= set(r["times"])
        assert all(t["median_ms"] > 0 and t["iqr_ms"] >= 0 for t in r["times"].values())
    markdown = (out / "results.md").read_text()
    assert "| input | B | H | N | K | same anchors as loop | loop ms |" in markdown
    assert "| correlated | 4 | 4 | 65 | 16 |" in markdown and " ± " in markdown


def test_noisy_timings_are_flagged_in_the_markdown():
    quiet = {"results": [{"connector": "a", "median_ms": 10.0, "iqr_ms": 2.0}]}
    noisy = {
        "results": [
            {"connector": "b", "median_ms": 10.0, "iqr_ms": 2.5},
            {"input": "clip", "anchors": 16, "times": {"loop": {"median_ms": 4.0, "iqr_ms": 1.0}}},
        ]
    }
    assert spread_warnings(quiet) == []  # 20 % exactly is not flagged
    assert spread_warnings(noisy) == [
        "`b`: IQR 2.5 ms is 25 % of the median 10 ms",
        "`clip K=16 loop`: IQR 1 ms is 25 % of the median 4 ms",
    ]
    section = bench_run.markdown_section("extra", {**noisy, "seconds": 1.0})
    assert "**Warning: noisy timings.** 2 timing(s) have an IQR above 20 % of their median" in section
    assert "Warning" not in bench_run.markdown_section("extra", {**quiet, "seconds": 1.0})


def test_default_output_is_a_new_ignored_folder_and_bad_output_fails_before_running(tmp_path: Path, capsys):
    out = bench_run.default_output(torch.device("cpu"), "tiny")
    assert out.parent == ROOT / "benchmarks" / "out" and out.name.startswith("cpu-tiny-")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.json")], cwd=ROOT)
    assert ignored.returncode in (0, 128)  # 0: ignored; 128: not a git checkout (an unpacked sdist)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--preset", "tiny", "--output", str(blocker / "sub")])  # a file where a folder must go
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--output {str(blocker / 'sub')!r} is not a writable directory" in err
    assert "[bench] preset" not in err  # nothing ran


def test_run_py_also_works_as_a_script(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--benchmarks", "nope", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "unknown benchmark(s) ['nope']" in proc.stderr, proc.stderr[-2000:]


def test_any_budget_is_accepted():
    assert resolve_connectors("select-96, acformer-100,mlp-576") == ["mlp-576", "select-96", "acformer-100"]
    assert resolve_connectors(None) == list(BENCH_CONNECTORS)
    expected = {
        "select-96": ("select", {"num_anchors": 96}),
        "select-80+16": ("select", {"num_anchors": 80, "num_context": 16}),
        "acformer-100": ("acformer", {"num_anchors": 100}),
        "perceiver-32": ("perceiver", {"num_queries": 32}),
        "cabstractor-64": ("cabstractor", {"grid": 8}),
        "avgpool-64": ("avgpool", {"pool": 3}),  # ceil(24 / 3) ** 2
        "avgpool-144": ("avgpool", {}),  # the line-up's own entry (pool 2 is the default)
    }
    for label, (factory, kwargs) in expected.items():
        spec = connector_spec(label)
        assert (spec.factory, spec.kwargs) == (factory, kwargs), label
    with pytest.raises(ValueError, match=r"unknown connector 'select-96x'; valid: acformer-K"):
        connector_spec("select-96x")


def test_budgets_run_through_the_connector_and_pipeline_sections(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--output",
            str(tmp_path),
            "--benchmarks",
            "connectors,pipeline",
            "--connectors",
            "select-96,acformer-100,avgpool-64,cabstractor-64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["connector"]: r for r in report["benchmarks"]["connectors"]["results"]}
    assert {label: r["visual_tokens"] for label, r in rows.items()} == {
        "mlp-576": 576,
        "select-96": 96,
        "acformer-100": 101,
        "avgpool-64": 64,
        "cabstractor-64": 64,
    }
    measured = report["benchmarks"]["pipeline"]["measured"]["results"]
    assert [r["visual_tokens"] for r in measured] == [576, 96, 101, 64, 64]


def test_chart_labels_never_cover_each_other():
    """Coincident points share one label; labels of nearby points are moved apart (a leader line joins them)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    points = [
        (144, 3.10, 2),
        (144, 3.11, 3),
        (144, 3.13, 4),
        (145, 3.14, 5),
        (192, 3.7, 9),
        (170, 3.5, 8),
        (576, 8.9, 1),
        (64, 2.0, 7),
    ]
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.set(xlim=(0, 720), ylim=(0, 10))
    bench_run._label_points(ax, points)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in ax.texts]
    labels = sorted(t.get_text() for t in texts)
    assert labels == ["1", "2, 3, 4, 5", "7", "8", "9"]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    plt.close(fig)


def test_a_section_without_the_preset_runs_its_tiny_one(monkeypatch, tmp_path: Path):
    section = bench_run.Section("extra", "bench_connectors", "Extra", takes_connectors=True)
    monkeypatch.setitem(bench_run.BENCHMARKS, "extra", section)
    from benchmarks import bench_connectors

    monkeypatch.delitem(bench_connectors.PRESETS, "quick")
    torch.set_num_threads(1)
    result = bench_run._run_one(section, preset="quick", device=torch.device("cpu"), connectors="acformer-144")
    assert result["preset_run"] == "tiny" and result["preset"] == "tiny"
    assert "it ran its `tiny` preset" in bench_run.markdown_section("extra", result)


def test_render_rewrites_the_report_from_its_json(tiny_run, tmp_path: Path):
    """--render measures nothing: the same results.json gives the same results.md."""
    _, out = tiny_run
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "results.json").write_text((out / "results.json").read_text())
    assert bench_run.main(["--render", str(folder)]) == 0
    assert (folder / "results.md").read_text() == (out / "results.md").read_text()
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--render", str(tmp_path / "nothing")])
    assert exc.value.code == 2


@pytest.mark.parametrize("preset", ["tiny", "quick", "default"])
def test_search_rows_of_each_cpu_preset(preset: str):
    """The tiny run does not build the other presets' rows: each preset's random-init CLIP gives layer -2's rows."""
    from benchmarks.bench_search import PRESETS, make_scores

    cfg = PRESETS[preset]
    rows = make_scores("clip", cfg)
    assert rows.shape == (cfg["batch"], cfg["heads"], cfg["tokens"])
