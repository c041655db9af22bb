"""Tests for the learned-query Perceiver Resampler (same layers as AnchorFormer, learned queries)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from anchor_former import AnchorFormer
from anchor_former._layers import ResamplerLayer
from anchor_former.connectors import PerceiverResampler

SMALL = dict(num_queries=4, depth=2, heads=2, dim_head=8, ff_mult=2)


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def naive_forward(model: PerceiverResampler, features: torch.Tensor, n_real: list[int]) -> torch.Tensor:
    """Per sample, per head, softmax by hand; keys = the sample's first n_real tokens."""
    cfg = model.config
    outs = []
    for b in range(features.shape[0]):
        x, q = features[b, : n_real[b]], model.latents
        for layer in model.layers:
            a = layer.attn
            qh = ln(q, a.norm_latents) @ a.to_q.weight.T
            kh, vh = (ln(x, a.norm_media) @ a.to_kv.weight.T).chunk(2, dim=-1)
            heads = []
            for h in range(cfg.heads):
                c = slice(h * cfg.dim_head, (h + 1) * cfg.dim_head)
                w = torch.exp(qh[:, c] @ kh[:, c].T / math.sqrt(cfg.dim_head))
                heads.append((w / w.sum(-1, keepdim=True)) @ vh[:, c])
            q = q + torch.cat(heads, -1) @ a.to_out.weight.T
            q = q + gelu(ln(q, layer.ff[0]) @ layer.ff[1].weight.T) @ layer.ff[3].weight.T
        p0, _, p2 = model.projector
        outs.append(gelu(ln(q, model.norm) @ p0.weight.T + p0.bias) @ p2.weight.T + p2.bias)
    return torch.stack(outs)


# A few times the measured float64 error against the naive loop (~4e-16); see test_tolerance_bites.
F64_TOL = dict(atol=4e-15, rtol=0)


@pytest.mark.parametrize("fused_attn", [True, False])
def test_matches_naive_reference_with_padding(fused_attn: bool) -> None:
    model = PerceiverResampler(16, 24, fused_attn=fused_attn, **SMALL).double()
    features = torch.randn(3, 17, 16, dtype=torch.float64)
    lengths = [17, 9, 12]
    mask = torch.arange(17)[None] < torch.tensor(lengths)[:, None]
    out = model(features, torch.zeros(3, 2, dtype=torch.long), key_padding_mask=mask)
    assert out.shape == (3, 4, 24)
    torch.testing.assert_close(out, naive_forward(model, features, lengths), **F64_TOL)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i : i + 1], model(features[i : i + 1, :n]), **F64_TOL)


def test_tolerance_bites() -> None:
    """The naive-reference tolerance rejects a 1e-9 change of one learned query."""
    model = PerceiverResampler(16, 24, **SMALL).double()
    features = torch.randn(2, 17, 16, dtype=torch.float64)
    expected = naive_forward(model, features, [17, 17])
    with torch.no_grad():
        model.latents[0, 0] += 1e-9
    with pytest.raises(AssertionError):
        torch.testing.assert_close(model(features), expected, **F64_TOL)


def test_same_layers_as_anchor_former_plus_latents() -> None:
    perceiver = PerceiverResampler(16, 24, **SMALL)
    former = AnchorFormer(16, 24, num_anchors=4, depth=2, heads=2, dim_head=8, ff_mult=2)
    assert all(isinstance(layer, ResamplerLayer) for layer in perceiver.layers)
    ours = {k: v.shape for k, v in perceiver.state_dict().items()}
    assert ours == {**{k: v.shape for k, v in former.state_dict().items()}, "latents": torch.Size([4, 16])}
    # With the anchor tokens' features as its latents, the perceiver is AnchorFormer.
    features = torch.randn(1, 17, 16)
    anchor_idx = torch.tensor([[0, 3, 5, 8]])
    perceiver.load_state_dict({**former.state_dict(), "latents": features[0, anchor_idx[0]]})
    torch.testing.assert_close(perceiver(features), former(features, anchor_idx), atol=0, rtol=0)  # same ops


def test_ignores_anchors_and_every_parameter_gets_a_gradient() -> None:
    model = PerceiverResampler(16, 24, **SMALL)
    features = torch.randn(2, 17, 16)
    out = model(features, torch.tensor([[1, 2], [3, 4]]), attention=torch.rand(2, 17))
    torch.testing.assert_close(out, model(features), atol=0, rtol=0)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    assert not model.uses_anchors and model.num_output_tokens(577) == 4


def test_checkpointing_config_and_state_dict_round_trip() -> None:
    model = PerceiverResampler(16, 24, gradient_checkpointing=True, kv_include_queries=True, **SMALL)
    clone = PerceiverResampler.from_config(type(model.config).from_json(model.config.to_json()))
    assert clone.config == model.config and clone.gradient_checkpointing
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 17, 16)
    torch.testing.assert_close(clone(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("kv_include_queries", [False, True])
def test_analytic_flops_match_flop_counter(kv_include_queries: bool) -> None:
    model = PerceiverResampler(16, 24, fused_attn=False, kv_include_queries=kv_include_queries, **SMALL)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(3, 17, 16))
    assert counter.get_total_flops() == 3 * model.analytic_flops(17)


def test_bad_input() -> None:
    model = PerceiverResampler(16, 24, **SMALL)
    with pytest.raises(ValueError, match=r"vision_dim=16.*\(2, 17, 8\)"):
        model(torch.randn(2, 17, 8))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, N\) = \(2, 17\).*\(2, 17, 1\)"):
        model(torch.randn(2, 17, 16), key_padding_mask=torch.ones(2, 17, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"no real token.*\[1\]"):
        model(torch.randn(2, 17, 16), key_padding_mask=torch.tensor([[True] * 17, [False] * 17]))
