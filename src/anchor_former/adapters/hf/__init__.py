"""transformers model families, one module per family; the public entry point is
:func:`anchor_former.adapters.transformers.attach_anchor_former`, which detects the family.

Every module exposes the same names (``attach_anchor_former``, ``register_auto_classes``, ``HOST``: the
family's :class:`~anchor_former.adapters._host.Host`), and only what differs between families:

* :mod:`~anchor_former.adapters.hf.llava`: ``LlavaForConditionalGeneration`` (LLaVA-1.5), :class:`LlavaHost`;
* :mod:`~anchor_former.adapters.hf.llava_next`: LLaVA-NeXT, the LLaVA host with anyres views;
* :mod:`~anchor_former.adapters.hf.llava_onevision`: LLaVA-OneVision, the NeXT host with SigLIP defaults and video;
* :mod:`~anchor_former.adapters.hf.qwen_vl`: Qwen2-VL / Qwen2.5-VL / Qwen3-VL (training-free only).
"""
