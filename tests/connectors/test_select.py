"""SelectConnector: the training-free connector against a slow per-sample reference written here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchor_former import anchor_search, build_connector
from anchor_former._projector import build_projector
from anchor_former.connectors import SelectConnector, SelectConnectorConfig

D, LLM = 16, 24


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def reference_select(features, scores, *, k, m, include_cls, prefix, projector, similarity=cosine):
    """Per sample, in plain Python: anchors by the search, then context tokens by the documented rule."""
    out = []
    for b in range(features.shape[0]):
        x = features[b]
        anchors = anchor_search(scores[b : b + 1], k, include_cls=False, num_prefix_tokens=prefix)[0].tolist()
        rows = ([x[0]] if include_cls else []) + [x[i] for i in anchors]
        rest = [i for i in range(prefix, x.shape[0]) if i not in set(anchors)]
        if m:
            u = len(rest)
            targets = [rest[math.floor((j + 0.5) * u / m)] for j in range(m)]
            groups = [[] for _ in range(m)]
            for i in rest:
                if i in targets:
                    groups[targets.index(i)].append(x[i])
                    continue
                sims = [similarity(x[i], x[t]) for t in targets]
                groups[sims.index(max(sims))].append(x[i])
            rows += [torch.stack(g).mean(0) for g in groups]
        out.append(projector(torch.stack(rows)))
    return torch.stack(out)


def make(k, m=0, include_cls=False, prefix=1, seed=0):
    torch.manual_seed(seed)
    return SelectConnector(D, LLM, num_anchors=k, num_context=m, include_cls=include_cls, num_prefix_tokens=prefix)


@pytest.mark.parametrize(
    "k,m,include_cls,prefix",
    [(5, 0, False, 1), (5, 3, False, 1), (4, 2, True, 1), (7, 4, False, 0), (3, 5, False, 5), (16, 0, True, 1)],
)
def test_matches_reference(k, m, include_cls, prefix) -> None:
    conn = make(k, m, include_cls, prefix)
    torch.manual_seed(1)
    n = prefix + 16
    features, scores = torch.randn(3, n, D), torch.rand(3, 4, n)
    with torch.no_grad():
        got = conn(features, attention=scores)
        want = reference_select(
            features, scores, k=k, m=m, include_cls=include_cls, prefix=prefix, projector=conn.projector
        )
    assert got.shape == (3, int(include_cls) + k + m, LLM) == (3, conn.num_output_tokens(n), LLM)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_tolerance_rejects_a_wrong_merge() -> None:
    """The tolerance bites: merging by dot product instead of cosine similarity is caught."""
    conn = make(4, 3)
    torch.manual_seed(2)
    features = torch.randn(2, 17, D) * torch.rand(2, 17, 1) * 5  # norms vary, so dot != cosine ranking
    scores = torch.rand(2, 4, 17)
    with torch.no_grad():
        got = conn(features, attention=scores)
        broken = reference_select(
            features,
            scores,
            k=4,
            m=3,
            include_cls=False,
            prefix=1,
            projector=conn.projector,
            similarity=lambda a, b: float(a @ b),
        )
    assert (got - broken).abs().max() > 1e-3


def test_full_budget_equals_projector_on_every_patch() -> None:
    """K = every patch, M = 0: exactly LLaVA's projector on the patch tokens, in raster order."""
    conn = make(16)
    features = torch.randn(2, 17, D)
    with torch.no_grad():
        got = conn(features, attention=torch.rand(2, 4, 17))
        torch.testing.assert_close(got, conn.projector(features[:, 1:]), rtol=0, atol=1e-6)


def test_anchor_idx_with_and_without_cls_column() -> None:
    conn = make(3)
    features = torch.randn(2, 17, D)
    idx = torch.tensor([[2, 5, 9], [1, 3, 16]])
    with torch.no_grad():
        a = conn(features, idx)
        b = conn(features, torch.cat([torch.zeros(2, 1, dtype=torch.long), idx], dim=1))
        want = conn.projector(features.gather(1, idx.unsqueeze(-1).expand(-1, -1, D)))
    torch.testing.assert_close(a, want, rtol=0, atol=0)
    torch.testing.assert_close(b, want, rtol=0, atol=0)


def test_every_context_token_has_members_and_merge_is_a_mean() -> None:
    """With identical tokens, each context token is that token (means of copies)."""
    conn = make(2, 3)
    features = torch.randn(1, 1, D).expand(2, 17, D).clone()
    with torch.no_grad():
        selected = conn.select(features, attention=torch.rand(2, 4, 17))
    torch.testing.assert_close(selected, features[:, :5], rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 12), m=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_output_count_and_no_parameters(k, m, seed) -> None:
    if k + m > 12:
        return
    conn = make(k, m, seed=seed)
    features = torch.randn(2, 13, D)
    with torch.no_grad():
        out = conn(features, attention=torch.rand(2, 13))
    assert out.shape == (2, k + m, LLM)
    assert {n for n, _ in conn.named_parameters()} == {
        "projector.0.weight",
        "projector.0.bias",
        "projector.2.weight",
        "projector.2.bias",
    }


def test_registry_config_round_trip_and_llava_keys() -> None:
    conn = build_connector("select", D, LLM, num_anchors=4, num_context=2)
    assert isinstance(conn, SelectConnector)
    again = SelectConnector.from_config(SelectConnectorConfig.from_json(conn.config.to_json()))
    assert again.config == conn.config
    llava = build_projector("mlp2x_gelu", D, LLM)  # LLaVA-1.5's mm_projector keys 0.* / 2.*
    conn.projector.load_state_dict(llava.state_dict())
    x = torch.randn(1, 5, D)
    torch.testing.assert_close(conn.projector(x), llava(x), rtol=0, atol=0)
    assert conn.analytic_flops(17) == 2 * 6 * (D * LLM + LLM * LLM) + 4 * (16 - 4) * 2 * D


@pytest.mark.parametrize("m", [0, 3])
def test_analytic_flops_match_the_flop_counter(m) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    conn = make(5, m)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        conn(torch.randn(2, 17, D), attention=torch.rand(2, 4, 17))
    assert counter.get_total_flops() == 2 * conn.analytic_flops(17)


def test_gradients_reach_the_projector_and_features() -> None:
    conn = make(4, 2)
    features = torch.randn(2, 17, D, requires_grad=True)
    conn(features, attention=torch.rand(2, 4, 17)).sum().backward()
    assert features.grad is not None and conn.projector[0].weight.grad is not None


def test_dtype_follows_features() -> None:
    conn = make(4, 2).to(torch.bfloat16)
    out = conn(torch.randn(2, 17, D, dtype=torch.bfloat16), attention=torch.rand(2, 4, 17))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_anchors": 0}, "num_anchors"),
        ({"num_anchors": 4, "num_context": -1}, "num_context"),
        ({"num_anchors": 4, "include_cls": True, "num_prefix_tokens": 0}, "include_cls"),
        ({"num_anchors": 4, "projector": "conv"}, "projector"),
    ],
)
def test_bad_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SelectConnector(D, LLM, **kwargs)


def test_bad_budget_and_inputs_name_the_argument() -> None:
    conn = make(10, 7)
    with pytest.raises(ValueError, match=r"num_anchors \+ num_context must be at most the 16 patch tokens.*= 17"):
        conn(torch.randn(1, 17, D), attention=torch.rand(1, 17))
    with pytest.raises(ValueError, match="num_anchors"):
        conn.num_output_tokens(17)
    conn = make(3)
    features = torch.randn(2, 17, D)
    with pytest.raises(ValueError, match="exactly one of anchor_idx and attention"):
        conn(features)
    with pytest.raises(ValueError, match=r"anchor_idx must have shape \(B, K\) = \(2, 3\)"):
        conn(features, torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="ascending patch-token indices in \\[1, 17\\).*got values in \\[0, 5\\]"):
        conn(features, torch.tensor([[0, 2, 5], [1, 2, 3]]))
    with pytest.raises(ValueError, match="not strictly ascending"):
        conn(features, torch.tensor([[3, 2, 5], [1, 2, 3]]))
    with pytest.raises(ValueError, match="must start with \\[CLS\\]"):
        conn(features, torch.tensor([[1, 2, 3, 5], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="attention must cover"):
        conn(features, attention=torch.rand(2, 4, 10))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mask = torch.ones(2, 17, dtype=torch.bool)
        mask[0, -1] = False
        conn(features, attention=torch.rand(2, 17), key_padding_mask=mask)


def test_merge_context_rejects_bad_input() -> None:
    from anchor_former.connectors import merge_context

    x = torch.randn(2, 5, D)
    message = r"num_context must be an integer in \[1, U=5\] for features of shape \(2, 5, 16\)"
    with pytest.raises(ValueError, match=message):
        merge_context(x, 6)
    with pytest.raises(ValueError, match=r"got 0"):
        merge_context(x, 0)
    with pytest.raises(ValueError, match=r"features must have shape \(B, U, D\)"):
        merge_context(x[0], 2)
    torch.testing.assert_close(merge_context(x, 5), x, rtol=0, atol=1e-6)  # every token its own target


# --- non-finite features in merge_context -------------------------------------------------------------------


def test_merge_context_raises_on_a_non_finite_token_by_default() -> None:
    from anchor_former.connectors import merge_context

    x = torch.randn(2, 9, D)
    x[1, 4, 3] = float("inf")
    with pytest.raises(ValueError, match=r"token 4 of sample 1 .* holds inf or NaN"):
        merge_context(x, 3)
    x[1, 4, 3] = float("nan")
    with pytest.raises(ValueError, match=r"token 4 of sample 1"):
        merge_context(x, 3, nonfinite="raise")
    with pytest.raises(ValueError, match=r"nonfinite must be 'raise' or 'exclude', got 'skip'"):
        merge_context(x, 3, nonfinite="skip")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_merge_context_exclude_equals_merging_without_the_token(bad) -> None:
    """``"exclude"``: every context token of the sample stays finite and equals the merge of the sample with
    the bad tokens removed; the other samples are untouched. Left in, one bad token poisons all M."""
    from anchor_former.connectors import merge_context

    torch.manual_seed(3)
    x = torch.randn(3, 12, D)
    x[1, 5, 0], x[1, 9, 7] = bad, bad
    got = merge_context(x, 4, nonfinite="exclude")
    assert torch.isfinite(got).all()
    keep = [i for i in range(12) if i not in (5, 9)]
    torch.testing.assert_close(got[1], merge_context(x[1:2, keep], 4)[0], rtol=0, atol=0)
    torch.testing.assert_close(got[[0, 2]], merge_context(x[[0, 2]], 4), rtol=0, atol=0)
    from anchor_former.connectors._select import _merge  # the merge without the finiteness check

    assert (~torch.isfinite(_merge(x[1:2], 4))).any(-1).all()  # left in: every one of the 4 tokens is non-finite
    with pytest.raises(ValueError, match=r"leaves 2 finite tokens in sample 0 .* fewer than num_context=3"):
        y = torch.randn(1, 4, D)
        y[0, :2] = bad
        merge_context(y, 3, nonfinite="exclude")


def test_select_connector_with_context_refuses_non_finite_features() -> None:
    conn = make(4, 3)
    features = torch.randn(2, 17, D)
    scores = torch.rand(2, 4, 17)
    with torch.no_grad():
        anchors = conn(features, attention=scores)  # finite: runs
        assert torch.isfinite(anchors).all()
        features[0, 16] = float("nan")  # a patch that no anchor search would pick first (score lowest)
        scores[0, :, 16] = -1.0
        with pytest.raises(ValueError, match=r"features must be finite"):
            conn(features, attention=scores)
