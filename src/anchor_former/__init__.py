"""anchor-former: the AcFormer vision-language connector as a drop-in PyTorch package.

Public API (also listed in ``docs/api.md``). Modules add their names here explicitly.
"""

from anchor_former import adapters, checkpoint, flops, views
from anchor_former.search import AnchorSearch, anchor_quotas, anchor_search, cls_scores, native_search_available
from anchor_former.attention import CrossAttention
from anchor_former.connectors import (
    AvgPoolConnector,
    CAbstractor,
    Connector,
    MLPConnector,
    PerceiverResampler,
    SelectConnector,
)
from anchor_former.connectors.registry import available_connectors, build_connector
from anchor_former.former import AnchorFormer, AnchorFormerConfig
from anchor_former.projector import build_projector
from anchor_former.probes import (
    AnchorExtraction,
    AttentionProbe,
    EncoderSpec,
    cls_attention_probe,
    detect_encoder,
    extract_anchors,
    received_attention,
    token_norm_scores,
)
from anchor_former.viz import plot_anchors, save_anchor_plot

__version__ = "0.1.0"

__all__ = [
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
    "cls_attention_probe",
    "detect_encoder",
    "extract_anchors",
    "received_attention",
    "token_norm_scores",
    "plot_anchors",
    "save_anchor_plot",
]
