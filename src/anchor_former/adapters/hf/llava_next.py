"""transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6, "anyres"; transformers >= 5.0).

:func:`attach_anchor_former` (also reached through :func:`~anchor_former.adapters.transformers.attach_anchor_former`,
which detects the model class) turns a built ``LlavaNextForConditionalGeneration`` and its
``LlavaNextProcessor`` into :class:`AnchorFormerLlavaNextForConditionalGeneration` /
:class:`AnchorFormerLlavaNextProcessor` in place.

Each image is several ViT views (the base view, then the crops of the chosen grid pinpoint, row-major;
:mod:`anchor_former.views`). The vision tower runs ONCE over all views of all images, as configured (SDPA
by default, no ``output_attentions``), inside an :class:`~anchor_former.probes.AttentionProbe` that keeps
the ``vision_feature_layer`` tokens and, per view, that layer's [CLS] attention row; the probe is built per
call and runs under the tower's lock, eagerly under ``torch.compile`` (:mod:`anchor_former.adapters._probed`),
so threads sharing the model and ``torch.compile(model)`` work. Then per image:

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

The attach steps are LLaVA-1.5's (:class:`~anchor_former.adapters.hf.llava.LlavaHost`) with the view rules
overridden (:class:`LlavaNextHost`); the token rule is recorded as ``AnchorSettings.extras["anyres"]`` and
``image_budget`` as ``extras["image_budget"]``.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextProcessor,
)
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel
from transformers.utils.generic import can_return_tuple

from anchor_former.adapters._host import Plan, attach
from anchor_former.adapters.hf._base import AnchorImageOutput
from anchor_former.adapters.hf.llava import (
    LlavaHost,
    probed_features,
    recorded_connector,
    run_connector,
)
from anchor_former.adapters.settings import AnchorSettings
from anchor_former.probes import EncoderSpec, Score
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
    "attach_anchor_former",
    "register_auto_classes",
]


def anyres_token_count(tokens: dict[str, Any], views: AnyresViews) -> int:
    """LLM tokens of one image under the anyres settings ``tokens`` (``AnchorSettings.extras["anyres"]``).

    ``tokens``: ``{"layout": "selected", "num_anchors": K, "image_budget": B | None}`` (``connector="select"``)
    or ``{"layout": "fixed", "tokens_per_view": T}`` (the other connectors).
    """
    if tokens["layout"] == "selected":
        return num_selected_tokens(views, budgets_of(tokens, views))
    return num_fixed_tokens(views, int(tokens["tokens_per_view"]))


def budgets_of(tokens: dict[str, Any], views: AnyresViews) -> tuple[int, ...]:
    """Each view's anchor budget under the ``"selected"`` layout ``tokens``."""
    if tokens.get("image_budget") is not None:
        return view_budgets(views.num_candidates(), per_image=int(tokens["image_budget"]))
    return view_budgets(views.num_candidates(), per_view=int(tokens["num_anchors"]))


def views_of(config: Any, image_size: Any) -> AnyresViews:
    """The views of one image as this model cuts them (``image_size`` = ``(height, width)``)."""
    vision = config.vision_config
    return anyres_views(
        [int(v) for v in image_size], grid_pinpoints=config.image_grid_pinpoints,
        view_size=int(vision.image_size), patch_size=int(vision.patch_size),
    )  # fmt: skip


def image_sizes_list(image_sizes: Any) -> list[list[int]]:
    """``image_sizes`` as ``[[height, width], ...]``: a ``(B, 2)`` tensor or a plain list, as the stock model takes."""
    return [[int(v) for v in size] for size in torch.as_tensor(image_sizes).tolist()]


def concat_views(pixel_values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``(B, V_max, C, H, W)`` padded views (or ``(sum V_i, C, H, W)``) -> ``(sum V_i, C, H, W)``."""
    if pixel_values.dim() == 5:
        return torch.cat([pix[:n] for pix, n in zip(pixel_values, counts)], dim=0)
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have 4 or 5 dims, got shape {tuple(pixel_values.shape)}")
    return pixel_values


@strict
class AnchorFormerLlavaNextConfig(LlavaNextConfig):
    """``LlavaNextConfig`` plus ``anchor_former`` (the :class:`~anchor_former.adapters.settings.AnchorSettings`
    record; ``extras["anyres"]``: the per-image token rule, see :func:`anyres_token_count`)."""

    model_type = "anchor_former_llava_next"

    anchor_former: dict | None = None


class AnchorFormerLlavaNextModel(LlavaNextModel):
    """``LlavaNextModel`` whose projector is a connector fed per view by a probe (see the module doc)."""

    config_class = AnchorFormerLlavaNextConfig
    config: AnchorFormerLlavaNextConfig

    def __init__(self, config: AnchorFormerLlavaNextConfig) -> None:
        super().__init__(config)
        self.multi_modal_projector = recorded_connector(config)  # type: ignore[assignment]  # a connector

    _probed = probed_features

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> AnchorImageOutput:
        """Vision tower over all views (one probed forward) + connector per view, laid out per image.

        Args:
            pixel_values: ``(B, V_max, C, H_img, W_img)`` views per image (zero-padded to the most views), or
                ``(sum V_i, C, H_img, W_img)`` already concatenated.
            image_sizes: ``(B, 2)`` original ``(height, width)`` of each image (a tensor or a list).
            vision_feature_layer: ``hidden_states`` index the connector reads (default: the config's).
            vision_feature_select_strategy: ignored (checked at attach time).

        Returns:
            :class:`~anchor_former.adapters.hf._base.AnchorImageOutput` with ``pooler_output`` = a list of B
            tensors ``(T_i, llm_dim)``, T_i from :func:`anyres_token_count`; ``kept_indices`` for the trained
            anchor connectors: per image ``(V_i, K)`` anchor token indices of each view (else None).
        """
        settings = cast("dict[str, Any]", self.config.anchor_former)  # a plain dict (normalised at build): traceable
        views = [views_of(self.config, size) for size in image_sizes_list(image_sizes)]
        counts = [v.num_views for v in views]
        output, features, scores = self._probed(concat_views(pixel_values, counts), vision_feature_layer, **kwargs)
        tokens = settings["extras"]["anyres"]
        connector: Any = self.multi_modal_projector  # the recorded connector
        images: list[torch.Tensor] = []
        kept: list[torch.Tensor | None] = []
        start = 0
        for image_views, n in zip(views, counts):
            f, sc = features[start : start + n], scores[start : start + n]  # this image's V views
            start += n
            if tokens["layout"] == "selected":
                images.append(select_view_tokens(
                    image_views, budgets_of(tokens, image_views), f, sc, num_prefix_tokens=connector.num_prefix_tokens,
                    projector=connector.projector, newline=self.image_newline,
                ))  # fmt: skip
            else:
                out, idx = run_connector(connector, f, sc)  # out: (V, T, llm_dim)
                images.append(arrange_fixed(image_views, out, self.image_newline))
                kept.append(idx)
        return AnchorImageOutput(
            last_hidden_state=output.last_hidden_state,
            pooler_output=images,
            kept_indices=cast("tuple[torch.Tensor, ...]", tuple(kept)) if kept and kept[0] is not None else None,
        )


class AnchorFormerLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` with an :class:`AnchorFormerLlavaNextModel` inside."""

    config_class = AnchorFormerLlavaNextConfig
    config: AnchorFormerLlavaNextConfig

    def __init__(self, config: AnchorFormerLlavaNextConfig) -> None:
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = AnchorFormerLlavaNextModel(config)
        text: Any = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()


class AnchorFormerLlavaNextProcessor(LlavaNextProcessor):
    """``LlavaNextProcessor`` that writes the attached model's number of ``<image>`` tokens per image.

    ``anyres_tokens``: the model's ``AnchorSettings.extras["anyres"]`` (saved in ``processor_config.json``,
    so ``AnchorFormerLlavaNextProcessor.from_pretrained`` / ``AutoProcessor`` restore it); None = the stock count.
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
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )
        self.anyres_tokens = anyres_tokens

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Tokens of an ``(orig_height, orig_width)`` image with ``(height, width)`` views, plus one under the
        ``"default"`` strategy (transformers' callers subtract that [CLS] token afterwards)."""
        if not self.anyres_tokens:
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        views = anyres_views(
            (orig_height, orig_width),
            grid_pinpoints=self.image_processor.image_grid_pinpoints,
            view_size=int(height),
            patch_size=int(self.patch_size),
        )
        return anyres_token_count(self.anyres_tokens, views) + int(self.vision_feature_select_strategy == "default")


def check_processor_fields(processor: Any, checks: list[tuple[str, Any, Any]]) -> None:
    for name, got, want in checks:
        if got != want:
            raise ValueError(f"processor does not belong to this model: processor.{name} must be {want!r}, got {got!r}")


class LlavaNextHost(LlavaHost):
    """LLaVA-NeXT: LLaVA-1.5's steps with anyres views (per-view anchors, ``image_budget``, its processor)."""

    name = "LlavaNextForConditionalGeneration"
    classes: ClassVar[dict[type, tuple[type, type, type]]] = {
        LlavaNextForConditionalGeneration: (
            AnchorFormerLlavaNextConfig,
            AnchorFormerLlavaNextModel,
            AnchorFormerLlavaNextForConditionalGeneration,
        ),
    }
    family = "LLaVA-NeXT"
    processor_class: ClassVar[type] = LlavaNextProcessor
    attached_processor: ClassVar[type] = AnchorFormerLlavaNextProcessor

    def most_views(self, model: nn.Module) -> int:
        config: Any = model.config
        view = int(config.vision_config.image_size)
        return 1 + max((int(h) // view) * (int(w) // view) for h, w in config.image_grid_pinpoints)

    def family_options(self, model: nn.Module, connector: str, request: dict[str, Any]) -> dict[str, Any]:
        budget = request.pop("image_budget", None)
        if budget is not None:
            if connector != "select":
                raise ValueError(f"image_budget is a connector='select' option, got connector={connector!r}")
            most = self.most_views(model)
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < most:
                raise ValueError(
                    f"image_budget must be an integer >= {most} (the most views an image gets: one anchor each), "
                    f"got {budget!r}"
                )
        return {"image_budget": budget}

    def expected_strategy(self, spec: EncoderSpec) -> str:
        return "default" if spec.has_cls else "full"

    def check_tower(self, model: nn.Module, spec: EncoderSpec, kwargs: dict[str, Any]) -> bool:
        strategy = getattr(model.config, "vision_feature_select_strategy", "default")
        expected = self.expected_strategy(spec)
        if strategy != expected:
            raise ValueError(
                f"config.vision_feature_select_strategy must be {expected!r} for {self.family} on this tower (each "
                f"view gives exactly its patch grid to the stock layout), got {strategy!r}"
            )
        if kwargs.get("num_context"):
            raise ValueError(
                f"num_context (context tokens) is not supported with {self.family} views, got {kwargs['num_context']!r}"
            )
        kwargs.pop("num_context", None)
        return False

    def processor_checks(self, processor: Any, model: nn.Module, spec: EncoderSpec) -> list[tuple[str, Any, Any]]:
        config: Any = model.config
        vision = config.vision_config
        images = processor.image_processor
        crop = dict(getattr(images, "crop_size", None) or {})
        return [
            (
                "image_processor.image_grid_pinpoints",
                [list(p) for p in getattr(images, "image_grid_pinpoints", []) or []],
                [list(p) for p in config.image_grid_pinpoints],
            ),
            (
                "image_processor.crop_size",
                (crop.get("height"), crop.get("width")),
                (vision.image_size, vision.image_size),
            ),
            ("patch_size", processor.patch_size, vision.patch_size),
            ("image_token_id", processor.image_token_id, config.image_token_id),
            ("vision_feature_select_strategy", processor.vision_feature_select_strategy, self.expected_strategy(spec)),
        ]

    def check_processor(self, processor: Any, model: nn.Module, spec: EncoderSpec) -> None:
        if not isinstance(processor, self.processor_class):
            raise ValueError(
                f"processor must be a transformers {self.processor_class.__name__}, got {type(processor).__name__}"
            )
        check_processor_fields(processor, self.processor_checks(processor, model, spec))

    def tokens(self, plan: Plan, connector: nn.Module) -> dict[str, Any]:
        """The per-image token rule (``extras["anyres"]``)."""
        if plan.connector == "select":
            return {
                "layout": "selected",
                "num_anchors": plan.kwargs["num_anchors"],
                "image_budget": plan.data["options"].get("image_budget"),
            }
        return {"layout": "fixed", "tokens_per_view": self._num_tokens(plan, connector)}

    def extras(self, model: nn.Module, plan: Plan, connector: nn.Module) -> dict[str, Any]:
        return {**plan.data["options"], "anyres": self.tokens(plan, connector)}

    def config_updates(self, settings: AnchorSettings, plan: Plan, connector: nn.Module | None) -> dict[str, Any]:
        return {}

    def switch_processor(
        self, processor: Any, settings: AnchorSettings, plan: Plan, connector: nn.Module | None
    ) -> None:
        """Switch to :class:`AnchorFormerLlavaNextProcessor`, checked on two blank images (square, and 1:2
        with unpadding); the pipeline rolls it back on failure."""
        import numpy as np

        tokens = settings.extras["anyres"]
        name = type(processor).__name__
        processor.__class__ = self.attached_processor
        processor.anyres_tokens = dict(tokens)
        side = int(plan.data["side"] * plan.data["patch_size"])
        for shape in ((side, side), (side, 2 * side + 3)):
            ids = processor(
                text=processor.image_token, images=np.zeros((*shape, 3), dtype=np.uint8), return_tensors="pt"
            )["input_ids"]
            got, want = (
                int((ids == processor.image_token_id).sum()),
                anyres_token_count(tokens, views_of(plan.data["config"], shape)),
            )
            if got != want:
                raise ValueError(
                    f"could not make {name} write {want} image tokens for a {shape} image (it wrote {got}); this "
                    "transformers version's processor counts image tokens differently"
                )

    def plan(self, model: nn.Module, processor: Any, request: dict[str, Any], recorded: AnchorSettings | None) -> Plan:
        plan = super().plan(model, processor, request, recorded)
        plan.data["config"] = model.config
        return plan


HOST = LlavaNextHost()
HOST.register_key_conversions()


def register_auto_classes() -> None:
    """Register the LLaVA-NeXT classes with ``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText``
    and ``AutoProcessor`` (idempotent)."""
    LlavaNextHost.register({LlavaNextForConditionalGeneration: AnchorFormerLlavaNextProcessor})


def attach_anchor_former(
    model: nn.Module,
    processor: Any = None,
    *,
    num_anchors: int = 144,
    connector: str | None = None,
    score: Score | None = None,
    init_projector: bool = True,
    image_budget: int | None = None,
    **kwargs: Any,
) -> AnchorFormerLlavaNextForConditionalGeneration:
    """Switch a ``LlavaNextForConditionalGeneration`` (and its processor) to anchors per view, in place.

    Args:
        model: a built ``LlavaNextForConditionalGeneration`` (e.g. ``llava-hf/llava-v1.6-mistral-7b-hf``), or
            one already attached (re-attach: the rule of :mod:`anchor_former.adapters._host`).
        processor: its ``LlavaNextProcessor``; becomes an :class:`AnchorFormerLlavaNextProcessor` that writes
            the new number of ``<image>`` tokens for every image size.
        num_anchors: K anchors per view (``"select"``: at most the view's candidates; ``"acformer"``: K + 1
            tokens per view).
        connector: ``"acformer"`` (the default), ``"select"`` (training-free, the model's projector),
            ``"perceiver"``, ...; on re-attach, the attached one.
        score: ``"cls"`` (the default: [CLS] attention of ``vision_feature_layer``) or ``"norm"`` (token norms).
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
            is not LLaVA's ``mlp2x_gelu`` for ``"select"``; a processor of another model; a re-attach that
            would discard the connector's weights. The model, its config and the processor are unchanged then.
    """
    attached = attach(
        HOST,
        model,
        processor,
        num_anchors=num_anchors,
        connector=connector,
        score=score,
        init_projector=init_projector,
        image_budget=image_budget,
        **kwargs,
    )
    return cast(AnchorFormerLlavaNextForConditionalGeneration, attached)


#: the family's earlier name for :func:`attach_anchor_former`
