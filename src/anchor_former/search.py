"""Progressive per-head visual-anchor search, batched and free of host synchronisation.

The search, as the authors' AcFormer code runs it: the [CLS] query's attention row of one ViT layer gives
every token a score per head. Heads are visited in index order; head ``h`` adds its ``quota[h]``
highest-scoring tokens that earlier heads have not already chosen. Prefix tokens ([CLS], registers) are
never candidates. The result is ``[0] + sorted(anchors)`` (CLS first, then raster order) or just
``sorted(anchors)``.

Rules the authors' loop leaves undefined, defined here (``docs/algorithm.md`` compares the two):

* **Quotas.** ``num_anchors = K`` is spread over ``H`` heads as ``K // H`` each, and the remainder
  ``K % H`` goes one extra to each of the first heads (``anchor_quotas``). Exactly ``K`` anchors are
  returned. With ``H > K`` the last heads get a quota of 0.
* **Ties.** Equal scores are ordered by lower token index first. Scores are compared in float32
  (exact for fp16/bf16/float8 inputs; -0.0 equals +0.0) or, for float64, by a stable sort, so the
  result does not depend on the device, the input's dtype, the batch it sits in, or the method.
* **Prefix tokens.** The first ``num_prefix_tokens`` tokens (1 for CLIP's [CLS], 5 for DINOv2 with four
  registers, 0 for SigLIP which has no [CLS]) are never anchors.
* **Padding.** Tokens that ``key_padding_mask`` marks as padding are not candidates at all (no sentinel
  score that a real token could tie).
* **Layouts.** ``(B, H, N, N)``, ``(B, N, N)``, ``(B, H, N)`` or ``(B, N)``, inferred from the rank; 3-D
  input whose last two sizes are equal is ambiguous and needs ``layout=``.

Every method compares unique integer keys (score, then lower index first) and strikes taken tokens with
a value below every key, so the result is ``K`` distinct ascending tokens for every legal input,
``-inf``/``+inf`` scores included (with ``check_finite=False``). Four methods give identical results:

* ``"native"`` (``"auto"`` on CPU when built): a compiled C kernel, one pass per sample with no
  Python loop at all (``_native.c``, built at install when a C compiler is present). Per head it writes
  the row's keys once, bounds the quota's worst key from block maxima and scans only the blocks that
  can reach it; small quotas go through a best-first buffer, large ones (up to ``K = N/2`` and beyond)
  through a quickselect, so no quota makes it quadratic. The finite check rides along in the same pass.
  CPU only, float32/fp16/bf16 scores; lazily negated views are resolved before it reads memory.
* ``"triton"`` (CUDA, opt-in until measured on a GPU): the same walk as one Triton kernel, one program
  per sample holding its keys in registers; per head one ``tl.topk`` finds the quota-th best untaken
  key and every key at least that large is taken (``_triton_search.py``).
* ``"sorted"`` (``"auto"`` on accelerators): one ``topk`` of every head at once (``K`` candidates per
  head suffice, because earlier heads can take at most ``K - quota[h]`` of head ``h``'s best ``K``),
  then a greedy pass over heads made of gathers, a cumulative sum and a scatter on ``(B, K)`` tensors:
  no data-dependent shapes, no host reads, ``torch.compile(fullgraph=True)``-able and CUDA-graphable.
* ``"masked"`` (``"auto"`` on CPU without the kernel, for float64, and under ``torch.compile``): the
  plain formulation, one ``topk`` per head over the tokens earlier heads left.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Literal

import torch
from torch import nn

from anchor_former._validation import check_finite as _check_finite
from anchor_former._validation import check_floating, check_ndim, shape_str

_native: ModuleType | None
try:  # the compiled CPU kernel (setup.py builds it when a C compiler is present)
    _native = importlib.import_module("anchor_former._native")
except ImportError:  # pragma: no cover - exercised only on installs without a compiler
    _native = None

__all__ = ["AnchorSearch", "anchor_quotas", "anchor_search", "cls_scores", "native_search_available"]

Method = Literal["auto", "native", "triton", "sorted", "masked"]
Layout = Literal["b h n n", "b n n", "b h n", "b n"]
_METHODS = ("auto", "native", "triton", "sorted", "masked")
_LAYOUT_NDIM = {"b h n n": 4, "b n n": 3, "b h n": 3, "b n": 2}
_DEFAULT_LAYOUT: dict[int, Layout] = {4: "b h n n", 3: "b h n", 2: "b n"}  # square 3-D input is refused first
_LAYOUTS = (
    "(B, H, N, N) full attention, (B, N, N) one map per image, (B, H, N) [CLS] row per head, "
    "or (B, N) one score per token"
)
# Keys below every real key (the smallest packed key of a float32 is (INT32_MIN + 1) << 32):
# STRUCK marks tokens already taken, PADDED + (M - 1 - j) padded token j (distinct, lower index first).
_STRUCK = torch.iinfo(torch.int64).min
_PADDED = _STRUCK + 1


def anchor_quotas(num_anchors: int, num_heads: int) -> tuple[int, ...]:
    """How many new anchors each head adds: ``K // H`` each, the first ``K % H`` heads one more.

    Example: ``anchor_quotas(10, 4) == (3, 3, 2, 2)``; ``anchor_quotas(144, 16) == (9,) * 16``.
    """
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
        raise ValueError(f"num_anchors must be an integer >= 1, got {num_anchors!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
    base, extra = divmod(num_anchors, num_heads)
    return tuple(base + (1 if h < extra else 0) for h in range(num_heads))


def _resolve_layout(attention: torch.Tensor, layout: Layout | None) -> Layout:
    """The layout of ``attention``: ``layout`` checked against its rank, or inferred where unambiguous."""
    if layout is not None:
        if layout not in _LAYOUT_NDIM:
            raise ValueError(f"layout must be one of {', '.join(map(repr, _LAYOUT_NDIM))} or None, got {layout!r}")
        if attention.ndim != _LAYOUT_NDIM[layout]:
            raise ValueError(
                f"attention with layout={layout!r} must have {_LAYOUT_NDIM[layout]} dims, "
                f"got shape {shape_str(attention)} ({attention.ndim} dims)"
            )
        return layout
    if attention.ndim == 3 and attention.shape[-1] == attention.shape[-2]:
        raise ValueError(
            f"attention of shape {shape_str(attention)} is ambiguous: its last two sizes are equal, so it may be "
            "[CLS] rows per head (B, H, N) or one (head-averaged) attention map (B, N, N); pass "
            "layout='b h n' or layout='b n n'"
        )
    return _DEFAULT_LAYOUT[attention.ndim]


def cls_scores(attention: torch.Tensor, *, num_prefix_tokens: int = 1, layout: Layout | None = None) -> torch.Tensor:
    """Bring any accepted ``attention`` layout to per-head scores ``(B, H, N)``.

    Args:
        attention: ``(B, H, N, N)`` attention probabilities (row 0, the [CLS] query, is used),
            ``(B, N, N)`` one attention map per image (e.g. averaged over heads; row 0 is used),
            ``(B, H, N)`` the [CLS] query's row per head, or ``(B, N)`` one score per token (one head).
            Always batched: one image's ``(H, N)`` rows are ``rows[None]``, not ``(B, N)``.
        num_prefix_tokens: leading special tokens; a full map needs a [CLS] query (``>= 1``).
        layout: ``"b h n n"``, ``"b n n"``, ``"b h n"`` or ``"b n"``; ``None`` infers it from the rank
            (4, 3, 2 dims), except that 3-D input whose last two sizes are equal is ambiguous and raises.

    Returns:
        ``(B, H, N)`` scores (``H = 1`` for ``"b n n"`` and ``"b n"``), a view of ``attention`` (no copy).
    """
    check_ndim("attention", attention, (2, 3, 4), _LAYOUTS)
    if attention.layout != torch.strided:
        raise ValueError(
            f"attention must be a dense (strided) tensor of shape {_LAYOUTS}, got layout {attention.layout} with "
            f"shape {shape_str(attention)}; call .to_dense() first"
        )
    layout = _resolve_layout(attention, layout)
    if layout in ("b h n n", "b n n"):
        if attention.shape[-1] != attention.shape[-2]:
            raise ValueError(
                f"attention with layout {layout!r} must be a square map, "
                f"got shape {shape_str(attention)} ({attention.shape[-2]} queries, {attention.shape[-1]} keys)"
            )
        if num_prefix_tokens < 1:
            raise ValueError(
                f"attention of layout {layout!r} needs a [CLS] query at token 0, but num_prefix_tokens=0 "
                "says the model has none; pass per-token scores of shape (B, N) or (B, H, N) instead, "
                f"got shape {shape_str(attention)}"
            )
        return attention[:, :, 0, :] if layout == "b h n n" else attention[:, None, 0, :]
    if layout == "b n":
        return attention.unsqueeze(1)
    return attention


def _sort_keys(scores: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys that order ``(..., M)`` scores descending, ties by lower index first.

    float32/fp16/bf16: high 32 bits, the order-preserving integer image of the float32 score's bits
    (-0.0 and +0.0 share it); low 32 bits, ``M - 1 - j``. So ``topk`` on the keys is exact and
    deterministic, whatever the device. float64 does not fit 32 bits: its keys are ``M - 1 - rank`` from
    one stable descending sort (the same order and tie rule), so every value, ``-inf`` included, gets a
    key strictly above the sentinels ``_STRUCK`` and ``_PADDED``.
    """
    m = scores.shape[-1]
    if scores.dtype == torch.float64:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (..., M)
        rank = torch.arange(m - 1, -1, -1, device=scores.device, dtype=torch.int64).expand_as(order)
        return torch.empty_like(order).scatter_(-1, order, rank)
    bits = scores.float().contiguous().view(torch.int32)
    sign = bits >> 31  # -1 for negative floats, else 0
    # Flip the magnitude bits of negatives, then add 1 to them so that -0.0 and +0.0 share a key.
    ordered = (bits ^ (sign & 0x7FFFFFFF)).sub_(sign)  # int32, same order as the floats
    if sys.byteorder == "little" and not torch.compiler.is_compiling():
        # Interleave (low, high) int32 words and reinterpret as int64: one copy instead of three
        # int64 passes (casts and shifts of int64 are not vectorised on CPU).
        rank = torch.arange(m - 1, -1, -1, device=scores.device, dtype=torch.int32).expand_as(ordered)
        return torch.stack([rank, ordered], dim=-1).view(torch.int64).squeeze(-1)
    rank64 = torch.arange(m - 1, -1, -1, device=scores.device, dtype=torch.int64)
    return (ordered.to(torch.int64) << 32) | rank64


def _strike_padding(keys: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Keys ``(..., B, M)`` with padded tokens (``real (B, M)`` False) moved below every real key.

    Padded token ``j`` gets ``_PADDED + (M - 1 - j)``: still distinct, so even a search forced onto
    padding (too few real tokens, unchecked under ``torch.compile``) returns distinct tokens.
    """
    if real is None:
        return keys
    m = keys.shape[-1]
    rank = torch.arange(m - 1, -1, -1, device=keys.device, dtype=torch.int64)
    return torch.where(real, keys, rank + _PADDED)


def _greedy_sorted(keys: torch.Tensor, quotas: tuple[int, ...]) -> torch.Tensor:
    """The search over candidate keys ``(B, H, M)``; returns the chosen mask ``(B, M)``."""
    b, _, m = keys.shape
    k = sum(quotas)
    cand = torch.topk(keys, k, dim=-1, sorted=True).indices  # (B, H, K) candidate indices, best first
    chosen = torch.zeros(b, m, dtype=torch.bool, device=keys.device)
    for h, quota in enumerate(quotas):
        if quota == 0:
            continue
        # Head h needs at most (anchors already taken) + quota of its best candidates.
        width = min(sum(quotas[: h + 1]), k)
        idx = cand[:, h, :width]  # (B, W)
        taken = chosen.gather(1, idx)  # (B, W)
        fresh = ~taken
        pick = fresh & (fresh.cumsum(dim=1) <= quota)  # the first `quota` untaken candidates
        chosen = chosen.scatter(1, idx, taken | pick)
    return chosen


def _greedy_masked(keys: torch.Tensor, quotas: tuple[int, ...]) -> torch.Tensor:
    """Plain formulation: one top-k per head over the tokens no earlier head took.

    ``keys (H, B, M)`` are unique (:func:`_sort_keys`), one head's rows contiguous (top-k over strided
    rows is twice as slow on CPU); they are changed in place. Before head ``h`` chooses, the picks so far
    are struck out of its own rows with ``_STRUCK``, below every other key, so no token is picked twice.
    Returns the anchors ``(B, K)`` in candidate coordinates, ascending.
    """
    b = keys.shape[1]
    k = sum(quotas)
    picks = torch.empty(b, k, dtype=torch.int64, device=keys.device)  # (B, K), filled head by head
    done = 0
    for h, quota in enumerate(quotas):
        if quota == 0:
            continue
        row = keys[h]  # (B, M)
        if done:
            row.scatter_(1, picks[:, :done], _STRUCK)
        picks[:, done : done + quota] = torch.topk(row, quota, dim=-1, sorted=False).indices  # (B, quota)
        done += quota
    return picks.sort(dim=1).values  # (B, K)


def _mask_to_sorted_indices(chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` True entries of each row of ``chosen (B, M)``, ascending, as ``(B, k)``.

    A cumulative sum gives every chosen token its output slot; unchosen tokens go to a spill column.
    """
    b, m = chosen.shape
    slot = torch.where(chosen, chosen.cumsum(dim=1) - 1, k)  # (B, M)
    positions = torch.arange(m, device=chosen.device, dtype=torch.int64).expand(b, m)
    out = torch.zeros(b, k + 1, dtype=torch.int64, device=chosen.device)
    return out.scatter(1, slot, positions)[:, :k]


def native_search_available() -> bool:
    """Whether the compiled CPU kernel (``method="native"``) was built with this install."""
    return _native is not None


def _own_cpu_memory(scores: torch.Tensor) -> bool:
    """Whether ``scores`` is a plain strided CPU tensor with its own storage at ``data_ptr()``.

    False for tensors without their own storage (functorch-wrapped tensors under ``vmap``/``grad``,
    ``__torch_dispatch__`` subclasses, meta), PyTorch's zero tensors and non-strided layouts.
    """
    return (
        scores.layout == torch.strided
        and scores.device.type == "cpu"
        and type(scores) in (torch.Tensor, nn.Parameter)
        and not torch._C._functorch.is_functorch_wrapped_tensor(scores)
        and not scores._is_zerotensor()
    )


def _plain_memory(scores: torch.Tensor) -> bool:
    """Whether raw memory holds ``scores``' values as its strides say: own CPU memory and none of the
    lazy bits that change values without changing memory (negation, conjugation)."""
    return _own_cpu_memory(scores) and not scores.is_neg() and not scores.is_conj()


def _native_search(
    scores: torch.Tensor,
    quotas: tuple[int, ...],
    *,
    num_prefix_tokens: int,
    include_cls: bool,
    check_finite: bool,
    key_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The search by the compiled kernel: ``scores (B, H, N)`` on the CPU → ``(B, K + 1)`` or ``(B, K)``.

    The kernel reads float32 scores through their strides (fp16/bf16 are upcast exactly first) and
    writes the result rows; it counts non-finite scores in the same pass. A large batch is split over up
    to ``torch.get_num_threads()`` threads. Lazily negated/conjugated views are resolved first: the
    kernel reads raw memory, which holds their values un-negated.
    """
    scores = scores.detach()
    if scores.dtype != torch.float32:
        scores = scores.float()  # (B, H, N), exact for fp16/bf16; resolves lazy bits
    scores = scores.resolve_neg().resolve_conj()  # no copy unless a bit is set
    if not _plain_memory(scores):
        raise ValueError(
            f"method='native' reads raw memory and cannot take this tensor of shape {shape_str(scores)} "
            f"(type {type(scores).__name__}, layout {scores.layout}); use method='masked' or 'auto'"
        )
    b, h, n = scores.shape
    width = sum(quotas) + int(include_cls)
    out = torch.empty(b, width, dtype=torch.int64)  # (B, K + 1) or (B, K)
    mask_args: tuple[int, ...] = (0, 0, 0)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.detach().resolve_neg().resolve_conj()
        mask_args = (key_padding_mask.data_ptr(), *key_padding_mask.stride())
    if _native is None:  # _resolve_method picks "native" only when the kernel loaded
        raise RuntimeError("the compiled CPU kernel is not available in this install")
    bad = _native.search(
        scores.data_ptr(), b, h, n, *scores.stride(), num_prefix_tokens, quotas,
        out.data_ptr(), out.stride(0), width, include_cls, check_finite, torch.get_num_threads(), *mask_args,
    )  # fmt: skip
    if bad:
        _check_finite("attention", scores)  # raises with the counts
    return out


def _resolve_method(method: Method, scores: torch.Tensor) -> Method:
    """The method that runs on ``scores (B, H, N)``: ``"auto"`` picks by device, dtype, memory and
    tracing; an explicit ``"native"`` or ``"triton"`` is checked against what its kernel can take."""
    on_cpu = scores.device.type == "cpu"
    kernel_fits = on_cpu and scores.dtype != torch.float64 and not torch.compiler.is_compiling()
    if method == "auto":
        # On CPU the compiled kernel beats H top-k calls at every measured size (benchmarks/bench_search_sweep.py);
        # on accelerators one top-k plus a greedy pass of small fused ops beats H separate top-k launches.
        if not on_cpu:
            return "sorted"
        if not kernel_fits or _native is None:
            return "masked"
        # A tensor without memory of its own (wrapped under vmap, a dispatch subclass) stays in PyTorch, on
        # the path without in-place ops; lazily negated/conjugated views are resolved by _native_search.
        return "native" if _own_cpu_memory(scores) else "sorted"
    if method == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("method='triton' needs the triton package (it ships with CUDA builds of PyTorch)")
        if scores.device.type != "cuda" or scores.dtype == torch.float64:
            raise ValueError(
                "method='triton' takes CUDA float32/float16/bfloat16 scores, got scores of shape "
                f"{shape_str(scores)} on {scores.device} with dtype {scores.dtype}; use method='sorted' or 'auto'"
            )
    if method == "native":
        if _native is None:
            raise RuntimeError(
                "method='native' needs the compiled CPU kernel, which this install lacks (it is built "
                "when a C compiler is present at install time); use method='masked' or 'auto'"
            )
        if not kernel_fits:
            raise ValueError(
                "method='native' takes CPU float32/float16/bfloat16 scores outside torch.compile, got "
                f"scores of shape {shape_str(scores)} on {scores.device} with dtype {scores.dtype}"
                f"{' while torch.compile traces' if torch.compiler.is_compiling() else ''}; "
                "use method='masked' or 'auto'"
            )
    return method


def _check_options(*, include_cls: bool, num_prefix_tokens: int, method: str) -> None:
    """Validate the search's settings (shared by :func:`anchor_search` and :class:`AnchorSearch`)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an integer >= 0, got {num_prefix_tokens!r}")
    if include_cls and num_prefix_tokens < 1:
        raise ValueError(
            "include_cls=True needs a [CLS] token at index 0, but num_prefix_tokens=0 says the model has "
            "none; pass include_cls=False"
        )


def _check_padding_mask(
    key_padding_mask: torch.Tensor, scores: torch.Tensor, num_anchors: int, num_prefix_tokens: int
) -> None:
    """``key_padding_mask (B, N)`` bool on the scores' device, every sample with ``K`` real candidates."""
    b, _, n = scores.shape
    expected = f"(B, N) = ({b}, {n}) bool, True = real token, on {scores.device}"
    check_ndim("key_padding_mask", key_padding_mask, (2,), expected)
    if (
        key_padding_mask.dtype != torch.bool
        or tuple(key_padding_mask.shape) != (b, n)
        or key_padding_mask.device != scores.device
        or key_padding_mask.layout != torch.strided
    ):
        raise ValueError(
            f"key_padding_mask must be {expected}, got shape {shape_str(key_padding_mask)}, dtype "
            f"{key_padding_mask.dtype}, device {key_padding_mask.device}, layout {key_padding_mask.layout}"
        )
    if torch.compiler.is_compiling() or key_padding_mask.device.type == "meta":
        return
    real = key_padding_mask[:, num_prefix_tokens:].sum(dim=1)  # (B,) real candidates per sample
    short = real < num_anchors
    if bool(short.any()):  # one host read
        which = short.nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"key_padding_mask leaves samples {which} with fewer real candidate tokens "
            f"({real[which].tolist()}) than num_anchors={num_anchors}; padded tokens are never anchors"
        )


def anchor_search(
    attention: torch.Tensor,
    num_anchors: int,
    *,
    include_cls: bool = True,
    num_prefix_tokens: int = 1,
    method: Method = "auto",
    check_finite: bool = True,
    layout: Layout | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Find the visual anchors: per head, in head order, the best tokens not yet chosen.

    Args:
        attention: one of
            ``(B, H, N, N)`` attention probabilities of one layer (the [CLS] query's row 0 is used),
            ``(B, N, N)`` one attention map per image (e.g. averaged over heads; pass ``layout="b n n"``),
            ``(B, H, N)`` the [CLS] query's attention row per head (what the probes return), or
            ``(B, N)`` one score per token (a single head; also norm-based or pooled scores).
            B is the batch, H the heads, N the tokens including the prefix tokens. Always batched: one
            image's ``(H, N)`` rows are passed as ``rows[None]``. Any floating dtype (float8 is upcast
            exactly), any device, dense (strided) layout; values need not be normalised (only their order
            matters).
        num_anchors: K, the number of anchors to return besides the [CLS] token, at most
            ``N - num_prefix_tokens``. Spread over heads by :func:`anchor_quotas`.
        include_cls: prepend token 0 ([CLS]) to the result. Needs ``num_prefix_tokens >= 1``.
        num_prefix_tokens: leading special tokens that are never anchors: 1 for [CLS] (CLIP, timm ViT),
            1 + registers for DINOv2 with registers, 0 for models without [CLS] (SigLIP).
        method: ``"native"`` (the compiled CPU kernel; CPU float32/fp16/bf16 scores, not traceable by
            ``torch.compile``), ``"triton"`` (one Triton kernel; CUDA float32/fp16/bf16, opt-in),
            ``"sorted"`` (one top-k of all heads + a greedy pass; for accelerators), ``"masked"``
            (one top-k per head; the plain formulation) or ``"auto"``:
            ``"native"`` on CPU when it was built (``"masked"`` without it, for float64 scores and while
            ``torch.compile`` traces; ``"sorted"`` for tensors without memory of their own such as
            ``vmap``-wrapped ones), ``"sorted"`` elsewhere. All return identical results.
        check_finite: raise on NaN/inf scores. On CUDA this reads one flag back to the host; pass False
            in a latency-critical or CUDA-graphed loop. Skipped while ``torch.compile`` traces and for
            meta tensors (no values); free with the native kernel, which checks in its own pass.
        layout: ``"b h n n"``, ``"b n n"``, ``"b h n"`` or ``"b n"``, the layout of ``attention``;
            ``None`` infers it from the rank (4, 3, 2 dims), but 3-D input whose last two sizes are
            equal is ambiguous (rows per head or one map?) and raises unless ``layout`` is given.
        key_padding_mask: ``(B, N)`` bool, True = real token. Padded tokens are never anchors: they are
            excluded before any comparison, whatever their scores. Every sample needs at least
            ``num_anchors`` real candidate tokens (checked with one host read, skipped under
            ``torch.compile``).

    Returns:
        LongTensor ``(B, K + 1)`` = ``[0, a_1 < a_2 < ... < a_K]`` with ``include_cls=True``, else
        ``(B, K)`` ascending; indices into the full token sequence (prefix tokens included), on the
        device of ``attention``.

    Raises:
        ValueError: wrong rank or an ambiguous 3-D shape without ``layout``, a non-square full map, a
            non-floating dtype, a sparse tensor, NaN/inf scores, ``num_anchors`` < 1 or above the number
            of candidates, a bad ``key_padding_mask`` or too few real tokens, an unknown method,
            ``method="native"``/``"triton"`` for scores it cannot take (wrong device, float64, the
            native kernel under ``torch.compile``), or ``include_cls=True`` with ``num_prefix_tokens=0``.
        RuntimeError: ``method="native"`` on an install built without the kernel, ``method="triton"``
            without the triton package.
    """
    _check_options(include_cls=include_cls, num_prefix_tokens=num_prefix_tokens, method=method)
    scores = cls_scores(attention, num_prefix_tokens=num_prefix_tokens, layout=layout)  # (B, H, N)
    check_floating("attention", attention)
    b, h, n = scores.shape
    candidates = n - num_prefix_tokens
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or not 1 <= num_anchors <= candidates:
        raise ValueError(
            f"num_anchors must be an integer in [1, {candidates}] (N - num_prefix_tokens = {n} - "
            f"{num_prefix_tokens} candidate tokens for attention of shape {shape_str(attention)}), "
            f"got {num_anchors!r}"
        )
    if scores.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        scores = scores.float()  # float8 and other narrow floats: exact in float32, same order and ties
    if key_padding_mask is not None:
        _check_padding_mask(key_padding_mask, scores, num_anchors, num_prefix_tokens)
    method = _resolve_method(method, scores)
    quotas = anchor_quotas(num_anchors, h)
    if method == "native":
        return _native_search(
            scores, quotas, num_prefix_tokens=num_prefix_tokens, include_cls=include_cls, check_finite=check_finite,
            key_padding_mask=key_padding_mask,
        )  # fmt: skip
    if method == "triton":
        from anchor_former._triton_search import triton_search

        anchors, bad = triton_search(
            scores, quotas, num_prefix_tokens=num_prefix_tokens, include_cls=include_cls,
            key_padding_mask=key_padding_mask,
        )  # fmt: skip
        if check_finite and not torch.compiler.is_compiling() and bool(bad.any()):  # one host read
            _check_finite("attention", scores)  # raises with the counts
        return anchors
    if check_finite:
        _check_finite("attention", scores)

    real = None if key_padding_mask is None else key_padding_mask[:, num_prefix_tokens:]  # (B, M)
    cand_scores = scores[:, :, num_prefix_tokens:]  # (B, H, M), M = N - num_prefix_tokens
    if method == "masked":
        keys = _sort_keys(cand_scores.transpose(0, 1).contiguous())  # (H, B, M), a fresh tensor
        anchors = _greedy_masked(_strike_padding(keys, real), quotas)
    else:
        keys = _strike_padding(_sort_keys(cand_scores), None if real is None else real[:, None, :])  # (B, H, M)
        anchors = _mask_to_sorted_indices(_greedy_sorted(keys, quotas), num_anchors)
    anchors = anchors + num_prefix_tokens  # (B, K) indices into the full sequence
    if include_cls:
        cls = torch.zeros(b, 1, dtype=torch.int64, device=anchors.device)
        anchors = torch.cat([cls, anchors], dim=1)  # (B, K + 1)
    return anchors


class AnchorSearch(nn.Module):
    """:func:`anchor_search` as a reusable module without parameters (composes, prints, moves with ``.to``).

    Args:
        num_anchors: K anchors besides [CLS].
        include_cls: prepend token 0 to the result.
        num_prefix_tokens: leading special tokens that are never anchors.
        method: ``"auto"``, ``"native"``, ``"triton"``, ``"sorted"`` or ``"masked"`` (identical results).
        check_finite: raise on NaN/inf scores (one host read on CUDA).

    Shapes:
        ``forward(attention)``: ``(B, H, N, N)``, ``(B, N, N)``, ``(B, H, N)`` or ``(B, N)`` → ``(B, K + 1)``
        (or ``(B, K)``).
    """

    def __init__(
        self,
        num_anchors: int,
        *,
        include_cls: bool = True,
        num_prefix_tokens: int = 1,
        method: Method = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        anchor_quotas(num_anchors, 1)  # validates num_anchors
        _check_options(include_cls=include_cls, num_prefix_tokens=num_prefix_tokens, method=method)
        self.num_anchors = num_anchors
        self.include_cls = include_cls
        self.num_prefix_tokens = num_prefix_tokens
        self.method = method
        self.check_finite = check_finite

    @property
    def num_queries(self) -> int:
        """Length of the returned index rows: K + 1 with [CLS], else K."""
        return self.num_anchors + int(self.include_cls)

    def forward(
        self, attention: torch.Tensor, *, layout: Layout | None = None, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, H, N, N)`` / ``(B, N, N)`` / ``(B, H, N)`` / ``(B, N)`` scores → LongTensor ``(B, K + 1)`` or
        ``(B, K)``; ``layout`` and ``key_padding_mask (B, N)`` as in :func:`anchor_search`."""
        return anchor_search(
            attention,
            self.num_anchors,
            include_cls=self.include_cls,
            num_prefix_tokens=self.num_prefix_tokens,
            method=self.method,
            check_finite=self.check_finite,
            layout=layout,
            key_padding_mask=key_padding_mask,
        )

    def extra_repr(self) -> str:
        return (
            f"num_anchors={self.num_anchors}, include_cls={self.include_cls}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, method={self.method!r}"
        )
