"""Vision-language connectors behind one interface (:class:`Connector`).

:func:`~anchor_former.connectors.registry.build_connector` (also exported at the package top level)
builds any of them by name; it lives in ``registry`` and is not imported here because it depends on
:mod:`anchor_former.former`, which itself imports :mod:`anchor_former.connectors.base`.
"""

from __future__ import annotations

from anchor_former.connectors.base import Connector, ConnectorConfig, grid_side
from anchor_former.connectors.cabstractor import CAbstractor, CAbstractorConfig
from anchor_former.connectors.mlp import MLPConnector, MLPConnectorConfig
from anchor_former.connectors.perceiver import PerceiverResampler, PerceiverResamplerConfig
from anchor_former.connectors.pooling import AvgPoolConnector, AvgPoolConnectorConfig
from anchor_former.connectors.resampler import ResamplerConnector
from anchor_former.connectors.select import SelectConnector, SelectConnectorConfig, merge_context

__all__ = [
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
    "ResamplerConnector",
    "SelectConnector",
    "SelectConnectorConfig",
    "grid_side",
    "merge_context",
]
