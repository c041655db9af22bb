"""Tiny saved checkpoints and LLaVA-format data for the ``anchor_former.train`` tests (built offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

K = 8  # anchors per view; AcFormer gives K + 1 tokens per view on CLIP, K on SigLIP
CONNECTOR = '{"depth": 1, "heads": 2, "dim_head": 8}'
ANSWERS = ["cat", "dog", "cat", "dog"]


def save_family(root: Path, family: str) -> Path:
    """``root/family``: a saved tiny stock model + processor of ``family`` (llava, llava_next, onevision)."""
    from tests.adapters import _hf_llava, _hf_llava_next, _hf_llava_onevision

    builder = {"llava": _hf_llava, "llava_next": _hf_llava_next, "onevision": _hf_llava_onevision}[family]
    processor = builder.make_processor()
    model = builder.make_model(processor)
    folder = root / family
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_config_only(root: Path, family: str, name: str = "config_only", **overrides) -> Path:
    """The config.json (and processor files) of ``family`` WITHOUT any weight file: loading it fails with
    OSError, so a ValueError from a run pointed at it was raised before any weight was read."""
    from tests.adapters import _hf_llava, _hf_llava_next, _hf_llava_onevision

    builder = {"llava": _hf_llava, "llava_next": _hf_llava_next, "onevision": _hf_llava_onevision}[family]
    processor = builder.make_processor()
    model = builder.make_model(processor, **overrides)
    folder = root / f"{name}_{family}"
    model.config.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder))
    return folder


def save_data(
    root: Path, sizes=((40, 70), (70, 40), (30, 90), (56, 56)), prompt: str = "what is in the picture ?"
) -> Path:
    """``root/data.json`` + ``root/images``: one random image of each (height, width), answered by one word."""
    (root / "images").mkdir(exist_ok=True)
    data = []
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        data.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{prompt}"},
                    {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]},
                ],
            }
        )
    path = root / "data.json"
    path.write_text(json.dumps(data))
    return path


def run_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--num_anchors",
        str(K),
        "--connector_config",
        CONNECTOR,
        "--data_path",
        str(data),
        "--image_folder",
        str(data.parent / "images"),
        "--output_dir",
        str(output),
        "--learning_rate",
        "1e-2",
        "--lr_scheduler_type",
        "constant",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def connector_state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights(folder).items() if "multi_modal_projector" in k}


def torchrun(argv: list[str], nproc: int = 2) -> str:
    """``torchrun --standalone --nproc_per_node nproc -m anchor_former.train argv``; returns stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, "src"), root, env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "anchor_former.train",
        *argv,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
