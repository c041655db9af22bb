"""What a training run can check before it reads a single weight: the checkpoint's family and the connector.

``python -m anchor_former.train`` loads a multi-gigabyte checkpoint only after everything that can be
known from its ``config.json`` and the command line is checked (:mod:`anchor_former.data` checks the
data the same way):

* :func:`read_checkpoint` reads ``config.json`` alone (a local folder or a hub id; no weight file is
  opened) and tells the model family from its ``model_type``: LLaVA-1.5 (``llava``), LLaVA-NeXT
  (``llava_next``), LLaVA-OneVision (``llava_onevision``), or a folder this package wrote for one of them
  (``anchor_former_llava``, ``anchor_former_llava_next``, ``anchor_former_llava_onevision``). So a NeXT
  checkpoint is never loaded as LLaVA-1.5, and a Qwen-VL checkpoint (training-free only) is refused with
  the list of what trains.
* :func:`parse_connector_config` reads ``--connector_config``: a JSON object, each key once.
* :func:`check_connector` checks the connector name, every ``--connector_config`` key against the
  connector's constructor (unknown keys, keys that a flag already sets, value types), the anchor budget
  against one view's patch grid (``(image_size // patch_size)^2`` from ``vision_config``), and builds the
  connector on the ``meta`` device (no memory), so its own value checks run too.

Every error is a ``ValueError`` naming the flag (or key), the expected and the actual value, and the
``config.json`` it was read from.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAMILIES",
    "CheckpointInfo",
    "Family",
    "check_connector",
    "parse_connector_config",
    "read_checkpoint",
]


@dataclass(frozen=True)
class Family:
    """A trainable model family.

    Attributes:
        name: for messages (``"LLaVA-NeXT"``).
        model_type: the stock checkpoint's ``model_type`` (``"llava_next"``).
        attached_model_type: ``model_type`` of a folder this package wrote (``"anchor_former_llava_next"``).
        default_score: the anchor score when ``--score`` is not given (``"received"`` on OneVision's SigLIP,
            which has no [CLS]).
        aspect_ratios: accepted ``--image_aspect_ratio`` values, the default first.
    """

    name: str
    model_type: str
    attached_model_type: str
    default_score: str
    aspect_ratios: tuple[str, ...]

    @property
    def anyres(self) -> bool:
        """Images are several views (LLaVA-NeXT, OneVision): the token count depends on the image size."""
        return "anyres" in self.aspect_ratios


FAMILIES: tuple[Family, ...] = (
    Family("LLaVA-1.5", "llava", "anchor_former_llava", "cls", ("pad", "square")),
    Family("LLaVA-NeXT", "llava_next", "anchor_former_llava_next", "cls", ("anyres", "pad")),
    Family("LLaVA-OneVision", "llava_onevision", "anchor_former_llava_onevision", "received", ("anyres", "pad")),
)
_TRAINING_FREE = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
#: vision towers whose token 0 is [CLS] / that have none (anything else: the attach checks it after loading)
_CLS_TOWERS, _CLS_FREE_TOWERS = ("clip_vision_model",), ("siglip_vision_model", "siglip2_vision_model")


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``config.json`` says about a checkpoint.

    Attributes:
        path: ``--model_name_or_path``.
        family: its :class:`Family`.
        attached: the folder was written by this package (the connector settings are in its config).
        config: the full config (a ``transformers`` config of the stock family, defaults filled in).
        anchor_former: the recorded connector settings of an attached folder, else None.
        patches: P, patch tokens of one view (``(image_size // patch_size) ** 2``).
        has_cls: the vision tower's token 0 is [CLS]; None for a tower this module does not know.
    """

    path: str
    family: Family
    attached: bool
    config: Any
    anchor_former: dict | None
    patches: int
    has_cls: bool | None

    @property
    def vision_dim(self) -> int:
        return int(self.config.vision_config.hidden_size)

    @property
    def llm_dim(self) -> int:
        return int(self.config.text_config.hidden_size)


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.model_type!r})" for f in FAMILIES)


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """The family, patch grid and settings of the checkpoint at ``path``, from its ``config.json`` only.

    Raises:
        ValueError: no readable ``config.json``; a Qwen-VL checkpoint (training-free only) or any other
            ``model_type`` than the families in :data:`FAMILIES`; a ``vision_feature_layer`` that is a list.
    """
    from transformers import AutoConfig, PretrainedConfig

    path = os.fspath(path)
    try:
        raw, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model_name_or_path {path!r} must hold a config.json: {error}") from error
    model_type: Any = raw.get("model_type")  # whatever config.json holds
    if model_type in _TRAINING_FREE or str(model_type).removeprefix("anchor_former_") in _TRAINING_FREE:
        name = _TRAINING_FREE.get(model_type) or _TRAINING_FREE[str(model_type).removeprefix("anchor_former_")]
        raise ValueError(
            f"--model_name_or_path {path!r} is a {name} checkpoint (model_type {model_type!r}); {name} is "
            "training-free in this package (attach_anchor_former with connector='select', no training). "
            f"anchor_former.train trains connectors for: {_supported()}"
        )
    for family in FAMILIES:
        if model_type in (family.model_type, family.attached_model_type):
            break
    else:
        raise ValueError(
            f"--model_name_or_path {path!r} must be a checkpoint of one of {_supported()} or a folder this package "
            f"wrote for one, got model_type {model_type!r} in its config.json"
        )
    settings = raw.get("anchor_former")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "anchor_former", "architectures")}
    config = AutoConfig.for_model(family.model_type, **fields)
    vision = config.vision_config
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(
            f"config.vision_feature_layer of {path!r} must be a single int for AnchorFormer, got {layer!r}"
        )
    side = int(vision.image_size) // int(vision.patch_size)
    tower = getattr(vision, "model_type", None)
    has_cls = True if tower in _CLS_TOWERS else False if tower in _CLS_FREE_TOWERS else None
    attached = model_type == family.attached_model_type
    if attached and not (isinstance(settings, dict) and "connector" in settings):
        raise ValueError(
            f"config.json of {path!r} (model_type {model_type!r}) must record anchor_former settings with "
            f"a 'connector', got {settings!r}"
        )
    return CheckpointInfo(
        path=path,
        family=family,
        attached=attached,
        config=config,
        anchor_former=settings if attached else None,
        patches=side * side,
        has_cls=has_cls,
    )


def parse_connector_config(text: str | None) -> dict[str, Any]:
    """``--connector_config``: a JSON object of connector arguments, each key at most once.

    Raises:
        ValueError: not JSON, not an object, or a key given twice (JSON would silently keep the last).
    """
    if not text:
        return {}

    def once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(
                    f"--connector_config gives key {key!r} twice ({seen[key]!r} and {value!r}) in {text!r}"
                )
            seen[key] = value
        return seen

    try:
        value = json.loads(text, object_pairs_hook=once)
    except json.JSONDecodeError as error:
        raise ValueError(f"--connector_config must be a JSON object, got {text!r}: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"--connector_config must be a JSON object, got {text!r}")
    return value


#: connector arguments that flags or the model set; ``--connector_config`` may not repeat them
_SET_ELSEWHERE = {
    "num_anchors": "--num_anchors",
    "score": "--score",
    "connector": "--connector",
    "vision_dim": "the vision tower's hidden_size",
    "llm_dim": "the language model's hidden_size",
    "device": "the model's device",
    "dtype": "--torch_dtype",
}
_MLP_NAME = re.compile(r"^(linear|identity|mlp\d+x_gelu)$")


def _type_ok(value: Any, hint: Any) -> bool:
    """``value`` fits the annotation ``hint`` (int, float, bool, str, ``X | None``; bool is not an int)."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    return isinstance(hint, type) and isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_keys(connector: str, cls: type[Any], kwargs: dict[str, Any]) -> None:
    hints = typing.get_type_hints(cls.__init__)
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "vision_dim", "llm_dim")]
    allowed = [p for p in params if p not in _SET_ELSEWHERE and not (p == "projector" and _MLP_NAME.match(connector))]
    for key, value in kwargs.items():
        if key in _SET_ELSEWHERE:
            raise ValueError(
                f"--connector_config key {key!r} is set by {_SET_ELSEWHERE[key]}, not in --connector_config "
                f"(got {key}={value!r})"
            )
        if key not in allowed:
            raise ValueError(
                f"--connector_config key {key!r} is not an argument of connector {connector!r} "
                f"({cls.__name__}); its arguments: {', '.join(allowed)}"
            )
        hint = hints.get(key, Any)
        if not _type_ok(value, hint):
            raise ValueError(
                f"--connector_config key {key!r} of connector {connector!r} must be {_hint_name(hint)}, "
                f"got {value!r} ({type(value).__name__})"
            )


def check_connector(
    info: CheckpointInfo, *, connector: str, num_anchors: int, score: str, kwargs: dict[str, Any]
) -> None:
    """Check a connector choice against the checkpoint, before any weight is read.

    Args:
        info: from :func:`read_checkpoint`.
        connector: ``--connector``.
        num_anchors: ``--num_anchors`` (K anchors per view for ``"acformer"`` / ``"select"``).
        score: the anchor score (``--score`` or the family's default).
        kwargs: ``--connector_config`` (from :func:`parse_connector_config`).

    Raises:
        ValueError: unknown connector; a key the connector does not take, one a flag sets, or a value of the
            wrong type (named); ``num_anchors`` (+ ``num_context``) above the P patches of one view; a
            ``"cls"`` score on a tower without [CLS]; ``num_context`` on an anyres family; whatever the
            connector's own constructor or ``num_output_tokens`` refuses for these values (built on ``meta``).
    """
    from anchor_former import available_connectors, build_connector

    if connector not in available_connectors() and not re.match(r"^mlp\d+x_gelu$", str(connector)):
        raise ValueError(
            f"--connector must be one of {', '.join(available_connectors())} or mlp{{N}}x_gelu, got {connector!r}"
        )
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
        raise ValueError(f"--num_anchors must be an integer >= 1, got {num_anchors!r}")
    if score == "cls" and info.has_cls is False:
        raise ValueError(
            f"--score 'cls' needs a vision tower with a [CLS] token; {info.family.name}'s "
            f"{info.config.vision_config.model_type} has none (use 'received' or 'norm')"
        )
    probe = build_connector(connector, info.vision_dim, info.llm_dim, device="meta")
    _check_keys(connector, type(probe), kwargs)
    context = kwargs.get("num_context", 0) if connector == "select" else 0
    if context and info.family.anyres:
        raise ValueError(
            f"--connector_config num_context is not supported with {info.family.name} views, got {context}"
        )
    prefix = int(kwargs.get("num_prefix_tokens", 1 if info.has_cls else 0))
    side = int(info.config.vision_config.image_size) // int(info.config.vision_config.patch_size)
    where = (
        f"one view of {info.path!r} has {side}x{side} = {info.patches} patches (vision_config image_size "
        f"{info.config.vision_config.image_size} / patch_size {info.config.vision_config.patch_size})"
    )
    if connector in ("acformer", "select") and num_anchors + context > info.patches:
        what = "--num_anchors + num_context" if context else "--num_anchors"
        raise ValueError(f"{what} must be at most the patches of one view: {where}; got {num_anchors + context}")
    params = inspect.signature(type(probe).__init__).parameters
    derived = {
        "num_anchors": num_anchors,
        "num_prefix_tokens": prefix,
        # as the attach derives it: AcFormer queries with [CLS] when the score is the [CLS] row
        "include_cls": bool(info.has_cls) and score == "cls" and connector == "acformer",
    }
    built = {**{k: v for k, v in derived.items() if k in params}, **kwargs, "num_anchors": num_anchors}
    if "num_anchors" not in params:
        del built["num_anchors"]
    try:
        build_connector(connector, info.vision_dim, info.llm_dim, **built, device="meta").num_output_tokens(
            info.patches + prefix
        )
    except ValueError as error:
        raise ValueError(
            f"--connector {connector!r} with --connector_config {kwargs!r} and --num_anchors {num_anchors} "
            f"does not fit this checkpoint ({where}): {error}"
        ) from error
