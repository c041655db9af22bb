"""vLLM's Qwen3-VL keeping K merged visual tokens per image at their original M-RoPE positions: architecture
``AnchorFormerQwen3VLForConditionalGeneration`` (reached with ``hf_overrides(num_anchors=K, family="qwen3_vl")``
or from a folder the transformers adapter saved).

What it does is in :mod:`anchor_former.vllm._qwen` (shared with Qwen2.5-VL). Qwen3-VL's tower has no
windows (every block attends over the whole image; the score block is the last one by default), and its
"deepstack" features (taken from intermediate blocks, added to the first LLM layers at the visual
positions) are concatenated to each merged token by vLLM's tower, so a kept token keeps its own.
"""

from __future__ import annotations

from anchor_former._optional import require

require("vllm", extra="vllm", feature="anchor_former.vllm (the vLLM plugin's model classes)")

from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from anchor_former.vllm._qwen import QwenAnchorModel, QwenAnchorProcessingInfo, QwenAnchorProcessor

__all__ = [
    "AnchorFormerQwen3VLForConditionalGeneration",
    "AnchorFormerQwen3VLMultiModalProcessor",
    "AnchorFormerQwen3VLProcessingInfo",
]


class AnchorFormerQwen3VLProcessingInfo(QwenAnchorProcessingInfo, Qwen3VLProcessingInfo):
    """Qwen3-VL's processing info, images only."""

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # Qwen3-VL's own adds keys to the video scope, which an image-only model does not have
        return super(Qwen3VLProcessingInfo, self).get_supported_mm_processor_kwargs()


class AnchorFormerQwen3VLMultiModalProcessor(QwenAnchorProcessor, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's processor writing the kept count of placeholders per image."""


@MULTIMODAL_REGISTRY.register_processor(
    AnchorFormerQwen3VLMultiModalProcessor,
    info=AnchorFormerQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class AnchorFormerQwen3VLForConditionalGeneration(QwenAnchorModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL serving K merged tokens per image (with their deepstack features) at their original positions."""
