"""vLLM's LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``: SigLIP, anyres views, ``anyres_max``
shrink) with visual anchors per view: architecture ``AnchorFormerLlavaOnevisionForConditionalGeneration``.

The rules are the transformers adapter's (:mod:`anchor_former.adapters.hf.llava_onevision`), called here,
so the placeholder count of an ``(H, W)`` image and the model's output agree with it by construction:

* K anchors per view (``num_anchors``; a request may set its own through ``mm_processor_kwargs``) among the
  patches the stock layout keeps after unpadding, each view's ranked by its own ``"received"`` score (the
  attention each patch receives from all queries of ``vision_feature_layer``, per head: SigLIP has no
  [CLS]), captured from that layer's fused ``qkv_proj`` and gathered across tensor-parallel ranks;
* when the unpadded high-resolution grid exceeds ``anyres_max_N`` (``config.vision_aspect_ratio``), the
  crops' projected tokens and their scores are shrunk bilinearly as the stock model shrinks the grid, and
  the high-resolution anchors are chosen among the cells of the shrunk grid;
* kept patches in the stock layout, one ``image_newline`` per kept row of the high-resolution grid.

K = every patch is the stock model. Videos are served as by the stock model (every frame's 2 x 2-pooled
tokens). Only the training-free ``"select"`` connector is served; a trained connector's folder is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anchor_former._optional import require

require("vllm", extra="vllm", feature="anchor_former.vllm (the vLLM plugin's model classes)")

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.multimodal import MULTIMODAL_REGISTRY

from anchor_former.adapters.hf.llava_onevision import select_image_tokens, selected_token_count
from anchor_former.views import AnyresViews
from anchor_former.vllm._capture import run_with_scores
from anchor_former.vllm._guard import check_counts
from anchor_former.vllm._llava import FIELD, field_rows, saved_weights_mapper
from anchor_former.vllm._llava_next import AnyresInfoMixin, AnyresProcessorMixin, LlavaNextServing, anyres_geometry
from anchor_former.vllm._settings import anchor_record

__all__ = [
    "AnchorFormerLlavaOnevisionForConditionalGeneration",
    "AnchorFormerLlavaOnevisionMultiModalProcessor",
    "AnchorFormerLlavaOnevisionProcessingInfo",
    "LlavaOnevisionServing",
    "llava_onevision_serving",
]


@dataclass(frozen=True)
class LlavaOnevisionServing(LlavaNextServing):
    """:class:`~anchor_former.vllm._llava_next.LlavaNextServing` plus the grid shrink of OneVision.

    Attributes:
        vision_aspect_ratio: ``"anyres_max_N"``, from the hf config (as transformers reads it).
    """

    vision_aspect_ratio: str = "anyres_max_9"

    def num_tokens(self, height: int, width: int, num_anchors: int) -> int:
        """Placeholder tokens of an ``(height, width)`` image at K = ``num_anchors`` per view."""
        if num_anchors > self.side * self.side:
            raise ValueError(
                f"num_anchors must be at most the {self.side * self.side} patches of a view, got {num_anchors}"
            )
        views = self.views(height, width)
        return selected_token_count(
            views, self.budgets(views, num_anchors), vision_aspect_ratio=self.vision_aspect_ratio
        )


def llava_onevision_serving(hf_config: Any) -> LlavaOnevisionServing:
    """Resolve :class:`LlavaOnevisionServing` from a LLaVA-OneVision hf config carrying ``anchor_former`` settings.

    Raises:
        ValueError: missing settings; a connector other than ``"select"``; a score other than ``"received"``;
            a tower with [CLS] (``vision_feature_select_strategy`` other than ``"full"``); a list
            ``vision_feature_layer``; ``num_anchors`` outside ``[1, s * s]``.
    """
    record = anchor_record(hf_config)
    geometry = anyres_geometry(hf_config)
    side = geometry["side"]
    if record["connector"] != "select":
        raise ValueError(
            "LLaVA-OneVision is served with the training-free 'select' connector only, got a folder with "
            f"connector={record['connector']!r}; serve it with transformers (attach_anchor_former)"
        )
    if record.get("score") != "received":
        raise ValueError(f"LLaVA-OneVision's SigLIP tower is ranked by score='received', got {record.get('score')!r}")
    strategy = getattr(hf_config, "vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ValueError(
            f"config.vision_feature_select_strategy must be 'full' (a SigLIP tower, no [CLS]), got {strategy!r}"
        )
    anyres = record.get("anyres") or {}
    k = int(anyres.get("num_anchors", record["connector_config"].get("num_anchors", 144)))
    if not 1 <= k <= side * side:
        raise ValueError(f"num_anchors must be in [1, {side * side}] (the patches of a view), got {k}")
    budget = anyres.get("image_budget")
    return LlavaOnevisionServing(
        connector="select",
        num_anchors=k,
        image_budget=None if budget is None else int(budget),
        connector_config={},
        tokens_per_view=None,
        vision_aspect_ratio=str(getattr(hf_config, "vision_aspect_ratio", "anyres_max_9")),
        **geometry,
    )


class AnchorFormerLlavaOnevisionProcessingInfo(AnyresInfoMixin, LlavaOnevisionProcessingInfo):
    """Image placeholder counts from the transformers adapter's rules; videos as the stock model."""

    def serving(self) -> LlavaOnevisionServing:
        return llava_onevision_serving(self.get_hf_config())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        size = self.get_image_size_with_most_features()  # the image vLLM profiles with
        return {
            "image": self.max_image_tokens((size.height, size.width)),
            "video": self.get_max_video_tokens(seq_len, mm_counts),
        }


class AnchorFormerLlavaOnevisionMultiModalProcessor(AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor):
    """OneVision's processor writing each image's reduced count and the per-image ``anchor_tokens`` field."""


@MULTIMODAL_REGISTRY.register_processor(
    AnchorFormerLlavaOnevisionMultiModalProcessor,
    info=AnchorFormerLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class AnchorFormerLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision serving anchors per view (see the module doc)."""

    hf_to_vllm_mapper = saved_weights_mapper(LlavaOnevisionForConditionalGeneration.hf_to_vllm_mapper, select=True)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        serving = llava_onevision_serving(vllm_config.model_config.hf_config)  # checked before any allocation
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.serving = serving

    def _anchor_images(self, image_input: Any, rows: list[list[int]]) -> list[torch.Tensor]:
        """Per image ``(T_i, llm_dim)`` at its row's K, checked against the row's placeholder count."""
        if image_input["type"] != "pixel_values":
            raise ValueError("AnchorFormer serving needs pixel inputs (image embeddings carry no anchor scores)")
        pixel_values, sizes = image_input["pixel_values"], torch.as_tensor(image_input["image_sizes"]).tolist()
        views: list[AnyresViews] = [self.serving.views(int(h), int(w)) for h, w in sizes]
        if len(rows) != len(views):
            raise ValueError(f"{FIELD} must hold one row per image ({len(views)}), got {len(rows)}")
        stacked = torch.cat([pix[: v.num_views] for pix, v in zip(pixel_values, views)])  # (sum V_i, C, H, W)
        tower = self.vision_tower
        attention = tower.vision_model.encoder.layers[-1].self_attn
        features, scores = run_with_scores(
            attention, lambda: tower(stacked, feature_select_strategy="full"), score="received"
        )  # (sum V_i, N, D), (sum V_i, H, N)
        embeds, start = [], 0
        for image_views, (k, _, _) in zip(views, rows):
            n = image_views.num_views
            embeds.append(
                select_image_tokens(
                    image_views,
                    self.serving.budgets(image_views, k),
                    features[start : start + n],
                    scores[start : start + n],
                    vision_aspect_ratio=self.serving.vision_aspect_ratio,
                    prefix=0,
                    projector=self.multi_modal_projector,
                    newline=self.image_newline,
                )
            )
            start += n
        check_counts(embeds, [count for _, _, count in rows])
        return embeds

    def embed_multimodal(self, **kwargs: object) -> Sequence[torch.Tensor]:
        """Per image ``(T_i, llm_dim)`` (anchors), per video the stock tokens, in the prompt's modality order."""
        rows = field_rows(kwargs.pop(FIELD, None))
        embeds: list[torch.Tensor] = []
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                embeds.extend(self._anchor_images(inputs, rows))
            else:
                embeds.extend(self._process_video_pixels(inputs))
        return embeds

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
