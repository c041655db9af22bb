"""The one verb for every host: ``anchor_former.attach_anchor_former(model, processor, ...)``.

It picks the host adapter from the model's class and calls that host's ``attach_anchor_former`` with the
same arguments, so a user needs one import whatever the model is:

* a transformers model (LLaVA-1.5, LLaVA-NeXT, OneVision, Qwen2/2.5/3-VL):
  :func:`anchor_former.adapters.transformers.attach_anchor_former` (the processor is switched too);
* a model of the original LLaVA code (``llava-torch``, ``LlavaMetaForCausalLM``):
  :func:`anchor_former.adapters.llava.attach_anchor_former` (LLaVA has no processor object: its image
  processor is unchanged, so ``processor`` must be left out).

Nothing here imports transformers or llava until a model is given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["attach_anchor_former", "kept_tokens"]


def _is_llava_torch(model: nn.Module) -> bool:
    """``model`` is a model of the original LLaVA code (its classes derive from ``LlavaMetaForCausalLM``)."""
    return any(
        cls.__module__.startswith("llava.") and cls.__name__ == "LlavaMetaForCausalLM" for cls in type(model).__mro__
    )


def attach_anchor_former(model: nn.Module, processor: Any = None, **kwargs: Any) -> nn.Module:
    """Switch ``model`` (and ``processor``) to anchors in place; returns ``model``.

    Args:
        model: a transformers model of a supported family, or a ``llava-torch`` LLaVA model.
        processor: the transformers processor of ``model`` (switched so that it writes the reduced number of
            image tokens); must be None for a ``llava-torch`` model.
        **kwargs: the host's arguments: ``connector`` (``"select"`` for the training-free mode,
            ``"acformer"``, ...), ``num_anchors`` K, ``num_context`` M, ``score``, connector arguments.

    Raises:
        ValueError: a model of no supported host, a processor given for a ``llava-torch`` model, or what
            the host refuses (the model and processor are unchanged then).
    """
    if _is_llava_torch(model):
        if processor is not None:
            raise ValueError(
                "processor must be None for a llava-torch model (its image processor is unchanged), got "
                f"{type(processor).__qualname__}"
            )
        from anchor_former.adapters.llava import attach_anchor_former as attach_llava

        return attach_llava(model, **kwargs)
    if (
        type(model).__module__.startswith("transformers.")
        or hasattr(model, "config")
        and hasattr(model.config, "model_type")
    ):
        from anchor_former.adapters.transformers import attach_anchor_former as attach_transformers

        return attach_transformers(model, processor, **kwargs)
    raise ValueError(
        "model must be a transformers multimodal model (LLaVA-1.5, LLaVA-NeXT, OneVision, Qwen2/2.5/3-VL) or a "
        f"llava-torch LLaVA model, got {type(model).__module__}.{type(model).__qualname__}"
    )


def kept_tokens(model: nn.Module, **inputs: Any) -> tuple[torch.Tensor, ...]:
    """The visual tokens an attached transformers model keeps for ``inputs``, per image.

    See :func:`anchor_former.adapters.transformers.kept_tokens` (shapes per family; one vision forward of
    this call, no state kept on the model). Draw them with :func:`anchor_former.plot_anchors`.
    """
    from anchor_former.adapters.transformers import kept_tokens as kept

    return kept(model, **inputs)
