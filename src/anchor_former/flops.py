"""Analytic FLOPs and KV-cache sizes for the pieces of a LLaVA-style pipeline.

The pipeline is ViT forward → (optional) [CLS]-attention probe and anchor search → connector → LLM
prefill over ``visual + text`` tokens. This module counts its cost from shapes alone, so a user can see
what a connector's token count buys at LLaMA-7B/13B scale without a GPU.

Counting convention (the same as :class:`torch.utils.flop_counter.FlopCounterMode`, which the tests
check these formulas against on real HF models):

* Only matrix products are counted; one multiply-add is **2 FLOPs**. A ``(M, K) @ (K, N)`` product costs
  ``2·M·K·N``. Bias adds, norms, softmax, activations, RoPE rotations, embedding lookups and the anchor
  search (a sort) are not counted: together they are well under 1% at the preset shapes.
* **Attention is dense:** the score and value products are counted over the full ``N × N`` square
  (``4·N²·H·d_head`` per layer), which is what eager attention and ``FlopCounterMode`` count and what
  non-causal kernels compute. Pass ``attention="causal"`` to count only the ``N·(N+1)/2`` query–key
  pairs a causal mask keeps (what a FlashAttention kernel with ``is_causal=True`` actually computes).
* **LLM head:** prefill for generation needs only the last token's logits, so the LM head is counted on
  the last token by default (``lm_head="last"``; HF ``logits_to_keep=1``). ``"all"`` counts every token
  (HF's default forward), ``"none"`` leaves it out.

Formulas, per sample, ``S`` tokens, width ``d``, ``L`` layers, ``H`` query heads, ``G`` key/value heads,
head width ``h``, MLP width ``f``, vocabulary ``V``:

* LLM decoder layer (LLaMA, SwiGLU MLP):
  ``2·S·d·(H·h + 2·G·h)`` (q, k, v) ``+ 2·S·H·h·d`` (o) ``+ 4·S²·H·h`` (scores, values; dense)
  ``+ 3·2·S·d·f`` (gate, up, down).
* LLM prefill: ``L ·`` layer ``+ 2·d·V`` per token that gets logits.
* KV cache: ``2 (K and V) · L · S · G · h · bytes_per_element`` bytes per sample.
* ViT (CLIP): patch embedding ``2·P·(C·p²)·D`` for ``P`` patches of ``p × p`` pixels with ``C``
  channels, then per layer on ``N`` tokens (patches + [CLS]) ``4·2·N·D²`` (q, k, v, o)
  ``+ 4·N²·D`` (scores, values) ``+ 2·2·N·D·F`` (fc1, fc2).
* [CLS]-row probe, as shipped (``W_k`` folded into the query): query projection of the [CLS] token
  ``2·D²``, the fold ``2·D²`` and one score per head and token ``2·H·N·D``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from anchor_former._validation import check_positive_int

__all__ = [
    "CLIP_VIT_L14_336",
    "LLAMA_13B",
    "LLAMA_7B",
    "LLMShape",
    "PipelineFlops",
    "ViTShape",
    "cls_probe_flops",
    "kv_cache_bytes",
    "llm_layer_flops",
    "llm_lm_head_flops",
    "llm_prefill_flops",
    "pipeline_flops",
    "vit_forward_flops",
    "vit_layer_flops",
    "vit_patch_embed_flops",
]

AttentionCount = Literal["dense", "causal"]
LMHeadCount = Literal["last", "all", "none"]
_ATTENTION = ("dense", "causal")
_LM_HEAD = ("last", "all", "none")


@dataclass(frozen=True)
class LLMShape:
    """Shapes of a LLaMA-style decoder (pre-norm, RoPE, SwiGLU MLP, untied LM head).

    ``head_dim=None`` means ``hidden_size // num_heads``. Round-trips through
    ``dataclasses.asdict`` / ``LLMShape(**d)``.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            check_positive_int(field, getattr(self, field))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        check_positive_int("head_dim", self.head_dim)

    @classmethod
    def from_hf_config(cls, config: Any, *, name: str | None = None) -> LLMShape:
        """Read the shapes of a HF ``LlamaConfig`` (or any config with the same attribute names)."""
        heads = config.num_attention_heads
        return cls(
            name=name or str(getattr(config, "model_type", "llm")),
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (``LLMShape(**shape.to_dict())`` rebuilds it)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ViTShape:
    """Shapes of a CLIP-style ViT: square patch grid, ``num_prefix_tokens`` ([CLS]) before the patches.

    Round-trips through ``dataclasses.asdict`` / ``ViTShape(**d)``.
    """

    name: str
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_channels: int = 3
    num_prefix_tokens: int = 1

    def __post_init__(self) -> None:
        for field in (
            "image_size",
            "patch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "num_channels",
        ):
            check_positive_int(field, getattr(self, field))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size must be a multiple of patch_size, got image_size={self.image_size}, "
                f"patch_size={self.patch_size}"
            )
        if (
            isinstance(self.num_prefix_tokens, bool)
            or not isinstance(self.num_prefix_tokens, int)
            or (self.num_prefix_tokens < 0)
        ):
            raise ValueError(f"num_prefix_tokens must be an integer >= 0, got {self.num_prefix_tokens!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side (24 for 336 px at patch 14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens (576 for CLIP ViT-L/14-336)."""
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """All tokens the encoder runs on: prefix + patches (577 for CLIP ViT-L/14-336)."""
        return self.num_patches + self.num_prefix_tokens

    @classmethod
    def from_hf_config(cls, config: Any, *, name: str | None = None) -> ViTShape:
        """Read the shapes of a HF ``CLIPVisionConfig`` (one [CLS] token)."""
        return cls(
            name=name or str(getattr(config, "model_type", "vit")),
            image_size=config.image_size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            num_channels=config.num_channels,
            num_prefix_tokens=1,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (``ViTShape(**shape.to_dict())`` rebuilds it)."""
        return dataclasses.asdict(self)


LLAMA_7B = LLMShape(
    name="llama-7b",
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)
"""LLaMA-7B / LLaMA-2-7B / Vicuna-7B v1.5 (LLaVA-1.5-7B's LLM)."""

LLAMA_13B = LLMShape(
    name="llama-13b",
    hidden_size=5120,
    num_layers=40,
    num_heads=40,
    num_kv_heads=40,
    intermediate_size=13824,
    vocab_size=32000,
)
"""LLaMA-13B / LLaMA-2-13B / Vicuna-13B v1.5 (LLaVA-1.5-13B's LLM)."""

CLIP_VIT_L14_336 = ViTShape(
    name="clip-vit-l14-336",
    image_size=336,
    patch_size=14,
    hidden_size=1024,
    num_layers=24,
    num_heads=16,
    intermediate_size=4096,
)
"""CLIP ViT-L/14 at 336 px (LLaVA-1.5's encoder): 1 [CLS] + 24×24 patches = 577 tokens."""


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an ``(m, k) @ (k, n)`` product."""
    return 2 * m * k * n


def _check_tokens(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _attention_pairs(num_tokens: int, attention: AttentionCount) -> int:
    """Query–key pairs a layer computes over ``num_tokens`` tokens."""
    _check_choice("attention", attention, _ATTENTION)
    return num_tokens * num_tokens if attention == "dense" else num_tokens * (num_tokens + 1) // 2


def llm_layer_flops(shape: LLMShape, num_tokens: int, *, batch: int = 1, attention: AttentionCount = "dense") -> int:
    """FLOPs of one decoder layer over a prefill of ``num_tokens`` tokens per sample.

    Args:
        shape: the decoder's shapes.
        num_tokens: ``S``, the tokens each sample holds (visual + text).
        batch: ``B``, samples.
        attention: ``"dense"`` counts all ``S²`` query–key pairs, ``"causal"`` the ``S(S+1)/2`` kept.

    Returns:
        ``B · [2·S·d·(H·h + 2·G·h) + 2·S·H·h·d + 4·pairs·H·h + 6·S·d·f]``.
    """
    s = _check_tokens("num_tokens", num_tokens)
    check_positive_int("batch", batch)
    d, h = shape.hidden_size, _head_dim(shape)
    q_dim, kv_dim = shape.num_heads * h, shape.num_kv_heads * h
    projections = _mm(s, d, q_dim + 2 * kv_dim) + _mm(s, q_dim, d)
    scores_values = 2 * _mm(1, h, 1) * _attention_pairs(s, attention) * shape.num_heads
    mlp = 3 * _mm(s, d, shape.intermediate_size)
    return batch * (projections + scores_values + mlp)


def llm_lm_head_flops(shape: LLMShape, num_tokens: int, *, batch: int = 1, lm_head: LMHeadCount = "last") -> int:
    """FLOPs of the LM head: ``2·d·V`` per token that gets logits (``"last"``: 1, ``"all"``: S, ``"none"``: 0)."""
    s = _check_tokens("num_tokens", num_tokens)
    check_positive_int("batch", batch)
    _check_choice("lm_head", lm_head, _LM_HEAD)
    tokens = {"last": min(s, 1), "all": s, "none": 0}[lm_head]
    return batch * _mm(tokens, shape.hidden_size, shape.vocab_size)


def llm_prefill_flops(
    shape: LLMShape,
    num_tokens: int,
    *,
    batch: int = 1,
    attention: AttentionCount = "dense",
    lm_head: LMHeadCount = "last",
) -> int:
    """FLOPs of an LLM prefill over ``num_tokens`` tokens per sample (all layers + LM head).

    Args:
        shape: the decoder's shapes, e.g. :data:`LLAMA_7B`.
        num_tokens: ``S = visual + text`` tokens per sample.
        batch: ``B``, samples.
        attention: ``"dense"`` (default) or ``"causal"``; see the module docstring.
        lm_head: ``"last"`` (default), ``"all"`` or ``"none"``; see the module docstring.
    """
    layers = shape.num_layers * llm_layer_flops(shape, num_tokens, batch=batch, attention=attention)
    return layers + llm_lm_head_flops(shape, num_tokens, batch=batch, lm_head=lm_head)


def kv_cache_bytes(shape: LLMShape, num_tokens: int, *, bytes_per_element: int = 2) -> int:
    """Bytes of the KV cache one sample holds after a prefill of ``num_tokens`` tokens.

    ``2 · L · S · G · h · bytes_per_element`` (keys and values of every layer; fp16/bf16 = 2 bytes). Every
    decoded token then attends over this cache, so fewer visual tokens also make decoding cheaper.
    """
    s = _check_tokens("num_tokens", num_tokens)
    check_positive_int("bytes_per_element", bytes_per_element)
    return 2 * shape.num_layers * s * shape.num_kv_heads * _head_dim(shape) * bytes_per_element


def _head_dim(shape: LLMShape) -> int:
    """``shape.head_dim``, which ``__post_init__`` fills in when it is given as None."""
    return shape.head_dim if shape.head_dim is not None else shape.hidden_size // shape.num_heads


def vit_patch_embed_flops(shape: ViTShape, *, batch: int = 1) -> int:
    """FLOPs of the patch-embedding convolution: ``B · 2·P·(C·p²)·D``."""
    check_positive_int("batch", batch)
    return batch * _mm(shape.num_patches, shape.num_channels * shape.patch_size**2, shape.hidden_size)


def vit_layer_flops(shape: ViTShape, *, batch: int = 1) -> int:
    """FLOPs of one encoder layer (dense attention over all ``N`` tokens): ``B · (8·N·D² + 4·N²·D + 4·N·D·F)``."""
    check_positive_int("batch", batch)
    n, d = shape.num_tokens, shape.hidden_size
    projections = 4 * _mm(n, d, d)
    scores_values = 2 * _mm(n, d, n)
    mlp = 2 * _mm(n, d, shape.intermediate_size)
    return batch * (projections + scores_values + mlp)


def vit_forward_flops(shape: ViTShape, *, batch: int = 1, num_layers: int | None = None) -> int:
    """FLOPs of a ViT forward: patch embedding + ``num_layers`` encoder layers (default: all).

    LLaVA reads the penultimate layer but HF's ``CLIPVisionModel`` runs every layer, so the default counts
    all of them; pass ``num_layers=shape.num_layers - 1`` for an encoder truncated after the selected layer.
    """
    layers = shape.num_layers if num_layers is None else num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= shape.num_layers:
        raise ValueError(f"num_layers must be an integer in [0, {shape.num_layers}], got {num_layers!r}")
    return vit_patch_embed_flops(shape, batch=batch) + layers * vit_layer_flops(shape, batch=batch)


def cls_probe_flops(shape: ViTShape, *, batch: int = 1) -> int:
    """FLOPs of the [CLS]-row probe on one layer, as :class:`anchor_former.probes.AttentionProbe` runs it.

    The probe reads the queries and keys the layer's own projections output (the model computes them
    anyway), so its only matmul is the [CLS] query against every key, per head: ``H · N · h = N · D``
    multiply-adds per sample, ``B · 2·N·D`` FLOPs (1.2 MFLOPs per image at CLIP ViT-L/14-336 shapes). The
    anchor search after it is a selection and counts 0.
    """
    check_positive_int("batch", batch)
    return batch * _mm(1, shape.hidden_size, shape.num_tokens)


@dataclass(frozen=True)
class PipelineFlops:
    """FLOPs of one pipeline configuration, by stage (all for the same batch)."""

    vit: int
    probe: int
    connector: int
    llm: int

    @property
    def total(self) -> int:
        """Sum of all stages."""
        return self.vit + self.probe + self.connector + self.llm

    def to_dict(self) -> dict[str, int]:
        """Every stage and the total."""
        return {**dataclasses.asdict(self), "total": self.total}


def pipeline_flops(
    *,
    vit: ViTShape,
    llm: LLMShape,
    visual_tokens: int,
    text_tokens: int,
    connector_flops: int,
    uses_anchors: bool = False,
    batch: int = 1,
    attention: AttentionCount = "dense",
    lm_head: LMHeadCount = "last",
) -> PipelineFlops:
    """FLOPs of ViT forward + (probe) + connector + LLM prefill over ``visual_tokens + text_tokens``.

    Args:
        vit: encoder shapes, e.g. :data:`CLIP_VIT_L14_336`.
        llm: decoder shapes, e.g. :data:`LLAMA_7B`.
        visual_tokens: tokens the connector hands the LLM per sample (576 for LLaVA-1.5, 145 for AcFormer-144).
        text_tokens: text tokens per sample in the prefill.
        connector_flops: the connector's FLOPs for the whole batch (e.g. ``batch * connector.analytic_flops(N)``).
        uses_anchors: add the [CLS]-row probe (:func:`cls_probe_flops`) for anchor-based connectors.
        batch: ``B``, samples.
        attention, lm_head: LLM counting conventions, see :func:`llm_prefill_flops`.
    """
    _check_tokens("visual_tokens", visual_tokens)
    _check_tokens("text_tokens", text_tokens)
    _check_tokens("connector_flops", connector_flops)
    return PipelineFlops(
        vit=vit_forward_flops(vit, batch=batch),
        probe=cls_probe_flops(vit, batch=batch) if uses_anchors else 0,
        connector=connector_flops,
        llm=llm_prefill_flops(llm, visual_tokens + text_tokens, batch=batch, attention=attention, lm_head=lm_head),
    )
