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
lmms-eval and transformers imports, is loaded only when one of these models is asked for.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLChat
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLSimple
from lmms_eval.utils import simple_parse_args_string
from loguru import logger as eval_logger

__all__ = [
    "AnchorArgs",
    "AnchorLlavaHf",
    "AnchorLlavaHfChat",
    "AnchorQwen2_5_VL",
    "AnchorQwen2_5_VLChat",
]

_PREFIX = "anchor_former_"  # model_type of a saved attached checkpoint: "anchor_former_" + the stock type
_SCORES = ("cls", "norm", "map", "received")


@dataclass(frozen=True, kw_only=True)
class AnchorArgs:
    """The anchor settings of ``--model_args`` (``None``: not given, the adapter's default applies).

    Attributes:
        num_anchors: K kept visual tokens per image (LLaVA-1.5), per view (LLaVA-NeXT / OneVision), or per
            image as a count or a fraction in (0, 1] (Qwen2.5-VL). Required for a stock checkpoint.
        num_context: LLaVA-1.5 only: M merged context tokens added to the K anchors (0: none).
        score: how tokens are ranked: ``"cls"`` ([CLS] attention; LLaVA-1.5 / NeXT default), ``"norm"``,
            ``"map"``, ``"received"`` (attention received; OneVision and Qwen2.5-VL default).
        image_budget: LLaVA-NeXT / OneVision only: one budget per image spread over its views (replaces K per view).
    """

    num_anchors: int | float | None = None
    num_context: int | None = None
    score: str | None = None
    image_budget: int | None = None

    def __post_init__(self) -> None:
        k = self.num_anchors
        is_int = isinstance(k, int) and not isinstance(k, bool)
        if k is not None and not ((is_int and k >= 1) or (isinstance(k, float) and 0.0 < k <= 1.0)):
            raise ValueError(
                f"num_anchors must be an integer >= 1 (tokens kept per image or view) or, for Qwen2.5-VL, a "
                f"fraction in (0, 1], got {k!r}"
            )
        for name, low in (("num_context", 0), ("image_budget", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.score is not None and self.score not in _SCORES:
            raise ValueError(f"score must be one of {', '.join(_SCORES)}, got {self.score!r}")

    def given(self) -> dict[str, Any]:
        """The settings that were given, as keyword arguments of ``attach_anchor_former``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _config_dict(pretrained: str, revision: str | None) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (no model class resolved, so saved attached types read too)."""
    from transformers import PretrainedConfig

    kwargs = {} if revision is None else {"revision": revision}
    return PretrainedConfig.get_config_dict(pretrained, **kwargs)[0]


class _AnchorModel:
    """Mixin before an lmms-eval model class: parses the anchor settings, lets the class load, then attaches.

    Subclasses set ``_options`` (stock ``model_type`` -> the :class:`AnchorArgs` fields that family takes) and
    ``_processor_attr`` (where the lmms-eval class keeps its processor).
    """

    _options: ClassVar[dict[str, tuple[str, ...]]]
    _processor_attr: ClassVar[str]

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        """lmms-eval's constructor from ``--model_args`` plus the command line's ``--device`` / ``--batch_size``.

        lmms-eval passes both as keywords, so an argument in both was a ``TypeError``; equal values now
        merge, different ones are a ``ValueError`` naming the argument.
        """
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        for name in sorted(args.keys() & extra.keys()):
            if args[name] != extra[name]:
                raise ValueError(
                    f"{name} is given twice, as model_args {name}={args[name]!r} and as the command line's "
                    f"--{name} {extra[name]!r}; give it once (the device with --device, the placement with "
                    "model_args device_map=...)"
                )
        return cls(**{**extra, **args})

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
        config = _config_dict(pretrained, kwargs.get("revision"))
        model_type = str(config.get("model_type", ""))
        saved = model_type.startswith(_PREFIX)
        family = model_type.removeprefix(_PREFIX)
        if family not in self._options:
            raise ValueError(
                f"pretrained must be a checkpoint of {', '.join(self._options)} (config.json model_type, or "
                f"{_PREFIX}<type> when saved attached) for {type(self).__name__}, got model_type "
                f"{model_type!r} at {pretrained!r}"
            )
        if saved and args.given():
            raise ValueError(
                f"{', '.join(args.given())} must not be given for a checkpoint saved attached ({pretrained!r} records "
                f"{config.get('anchor_former')!r}); it is evaluated as saved, pass pretrained only"
            )
        if not saved:
            if args.num_anchors is None:
                raise ValueError(
                    f"num_anchors must be given for the stock checkpoint {pretrained!r} (model_type {model_type!r}), "
                    "e.g. num_anchors=144; got none"
                )
            for name in args.given():
                if name not in self._options[family]:
                    raise ValueError(
                        f"{name} is not a setting of {family} (it takes {', '.join(self._options[family])}), got "
                        f"{name}={getattr(args, name)!r}"
                    )
            if not family.startswith("qwen") and isinstance(args.num_anchors, float):
                raise ValueError(f"num_anchors must be an integer >= 1 for {family}, got {args.num_anchors!r}")
        self._register_saved_types(saved)
        super().__init__(pretrained=pretrained, **kwargs)
        self._attach(args, saved)
        self._config = self.model.config
        eval_logger.info(f"anchor-former: {type(self.model).__name__} {self.model.config.anchor_former}")

    def _check_host_args(self, kwargs: dict[str, Any]) -> None:
        """Arguments neither anchor settings nor the lmms-eval class's own are a ``ValueError`` (the lmms-eval
        classes assert on them after nothing, or fail deep in loading)."""
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

        for family, cls in ((llava, llava.AnchorFormerLlavaForConditionalGeneration),
                            (llava_next, llava_next.AnchorFormerLlavaNextForConditionalGeneration),
                            (llava_onevision, llava_onevision.AnchorFormerLlavaOnevisionForConditionalGeneration)):
            family.register_auto_classes()
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

        qwen_vl.register_qwen_auto_classes()
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
        attach_anchor_former(self.model, self.processor, num_anchors=recorded["num_anchors"],
                             score_layer=recorded["score_layer"], block_size=recorded["block_size"])


class AnchorQwen2_5_VL(_AnchorQwen, _Qwen2_5_VLSimple):
    """lmms-eval's ``qwen2_5_vl`` (simple) with the anchor reduction; ``--model anchor_qwen2_5_vl --force_simple``."""


class AnchorQwen2_5_VLChat(_AnchorQwen, _Qwen2_5_VLChat):
    """lmms-eval's ``qwen2_5_vl`` (chat) with the anchor reduction; ``--model anchor_qwen2_5_vl``."""
