"""lmms-eval models that evaluate anchor-reduced checkpoints: lmms-eval's own models, reduced after loading.

Each class here subclasses an lmms-eval model class and changes one thing: after lmms-eval has loaded the
checkpoint and its processor (its own code: device placement, dtype, accelerate, chat templates, prompt
building, generation, decoding), the model and the processor are switched in place with
:func:`anchor_former.adapters.transformers.attach_anchor_former` (``connector="select"``: the training-free
reduction, which keeps the checkpoint's own projector). Everything else is lmms-eval's.

============================  =========================================================  ==========================
``--model``                   lmms-eval's class (simple / chat)                          checkpoints
============================  =========================================================  ==========================
``anchor_llava_hf``           ``llava_hf``: ``LlavaHf``                                  LLaVA-1.5, LLaVA-NeXT,
                                                                                         LLaVA-OneVision
``anchor_qwen2_5_vl``         ``qwen2_5_vl``: ``Qwen2_5_VL``                             Qwen2.5-VL
============================  =========================================================  ==========================

``--model_args`` takes lmms-eval's arguments of that model plus the anchor settings (:class:`AnchorArgs`):
``num_anchors`` (K), ``num_context`` (LLaVA-1.5: M merged context tokens), ``score`` and ``image_budget``
(LLaVA-NeXT / OneVision), e.g.
``pretrained=llava-hf/llava-1.5-7b-hf,num_anchors=144,num_context=0,score=cls``. A folder saved from an
attached model (``save_pretrained`` after :func:`~anchor_former.adapters.transformers.attach_anchor_former`,
e.g. a trained AcFormer) is evaluated as saved: give ``pretrained`` only.

The entry point (group ``lmms_eval.models``) is :func:`anchor_former.eval.manifests`; this module, with its
lmms-eval and transformers imports, is loaded only when one of these models is asked for. The vLLM
backend (``anchor_vllm``) is :mod:`anchor_former.eval._lmms_vllm`.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, ClassVar

from anchor_former._optional import require

require("lmms_eval", extra="eval", feature="anchor_former.eval (lmms-eval models)")

from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLChat
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLSimple
from loguru import logger as eval_logger

from anchor_former.eval._args import AnchorArgs, _CommandLineArgs, _resolve

__all__ = [
    "AnchorArgs",
    "AnchorLlavaHf",
    "AnchorLlavaHfChat",
    "AnchorQwen2_5_VL",
    "AnchorQwen2_5_VLChat",
]


class _AnchorModel(_CommandLineArgs):
    """Mixin before an lmms-eval model class: parses the anchor settings, lets the class load, then attaches.

    Subclasses set ``_options`` (stock ``model_type`` -> the :class:`AnchorArgs` fields that family takes) and
    ``_processor_attr`` (where the lmms-eval class keeps its processor).
    """

    _options: ClassVar[dict[str, tuple[str, ...]]]
    _processor_attr: ClassVar[str]
    # set by the lmms-eval model class this mixes into (declared only: no class attribute is created)
    model: Any
    processor: Any

    def __init__(
        self,
        pretrained: str,
        *,
        num_anchors: int | float | None = None,
        num_context: int | None = None,
        score: str | None = None,
        image_budget: int | None = None,
        **kwargs: Any,
    ) -> None:
        args = AnchorArgs(num_anchors=num_anchors, num_context=num_context, score=score, image_budget=image_budget)
        self._check_host_args(kwargs)
        self._check_placement(kwargs)
        _, saved = _resolve(type(self).__name__, pretrained, kwargs.get("revision"), args, self._options)
        self._register_saved_types(saved)
        super().__init__(pretrained=pretrained, **kwargs)  # type: ignore[call-arg]  # the lmms-eval class
        self._attach(args, saved)
        self._config = self.model.config
        eval_logger.info(f"anchor-former: {type(self.model).__name__} {self.model.config.anchor_former}")

    def _check_host_args(self, kwargs: dict[str, Any]) -> None:
        """An argument that is neither an anchor setting nor one of the lmms-eval class's is a ``ValueError``
        naming it (the lmms-eval classes ``assert kwargs == {}``, an ``AssertionError``, after other checks)."""
        host = inspect.signature(super().__init__).parameters
        named = {n for n, p in host.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        for name in kwargs:
            if name not in named:
                ours = ", ".join(f.name for f in fields(AnchorArgs))
                raise ValueError(
                    f"{name} is not an argument of {type(self).__name__}: it takes the anchor settings ({ours}) and "
                    f"lmms-eval's {', '.join(sorted(named))}; got {name}={kwargs[name]!r}"
                )

    def _check_placement(self, kwargs: dict[str, Any]) -> None:
        """Arguments the lmms-eval class accepts but cannot load with (nothing to check by default)."""

    @property
    def anchor_former(self) -> dict[str, Any]:
        """What the evaluated model does: its ``config.anchor_former`` record (connector, score, budget)."""
        return dict(self.model.config.anchor_former)

    def _register_saved_types(self, saved: bool) -> None:
        """Make the lmms-eval class able to load a checkpoint saved attached (nothing for a stock one)."""

    def _attach(self, args: AnchorArgs, saved: bool) -> None:
        from anchor_former.adapters.transformers import attach_anchor_former

        if not saved:
            processor = getattr(self, self._processor_attr)
            attach_anchor_former(self.model, processor, connector="select", **args.given())


# --- LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision: lmms-eval's llava_hf ---------------------------------------


class _AnchorLlava(_AnchorModel):
    _options = {
        "llava": ("num_anchors", "num_context", "score"),
        "llava_next": ("num_anchors", "score", "image_budget"),
        "llava_onevision": ("num_anchors", "score", "image_budget"),
    }
    _processor_attr = "_image_processor"

    def _check_placement(self, kwargs: dict[str, Any]) -> None:
        """lmms-eval's ``LlavaHf`` passes its default ``device_map=""`` to ``from_pretrained`` in a single
        process (several processes replace it with each one's GPU), which transformers 5 refuses."""
        from accelerate import PartialState

        if not kwargs.get("device_map") and PartialState().num_processes == 1:
            raise ValueError(
                "device_map must be given for a single-process run (e.g. device_map=cuda:0, or device_map=cpu), "
                f"got {kwargs.get('device_map', '')!r}: lmms-eval's llava_hf passes it to from_pretrained, which "
                "refuses an empty one"
            )

    def _register_saved_types(self, saved: bool) -> None:
        """lmms-eval's ``LlavaHf`` picks the class from its ``model_map`` by ``config.model_type``; a saved
        attached checkpoint needs the package's types there (and in transformers' Auto classes). Done once a
        saved checkpoint is asked for, never at import."""
        if not saved:
            return
        from lmms_eval.models.simple import llava_hf as host

        from anchor_former.adapters.hf import llava, llava_next, llava_onevision

        for family, cls in (
            (llava, llava.AnchorFormerLlavaForConditionalGeneration),
            (llava_next, llava_next.AnchorFormerLlavaNextForConditionalGeneration),
            (llava_onevision, llava_onevision.AnchorFormerLlavaOnevisionForConditionalGeneration),
        ):
            family.register_auto_classes()  # AutoConfig (lmms-eval reads the type), AutoProcessor (NeXT / OneVision)
            host.model_map.setdefault(cls.config_class.model_type, cls)


class AnchorLlavaHf(_AnchorLlava, _LlavaHfSimple):
    """lmms-eval's ``llava_hf`` (simple) with the anchor reduction; ``--model anchor_llava_hf --force_simple``."""


class AnchorLlavaHfChat(_AnchorLlava, _LlavaHfChat):
    """lmms-eval's ``llava_hf`` (chat: the processor's chat template) with the anchor reduction;
    ``--model anchor_llava_hf``."""


# --- Qwen2.5-VL: lmms-eval's qwen2_5_vl -------------------------------------------------------------------


class _AnchorQwen(_AnchorModel):
    _options = {"qwen2_5_vl": ("num_anchors", "score")}
    _processor_attr = "processor"

    def _register_saved_types(self, saved: bool) -> None:
        """lmms-eval loads with ``Qwen2_5_VLForConditionalGeneration`` (the stock class: the reduction adds no
        weight) and ``AutoProcessor``, which must resolve the saved processor class."""
        if not saved:
            return
        from transformers import AutoProcessor

        from anchor_former.adapters.hf import qwen_vl

        qwen_vl.register_auto_classes()
        for config_class, processor_class in (
            (qwen_vl.AnchorFormerQwen2VLConfig, qwen_vl.AnchorFormerQwen2VLProcessor),
            (qwen_vl.AnchorFormerQwen2_5_VLConfig, qwen_vl.AnchorFormerQwen2_5_VLProcessor),
            (qwen_vl.AnchorFormerQwen3VLConfig, qwen_vl.AnchorFormerQwen3VLProcessor),
        ):
            AutoProcessor.register(config_class, processor_class, exist_ok=True)

    def _attach(self, args: AnchorArgs, saved: bool) -> None:
        if not saved:
            return super()._attach(args, saved)
        # the stock class loaded the weights and kept the record; attach again with the recorded settings
        from anchor_former.adapters.transformers import attach_anchor_former

        recorded = dict(self.model.config.anchor_former)
        extras = recorded.get("extras") or {}  # the versioned record keeps family settings there
        attach_anchor_former(
            self.model,
            self.processor,
            num_anchors=recorded["num_anchors"],
            score_layer=recorded.get("score_layer", recorded.get("layer")),
            block_size=recorded.get("block_size", extras.get("block_size")),
        )


class AnchorQwen2_5_VL(_AnchorQwen, _Qwen2_5_VLSimple):
    """lmms-eval's ``qwen2_5_vl`` (simple) with the anchor reduction; ``--model anchor_qwen2_5_vl --force_simple``."""


class AnchorQwen2_5_VLChat(_AnchorQwen, _Qwen2_5_VLChat):
    """lmms-eval's ``qwen2_5_vl`` (chat) with the anchor reduction; ``--model anchor_qwen2_5_vl``."""
