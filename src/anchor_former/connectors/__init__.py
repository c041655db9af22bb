"""Vision-language connectors behind one interface (:class:`Connector`): AcFormer (``acformer``), LLaVA's
MLP, average pooling, C-Abstractor, the Perceiver resampler and the training-free selection.

:func:`build_connector` (also exported at the package top level) builds any of them by name; each one
round-trips through its config (``type(c).from_config(c.config)``) and converts the checkpoint layouts
it comes from (``c.convert_checkpoint(state_dict)``).
"""

from __future__ import annotations

from anchor_former.connectors._acformer import AnchorFormer, AnchorFormerConfig
from anchor_former.connectors._base import Connector, ConnectorConfig
from anchor_former.connectors._cabstractor import CAbstractor, CAbstractorConfig
from anchor_former.connectors._mlp import MLPConnector, MLPConnectorConfig
from anchor_former.connectors._perceiver import PerceiverResampler, PerceiverResamplerConfig
from anchor_former.connectors._pooling import AvgPoolConnector, AvgPoolConnectorConfig
from anchor_former.connectors._registry import available_connectors, build_connector
from anchor_former.connectors._select import SelectConnector, SelectConnectorConfig, merge_context

__all__ = [
    "AnchorFormer",
    "AnchorFormerConfig",
    "AvgPoolConnector",
    "AvgPoolConnectorConfig",
    "CAbstractor",
    "CAbstractorConfig",
    "Connector",
    "ConnectorConfig",
    "MLPConnector",
    "MLPConnectorConfig",
    "PerceiverResampler",
    "PerceiverResamplerConfig",
    "SelectConnector",
    "SelectConnectorConfig",
    "available_connectors",
    "build_connector",
    "merge_context",
]
