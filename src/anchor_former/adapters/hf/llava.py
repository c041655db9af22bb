"""transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5; transformers >= 5.0; tested with 5.24.0).

:func:`attach_anchor_former` turns a built ``LlavaForConditionalGeneration`` into an
:class:`AnchorFormerLlavaForConditionalGeneration` in place (same object, same vision tower and
language model, no copy):

* ``model.model.multi_modal_projector`` becomes the connector (:class:`~anchor_former.AnchorFormer`
  by default; :class:`~anchor_former.connectors.SelectConnector` for the training-free ``connector="select"``); its
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
  ``anchor_former`` entry is the :class:`~anchor_former.adapters.settings.AnchorSettings` record, so ``save_pretrained`` /
  ``AnchorFormerLlavaForConditionalGeneration.from_pretrained`` (or ``AutoModelForImageTextToText`` after
  :func:`register_auto_classes`) round-trip the model, also in transformers' legacy LLaVA key layout (the
  key conversions of ``llava`` are registered for this model type at import);
* the processor, if given, expands each ``<image>`` to ``num_anchors + 1`` tokens, so transformers'
  check that image tokens match image features passes;
* ``get_image_features`` returns :class:`~anchor_former.adapters.hf._base.AnchorImageOutput`, whose
  ``kept_indices`` are each image's anchor token indices (what
  :func:`~anchor_former.adapters.transformers.kept_tokens` returns).

The steps are the shared pipeline of :mod:`anchor_former.adapters._host`; :class:`LlavaHost` holds what this
family supplies, and the LLaVA-NeXT and OneVision hosts derive from it.

``vision_feature_select_strategy`` no longer applies: the connector receives all tokens and documents
which it consumes. Only single-layer ``vision_feature_layer`` (an int) is supported.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.utils.generic import can_return_tuple

from anchor_former.adapters._anchors import anchor_kwargs
from anchor_former.adapters._host import Plan, attach, merge_recorded
from anchor_former.adapters._probed import probed_forward
from anchor_former.adapters.hf._base import AnchorImageOutput, TransformersHost
from anchor_former.adapters.settings import AnchorSettings, normalise
from anchor_former.probes import AttentionProbe, EncoderSpec, Score, detect_encoder

if TYPE_CHECKING:
    from anchor_former.connectors import Connector

__all__ = [
    "AnchorFormerLlavaConfig",
    "AnchorFormerLlavaForConditionalGeneration",
    "AnchorFormerLlavaModel",
    "attach_anchor_former",
    "register_auto_classes",
]


@strict
class AnchorFormerLlavaConfig(LlavaConfig):
    """``LlavaConfig`` plus ``anchor_former``: the :class:`~anchor_former.adapters.settings.AnchorSettings`
    record as a dict (the connector, its constructor arguments, score, layer and budget)."""

    model_type = "anchor_former_llava"

    anchor_former: dict | None = None


_MLP_NAMES = re.compile(r"^(linear|identity|mlp\d+x_gelu)$")


def constructor_kwargs(connector: str, config: dict[str, Any]) -> dict[str, Any]:
    """A connector's recorded config as keyword arguments of ``build_connector(connector, vision_dim,
    llm_dim, ...)``: the widths come from the model's configs; for the MLP connectors (``linear``,
    ``identity``, ``mlp{N}x_gelu``) the name IS the ``projector`` argument, so a recorded one is dropped."""
    kwargs = {k: v for k, v in config.items() if k not in ("vision_dim", "llm_dim")}
    if _MLP_NAMES.match(str(connector)):
        kwargs.pop("projector", None)
    return kwargs


def recorded_connector(config: Any, **dd: Any) -> nn.Module:
    """The connector ``config.anchor_former`` records, freshly built (``from_pretrained`` then loads its weights);
    the record is normalised to the current version on the way."""
    from anchor_former.connectors import build_connector

    settings = AnchorSettings.from_dict(normalise(config))
    return build_connector(
        settings.connector,
        int(config.vision_config.hidden_size),
        int(config.text_config.hidden_size),
        **constructor_kwargs(settings.connector, settings.connector_config),
        **dd,
    )


def single_layer(layer: Any, name: str = "vision_feature_layer") -> int:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"{name} must be a single int for AnchorFormer, got {layer!r}")
    return layer


def run_connector(
    connector: nn.Module, features: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens (B, T, llm_dim), anchor indices (B, K) or None)`` of ``connector`` on one probed forward.

    Connectors with anchors get them explicitly (their own :class:`~anchor_former.AnchorSearch` on the
    probe's scores), so the indices are returned as data, not read back from the module.
    """
    if not getattr(connector, "uses_anchors", False):
        return connector(features), None
    from anchor_former.search import cls_scores

    anchored: Any = connector  # an anchored connector: num_prefix_tokens and search
    scores = cls_scores(
        scores if scores.ndim == 3 else scores[:, None], num_prefix_tokens=anchored.num_prefix_tokens, layout="b h n"
    )
    idx = anchored.search(scores, layout="b h n")  # (B, K) or (B, K + 1) with [CLS] first
    return connector(features, idx), idx


def probed_features(
    self: Any, pixel_values: torch.Tensor, layer: Any, **kwargs: Any
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One tower forward over ``(M, C, H_img, W_img)`` views: ``(output, features (M, N, D), scores)``."""
    kwargs.pop("return_dict", None)
    layer = single_layer(self.config.vision_feature_layer if layer is None else layer)
    tower = self.vision_tower
    score = self.config.anchor_former["score"]  # a plain dict read (normalised at build): traceable
    output, probe = probed_forward(
        tower, lambda: tower(pixel_values, return_dict=True, **kwargs), layer=layer, score=score
    )
    return output, probe.features, probe.scores


class AnchorFormerLlavaModel(LlavaModel):
    """``LlavaModel`` whose projector is a connector fed by a probe during image-feature extraction."""

    config_class = AnchorFormerLlavaConfig
    config: AnchorFormerLlavaConfig

    def __init__(self, config: AnchorFormerLlavaConfig) -> None:
        super().__init__(config)
        self.multi_modal_projector = recorded_connector(config)  # type: ignore[assignment]  # a connector

    _probed = probed_features

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> AnchorImageOutput:
        """Vision tower + probe + connector.

        Args:
            pixel_values: ``(B, C, H_img, W_img)`` images.
            vision_feature_layer: ``hidden_states`` index of the layer the connector reads (default:
                ``config.vision_feature_layer``); the anchor scores come from that same layer.
            vision_feature_select_strategy: ignored; the connector receives all tokens.
            image_sizes: accepted for signature compatibility; every image gives the same number of tokens.

        Returns:
            :class:`~anchor_former.adapters.hf._base.AnchorImageOutput`: ``pooler_output`` a list of B tensors
            ``(T, llm_dim)`` (T = ``num_anchors + 1`` for AcFormer); ``kept_indices`` B tensors ``(K,)`` (or
            ``(K + 1,)`` with [CLS] first): the anchors' indices among the tower's tokens ([CLS] = 0, patch
            ``(r, c)`` = ``1 + r * side + c``), None for connectors without anchors.
        """
        output, features, scores = self._probed(pixel_values, vision_feature_layer, **kwargs)
        tokens, idx = run_connector(self.multi_modal_projector, features, scores)
        return AnchorImageOutput(
            last_hidden_state=output.last_hidden_state,
            hidden_states=output.hidden_states,
            attentions=output.attentions,
            pooler_output=list(tokens),
            kept_indices=None if idx is None else tuple(idx),
        )


class AnchorFormerLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with an :class:`AnchorFormerLlavaModel` inside."""

    config_class = AnchorFormerLlavaConfig
    config: AnchorFormerLlavaConfig

    def __init__(self, config: AnchorFormerLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = AnchorFormerLlavaModel(config)
        text: Any = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()


def projector_mlp(projector: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """transformers' ``LlavaMultiModalProjector`` as LLaVA ``mlp2x_gelu`` keys ``0.*`` / ``2.*``."""
    act = getattr(config, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(
            f"init_projector needs projector_hidden_act='gelu' (LLaVA's mlp2x_gelu), got {act!r}; "
            "pass init_projector=False"
        )
    state: dict[str, torch.Tensor] = {}
    linears = cast("tuple[nn.Linear, nn.Linear]", (projector.linear_1, projector.linear_2))
    for index, linear in ((0, linears[0]), (2, linears[1])):
        state[f"{index}.weight"] = linear.weight
        # a bias-free linear is the same map as one with a zero bias
        state[f"{index}.bias"] = linear.bias if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])
    return state


def check_select_source(projector: nn.Module, config: Any, init_projector: bool) -> None:
    """``connector="select"`` reuses the model's trained projector: it must be LLaVA's ``mlp2x_gelu``."""
    if not init_projector:
        raise ValueError(
            "connector='select' maps the kept tokens with the model's own trained projector; init_projector=False "
            "would leave it random"
        )
    if not (
        isinstance(getattr(projector, "linear_1", None), nn.Linear)
        and isinstance(getattr(projector, "linear_2", None), nn.Linear)
    ):
        raise ValueError(
            "connector='select' needs the model's projector to be transformers' LlavaMultiModalProjector "
            f"(linear_1, GELU, linear_2 = LLaVA's mlp2x_gelu), got {type(projector).__name__}"
        )
    act = getattr(config, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"connector='select' needs projector_hidden_act='gelu' (LLaVA's mlp2x_gelu), got {act!r}")


def _expand_processor(processor: Any, num_tokens: int, patch_size: int) -> None:
    """Make ``processor`` write ``num_tokens`` image tokens per ``<image>`` (rolled back by the pipeline).

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
    if processor.patch_size is None:
        processor.patch_size = patch_size
    patches = (height // processor.patch_size) * (width // processor.patch_size)
    default = processor.vision_feature_select_strategy == "default"
    processor.num_additional_image_tokens = num_tokens - patches + int(default)
    blank = np.zeros((height, width, 3), dtype=np.uint8)
    ids = processor(text=processor.image_token, images=blank, return_tensors="pt")["input_ids"]
    got = int((ids == processor.image_token_id).sum())
    if got != num_tokens:
        raise ValueError(
            f"could not make {type(processor).__name__} expand <image> to {num_tokens} tokens (it wrote {got}); "
            "this transformers version's processor counts image tokens differently"
        )


class LlavaHost(TransformersHost):
    """LLaVA-1.5's steps of the attach pipeline; the LLaVA-NeXT and OneVision hosts derive from it.

    What a derived family overrides: :attr:`classes`, the defaults, :meth:`family_options` (its own
    keyword arguments), :meth:`check_tower` (its strategy rules), :meth:`check_processor`,
    :meth:`extras`, :meth:`switch_processor`.
    """

    name = "LlavaForConditionalGeneration"
    classes: ClassVar[dict[type, tuple[type, type, type]]] = {
        LlavaForConditionalGeneration: (
            AnchorFormerLlavaConfig,
            AnchorFormerLlavaModel,
            AnchorFormerLlavaForConditionalGeneration,
        ),
    }
    default_connector: ClassVar[str] = "acformer"
    default_score: ClassVar[Score] = "cls"

    def check_model(self, model: nn.Module) -> None:
        if self.stock_of(model) is None:
            raise ValueError(
                f"model must be a transformers {self.name} (transformers >= 5.0, which keeps the projector at "
                f"model.model.multi_modal_projector), got {type(model).__module__}.{type(model).__qualname__}; for "
                "the original LLaVA code use anchor_former.adapters.llava.attach_anchor_former"
            )

    # --- what the derived families override ---------------------------------------------------------

    def family_options(self, model: nn.Module, connector: str, request: dict[str, Any]) -> dict[str, Any]:
        """Pop and check this family's own arguments from ``request``; they go to ``AnchorSettings.extras``."""
        return {}

    def check_tower(self, model: nn.Module, spec: EncoderSpec, kwargs: dict[str, Any]) -> bool:
        """Family rules on the tower / strategy; returns ``stock_cls`` (the stock model fed [CLS] to its
        projector, so ``"select"`` keeps it at full budget)."""
        return getattr(model.config, "vision_feature_select_strategy", "default") == "full"

    def check_processor(self, processor: Any, model: nn.Module, spec: EncoderSpec) -> None:
        """Raise ``ValueError`` if ``processor`` cannot belong to ``model`` (checked before anything changes)."""

    def extras(self, model: nn.Module, plan: Plan, connector: nn.Module) -> dict[str, Any]:
        """``AnchorSettings.extras`` of the attached model (token layouts, family options)."""
        return dict(plan.data["options"])

    # --- the pipeline steps --------------------------------------------------------------------------

    def plan(self, model: nn.Module, processor: Any, request: dict[str, Any], recorded: AnchorSettings | None) -> Plan:
        from anchor_former.connectors import available_connectors

        connector = request.pop("connector", None) or (recorded.connector if recorded else self.default_connector)
        score = cast(Score, request.pop("score", None) or (recorded.score if recorded else self.default_score))
        num_anchors = request.pop("num_anchors", 144)
        init_projector = request.pop("init_projector", True)
        if connector not in available_connectors() and not re.match(r"^mlp\d+x_gelu$", str(connector)):
            raise ValueError(f"connector must be one of {', '.join(available_connectors())}, got {connector!r}")
        options = self.family_options(model, connector, request)
        inner: Any = model.model
        config: Any = model.config
        layer = single_layer(config.vision_feature_layer, "config.vision_feature_layer")
        previous = None
        if recorded is not None:
            request = merge_recorded(request, recorded, connector=connector, score=score, host=self.name)
            previous = inner.multi_modal_projector
        AttentionProbe(inner.vision_tower, layer=layer, score=score)  # unsupported tower, bad layer, CLS-less + "cls"
        spec = detect_encoder(inner.vision_tower)
        stock_cls = self.check_tower(model, spec, request)
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        kwargs = anchor_kwargs(
            connector, num_anchors, side * side, request, has_cls=spec.has_cls, score=score, stock_cls=stock_cls
        )
        if connector == "select" and previous is None:
            check_select_source(inner.multi_modal_projector, config, init_projector)
        kwargs.setdefault("num_prefix_tokens", spec.num_prefix_tokens)
        if processor is not None:
            self.check_processor(processor, model, spec)
        return Plan(
            connector=connector,
            score=score,
            kwargs=kwargs,
            recorded=recorded,
            previous=previous,
            data={
                "spec": spec,
                "layer": layer,
                "side": side,
                "patch_size": int(vision.patch_size),
                "init_projector": init_projector,
                "options": options,
            },
        )

    def build(self, model: nn.Module, plan: Plan) -> nn.Module:
        """The connector on the old projector's device and dtype; a fresh attach starts its output MLP from the
        model's ``linear_1`` / ``linear_2`` (``init_projector``)."""
        from anchor_former.checkpoint import load_checked
        from anchor_former.connectors import build_connector

        config: Any = model.config
        inner: Any = model.model
        old: nn.Module = inner.multi_modal_projector
        param = next(iter(old.parameters()), None)
        param = param if param is not None else next(iter(inner.parameters()))
        if param.device.type == "meta":
            raise ValueError(
                "model.model.multi_modal_projector must hold its weights to attach (they are on the 'meta' device: "
                "offloaded by accelerate or not loaded); attach before dispatching the model with a device_map, or "
                "keep the projector on a real device"
            )
        new = build_connector(
            plan.connector,
            int(config.vision_config.hidden_size),
            int(config.text_config.hidden_size),
            **plan.kwargs,
            device=param.device,
            dtype=param.dtype,
        )
        new.num_output_tokens(plan.data["side"] ** 2 + plan.data["spec"].num_prefix_tokens)  # budget checks
        if plan.previous is None and plan.data["init_projector"] and hasattr(old, "linear_1"):
            target = getattr(new, "projector", None)
            if target is None:
                raise ValueError(
                    f"connector {plan.connector!r} has no output MLP to initialise; pass init_projector=False"
                )
            load_checked(target, projector_mlp(old, config), what="the model's multi_modal_projector")
        return new

    def settings(self, model: nn.Module, plan: Plan, connector: nn.Module | None) -> AnchorSettings:
        assert connector is not None, "build always returns a connector"
        config: Any = getattr(connector, "config", None)
        recorded = config.to_dict() if hasattr(config, "to_dict") else dict(plan.kwargs)
        recorded = constructor_kwargs(plan.connector, recorded)
        return AnchorSettings(
            connector=plan.connector,
            connector_config=recorded,
            score=plan.score,
            layer=plan.data["layer"],
            num_anchors=recorded.get("num_anchors"),
            num_context=int(recorded.get("num_context", 0) or 0),
            include_cls=bool(recorded.get("include_cls", False)),
            extras=self.extras(model, plan, connector),
        )

    def _num_tokens(self, plan: Plan, connector: nn.Module | None) -> int:
        assert connector is not None, "build always returns a connector"
        return cast("Connector", connector).num_output_tokens(
            plan.data["side"] ** 2 + plan.data["spec"].num_prefix_tokens
        )

    def config_updates(self, settings: AnchorSettings, plan: Plan, connector: nn.Module | None) -> dict[str, Any]:
        return {"image_seq_length": self._num_tokens(plan, connector)}

    def switch_processor(
        self, processor: Any, settings: AnchorSettings, plan: Plan, connector: nn.Module | None
    ) -> None:
        _expand_processor(processor, self._num_tokens(plan, connector), plan.data["patch_size"])


HOST = LlavaHost()
HOST.register_key_conversions()


def register_auto_classes() -> None:
    """Register the classes with ``AutoConfig``, ``AutoModel`` and ``AutoModelForImageTextToText``
    (idempotent), so ``AutoModelForImageTextToText.from_pretrained(saved_dir)`` rebuilds the model."""
    LlavaHost.register()


def attach_anchor_former(
    model: nn.Module,
    processor: Any = None,
    *,
    num_anchors: int = 144,
    connector: str | None = None,
    score: Score | None = None,
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
        connector: a :func:`~anchor_former.build_connector` name: ``"acformer"`` (the default; trained
            AcFormer), ``"select"`` (training-free: the K anchor patches through the model's own projector, no
            new parameters; pass ``num_context=M`` for M merged context tokens, ``include_cls=True`` to keep
            [CLS] first, default: only with ``vision_feature_select_strategy="full"``), ``"perceiver"``, ...
            On re-attach: the attached one.
        score: ``"cls"`` (the default: [CLS] attention of ``vision_feature_layer``), ``"norm"`` (token norms,
            any encoder), ``"received"`` or ``"map"`` (SigLIP's pooling head).
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
            ``mlp2x_gelu``; a projector offloaded to the meta device; a processor this version cannot make
            expand correctly; on re-attach, another connector name or arguments that change the connector's
            weight shapes (the message names what is attached). The model, its config and the processor are
            unchanged then.
    """
    attached = attach(
        HOST,
        model,
        processor,
        num_anchors=num_anchors,
        connector=connector,
        score=score,
        init_projector=init_projector,
        **kwargs,
    )
    return cast(AnchorFormerLlavaForConditionalGeneration, attached)
