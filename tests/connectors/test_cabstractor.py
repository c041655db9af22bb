"""Tests for the Honeybee-style C-Abstractor: blocks equal timm's RegNet stage as Honeybee builds it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anchor_former.connectors import CAbstractor


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def honeybee_net(connector: CAbstractor, depth: int, hidden: int, grid: int) -> nn.Module:
    """Honeybee's C-Abstractor body: RegStage(SiLU, LayerNorm2d), AdaptiveAvgPool2d, RegStage (timm)."""
    regnet = pytest.importorskip("timm.models.regnet")
    layers = pytest.importorskip("timm.layers")
    block = dict(stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=layers.LayerNorm2d)
    net = nn.Sequential(
        regnet.RegStage(depth, connector.vision_dim, hidden, **block),
        nn.AdaptiveAvgPool2d((grid, grid)),
        regnet.RegStage(depth, hidden, hidden, **block),
    )
    ours = connector.state_dict()
    net.load_state_dict({k: ours[("stage1." if k.startswith("0.") else "stage2.") + k[2:]] for k in net.state_dict()})
    return net


@pytest.mark.parametrize(("vision_dim", "hidden_dim"), [(8, 12), (8, None)])
def test_matches_timm_regnet_stages_as_honeybee_builds_them(vision_dim: int, hidden_dim: int | None) -> None:
    connector = CAbstractor(vision_dim, 16, hidden_dim=hidden_dim, depth=2, grid=3)
    for p in connector.parameters():  # move the LayerNorms off their identity init
        nn.init.normal_(p, std=0.3)
    hidden = hidden_dim or vision_dim
    net = honeybee_net(connector, 2, hidden, 3)
    features = torch.randn(2, 1 + 7 * 7, vision_dim)
    grid = features[:, 1:].transpose(1, 2).reshape(2, vision_dim, 7, 7)
    expected = connector.projector(net(grid).flatten(2).transpose(1, 2))
    out = connector(features)
    assert out.shape == (2, 9, 16) == (2, connector.num_output_tokens(50), 16)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)  # timm's modules run the same ops: exact
    # ... and the comparison bites: timm's stage with ReLU (its default) instead of SiLU is rejected.
    block = dict(stride=1, dilation=1, act_layer=nn.ReLU, norm_layer=pytest.importorskip("timm.layers").LayerNorm2d)
    net[0] = pytest.importorskip("timm.models.regnet").RegStage(2, vision_dim, hidden, **block)
    net[0].load_state_dict(
        {k[len("stage1.") :]: v for k, v in connector.state_dict().items() if k.startswith("stage1.")}
    )
    relu = connector.projector(net(grid).flatten(2).transpose(1, 2))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, relu, atol=1e-5, rtol=1e-5)


def test_position_embedding_is_added_before_the_convolutions() -> None:
    connector = CAbstractor(8, 16, depth=1, grid=2, num_patches=16)
    features = torch.randn(2, 17, 8)
    plain = CAbstractor(8, 16, depth=1, grid=2)
    plain.load_state_dict({k: v for k, v in connector.state_dict().items() if k != "pos_emb"})
    shifted = features.clone()
    shifted[:, 1:] += connector.pos_emb
    torch.testing.assert_close(connector(features), plain(shifted), atol=0, rtol=0)  # the same addition first
    with pytest.raises(ValueError, match="built with num_patches=16.*got 25 patch tokens"):
        connector(torch.randn(2, 26, 8))


def test_llava_shapes_give_144_tokens() -> None:
    connector = CAbstractor(device="meta")
    assert connector.num_output_tokens(577) == 144


@pytest.mark.parametrize("hidden_dim", [None, 12])
def test_analytic_flops_match_flop_counter(hidden_dim: int | None) -> None:
    connector = CAbstractor(8, 16, hidden_dim=hidden_dim, depth=2, grid=3)
    with FlopCounterMode(display=False) as counter:
        connector(torch.randn(3, 50, 8))
    assert counter.get_total_flops() == 3 * connector.analytic_flops(50)


def test_every_parameter_gets_a_gradient_and_config_round_trips() -> None:
    connector = CAbstractor(8, 16, hidden_dim=12, depth=2, grid=3, num_patches=49)
    connector(torch.randn(2, 50, 8)).square().mean().backward()
    for name, p in connector.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    clone = CAbstractor.from_config(type(connector.config).from_json(connector.config.to_json()))
    clone.load_state_dict(connector.state_dict())
    x = torch.randn(2, 50, 8)
    torch.testing.assert_close(clone(x), connector(x), atol=0, rtol=0)


def test_bad_input() -> None:
    connector = CAbstractor(8, 16, depth=1, grid=2)
    with pytest.raises(ValueError, match=r"cabstractor needs a square grid of patch tokens, got 24"):
        connector(torch.randn(2, 25, 8))
    with pytest.raises(ValueError, match=r"vision_dim=8.*\(2, 17, 4\)"):
        connector(torch.randn(2, 17, 4))
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, -1] = False
    with pytest.raises(ValueError, match="cannot ignore padded tokens"):
        connector(torch.randn(2, 17, 8), key_padding_mask=mask)
    with pytest.raises(ValueError, match="grid must be an integer >= 1"):
        CAbstractor(8, 16, grid=0)
