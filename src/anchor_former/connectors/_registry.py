"""One factory for every connector: ``build_connector(name, vision_dim, llm_dim, **kwargs)``.

Swapping connectors is one string::

    connector = build_connector("acformer", 1024, 4096, num_anchors=144)
    connector = build_connector("mlp2x_gelu", 1024, 4096)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from anchor_former._projector import _mlp_depth
from anchor_former.connectors._acformer import AnchorFormer
from anchor_former.connectors._base import Connector
from anchor_former.connectors._cabstractor import CAbstractor
from anchor_former.connectors._mlp import MLPConnector
from anchor_former.connectors._perceiver import PerceiverResampler
from anchor_former.connectors._pooling import AvgPoolConnector
from anchor_former.connectors._select import SelectConnector

__all__ = ["available_connectors", "build_connector"]

_BUILDERS: dict[str, Callable[..., Connector]] = {
    "acformer": AnchorFormer,
    "avgpool": AvgPoolConnector,
    "cabstractor": CAbstractor,
    "identity": lambda vision_dim, llm_dim, **kw: MLPConnector(vision_dim, llm_dim, projector="identity", **kw),
    "linear": lambda vision_dim, llm_dim, **kw: MLPConnector(vision_dim, llm_dim, projector="linear", **kw),
    "mlp2x_gelu": lambda vision_dim, llm_dim, **kw: MLPConnector(vision_dim, llm_dim, projector="mlp2x_gelu", **kw),
    "perceiver": PerceiverResampler,
    "select": SelectConnector,
}


def available_connectors() -> tuple[str, ...]:
    """Names :func:`build_connector` accepts, sorted; any ``mlp{N}x_gelu`` (N >= 1) works too."""
    return tuple(sorted(_BUILDERS))


def build_connector(name: str, vision_dim: int, llm_dim: int, **kwargs: Any) -> Connector:
    """Build connector ``name`` mapping ``vision_dim``-wide ViT tokens to ``llm_dim``-wide LLM tokens.

    Args:
        name: one of :func:`available_connectors` or ``"mlp{N}x_gelu"``:
            ``"acformer"`` (:class:`~anchor_former.AnchorFormer`), ``"mlp2x_gelu"`` / ``"linear"`` /
            ``"identity"`` / ``"mlp{N}x_gelu"`` (:class:`MLPConnector`), ``"avgpool"``
            (:class:`AvgPoolConnector`), ``"cabstractor"`` (:class:`CAbstractor`), ``"perceiver"``
            (:class:`PerceiverResampler`), ``"select"`` (:class:`SelectConnector`, training-free: the anchor
            patches through a wrapped LLaVA projector, no parameters of its own).
        vision_dim: D, width of the ViT features.
        llm_dim: width of the output tokens.
        **kwargs: keyword arguments of that connector's constructor (``device``, ``dtype`` included).

    Returns:
        The connector, an ``nn.Module`` with ``forward(features, anchor_idx=None, *, attention=None,
        key_padding_mask=None)``, ``uses_anchors``, ``num_output_tokens`` and ``analytic_flops``.
    """
    if name in _BUILDERS:
        return _BUILDERS[name](vision_dim, llm_dim, **kwargs)
    depth = _mlp_depth(name)
    if depth is not None and depth >= 1:
        return MLPConnector(vision_dim, llm_dim, projector=name, **kwargs)
    known = ", ".join(repr(n) for n in available_connectors())
    raise ValueError(f"unknown connector name {name!r}; known connectors: {known}, or 'mlp{{N}}x_gelu' (N >= 1)")
