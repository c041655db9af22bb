"""Tiny real checkpoints (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL) and a local lmms-eval task, built offline.

The models and processors come from the adapter tests' builders (``tests/adapters/_hf_*.py``, loaded from
their files); here they get the chat templates their hub checkpoints ship (lmms-eval's chat models render
prompts with ``processor.apply_chat_template``) and are saved with ``save_pretrained``, so lmms-eval loads
them with ``from_pretrained`` exactly as it loads ``llava-hf/...`` or ``Qwen/...``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"

# llava-hf/llava-1.5-*-hf and llava-v1.6-vicuna: "USER: <image>\n{text} ASSISTANT:" (images first)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-onevision-*: ChatML with the images before the text
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen/Qwen2.5-VL-*-Instruct
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _builders(name: str):
    """``tests/adapters/<name>.py`` loaded from its file (the adapter tests' tiny model builders)."""
    module_name = f"_anchor_former_eval_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ADAPTERS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def save_llava(folder: Path) -> Path:
    """LLaVA-1.5: CLIP tower, 28-px images, 7 x 7 = 49 patches, ``"default"`` strategy (576 -> 49)."""
    builders = _builders("_hf_llava")
    processor = builders.make_processor()
    processor.chat_template = LLAVA_TEMPLATE
    builders.make_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_llava_next(folder: Path) -> Path:
    """LLaVA-NeXT: the same tower, anyres over 28-px views (49 patches each)."""
    builders = _builders("_hf_llava_next")
    processor = builders.make_processor()
    processor.chat_template = LLAVA_TEMPLATE
    builders.make_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_onevision(folder: Path) -> Path:
    """LLaVA-OneVision: SigLIP tower (no [CLS]), anyres_max_2 over 28-px views."""
    builders = _builders("_hf_llava_onevision")
    processor = builders.make_processor()
    processor.chat_template = ONEVISION_TEMPLATE
    builders.make_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_qwen(folder: Path) -> Path:
    """Qwen2.5-VL: 8-px patches merged 2 x 2 (one merged token per 16 x 16 pixels)."""
    builders = _builders("_hf_qwen")
    processor = builders.make_processor("qwen2_5_vl")
    processor.chat_template = QWEN_TEMPLATE
    builders.make_model(processor, "qwen2_5_vl").save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


QUESTIONS = ["what is in the picture ?", "what is this ?", "is this a cat ?", "is this a dog ?"]
ANSWERS = ["cat", "dog", "a", "cat"]


def write_task(folder: Path, name: str = "anchor_tiny_vqa", size: tuple[int, int] = (40, 56)) -> Path:
    """A local lmms-eval task: ``data.jsonl`` (one question, answer and image file per line), ``utils.py`` and
    ``<name>.yaml`` (``dataset_path: json`` with ``data_files``; exact-match scoring). Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS)):
        image = f"image_{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / image)
        rows.append({"id": i, "image": image, "question": question, "answer": answer})
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "utils.py").write_text(
        "from pathlib import Path\n\nfrom PIL import Image\n\n\n"
        "def doc_to_visual(doc):\n"
        "    return [Image.open(Path(__file__).parent / doc['image']).convert('RGB')]\n"
    )
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: question\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  temperature: 0\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder
