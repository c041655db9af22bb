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
Families (``family=`` of :func:`hf_overrides`, :data:`FAMILIES`): LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
Qwen2.5-VL, Qwen3-VL; the model classes vLLM builds (:data:`ARCHITECTURES`) live in this package's private
modules and are reached only through vLLM.
Supported vLLM releases: :data:`SUPPORTED_VLLM`.

Importing this package imports neither vLLM nor transformers; the family modules do.
"""

from __future__ import annotations

from anchor_former.vllm._guard import CountMismatchError
from anchor_former.vllm._plugin import ARCHITECTURES, SUPPORTED_VLLM, check_vllm_version, register
from anchor_former.vllm._settings import FAMILIES, hf_overrides

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "SUPPORTED_VLLM",
    "CountMismatchError",
    "check_vllm_version",
    "hf_overrides",
    "register",
]
