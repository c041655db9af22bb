"""Evaluation of reduced checkpoints with lmms-eval (``pip install anchor-former[eval]``).

lmms-eval (0.7.x) finds outside models through the entry-point group ``lmms_eval.models``; this package
registers :func:`manifests` there, so ``python -m lmms_eval --model anchor_llava_hf ...`` works once both are
installed. The model classes live in :mod:`anchor_former.eval.lmms`, imported only when lmms-eval resolves
one of these names (this module imports nothing heavy). See ``docs/evaluation.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODELS", "manifests"]

# lmms-eval model name -> (simple class, chat class) in anchor_former.eval.lmms
MODELS: dict[str, tuple[str, str]] = {
    "anchor_llava_hf": ("AnchorLlavaHf", "AnchorLlavaHfChat"),
    "anchor_qwen2_5_vl": ("AnchorQwen2_5_VL", "AnchorQwen2_5_VLChat"),
}


def manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: one ``ModelManifest`` per name of :data:`MODELS`.

    lmms-eval prefers the chat class (``--force_simple`` picks the simple one), as for its own models.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    module = "anchor_former.eval.lmms"
    return [
        ModelManifest(model_id=name, simple_class_path=f"{module}.{simple}", chat_class_path=f"{module}.{chat}")
        for name, (simple, chat) in MODELS.items()
    ]
