"""Serve anchor-reduced multimodal models with vLLM (an out-of-tree plugin; ``pip install "anchor-former[vllm]"``).

The plugin registers itself through the ``vllm.general_plugins`` entry point: installing the package is
enough, every vLLM process picks it up. Two ways to serve:

* a stock checkpoint, reduced, with its own weights::

      from vllm import LLM
      import anchor_former.vllm as afv
      llm = LLM(model="llava-hf/llava-1.5-7b-hf", hf_overrides=afv.hf_overrides(num_anchors=144))

* a folder saved by ``attach_anchor_former(...)`` + ``save_pretrained`` (a trained AcFormer or any
  connector), as it is: ``LLM(model=folder)``.

A request picks its own budget with ``mm_processor_kwargs={"num_anchors": k, "num_context": m}``.
Families: LLaVA-1.5 (:mod:`anchor_former.vllm.llava`), LLaVA-NeXT (:mod:`anchor_former.vllm.llava_next`),
Qwen2.5-VL (:mod:`anchor_former.vllm.qwen2_5_vl`).
Supported vLLM releases: :data:`SUPPORTED_VLLM`.

Importing this package imports neither vLLM nor transformers; the family modules do.
"""

from __future__ import annotations

from anchor_former.vllm._guard import CountMismatchError, check_counts
from anchor_former.vllm._settings import FAMILIES, anchor_record, hf_overrides
from anchor_former.vllm.plugin import ARCHITECTURES, SUPPORTED_VLLM, check_vllm_version, register

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "SUPPORTED_VLLM",
    "CountMismatchError",
    "anchor_record",
    "check_counts",
    "check_vllm_version",
    "hf_overrides",
    "register",
]
