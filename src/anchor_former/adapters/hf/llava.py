"""transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5; transformers >= 5.0; tested with 5.24.0).

:func:`attach_anchor_former` turns a built ``LlavaForConditionalGeneration`` into an
:class:`AnchorFormerLlavaForConditionalGeneration` in place (same object, same vision tower and
language model, no copy):

* ``model.model.multi_modal_projector`` becomes the connector (:class:`~anchor_former.AnchorFormer`
  by default; :class:`~anchor_former.SelectConnector` for the training-free ``connector="select"``); its
  output MLP is initialised from the existing ``linear_1`` / ``linear_2`` (for ``"select"`` that IS the
  model's trained projector, so the reduced model needs no training);
* image-feature extraction (``get_image_features``) runs the vision tower ONCE, as configured (SDPA by
  default, no ``output_attentions``), inside an :class:`~anchor_former.probes.AttentionProbe` that
  captures the ``vision_feature_layer`` tokens ([CLS] included) and that layer's [CLS] attention row;
  the connector gets both as arguments and returns ``num_anchors + 1`` tokens per image. The probe is
  built per call and that step runs under a lock of the vision tower and eagerly under
  ``torch.compile`` (:mod:`anchor_former.adapters._probed`), so threads sharing the model and
  ``torch.compile(model)`` work;
* the config becomes an :class:`AnchorFormerLlavaConfig` (``model_type = "anchor_former_llava"``) whose
  ``anchor_former`` entry records the connector and its settings, so ``save_pretrained`` /
  ``AnchorFormerLlavaForConditionalGeneration.from_pretrained`` (or ``AutoModelForImageTextToText`` after
  :func:`register_auto_classes`) round-trip the model, also in transformers' legacy LLaVA key layout (the
  key conversions of ``llava`` are registered for this model type at import);
* the processor, if given, expands each ``<image>`` to ``num_anchors + 1`` tokens, so transformers'
  check that image tokens match image features passes.

``vision_feature_select_strategy`` no longer applies: the connector receives all tokens and documents
which it consumes. Only single-layer ``vision_feature_layer`` (an int) is supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from anchor_former.adapters._anchors import anchor_kwargs
from anchor_former.adapters._probed import probed_forward
from anchor_former.probes import AttentionProbe, Score, detect_encoder

try:  # transformers >= 5: ``return_dict=False`` support for get_image_features
    from transformers.utils.generic import can_return_tuple
except ImportError:  # pragma: no cover - older transformers are refused by attach_anchor_former
    def can_return_tuple(func):  # type: ignore[no-redef]
        return func

__all__ = [
    "AnchorFormerLlavaConfig",
    "AnchorFormerLlavaForConditionalGeneration",
    "AnchorFormerLlavaModel",
    "attach_anchor_former",
    "register_auto_classes",
]


@strict
class AnchorFormerLlavaConfig(LlavaConfig):
    """``LlavaConfig`` plus ``anchor_former``: ``{"connector": name, "score": "cls"|"norm"|"map",
    "connector_config": {...}}`` (the connector's constructor arguments, ``vision_dim``/``llm_dim``
    excluded: they come from the vision and text configs)."""

    model_type = "anchor_former_llava"

    anchor_former: dict | None = None


_MLP_NAMES = re.compile(r"^(linear|identity|mlp\d+x_gelu)$")


def _constructor_kwargs(connector: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as keyword arguments of ``build_connector(connector, vision_dim, llm_dim, ...)``.

    The widths come from the model's configs; for the MLP connectors (``linear``, ``identity``,
    ``mlp{N}x_gelu``) the name IS the ``projector`` argument, so a recorded ``projector`` is dropped
    (folders saved before this rule record it, and passing it twice was a ``TypeError``).
    """
    kwargs = {k: v for k, v in settings.items() if k not in ("vision_dim", "llm_dim")}
    if _MLP_NAMES.match(str(connector)):
        kwargs.pop("projector", None)
    return kwargs


def _build_connector(config: AnchorFormerLlavaConfig, **dd: Any) -> nn.Module:
    from anchor_former.connectors.registry import build_connector

    settings = config.anchor_former or {}
    if "connector" not in settings:
        raise ValueError(
            "config.anchor_former must name the connector ({'connector': 'acformer', 'score': 'cls', "
            f"'connector_config': {{...}}}}), got {settings!r}; build the model with attach_anchor_former"
        )
    name = settings["connector"]
    kwargs = _constructor_kwargs(name, dict(settings.get("connector_config") or {}))
    return build_connector(
        name, int(config.vision_config.hidden_size), int(config.text_config.hidden_size), **kwargs, **dd
    )


class AnchorFormerLlavaModel(LlavaModel):
    """``LlavaModel`` whose projector is a connector fed by a probe during image-feature extraction."""

    config_class = AnchorFormerLlavaConfig
    config: AnchorFormerLlavaConfig

    def __init__(self, config: AnchorFormerLlavaConfig) -> None:
        super().__init__(config)
        self.multi_modal_projector = _build_connector(config)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Vision tower + probe + connector.

        Args:
            pixel_values: ``(B, C, H_img, W_img)`` images.
            vision_feature_layer: ``hidden_states`` index of the layer the connector reads (default:
                ``config.vision_feature_layer``); the [CLS] attention row of that same layer gives the anchors.
            vision_feature_select_strategy: ignored; the connector receives all tokens.
            image_sizes: accepted for signature compatibility; every image gives the same number of tokens.

        Returns:
            The vision tower's output with ``pooler_output`` = a list of B tensors ``(T, llm_dim)``,
            T = ``num_anchors + 1`` for AcFormer.
        """
        kwargs.pop("return_dict", None)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"vision_feature_layer must be a single int for AnchorFormer, got {layer!r}")
        score = (self.config.anchor_former or {}).get("score", "cls")
        tower = self.vision_tower
        image_outputs, probe = probed_forward(
            tower, lambda: tower(pixel_values, return_dict=True, **kwargs), layer=layer, score=score
        )
        connector = self.multi_modal_projector
        if getattr(connector, "uses_anchors", False):
            tokens = connector(probe.features, attention=probe.scores)  # (B, T, llm_dim)
        else:
            tokens = connector(probe.features)
        image_outputs.pooler_output = list(tokens)
        return image_outputs


class AnchorFormerLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with an :class:`AnchorFormerLlavaModel` inside."""

    config_class = AnchorFormerLlavaConfig
    config: AnchorFormerLlavaConfig

    def __init__(self, config: AnchorFormerLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = AnchorFormerLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def register_auto_classes() -> None:
    """Register the classes with ``AutoConfig``, ``AutoModel`` and ``AutoModelForImageTextToText``
    (idempotent), so ``AutoModelForImageTextToText.from_pretrained(saved_dir)`` rebuilds the model."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    AutoConfig.register(AnchorFormerLlavaConfig.model_type, AnchorFormerLlavaConfig, exist_ok=True)
    AutoModel.register(AnchorFormerLlavaConfig, AnchorFormerLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        AnchorFormerLlavaConfig, AnchorFormerLlavaForConditionalGeneration, exist_ok=True
    )


def _register_key_conversions() -> None:
    """Load legacy-layout LLaVA weights into the package's model type, as transformers does for ``llava``.

    transformers 5 renames the keys of older LLaVA checkpoints at load (``language_model.model.*`` →
    ``model.language_model.*``, ``language_model.lm_head`` → ``lm_head``, ...), registered per model type
    (``"llava"``) and class (``"LlavaModel"``), and writes those old names again when a model that was
    loaded that way is saved. Without the same rules for ``"anchor_former_llava"`` /
    ``AnchorFormerLlavaModel``, reloading such a folder would leave the language model and ``lm_head``
    randomly initialised. Registered once, at import of this module (which loading the class implies).
    """
    from transformers import conversion_mapping as mapping

    for ours, theirs in ((AnchorFormerLlavaConfig.model_type, "llava"), (AnchorFormerLlavaModel.__name__, "LlavaModel")):
        rules = mapping.get_checkpoint_conversion_mapping(theirs)
        if rules is not None:
            mapping.register_checkpoint_conversion_mapping(ours, rules, overwrite=True)


_register_key_conversions()


def _llava_model(model: nn.Module) -> LlavaModel:
    inner = getattr(model, "model", None)
    if not isinstance(model, LlavaForConditionalGeneration) or not isinstance(inner, LlavaModel):
        raise ValueError(
            "model must be a transformers LlavaForConditionalGeneration (transformers >= 5.0, which keeps the "
            "projector at model.model.multi_modal_projector), got "
            f"{type(model).__module__}.{type(model).__qualname__}; for the original LLaVA code use "
            "anchor_former.adapters.llava.attach_anchor_former"
        )
    if not hasattr(inner, "multi_modal_projector") or not hasattr(inner, "get_image_features"):
        raise ValueError("this transformers version's LlavaModel has no multi_modal_projector/get_image_features")
    return inner


def _projector_mlp(projector: nn.Module, config: LlavaConfig) -> dict[str, torch.Tensor]:
    """transformers' ``LlavaMultiModalProjector`` as LLaVA ``mlp2x_gelu`` keys ``0.*`` / ``2.*``."""
    act = getattr(config, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(
            f"init_projector needs projector_hidden_act='gelu' (LLaVA's mlp2x_gelu), got {act!r}; "
            "pass init_projector=False"
        )
    state = {}
    for index, linear in ((0, projector.linear_1), (2, projector.linear_2)):
        state[f"{index}.weight"] = linear.weight
        # a bias-free linear is the same map as one with a zero bias
        state[f"{index}.bias"] = linear.bias if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])
    return state


def _check_select_source(projector: nn.Module, config: LlavaConfig, init_projector: bool) -> None:
    """``connector="select"`` reuses the model's trained projector: it must be LLaVA's ``mlp2x_gelu``."""
    if not init_projector:
        raise ValueError(
            "connector='select' maps the kept tokens with the model's own trained projector; init_projector=False "
            "would leave it random"
        )
    if not (isinstance(getattr(projector, "linear_1", None), nn.Linear)
            and isinstance(getattr(projector, "linear_2", None), nn.Linear)):
        raise ValueError(
            "connector='select' needs the model's projector to be transformers' LlavaMultiModalProjector "
            f"(linear_1, GELU, linear_2 = LLaVA's mlp2x_gelu), got {type(projector).__name__}"
        )
    act = getattr(config, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"connector='select' needs projector_hidden_act='gelu' (LLaVA's mlp2x_gelu), got {act!r}")


def _expand_processor(processor: Any, num_tokens: int, patch_size: int) -> None:
    """Make ``processor`` write ``num_tokens`` image tokens per ``<image>``.

    transformers' ``LlavaProcessor`` writes ``(H // patch_size) * (W // patch_size) +
    num_additional_image_tokens - (strategy == "default")`` tokens for a ``(H, W)`` image; for the fixed
    crop size of CLIP processors we set ``num_additional_image_tokens`` so that this equals
    ``num_tokens`` (a negative value), which ``LlavaProcessor.from_pretrained`` restores without this
    package. The result is checked on a blank image of the crop size.
    """
    import numpy as np

    for name in ("num_additional_image_tokens", "patch_size", "image_processor", "image_token"):
        if not hasattr(processor, name):
            raise ValueError(
                f"processor must be a transformers LlavaProcessor (with {name}), got {type(processor).__name__}"
            )
    crop = getattr(processor.image_processor, "crop_size", None) or getattr(processor.image_processor, "size", None)
    crop = dict(crop) if crop is not None else {}
    if "height" not in crop or "width" not in crop:
        raise ValueError(f"processor.image_processor needs a fixed crop_size {{'height', 'width'}}, got {crop!r}")
    height, width = int(crop["height"]), int(crop["width"])
    saved = (processor.patch_size, processor.num_additional_image_tokens)
    if processor.patch_size is None:
        processor.patch_size = patch_size
    patches = (height // processor.patch_size) * (width // processor.patch_size)
    default = processor.vision_feature_select_strategy == "default"
    processor.num_additional_image_tokens = num_tokens - patches + int(default)
    blank = np.zeros((height, width, 3), dtype=np.uint8)
    try:
        ids = processor(text=processor.image_token, images=blank, return_tensors="pt")["input_ids"]
        got = int((ids == processor.image_token_id).sum())
    except Exception:
        processor.patch_size, processor.num_additional_image_tokens = saved
        raise
    if got != num_tokens:
        processor.patch_size, processor.num_additional_image_tokens = saved
        raise ValueError(
            f"could not make {type(processor).__name__} expand <image> to {num_tokens} tokens (it wrote {got}); "
            "this transformers version's processor counts image tokens differently"
        )


@dataclass(frozen=True)
class _Plan:
    """What :func:`attach_anchor_former` checked and will build (nothing is changed while planning)."""

    inner: LlavaModel
    connector: str
    score: str
    kwargs: dict[str, Any]  # the connector's constructor arguments (widths excluded)
    num_input_tokens: int  # tokens of the probed layer per image, prefix tokens included
    patch_size: int
    previous: nn.Module | None  # the connector of an already attached model, whose weights carry over
    init_projector: bool


def _plan(model: nn.Module, *, num_anchors: int, connector: str, score: str, init_projector: bool,
          kwargs: dict[str, Any]) -> _Plan:
    """Validate the arguments against ``model``; raises ``ValueError`` before anything changes."""
    from anchor_former.connectors.registry import available_connectors

    inner = _llava_model(model)
    old = model.config
    layer = old.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"config.vision_feature_layer must be a single int for AnchorFormer, got {layer!r}")
    if connector not in available_connectors() and not re.match(r"^mlp\d+x_gelu$", str(connector)):
        raise ValueError(f"connector must be one of {', '.join(available_connectors())}, got {connector!r}")
    previous = None
    if isinstance(model, AnchorFormerLlavaForConditionalGeneration):
        recorded = old.anchor_former or {}
        if recorded.get("connector") != connector:
            raise ValueError(
                f"connector must stay {recorded.get('connector')!r} when re-attaching (the model is already "
                f"attached, and its connector's weights carry over), got {connector!r}; to switch connectors, "
                "attach to a stock LlavaForConditionalGeneration (from_pretrained of the base model) instead"
            )
        # keep the recorded include_cls unless the score changes (acformer derives it from the score)
        recompute = ("num_anchors",) + (("include_cls",) if score != recorded.get("score", score) else ())
        inherited = {k: v for k, v in (recorded.get("connector_config") or {}).items() if k not in recompute}
        kwargs = {**_constructor_kwargs(connector, inherited), **kwargs}
        previous = inner.multi_modal_projector
    AttentionProbe(inner.vision_tower, layer=layer, score=score)  # unsupported tower, bad layer, CLS-less + "cls"
    spec = detect_encoder(inner.vision_tower)
    vision = old.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    strategy = getattr(old, "vision_feature_select_strategy", "default")
    kwargs = anchor_kwargs(connector, num_anchors, side * side, kwargs, has_cls=spec.has_cls, score=score,
                           stock_cls=strategy == "full")
    if connector == "select" and previous is None:
        _check_select_source(inner.multi_modal_projector, old, init_projector)
    kwargs.setdefault("num_prefix_tokens", spec.num_prefix_tokens)
    return _Plan(inner=inner, connector=connector, score=score, kwargs=kwargs,
                 num_input_tokens=side * side + spec.num_prefix_tokens, patch_size=int(vision.patch_size),
                 previous=previous, init_projector=init_projector)


def _build(plan: _Plan, config: LlavaConfig) -> nn.Module:
    """The new connector on the old projector's device and dtype, with its starting weights: the
    previous connector's (re-attach), else the model's ``linear_1`` / ``linear_2`` (``init_projector``)."""
    from anchor_former.checkpoint import CheckpointError, load_checked
    from anchor_former.connectors.registry import build_connector

    old_projector = plan.inner.multi_modal_projector
    param = next(iter(old_projector.parameters()), None)
    param = param if param is not None else next(iter(plan.inner.parameters()))
    new = build_connector(plan.connector, int(config.vision_config.hidden_size), int(config.text_config.hidden_size),
                          **plan.kwargs, device=param.device, dtype=param.dtype)
    if plan.previous is not None:
        try:
            load_checked(new, plan.previous.state_dict(), what="the attached connector")
        except CheckpointError as error:
            raise ValueError(
                f"re-attaching keeps the attached connector's weights, so its architecture must stay the same: "
                f"{error}; to change it, attach to a stock LlavaForConditionalGeneration instead"
            ) from error
    elif plan.init_projector and hasattr(old_projector, "linear_1"):
        target = getattr(new, "projector", None)
        if target is None:
            raise ValueError(f"connector {plan.connector!r} has no output MLP to initialise; pass init_projector=False")
        load_checked(target, _projector_mlp(old_projector, config), what="the model's multi_modal_projector")
    return new


def _swap(model: nn.Module, plan: _Plan, new: nn.Module, num_tokens: int) -> None:
    """Install ``new`` and the :class:`AnchorFormerLlavaConfig` recording it (every check has passed)."""
    old = model.config
    settings = new.config.to_dict() if hasattr(getattr(new, "config", None), "to_dict") else dict(plan.kwargs)
    settings = _constructor_kwargs(plan.connector, settings)
    data = {k: v for k, v in old.to_dict().items() if k not in ("model_type", "anchor_former")}
    data["image_seq_length"] = num_tokens
    config = AnchorFormerLlavaConfig(
        **data, anchor_former={"connector": plan.connector, "score": plan.score, "connector_config": settings}
    )
    config.vision_config, config.text_config = old.vision_config, old.text_config  # the submodules' own objects
    model.__class__ = AnchorFormerLlavaForConditionalGeneration
    plan.inner.__class__ = AnchorFormerLlavaModel
    model.config = plan.inner.config = config
    plan.inner.multi_modal_projector = new


def attach_anchor_former(
    model: nn.Module,
    processor: Any = None,
    *,
    num_anchors: int = 144,
    connector: str = "acformer",
    score: Score = "cls",
    init_projector: bool = True,
    **kwargs: Any,
) -> AnchorFormerLlavaForConditionalGeneration:
    """Switch a ``LlavaForConditionalGeneration`` (and its processor) to AcFormer in place; returns it.

    Args:
        model: a built ``LlavaForConditionalGeneration`` (e.g. ``from_pretrained("llava-hf/llava-1.5-7b-hf")``),
            or one already attached (re-attach, see below).
        processor: its ``LlavaProcessor``; changed so each ``<image>`` becomes ``num_anchors + 1`` tokens
            (or the connector's token count). Without it, prepare ``input_ids`` with that many image tokens.
        num_anchors: K anchors. ``connector="acformer"``: the LLM sees K + 1 tokens per image ([CLS] first);
            ``"select"``: K anchor patches (plus ``num_context``). Ignored by the other connectors.
        connector: a :func:`~anchor_former.build_connector` name: ``"acformer"`` (trained AcFormer),
            ``"select"`` (training-free: the K anchor patches through the model's own projector, no new
            parameters; pass ``num_context=M`` for M merged context tokens, ``include_cls=True`` to keep
            [CLS] first, default: only with ``vision_feature_select_strategy="full"``), ``"perceiver"``, ...
        score: ``"cls"`` ([CLS] attention of ``vision_feature_layer``), ``"norm"`` (token norms, any
            encoder) or ``"map"`` (SigLIP's pooling head).
        init_projector: copy ``linear_1`` / ``linear_2`` into the connector's output MLP (``mlp2x_gelu``).
        **kwargs: further connector arguments (``depth``, ``heads``, ``dim_head``, ...).

    Re-attaching (``model`` already attached, e.g. to change ``num_anchors``) keeps the connector: the
    same ``connector`` name is required, every weight of the attached connector carries over unchanged
    (none depends on K), connector arguments not passed keep their recorded values, and
    ``init_projector`` does not apply.

    Raises:
        ValueError: not a ``LlavaForConditionalGeneration``; ``vision_feature_layer`` a list; unsupported
            vision tower, or one without [CLS] with ``score="cls"``; ``num_anchors`` (+ ``num_context``)
            larger than the patch count; unknown connector; ``"select"`` on a projector that is not LLaVA's
            ``mlp2x_gelu``; a processor this version cannot make expand correctly; on re-attach, another
            connector name or arguments that change the connector's weight shapes. The model and the
            processor are unchanged then.
    """
    plan = _plan(model, num_anchors=num_anchors, connector=connector, score=score, init_projector=init_projector,
                 kwargs=kwargs)
    new = _build(plan, model.config)
    num_tokens = new.num_output_tokens(plan.num_input_tokens)
    if processor is not None:
        _expand_processor(processor, num_tokens, plan.patch_size)
    _swap(model, plan, new, num_tokens)
    return model
