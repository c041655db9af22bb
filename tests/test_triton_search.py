"""Tests for the Triton search kernel (anchor_former._triton_search, ``method="triton"``).

Without a GPU the kernel is checked two ways: Triton's interpreter runs it on CPU tensors (exact
agreement with the masked path, ties and non-finite counts included), and Triton's compiler builds it
to a cubin for the GPUs the benchmarks name (sm_80, sm_90), which catches what the interpreter does not
(types, shapes, register allocation). The CUDA test runs it for real where a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from anchor_former import anchor_search

triton = pytest.importorskip("triton", reason="triton ships with CUDA builds of PyTorch only")

INTERPRETED = textwrap.dedent(
    """
    import torch
    from anchor_former import anchor_search
    from anchor_former.search import anchor_quotas
    from anchor_former._triton_search import triton_search

    gen = torch.Generator().manual_seed(0)
    pool = torch.tensor([-3.0e38, -2.5, -1.0, -0.0, 0.0, 1e-30, 0.25, 0.25000003, 1.0, 3.0e38])
    cases = [  # (b, h, n, k, prefix, include_cls, tied, token_major)
        (2, 4, 30, 12, 1, True, False, False),
        (3, 5, 40, 17, 1, True, True, False),  # quotas 4, 4, 3, 3, 3; many ties
        (2, 3, 21, 20, 0, False, True, True),  # every candidate taken; strided scores
        (2, 6, 9, 4, 2, False, False, False),  # more heads than anchors
        (1, 1, 33, 1, 1, True, False, False),  # quota 1
        (1, 16, 577, 144, 1, True, False, False),  # LLaVA-1.5 shapes
    ]
    for b, h, n, k, prefix, include_cls, tied, token_major in cases:
        if tied:
            scores = pool[torch.randint(len(pool), (b, h, n), generator=gen)]
        else:
            scores = torch.randn(b, h, n, generator=gen)
        if token_major:
            scores = scores.transpose(0, 2).contiguous().transpose(0, 2)
        for dtype in (torch.float32, torch.bfloat16):
            x = scores.to(dtype)
            got, bad = triton_search(x, anchor_quotas(k, h), num_prefix_tokens=prefix, include_cls=include_cls)
            want = anchor_search(x, k, num_prefix_tokens=prefix, include_cls=include_cls, method="masked")
            assert torch.equal(got, want), (b, h, n, k, prefix, include_cls, tied, dtype)
            assert bad.tolist() == [0] * b

    scores = torch.rand(3, 4, 10)
    scores[1, 2, 0] = float("nan")  # the [CLS] score counts too
    scores[1, 0, 5] = float("inf")
    scores[2, 3, 9] = -float("inf")
    _, bad = triton_search(scores, anchor_quotas(3, 4), num_prefix_tokens=1, include_cls=True)
    assert bad.tolist() == [0, 2, 1], bad.tolist()

    # Padding: padded tokens are never anchors, even with the highest or the lowest finite scores.
    scores = torch.randn(3, 4, 40, generator=gen)
    scores[:, :, 30:] = 3.0e38
    scores[0, :, 5] = -torch.finfo(torch.float32).max  # a real token at the lowest finite score
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[:, 30:] = False
    mask[1, 10:20] = False
    for k in (8, 15, 19):  # sample 1 has 19 real candidates
        got, _ = triton_search(scores, anchor_quotas(k, 4), num_prefix_tokens=1, include_cls=True,
                               key_padding_mask=mask)
        want = anchor_search(scores, k, method="masked", key_padding_mask=mask)
        assert torch.equal(got, want), (k, got, want)
    print("ok")
    """
)

# (B=1, H=3, N=64) fp16 rows 2**30 + 64 elements apart: head 2 starts past 2**31 elements, as in a full
# (B, H, N, N) map beyond ~12k tokens read through its [CLS] row. torch.empty only reserves the pages
# (6 GiB of address space, about 1 MiB touched); 32-bit offsets wrap and read outside the tensor.
LARGE_STRIDES = textwrap.dedent(
    """
    import torch
    from anchor_former import anchor_search
    from anchor_former.search import anchor_quotas
    from anchor_former._triton_search import triton_search

    n, stride_h = 64, 2**30 + 64
    storage = torch.empty(2 * stride_h + n, dtype=torch.float16)
    rows = torch.as_strided(storage, (1, 3, n), (3 * stride_h, stride_h, 1))
    dense = torch.randn(1, 3, n, generator=torch.Generator().manual_seed(0)).half()
    rows.copy_(dense)
    got, bad = triton_search(rows, anchor_quotas(12, 3), num_prefix_tokens=1, include_cls=True)
    assert torch.equal(got, anchor_search(dense, 12, method="masked")), got
    assert bad.tolist() == [0]
    print("ok")
    """
)


def test_kernel_matches_masked_path_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_kernel_offsets_do_not_wrap_at_2_to_the_31_elements():
    """Offsets are 64-bit: the third head's row lies 2**31 + 128 elements in (the old kernel crashed)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", LARGE_STRIDES], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.returncode, result.stderr[-3000:])


@pytest.mark.parametrize(
    ("dtype", "arch", "block_n", "top"),
    [("fp32", 90, 1024, 16), ("bf16", 90, 1024, 16), ("fp16", 80, 1024, 16), ("fp32", 80, 2048, 32)],
)
@pytest.mark.parametrize("has_mask", [False, True])
def test_kernel_compiles_for_gpus(dtype, arch, block_n, top, has_mask):
    """Compile to a cubin for an A100 (sm_80) or H100/H200 (sm_90) without one: no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from anchor_former._triton_search import _search_kernel

    ints = ["num_heads", "num_tokens", "num_prefix", "quota_base", "quota_extra"]
    # Strides as Triton passes values below 2**31: 32-bit; the kernel must widen its offsets itself.
    strides = ["stride_b", "stride_h", "stride_n", "out_stride_b", "mask_stride_b", "mask_stride_n"]
    signature = {"scores_ptr": f"*{dtype}", "out_ptr": "*i64", "bad_ptr": "*i32", "mask_ptr": "*i1"}
    signature |= {name: "i32" for name in ints} | {name: "i32" for name in strides}
    signature |= {"HAS_MASK": "constexpr", "INCLUDE_CLS": "constexpr", "BLOCK_N": "constexpr", "TOP": "constexpr"}
    constexprs = {"HAS_MASK": has_mask, "INCLUDE_CLS": 1, "BLOCK_N": block_n, "TOP": top}
    source = ASTSource(fn=_search_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    assert kernel.asm["cubin"]
    assert "st.local" not in kernel.asm["ptx"]  # no stack arrays: the keys stay in registers


def test_rejects_scores_it_cannot_take():
    with pytest.raises(ValueError, match=r"method='triton' takes CUDA float32.*\(2, 4, 10\) on cpu"):
        anchor_search(torch.rand(2, 4, 10), 3, method="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    row = torch.softmax(torch.randn(32, 16, 577, generator=gen), dim=-1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for k in (256, 144, 100):
            got = anchor_search(row.to("cuda", dtype), k, method="triton")
            assert got.device.type == "cuda"
            assert torch.equal(got.cpu(), anchor_search(row.to(dtype), k, method="masked"))
    bad = row.to("cuda").clone()
    bad[3, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="attention must be finite, got 1 NaN"):
        anchor_search(bad, 144, method="triton")
