"""transformers model families, one module per family; the public entry point is
:func:`anchor_former.adapters.transformers.attach_anchor_former`, which detects the family.

* :mod:`~anchor_former.adapters.hf.llava`: ``LlavaForConditionalGeneration`` (LLaVA-1.5).
"""
