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

**Videos**: the stock model projects every frame's patches, pools them 2 x 2 (bilinear) and appends one
``image_newline`` per video; the plugin keeps ``T`` anchors per frame among the pooled tokens, ranked by the
frame's received attention pooled the same way (the adapter's ``frame_anchors``; ``T = min(K, pooled
tokens)`` unless the folder saved its own), so a video of F frames has ``F * T + 1`` tokens. A request's
``num_anchors`` sets ``T = min(num_anchors, pooled tokens)`` for its videos too.

K = every patch (and T = every pooled token) is the stock model. Only the training-free ``"select"``
connector is served; a trained connector's folder is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anchor_former._optional import require

require("vllm", extra="vllm", feature="anchor_former.vllm (the vLLM plugin's model classes)")

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from anchor_former.adapters.hf.llava_onevision import (
    select_image_tokens,
    select_pooled_tokens,
    selected_token_count,
)
from anchor_former.views import AnyresViews
from anchor_former.vllm._capture import run_with_scores
from anchor_former.vllm._guard import check_counts
from anchor_former.vllm._llava import FIELD, field_rows, saved_weights_mapper
from anchor_former.vllm._llava_next import AnyresInfoMixin, AnyresProcessorMixin, LlavaNextServing, anyres_geometry
from anchor_former.vllm._settings import anchor_record

__all__ = [
    "VIDEO_FIELD",
    "AnchorFormerLlavaOnevisionForConditionalGeneration",
    "AnchorFormerLlavaOnevisionMultiModalProcessor",
    "AnchorFormerLlavaOnevisionProcessingInfo",
    "LlavaOnevisionServing",
    "llava_onevision_serving",
]


#: the per-video field the processor hands to the model: (tokens per frame, placeholder tokens)
VIDEO_FIELD = "anchor_video_tokens"


@dataclass(frozen=True, kw_only=True)
class LlavaOnevisionServing(LlavaNextServing):
    """:class:`~anchor_former.vllm._llava_next.LlavaNextServing` plus the grid shrink and the videos of OneVision.

    Attributes:
        vision_aspect_ratio: ``"anyres_max_N"``, from the hf config (as transformers reads it).
        pooled: ``n'``, a video frame's tokens after the stock 2 x 2 pooling.
        tokens_per_frame: T, the default anchors per video frame.
    """

    vision_aspect_ratio: str
    pooled: int
    tokens_per_frame: int

    def frame_tokens(self, num_anchors: int) -> int:
        """T per frame at a request's K: the saved T at the default K, else ``min(K, n')``."""
        return self.tokens_per_frame if num_anchors == self.num_anchors else min(num_anchors, self.pooled)

    def num_video_tokens(self, num_frames: int, num_anchors: int) -> int:
        """Placeholder tokens of a video of ``num_frames`` frames at K = ``num_anchors``: ``F * T + 1``."""
        if num_frames < 1:
            raise ValueError(f"a video must have at least one frame, got num_frames={num_frames}")
        return num_frames * self.frame_tokens(num_anchors) + 1

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
    pooled = math.ceil(side / 2) ** 2  # the stock 2 x 2 pooling (apply_pooling's stride)
    frames = int((record.get("video") or {}).get("tokens_per_frame") or min(k, pooled))
    if not 1 <= frames <= pooled:
        raise ValueError(f"tokens_per_frame must be in [1, {pooled}] (a frame's pooled tokens), got {frames}")
    return LlavaOnevisionServing(
        connector="select",
        num_anchors=k,
        image_budget=None if budget is None else int(budget),
        connector_config={},
        tokens_per_view=None,
        vision_aspect_ratio=str(getattr(hf_config, "vision_aspect_ratio", "anyres_max_9")),
        pooled=pooled,
        tokens_per_frame=frames,
        **geometry,
    )


class AnchorFormerLlavaOnevisionProcessingInfo(AnyresInfoMixin, LlavaOnevisionProcessingInfo):
    """Image placeholder counts from the transformers adapter's rules; videos as the stock model."""

    def serving(self) -> LlavaOnevisionServing:
        return llava_onevision_serving(self.get_hf_config())

    def get_num_video_tokens(
        self, *, image_width: int, image_height: int, num_frames: int, num_anchors: int | None = None
    ) -> int:
        serving = self.serving()
        return serving.num_video_tokens(num_frames, serving.num_anchors if num_anchors is None else num_anchors)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        size = self.get_image_size_with_most_features()  # the image vLLM profiles with
        serving = self.serving()
        frames = self.get_num_frames_with_most_features(seq_len, mm_counts)
        return {
            "image": self.max_image_tokens((size.height, size.width)),
            "video": frames * max(serving.pooled, serving.tokens_per_frame) + 1,  # any request's T
        }


class AnchorFormerLlavaOnevisionMultiModalProcessor(AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor):
    """OneVision's processor writing each image's and each video's reduced count, and the per-image
    ``anchor_tokens`` / per-video ``anchor_video_tokens`` fields."""

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)  # images' rows; budget keys kept from HF
        videos = out.get("pixel_values_videos")
        if videos is not None:
            serving, k = self.info.serving(), self.info.num_anchors(hf_kwargs)
            rows = [[serving.frame_tokens(k), serving.num_video_tokens(len(video), k)] for video in videos]
            out[VIDEO_FIELD] = torch.tensor(rows, dtype=torch.int64)  # (num_videos, 2)
        return out

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            VIDEO_FIELD: MultiModalFieldConfig.batched("video"),
        }

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any):
        from vllm.multimodal.parse import VideoProcessorItems
        from vllm.multimodal.processing import PromptReplacement

        video_token_id = self.info.get_hf_config().video_token_index
        k = self.info.num_anchors(hf_processor_mm_kwargs)

        def replacement(item_idx: int) -> list[int]:
            frames = mm_items.get_items("video", VideoProcessorItems).get_num_frames(item_idx)
            return [video_token_id] * self.info.serving().num_video_tokens(frames, k)

        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        video = PromptReplacement(modality="video", target=[video_token_id], replacement=replacement)
        return [*(update for update in updates if update.modality != "video"), video]


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

    def _anchor_videos(self, video_input: Any, rows: list[list[int]]) -> list[torch.Tensor]:
        """Per video ``(F_i * T_i + 1, llm_dim)``: T_i anchors per frame among its pooled tokens, then one
        ``image_newline``; checked against the row's placeholder count."""
        videos = list(video_input["pixel_values_videos"])  # each (F_i, C, H, W)
        if len(rows) != len(videos):
            raise ValueError(f"{VIDEO_FIELD} must hold one row per video ({len(videos)}), got {len(rows)}")
        tower = self.vision_tower
        attention = tower.vision_model.encoder.layers[-1].self_attn
        stacked = torch.cat(videos)  # (sum F_i, C, H, W)
        features, scores = run_with_scores(
            attention, lambda: tower(stacked, feature_select_strategy="full"), score="received"
        )  # (sum F_i, N, D), (sum F_i, H, N)
        pooled = self.apply_pooling(self.multi_modal_projector(features))  # (sum F_i, n', L), the stock pooling
        pooled_scores = self.apply_pooling(scores.transpose(1, 2)).transpose(1, 2)  # (sum F_i, H, n')
        embeds, start = [], 0
        for video, (t, _) in zip(videos, rows):
            f = video.shape[0]
            kept = select_pooled_tokens(pooled[start : start + f], pooled_scores[start : start + f], t)  # (F, T, L)
            embeds.append(torch.cat([kept.flatten(0, 1), self.image_newline[None].to(kept.dtype)]))
            start += f
        check_counts(embeds, [count for _, count in rows], modality="video")
        return embeds

    def embed_multimodal(self, **kwargs: object) -> Sequence[torch.Tensor]:
        """Per image and per video ``(T_i, llm_dim)`` anchors, in the prompt's modality order."""
        rows = field_rows(kwargs.pop(FIELD, None))
        video_rows = field_rows(kwargs.pop(VIDEO_FIELD, None))
        embeds: list[torch.Tensor] = []
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                embeds.extend(self._anchor_images(inputs, rows))
            else:
                embeds.extend(self._anchor_videos(inputs, video_rows))
        return embeds

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
