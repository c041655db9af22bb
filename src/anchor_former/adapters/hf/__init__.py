"""transformers model families, one module per family; the public entry point is
:func:`anchor_former.adapters.transformers.attach_anchor_former`, which detects the family.

* :mod:`~anchor_former.adapters.hf.llava`: ``LlavaForConditionalGeneration`` (LLaVA-1.5).
* :mod:`~anchor_former.adapters.hf.qwen_vl`: Qwen2-VL / Qwen2.5-VL / Qwen3-VL, through its own entry
  point :func:`~anchor_former.adapters.hf.qwen_vl.attach_anchor_former_qwen` (training-free only).
"""

from anchor_former._optional import require

# every family module here imports transformers: without it, the error names the extra to install
require("transformers", extra="hf", feature="anchor_former.adapters.hf (transformers models)")
