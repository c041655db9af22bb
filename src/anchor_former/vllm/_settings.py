"""What the served model does: :func:`hf_overrides` writes it, :func:`anchor_record` reads it back.

Two sources give a model its anchor settings, and both end up as the hf config attribute
``anchor_former`` (a dict) that vLLM's model classes read:

* a stock checkpoint served reduced: ``LLM(model=..., hf_overrides=hf_overrides(num_anchors=...))`` (vLLM
  sets every key of the dict on the checkpoint's config; ``architectures`` selects this package's class);
* a folder saved by ``attach_anchor_former(...)`` + ``save_pretrained``: its ``config.json`` already holds
  the record and the package's architecture name.

:func:`anchor_record` is the one place that reads the record, so a change of how the transformers
adapters store their settings needs one change here.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

from anchor_former.adapters.settings import AnchorSettings

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "BUDGET_KEYS",
    "FAMILIES",
    "anchor_record",
    "field_rows",
    "hf_overrides",
    "request_budget",
    "saved_config_classes",
]

#: ``hf_overrides(family=...)`` -> the architecture vLLM builds
FAMILIES = {
    "llava": "AnchorFormerLlavaForConditionalGeneration",
    "llava_next": "AnchorFormerLlavaNextForConditionalGeneration",
    "llava_onevision": "AnchorFormerLlavaOnevisionForConditionalGeneration",
    "qwen2_5_vl": "AnchorFormerQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "AnchorFormerQwen3VLForConditionalGeneration",
}

#: the ``mm_processor_kwargs`` a request may set (its budget)
BUDGET_KEYS = ("num_anchors", "num_context")


def _positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def hf_overrides(
    *,
    num_anchors: int = 144,
    num_context: int = 0,
    family: str = "llava",
    max_budget: int | None = None,
) -> dict[str, Any]:
    """The ``hf_overrides`` that serve a stock checkpoint with the training-free anchor reduction.

    ``LLM(model="llava-hf/llava-1.5-7b-hf", hf_overrides=hf_overrides(num_anchors=144))``, or on the command
    line ``--hf-overrides "$(python -c 'import json, anchor_former.vllm as v; print(json.dumps(v.hf_overrides(num_anchors=144)))')"``.
    The checkpoint's weights are used as they are; nothing is copied.

    Args:
        num_anchors: K, the default budget: anchor patches kept per image (LLaVA-1.5), per view
            (LLaVA-NeXT, LLaVA-OneVision) or merged 2 x 2 tokens kept per image (Qwen2.5-VL, Qwen3-VL). A
            request overrides it with ``mm_processor_kwargs={"num_anchors": k}``.
        num_context: M context tokens merged from the other patches (LLaVA-1.5 only; 0 = none).
        family: the checkpoint's ``model_type``: ``"llava"`` (LLaVA-1.5), ``"llava_next"``, ``"llava_onevision"``,
            ``"qwen2_5_vl"`` or ``"qwen3_vl"``.
        max_budget: LLaVA-1.5: the largest ``num_anchors + num_context`` a request may ask for; the engine
            reserves encoder cache and profiles for it. None = every patch (what the stock model needs).

    Returns:
        A JSON-serialisable dict: ``{"architectures": [...], "anchor_former": {...}}``.

    Raises:
        ValueError: an unknown ``family``, a budget that is not a positive int, ``num_context`` for a
            family without context tokens.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))} (the model_type), got {family!r}")
    _positive_int("num_context", num_context, minimum=0)
    if family != "llava" and num_context:
        raise ValueError(f"num_context (context tokens) is supported for family='llava' only, got {num_context}")
    if max_budget is not None:
        _positive_int("max_budget", max_budget)
    _positive_int("num_anchors", num_anchors)
    config = {"num_anchors": num_anchors, "num_context": num_context}
    extras: dict[str, Any] = {}
    score = "cls"
    if family in ("llava_next", "llava_onevision"):
        config.pop("num_context")
        extras["anyres"] = {"layout": "selected", "num_anchors": num_anchors, "image_budget": None}
    if family == "llava_onevision":  # SigLIP: no [CLS], the transformers adapter's default score
        if max_budget is not None:
            raise ValueError(f"max_budget is supported for family='llava' only, got {max_budget}")
        score = "received"
    if family in (
        "qwen2_5_vl",
        "qwen3_vl",
    ):  # the transformers adapter's record: no connector module, received attention
        if max_budget is not None:
            raise ValueError(f"max_budget is supported for family='llava' only, got {max_budget}")
        return {
            "architectures": [FAMILIES[family]],
            "anchor_former": AnchorSettings(connector="select", score="received", num_anchors=num_anchors).to_dict(),
        }
    if max_budget is not None:
        extras["max_budget"] = max_budget
    record = AnchorSettings(
        connector="select",
        connector_config=config,
        score=score,
        num_anchors=num_anchors,
        num_context=num_context,
        extras=extras,
    )
    return {"architectures": [FAMILIES[family]], "anchor_former": record.to_dict()}


def anchor_record(hf_config: Any) -> dict[str, Any]:
    """The anchor settings of a served model's hf config, as a plain dict (a copy).

    Accepts the dict the transformers adapters save (``config.anchor_former``), a JSON string of it, or
    any record object with ``to_dict()``.

    Raises:
        ValueError: the config has no anchor settings, or they name no connector.
    """
    record: Any = getattr(hf_config, "anchor_former", None)
    if hasattr(record, "to_dict"):
        record = record.to_dict()
    if isinstance(record, str):
        record = json.loads(record)
    if not isinstance(record, dict) or "connector" not in record:
        raise ValueError(
            "the model config must hold anchor settings (config.anchor_former with a 'connector'), got "
            f"{record!r}; serve a stock checkpoint with hf_overrides=anchor_former.vllm.hf_overrides(...) or a "
            "folder saved after attach_anchor_former"
        )
    settings = AnchorSettings.from_dict(json.loads(json.dumps(record)))  # any version this release reads
    config = dict(settings.connector_config)
    if settings.num_anchors is not None:
        config.setdefault("num_anchors", settings.num_anchors)
    if settings.num_context:
        config.setdefault("num_context", settings.num_context)
    # the serving classes read one flat view: connector, score, its arguments, and the family's extras
    return {
        "connector": settings.connector,
        "score": settings.score,
        "layer": settings.layer,
        "connector_config": config,
        **copy.deepcopy(settings.extras),
    }


def request_budget(kwargs: Any, default: dict[str, int]) -> dict[str, int]:
    """The budget of one request: ``default`` updated with the ``mm_processor_kwargs`` in ``kwargs``.

    Raises:
        ValueError: a budget value that is not an int (``num_anchors`` >= 1, ``num_context`` >= 0).
    """
    budget = dict(default)
    for key in BUDGET_KEYS:
        if key in kwargs and kwargs[key] is not None:
            budget[key] = _positive_int(f"mm_processor_kwargs[{key!r}]", kwargs[key], minimum=int(key == "num_anchors"))
    return budget


def field_rows(value: Any) -> list[list[int]]:
    """A batched per-image int field as python rows (vLLM passes a stacked tensor or a list of tensors)."""
    import torch

    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [[int(x) for x in row] for row in value.reshape(value.shape[0], -1).tolist()]
    return [row for item in value for row in field_rows(item if item.ndim > 1 else item[None])]


def saved_config_classes() -> tuple[type[PretrainedConfig], ...]:
    """The transformers config classes of folders saved by the package's adapters."""
    from anchor_former.adapters.hf.llava import AnchorFormerLlavaConfig
    from anchor_former.adapters.hf.llava_next import AnchorFormerLlavaNextConfig
    from anchor_former.adapters.hf.llava_onevision import AnchorFormerLlavaOnevisionConfig
    from anchor_former.adapters.hf.qwen_vl import AnchorFormerQwen2_5_VLConfig, AnchorFormerQwen3VLConfig

    return (
        AnchorFormerLlavaConfig,
        AnchorFormerLlavaNextConfig,
        AnchorFormerLlavaOnevisionConfig,
        AnchorFormerQwen2_5_VLConfig,
        AnchorFormerQwen3VLConfig,
    )
