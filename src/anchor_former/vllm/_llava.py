"""vLLM's LLaVA-1.5 (``LlavaForConditionalGeneration``) with visual anchors: architecture
``AnchorFormerLlavaForConditionalGeneration``.

* **Counts** (processor side): each ``<image>`` becomes ``include_cls + K + M`` placeholder tokens (the
  training-free ``"select"`` connector: K anchors, M context tokens, [CLS] first only under
  ``vision_feature_select_strategy="full"``), or the trained connector's token count (``"acformer"``:
  K + 1). K and M come from the request's ``mm_processor_kwargs`` (``num_anchors``, ``num_context``) or
  the model's settings. The processor passes each image's budget and placeholder count to the model as
  a per-image field (``anchor_tokens``), which is also what vLLM's processor cache keys on.
* **Embeddings** (model side): the vision tower (built up to ``vision_feature_layer``) runs once over
  the batch; a hook on its last layer's fused ``qkv_proj`` gives that layer's [CLS] attention rows
  (gathered over tensor-parallel ranks); :class:`~anchor_former.connectors.SelectConnector` picks the anchor
  patches (and merges the context tokens) and the checkpoint's own projector maps them. A trained
  connector saved by ``attach_anchor_former`` runs as saved instead. Each image's embeddings are checked
  against its placeholder count (:mod:`anchor_former.vllm._guard`).
* **Weights**: the stock checkpoint layouts vLLM reads, plus the folders transformers 5 writes
  (``model.vision_tower.*`` without ``vision_model``) and the ``"select"`` connector's
  ``multi_modal_projector.projector.{0,2}.*`` (= the projector's ``linear_1`` / ``linear_2``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anchor_former._optional import require

require("vllm", extra="vllm", feature="anchor_former.vllm (the vLLM plugin's model classes)")

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from anchor_former.vllm._capture import run_with_cls_rows
from anchor_former.vllm._guard import check_counts
from anchor_former.vllm._settings import BUDGET_KEYS, anchor_record, field_rows, request_budget

if TYPE_CHECKING:
    from anchor_former.connectors import SelectConnector

__all__ = [
    "AnchorFieldsProcessorMixin",
    "AnchorFormerLlavaForConditionalGeneration",
    "AnchorFormerLlavaMultiModalProcessor",
    "AnchorFormerLlavaProcessingInfo",
    "LlavaServing",
    "llava_serving",
]

#: the per-image field the processor hands to the model: (num_anchors, num_context, placeholder tokens)
FIELD = "anchor_tokens"


@dataclass(frozen=True)
class LlavaServing:
    """What a served LLaVA-1.5 model does, resolved from its hf config.

    Attributes:
        connector: ``"select"`` (training-free, the checkpoint's projector) or a trained connector's name.
        score: the anchor score (``"cls"``).
        num_anchors: K, the default budget.
        num_context: M, the default context tokens (``"select"``).
        include_cls: [CLS] first (``"select"`` under ``vision_feature_select_strategy="full"``).
        patches: P, patch tokens of one image.
        max_budget: the largest K + M a request may ask for (``"select"``).
        connector_config: the trained connector's constructor arguments (widths excluded).
        fixed_tokens: a trained connector's tokens per image, else None.
    """

    connector: str
    score: str
    num_anchors: int
    num_context: int
    include_cls: bool
    patches: int
    max_budget: int
    connector_config: dict[str, Any]
    fixed_tokens: int | None

    def default_budget(self) -> dict[str, int]:
        return {"num_anchors": self.num_anchors, "num_context": self.num_context}

    def num_tokens(self, budget: Mapping[str, int]) -> int:
        """Placeholder tokens of one image at ``budget``; ``ValueError`` for a budget out of range."""
        if self.fixed_tokens is not None:
            if dict(budget) != self.default_budget():
                raise ValueError(
                    f"mm_processor_kwargs {list(BUDGET_KEYS)} are budgets of the training-free 'select' connector; "
                    f"this model serves a trained {self.connector!r} connector with num_anchors={self.num_anchors}, "
                    f"got {dict(budget)}"
                )
            return self.fixed_tokens
        k, m = int(budget["num_anchors"]), int(budget["num_context"])
        if k + m > self.max_budget:
            raise ValueError(
                f"num_anchors + num_context must be at most {self.max_budget} (the largest budget this engine was "
                f"started for; at most the {self.patches} patches), got num_anchors={k} + num_context={m} = {k + m}"
            )
        return int(self.include_cls) + k + m

    def max_tokens(self) -> int:
        """The most placeholder tokens an image can get (what the engine profiles and caches for)."""
        if self.fixed_tokens is not None:
            return self.fixed_tokens
        return int(self.include_cls) + self.max_budget


def llava_serving(hf_config: Any) -> LlavaServing:
    """Resolve :class:`LlavaServing` from a LLaVA hf config carrying ``anchor_former`` settings.

    Raises:
        ValueError: missing settings, a list ``vision_feature_layer``, a budget that does not fit the patches.
    """
    record = anchor_record(hf_config)
    vision = hf_config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    patches = side * side
    layer = hf_config.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"config.vision_feature_layer must be a single int for AnchorFormer, got {layer!r}")
    config = {k: v for k, v in (record.get("connector_config") or {}).items() if k not in ("vision_dim", "llm_dim")}
    connector = str(record["connector"])
    k = int(config.get("num_anchors", record.get("num_anchors", 144)))
    m = int(config.get("num_context", 0)) if connector == "select" else 0
    strategy = getattr(hf_config, "vision_feature_select_strategy", "default")
    include_cls = bool(config.get("include_cls", strategy == "full"))
    if k < 1 or m < 0 or k + m > patches:
        raise ValueError(
            f"num_anchors + num_context must be at most the {patches} patch tokens of the vision tower (and "
            f"num_anchors >= 1), got num_anchors={k}, num_context={m}"
        )
    max_budget = int(record.get("max_budget") or patches)
    if not k + m <= max_budget <= patches:
        raise ValueError(f"max_budget must lie in [num_anchors + num_context = {k + m}, {patches}], got {max_budget}")
    fixed = None
    if connector != "select":
        fixed = int(saved_connector(hf_config, connector, config, device="meta").num_output_tokens(patches + 1))
    return LlavaServing(
        connector=connector,
        score=str(record.get("score", "cls")),
        num_anchors=k,
        num_context=m,
        include_cls=include_cls,
        patches=patches,
        max_budget=max_budget,
        connector_config=config,
        fixed_tokens=fixed,
    )


def saved_connector(hf_config: Any, connector: str, config: dict[str, Any], **options: Any) -> Any:
    """The connector a saved folder names, built from its saved ``config`` (an MLP name is its own projector):
    ``(vision_config.hidden_size -> text_config.hidden_size)``; ``options`` (e.g. ``device="meta"``) pass through
    to :func:`~anchor_former.connectors.build_connector`."""
    import re

    from anchor_former.connectors import build_connector

    kwargs = dict(config)
    if re.match(r"^(linear|identity|mlp\d+x_gelu)$", connector):
        kwargs.pop("projector", None)
    return build_connector(
        connector,
        int(hf_config.vision_config.hidden_size),
        int(hf_config.text_config.hidden_size),
        **kwargs,
        **options,
    )


class AnchorFormerLlavaProcessingInfo(LlavaProcessingInfo):
    """Placeholder counts at the request's budget; profiling at the largest allowed one."""

    def serving(self) -> LlavaServing:
        return llava_serving(self.get_hf_config())

    def budget(self, mm_kwargs: Mapping[str, object]) -> dict[str, int]:
        """The request's budget: its ``mm_processor_kwargs`` (merged with the engine's) over the default."""
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs)
        return request_budget(merged, self.serving().default_budget())

    def get_num_image_tokens(
        self, *, image_width: int, image_height: int, budget: Mapping[str, int] | None = None
    ) -> int:
        serving = self.serving()
        return serving.num_tokens(serving.default_budget() if budget is None else budget)

    def get_max_image_tokens(self) -> int:
        return self.serving().max_tokens()

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}


def _without_budget(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k not in BUDGET_KEYS}


class AnchorFieldsProcessorMixin:
    """The processor side of every LLaVA-like family: the budget keys never reach the HF processor, each
    image gets its ``anchor_tokens`` row (``[num_anchors, num_context, placeholder tokens]``, a per-image
    field: also what vLLM's processor cache keys on), and each ``<image>`` is replaced by its reduced count.

    Mixed in before a vLLM multimodal processor class; a family implements :meth:`_anchor_rows` and
    :meth:`_image_placeholders`. Other modalities keep the stock prompt updates.
    """

    info: Any

    def _anchor_rows(self, out: BatchFeature, hf_kwargs: Mapping[str, object]) -> list[list[int]]:
        """One ``anchor_tokens`` row per image of the HF processor's output ``out``."""
        raise NotImplementedError

    def _image_placeholders(self, mm_items: Any, item_idx: int, hf_kwargs: Mapping[str, object]) -> int:
        """Placeholder tokens of image ``item_idx`` of the request at its budget."""
        raise NotImplementedError

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        out = super()._apply_hf_processor_main(mm_items, _without_budget(hf_kwargs))  # type: ignore[misc]
        rows = self._anchor_rows(out, hf_kwargs)
        if rows:
            out[FIELD] = torch.tensor(rows, dtype=torch.int64)  # (num_images, 3)
        return out

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),  # type: ignore[misc]
            FIELD: MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any):
        from vllm.multimodal.processing import PromptReplacement

        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            return [image_token_id] * self._image_placeholders(mm_items, item_idx, hf_processor_mm_kwargs)

        stock = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        image = PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)
        return [image, *(update for update in stock if update.modality != "image")]


class AnchorFormerLlavaMultiModalProcessor(AnchorFieldsProcessorMixin, LlavaMultiModalProcessor):
    """LLaVA's processor writing the reduced placeholder count and the per-image ``anchor_tokens`` field."""

    def _anchor_rows(self, out: BatchFeature, hf_kwargs: Mapping[str, object]) -> list[list[int]]:
        pixels = out.get("pixel_values")
        if pixels is None:
            return []
        budget = self.info.budget(hf_kwargs)
        tokens = self.info.get_num_image_tokens(image_width=0, image_height=0, budget=budget)
        return [[budget["num_anchors"], budget["num_context"], tokens]] * len(pixels)

    def _image_placeholders(self, mm_items: Any, item_idx: int, hf_kwargs: Mapping[str, object]) -> int:
        return self.info.get_num_image_tokens(image_width=0, image_height=0, budget=self.info.budget(hf_kwargs))


def saved_weights_mapper(base: WeightsMapper, *, select: bool) -> WeightsMapper:
    """``base`` plus the layouts the package's saved folders use.

    * transformers >= 5.6 saves CLIP towers without ``vision_model``: ``vision_tower.encoder.*`` (with or
      without a leading ``model.``) becomes vLLM's ``vision_tower.vision_model.encoder.*``;
    * ``select``: the ``"select"`` connector stores the projector as ``projector.0`` / ``projector.2``
      (LLaVA's ``mlp2x_gelu``), vLLM's projector calls them ``linear_1`` / ``linear_2``.
    """
    import re

    rules = {re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."}
    if select:
        rules[re.compile(r"^(model\.)?multi_modal_projector\.projector\.0\.")] = r"\1multi_modal_projector.linear_1."
        rules[re.compile(r"^(model\.)?multi_modal_projector\.projector\.2\.")] = r"\1multi_modal_projector.linear_2."
    return WeightsMapper(orig_to_new_regex=rules) | base


@MULTIMODAL_REGISTRY.register_processor(
    AnchorFormerLlavaMultiModalProcessor, info=AnchorFormerLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class AnchorFormerLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 serving K anchor tokens per image (see the module doc)."""

    hf_to_vllm_mapper = saved_weights_mapper(LlavaForConditionalGeneration.hf_to_vllm_mapper, select=True)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        serving = llava_serving(config)  # settings checked before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.serving = serving
        self.hf_to_vllm_mapper = saved_weights_mapper(
            LlavaForConditionalGeneration.hf_to_vllm_mapper, select=serving.connector == "select"
        )
        self._selectors: dict[tuple[int, int, torch.dtype], SelectConnector] = {}
        if self.serving.connector != "select":
            with self._mark_tower_model(vllm_config, "image"):
                self.multi_modal_projector = saved_connector(
                    config, self.serving.connector, self.serving.connector_config
                )

    def _selector(self, k: int, m: int, dtype: torch.dtype) -> SelectConnector:
        """The package's :class:`~anchor_former.connectors.SelectConnector` for budget (K, M) and the features' dtype; its
        projector is never used (the checkpoint's own projector maps the selected features), so it lives on
        the meta device."""
        key = (k, m, dtype)
        if key not in self._selectors:
            from anchor_former.connectors import SelectConnector

            vision = self.config.vision_config
            self._selectors[key] = SelectConnector(
                int(vision.hidden_size),
                int(self.config.text_config.hidden_size),
                num_anchors=k,
                num_context=m,
                include_cls=self.serving.include_cls,
                num_prefix_tokens=1,
                device="meta",
                dtype=dtype,
            )
        return self._selectors[key]

    def _features_and_rows(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, D)`` features of ``vision_feature_layer`` ([CLS] included) and ``(B, H, N)`` [CLS] rows."""
        tower = self.vision_tower
        attention = tower.vision_model.encoder.layers[-1].self_attn
        return run_with_cls_rows(attention, lambda: tower(pixel_values, feature_select_strategy="full"))

    def embed_multimodal(self, **kwargs: object) -> Sequence[torch.Tensor]:
        """Per image ``(T_i, llm_dim)``: the kept tokens at the image's budget, checked against its placeholders."""
        rows = field_rows(kwargs.pop(FIELD, None))
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("AnchorFormer serving needs pixel inputs (image embeddings carry no anchor scores)")
        pixel_values = image_input["pixel_values"]
        if len(rows) != pixel_values.shape[0]:
            raise ValueError(f"{FIELD} must hold one row per image ({pixel_values.shape[0]}), got {len(rows)}")
        features, scores = self._features_and_rows(pixel_values)  # (B, N, D), (B, H, N)
        embeds: list[Any]  # (T_i, llm_dim) per image; the select branch fills every slot
        if self.serving.connector != "select":
            out = (
                self.multi_modal_projector(features, attention=scores)
                if getattr(self.multi_modal_projector, "uses_anchors", False)
                else self.multi_modal_projector(features)
            )
            embeds = list(out)
        else:
            embeds = [None] * len(rows)
            groups: dict[tuple[int, int], list[int]] = {}
            for i, (k, m, _) in enumerate(rows):
                groups.setdefault((k, m), []).append(i)
            for (k, m), index in groups.items():
                picked = self._selector(k, m, features.dtype).select(
                    features[index], attention=scores[index]
                )  # (G, T, D)
                projected = self.multi_modal_projector(picked)  # (G, T, llm_dim)
                for i, tokens in zip(index, projected):
                    embeds[i] = tokens
        check_counts(embeds, [count for _, _, count in rows])
        return embeds

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
