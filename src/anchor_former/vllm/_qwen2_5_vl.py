"""vLLM's Qwen2.5-VL keeping K merged visual tokens per image at their original M-RoPE positions: architecture
``AnchorFormerQwen2_5_VLForConditionalGeneration`` (reached with
``hf_overrides(num_anchors=K, family="qwen2_5_vl")`` or from a folder the transformers adapter saved).

What it does is in :mod:`anchor_former.vllm._qwen` (shared with Qwen3-VL). Qwen2.5-VL's tower runs its
blocks in window order; the scores of its full-attention score block are put back in the merger's output
order with the tower's own ``reverse_indices``.
"""

from __future__ import annotations

from anchor_former._optional import require

require("vllm", extra="vllm", feature="anchor_former.vllm (the vLLM plugin's model classes)")

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from anchor_former.vllm._qwen import QwenAnchorModel, QwenAnchorProcessingInfo, QwenAnchorProcessor

__all__ = [
    "AnchorFormerQwen2_5_VLForConditionalGeneration",
    "AnchorFormerQwen2_5_VLMultiModalProcessor",
    "AnchorFormerQwen2_5_VLProcessingInfo",
]


class AnchorFormerQwen2_5_VLProcessingInfo(QwenAnchorProcessingInfo, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info, images only."""


class AnchorFormerQwen2_5_VLMultiModalProcessor(QwenAnchorProcessor, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor writing the kept count of placeholders per image."""


@MULTIMODAL_REGISTRY.register_processor(
    AnchorFormerQwen2_5_VLMultiModalProcessor,
    info=AnchorFormerQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class AnchorFormerQwen2_5_VLForConditionalGeneration(QwenAnchorModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL serving K merged tokens per image at their original positions."""
