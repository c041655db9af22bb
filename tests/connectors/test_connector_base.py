"""Tests for the input checks every connector inherits from anchor_former.connectors._base.Connector."""

from __future__ import annotations

import pytest
import torch

from anchor_former import anchor_search, available_connectors, build_connector

D, LLM, SIDE = 16, 24, 6
N = 1 + SIDE * SIDE
TINY = {
    "acformer": dict(num_anchors=8, depth=1, heads=2, dim_head=8, ff_mult=2),
    "perceiver": dict(num_queries=5, depth=1, heads=2, dim_head=8, ff_mult=2),
    "cabstractor": dict(depth=1, grid=2),
    "select": dict(num_anchors=8),
}
WITH_PARAMETERS = [name for name in available_connectors() if name != "identity"]


def build(name: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return build_connector(name, D, D if name == "identity" else LLM, dtype=dtype, **TINY.get(name, {}))


@pytest.mark.parametrize("name", WITH_PARAMETERS)
@pytest.mark.parametrize(("params", "features"), [(torch.float32, torch.float16), (torch.float64, torch.float32)])
def test_features_of_another_dtype_than_the_parameters_are_named(name, params, features) -> None:
    connector = build(name, params)
    x = torch.randn(2, N, D, dtype=features)
    idx = anchor_search(torch.rand(2, 4, N), 8)
    with pytest.raises(ValueError, match=rf"features must have the dtype of .*\({params}\), got dtype {features}"):
        connector(x, idx)


@pytest.mark.parametrize("name", WITH_PARAMETERS)
def test_mixed_dtypes_pass_under_autocast(name) -> None:
    connector = build(name)
    idx = anchor_search(torch.rand(2, 4, N), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = connector(torch.randn(2, N, D, dtype=torch.bfloat16), idx)
    assert out.shape == (2, connector.num_output_tokens(N), connector.llm_dim)


@pytest.mark.parametrize("name", available_connectors())
def test_mask_on_another_device_is_named(name) -> None:
    connector = build(name)
    mask = torch.ones(2, N, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"key_padding_mask must be on the device of features \(cpu\), got meta"):
        connector(torch.randn(2, N, D), anchor_search(torch.rand(2, 4, N), 8), key_padding_mask=mask)
