"""The probe mechanism: one layer's anchor score, computed beside the model's ordinary forward.

A probe attaches two hooks to an unmodified vision encoder and removes them on exit:

* a forward pre-hook on the attention module of the selected layer. Its input is the layer's
  pre-attention-normed tokens ``x`` ``(B, N, D)``; from them the probe computes, in float32 and without
  autograd, the attention probabilities of ONE query over all N keys, per head:
  ``softmax_j(scale * q_h . k_h(x_j))`` with the module's own query/key projections and scale. The
  query is token 0 ([CLS]) or, for attention-pooling heads, the head's learned probe. The key
  projection is folded into the query (``q . (W_k x + b_k) = (W_k^T q) . x + const``, the constant drops
  out of the softmax), so the extra work is ``O(B * H * N * D)`` and nothing ``(N, N)`` is ever formed.
  For ``score="received"`` it computes every query and key of the layer instead and averages the
  attention each token receives over all queries (:func:`~anchor_former.probes.received_attention`, in
  query blocks: nothing ``(N, N)`` is kept either, but the work is one more ``O(B * N^2 * D)`` matmul);
* a forward hook on the selected layer itself, which keeps its output: the features
  ``hidden_states[layer]`` as the model computed them (same tensor, autograd intact).

The model's own attention (SDPA, flash, eager) runs untouched, so its outputs are bit-identical with
and without the probe.

Encoder families register an :class:`EncoderFamily`; :func:`detect_encoder` finds the family of a
model by type and describes its blocks in an :class:`EncoderSpec`.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from anchor_former._validation import check_positive_int
from anchor_former.probes.scores import DEFAULT_BLOCK_SIZE, received_attention, token_norm_scores

__all__ = [
    "AttentionProbe",
    "EncoderFamily",
    "EncoderSpec",
    "InputLayout",
    "ProbeCapture",
    "QueryKeySite",
    "Score",
    "cls_attention_probe",
    "detect_encoder",
    "hf_linear_site",
    "loaded_classes",
    "modules_of_type",
    "positional_or_keyword",
    "query_attention_row",
    "query_key_states",
    "register_encoder_family",
    "registered_families",
    "site_received_attention",
]

Score = Literal["cls", "map", "norm", "received"]
_SCORES = ("cls", "map", "norm", "received")

#: ``(args, kwargs)`` of one call of a hooked module
CallArgs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class QueryKeySite:
    """The query/key side of one attention module, as a probe reads it.

    Weights are read through ``projections`` at call time, so ``model.to(...)`` after describing the
    encoder is fine.

    Attributes:
        module: the module whose forward pre-hook sees the key tokens ``(B, N, D)`` (the attention
            module of a block, whose input is the pre-attention-normed tokens; or a pooling head).
        tokens: picks the ``(B, N, D)`` key tokens out of that module's ``(args, kwargs)``.
        projections: returns ``(W_q (H*E, Dq), b_q (H*E,) | None, W_k (H*E, D), b_k (H*E,) | None)``,
            E the head width, Dq the query input width.
        num_heads: H.
        head_dim: E.
        scale: the logit scale the module uses (usually ``E ** -0.5``).
        query: None = the query is token 0 of the key tokens ([CLS]); else returns the learned query
            input ``(Dq,)`` (the probe of an attention-pooling head).
        q_norm, k_norm: normalisations applied after the projections (timm ``qk_norm``), or None; they
            see ``(..., H, E)`` (per head) or, with ``norm_over_heads``, ``(..., H * E)`` (InternViT).
        norm_over_heads: ``q_norm`` / ``k_norm`` normalise all heads' features together.
        rotary: applies the module's positional rotation to ``(q, k)``, both ``(B, H, N, E)`` float32
            after the norms, given the module's call ``(args, kwargs)``; returns the rotated pair. None for
            modules without rotary embeddings.
        padding_mask: returns the ``(B, N)`` bool padding mask (True = padding token) of a call, or None
            when the call has none; None for modules that never get one.
    """

    module: nn.Module
    tokens: Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor]
    projections: Callable[[], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]]
    num_heads: int
    head_dim: int
    scale: float
    query: Callable[[], torch.Tensor] | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    norm_over_heads: bool = False
    rotary: Callable[[torch.Tensor, torch.Tensor, tuple[Any, ...], dict[str, Any]],
                     tuple[torch.Tensor, torch.Tensor]] | None = None
    padding_mask: Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor | None] | None = None


def positional_or_keyword(name: str) -> Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor]:
    """A ``QueryKeySite.tokens`` picker: the first positional argument, else keyword ``name``."""

    def pick(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0] if args else kwargs[name]

    return pick


def modules_of_type(model: nn.Module, classes: tuple[type, ...]) -> tuple[nn.Module, ...]:
    """All submodules of ``model`` that are instances of ``classes``, in registration (= layer) order."""
    return tuple(m for m in model.modules() if isinstance(m, classes))


def hf_linear_site(attn: nn.Module, q: nn.Linear, k: nn.Linear, *, num_heads: int, scale: float) -> QueryKeySite:
    """A site for an attention module with separate ``q`` / ``k`` linear projections that is called with
    its tokens as the first positional argument or as ``hidden_states=`` (transformers' convention)."""
    return QueryKeySite(
        module=attn,
        tokens=positional_or_keyword("hidden_states"),
        projections=lambda: (q.weight, q.bias, k.weight, k.bias),
        num_heads=num_heads,
        head_dim=q.out_features // num_heads,
        scale=float(scale),
    )


@dataclass(frozen=True)
class InputLayout:
    """Where the tokens of one batch of model inputs come from.

    Attributes:
        grid_sizes: ``(rows, cols)`` of each image's patch grid; patch token
            ``num_prefix_tokens + r * cols + c`` of image b (row-major, as the patches were laid out).
        padding: ``(B, N)`` bool, True marks a padding token (variable-resolution models), or None.
    """

    grid_sizes: tuple[tuple[int, int], ...]
    padding: torch.Tensor | None = None


@dataclass(frozen=True)
class EncoderSpec:
    """What a probe needs to know about one vision encoder.

    Attributes:
        family: the registered family name (``"clip"``, ``"dinov2"``, ``"timm_vit"``, ``"siglip"``).
        blocks: the transformer blocks in order; ``blocks[i]``'s output is ``hidden_states[i + 1]``
            (``hidden_states[0]`` is the embedding output).
        sites: the attention of each block, ``sites[i]`` for ``blocks[i]``.
        num_prefix_tokens: leading special tokens ([CLS] and registers) that are never anchors.
        has_cls: token 0 is a [CLS] token.
        patch_size: pixels per patch side; the patch grid is ``(H_img // patch_size, W_img // patch_size)``.
        num_channels: input channels the patch embedding expects.
        run: runs one ordinary forward of the model: ``run(pixel_values, **inputs)`` with ``pixel_values``
            ``(B, C, H_img, W_img)`` (or the model's own layout, see ``layout``) and any extra keyword
            inputs the model takes.
        pool_site: the attention of an attention-pooling (MAP) head over the final tokens, or None.
        grid: ``(H_img, W_img) -> (rows, cols)`` of the patch grid; None = ``(H_img // patch_size,
            W_img // patch_size)`` (timm's ``dynamic_img_pad`` rounds up instead).
        layout: validates ``(pixel_values, inputs)`` for models whose input is not a plain image batch
            (raising ``ValueError`` naming the argument) and returns their :class:`InputLayout`; None =
            ``pixel_values (B, num_channels, H_img, W_img)``, no extra inputs, grid ``(H_img // patch_size,
            W_img // patch_size)``.
    """

    family: str
    blocks: tuple[nn.Module, ...]
    sites: tuple[QueryKeySite, ...]
    num_prefix_tokens: int
    has_cls: bool
    patch_size: int
    num_channels: int
    run: Callable[..., Any]
    pool_site: QueryKeySite | None = None
    layout: Callable[[torch.Tensor, dict[str, Any]], InputLayout] | None = None
    grid: Callable[[int, int], tuple[int, int]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def block_index(self, layer: int) -> int:
        """Map a ``hidden_states`` index (LLaVA's ``mm_vision_select_layer``) to a block index.

        ``layer`` in ``1..L`` or ``-L..-1`` (L blocks): ``-2`` is the block whose output is
        ``hidden_states[-2]``, i.e. ``blocks[L - 2]``. ``0`` / ``-(L + 1)`` name the embedding output,
        which no attention produced, and are refused.
        """
        num = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be an int hidden_states index, got {layer!r}")
        index = layer if layer >= 0 else num + 1 + layer
        if not 1 <= index <= num:
            raise ValueError(
                f"layer must be in [1, {num}] or [-{num}, -1] for this {self.family} encoder with {num} layers "
                f"(a hidden_states index; hidden_states[0] is the embedding output, made by no attention "
                f"layer), got {layer}"
            )
        return index - 1


class EncoderFamily(ABC):
    """One supported encoder family. Subclass, then :func:`register_encoder_family` an instance."""

    #: short name, used in :attr:`EncoderSpec.family` and error messages
    name: str = ""
    #: the model classes it accepts, for error messages
    description: str = ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.description}>"

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (by type; must not import optional libraries)."""

    @abstractmethod
    def describe(self, model: nn.Module) -> EncoderSpec:
        """Describe a matching model; raise ``ValueError`` for an unsupported variant."""


_FAMILIES: list[EncoderFamily] = []


def register_encoder_family(family: EncoderFamily, *, replace: bool = False) -> EncoderFamily:
    """Add a family to the registry (looked up after the ones registered before it).

    Raises:
        ValueError: ``family`` is not an :class:`EncoderFamily` with a non-empty ``name``, or a family of
            that name is registered and ``replace`` is False. With ``replace=True`` the new family takes
            the old one's place in the lookup order.
    """
    if not isinstance(family, EncoderFamily) or not isinstance(family.name, str) or not family.name:
        raise ValueError(f"family must be an EncoderFamily with a non-empty name, got {family!r}")
    names = [f.name for f in _FAMILIES]
    if family.name in names:
        if not replace:
            raise ValueError(
                f"family name {family.name!r} is already registered "
                f"({type(_FAMILIES[names.index(family.name)]).__name__}); "
                f"pass replace=True to replace it, or pick another name; registered: {', '.join(names)}"
            )
        _FAMILIES[names.index(family.name)] = family
    else:
        _FAMILIES.append(family)
    return family


def registered_families() -> tuple[EncoderFamily, ...]:
    """The registered families, in lookup order (each prints as ``<name>: <description>``)."""
    return tuple(_FAMILIES)


def loaded_classes(module_name: str, names: Iterable[str]) -> tuple[type, ...]:
    """The classes ``names`` of ``module_name`` if that module is already imported, else ``()``.

    A model instance of a class implies its module is imported, so families can match by type without
    importing transformers or timm themselves.
    """
    module = sys.modules.get(module_name)
    if module is None:
        return ()
    return tuple(getattr(module, n) for n in names if isinstance(getattr(module, n, None), type))


def detect_encoder(vision_model: nn.Module) -> EncoderSpec:
    """Find the family of ``vision_model`` by type and describe it.

    Raises:
        ValueError: ``vision_model`` is not an ``nn.Module`` of a supported family; the message lists
            the supported families.
    """
    if isinstance(vision_model, nn.Module):
        for family in _FAMILIES:
            if family.matches(vision_model):
                return family.describe(vision_model)
    supported = "; ".join(f"{f.name} ({f.description})" for f in _FAMILIES)
    raise ValueError(
        f"vision_model of type {type(vision_model).__module__}.{type(vision_model).__qualname__} is not a "
        f"supported vision encoder; supported families: {supported}"
    )


def _normed(proj: torch.Tensor, norm: nn.Module | None, site: QueryKeySite, dtype: torch.dtype) -> torch.Tensor:
    """``proj (..., H * E)`` float32 -> ``(..., H, E)`` float32 after the site's norm (run in the model's dtype)."""
    lead = proj.shape[:-1]
    heads = proj.view(*lead, site.num_heads, site.head_dim)
    if norm is None:
        return heads
    if site.norm_over_heads:
        return norm(proj.to(dtype)).float().view(*lead, site.num_heads, site.head_dim)
    return norm(heads.to(dtype)).float()


def query_key_states(
    tokens: torch.Tensor, site: QueryKeySite, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query and key of the module, as its attention uses them, in float32 without autograd.

    Args:
        tokens: ``(B, N, D)`` the tokens as the module receives them (pre-attention-normed).
        site: the module's projections, norms and rotary embedding (``site.query`` must be None).
        args, kwargs: the module's call, for ``site.rotary`` (positions) — unused by sites without one.

    Returns:
        ``(q, k)``, both ``(B, H, N, E)`` float32, before the logit scale.
    """
    w_q, b_q, w_k, b_k = site.projections()
    batch, num, _ = tokens.shape
    with torch.no_grad(), torch.autocast(device_type=tokens.device.type, enabled=False):
        x = tokens.detach().float()  # (B, N, D)
        q = torch.nn.functional.linear(x, w_q.float(), None if b_q is None else b_q.float())  # (B, N, H*E)
        k = torch.nn.functional.linear(x, w_k.float(), None if b_k is None else b_k.float())
        q = _normed(q, site.q_norm, site, tokens.dtype).transpose(1, 2)  # (B, H, N, E)
        k = _normed(k, site.k_norm, site, tokens.dtype).transpose(1, 2)  # (B, H, N, E)
        if site.rotary is not None:
            q, k = site.rotary(q, k, args, kwargs or {})
            q, k = q.float(), k.float()
        return q, k


def _padding(site: QueryKeySite, args: tuple[Any, ...], kwargs: dict[str, Any] | None, batch: int, num: int):
    if site.padding_mask is None:
        return None
    mask = site.padding_mask(args, kwargs or {})
    return None if mask is None else mask.reshape(batch, num).bool()


def query_attention_row(
    tokens: torch.Tensor, site: QueryKeySite, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> torch.Tensor:
    """One query's attention probabilities over all tokens, per head, in float32, without autograd.

    Args:
        tokens: ``(B, N, D)`` the key tokens as the attention module receives them (pre-attention-normed).
        site: the module's projections; the query is token 0 unless ``site.query`` is set.
        args, kwargs: the module's call, read by ``site.rotary`` / ``site.padding_mask`` if the site has them.

    Returns:
        ``(B, H, N)`` float32, each ``(b, h)`` row a softmax over the N tokens (0 at padding tokens).
    """
    w_q, b_q, w_k, b_k = site.projections()
    heads, width = site.num_heads, site.head_dim
    batch, num, dim = tokens.shape
    padding = _padding(site, args, kwargs, batch, num)
    # the model may run under autocast; this must stay float32 whatever the caller's context
    with torch.no_grad(), torch.autocast(device_type=tokens.device.type, enabled=False):
        if site.query is None and site.rotary is not None:
            q, k = query_key_states(tokens, site, args=args, kwargs=kwargs)  # rotary keys: nothing to fold
            logits = torch.einsum("bhe,bhne->bhn", q[:, :, 0], k)  # (B, H, N)
        else:
            x = tokens.detach().float()  # (B, N, D)
            q_in = x[:, 0] if site.query is None else site.query().detach().float().expand(batch, -1)  # (B, Dq)
            q = torch.nn.functional.linear(q_in, w_q.float(), None if b_q is None else b_q.float())  # (B, H*E)
            q = _normed(q, site.q_norm, site, tokens.dtype)  # (B, H, E)
            if site.k_norm is None:
                # fold W_k into the query: q . (W_k x + b_k) = (W_k^T q) . x + q . b_k, and q . b_k is the
                # same for every token, so it cancels in the softmax
                u = torch.einsum("bhe,hed->bhd", q, w_k.float().view(heads, width, dim))  # (B, H, D)
                logits = torch.bmm(u, x.transpose(1, 2))  # (B, H, N)
            else:
                k = torch.nn.functional.linear(x, w_k.float(), None if b_k is None else b_k.float())
                k = _normed(k, site.k_norm, site, tokens.dtype)  # (B, N, H, E)
                logits = torch.einsum("bhe,bnhe->bhn", q, k)  # (B, H, N)
        logits = logits * site.scale
        if padding is None:
            return torch.softmax(logits, dim=-1)
        padding = padding.to(logits.device).unsqueeze(1)  # (B, 1, N)
        probs = torch.softmax(logits.masked_fill(padding & ~padding.all(-1, keepdim=True), float("-inf")), dim=-1)
        return probs.masked_fill(padding, 0.0)  # an image with only padding: all zeros


def site_received_attention(
    tokens: torch.Tensor,
    site: QueryKeySite,
    *,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """The attention each token receives in the module, averaged over all queries, per head.

    Args:
        tokens: ``(B, N, D)`` the tokens as the module receives them (pre-attention-normed).
        site: the module's projections, norms, rotary embedding and padding mask.
        args, kwargs: the module's call.
        block_size: query rows per step (:func:`~anchor_former.probes.received_attention`); None = default.

    Returns:
        ``(B, H, N)`` float32 (:func:`~anchor_former.probes.received_attention`).
    """
    q, k = query_key_states(tokens, site, args=args, kwargs=kwargs)
    batch, num = tokens.shape[:2]
    extra = {} if block_size is None else {"block_size": block_size}
    padding = _padding(site, args, kwargs, batch, num)  # (B, N) True = padding, or None
    real = None if padding is None else ~padding
    return received_attention(q, k, scale=site.scale, key_padding_mask=real, **extra)


@dataclass(frozen=True)
class ProbeCapture:
    """What one forward of the probed model left behind.

    Attributes:
        features: ``(B, N, D)`` the selected layer's output, ``hidden_states[layer]``, the model's own
            tensor (gradients flow if the forward recorded them).
        attention: ``(B, H, N)`` float32 per head, detached: the probabilities of the probed query over
            all tokens (the [CLS] token for ``score="cls"``, the pooling head's probe for ``"map"``), or
            the attention each token receives averaged over all queries (``"received"``); None for
            ``score="norm"``.
    """

    features: torch.Tensor
    attention: torch.Tensor | None


def _in_backward() -> bool:
    # activation checkpointing re-runs block forwards inside backward; those reruns must not add captures
    return torch._C._current_graph_task_id() != -1


class AttentionProbe:
    """Capture one layer's features and an anchor score during a vision encoder's ordinary forward.

    Use as a context manager around the code that runs the encoder (yours or a framework's)::

        with AttentionProbe(vision_model, layer=-2) as probe:
            out = vision_model(pixel_values, output_hidden_states=True)
        probe.features    # (B, N, D) == out.hidden_states[-2]
        probe.attention   # (B, H, N) float32 [CLS] row per head of that same layer
        anchor_search(probe.scores, K, num_prefix_tokens=probe.num_prefix_tokens)

    Hooks are attached on ``__enter__`` (or :meth:`attach`) and removed on ``__exit__`` (or
    :meth:`detach`), also when the forward raises. The encoder's outputs are bit-identical with and
    without the probe. Works with and without autograd, in any dtype and under autocast.

    Args:
        vision_model: a supported encoder (see :func:`detect_encoder`).
        layer: ``hidden_states`` index of the layer, like LLaVA's ``mm_vision_select_layer``; ``-2`` is
            the penultimate layer.
        score: ``"cls"`` the [CLS] token's attention row of ``layer`` (needs a [CLS] token);
            ``"map"`` the attention row of the model's attention-pooling head's probe query over the
            final tokens (SigLIP; independent of ``layer``); ``"received"`` the attention each token
            receives in ``layer``, averaged over all queries, per head (:func:`received_attention`; any
            encoder, padding tokens excluded; costs one more ``N x N`` matmul per image and head);
            ``"norm"`` per-token L2 norms of the ``layer`` features (:func:`token_norm_scores`; any encoder).
        block_size: for ``"received"``, query rows whose logits are held at once (memory vs. speed only;
            see :func:`received_attention`).

    Raises:
        ValueError: unsupported model, ``layer`` out of range, ``score="cls"`` on an encoder without
            [CLS], ``score="map"`` on one without a pooling head, unknown ``score``, ``block_size`` < 1.
    """

    def __init__(
        self, vision_model: nn.Module, *, layer: int = -2, score: Score = "cls", block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        check_positive_int("block_size", block_size)
        spec = detect_encoder(vision_model)
        block = spec.block_index(layer)
        site = _score_site(spec, block, score)
        self.encoder = spec
        self.layer = block + 1  # the positive hidden_states index
        self.score = score
        self.block_size = block_size
        self._block = spec.blocks[block]
        self._site = site
        self._handles: list[RemovableHandle] = []
        self._features: list[torch.Tensor] = []
        self._attention: list[torch.Tensor] = []

    @property
    def num_prefix_tokens(self) -> int:
        """Leading special tokens of the encoder ([CLS] and registers), never anchors."""
        return self.encoder.num_prefix_tokens

    @property
    def has_cls(self) -> bool:
        """Whether token 0 is a [CLS] token (then ``anchor_search(..., include_cls=True)`` is allowed)."""
        return self.encoder.has_cls

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> AttentionProbe:
        """Register the hooks and forget earlier captures. Raises ``RuntimeError`` if already attached."""
        if self._handles:
            raise RuntimeError("this AttentionProbe is already attached; detach it first")
        self._features.clear()
        self._attention.clear()
        try:
            self._handles.append(self._block.register_forward_hook(self._on_block_output))
            if self._site is not None:
                self._handles.append(
                    self._site.module.register_forward_pre_hook(self._on_site_input, with_kwargs=True)
                )
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove the hooks (idempotent). Captures stay readable."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> AttentionProbe:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    def _on_block_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if _in_backward():
            return
        # transformers 4.x blocks return a tuple (hidden_states, [attn_weights]); 5.x and timm a tensor
        self._features.append(output[0] if isinstance(output, (tuple, list)) else output)

    def _on_site_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _in_backward():
            return
        tokens = self._site.tokens(args, kwargs)
        if self.score == "received":
            self._attention.append(
                site_received_attention(tokens, self._site, args=args, kwargs=kwargs, block_size=self.block_size)
            )
        else:
            self._attention.append(query_attention_row(tokens, self._site, args=args, kwargs=kwargs))

    @property
    def captures(self) -> list[ProbeCapture]:
        """One :class:`ProbeCapture` per forward that ran while attached (e.g. one per image when a
        framework loops over a list of images)."""
        if self._site is not None and len(self._attention) != len(self._features):
            raise RuntimeError(
                f"the probe saw {len(self._features)} outputs of layer {self.layer} but {len(self._attention)} "
                f"attention inputs; the forward did not complete"
            )
        if self._site is None:
            return [ProbeCapture(f, None) for f in self._features]
        return [ProbeCapture(f, a) for f, a in zip(self._features, self._attention)]

    def _only(self) -> ProbeCapture:
        captures = self.captures
        if len(captures) != 1:
            what = "no forward ran" if not captures else f"the encoder ran {len(captures)} times"
            raise RuntimeError(
                f"probe.features / probe.attention need exactly one forward while attached, but {what}; "
                f"read probe.captures for several"
            )
        return captures[0]

    @property
    def features(self) -> torch.Tensor:
        """``(B, N, D)`` the selected layer's output (``hidden_states[layer]``) of the single forward."""
        return self._only().features

    @property
    def attention(self) -> torch.Tensor | None:
        """``(B, H, N)`` float32 attention score per head of the single forward; None for ``score="norm"``."""
        return self._only().attention

    @property
    def scores(self) -> torch.Tensor:
        """The anchor scores for ``anchor_search``: ``(B, H, N)`` attention, or ``(B, N)`` token norms."""
        capture = self._only()
        return capture.attention if capture.attention is not None else token_norm_scores(capture.features)


def _alternatives(spec: EncoderSpec, *exclude: str) -> str:
    offers = {
        "received": "score='received' (attention each token receives, any encoder)",
        "cls": "score='cls'" if spec.has_cls else "",
        "map": "score='map' (its attention-pooling head)" if spec.pool_site is not None else "",
        "norm": "score='norm' (token norms, any encoder)",
    }
    return " or ".join(v for k, v in offers.items() if v and k not in exclude)


def _score_site(spec: EncoderSpec, block: int, score: str) -> QueryKeySite | None:
    if score == "cls":
        if not spec.has_cls:
            raise ValueError(
                f"score='cls' needs a [CLS] token, but this {spec.family} encoder has none; use "
                + _alternatives(spec, "cls")
            )
        return spec.sites[block]
    if score == "map":
        if spec.pool_site is None:
            raise ValueError(
                f"score='map' needs an attention-pooling (MAP) head, but this {spec.family} encoder has none; "
                f"use " + _alternatives(spec, "map")
            )
        return spec.pool_site
    if score == "received":
        return spec.sites[block]
    if score == "norm":
        return None
    raise ValueError(f"score must be one of {', '.join(map(repr, _SCORES))}, got {score!r}")


def cls_attention_probe(vision_model: nn.Module, *, layer: int = -2, score: Score = "cls") -> AttentionProbe:
    """Build an :class:`AttentionProbe` to use in a ``with`` block (same arguments)."""
    return AttentionProbe(vision_model, layer=layer, score=score)
