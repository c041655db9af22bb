"""lmms-eval's ``vllm`` model through the package's vLLM plugin (``--model anchor_vllm``), offline.

The argument checks run wherever lmms-eval is installed (they refuse before vLLM is touched); the
evaluation runs only where vLLM and the package's vLLM plugin are importable too (skipped otherwise).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval runs in .venv-lmms (scripts/test_lmms.sh), not the main environment")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import _tiny  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

TASK = "anchor_tiny_vqa"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5 vLLM's CPU attention runs (language-model heads of 32), saved in the llava-hf layout."""
    from tests.vllm_plugin import _vllm_models as tiny_vllm

    processor = tiny_vllm.llava_processor()
    folder = tmp_path_factory.mktemp("vllm") / "llava"
    tiny_vllm.save(tiny_vllm.llava_model(processor), processor, folder)
    return _hub_layout(folder)


def _hub_layout(folder: Path) -> Path:
    """The tower's keys as llava-hf checkpoints hold them (``vision_tower.vision_model.*``): stock vLLM loads
    only that layout, and transformers >= 5.19 saves ``vision_tower.*`` (the plugin's classes read both)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    renamed = {
        re.sub(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)", r"\1vision_model.", k): v for k, v in state.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})
    return folder


def test_the_entry_point_registers_anchor_vllm() -> None:
    from anchor_former.eval import _lmms_vllm as lmms_vllm

    assert get_model("anchor_vllm") is lmms_vllm.AnchorVLLMChat
    assert get_model("anchor_vllm", force_simple=True) is lmms_vllm.AnchorVLLM


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ("", r"num_anchors must be given for the stock checkpoint"),
        ("num_anchors=8,hf_overrides={}", r"hf_overrides must not be given to anchor_vllm"),
        ("num_anchors=0", r"num_anchors must be an integer >= 1"),
        ("num_anchors=0.5", r"num_anchors must be an integer >= 1 for llava, got 0.5"),
        ("num_anchors=8,num_context=-2", r"num_context must be an integer >= 0, got -2"),
    ],
)
def test_bad_model_args_raise_before_vllm_starts(llava: Path, settings: str, match: str) -> None:
    args = ",".join(filter(None, [f"model={llava}", settings]))
    with pytest.raises(ValueError, match=match):
        get_model("anchor_vllm").create_from_arg_string(args, {"batch_size": 1})


def test_full_budget_answers_as_stock_vllm_and_a_reduced_one_runs(llava: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed here (its tests run in the vLLM environment)")
    pytest.importorskip("anchor_former.vllm", reason="the package's vLLM plugin is not installed here")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    task = _tiny.write_task(tmp_path / "task", TASK)
    tasks = TaskManager("WARNING", include_path=str(task))
    engine = "max_model_len=256,gpu_memory_utilization=0.3,enforce_eager=True"

    def answers(name: str, settings: str) -> list[str]:
        args = ",".join(filter(None, [f"model={llava}", engine, settings]))
        results = simple_evaluate(
            model=name,
            model_args=args,
            tasks=[TASK],
            batch_size=1,
            log_samples=True,
            task_manager=tasks,
            verbosity="WARNING",
            process_docs_parallel=1,
        )
        samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
        return [
            s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0] for s in samples
        ]

    stock = answers("vllm", "")
    assert answers("anchor_vllm", "num_anchors=49,num_context=0") == stock
    assert len(answers("anchor_vllm", "num_anchors=8,num_context=0")) == len(_tiny.QUESTIONS)
