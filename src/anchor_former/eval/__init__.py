"""Evaluation of reduced checkpoints with lmms-eval (``pip install anchor-former[eval]``).

lmms-eval (0.7.x) finds outside models through the entry-point group ``lmms_eval.models``; this package
registers :func:`manifests` there, so ``python -m lmms_eval --model anchor_llava_hf ...`` works once both are
installed. The model classes live in the private modules ``anchor_former.eval._lmms`` (transformers backend) and
``anchor_former.eval._lmms_vllm`` (vLLM backend), imported only when lmms-eval resolves one of these names
(this module imports nothing heavy). See ``docs/evaluation.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODELS", "manifests"]

# lmms-eval model name -> (simple class, chat class), in the modules of this package
MODELS: dict[str, tuple[str, str]] = {
    "anchor_llava_hf": ("anchor_former.eval._lmms.AnchorLlavaHf", "anchor_former.eval._lmms.AnchorLlavaHfChat"),
    "anchor_qwen2_5_vl": ("anchor_former.eval._lmms.AnchorQwen2_5_VL", "anchor_former.eval._lmms.AnchorQwen2_5_VLChat"),
    "anchor_vllm": ("anchor_former.eval._lmms_vllm.AnchorVLLM", "anchor_former.eval._lmms_vllm.AnchorVLLMChat"),
}


def manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: one ``ModelManifest`` per name of :data:`MODELS`.

    lmms-eval prefers the chat class (``--force_simple`` picks the simple one), as for its own models.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=name, simple_class_path=simple, chat_class_path=chat)
        for name, (simple, chat) in MODELS.items()
    ]
