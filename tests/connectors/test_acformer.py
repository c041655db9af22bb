"""Tests for anchor_former.connectors._acformer.AnchorFormer against a naive loop written here (the authors' resampler layout)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anchor_former import AnchorFormer, AnchorFormerConfig, anchor_search

SMALL = dict(vision_dim=16, llm_dim=24, num_anchors=5, depth=2, heads=2, dim_head=8, ff_mult=2)


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def small(**overrides: object) -> AnchorFormer:
    return AnchorFormer(**{**SMALL, **overrides})  # type: ignore[arg-type]


def random_anchors(b: int, n: int, k: int) -> torch.Tensor:
    """[CLS] then k distinct sorted patch indices per sample, like anchor_search returns."""
    cls = torch.zeros(1, dtype=torch.long)
    rows = [torch.cat([cls, torch.randperm(n - 1)[:k].sort().values + 1]) for _ in range(b)]
    return torch.stack(rows)


# --- the reference, written out plainly ----------------------------------------------------------------


def layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def naive_forward(
    model: AnchorFormer, features: torch.Tensor, anchor_idx: torch.Tensor, n_real: list[int]
) -> torch.Tensor:
    """One sample at a time, one head at a time, softmax by hand over the sample's first n_real tokens."""
    cfg = model.config
    outputs = []
    for b in range(features.shape[0]):
        x = features[b, : n_real[b]]  # (N_b, D): every real token is a key/value
        q = x[anchor_idx[b]]  # (K, D): the anchors are the queries
        for layer in model.layers:
            a = layer.attn
            media, latents = layer_norm(x, a.norm_media), layer_norm(q, a.norm_latents)
            if cfg.kv_include_queries:
                media = torch.cat([media, latents])
            qh = latents @ a.to_q.weight.T
            kh, vh = (media @ a.to_kv.weight.T).chunk(2, dim=-1)
            heads = []
            for h in range(cfg.heads):
                cols = slice(h * cfg.dim_head, (h + 1) * cfg.dim_head)
                logits = qh[:, cols] @ kh[:, cols].T / math.sqrt(cfg.dim_head)  # (K, N_b)
                weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
                weights = weights / weights.sum(-1, keepdim=True)
                heads.append(weights @ vh[:, cols])
            q = q + torch.cat(heads, dim=-1) @ a.to_out.weight.T
            ln, fc1, _, fc2 = layer.ff
            q = q + gelu(layer_norm(q, ln) @ fc1.weight.T) @ fc2.weight.T
        y = layer_norm(q, model.norm)
        p0, _, p2 = model.projector
        outputs.append(gelu(y @ p0.weight.T + p0.bias) @ p2.weight.T + p2.bias)
    return torch.stack(outputs)


# --- numerics -------------------------------------------------------------------------------------------
# Tolerances are a few times the error measured on a 2-core x86-64 CPU (torch 2.14): float64 against the
# naive loop ~4e-16 -> 4e-15; float32 paths ~1.5e-7 -> 1e-6; half precision below. Paths that run the
# same operations in the same order are compared exactly. test_tolerances_bite shows each one rejects a
# deliberately broken model.
F64_TOL = dict(atol=4e-15, rtol=0)
F32_TOL = dict(atol=1e-6, rtol=0)
# Half precision against float32, max over 20 seeds of |half - fp32| / (|fp32| + 1): bf16 5.3e-3, fp16 5.3e-4.
HALF_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("kv_include_queries", [False, True])
def test_matches_naive_reference(fused_attn: bool, kv_include_queries: bool) -> None:
    model = small(fused_attn=fused_attn, kv_include_queries=kv_include_queries).double()
    features = torch.randn(3, 17, 16, dtype=torch.float64)
    anchor_idx = random_anchors(3, 17, 5)
    out = model(features, anchor_idx)
    assert out.shape == (3, 6, 24)
    torch.testing.assert_close(out, naive_forward(model, features, anchor_idx, [17] * 3), **F64_TOL)


def test_fused_equals_manual_float32() -> None:
    model = small()
    features, anchor_idx = torch.randn(4, 26, 16), random_anchors(4, 26, 5)
    fused = model(features, anchor_idx)
    model.fused_attn = False
    torch.testing.assert_close(fused, model(features, anchor_idx), **F32_TOL)


@pytest.mark.parametrize("fused_attn", [True, False])
def test_padded_batch_equals_each_sample_alone(fused_attn: bool) -> None:
    model = small(fused_attn=fused_attn).double()
    lengths = [10, 17, 13]
    samples = [torch.randn(n, 16, dtype=torch.float64) for n in lengths]
    anchors = [random_anchors(1, n, 5) for n in lengths]
    padded = torch.randn(3, 17, 16, dtype=torch.float64) * 100  # garbage in the padding
    mask = torch.zeros(3, 17, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        padded[i, :n], mask[i, :n] = s, True
    out = model(padded, torch.cat(anchors), key_padding_mask=mask)
    for i, (s, a) in enumerate(zip(samples, anchors, strict=True)):
        torch.testing.assert_close(out[i : i + 1], model(s[None], a), **F64_TOL)
    torch.testing.assert_close(out, naive_forward(model, padded, torch.cat(anchors), lengths), **F64_TOL)


def test_attention_path_equals_search_then_indices() -> None:
    model = small()
    features, attention = torch.randn(2, 17, 16), torch.rand(2, 4, 17, 17)
    via_attention = model(features, attention=attention)
    via_indices = model(features, anchor_search(attention, 5))
    torch.testing.assert_close(via_attention, via_indices, atol=0, rtol=0)
    assert via_attention.shape == (2, model.num_output_tokens(17), 24)


def test_attention_path_with_register_tokens_never_picks_prefix() -> None:
    model = small(num_prefix_tokens=5)  # [CLS] + 4 registers, as DINOv2 with registers
    features, scores = torch.randn(2, 21, 16), torch.rand(2, 4, 21)
    scores[:, :, 1:5] = 10.0  # registers would win if they were candidates
    out = model(features, attention=scores)
    idx = anchor_search(scores, 5, num_prefix_tokens=5)
    assert bool((idx[:, 1:] >= 5).all())
    torch.testing.assert_close(out, model(features, idx), atol=0, rtol=0)


def test_attention_path_never_picks_padding_and_matches_alone() -> None:
    model = small()
    features, scores = torch.randn(2, 17, 16), torch.rand(2, 4, 17)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, 11:] = False
    scores[0, :, 11:] = 10.0  # padded tokens would win the search if they were candidates
    out = model(features, attention=scores, key_padding_mask=mask)
    alone = model(features[:1, :11], attention=scores[:1, :, :11])
    torch.testing.assert_close(out[:1], alone, **F32_TOL)


@settings(max_examples=25, deadline=None)
@given(perm_seed=st.integers(0, 2**31 - 1))
def test_permuting_anchor_idx_permutes_outputs(perm_seed: int) -> None:
    torch.manual_seed(1)
    model = small().double()
    features, anchor_idx = torch.randn(2, 17, 16, dtype=torch.float64), random_anchors(2, 17, 5)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(perm_seed))
    permuted, plain = model(features, anchor_idx[:, perm]), model(features, anchor_idx)
    torch.testing.assert_close(permuted, plain[:, perm], **F64_TOL)


def test_non_anchor_token_changes_output() -> None:
    model = small()
    features, anchor_idx = torch.randn(1, 17, 16), torch.tensor([[0, 2, 5, 7, 9, 11]])
    changed = features.clone()
    changed[0, 3] = torch.randn(16)  # token 3 is a key/value, not a query (a constant shift would vanish in LN)
    assert (model(features, anchor_idx) - model(changed, anchor_idx)).abs().max() > 1e-3


def test_any_number_of_anchors_and_int32_indices() -> None:
    model = small()
    features = torch.randn(2, 17, 16)
    idx = torch.tensor([[3, 1], [0, 16]], dtype=torch.int32)
    torch.testing.assert_close(model(features, idx), model(features, idx.long()))
    assert model(features, idx).shape == (2, 2, 24)


# --- training properties -------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient() -> None:
    model = small()
    model(torch.randn(2, 17, 16), random_anchors(2, 17, 5)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_gradient_checkpointing_gives_same_outputs_and_gradients() -> None:
    plain, ckpt = small(), small(gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    features, anchor_idx = torch.randn(2, 17, 16), random_anchors(2, 17, 5)
    grads = []
    for model in (plain, ckpt):
        x = features.clone().requires_grad_()
        model(x, anchor_idx).square().mean().backward()
        grads.append([x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same operations, recomputed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused_attn", [True, False])
def test_half_precision_close_to_float32(dtype: torch.dtype, fused_attn: bool) -> None:
    model = small(fused_attn=fused_attn)
    half = small(fused_attn=fused_attn, dtype=dtype)
    half.load_state_dict(model.state_dict())
    features, anchor_idx = torch.randn(2, 17, 16), random_anchors(2, 17, 5)
    out = half(features.to(dtype), anchor_idx)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), model(features, anchor_idx), atol=HALF_TOL[dtype], rtol=HALF_TOL[dtype])
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in half.parameters())


def test_compile_fullgraph_forward_backward_matches_eager() -> None:
    torch._dynamo.reset()
    model = small()
    features, anchor_idx = torch.randn(2, 17, 16), random_anchors(2, 17, 5)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, 14:] = False

    def step(m: nn.Module) -> list[torch.Tensor]:
        m.zero_grad()
        out = m(features, anchor_idx, key_padding_mask=mask)
        out.square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in m.parameters()]

    eager = step(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, step(compiled), strict=True):
        torch.testing.assert_close(a, b, **F32_TOL)  # measured 0: aot_eager runs the same ATen ops


@pytest.mark.slow
def test_compile_inductor_fullgraph_with_checkpointing() -> None:
    torch._dynamo.reset()
    model = small(gradient_checkpointing=True)
    features, anchor_idx = torch.randn(2, 17, 16), random_anchors(2, 17, 5)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(features, anchor_idx)
    out.square().mean().backward()
    torch.testing.assert_close(out, model(features, anchor_idx), atol=1e-5, rtol=1e-5)  # inductor fuses: looser
    assert all(p.grad is not None for p in model.parameters())


def test_tolerances_bite() -> None:
    """Each tolerance above rejects a deliberately broken model (so the tests can fail for real bugs)."""
    # float64 naive reference: a 1e-9 change in one weight is far outside 4e-15.
    model = small().double()
    features, anchor_idx = torch.randn(3, 17, 16, dtype=torch.float64), random_anchors(3, 17, 5)
    expected = naive_forward(model, features, anchor_idx, [17] * 3)
    with torch.no_grad():
        model.layers[1].attn.to_out.weight[0, 0] += 1e-9
    with pytest.raises(AssertionError):
        torch.testing.assert_close(model(features, anchor_idx), expected, **F64_TOL)
    # half precision: a model missing its last resampler layer (the old tolerance, 0.1 / 0.05, passed it).
    for dtype, tol in HALF_TOL.items():
        full = small()
        broken = small(dtype=dtype)
        broken.load_state_dict(full.state_dict())
        broken.layers = broken.layers[:-1]
        features, anchor_idx = torch.randn(2, 17, 16), random_anchors(2, 17, 5)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(
                broken(features.to(dtype), anchor_idx).float(), full(features, anchor_idx), atol=tol, rtol=tol
            )


# --- layout, counts and config -------------------------------------------------------------------------


def reference_layout(d: int, llm: int, depth: int, heads: int, dim_head: int, ff_mult: int, latents: int) -> dict:
    """Key → shape of the reference projector (the authors' patch), under ``model.mm_projector.``."""
    inner = heads * dim_head
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        p = f"0.layers.{i}."
        shapes |= {
            p + "0.norm_media.weight": (d,),
            p + "0.norm_media.bias": (d,),
            p + "0.norm_latents.weight": (d,),
            p + "0.norm_latents.bias": (d,),
            p + "0.to_q.weight": (inner, d),
            p + "0.to_kv.weight": (2 * inner, d),
            p + "0.to_out.weight": (d, inner),
            p + "1.0.weight": (d,),
            p + "1.0.bias": (d,),
            p + "1.1.weight": (ff_mult * d, d),
            p + "1.3.weight": (d, ff_mult * d),
        }
    shapes |= {"0.norm.weight": (d,), "0.norm.bias": (d,), "0.latents": (latents, d)}
    shapes |= {"1.weight": (llm, d), "1.bias": (llm,), "3.weight": (llm, llm), "3.bias": (llm,)}
    return shapes


def rename_reference_key(key: str) -> str | None:
    """The documented mapping from the reference layout to AnchorFormer's (None = dropped)."""
    if key == "0.latents":
        return None
    if key.startswith("0.layers."):
        _, _, i, block, rest = key.split(".", 4)
        return f"layers.{i}.{'attn' if block == '0' else 'ff'}.{rest}"
    if key.startswith("0.norm."):
        return key[2:]
    head, rest = key.split(".", 1)
    return f"projector.{ {'1': 0, '3': 2}[head] }.{rest}"


def test_state_dict_is_reference_layout_without_latents() -> None:
    model = AnchorFormer(device="meta")  # LLaVA-1.5 shapes, no memory
    ref = reference_layout(1024, 4096, 6, 8, 64, 4, 144)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {rename_reference_key(k): v for k, v in ref.items() if rename_reference_key(k) is not None}
    assert ours == mapped


def test_parameter_count_is_reference_minus_latents() -> None:
    d, llm, depth, inner, ff = 1024, 4096, 6, 512, 4
    per_layer = 2 * d + 2 * d + d * inner + d * 2 * inner + inner * d + 2 * d + d * ff * d + ff * d * d
    reference_total = depth * per_layer + 2 * d + 144 * d + (d * llm + llm) + (llm * llm + llm)
    model = AnchorFormer(device="meta")
    assert sum(p.numel() for p in model.parameters()) == reference_total - 144 * d
    assert sum(math.prod(s) for s in reference_layout(d, llm, depth, 8, 64, ff, 144).values()) == reference_total


def test_llava_mlp2x_gelu_weights_load_by_key() -> None:
    llava = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 24))  # LLaVA's builder for mlp2x_gelu
    model = small()
    model.projector.load_state_dict(llava.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(model.projector(x), llava(x))


def test_state_dict_round_trip_through_config() -> None:
    model = small(kv_include_queries=True)
    clone = AnchorFormer.from_config(AnchorFormerConfig.from_json(model.config.to_json()))
    clone.load_state_dict(model.state_dict())
    features, anchor_idx = torch.randn(2, 17, 16), random_anchors(2, 17, 5)
    torch.testing.assert_close(clone(features, anchor_idx), model(features, anchor_idx), atol=0, rtol=0)


def test_config_round_trips_and_tracks_runtime_switches() -> None:
    cfg = AnchorFormerConfig(vision_dim=16, llm_dim=24, num_anchors=5, depth=2, heads=2, dim_head=8)
    assert AnchorFormerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = AnchorFormer.from_config(cfg.to_dict())
    assert model.config == cfg
    model.fused_attn, model.gradient_checkpointing = False, True
    assert model.config == dataclasses.replace(cfg, fused_attn=False, gradient_checkpointing=True)
    assert all(not layer.attn.fused_attn for layer in model.layers)
    with pytest.raises(ValueError, match="unknown AnchorFormerConfig keys"):
        AnchorFormerConfig.from_dict({**cfg.to_dict(), "latents": 144})


def test_defaults_and_no_anchor_state() -> None:
    model = AnchorFormer(device="meta")
    assert model.num_output_tokens(577) == 145
    assert AnchorFormer(include_cls=False, device="meta").num_output_tokens(577) == 144
    assert "latents" not in dict(model.named_parameters())
    assert list(model.named_buffers()) == []
    assert model.uses_anchors
    # A forward leaves nothing behind on the module (anchors are arguments, not state).
    small_model = small()
    before = {name: dict(vars(m)) for name, m in small_model.named_modules()}
    small_model(torch.randn(1, 17, 16), random_anchors(1, 17, 5))
    assert {name: dict(vars(m)) for name, m in small_model.named_modules()} == before


@pytest.mark.parametrize("kv_include_queries", [False, True])
def test_analytic_flops_match_flop_counter_on_manual_path(kv_include_queries: bool) -> None:
    model = small(fused_attn=False, kv_include_queries=kv_include_queries)
    b, n = 3, 17
    features, anchor_idx = torch.randn(b, n, 16), random_anchors(b, n, 5)
    with FlopCounterMode(display=False) as counter:
        model(features, anchor_idx)
    assert counter.get_total_flops() == b * model.analytic_flops(n)


# --- bad input -----------------------------------------------------------------------------------------


X = torch.randn(2, 17, 16)
IDX = torch.zeros(2, 3, dtype=torch.long)
PADDED = torch.arange(17).expand(2, 17) < 10


@pytest.mark.parametrize(
    ("features", "anchor_idx", "kwargs", "match"),
    [
        (torch.randn(2, 17, 12), IDX, {}, r"vision_dim=16.*\(2, 17, 12\)"),
        (torch.randn(17, 16), IDX, {}, r"features must have shape \(B, N, vision_dim=16\).*\(17, 16\)"),
        (X, torch.zeros(2, 3, 1, dtype=torch.long), {}, r"anchor_idx must have shape \(B, K\).*\(2, 3, 1\)"),
        (X, torch.zeros(3, 3, dtype=torch.long), {}, r"anchor_idx must have shape \(B, K\) = \(2, K\).*\(3, 3\)"),
        (X, torch.full((2, 3), 17), {}, r"\[0, 17\).*got values in \[17, 17\]"),
        (X, torch.full((2, 3), -1), {}, r"\[0, 17\).*got values in \[-1, -1\]"),
        (X, torch.zeros(2, 3), {}, r"anchor_idx must be an integer tensor.*float32.*\(2, 3\)"),
        (
            X,
            IDX,
            {"key_padding_mask": torch.ones(2, 16, dtype=torch.bool)},
            r"key_padding_mask must have shape \(B, N\) = \(2, 17\).*got shape \(2, 16\)",
        ),
        (X, IDX, {"key_padding_mask": torch.ones(2, 17)}, r"key_padding_mask must be a bool tensor.*float32"),
        (X, torch.full((2, 3), 15), {"key_padding_mask": PADDED}, r"points at padded tokens"),
        (X, None, {}, r"exactly one of anchor_idx"),
        (X, IDX, {"attention": torch.rand(2, 17)}, r"exactly one of anchor_idx"),
        (X, None, {"attention": torch.rand(2, 4, 15)}, r"N=17 tokens.*\(2, 4, 15\)"),
    ],
)
def test_bad_input_raises_with_shapes(
    features: torch.Tensor, anchor_idx: torch.Tensor | None, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        small()(features, anchor_idx, **kwargs)


def test_attention_path_rejects_samples_with_too_few_real_tokens() -> None:
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, 4:] = False  # 3 real patch tokens < num_anchors=5
    with pytest.raises(
        ValueError,
        match=r"key_padding_mask leaves samples \[1\] with fewer real candidate tokens "
        r"\(\[3\]\) than num_anchors=5",
    ):
        small()(X, attention=torch.rand(2, 17), key_padding_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_real_token_at_the_lowest_finite_score_beats_padding(dtype: torch.dtype) -> None:
    """Padding is excluded from the search, not given a sentinel score: a real token whose score is the
    dtype's lowest finite value (what a padding sentinel would be) is still chosen over padded tokens."""
    model = small()  # num_anchors=5
    features = torch.randn(1, 17, 16)
    mask = torch.ones(1, 17, dtype=torch.bool)
    mask[0, 1:12] = False  # tokens 1..11 padded; real patches 12..16, exactly num_anchors of them
    scores = torch.rand(1, 17).to(dtype)
    scores[0, 12] = torch.finfo(dtype).min  # a real token at the sentinel value
    scores[0, 1:12] = torch.finfo(dtype).min  # padded tokens at the same value, lower indices
    out = model(features, attention=scores, key_padding_mask=mask)
    expected = torch.tensor([[0, 12, 13, 14, 15, 16]])  # [CLS] and every real patch
    torch.testing.assert_close(out, model(features, expected, key_padding_mask=mask), atol=0, rtol=0)


def test_index_checks_can_be_skipped_and_device_must_match() -> None:
    model = small(check_indices=False)
    out = model(X, torch.full((2, 3), 15), key_padding_mask=PADDED)  # anchors on padding: not checked
    assert out.shape == (2, 3, 24)
    meta = small(device="meta")
    with pytest.raises(ValueError, match=r"anchor_idx must be on the device of features \(meta\), got cpu"):
        meta(torch.empty(2, 17, 16, device="meta"), IDX)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="projector must be one of"):
        small(projector="mlp2x_relu")
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        small(depth=0)
    with pytest.raises(ValueError, match="include_cls"):
        small(num_prefix_tokens=0)
    with pytest.raises(ValueError, match=r"num_anchors=5 exceeds the 3 patch tokens"):
        small().num_output_tokens(4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_fused_matches_naive_reference() -> None:
    model = small().cuda()
    features, anchor_idx = torch.randn(3, 17, 16, device="cuda"), random_anchors(3, 17, 5).cuda()
    expected = naive_forward(model.double(), features.double(), anchor_idx, [17] * 3)
    out = model.to(torch.bfloat16)(features.bfloat16(), anchor_idx)
    torch.testing.assert_close(out.double(), expected, atol=0.1, rtol=0.05)
