"""Tests for the LLaVA projector connector and the projector builders (LLaVA's layout, by key)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anchor_former._projector import build_projector, projector_flops
from anchor_former.connectors import MLPConnector


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def restated_llava_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's ``build_vision_projector`` (llava/model/multimodal_projector/builder.py) restated here, for the
    main environment; ``test_projector_equals_llavas_own_builder`` checks against LLaVA's code itself."""
    if name == "linear":
        return nn.Linear(in_dim, out_dim)
    if name == "identity":
        return nn.Identity()
    depth = int(name.removeprefix("mlp").removesuffix("x_gelu"))
    modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, depth):
        modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*modules)


@pytest.mark.parametrize("name", ["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu"])
def test_projector_layout_and_weights_match_the_restated_llava_builder(name: str) -> None:
    llava, ours = restated_llava_projector(name, 8, 12), build_projector(name, 8, 12)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in llava.state_dict().items()}
    ours.load_state_dict(llava.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(ours(x), llava(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu", "identity"])
def test_projector_equals_llavas_own_builder(name: str) -> None:
    """Against llava-torch's ``build_vision_projector`` itself (runs in .venv-llava, skipped elsewhere)."""
    builder = pytest.importorskip("llava.model.multimodal_projector.builder")
    width = 12 if name != "identity" else 8
    config = type("Config", (), {"mm_projector_type": name, "mm_hidden_size": 8, "hidden_size": width})()
    llava = builder.build_vision_projector(config)
    ours = build_projector(name, 8, width)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in llava.state_dict().items()}
    ours.load_state_dict(llava.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), llava(x), atol=0, rtol=0)


def test_mlp_connector_drops_prefix_tokens_and_applies_projector_per_token() -> None:
    connector = MLPConnector(8, 12, num_prefix_tokens=1)
    features = torch.randn(2, 10, 8)
    p0, _, p2 = connector.projector
    x = features[:, 1:]
    hidden = x @ p0.weight.T + p0.bias
    expected = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))) @ p2.weight.T + p2.bias
    out = connector(features, torch.zeros(2, 3, dtype=torch.long), attention=torch.rand(2, 10))
    tol = dict(atol=1e-6, rtol=0)  # a few times the measured float32 error, 1.5e-7
    torch.testing.assert_close(out, expected, **tol)
    assert out.shape == (2, connector.num_output_tokens(10), 12) == (2, 9, 12)
    # The tolerance bites: the tanh approximation of GELU (nn.GELU(approximate="tanh")) is rejected.
    tanh = torch.nn.functional.gelu(x @ p0.weight.T + p0.bias, approximate="tanh") @ p2.weight.T + p2.bias
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, tanh, **tol)
    assert not connector.uses_anchors


def test_mlp_connector_keeps_every_token_without_prefix() -> None:
    connector = MLPConnector(8, 8, projector="identity", num_prefix_tokens=0)
    features = torch.randn(2, 10, 8)
    torch.testing.assert_close(connector(features), features, atol=0, rtol=0)
    assert connector.num_output_tokens(10) == 10 and connector.analytic_flops(10) == 0


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_analytic_flops_match_flop_counter(name: str) -> None:
    connector = MLPConnector(8, 12, projector=name)
    with FlopCounterMode(display=False) as counter:
        connector(torch.randn(3, 10, 8))
    assert counter.get_total_flops() == 3 * connector.analytic_flops(10)
    assert connector.analytic_flops(577) == projector_flops(name, 8, 12, 576)


def test_every_parameter_gets_a_gradient_and_config_round_trips() -> None:
    connector = MLPConnector(8, 12, projector="mlp3x_gelu")
    connector(torch.randn(2, 5, 8)).sum().backward()
    assert all(p.grad is not None for p in connector.parameters())
    clone = MLPConnector.from_config(type(connector.config).from_json(connector.config.to_json()))
    clone.load_state_dict(connector.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(clone(x), connector(x), atol=0, rtol=0)


def test_bad_input() -> None:
    connector = MLPConnector(8, 12)
    with pytest.raises(ValueError, match=r"vision_dim=8.*\(2, 5, 7\)"):
        connector(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, N\) = \(2, 5\).*\(2, 4\)"):
        connector(torch.randn(2, 5, 8), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="projector must be one of"):
        MLPConnector(8, 12, projector="mlp0x_gelu")
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        MLPConnector(8, 12, projector="identity")
    with pytest.raises(ValueError, match="must exceed num_prefix_tokens=1"):
        connector(torch.randn(2, 1, 8))
