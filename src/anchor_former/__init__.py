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
the features and anchors of one ordinary SDPA forward (no ``output_attentions``). ``attach_anchor_former(model,
processor)`` switches a transformers LLaVA-1.5 / NeXT / OneVision / Qwen-VL model (or a llava-torch LLaVA)
in place, ``kept_tokens`` and ``plot_anchors`` show what it keeps.

The names here are the user story; the building blocks live in ``anchor_former.search``,
``anchor_former.probes`` (``anchor_former.probes.registry``: the extension API for a new encoder family),
``anchor_former.connectors``, ``anchor_former.checkpoint``, ``anchor_former.views``, ``anchor_former.flops``;
each host's family modules in ``anchor_former.adapters``; training in ``anchor_former.train``,
``anchor_former.data``, ``anchor_former.preflight``; serving in ``anchor_former.vllm``; evaluation in
``anchor_former.eval``. Modules and names starting with ``_`` are internal. Documentation: README.md and
docs/ in the repository (``docs/api.md`` lists every public name; a test holds it to the ``__all__`` lists).
"""

from anchor_former.adapters._dispatch import attach_anchor_former, kept_tokens
from anchor_former.connectors import AnchorFormer, AnchorFormerConfig, available_connectors, build_connector
from anchor_former.probes import AnchorExtraction, AttentionProbe, extract_anchors
from anchor_former.search import AnchorSearch, anchor_search, native_search_available
from anchor_former.viz import plot_anchors, save_anchor_plot

__version__ = "0.1.0"

__all__ = [
    # a transformers / llava-torch model switched to anchors, and what it keeps
    "attach_anchor_former",
    "kept_tokens",
    "plot_anchors",
    "save_anchor_plot",
    # anchors from a ViT
    "anchor_search",
    "AnchorSearch",
    "native_search_available",
    "extract_anchors",
    "AnchorExtraction",
    "AttentionProbe",
    # the AcFormer connector, and any connector by name
    "AnchorFormer",
    "AnchorFormerConfig",
    "build_connector",
    "available_connectors",
]
