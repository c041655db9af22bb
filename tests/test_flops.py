"""Analytic FLOPs against FlopCounterMode on real HF models (tiny random ones, and full shapes on meta)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from anchor_former import flops  # noqa: E402
from anchor_former.flops import (  # noqa: E402
    CLIP_VIT_L14_336,
    LLAMA_7B,
    LLAMA_13B,
    LLMShape,
    ViTShape,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _tiny_llama(num_kv_heads: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        intermediate_size=96,
        vocab_size=128,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_clip() -> transformers.CLIPVisionModel:
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        attn_implementation="eager",
    )
    return transformers.CLIPVisionModel(config).eval()


def _count(fn) -> FlopCounterMode:
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        fn()
    return counter


def _module_total(counter: FlopCounterMode, name: str) -> int:
    return sum(counter.get_flop_counts()[name].values())


@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize(("lm_head", "logits_to_keep"), [("last", 1), ("all", 0)])
@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (2, 10), (3, 17)])
def test_llm_prefill_matches_flop_counter(num_kv_heads: int, lm_head: str, logits_to_keep: int, batch: int, seq: int):
    model = _tiny_llama(num_kv_heads)
    shape = LLMShape.from_hf_config(model.config)
    ids = torch.randint(0, 128, (batch, seq))
    counter = _count(lambda: model(input_ids=ids, logits_to_keep=logits_to_keep))

    assert _module_total(counter, "LlamaForCausalLM.model.layers.0") == flops.llm_layer_flops(shape, seq, batch=batch)
    assert _module_total(counter, "LlamaForCausalLM.lm_head") == flops.llm_lm_head_flops(
        shape, seq, batch=batch, lm_head=lm_head
    )
    assert counter.get_total_flops() == flops.llm_prefill_flops(shape, seq, batch=batch, lm_head=lm_head)


def test_llm_lm_head_none_leaves_out_head():
    model = _tiny_llama(4)
    shape = LLMShape.from_hf_config(model.config)
    ids = torch.randint(0, 128, (2, 9))
    counter = _count(lambda: model.model(input_ids=ids))  # the decoder without its head
    assert counter.get_total_flops() == flops.llm_prefill_flops(shape, 9, batch=2, lm_head="none")


def test_causal_attention_counts_kept_pairs():
    shape = LLMShape(
        name="t", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4, intermediate_size=96, vocab_size=10
    )
    seq = 13
    kept = int(torch.tril(torch.ones(seq, seq)).sum())  # query-key pairs a causal mask keeps
    dense = flops.llm_layer_flops(shape, seq, attention="dense")
    causal = flops.llm_layer_flops(shape, seq, attention="causal")
    per_pair = 2 * 2 * shape.num_heads * shape.head_dim  # scores + values, every head
    assert dense - causal == (seq * seq - kept) * per_pair


def test_kv_cache_bytes_matches_hf_cache():
    model = _tiny_llama(2).to(torch.bfloat16)
    shape = LLMShape.from_hf_config(model.config)
    out = model(input_ids=torch.randint(0, 128, (1, 11)), use_cache=True)
    cache = out.past_key_values
    actual = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert actual == flops.kv_cache_bytes(shape, 11, bytes_per_element=2)


@pytest.mark.parametrize("batch", [1, 2])
def test_vit_forward_matches_flop_counter(batch: int):
    model = _tiny_clip()
    shape = ViTShape.from_hf_config(model.config)
    pixels = torch.randn(batch, 3, 28, 28)
    counter = _count(lambda: model(pixel_values=pixels))
    assert _module_total(counter, "CLIPVisionModel.embeddings") == flops.vit_patch_embed_flops(shape, batch=batch)
    assert _module_total(counter, "CLIPVisionModel.encoder.layers.1") == flops.vit_layer_flops(shape, batch=batch)
    assert counter.get_total_flops() == flops.vit_forward_flops(shape, batch=batch)
    truncated = flops.vit_forward_flops(shape, batch=batch, num_layers=2)
    assert truncated == counter.get_total_flops() - _module_total(counter, "CLIPVisionModel.encoder.layers.2")


def test_cls_probe_formula_counts_the_shipped_probe():
    from anchor_former.probes import AttentionProbe

    model = _tiny_clip()
    shape = ViTShape.from_hf_config(model.config)
    pixels = torch.randn(2, 3, shape.image_size, shape.image_size)
    probe = AttentionProbe(model, layer=-2)

    def probed() -> torch.Tensor:
        with probe:
            model(pixel_values=pixels)
        return probe.scores

    plain = _count(lambda: model(pixel_values=pixels)).get_total_flops()
    extra = _count(probed).get_total_flops() - plain  # what the probe adds to the same forward
    assert extra == flops.cls_probe_flops(shape, batch=2)
    # The count bites: a probe that projected the keys again (N·D² per sample) would add far more.
    d, n = shape.hidden_size, shape.num_tokens
    assert extra != 2 * (2 * n * d * d + 2 * n * d)


def test_presets_match_full_size_hf_models_on_meta():
    """Full LLaMA-7B and CLIP ViT-L/14-336 shapes, counted on the meta device (no memory, no compute)."""
    llama = transformers.LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        attn_implementation="eager",
    )
    assert dataclasses.replace(LLMShape.from_hf_config(llama), name=LLAMA_7B.name) == LLAMA_7B
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama).eval()
    ids = torch.zeros(1, 640, dtype=torch.long, device="meta")
    counter = _count(lambda: model(input_ids=ids, logits_to_keep=1))
    assert counter.get_total_flops() == flops.llm_prefill_flops(LLAMA_7B, 640)
    # the decoder's parameter count, read back from the FLOPs of one token (2 FLOPs per weight)
    decoder_params = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and p.ndim == 2)
    per_token = LLAMA_7B.num_layers * (flops.llm_layer_flops(LLAMA_7B, 1) - 4 * LLAMA_7B.hidden_size)
    assert per_token == 2 * decoder_params

    clip = transformers.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        attn_implementation="eager",
    )
    assert dataclasses.replace(ViTShape.from_hf_config(clip), name=CLIP_VIT_L14_336.name) == CLIP_VIT_L14_336
    assert CLIP_VIT_L14_336.num_tokens == 577
    with torch.device("meta"):
        vit = transformers.CLIPVisionModel(clip).eval()
    pixels = torch.zeros(1, 3, 336, 336, device="meta")
    assert _count(lambda: vit(pixel_values=pixels)).get_total_flops() == flops.vit_forward_flops(CLIP_VIT_L14_336)


def test_llama_13b_preset_shapes():
    assert (LLAMA_13B.hidden_size, LLAMA_13B.num_layers, LLAMA_13B.num_heads, LLAMA_13B.head_dim) == (5120, 40, 40, 128)
    assert flops.kv_cache_bytes(LLAMA_13B, 1) == 2 * 40 * 5120 * 2  # 800 KiB per token in fp16


def test_shapes_round_trip_through_dict():
    for shape in (LLAMA_7B, LLAMA_13B):
        assert LLMShape(**shape.to_dict()) == shape
    assert ViTShape(**CLIP_VIT_L14_336.to_dict()) == CLIP_VIT_L14_336


@settings(max_examples=25, deadline=None)
@given(
    visual=st.integers(0, 1000),
    text=st.integers(0, 200),
    batch=st.integers(1, 8),
    connector=st.integers(0, 10**12),
    anchors=st.booleans(),
)
def test_pipeline_is_sum_of_stages_and_linear_in_batch(
    visual: int, text: int, batch: int, connector: int, anchors: bool
):
    total = flops.pipeline_flops(
        vit=CLIP_VIT_L14_336,
        llm=LLAMA_7B,
        visual_tokens=visual,
        text_tokens=text,
        connector_flops=connector,
        uses_anchors=anchors,
        batch=batch,
    )
    assert total.vit == flops.vit_forward_flops(CLIP_VIT_L14_336, batch=batch)
    assert total.probe == (flops.cls_probe_flops(CLIP_VIT_L14_336, batch=batch) if anchors else 0)
    assert total.llm == batch * flops.llm_prefill_flops(LLAMA_7B, visual + text)
    assert total.total == total.vit + total.probe + total.connector + total.llm == total.to_dict()["total"]
    assert flops.llm_prefill_flops(LLAMA_7B, visual + text + 1) > flops.llm_prefill_flops(LLAMA_7B, visual + text)


def test_fewer_visual_tokens_cut_llm_cost_by_about_two_thirds():
    """The paper's headline at LLaVA-1.5-7B shapes: 576 -> 145 visual tokens (64 text tokens)."""
    full = flops.llm_prefill_flops(LLAMA_7B, 576 + 64)
    anchors = flops.llm_prefill_flops(LLAMA_7B, 145 + 64)
    assert 0.30 < anchors / full < 0.35


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: flops.llm_prefill_flops(LLAMA_7B, -1), "num_tokens must be an integer >= 0, got -1"),
        (lambda: flops.llm_prefill_flops(LLAMA_7B, 10, batch=0), "batch must be an integer >= 1, got 0"),
        (
            lambda: flops.llm_prefill_flops(LLAMA_7B, 10, attention="flash"),
            "attention must be one of 'dense', 'causal'",
        ),
        (
            lambda: flops.llm_prefill_flops(LLAMA_7B, 10, lm_head="first"),
            "lm_head must be one of 'last', 'all', 'none'",
        ),
        (lambda: flops.kv_cache_bytes(LLAMA_7B, 10, bytes_per_element=0), "bytes_per_element must be"),
        (
            lambda: flops.vit_forward_flops(CLIP_VIT_L14_336, num_layers=25),
            r"num_layers must be an integer in \[0, 24\]",
        ),
        (lambda: dataclasses.replace(LLAMA_7B, num_kv_heads=5), "num_heads must be a multiple of num_kv_heads"),
        (lambda: dataclasses.replace(CLIP_VIT_L14_336, image_size=300), "image_size must be a multiple of patch_size"),
        (lambda: dataclasses.replace(CLIP_VIT_L14_336, num_prefix_tokens=-1), "num_prefix_tokens must be"),
    ],
)
def test_bad_input_raises(call, match: str):
    with pytest.raises(ValueError, match=match):
        call()
