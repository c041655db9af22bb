"""lmms-eval's ``vllm`` model serving anchor-reduced checkpoints through the package's vLLM plugin.

``--model anchor_vllm --model_args model=llava-hf/llava-1.5-7b-hf,num_anchors=144``: lmms-eval's own
``vllm`` model (``LLM(...)``, its prompts, sampling and decoding) with ``hf_overrides`` written by
:func:`anchor_former.vllm.hf_overrides` from the anchor settings; a folder saved attached is served as
saved (``model`` only). Needs vLLM and the package's vLLM plugin (``anchor-former[vllm]``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from anchor_former._optional import require

require("lmms_eval", extra="eval", feature="anchor_former.eval (lmms-eval models)")

from lmms_eval.models.chat.vllm import VLLM as _VLLMChat
from lmms_eval.models.simple.vllm import VLLM as _VLLMSimple
from loguru import logger as eval_logger

from anchor_former.eval._args import AnchorArgs, _CommandLineArgs, _resolve

__all__ = ["AnchorVLLM", "AnchorVLLMChat"]


class _AnchorVLLM(_CommandLineArgs):
    """lmms-eval's ``vllm`` model serving the checkpoint through the package's vLLM plugin: a stock checkpoint
    gets :func:`anchor_former.vllm.hf_overrides` (the reduced architecture and its settings), a folder saved
    attached is served as saved."""

    _options: ClassVar[dict[str, tuple[str, ...]]] = {
        "llava": ("num_anchors", "num_context"),
        "llava_next": ("num_anchors",),
        "qwen2_5_vl": ("num_anchors",),
    }

    def __init__(
        self,
        model: str,
        *,
        num_anchors: int | float | None = None,
        num_context: int | None = None,
        **kwargs: Any,
    ) -> None:
        if "hf_overrides" in kwargs:
            raise ValueError(
                "hf_overrides must not be given to anchor_vllm: it writes them from num_anchors / num_context, got "
                f"hf_overrides={kwargs['hf_overrides']!r}"
            )
        args = AnchorArgs(num_anchors=num_anchors, num_context=num_context)
        family, saved = _resolve(type(self).__name__, model, kwargs.get("revision"), args, self._options, name="model")
        if not saved:
            from anchor_former.vllm import hf_overrides

            kwargs["hf_overrides"] = hf_overrides(family=family, **args.given())
        super().__init__(model=model, **kwargs)  # type: ignore[call-arg]  # lmms-eval's vllm class
        eval_logger.info(f"anchor-former: vLLM {model} {kwargs.get('hf_overrides', 'as saved')}")


class AnchorVLLM(_AnchorVLLM, _VLLMSimple):
    """lmms-eval's ``vllm`` (simple) through the package's vLLM plugin; ``--model anchor_vllm --force_simple``."""


class AnchorVLLMChat(_AnchorVLLM, _VLLMChat):
    """lmms-eval's ``vllm`` (chat) through the package's vLLM plugin; ``--model anchor_vllm``."""
