"""The probe: one layer's features and anchor score, read beside the model's ordinary forward.

An :class:`AttentionProbe` attaches forward hooks to an unmodified vision encoder and removes them on exit:

* on the selected layer's attention *site* (:mod:`anchor_former.probes._spec`): a pre-hook that opens a
  record of the call, hooks on the modules whose OUTPUTS are that attention's queries and keys
  (``q_proj`` / ``k_proj``, a fused ``qkv``, the q/k norms after them); as soon as those have run (for a
  pooling ``nn.MultiheadAttention``: when it returns its probabilities) the score is computed from those
  outputs, with the attention's own rotary embedding and padding mask applied, in float32 and without
  autograd: the [CLS] query's probabilities over all keys
  per head (``B * H * N * E`` multiply-adds) or, for ``score="received"``, the attention each token
  receives averaged over all queries (:func:`~anchor_former.probes.received_attention`, in query
  blocks: nothing ``(N, N)`` is kept; one more ``B * H * N * N * E`` matmul). No weight tensor is read, so
  quantized, LoRA-wrapped and offloaded projections give the probe what they give the attention;
* on the selected layer itself, a hook that keeps its output: the features ``hidden_states[layer]`` as
  the model computed them (same tensor, autograd intact).

The model's own attention (SDPA, flash, eager) runs untouched, so its outputs are bit-identical with
and without the probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from anchor_former._validation import check_positive_int
from anchor_former.probes._scores import DEFAULT_BLOCK_SIZE, token_norm_scores
from anchor_former.probes._spec import AttentionSite, Call, EncoderSpec, SiteCall
from anchor_former.probes.registry import detect_encoder

__all__ = ["AttentionProbe", "ProbeCapture", "Score", "watch_site"]

Score = Literal["cls", "map", "norm", "received"]
_SCORES = ("cls", "map", "norm", "received")


def _in_backward() -> bool:
    # activation checkpointing re-runs block forwards inside backward; those reruns must not add captures
    return torch._C._current_graph_task_id() != -1


class _SiteWatch:
    """The hooks of one site: each finished call of its attention becomes a :class:`SiteCall` for ``on_call``."""

    def __init__(self, site: AttentionSite, on_call: Callable[[SiteCall], None]) -> None:
        self._site = site
        self._on_call = on_call
        self._call: SiteCall | None = None
        self._done = False  # the current call's score is computed

    def attach(self) -> list[RemovableHandle]:
        handles = [self._site.module.register_forward_pre_hook(self._before, with_kwargs=True)]
        try:
            for source in self._site.sources():
                handles.append(source.register_forward_hook(self._source_output))
            handles.append(self._site.module.register_forward_hook(self._after))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        self._call, self._done = None, False
        if _in_backward():
            return None
        rewritten = self._site.rewrite_call(args, kwargs)
        if rewritten is not None:
            args, kwargs = rewritten
        self._call = SiteCall(args, kwargs)
        return rewritten

    def _source_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call = self._call
        if call is None:  # called outside the attention (or in a backward rerun): not this site's projection
            return
        if id(module) in call.outputs:
            raise RuntimeError(
                f"{type(module).__name__} ran twice in one call of {type(self._site.module).__name__}; the probe "
                f"cannot tell which output is the attention's queries/keys"
            )
        call.outputs[id(module)] = self._site.capture(module, output)
        if not self._site.reads_output and not self._done and len(call.outputs) == len(self._site.sources()):
            # everything is here: score now, before the attention allocates the rest of its work (lower peak)
            self._done = True
            self._on_call(call)

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call, self._call = self._call, None
        if call is None or self._done:
            return
        call.output = output
        self._on_call(call)


def watch_site(site: AttentionSite, on_call: Callable[[SiteCall], None]) -> list[RemovableHandle]:
    """Hook ``site``: every finished call of its attention is passed to ``on_call`` as a :class:`SiteCall`.

    Returns the hook handles (remove them to stop). For tests and family authors: this is how
    :class:`AttentionProbe` reads a site.
    """
    return _SiteWatch(site, on_call).attach()


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
    without the probe. Works with and without autograd, in any dtype, under autocast, and with
    quantized (bitsandbytes), LoRA-wrapped (PEFT) or offloaded (accelerate) projections: the score is
    computed from the queries and keys the attention's modules output, never from weight tensors.

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
            [CLS], ``score="map"`` on one without a pooling head, unknown ``score``, ``block_size`` < 1,
            or an attention whose queries/keys the probe cannot read from module outputs (the message
            names it).
        RuntimeError: during the forward, when a hooked projection did not run inside its attention
            call (the attention computed it another way): no score rather than a wrong one.
    """

    def __init__(
        self, vision_model: nn.Module, *, layer: int = -2, score: Score = "cls", block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        check_positive_int("block_size", block_size)
        spec = detect_encoder(vision_model)
        block = spec.block_index(layer)
        site = _score_site(spec, block, score)
        if site is not None:
            site.validate()
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
                self._handles.extend(watch_site(self._site, partial(self._on_site_call, self._site)))
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

    def _on_site_call(self, site: AttentionSite, call: SiteCall) -> None:
        if self.score == "received":
            self._attention.append(site.received(call, block_size=self.block_size))
        else:
            self._attention.append(site.row(call))

    @property
    def captures(self) -> list[ProbeCapture]:
        """One :class:`ProbeCapture` per forward that ran while attached (e.g. one per image when a
        framework loops over a list of images)."""
        if self._site is not None and len(self._attention) != len(self._features):
            raise RuntimeError(
                f"the probe saw {len(self._features)} outputs of layer {self.layer} but {len(self._attention)} "
                f"attention calls; the forward did not complete"
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


def _score_site(spec: EncoderSpec, block: int, score: str) -> AttentionSite | None:
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
