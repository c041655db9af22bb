"""vLLM's LLaVA-NeXT (``LlavaNextForConditionalGeneration``, anyres views) with visual anchors per view:
architecture ``AnchorFormerLlavaNextForConditionalGeneration``.

The views of an image, their candidate patches (those the stock layout keeps after unpadding), the
anchors per view and the token layout all come from :mod:`anchor_former.views`, the rules the
transformers adapter uses, so the placeholder count of an ``(H, W)`` image and the model's output agree
by construction: ``sum k_v`` kept patches plus one ``image_newline`` per kept row of the high-resolution
grid (``"select"``), or ``T`` tokens per view plus one newline per row of crops (a trained connector).

* ``"select"`` (training-free): K anchors per view (``num_anchors``; a request may set its own through
  ``mm_processor_kwargs``), each view's from its own [CLS] row among its candidates, mapped by the
  checkpoint's projector, in the stock layout restricted to the kept patches. K = every patch is the
  stock model.
* a trained connector saved by ``attach_anchor_former`` (AcFormer: ``K + 1`` tokens per view) runs as saved.

The vision tower runs once over every view of every image, with the [CLS] rows captured from its last
layer's ``qkv_proj`` (gathered across tensor-parallel ranks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from anchor_former._optional import require

require("vllm", extra="vllm", feature="anchor_former.vllm (the vLLM plugin's model classes)")

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.multimodal import MULTIMODAL_REGISTRY

from anchor_former.views import (
    AnyresViews,
    anyres_views,
    arrange_fixed,
    num_fixed_tokens,
    num_selected_tokens,
    select_view_tokens,
    view_budgets,
)
from anchor_former.vllm._capture import run_with_cls_rows
from anchor_former.vllm._guard import check_counts
from anchor_former.vllm._llava import (
    FIELD,
    AnchorFieldsProcessorMixin,
    field_rows,
    saved_connector,
    saved_weights_mapper,
)
from anchor_former.vllm._settings import anchor_record, request_budget

__all__ = [
    "AnchorFormerLlavaNextForConditionalGeneration",
    "AnchorFormerLlavaNextMultiModalProcessor",
    "AnchorFormerLlavaNextProcessingInfo",
    "AnyresInfoMixin",
    "AnyresProcessorMixin",
    "LlavaNextServing",
    "anyres_geometry",
    "llava_next_serving",
]


@dataclass(frozen=True)
class LlavaNextServing:
    """What a served LLaVA-NeXT model does, resolved from its hf config.

    Attributes:
        connector: ``"select"`` or a trained connector's name.
        num_anchors: K per view, the default budget (``"select"``).
        image_budget: one budget per image spread over its views (``"select"``), or None.
        side: ``s``, patches per view side.
        view_size: the tower's input size, pixels.
        patch_size: pixels per patch.
        pinpoints: the grid pinpoints ``[(height, width), ...]``.
        connector_config: the trained connector's constructor arguments.
        tokens_per_view: a trained connector's tokens per view, else None.
    """

    connector: str
    num_anchors: int
    image_budget: int | None
    side: int
    view_size: int
    patch_size: int
    pinpoints: tuple[tuple[int, int], ...]
    connector_config: dict[str, Any]
    tokens_per_view: int | None

    def views(self, height: int, width: int) -> AnyresViews:
        return anyres_views(
            (height, width), grid_pinpoints=self.pinpoints, view_size=self.view_size, patch_size=self.patch_size
        )

    def budgets(self, views: AnyresViews, num_anchors: int) -> tuple[int, ...]:
        if self.image_budget is not None and num_anchors == self.num_anchors:
            return view_budgets(views.num_candidates(), per_image=self.image_budget)
        return view_budgets(views.num_candidates(), per_view=num_anchors)

    def num_tokens(self, height: int, width: int, num_anchors: int) -> int:
        """Placeholder tokens of an ``(height, width)`` image at K = ``num_anchors`` per view."""
        views = self.views(height, width)
        if self.tokens_per_view is not None:
            if num_anchors != self.num_anchors:
                raise ValueError(
                    f"mm_processor_kwargs['num_anchors'] is a budget of the training-free 'select' connector; this "
                    f"model serves a trained {self.connector!r} connector with num_anchors={self.num_anchors}, got "
                    f"{num_anchors}"
                )
            return num_fixed_tokens(views, self.tokens_per_view)
        if num_anchors > self.side * self.side:
            raise ValueError(
                f"num_anchors must be at most the {self.side * self.side} patches of a view, got {num_anchors}"
            )
        return num_selected_tokens(views, self.budgets(views, num_anchors))


def anyres_geometry(hf_config: Any) -> dict[str, Any]:
    """``side``, ``view_size``, ``patch_size`` and ``pinpoints`` of an anyres hf config (LLaVA-NeXT, OneVision).

    Raises:
        ValueError: a list ``vision_feature_layer`` (one layer gives the features and the scores).
    """
    vision = hf_config.vision_config
    view, patch = int(vision.image_size), int(vision.patch_size)
    layer = hf_config.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"config.vision_feature_layer must be a single int for AnchorFormer, got {layer!r}")
    pinpoints = tuple(tuple(int(v) for v in p) for p in hf_config.image_grid_pinpoints)
    return {
        "side": view // patch,
        "view_size": view,
        "patch_size": patch,
        "pinpoints": cast("tuple[tuple[int, int], ...]", pinpoints),
    }


def llava_next_serving(hf_config: Any) -> LlavaNextServing:
    """Resolve :class:`LlavaNextServing` from a LLaVA-NeXT hf config carrying ``anchor_former`` settings."""
    record = anchor_record(hf_config)
    geometry = anyres_geometry(hf_config)
    side = geometry["side"]
    if getattr(hf_config, "vision_feature_select_strategy", "default") != "default":
        raise ValueError("config.vision_feature_select_strategy must be 'default' for LLaVA-NeXT with a CLIP tower")
    config = {k: v for k, v in (record.get("connector_config") or {}).items() if k not in ("vision_dim", "llm_dim")}
    anyres = record.get("anyres") or {}
    connector = str(record["connector"])
    k = int(anyres.get("num_anchors", config.get("num_anchors", 144)))
    if not 1 <= k <= side * side:
        raise ValueError(f"num_anchors must be in [1, {side * side}] (the patches of a view), got {k}")
    per_view = None
    if connector != "select":
        built = saved_connector(hf_config, connector, config, device="meta")
        per_view = int(anyres.get("tokens_per_view") or built.num_output_tokens(side * side + 1))
    budget = anyres.get("image_budget")
    return LlavaNextServing(
        connector=connector,
        num_anchors=k,
        image_budget=None if budget is None else int(budget),
        connector_config=config,
        tokens_per_view=per_view,
        **geometry,
    )


class AnyresInfoMixin:
    """Processing info of an anyres family: placeholder counts from the family's serving record (its
    ``serving()``), profiling at every patch of every view. Mixed in before vLLM's processing info class."""

    ctx: Any

    def serving(self) -> LlavaNextServing:
        raise NotImplementedError

    def num_anchors(self, mm_kwargs: Mapping[str, object]) -> int:
        """The request's K per view: its ``mm_processor_kwargs`` (merged with the engine's) over the default."""
        serving = self.serving()
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs)
        return request_budget(merged, {"num_anchors": serving.num_anchors, "num_context": 0})["num_anchors"]

    def get_num_image_tokens(self, *, image_width: int, image_height: int, num_anchors: int | None = None) -> int:
        serving = self.serving()
        return serving.num_tokens(
            image_height, image_width, serving.num_anchors if num_anchors is None else num_anchors
        )

    def max_image_tokens(self, *sizes: tuple[int, int]) -> int:
        """The most placeholder tokens an image of the pinpoint sizes (or ``sizes``) can get, at any budget."""
        serving = self.serving()
        most = serving.side * serving.side if serving.tokens_per_view is None else serving.num_anchors
        return max(serving.num_tokens(h, w, most) for h, w in (*serving.pinpoints, *sizes))


class AnchorFormerLlavaNextProcessingInfo(AnyresInfoMixin, LlavaNextProcessingInfo):
    """Placeholder counts from :mod:`anchor_former.views`; profiling at every patch of every view."""

    def serving(self) -> LlavaNextServing:
        return llava_next_serving(self.get_hf_config())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.max_image_tokens()}


class AnyresProcessorMixin(AnchorFieldsProcessorMixin):
    """:class:`~anchor_former.vllm._llava.AnchorFieldsProcessorMixin` for anyres families: each image's count
    depends on its size (``image_sizes``) and the request's K per view."""

    def _anchor_rows(self, out: BatchFeature, hf_kwargs: Mapping[str, object]) -> list[list[int]]:
        sizes = out.get("image_sizes")
        if sizes is None:
            return []
        k = self.info.num_anchors(hf_kwargs)
        return [
            [k, 0, self.info.get_num_image_tokens(image_width=int(w), image_height=int(h), num_anchors=k)]
            for h, w in torch.as_tensor(sizes).tolist()
        ]

    def _image_placeholders(self, mm_items: Any, item_idx: int, hf_kwargs: Mapping[str, object]) -> int:
        from vllm.multimodal.parse import ImageProcessorItems

        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        k = self.info.num_anchors(hf_kwargs)
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height, num_anchors=k)


class AnchorFormerLlavaNextMultiModalProcessor(AnyresProcessorMixin, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's processor writing each image's reduced count and the per-image ``anchor_tokens`` field."""


@MULTIMODAL_REGISTRY.register_processor(
    AnchorFormerLlavaNextMultiModalProcessor,
    info=AnchorFormerLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class AnchorFormerLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT serving anchors per view (see the module doc)."""

    hf_to_vllm_mapper = saved_weights_mapper(LlavaNextForConditionalGeneration.hf_to_vllm_mapper, select=True)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        serving = llava_next_serving(config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.serving = serving
        self.hf_to_vllm_mapper = saved_weights_mapper(
            LlavaNextForConditionalGeneration.hf_to_vllm_mapper, select=serving.connector == "select"
        )
        if serving.connector != "select":
            with self._mark_tower_model(vllm_config, "image"):
                self.multi_modal_projector = saved_connector(config, serving.connector, serving.connector_config)

    def _image_tokens(self, views: AnyresViews, k: int, features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """One image's ``(T, llm_dim)`` tokens from its views' ``(V, N, D)`` features and ``(V, H, N)`` rows."""
        connector = self.multi_modal_projector
        if self.serving.tokens_per_view is None:
            return select_view_tokens(
                views,
                self.serving.budgets(views, k),
                features,
                scores,
                num_prefix_tokens=1,
                projector=connector,
                newline=self.image_newline,
            )
        out = (
            connector(features, attention=scores) if getattr(connector, "uses_anchors", False) else connector(features)
        )
        return arrange_fixed(views, out, self.image_newline)  # out: (V, T, llm_dim)

    def embed_multimodal(self, **kwargs: object) -> Sequence[torch.Tensor]:
        """Per image ``(T_i, llm_dim)``, checked against its placeholder count."""
        rows = field_rows(kwargs.pop(FIELD, None))
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("AnchorFormer serving needs pixel inputs (image embeddings carry no anchor scores)")
        pixel_values, sizes = image_input["pixel_values"], torch.as_tensor(image_input["image_sizes"]).tolist()
        views = [self.serving.views(int(h), int(w)) for h, w in sizes]
        if len(rows) != len(views):
            raise ValueError(f"{FIELD} must hold one row per image ({len(views)}), got {len(rows)}")
        per_image = [pix[: v.num_views] for pix, v in zip(pixel_values, views)]  # drop padded views
        stacked = torch.cat(list(per_image), dim=0)  # (sum V_i, C, H_img, W_img)
        tower = self.vision_tower
        attention = tower.vision_model.encoder.layers[-1].self_attn
        features, scores = run_with_cls_rows(attention, lambda: tower(stacked, feature_select_strategy="full"))
        embeds, start = [], 0
        for image_views, (k, _, _) in zip(views, rows):
            n = image_views.num_views
            embeds.append(self._image_tokens(image_views, k, features[start : start + n], scores[start : start + n]))
            start += n
        check_counts(embeds, [count for _, _, count in rows])
        return embeds

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
