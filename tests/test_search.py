"""Tests for anchor_former.search against the package's rule restated as slow per-sample, per-head Python."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchor_former import AnchorSearch, anchor_search, native_search_available
from anchor_former.search import _resolve_method, anchor_quotas, cls_scores

METHODS = ["native", "sorted", "masked"]  # every implementation that runs on the CPU
TRACEABLE = ["auto", "sorted", "masked"]  # what torch.compile can trace ("auto" leaves the kernel out)


def fits(method: str, dtype: torch.dtype) -> bool:
    """Whether ``method`` takes CPU scores of ``dtype`` (the native kernel reads float32/fp16/bf16)."""
    return method != "native" or dtype != torch.float64


def restated_rule_search(
    scores: torch.Tensor, num_anchors: int, *, include_cls: bool = True, num_prefix_tokens: int = 1
) -> list[list[int]]:
    """The package's own rule restated plainly (Python loops over samples, heads and tokens): not the
    authors' code, which ``test_search_authors_loop.py`` runs verbatim.

    ``scores`` is ``(B, H, N)``. Quotas: K // H each, the first K % H heads one more. Ties: lower index first.
    """
    b, h, n = scores.shape
    rows = scores.double().tolist()
    base, extra = divmod(num_anchors, h)
    out = []
    for sample in rows:
        chosen: set[int] = set()
        for head in range(h):
            quota = base + (1 if head < extra else 0)
            order = sorted(range(num_prefix_tokens, n), key=lambda j: (-sample[head][j], j))
            added = 0
            for j in order:
                if added == quota:
                    break
                if j not in chosen:
                    chosen.add(j)
                    added += 1
        out.append(([0] if include_cls else []) + sorted(chosen))
    return out


def tie_free_scores(b: int, h: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Softmax-like rows whose values within a head are all distinct (a permutation, normalised)."""
    perms = torch.stack([torch.stack([torch.randperm(n, generator=generator) for _ in range(h)]) for _ in range(b)])
    return (perms.double() + 1.0) / (n * (n + 1) / 2)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_quotas_spread_remainder_over_first_heads():
    assert anchor_quotas(144, 16) == (9,) * 16
    assert anchor_quotas(10, 4) == (3, 3, 2, 2)
    assert anchor_quotas(3, 5) == (1, 1, 1, 0, 0)
    assert sum(anchor_quotas(257, 16)) == 257


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("b", "h", "n", "k", "prefix"),
    [(3, 4, 17, 8, 1), (2, 16, 65, 32, 1), (2, 16, 65, 13, 1), (2, 3, 30, 20, 5), (2, 5, 9, 8, 1), (1, 6, 12, 3, 1)],
)
def test_matches_reference_three_layouts(generator, method, b, h, n, k, prefix):
    """(B, H, N), (B, H, N, N) and (B, N) inputs give exactly the reference result (no ties)."""
    for _ in range(5):
        row = tie_free_scores(b, h, n, generator).float()  # (B, H, N)
        expected = torch.tensor(restated_rule_search(row, k, num_prefix_tokens=prefix))
        assert torch.equal(anchor_search(row, k, num_prefix_tokens=prefix, method=method), expected)

        full = torch.rand(b, h, n, n, generator=generator)
        full[:, :, 0, :] = row  # only the [CLS] query's row matters
        assert torch.equal(anchor_search(full, k, num_prefix_tokens=prefix, method=method), expected)

        single = row[:, 0]  # (B, N): one head takes all K
        expected_single = torch.tensor(restated_rule_search(single[:, None], k, num_prefix_tokens=prefix))
        assert torch.equal(anchor_search(single, k, num_prefix_tokens=prefix, method=method), expected_single)


@pytest.mark.parametrize("method", METHODS)
def test_reference_shapes_of_llava(generator, method):
    """The LLaVA-1.5 case: 16 heads, 577 tokens, K = 144 and 256."""
    row = torch.softmax(torch.randn(2, 16, 577, generator=generator), dim=-1)
    for k in (144, 256):
        expected = torch.tensor(restated_rule_search(row, k))
        got = anchor_search(row, k, method=method)
        assert got.shape == (2, k + 1)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("method", METHODS)
def test_ties_follow_lower_index_rule(generator, method):
    """Heavily tied scores (4 distinct values) still match the reference's documented tie rule."""
    row = torch.randint(0, 4, (4, 8, 50), generator=generator).float()
    for k in (7, 16, 40, 49):
        expected = torch.tensor(restated_rule_search(row, k))
        assert torch.equal(anchor_search(row, k, method=method), expected)


@pytest.mark.parametrize("method", METHODS)
def test_negative_scores_and_signed_zeros(generator, method):
    """Raw logits (negative values) and -0.0 == +0.0 ties follow the same rules as probabilities."""
    logits = torch.randn(3, 4, 40, generator=generator)
    logits[:, :, 5:15] = 0.0
    logits[:, :, 10:15] = -0.0
    for k in (5, 20, 39):
        assert torch.equal(anchor_search(logits, k, method=method), torch.tensor(restated_rule_search(logits, k)))


def test_all_equal_scores_pick_lowest_indices():
    row = torch.full((1, 2, 10), 0.1)
    # Head 0 takes 1, 2; head 1 takes the next untaken lowest, 3, 4.
    assert anchor_search(row, 4).tolist() == [[0, 1, 2, 3, 4]]


def test_no_cls_and_registers(generator):
    row = tie_free_scores(2, 4, 21, generator).float()
    got = anchor_search(row, 8, include_cls=False, num_prefix_tokens=0)
    assert torch.equal(got, torch.tensor(restated_rule_search(row, 8, include_cls=False, num_prefix_tokens=0)))
    got = anchor_search(row, 8, include_cls=True, num_prefix_tokens=5)  # DINOv2: CLS + 4 registers
    assert got[:, 0].tolist() == [0, 0]
    assert bool((got[:, 1:] >= 5).all())
    assert torch.equal(got, torch.tensor(restated_rule_search(row, 8, num_prefix_tokens=5)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_does_not_change_result(generator, dtype):
    """Values representable in the low-precision dtype give the same anchors as the fp32 search."""
    row = torch.softmax(torch.randn(3, 8, 101, generator=generator), dim=-1).to(dtype)
    expected = torch.tensor(restated_rule_search(row, 40))
    for method in METHODS:
        if fits(method, dtype):
            assert torch.equal(anchor_search(row, 40, method=method), expected)
        assert torch.equal(anchor_search(row.float(), 40, method=method), expected)


def test_module_matches_function(generator):
    row = tie_free_scores(2, 4, 30, generator).float()
    module = AnchorSearch(10, num_prefix_tokens=2)
    assert torch.equal(module(row), anchor_search(row, 10, num_prefix_tokens=2))
    assert module.num_queries == 11
    assert "num_anchors=10" in repr(module)
    assert list(module.parameters()) == []
    assert AnchorSearch(10, include_cls=False, num_prefix_tokens=0).num_queries == 10


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 30), (2, 1, 30), (1, 4, 30), (2, 30), (1, 30), (2, 3, 30, 30)])
def test_does_not_modify_input(generator, method, dtype, shape):
    if not fits(method, dtype):
        pytest.skip("the native kernel takes no float64")
    row = torch.rand(*shape, generator=generator).to(dtype)
    before = row.clone()
    anchor_search(row, 12, method=method)
    assert torch.equal(row, before)


@pytest.mark.parametrize("method", METHODS)
def test_noncontiguous_input(generator, method):
    row = torch.rand(4, 30, 6, generator=generator).transpose(1, 2)  # (B, H, N), non-contiguous
    assert torch.equal(anchor_search(row, 12, method=method), torch.tensor(restated_rule_search(row, 12)))
    full = torch.rand(2, 3, 30, 30, generator=generator)  # the [CLS] row is a strided view
    assert torch.equal(anchor_search(full, 12, method=method), torch.tensor(restated_rule_search(full[:, :, 0], 12)))


@pytest.mark.slow
@pytest.mark.parametrize("method", TRACEABLE)
def test_compiles_fullgraph(generator, method):
    torch._dynamo.reset()
    row = torch.softmax(torch.randn(2, 4, 33, generator=generator), dim=-1)
    compiled = torch.compile(lambda a: anchor_search(a, 12, method=method), fullgraph=True)
    assert torch.equal(compiled(row), torch.tensor(restated_rule_search(row, 12)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(generator):
    row = torch.softmax(torch.randn(8, 16, 577, generator=generator), dim=-1)
    for dtype in (torch.float32, torch.bfloat16):
        for method in ("auto", "sorted", "masked"):
            got = anchor_search(row.to("cuda", dtype), 144, method=method)
            assert got.device.type == "cuda"
            assert torch.equal(got.cpu(), anchor_search(row.to(dtype), 144))


# ---------------------------------------------------------------------------------------------- native kernel


def test_native_kernel_is_built():
    """This test environment has a C compiler, so the install must have built the kernel; without it
    "auto" would quietly fall back to the slower masked path."""
    assert native_search_available()


def test_install_without_the_kernel_falls_back():
    """An install built without a C compiler has no ``_native`` module: "auto" runs the masked path and an
    explicit "native" says why it cannot run. (A fresh interpreter where that import fails.)"""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["anchor_former._native"] = None  # what an install without the compiled module sees
        import pytest, torch
        from anchor_former import anchor_search, native_search_available
        from anchor_former.search import _resolve_method
        assert not native_search_available()
        row = torch.rand(2, 4, 30)
        assert _resolve_method("auto", row) == "masked"
        assert torch.equal(anchor_search(row, 10), anchor_search(row, 10, method="sorted"))
        with pytest.raises(RuntimeError, match="method='native' needs the compiled CPU kernel"):
            anchor_search(row, 10, method="native")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_auto_picks_the_method_by_device_and_dtype():
    cpu = torch.rand(2, 4, 10)
    assert _resolve_method("auto", cpu) == "native"
    assert _resolve_method("auto", cpu.half()) == "native"
    assert _resolve_method("auto", cpu.double()) == "masked"
    assert _resolve_method("auto", torch.empty(2, 4, 10, device="meta")) == "sorted"
    for method in METHODS:
        assert _resolve_method(method, cpu) == method


@pytest.mark.parametrize(
    ("b", "h", "n", "k", "prefix"),
    [
        (2, 1, 577, 300, 1),  # one head whose quota exceeds the number of 16-token blocks
        (2, 40, 50, 10, 1),  # more heads than anchors: the last heads add nothing
        (3, 16, 577, 256, 1),
        (2, 7, 13, 12, 0),  # fewer tokens than a block, every candidate taken
        (2, 3, 600, 31, 5),
    ],
)
def test_native_edge_shapes(generator, b, h, n, k, prefix):
    row = torch.randn(b, h, n, generator=generator)
    include_cls = prefix > 0
    expected = torch.tensor(restated_rule_search(row, k, include_cls=include_cls, num_prefix_tokens=prefix))
    got = anchor_search(row, k, include_cls=include_cls, num_prefix_tokens=prefix, method="native")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("where", [(1, 2, 0), (0, 39, 20)])  # the [CLS] score; a head with quota 0
def test_native_finite_check_covers_every_score(where):
    row = torch.rand(2, 40, 50)
    row[where] = float("nan")
    with pytest.raises(ValueError, match=r"attention must be finite, got 1 NaN and 0 inf.*\(2, 40, 50\)"):
        anchor_search(row, 10, method="native")


@pytest.mark.parametrize("seed", range(4))
def test_native_equals_masked_on_non_finite_scores_without_the_check(seed):
    """NaN/inf order by their bits in both paths (unspecified behaviour, but the same everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.randn(3, 8, 70, generator=gen)
    u = torch.rand(row.shape, generator=gen)
    row[u < 0.04] = float("nan")
    row[(u >= 0.04) & (u < 0.08)] = -float("nan")
    row[(u >= 0.08) & (u < 0.12)] = float("inf")
    row[(u >= 0.12) & (u < 0.16)] = -float("inf")
    for k in (1, 20, 69):
        native = anchor_search(row, k, method="native", check_finite=False)
        assert torch.equal(native, anchor_search(row, k, method="masked", check_finite=False))


def test_native_from_several_threads(generator):
    """The kernel releases the GIL and keeps no state between calls."""
    rows = [torch.softmax(torch.randn(8, 16, 577, generator=generator), dim=-1) for _ in range(8)]
    expected = [anchor_search(r, 144, method="masked") for r in rows]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda r: anchor_search(r, 144, method="native"), rows * 3))
    for i, g in enumerate(got):
        assert torch.equal(g, expected[i % len(rows)])


def test_native_result_does_not_depend_on_the_thread_count(generator):
    """A large batch is split over torch.get_num_threads() threads; the split must not show."""
    row = torch.softmax(torch.randn(37, 16, 577, generator=generator), dim=-1)  # 37: uneven ranges
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 3, 8):
            torch.set_num_threads(threads)
            results.append(anchor_search(row, 144, method="native"))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)
    assert torch.equal(results[0], anchor_search(row, 144, method="masked"))


def test_native_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match=r"method='native' takes CPU float32.*\(2, 4, 10\).*torch.float64"):
        anchor_search(torch.rand(2, 4, 10, dtype=torch.float64), 3, method="native")
    with pytest.raises(ValueError, match=r"method='native' takes CPU.*\(2, 4, 10\) on meta"):
        anchor_search(torch.empty(2, 4, 10, device="meta"), 3, method="native", check_finite=False)


@st.composite
def tied_case(draw):
    """Scores drawn from a few values (many ties, negatives, both zeros, extremes), in either memory layout."""
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 20))
    prefix = draw(st.integers(0, 2))
    n = draw(st.integers(prefix + 1, prefix + 70))
    k = draw(st.integers(1, n - prefix))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pool = torch.tensor([-3.0e38, -2.5, -1.0, -0.0, 0.0, 1e-30, 0.25, 0.25000003, 1.0, 3.0e38])
    pool = pool[: draw(st.integers(2, len(pool)))]
    row = pool[torch.randint(len(pool), (b, h, n), generator=gen)]
    if draw(st.booleans()):
        row = row.transpose(0, 2).contiguous().transpose(0, 2)  # same values, token-major memory
    include_cls = prefix > 0 and draw(st.booleans())
    return row, k, prefix, include_cls


@settings(max_examples=80, deadline=None)
@given(tied_case())
def test_native_matches_reference_on_ties(case):
    row, k, prefix, include_cls = case
    kwargs = dict(include_cls=include_cls, num_prefix_tokens=prefix)
    got = anchor_search(row, k, method="native", layout="b h n", **kwargs)
    assert torch.equal(got, torch.tensor(restated_rule_search(row, k, **kwargs)))
    low = row.to(torch.bfloat16)  # rounding makes new ties; the rule must hold on the rounded values
    got = anchor_search(low, k, method="native", layout="b h n", **kwargs)
    assert torch.equal(got, torch.tensor(restated_rule_search(low.float(), k, **kwargs)))


# ---------------------------------------------------------------------------------------------- properties


@st.composite
def search_case(draw):
    b = draw(st.integers(1, 4))
    h = draw(st.integers(1, 6))
    prefix = draw(st.integers(0, 3))
    n = draw(st.integers(prefix + 1, prefix + 40))
    k = draw(st.integers(1, n - prefix))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    row = tie_free_scores(b, h, n, gen).float()
    include_cls = prefix > 0 and draw(st.booleans())
    return row, k, prefix, include_cls


@settings(max_examples=60, deadline=None)
@given(search_case(), st.sampled_from(METHODS))
def test_properties(case, method):
    row, k, prefix, include_cls = case
    b, h, n = row.shape
    got = anchor_search(row, k, include_cls=include_cls, num_prefix_tokens=prefix, method=method, layout="b h n")
    assert got.dtype == torch.int64
    assert got.shape == (b, k + int(include_cls))
    anchors = got[:, 1:] if include_cls else got
    if include_cls:
        assert bool((got[:, 0] == 0).all())
    assert bool((anchors >= prefix).all()) and bool((anchors < n).all())  # prefix tokens never chosen
    assert bool((anchors[:, 1:] > anchors[:, :-1]).all())  # strictly ascending: sorted and unique
    assert torch.equal(
        got, torch.tensor(restated_rule_search(row, k, include_cls=include_cls, num_prefix_tokens=prefix))
    )


@settings(max_examples=40, deadline=None)
@given(search_case(), st.floats(1e-3, 1e3))
def test_batch_independence_and_scale_invariance(case, scale):
    row, k, prefix, include_cls = case
    kwargs = dict(include_cls=include_cls, num_prefix_tokens=prefix, layout="b h n")
    full = anchor_search(row, k, **kwargs)
    for i in range(row.shape[0]):
        assert torch.equal(anchor_search(row[i : i + 1], k, **kwargs), full[i : i + 1])
    # Tie-free values are >= 1/(n(n+1)/2) apart relatively, far above fp32 rounding, so scaling keeps order.
    assert torch.equal(anchor_search(row * scale, k, **kwargs), full)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_each_head_contributes_its_quota(h, quota, seed):
    """With K = q·H, the anchors of heads 0..h are nested and head h adds exactly q new tokens, namely its
    q best tokens among those heads 0..h-1 did not take."""
    gen = torch.Generator().manual_seed(seed)
    n = 1 + h * quota + 5
    row = tie_free_scores(1, h, n, gen).float()
    previous: set[int] = set()
    for upto in range(1, h + 1):
        got = set(anchor_search(row[:, :upto], quota * upto, include_cls=False).tolist()[0])
        new = got - previous
        assert previous <= got and len(new) == quota
        remaining = sorted(set(range(1, n)) - previous, key=lambda j: -float(row[0, upto - 1, j]))
        assert new == set(remaining[:quota])
        previous = got


# ---------------------------------------------------------------------------------------------- bad input


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"attention must have shape .*\(B, H, N, N\).* got shape \(3,\)"):
        anchor_search(torch.rand(3), 1)
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 3, 4, 4\)"):
        anchor_search(torch.rand(1, 2, 3, 4, 4), 1)
    with pytest.raises(ValueError, match="torch.Tensor"):
        anchor_search([[0.1, 0.2]], 1)  # type: ignore[arg-type]


def test_rejects_non_square_map():
    with pytest.raises(ValueError, match=r"layout 'b h n n' must be a square map.*\(2, 4, 10, 11\)"):
        anchor_search(torch.rand(2, 4, 10, 11), 3)


@pytest.mark.parametrize("k", [0, -1, 10, 2.5, True])
def test_rejects_bad_num_anchors(k):
    with pytest.raises(ValueError, match=r"num_anchors must be an integer in \[1, 9\].*shape \(2, 4, 10\)"):
        anchor_search(torch.rand(2, 4, 10), k)


def test_num_anchors_counts_prefix_tokens():
    with pytest.raises(ValueError, match=r"\[1, 5\].*10 - 5 candidate tokens"):
        anchor_search(torch.rand(2, 4, 10), 6, num_prefix_tokens=5)


def test_rejects_integer_scores():
    with pytest.raises(ValueError, match=r"floating-point.*torch.int64.*\(2, 10\)"):
        anchor_search(torch.ones(2, 10, dtype=torch.int64), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite(bad, dtype):
    row = torch.rand(2, 4, 10).to(dtype)
    row[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"attention must be finite.*\(2, 4, 10\)"):
        anchor_search(row, 3)


def test_accepts_the_largest_finite_values():
    """The finiteness check must not mistake huge but finite scores for overflow."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        row = torch.full((2, 3, 50), torch.finfo(dtype).max, dtype=dtype)
        row[:, :, 7] = 0.0
        assert anchor_search(row, 5).shape == (2, 6)


def test_rejects_cls_without_prefix_and_bad_options():
    with pytest.raises(ValueError, match="include_cls=True needs a \\[CLS\\]"):
        anchor_search(torch.rand(2, 10), 3, num_prefix_tokens=0)
    with pytest.raises(ValueError, match=r"needs a \[CLS\] query.*\(2, 1, 10, 10\)"):
        anchor_search(torch.rand(2, 1, 10, 10), 3, include_cls=False, num_prefix_tokens=0)
    with pytest.raises(ValueError, match="method must be one of"):
        anchor_search(torch.rand(2, 10), 3, method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_prefix_tokens must be an integer >= 0"):
        anchor_search(torch.rand(2, 10), 3, num_prefix_tokens=-1)
    with pytest.raises(ValueError, match="num_anchors must be an integer >= 1"):
        AnchorSearch(0)
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1"):
        anchor_quotas(4, 0)


# ---------------------------------------------------------------------------------------------- legal inputs
# Each test below failed before the fix it names: wrong anchors, raw errors or out-of-bounds reads.


def distinct_ascending(got: torch.Tensor, k: int, *, prefix: int, include_cls: bool) -> bool:
    """K distinct, ascending, never-prefix tokens per row (after [CLS] when included)."""
    anchors = got[:, 1:] if include_cls else got
    return (
        anchors.shape[1] == k
        and bool((anchors >= prefix).all())
        and bool((anchors[:, 1:] > anchors[:, :-1]).all())
        and (not include_cls or bool((got[:, 0] == 0).all()))
    )


@pytest.mark.parametrize("method", METHODS)
def test_lazily_negated_views_are_read_by_value(generator, method):
    """``z.conj().imag`` is a float32 view with the negative bit set: its memory holds the un-negated
    values. The native kernel read that memory and returned the anchors of ``-scores``."""
    z = torch.complex(torch.randn(3, 4, 40, generator=generator), torch.randn(3, 4, 40, generator=generator))
    view = z.conj().imag  # (B, H, N)
    assert view.is_neg()
    values = view.clone()  # the same values, materialised
    expected = torch.tensor(restated_rule_search(values, 12))
    assert torch.equal(anchor_search(view, 12, method=method), expected)
    assert torch.equal(anchor_search(torch._neg_view(-values), 12, method=method), expected)


def test_native_routes_tensors_without_own_memory_to_pytorch(generator):
    """Under vmap the scores are wrapped (no data pointer of their own): "auto" takes the sorted path, made
    of out-of-place ops only."""
    rows = tie_free_scores(3, 2, 20, generator).float()
    got = torch.vmap(lambda r: anchor_search(r[None], 5, check_finite=False)[0])(rows)  # no host reads in vmap
    assert torch.equal(got, torch.tensor(restated_rule_search(rows, 5)))


@st.composite
def extreme_case(draw):
    """Any CPU dtype, scores from a pool with -inf, +inf, signed zeros, the extremes and heavy ties."""
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    prefix = draw(st.integers(0, 2))
    n = draw(st.integers(prefix + 1, prefix + 50))
    k = draw(st.integers(1, n - prefix))
    info = torch.finfo(dtype)
    pool = torch.tensor(
        [float("-inf"), info.min, -1.0, -0.0, 0.0, info.tiny, 0.5, 1.0, info.max, float("inf")], dtype=dtype
    )
    pool = pool[torch.tensor(draw(st.lists(st.integers(0, 9), min_size=1, max_size=10, unique=True)))]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    row = pool[torch.randint(len(pool), (b, h, n), generator=gen)]
    include_cls = prefix > 0 and draw(st.booleans())
    return row, k, prefix, include_cls


@settings(max_examples=150, deadline=None)
@given(extreme_case(), st.sampled_from(METHODS))
def test_infinities_signed_zeros_and_ties_in_every_dtype(case, method):
    """float64 with -inf gave duplicate anchors (taken tokens were struck with -inf, tying real -inf)."""
    row, k, prefix, include_cls = case
    if not fits(method, row.dtype):
        return
    kwargs = dict(include_cls=include_cls, num_prefix_tokens=prefix)
    got = anchor_search(row, k, method=method, check_finite=False, layout="b h n", **kwargs)
    assert distinct_ascending(got, k, prefix=prefix, include_cls=include_cls)
    assert torch.equal(got, torch.tensor(restated_rule_search(row, k, **kwargs)))


def test_float64_minus_inf_gives_distinct_anchors():
    row = torch.tensor([[[0.5, 0.2, float("-inf"), float("-inf"), float("-inf")]] * 2], dtype=torch.float64)
    for method in ("masked", "sorted", "auto"):
        assert anchor_search(row, 4, method=method, check_finite=False).tolist() == [[0, 1, 2, 3, 4]]


def test_square_3d_input_needs_a_layout(generator):
    """(B, N, N) was read as (B, H=N, N) rows and gave wrong anchors without a word."""
    maps = torch.softmax(torch.randn(2, 9, 9, generator=generator), dim=-1)  # head-averaged maps
    with pytest.raises(ValueError, match=r"shape \(2, 9, 9\) is ambiguous.*layout='b h n' or layout='b n n'"):
        anchor_search(maps, 4)
    for method in METHODS:
        got = anchor_search(maps, 4, layout="b n n", method=method)
        assert torch.equal(got, torch.tensor(restated_rule_search(maps[:, None, 0], 4)))  # row 0 of each map
        rows = anchor_search(maps, 4, layout="b h n", method=method)  # 9 heads of 9 tokens: the other reading
        assert torch.equal(rows, torch.tensor(restated_rule_search(maps, 4)))
    assert torch.equal(cls_scores(maps, layout="b n n"), maps[:, None, 0])
    assert torch.equal(AnchorSearch(4)(maps, layout="b n n"), anchor_search(maps, 4, layout="b n n"))


def test_layout_must_match_the_rank():
    with pytest.raises(ValueError, match=r"layout='b h n n' must have 4 dims, got shape \(2, 4, 10\)"):
        anchor_search(torch.rand(2, 4, 10), 3, layout="b h n n")
    with pytest.raises(ValueError, match=r"layout must be one of 'b h n n', 'b n n', 'b h n', 'b n' or None"):
        anchor_search(torch.rand(2, 4, 10), 3, layout="bhn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layout 'b n n' must be a square map.*\(2, 4, 10\)"):
        anchor_search(torch.rand(2, 4, 10), 3, layout="b n n")


@pytest.mark.parametrize(
    ("b", "h", "n", "k"),
    [
        (2, 1, 4097, 2048),  # one head, K = N / 2: the quickselect on every candidate
        (1, 1, 65, 64),  # every candidate of one head
        (2, 4, 2001, 400),  # quotas of 100 > 32 with more blocks than the quota: tau, then quickselect
        (2, 16, 577, 500),  # quotas of 31 and 32: the best-first buffer at its largest
        (3, 2, 1500, 1000),
    ],
)
def test_native_large_quotas(generator, b, h, n, k):
    """Quotas above N/16 took O(N * quota) per head (668 ms for N = 65537, K = 32768); the quickselect
    that replaced it must give the same anchors, ties included."""
    for row in (torch.randn(b, h, n, generator=generator), torch.randint(0, 3, (b, h, n), generator=generator).float()):
        expected = anchor_search(row, k, method="masked")
        assert torch.equal(anchor_search(row, k, method="native"), expected)
    small = torch.randint(0, 5, (2, h, min(n, 300)), generator=generator).float()
    kk = min(k, small.shape[-1] - 1)
    assert torch.equal(anchor_search(small, kk, method="native"), torch.tensor(restated_rule_search(small, kk)))


def _native_args(**overrides):
    """A valid argument tuple for the private kernel entry point, with named overrides."""
    scores = torch.rand(2, 3, 20)
    out = torch.empty(2, 7, dtype=torch.int64)
    args = dict(
        scores_ptr=scores.data_ptr(), batch=2, heads=3, tokens=20, stride_b=60, stride_h=20, stride_n=1, prefix=1,
        quotas=(2, 2, 2), out_ptr=out.data_ptr(), out_stride_b=7, out_width=7, include_cls=True,
        check_finite=True, max_threads=1, mask_ptr=0, mask_stride_b=0, mask_stride_n=0,
    )  # fmt: skip
    args.update(overrides)
    return (scores, out), tuple(args.values())


@pytest.mark.skipif(not native_search_available(), reason="the kernel was not built")
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"quotas": (-1, 4, 3)}, r"quotas\[0\] = -1"),  # read out of bounds before (sum was fine)
        ({"quotas": (20, 0, 0)}, r"quotas\[0\] = 20"),
        ({"quotas": (2, 2)}, r"quotas must have 3 entries"),
        ({"prefix": 21}, r"prefix must be in \[0, 20\], got 21"),
        ({"prefix": -1}, r"prefix must be in \[0, 20\], got -1"),
        ({"batch": -2}, r"batch must be in \[0, 2147483647\], got -2"),
        ({"tokens": -1}, r"tokens must be in"),
        ({"heads": -3}, r"heads must be in"),
        ({"stride_n": -1}, r"stride_n must be in"),
        ({"out_width": 8}, r"out_width must be sum\(quotas\) \+ include_cls = 7, got 8"),
        ({"out_stride_b": 3}, r"out_stride_b must be in \[7, "),
        ({"max_threads": 0}, r"max_threads must be in \[1, "),
        ({"scores_ptr": 0}, r"must be non-null"),
        ({"prefix": 0}, r"include_cls must be in \[0, 0\], got 1"),
    ],
)
def test_native_entry_point_validates_every_argument(overrides, match):
    from anchor_former import _native

    keep, args = _native_args(**overrides)
    with pytest.raises(ValueError, match=match):
        _native.search(*args)
    keep, args = _native_args()
    assert _native.search(*args) == 0  # the unmodified arguments are fine


@pytest.mark.skipif(not native_search_available(), reason="the kernel was not built")
def test_native_entry_point_checks_the_real_tokens_itself():
    """The kernel does not trust the Python-side padding check: too few real tokens raise there too."""
    from anchor_former import _native

    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 5:] = False  # 4 real candidates, quotas sum to 6
    keep, args = _native_args(mask_ptr=mask.data_ptr(), mask_stride_b=20, mask_stride_n=1)
    with pytest.raises(ValueError, match="fewer real \\(unpadded\\) candidate tokens"):
        _native.search(*args)


def test_sparse_meta_and_float8_scores(generator):
    """Each raised a raw error (item() on meta, no data pointer / as_strided for sparse, no isfinite for
    float8); now meta works without values, sparse is refused by name and float8 is upcast exactly."""
    meta = anchor_search(torch.empty(2, 4, 30, device="meta"), 7)
    assert meta.shape == (2, 8) and meta.device.type == "meta"
    with pytest.raises(ValueError, match=r"attention must be a dense \(strided\) tensor.*sparse_coo"):
        anchor_search(torch.rand(2, 4, 30).to_sparse(), 7)
    row = torch.rand(2, 4, 30, generator=generator).to(torch.float8_e4m3fn)
    expected = torch.tensor(restated_rule_search(row.float(), 7))
    for method in METHODS:
        assert torch.equal(anchor_search(row, 7, method=method), expected)
    row[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="attention must be finite, got 1 NaN"):
        anchor_search(row, 7, method="masked")


@pytest.mark.parametrize("method", METHODS)
def test_padding_is_excluded_by_construction(generator, method):
    """Padded tokens are never candidates, whatever their score: a real token at the lowest finite score
    (the old sentinel) still beats padding, and padded scores at +inf do not matter."""
    row = torch.rand(2, 3, 20, generator=generator)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 1:9] = False  # sample 0: real patches 9..19, sample 1: 1..11 (11 each)
    mask[1, 12:] = False
    row[0, :, 1:9] = float("inf")
    row[0, :, 9] = -torch.finfo(torch.float32).max
    got = anchor_search(row, 11, method=method, key_padding_mask=mask, check_finite=False)
    assert got[0].tolist() == [0, *range(9, 20)]  # every real patch, token 9 at the lowest score included
    for i in range(2):
        real = mask[i].nonzero().flatten()  # [CLS] and the real patches
        alone = anchor_search(row[i : i + 1, :, real], 11, method=method, check_finite=False)
        assert torch.equal(got[i], real[alone[0]])
    strided = mask.t().contiguous().t()  # token-major memory: read through its strides
    assert torch.equal(anchor_search(row, 11, method=method, key_padding_mask=strided, check_finite=False), got)
    with pytest.raises(
        ValueError, match=r"key_padding_mask leaves samples \[0, 1\] with fewer real candidate tokens \(\[11, 11\]\)"
    ):
        anchor_search(row, 12, method=method, key_padding_mask=mask, check_finite=False)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, N\) = \(2, 20\) bool.*on cpu.*device meta"):
        anchor_search(row, 3, method=method, key_padding_mask=mask.to("meta"))
