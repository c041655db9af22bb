"""The anchor settings of ``--model_args`` and the checks every lmms-eval model of the package shares.

Imports neither lmms-eval's model modules nor transformers' models (only ``PretrainedConfig`` to read a
``config.json``), so the vLLM models do not need the transformers models' extra dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from anchor_former._optional import require

require("lmms_eval", extra="eval", feature="anchor_former.eval (lmms-eval models)")

from lmms_eval.utils import simple_parse_args_string

__all__ = ["AnchorArgs"]

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


def _resolve(
    owner: str,
    pretrained: str,
    revision: str | None,
    args: AnchorArgs,
    options: dict[str, tuple[str, ...]],
    *,
    name: str = "pretrained",
) -> tuple[str, bool]:
    """``(family, saved)`` of the checkpoint ``pretrained`` for the lmms-eval model ``owner``, the settings checked.

    ``family`` is the stock ``model_type`` (a key of ``options``, whose values are the :class:`AnchorArgs`
    fields that family takes); ``saved``: the folder was saved attached (``model_type`` ``anchor_former_*``),
    so it takes no settings. Reads ``config.json`` only, nothing is loaded.

    Raises:
        ValueError: another family; settings for a saved folder; no ``num_anchors`` for a stock checkpoint;
            a setting the family does not take; a fraction for a family that counts tokens.
    """
    config = _config_dict(pretrained, revision)
    model_type = str(config.get("model_type", ""))
    saved = model_type.startswith(_PREFIX)
    family = model_type.removeprefix(_PREFIX)
    if family not in options:
        raise ValueError(
            f"{name} must be a checkpoint of {', '.join(options)} (config.json model_type, or {_PREFIX}<type> when "
            f"saved attached) for {owner}, got model_type {model_type!r} at {pretrained!r}"
        )
    if saved:
        if args.given():
            raise ValueError(
                f"{', '.join(args.given())} must not be given for a checkpoint saved attached ({pretrained!r} "
                f"records {config.get('anchor_former')!r}); it is evaluated as saved, pass {name} only"
            )
        return family, saved
    if args.num_anchors is None:
        raise ValueError(
            f"num_anchors must be given for the stock checkpoint {pretrained!r} (model_type {model_type!r}), "
            "e.g. num_anchors=144; got none"
        )
    for field_name in args.given():
        if field_name not in options[family]:
            raise ValueError(
                f"{field_name} is not a setting of {family} (it takes {', '.join(options[family])}), got "
                f"{field_name}={getattr(args, field_name)!r}"
            )
    if not family.startswith("qwen") and isinstance(args.num_anchors, float):
        raise ValueError(f"num_anchors must be an integer >= 1 for {family}, got {args.num_anchors!r}")
    return family, saved


class _CommandLineArgs:
    """lmms-eval's constructor from ``--model_args``, refusing an argument given twice with two values."""

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
