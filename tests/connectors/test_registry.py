"""Tests for build_connector / available_connectors and the shared connector interface."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from anchor_former import anchor_search, available_connectors, build_connector
from anchor_former.connectors import Connector

D, LLM, SIDE = 16, 24, 6
N = 1 + SIDE * SIDE
TINY = {
    "acformer": dict(num_anchors=8, depth=1, heads=2, dim_head=8, ff_mult=2, fused_attn=False),
    "perceiver": dict(num_queries=5, depth=1, heads=2, dim_head=8, ff_mult=2, fused_attn=False),
    "cabstractor": dict(depth=1, grid=2),
    "select": dict(num_anchors=8),
}


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def build(name: str) -> Connector:
    return build_connector(name, D, D if name == "identity" else LLM, **TINY.get(name, {}))


def test_available_connectors() -> None:
    names = available_connectors()
    assert set(names) >= {"acformer", "avgpool", "cabstractor", "identity", "linear", "mlp2x_gelu", "perceiver"}
    assert list(names) == sorted(names)


@pytest.mark.parametrize("name", [*available_connectors(), "mlp3x_gelu"])
def test_every_connector_follows_the_interface(name: str) -> None:
    connector = build(name)
    assert isinstance(connector, Connector) and isinstance(connector.uses_anchors, bool)
    params = inspect.signature(connector.forward).parameters
    assert list(params) == ["features", "anchor_idx", "attention", "key_padding_mask"]
    assert params["attention"].kind is inspect.Parameter.KEYWORD_ONLY
    features, attention = torch.randn(2, N, D), torch.rand(2, 4, N)
    out = connector(features, anchor_search(attention, 8))
    assert out.shape == (2, connector.num_output_tokens(N), connector.llm_dim)
    assert connector(features, attention=attention).shape == out.shape
    with FlopCounterMode(display=False) as counter:
        connector(features, anchor_search(attention, 8))
    assert counter.get_total_flops() == 2 * connector.analytic_flops(N)


@pytest.mark.parametrize("name", available_connectors())
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_every_connector_rejects_bad_widths(name: str, bad: object) -> None:
    kwargs = TINY.get(name, {})
    with pytest.raises(ValueError, match=rf"vision_dim must be an integer >= 1, got {bad!r}"):
        build_connector(name, bad, LLM, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"llm_dim must be an integer >= 1, got {bad!r}"):
        build_connector(name, D, bad, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_prefix_tokens must be an integer >= 0, got -1"):
        build_connector(name, D, D if name == "identity" else LLM, num_prefix_tokens=-1, **kwargs)


def test_llava_token_counts() -> None:
    counts = {
        name: build_connector(name, 1024, 1024 if name == "identity" else 4096, device="meta").num_output_tokens(577)
        for name in available_connectors()
    }
    assert counts == {
        "acformer": 145,
        "avgpool": 144,
        "cabstractor": 144,
        "identity": 576,
        "linear": 576,
        "mlp2x_gelu": 576,
        "perceiver": 144,
        "select": 144,
    }


def test_kwargs_reach_the_connector() -> None:
    assert build_connector("avgpool", D, LLM, pool=3).num_output_tokens(N) == 4
    assert build_connector("mlp2x_gelu", D, LLM, num_prefix_tokens=0).num_output_tokens(N) == N


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown connector name 'qformer'.*'acformer'.*'perceiver'.*mlp\{N\}x_gelu"):
        build_connector("qformer", D, LLM)
