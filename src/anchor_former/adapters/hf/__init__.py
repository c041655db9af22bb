"""transformers model families, one module per family; the public entry point is
:func:`anchor_former.adapters.transformers.attach_anchor_former`, which detects the family.

Every module exposes the same names: ``attach_anchor_former``, ``register_auto_classes`` and the family's
attached config / model (/ processor) classes, which ``save_pretrained`` / ``from_pretrained`` round-trip.
The rest (the family's host ``HOST``, token-count helpers) is internal.

* :mod:`~anchor_former.adapters.hf.llava`: ``LlavaForConditionalGeneration`` (LLaVA-1.5);
* :mod:`~anchor_former.adapters.hf.llava_next`: LLaVA-NeXT, the LLaVA host with anyres views;
* :mod:`~anchor_former.adapters.hf.llava_onevision`: LLaVA-OneVision, the NeXT host with SigLIP defaults and video;
* :mod:`~anchor_former.adapters.hf.qwen_vl`: Qwen2-VL / Qwen2.5-VL / Qwen3-VL (training-free only).
"""

from anchor_former._optional import require

__all__: list[str] = []

# every family module here imports transformers: without it, the error names the extra to install
require("transformers", extra="hf", feature="anchor_former.adapters.hf (transformers models)")
