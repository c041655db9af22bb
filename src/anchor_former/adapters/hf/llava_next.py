"""transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6, "anyres"; transformers >= 5.0).

:func:`attach_llava_next` (also reached through :func:`~anchor_former.adapters.transformers.attach_anchor_former`,
which detects the model class) turns a built ``LlavaNextForConditionalGeneration`` and its
``LlavaNextProcessor`` into :class:`AnchorFormerLlavaNextForConditionalGeneration` /
:class:`AnchorFormerLlavaNextProcessor` in place.

Each image is several ViT views (the base view, then the crops of the chosen grid pinpoint, row-major;
:mod:`anchor_former.views`). The vision tower runs ONCE over all views of all images, as configured (SDPA
by default, no ``output_attentions``), inside an :class:`~anchor_former.probes.AttentionProbe` that keeps
the ``vision_feature_layer`` tokens and, per view, that layer's [CLS] attention row. Then per image:

* ``connector="select"`` (training-free; the model's own ``linear_1``/GELU/``linear_2`` projector): each
  view keeps its own anchors, chosen from its own [CLS] row among its *candidate* patches (the patches
  the stock model keeps after unpadding), ``K`` per view (``num_anchors``) or one budget per image
  spread over the views in proportion to their candidate counts (``image_budget``). The LLM sees the
  stock LLaVA-NeXT layout restricted to the kept patches: base-view anchors in raster order, then the
  crops' anchors row by row of the high-resolution grid, each grid row still closed by the model's
  ``image_newline``. At full budget this is exactly the stock model.
* ``connector="acformer"`` (and the other trained connectors: ``"perceiver"``, ``"avgpool"``, ...): the
  connector runs on every view (AcFormer: ``K + 1`` tokens per view, [CLS] first); the LLM sees the base
  view's tokens, then each row of crops followed by one ``image_newline``.

Token layout for an image whose pinpoint has ``R x C`` crops of ``s x s`` patches (``s = 24`` for
CLIP ViT-L/14-336), ``k_v`` anchors in view ``v``, ``G`` rows of the high-resolution grid left after
unpadding (``G = 2 s = 48`` for a square image on a 2 x 2 pinpoint)::

    select:    [base: k_0 anchors] [row 1 anchors][NL] [row 2 anchors][NL] ... [row G anchors][NL]
    acformer:  [base: K+1] [crop (1,1): K+1] ... [crop (1,C): K+1][NL] ... [crop (R,C): K+1][NL]

so an image costs ``sum k_v + G`` tokens (select) or ``(1 + R C)(K + 1) + R`` (acformer); the processor
writes exactly that many ``<image>`` tokens (it computes them with the same :mod:`anchor_former.views`
functions).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextModel, LlavaNextProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel

from anchor_former.adapters._anchors import anchor_kwargs
from anchor_former.adapters.hf.llava import (
    _build_connector,
    _check_select_source,
    _projector_mlp,
    can_return_tuple,
)
from anchor_former.probes import AttentionProbe, EncoderSpec, Score, detect_encoder
from anchor_former.views import (
    AnyresViews,
    anyres_views,
    arrange_fixed,
    num_fixed_tokens,
    num_selected_tokens,
    select_view_tokens,
    view_budgets,
)

__all__ = [
    "AnchorFormerLlavaNextConfig",
    "AnchorFormerLlavaNextForConditionalGeneration",
    "AnchorFormerLlavaNextModel",
    "AnchorFormerLlavaNextProcessor",
    "anyres_token_count",
    "attach_llava_next",
    "register_auto_classes",
]


def anyres_token_count(tokens: dict[str, Any], views: AnyresViews) -> int:
    """LLM tokens of one image under the anyres settings ``tokens`` (``config.anchor_former["anyres"]``).

    ``tokens``: ``{"layout": "selected", "num_anchors": K, "image_budget": B | None}`` (``connector="select"``)
    or ``{"layout": "fixed", "tokens_per_view": T}`` (the other connectors).
    """
    if tokens["layout"] == "selected":
        return num_selected_tokens(views, _budgets(tokens, views))
    return num_fixed_tokens(views, int(tokens["tokens_per_view"]))


def _budgets(tokens: dict[str, Any], views: AnyresViews) -> tuple[int, ...]:
    if tokens.get("image_budget") is not None:
        return view_budgets(views.num_candidates(), per_image=int(tokens["image_budget"]))
    return view_budgets(views.num_candidates(), per_view=int(tokens["num_anchors"]))


def _views(config: LlavaNextConfig, image_size: Any) -> AnyresViews:
    """The views of one image as this model cuts them (``image_size`` = ``(height, width)``)."""
    vision = config.vision_config
    return anyres_views(
        [int(v) for v in image_size], grid_pinpoints=config.image_grid_pinpoints,
        view_size=int(vision.image_size), patch_size=int(vision.patch_size),
    )  # fmt: skip


@strict
class AnchorFormerLlavaNextConfig(LlavaNextConfig):
    """``LlavaNextConfig`` plus ``anchor_former``: ``{"connector": name, "score": ..., "connector_config": {...},
    "anyres": {...}}`` (``"anyres"``: the per-image token rule, see :func:`anyres_token_count`)."""

    model_type = "anchor_former_llava_next"

    anchor_former: dict | None = None


class AnchorFormerLlavaNextModel(LlavaNextModel):
    """``LlavaNextModel`` whose projector is a connector fed per view by a probe (see the module doc)."""

    config_class = AnchorFormerLlavaNextConfig
    config: AnchorFormerLlavaNextConfig

    def __init__(self, config: AnchorFormerLlavaNextConfig) -> None:
        super().__init__(config)
        self.multi_modal_projector = _build_connector(config)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Vision tower over all views (one forward) + probe + connector per view, laid out per image.

        Args:
            pixel_values: ``(B, V_max, C, H_img, W_img)`` views per image (zero-padded to the most views), or
                ``(sum V_i, C, H_img, W_img)`` already concatenated.
            image_sizes: ``(B, 2)`` original ``(height, width)`` of each image.
            vision_feature_layer: ``hidden_states`` index the connector reads (default: the config's).
            vision_feature_select_strategy: ignored (checked at attach time).

        Returns:
            The vision tower's output with ``pooler_output`` = a list of B tensors ``(T_i, llm_dim)``, T_i
            from :func:`anyres_token_count`.
        """
        kwargs.pop("return_dict", None)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"vision_feature_layer must be a single int for AnchorFormer, got {layer!r}")
        settings = self.config.anchor_former or {}
        views = [_views(self.config, size) for size in torch.as_tensor(image_sizes).tolist()]  # (B, 2) (h, w)
        counts = [v.num_views for v in views]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, counts)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have 4 or 5 dims, got shape {tuple(pixel_values.shape)}")
        probe = AttentionProbe(self.vision_tower, layer=layer, score=settings.get("score", "cls"))
        with probe:
            image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        features, scores = probe.features, probe.scores  # (sum V_i, N, D), (sum V_i, H, N) or (sum V_i, N)
        tokens, connector = settings["anyres"], self.multi_modal_projector
        images, start = [], 0
        for image_views, n in zip(views, counts):
            f, sc = features[start : start + n], scores[start : start + n]  # this image's V views
            start += n
            if tokens["layout"] == "selected":
                images.append(select_view_tokens(
                    image_views, _budgets(tokens, image_views), f, sc, num_prefix_tokens=connector.num_prefix_tokens,
                    projector=connector.projector, newline=self.image_newline,
                ))  # fmt: skip
            else:
                out = connector(f, attention=sc) if getattr(connector, "uses_anchors", False) else connector(f)
                images.append(arrange_fixed(image_views, out, self.image_newline))  # out: (V, T, llm_dim)
        image_outputs.pooler_output = images
        return image_outputs


class AnchorFormerLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` with an :class:`AnchorFormerLlavaNextModel` inside."""

    config_class = AnchorFormerLlavaNextConfig
    config: AnchorFormerLlavaNextConfig

    def __init__(self, config: AnchorFormerLlavaNextConfig) -> None:
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = AnchorFormerLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


class AnchorFormerLlavaNextProcessor(LlavaNextProcessor):
    """``LlavaNextProcessor`` that writes the attached model's number of ``<image>`` tokens per image.

    ``anyres_tokens``: the model's ``config.anchor_former["anyres"]`` (saved in ``processor_config.json``,
    so ``AnchorFormerLlavaNextProcessor.from_pretrained`` restores it); None = the stock count.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_additional_image_tokens: int = 0,
        anyres_tokens: dict | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, patch_size=patch_size,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs)
        self.anyres_tokens = anyres_tokens

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Tokens of an ``(orig_height, orig_width)`` image with ``(height, width)`` views, plus one under the
        ``"default"`` strategy (transformers' callers subtract that [CLS] token afterwards)."""
        if not self.anyres_tokens:
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        views = anyres_views((orig_height, orig_width), grid_pinpoints=self.image_processor.image_grid_pinpoints,
                             view_size=int(height), patch_size=int(self.patch_size))
        return anyres_token_count(self.anyres_tokens, views) + int(self.vision_feature_select_strategy == "default")


def register_auto_classes() -> None:
    """Register the LLaVA-NeXT classes with ``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText``
    and ``AutoProcessor`` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    AutoConfig.register(AnchorFormerLlavaNextConfig.model_type, AnchorFormerLlavaNextConfig, exist_ok=True)
    AutoModel.register(AnchorFormerLlavaNextConfig, AnchorFormerLlavaNextModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        AnchorFormerLlavaNextConfig, AnchorFormerLlavaNextForConditionalGeneration, exist_ok=True
    )
    AutoProcessor.register(AnchorFormerLlavaNextConfig, AnchorFormerLlavaNextProcessor, exist_ok=True)


def _check_processor(processor: Any, config: LlavaNextConfig, strategy: str) -> None:
    """The processor must be a LlavaNextProcessor cutting views the way this model does."""
    if not isinstance(processor, LlavaNextProcessor):
        raise ValueError(f"processor must be a transformers LlavaNextProcessor, got {type(processor).__name__}")
    vision = config.vision_config
    images = processor.image_processor
    crop = dict(getattr(images, "crop_size", None) or {})
    checks = [
        ("image_processor.image_grid_pinpoints", [list(p) for p in getattr(images, "image_grid_pinpoints", []) or []],
         [list(p) for p in config.image_grid_pinpoints]),
        ("image_processor.crop_size", (crop.get("height"), crop.get("width")), (vision.image_size, vision.image_size)),
        ("patch_size", processor.patch_size, vision.patch_size),
        ("image_token_id", processor.image_token_id, config.image_token_id),
        ("vision_feature_select_strategy", processor.vision_feature_select_strategy, strategy),
    ]
    for name, got, want in checks:
        if got != want:
            raise ValueError(f"processor does not belong to this model: processor.{name} must be {want!r}, got {got!r}")


def _expand(processor: Any, tokens: dict[str, Any], config: LlavaNextConfig) -> None:
    """Switch ``processor`` to :class:`AnchorFormerLlavaNextProcessor` writing ``tokens``' counts; checked on
    two blank images (square, and 1:2 with unpadding), restored on any failure."""
    import numpy as np

    saved = (processor.__class__, getattr(processor, "anyres_tokens", None), "anyres_tokens" in processor.__dict__)
    processor.__class__ = AnchorFormerLlavaNextProcessor
    processor.anyres_tokens = dict(tokens)
    side = int(config.vision_config.image_size)
    try:
        for shape in ((side, side), (side, 2 * side + 3)):
            ids = processor(text=processor.image_token, images=np.zeros((*shape, 3), dtype=np.uint8),
                            return_tensors="pt")["input_ids"]
            got, want = int((ids == processor.image_token_id).sum()), anyres_token_count(tokens, _views(config, shape))
            if got != want:
                raise ValueError(
                    f"could not make {saved[0].__name__} write {want} image tokens for a {shape} image (it wrote "
                    f"{got}); this transformers version's processor counts image tokens differently"
                )
    except Exception:
        processor.__class__ = saved[0]
        if saved[2]:
            processor.anyres_tokens = saved[1]
        else:
            del processor.anyres_tokens
        raise



def check_views_model(
    inner: nn.Module, config: Any, *, connector: str, score: str, kwargs: dict[str, Any], family: str,
    default_strategy: str,
) -> EncoderSpec:
    """The checks every anyres-view model (LLaVA-NeXT, LLaVA-OneVision) shares, before anything changes.

    ``vision_feature_layer`` a single int; a known connector; a tower and score the probe supports; the
    ``vision_feature_select_strategy`` that gives each view's patch grid unchanged (``"default"`` on towers
    with [CLS], ``"full"`` without); no ``num_context`` (popped from ``kwargs``). Returns the tower's
    :class:`~anchor_former.probes.EncoderSpec`; raises ``ValueError``.
    """
    from anchor_former.connectors.registry import available_connectors

    layer = config.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"config.vision_feature_layer must be a single int for AnchorFormer, got {layer!r}")
    if connector not in available_connectors() and not re.match(r"^mlp\d+x_gelu$", str(connector)):
        raise ValueError(f"connector must be one of {', '.join(available_connectors())}, got {connector!r}")
    AttentionProbe(inner.vision_tower, layer=layer, score=score)  # unsupported tower, bad layer, CLS-less + "cls"
    spec = detect_encoder(inner.vision_tower)
    strategy = getattr(config, "vision_feature_select_strategy", default_strategy)
    expected = "default" if spec.has_cls else "full"
    if strategy != expected:
        raise ValueError(
            f"config.vision_feature_select_strategy must be {expected!r} for {family} on this tower (each view "
            f"gives exactly its patch grid to the stock layout), got {strategy!r}"
        )
    if kwargs.get("num_context"):
        raise ValueError(
            f"num_context (context tokens) is not supported with {family} views, got {kwargs['num_context']!r}"
        )
    kwargs.pop("num_context", None)
    return spec



def build_view_connector(
    inner: nn.Module, config: Any, spec: EncoderSpec, *, connector: str, num_anchors: int, score: str,
    init_projector: bool, kwargs: dict[str, Any],
) -> nn.Module:
    """The connector one view of an anyres model (LLaVA-NeXT, LLaVA-OneVision) runs, with its start weights.

    Anchor settings from :func:`~anchor_former.adapters._anchors.anchor_kwargs` (one view's ``s * s``
    patches), built on the old projector's device and dtype; its output MLP is the model's ``linear_1`` /
    ``linear_2`` (``init_projector``; required for ``"select"``). Raises ``ValueError`` before any change.
    """
    from anchor_former.checkpoint import load_checked
    from anchor_former.connectors.registry import build_connector

    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    kwargs = anchor_kwargs(connector, num_anchors, side * side, kwargs, has_cls=spec.has_cls, score=score,
                           stock_cls=False)
    old_projector = inner.multi_modal_projector
    if connector == "select":
        _check_select_source(old_projector, config, init_projector)
    kwargs.setdefault("num_prefix_tokens", spec.num_prefix_tokens)
    param = next(iter(old_projector.parameters()))
    new = build_connector(connector, int(vision.hidden_size), int(config.text_config.hidden_size), **kwargs,
                          device=param.device, dtype=param.dtype)
    if init_projector and hasattr(old_projector, "linear_1"):
        target = getattr(new, "projector", None)
        if target is None:
            raise ValueError(f"connector {connector!r} has no output MLP to initialise; pass init_projector=False")
        load_checked(target, _projector_mlp(old_projector, config), what="the model's multi_modal_projector")
    return new


def attach_llava_next(
    model: nn.Module,
    processor: Any = None,
    *,
    num_anchors: int = 144,
    connector: str = "acformer",
    score: Score = "cls",
    init_projector: bool = True,
    image_budget: int | None = None,
    **kwargs: Any,
) -> AnchorFormerLlavaNextForConditionalGeneration:
    """Switch a ``LlavaNextForConditionalGeneration`` (and its processor) to anchors per view, in place.

    Args:
        model: a built ``LlavaNextForConditionalGeneration`` (e.g. ``llava-hf/llava-v1.6-mistral-7b-hf``).
        processor: its ``LlavaNextProcessor``; becomes an :class:`AnchorFormerLlavaNextProcessor` that writes
            the new number of ``<image>`` tokens for every image size.
        num_anchors: K anchors per view (``"select"``: at most the view's candidates; ``"acformer"``: K + 1
            tokens per view).
        connector: ``"select"`` (training-free, the model's projector), ``"acformer"``, ``"perceiver"``, ...
        score: ``"cls"`` ([CLS] attention of ``vision_feature_layer``) or ``"norm"`` (token norms).
        init_projector: copy ``linear_1``/``linear_2`` into the connector's output MLP.
        image_budget: ``"select"`` only: one budget per image, spread over its views in proportion to their
            candidate patches (:func:`~anchor_former.views.view_budgets`); replaces ``num_anchors`` per view.
            At least the largest number of views any pinpoint gives.
        **kwargs: further connector arguments (``depth``, ``heads``, ``dim_head``, ...).

    Raises:
        ValueError: not a ``LlavaNextForConditionalGeneration``; ``vision_feature_layer`` a list; a
            ``vision_feature_select_strategy`` other than ``"default"`` ([CLS] towers) / ``"full"``
            (towers without [CLS]); ``num_anchors`` above the ``s * s`` patches of a view; ``image_budget``
            below the number of views, or given for another connector; ``num_context``; a projector that
            is not LLaVA's ``mlp2x_gelu`` for ``"select"``; a processor of another model. The model and the
            processor are unchanged then.
    """
    inner = getattr(model, "model", None)
    if not isinstance(model, LlavaNextForConditionalGeneration) or not isinstance(inner, LlavaNextModel):
        raise ValueError(
            f"model must be a transformers LlavaNextForConditionalGeneration, got {type(model).__qualname__}"
        )
    old = model.config
    spec = check_views_model(inner, old, connector=connector, score=score, kwargs=kwargs, family="LLaVA-NeXT",
                      default_strategy="default")
    vision = old.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    most_views = 1 + max((int(h) // int(vision.image_size)) * (int(w) // int(vision.image_size))
                         for h, w in old.image_grid_pinpoints)
    if image_budget is not None:
        if connector != "select":
            raise ValueError(f"image_budget is a connector='select' option, got connector={connector!r}")
        if isinstance(image_budget, bool) or not isinstance(image_budget, int) or image_budget < most_views:
            raise ValueError(
                f"image_budget must be an integer >= {most_views} (the most views an image gets: one anchor each), "
                f"got {image_budget!r}"
            )
    if processor is not None:
        _check_processor(processor, old, "default" if spec.has_cls else "full")  # the strategy checked above
    new = build_view_connector(inner, old, spec, connector=connector, num_anchors=num_anchors, score=score,
                               init_projector=init_projector, kwargs=kwargs)
    if connector == "select":
        tokens = {"layout": "selected", "num_anchors": num_anchors, "image_budget": image_budget}
    else:
        tokens = {"layout": "fixed", "tokens_per_view": new.num_output_tokens(side * side + spec.num_prefix_tokens)}
    if processor is not None:
        _expand(processor, tokens, old)

    settings = new.config.to_dict() if hasattr(getattr(new, "config", None), "to_dict") else dict(kwargs)
    settings.pop("vision_dim", None)
    settings.pop("llm_dim", None)
    data = {k: v for k, v in old.to_dict().items() if k not in ("model_type", "anchor_former")}
    anchor = {"connector": connector, "score": score, "connector_config": settings, "anyres": copy.deepcopy(tokens)}
    config = AnchorFormerLlavaNextConfig(**data, anchor_former=anchor)
    config.vision_config, config.text_config = old.vision_config, old.text_config  # the submodules' own objects
    model.__class__ = AnchorFormerLlavaNextForConditionalGeneration
    inner.__class__ = AnchorFormerLlavaNextModel
    model.config = inner.config = config
    inner.multi_modal_projector = new
    return model
