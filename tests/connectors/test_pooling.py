"""Tests for the 2x2 average-pooling connector against explicit per-cell averages."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from anchor_former.connectors import AvgPoolConnector


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def naive_pool(patches: torch.Tensor, side: int, pool: int) -> torch.Tensor:
    """Average of the in-grid tokens of each pool x pool window, windows in raster order."""
    cells = []
    for r in range(0, side, pool):
        for c in range(0, side, pool):
            idx = [i * side + j for i in range(r, min(r + pool, side)) for j in range(c, min(c + pool, side))]
            cells.append(patches[:, idx].mean(dim=1))
    return torch.stack(cells, dim=1)


# A few times the measured float32 error against the naive windows (3e-8); see test_tolerance_bites.
TOL = dict(atol=2e-7, rtol=0)


def test_tolerance_bites() -> None:
    """Windows read column-major instead of raster order must fail the comparison."""
    connector = AvgPoolConnector(8, 12, pool=2)
    features = torch.randn(2, 1 + 4 * 4, 8)
    transposed = features[:, 1:].reshape(2, 4, 4, 8).transpose(1, 2).reshape(2, 16, 8)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(connector(features), connector.projector(naive_pool(transposed, 4, 2)), **TOL)


@pytest.mark.parametrize(("side", "pool"), [(4, 2), (5, 2), (6, 3), (3, 1)])
def test_matches_naive_pooling_then_projector(side: int, pool: int) -> None:
    connector = AvgPoolConnector(8, 12, pool=pool)
    features = torch.randn(2, 1 + side * side, 8)
    out = connector(features, torch.zeros(2, 2, dtype=torch.long))
    expected = connector.projector(naive_pool(features[:, 1:], side, pool))
    torch.testing.assert_close(out, expected, **TOL)
    assert out.shape[1] == connector.num_output_tokens(1 + side * side) == (-(-side // pool)) ** 2


def test_llava_shapes_give_144_tokens() -> None:
    connector = AvgPoolConnector(device="meta")
    assert connector.num_output_tokens(577) == 144
    assert not connector.uses_anchors


def test_analytic_flops_match_flop_counter() -> None:
    connector = AvgPoolConnector(8, 12)
    with FlopCounterMode(display=False) as counter:
        connector(torch.randn(3, 37, 8))
    assert counter.get_total_flops() == 3 * connector.analytic_flops(37)


def test_gradients_and_config_round_trip() -> None:
    connector = AvgPoolConnector(8, 12, pool=3)
    connector(torch.randn(2, 37, 8)).sum().backward()
    assert all(p.grad is not None for p in connector.parameters())
    assert type(connector.config).from_dict(connector.config.to_dict()) == connector.config


def test_bad_input() -> None:
    connector = AvgPoolConnector(8, 12)
    with pytest.raises(ValueError, match=r"avgpool needs a square grid of patch tokens, got 35 patch tokens"):
        connector(torch.randn(2, 36, 8))
    with pytest.raises(ValueError, match="square grid"):
        connector.num_output_tokens(36)
    mask = torch.ones(2, 37, dtype=torch.bool)
    connector(torch.randn(2, 37, 8), key_padding_mask=mask)  # all real: fine
    mask[1, -3:] = False
    with pytest.raises(ValueError, match=r"cannot ignore padded tokens.*\(2, 37\) has 3 False"):
        connector(torch.randn(2, 37, 8), key_padding_mask=mask)
    with pytest.raises(ValueError, match="pool must be an integer >= 1"):
        AvgPoolConnector(8, 12, pool=0)
