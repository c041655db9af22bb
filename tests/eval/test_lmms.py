"""lmms-eval end to end, offline: the package's lmms-eval models on tiny checkpoints and a local task.

Runs in the environment ``scripts/test_lmms.sh`` builds (``.venv-lmms``); elsewhere the module is skipped.
Every run goes through lmms-eval's own code (model registry, model classes, task loading from a YAML with
``dataset_path: json``, generation, exact-match scoring, the command line); the only things added are
forward hooks that record what the LLM receives.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval runs in .venv-lmms (scripts/test_lmms.sh), not the main environment")
# no hub: everything is built here (read when huggingface_hub / datasets are first imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import _tiny  # noqa: E402
import torch  # noqa: E402
from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model, list_available_models  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from loguru import logger  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "evaluation.md"
TASK = "anchor_tiny_vqa"


@dataclass(frozen=True)
class Family:
    save: str  # _tiny function building the checkpoint
    stock: str  # lmms-eval's model
    anchor: str  # the package's model
    full: str  # anchor settings keeping every token
    reduced: str  # anchor settings keeping fewer
    host: str = "device_map=cpu"  # lmms-eval's arguments for this machine (the documented: device_map=cuda:0)
    doc: str | None = None  # marker of its command block in docs/evaluation.md
    doc_k: str = ""  # $K for the doc's reduced command


FAMILIES = {
    "llava": Family(
        "save_llava",
        "llava_hf",
        "anchor_llava_hf",
        "num_anchors=49,num_context=0,score=cls",
        "num_anchors=8,num_context=0,score=cls",
        doc="llava",
        doc_k="8",
    ),
    "llava_next": Family("save_llava_next", "llava_hf", "anchor_llava_hf", "num_anchors=49", "num_anchors=8"),
    "llava_onevision": Family("save_onevision", "llava_hf", "anchor_llava_hf", "num_anchors=49", "num_anchors=8"),
    # images of at most 112 x 112 pixels instead of lmms-eval's default 256-1024 tokens' worth (CPU time)
    "qwen2_5_vl": Family(
        "save_qwen",
        "qwen2_5_vl",
        "anchor_qwen2_5_vl",
        "num_anchors=1.0",
        "num_anchors=0.25",
        host="device_map=cpu,min_pixels=3136,max_pixels=12544",
        doc="qwen2_5_vl",
        doc_k="0.25",
    ),
}


@dataclass
class Seen:
    """What the LLM received during one lmms-eval run, per generate call (prefill only)."""

    image_tokens: list[int] = field(default_factory=list)
    embeds: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class Run:
    responses: list[str]
    score: float
    seen: Seen | None = None
    record: dict | None = None  # the model's config.anchor_former


def _image_token_id(config) -> int:
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def _record(model, seen: Seen) -> list:
    token = _image_token_id(model.config)

    def outer(_module, _args, kwargs):
        ids = kwargs.get("input_ids")  # the prefill (generate may pass features instead of pixels)
        if ids is not None and ids.shape[1] > 1:
            seen.image_tokens.append(int((ids == token).sum()))

    def inner(_module, _args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            seen.embeds.append(embeds.detach().float().clone())
            positions = kwargs.get("position_ids")
            seen.positions.append(None if positions is None else positions.detach().clone())

    return [
        model.register_forward_pre_hook(outer, with_kwargs=True),
        model.model.language_model.register_forward_pre_hook(inner, with_kwargs=True),
    ]


def _samples(samples: list[dict]) -> tuple[list[str], float]:
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    responses = [
        s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0] for s in ordered
    ]
    return responses, sum(float(s["exact_match"]) for s in ordered) / len(ordered)


class Workspace:
    """Checkpoints, the task folder and the runs of this module, each built once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.task = _tiny.write_task(root / "task", TASK)
        self._checkpoints: dict[str, Path] = {}
        self._runs: dict[tuple[str, str], Run] = {}
        self._tasks: TaskManager | None = None

    @property
    def tasks(self) -> TaskManager:
        """lmms-eval's task index with the local task (indexing its ~200 task folders takes seconds: once)."""
        if self._tasks is None:
            self._tasks = TaskManager("WARNING", include_path=str(self.task))
        return self._tasks

    def checkpoint(self, family: str) -> Path:
        if family not in self._checkpoints:
            if family in ("qwen2_5_vl", "llava_onevision"):
                pytest.importorskip("torchvision", reason=f"transformers' {family} video processor needs torchvision")
            self._checkpoints[family] = getattr(_tiny, FAMILIES[family].save)(self.root / family)
        return self._checkpoints[family]

    def model_args(self, family: str, settings: str, pretrained: Path | None = None) -> str:
        spec = FAMILIES[family]
        parts = [f"pretrained={pretrained or self.checkpoint(family)}", spec.host, settings]
        return ",".join(p for p in parts if p)

    def evaluate(self, name: str, model_args: str) -> Run:
        """``name`` built as lmms-eval builds it from ``--model`` / ``--model_args``, evaluated on the task."""
        lm = get_model(name).create_from_arg_string(model_args, {"batch_size": 1, "device": "cpu"})
        record = getattr(lm.model.config, "anchor_former", None)  # lmms-eval frees the model after the run
        seen = Seen()
        handles = _record(lm.model, seen)
        errors: list[str] = []  # lmms-eval logs a failed generate and answers "" for it
        sink = logger.add(lambda message: errors.append(str(message)), level="ERROR")
        try:
            results = simple_evaluate(
                model=lm,
                tasks=[TASK],
                batch_size=1,
                device="cpu",
                log_samples=True,
                task_manager=self.tasks,
                verbosity="WARNING",
                process_docs_parallel=1,
            )
        finally:
            logger.remove(sink)
            for handle in handles:
                handle.remove()
        assert not errors, errors
        responses, score = _samples(results["samples"][TASK])
        assert results["results"][TASK]["exact_match,none"] == pytest.approx(score)
        return Run(responses, score, seen, record)

    def run(self, family: str, kind: str) -> Run:
        key = (family, kind)
        if key not in self._runs:
            spec = FAMILIES[family]
            if kind == "stock":
                self._runs[key] = self.evaluate(spec.stock, self.model_args(family, ""))
            else:
                settings = {"full": spec.full, "reduced": spec.reduced}[kind]
                self._runs[key] = self.evaluate(spec.anchor, self.model_args(family, settings))
        return self._runs[key]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("lmms"))


def test_the_entry_point_registers_the_models() -> None:
    from anchor_former.eval import _lmms as lmms

    assert {"anchor_llava_hf", "anchor_qwen2_5_vl"} <= set(list_available_models())
    assert get_model("anchor_llava_hf") is lmms.AnchorLlavaHfChat
    assert get_model("anchor_llava_hf", force_simple=True) is lmms.AnchorLlavaHf
    assert get_model("anchor_qwen2_5_vl") is lmms.AnchorQwen2_5_VLChat
    assert get_model("anchor_qwen2_5_vl", force_simple=True) is lmms.AnchorQwen2_5_VL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_budget_is_the_stock_model(work: Workspace, family: str) -> None:
    stock, full = work.run(family, "stock"), work.run(family, "full")
    assert len(stock.seen.embeds) == len(_tiny.QUESTIONS) == len(full.seen.embeds)
    for ours, theirs in zip(full.seen.embeds, stock.seen.embeds):
        assert torch.equal(ours, theirs)  # the same sequence, bit for bit
    for ours, theirs in zip(full.seen.positions, stock.seen.positions):
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)
    assert full.seen.image_tokens == stock.seen.image_tokens and len(stock.seen.image_tokens) == len(_tiny.QUESTIONS)
    assert full.responses == stock.responses
    assert full.score == stock.score
    assert full.record["connector"] == "select"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reduced_budget_feeds_k_tokens_per_image(work: Workspace, family: str) -> None:
    stock, reduced = work.run(family, "stock"), work.run(family, "reduced")
    assert len(reduced.seen.image_tokens) == len(_tiny.QUESTIONS) == len(stock.seen.image_tokens)
    for ours, theirs in zip(reduced.seen.image_tokens, stock.seen.image_tokens):
        if family == "llava":  # one image per question, K = 8 of its 49 patches
            assert ours == 8
        elif family == "qwen2_5_vl":  # a quarter of each image's merged tokens
            assert ours == math.ceil(0.25 * theirs) < theirs
        else:  # K per view plus the row ends of the high-resolution grid
            assert ours < theirs
    assert reduced.score == pytest.approx(sum(a == b for a, b in zip(reduced.responses, _tiny.ANSWERS)) / 4)


def _reloads_its_language_model(family: str) -> bool:
    """The LLaVA-family adapter registers transformers' legacy key renamings for its saved type (without them
    a saved LLaVA-NeXT / OneVision folder reloads with a random language model: the adapter's concern)."""
    from transformers import conversion_mapping

    if family == "qwen2_5_vl":
        return True
    importlib.import_module(f"anchor_former.adapters.hf.{family}")  # registers at import, if it does
    return conversion_mapping.get_checkpoint_conversion_mapping(f"anchor_former_{family}") is not None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_folder_saved_attached_is_evaluated_as_saved(work: Workspace, family: str) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from anchor_former.adapters.transformers import attach_anchor_former

    if not _reloads_its_language_model(family):
        pytest.skip(f"this version's {family} adapter registers no key renamings for its saved type")

    source = work.checkpoint(family)
    model, processor = AutoModelForImageTextToText.from_pretrained(source), AutoProcessor.from_pretrained(source)
    settings = dict(item.split("=") for item in FAMILIES[family].reduced.split(","))
    settings = {k: (v if k == "score" else (float(v) if "." in v else int(v))) for k, v in settings.items()}
    attach_anchor_former(model, processor, connector="select", **settings)
    saved = work.root / f"{family}_attached"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)

    run = work.evaluate(FAMILIES[family].anchor, work.model_args(family, "", pretrained=saved))
    reduced = work.run(family, "reduced")
    assert run.record == reduced.record
    assert run.seen.image_tokens == reduced.seen.image_tokens
    for ours, theirs in zip(run.seen.embeds, reduced.seen.embeds):
        assert torch.equal(ours, theirs)
    assert run.responses == reduced.responses


# --- the documentation's commands ---------------------------------------------------------------------------


def doc_commands(marker: str) -> list[list[str]]:
    """The ``python -m lmms_eval`` commands of the bash block under ``<!-- lmms-eval test: marker -->``, as argv."""
    text = DOC.read_text()
    found = re.search(rf"<!-- lmms-eval test: {re.escape(marker)} -->\s*```bash\n(.*?)```", text, re.S)
    assert found, f"docs/evaluation.md has no command block marked {marker!r}"
    lines = found.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#")[0])[3:] for line in lines if line.strip().startswith("python -m lmms_eval")]


def swapped(argv: list[str], *, pretrained: Path, host: str, k: str, task_dir: Path, out: Path) -> list[str]:
    """``argv`` with this machine's checkpoint, tasks, device (``cuda:0`` -> ``host``) and output folder, and $K."""
    switches = [a for a in argv if a == "--log_samples"]
    rest = [a for a in argv if a not in switches]
    args = dict(zip(rest[0::2], rest[1::2]))
    assert set(args) == {"--model", "--model_args", "--tasks", "--batch_size", "--device", "--output_path"}, argv
    model_args = args["--model_args"].replace("$K", k).split(",")
    assert model_args[:2] == [model_args[0], "device_map=cuda:0"] and model_args[0].startswith("pretrained="), argv
    args["--model_args"] = ",".join([f"pretrained={pretrained}", host, *model_args[2:]])
    assert args["--tasks"] == "$TASKS" and args["--device"] == "cuda:0", argv
    args.update({"--tasks": TASK, "--device": "cpu", "--output_path": str(out), "--include_path": str(task_dir)})
    return [*(x for pair in args.items() for x in pair), *switches, "--verbosity", "WARNING"]


def _cli(argv: list[str], monkeypatch) -> Run:
    """lmms-eval's command-line code in this process (argument parsing, model creation, evaluation, output)."""
    monkeypatch.setattr(sys, "argv", ["lmms_eval", *argv])
    _, args = parse_eval_args()
    results, samples = cli_evaluate_single(args)
    responses, score = _samples(samples[TASK])
    return Run(responses, score)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_the_documented_commands_run(work: Workspace, family: str, monkeypatch) -> None:
    spec = FAMILIES[family]
    commands = doc_commands(spec.doc)
    assert [c[c.index("--model") + 1] for c in commands] == [spec.stock, spec.anchor]
    for argv, kind in zip(commands, ("stock", "reduced")):
        out = work.root / f"doc_{family}_{kind}"
        run = _cli(
            swapped(
                argv, pretrained=work.checkpoint(family), host=spec.host, k=spec.doc_k, task_dir=work.task, out=out
            ),
            monkeypatch,
        )
        expected = work.run(family, kind)
        assert run.responses == expected.responses and run.score == expected.score
        assert list(out.rglob("*_results.json")) and list(out.rglob(f"*_samples_{TASK}.jsonl"))
    assert FAMILIES[family].reduced.split(",")[0] == f"num_anchors={spec.doc_k}"


def test_the_documented_command_runs_in_a_fresh_process(work: Workspace) -> None:
    spec = FAMILIES["llava"]
    out = work.root / "doc_llava_process"
    argv = swapped(
        doc_commands("llava")[1],
        pretrained=work.checkpoint("llava"),
        host=spec.host,
        k=spec.doc_k,
        task_dir=work.task,
        out=out,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", *argv], env=env, capture_output=True, text=True, timeout=600, cwd=work.root
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = list(out.rglob(f"*_samples_{TASK}.jsonl"))
    assert samples, done.stdout[-3000:] + done.stderr[-3000:]  # lmms-eval exits 0 after a failed run
    responses, _ = _samples([json.loads(line) for line in samples[0].read_text().splitlines()])
    assert responses == work.run("llava", "reduced").responses


# --- bad model arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "settings", "match"),
    [
        ("anchor_llava_hf", "num_anchor=8", r"num_anchor is not an argument of AnchorLlavaHfChat"),
        ("anchor_llava_hf", "num_anchors=many", r"num_anchors must be an integer >= 1 .*got 'many'"),
        ("anchor_llava_hf", "num_anchors=0", r"num_anchors must be an integer >= 1 .*got 0"),
        ("anchor_llava_hf", "num_anchors=0.5", r"num_anchors must be an integer >= 1 for llava, got 0.5"),
        ("anchor_llava_hf", "num_anchors=8,num_context=-1", r"num_context must be an integer >= 0, got -1"),
        (
            "anchor_llava_hf",
            "num_anchors=8,score=attention",
            r"score must be one of cls, norm, map, received, got 'attention'",
        ),
        ("anchor_llava_hf", "num_anchors=8,image_budget=20", r"image_budget is not a setting of llava"),
        ("anchor_llava_hf", "num_context=2", r"num_anchors must be given for the stock checkpoint"),
        ("anchor_llava_hf", "num_anchors=48,num_context=2", r"num_anchors \+ num_context must be at most the 49"),
        (
            "anchor_llava_hf",
            "num_anchors=8,device=cuda",
            r"device is given twice, as model_args device='cuda' and as "
            r"the command line's --device 'cpu'",
        ),
        ("anchor_qwen2_5_vl", "num_anchors=8,num_context=0", r"num_context is not a setting of qwen2_5_vl"),
        ("anchor_llava_hf", "num_anchors=8,device_map=", r"device_map must be given for a single-process run"),
    ],
)
def test_bad_model_args_raise_naming_the_argument(work: Workspace, name: str, settings: str, match: str) -> None:
    family = "qwen2_5_vl" if "qwen" in name else "llava"
    with pytest.raises(ValueError, match=match):
        get_model(name).create_from_arg_string(work.model_args(family, settings), {"batch_size": 1, "device": "cpu"})


def test_anchor_settings_for_a_folder_saved_attached_are_refused(work: Workspace) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from anchor_former.adapters.transformers import attach_anchor_former

    source = work.checkpoint("llava")
    model, processor = LlavaForConditionalGeneration.from_pretrained(source), AutoProcessor.from_pretrained(source)
    attach_anchor_former(model, processor, connector="select", num_anchors=8)
    saved = work.root / "llava_attached_refused"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    with pytest.raises(ValueError, match=r"num_anchors must not be given for a checkpoint saved attached"):
        get_model("anchor_llava_hf").create_from_arg_string(
            f"pretrained={saved},device_map=cpu,num_anchors=4", {"device": "cpu"}
        )


def test_a_checkpoint_of_another_family_is_refused(work: Workspace) -> None:
    with pytest.raises(ValueError, match=r"pretrained must be a checkpoint of qwen2_5_vl .*got model_type 'llava'"):
        get_model("anchor_qwen2_5_vl").create_from_arg_string(
            work.model_args("llava", "num_anchors=8"), {"batch_size": 1, "device": "cpu"}
        )
