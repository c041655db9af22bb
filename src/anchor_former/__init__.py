"""anchor-former: the AcFormer vision-language connector as a drop-in PyTorch package.

From a ViT layer's tokens and its [CLS] attention to one LLM token per visual anchor:

>>> import torch
>>> from anchor_former import AnchorFormer, anchor_search
>>> features = torch.randn(2, 577, 1024)          # (B, N, D): CLIP ViT-L/14-336 layer -2, [CLS] first
>>> attention = torch.rand(2, 16, 577).softmax(-1)  # (B, H, N): that layer's [CLS] attention row per head
>>> anchor_idx = anchor_search(attention, 144)      # (B, 145): [CLS], then 144 anchors in raster order
>>> connector = AnchorFormer(vision_dim=1024, llm_dim=4096, num_anchors=144)
>>> connector(features, anchor_idx).shape          # what the LLM sees instead of 576 patch tokens
torch.Size([2, 145, 4096])

With a Hugging Face or timm ViT, ``extract_anchors(vit, pixel_values, num_anchors=144, layer=-2)`` gives
the features and anchors of one ordinary SDPA forward (no ``output_attentions``). Adapters for LLaVA and
transformers' ``LlavaForConditionalGeneration`` are in ``anchor_former.adapters``; the benchmark suite
runs with ``python -m benchmarks.run`` from a clone. Documentation: README.md and docs/ in the
repository (``docs/api.md`` lists every public name, the same as ``__all__`` here).
"""

from anchor_former import adapters, checkpoint, flops, views
from anchor_former.adapters.dispatch import attach_anchor_former, kept_tokens
from anchor_former.attention import CrossAttention
from anchor_former.connectors import (
    AnchorFormer,
    AnchorFormerConfig,
    AvgPoolConnector,
    CAbstractor,
    Connector,
    MLPConnector,
    PerceiverResampler,
    SelectConnector,
    available_connectors,
    build_connector,
)
from anchor_former.probes import (
    AnchorExtraction,
    AttentionProbe,
    EncoderSpec,
    detect_encoder,
    extract_anchors,
    received_attention,
    token_norm_scores,
)
from anchor_former.projector import build_projector
from anchor_former.search import AnchorSearch, anchor_quotas, anchor_search, cls_scores, native_search_available
from anchor_former.viz import plot_anchors, save_anchor_plot

__version__ = "0.1.0"

__all__ = [
    "attach_anchor_former",
    "kept_tokens",
    "AnchorFormer",
    "AnchorFormerConfig",
    "AnchorSearch",
    "AvgPoolConnector",
    "CAbstractor",
    "Connector",
    "CrossAttention",
    "MLPConnector",
    "PerceiverResampler",
    "SelectConnector",
    "anchor_quotas",
    "anchor_search",
    "cls_scores",
    "native_search_available",
    "available_connectors",
    "build_connector",
    "build_projector",
    "flops",
    "adapters",
    "checkpoint",
    "views",
    "AnchorExtraction",
    "AttentionProbe",
    "EncoderSpec",
    "detect_encoder",
    "extract_anchors",
    "received_attention",
    "token_norm_scores",
    "plot_anchors",
    "save_anchor_plot",
]
