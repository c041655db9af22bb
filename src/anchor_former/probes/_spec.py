"""What a probe knows about one vision encoder: its blocks, its input layout, and its attention *sites*.

A site describes one attention module by where its queries and keys appear while it runs, never by its
weight tensors: the probe's forward hooks read the OUTPUTS of the modules that produce them (``q_proj``
/ ``k_proj``, a fused ``qkv``, or the q/k norms that follow them) and the site applies what the attention
does after those modules (head split, rotary embedding, padding mask). A bitsandbytes-quantized,
LoRA-wrapped or accelerate-offloaded projection therefore gives the probe exactly what it gives the
attention. Three kinds:

* :class:`QueryKeySite`: queries and keys are outputs of submodules (every transformers and timm family);
* :class:`MultiheadWeightsSite`: a ``torch.nn.MultiheadAttention`` called with a separate query (a
  pooling head), which returns its own per-head probabilities;
* :class:`PackedProjectionSite`: a ``torch.nn.MultiheadAttention`` used as self-attention (open_clip),
  whose in-projection is a parameter read inside one fused call, with no module to hook.

These are the family extension API, re-exported by :mod:`anchor_former.probes.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn

from anchor_former.probes._scores import attention_row, received_attention

__all__ = [
    "AttentionSite",
    "EncoderSpec",
    "InputLayout",
    "MultiheadWeightsSite",
    "PackedProjectionSite",
    "Projection",
    "QueryKeySite",
    "SiteCall",
    "fused_heads",
    "head_major",
    "hf_linear_site",
    "split_heads",
    "submodule",
]

#: ``(args, kwargs)`` of one call of a module
Call = tuple[tuple[Any, ...], dict[str, Any]]
#: a rotary embedding: ``(q, k, args, kwargs) -> (q, k)``, both ``(B, H, N, E)``, given the attention's call
Rotary = Callable[[torch.Tensor, torch.Tensor, tuple[Any, ...], dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
#: reads the ``(B, N)`` bool padding mask (True = padding token) of an attention call, or None without one
PaddingMask = Callable[[tuple[Any, ...], dict[str, Any]], "torch.Tensor | None"]


@dataclass
class SiteCall:
    """One call of a site's attention module, as the probe's hooks saw it.

    Attributes:
        args, kwargs: the call's arguments (as the forward pre-hook saw them).
        outputs: ``id(module) -> AttentionSite.capture(module, output)`` of each hooked source module
            during this call.
        output: the attention module's own output (set when the call returns).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: dict[int, Any] = field(default_factory=dict)
    output: Any = None

    def output_of(self, module: nn.Module) -> Any:
        """What the site captured from ``module``'s output in this call; ``RuntimeError`` if it did not run."""
        if id(module) not in self.outputs:
            raise RuntimeError(
                f"the probe's hook on {type(module).__name__} did not fire during this attention call: the attention "
                f"computed its queries/keys without calling that module, so the probe cannot read them (no score "
                f"is better than a wrong one); use score='norm' for this encoder"
            )
        return self.outputs[id(module)]


def submodule(parent: nn.Module, name: str, *, owner: str = "vision_model") -> nn.Module:
    """``parent.<name>`` as an ``nn.Module`` whose output a hook can read; ``ValueError`` otherwise."""
    child = getattr(parent, name, None)
    if not isinstance(child, nn.Module):
        raise ValueError(
            f"{owner}'s {type(parent).__name__} has no submodule {name!r} (found {type(child).__name__}): the probe "
            f"reads the attention's queries and keys from the outputs of its projection modules, so it cannot probe "
            f"this attention; use score='norm' (token norms) for this encoder"
        )
    return child


def split_heads(num_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Head split of a projection output: ``(B, N, H * E)`` -> ``(B, H, N, E)``."""

    def heads(output: torch.Tensor) -> torch.Tensor:
        batch, num, width = output.shape
        return output.reshape(batch, num, num_heads, width // num_heads).transpose(1, 2)

    return heads


def fused_heads(part: int, num_heads: int, *, parts: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Part ``part`` (0 = q, 1 = k) of a fused projection output ``(B, N, parts * H * E)`` -> ``(B, H, N, E)``."""

    def heads(output: torch.Tensor) -> torch.Tensor:
        batch, num, width = output.shape
        split = output.reshape(batch, num, parts, num_heads, width // (parts * num_heads))  # (B, N, 3, H, E)
        return split[:, :, part].transpose(1, 2)

    return heads


def head_major(output: torch.Tensor) -> torch.Tensor:
    """An output already laid out ``(B, H, N, E)`` (timm's q/k norms)."""
    return output


@dataclass(frozen=True)
class Projection:
    """Where a site's queries or keys appear: the output of ``module``, laid out by ``heads``.

    Attributes:
        module: a submodule of the attention that is called once per attention call.
        heads: its output -> ``(B, H, N, E)`` (or ``(1, H, L, E)`` for a learned query shared by the batch),
            evaluated inside the hook while the attention runs (so a pooling head's learned query, a
            parameter, can be read there while an offloading hook has it on the execution device).
    """

    module: nn.Module
    heads: Callable[[Any], torch.Tensor] = head_major


class AttentionSite(ABC):
    """One attention module as a probe reads it. Subclasses are frozen dataclasses with a ``module`` field.

    The probe registers a forward pre-hook on ``module`` (which may rewrite the call, see
    :meth:`rewrite_call`), forward hooks on :meth:`sources`, and a forward hook on ``module`` that turns
    the finished :class:`SiteCall` into a score with :meth:`row` or :meth:`received` — or, for a site that
    does not read the attention's output (``reads_output = False``), does so as soon as every source has
    run (the attention's own buffers do not exist yet then, which keeps the peak memory down).
    """

    module: nn.Module
    #: whether :meth:`row` / :meth:`received` read :attr:`SiteCall.output` (the attention's return)
    reads_output: ClassVar[bool] = True

    def sources(self) -> tuple[nn.Module, ...]:
        """Submodules whose outputs :meth:`row` / :meth:`received` read (hooked for each call)."""
        return ()

    def validate(self) -> None:
        """Raise ``ValueError`` if the probe cannot read this site (called when a probe is built)."""
        inside = {id(m) for m in self.module.modules()}
        for source in self.sources():
            if id(source) not in inside:
                raise ValueError(
                    f"the probe reads {type(source).__name__} as a projection of {type(self.module).__name__}, but it "
                    f"is not a submodule of that attention, so its hook would not see the attention's calls"
                )

    def rewrite_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        """A replacement ``(args, kwargs)`` for the attention's call, or None to leave it as it is."""
        return None

    def capture(self, module: nn.Module, output: Any) -> Any:
        """What to keep of source ``module``'s ``output``, in its forward hook (inside the attention's call)."""
        return output

    @abstractmethod
    def row(self, call: SiteCall) -> torch.Tensor:
        """``(B, H, N)`` float32: the attention probabilities of query 0 ([CLS] or the learned probe)."""

    def received(self, call: SiteCall, *, block_size: int) -> torch.Tensor:
        """``(B, H, N)`` float32: the attention each token receives, averaged over all (real) queries."""
        raise ValueError(f"{type(self).__name__} gives only one query's row, not score='received'")


def _real(mask: PaddingMask | None, call: SiteCall, batch: int, num: int) -> torch.Tensor | None:
    """``(B, N)`` bool, True = real token, from a site's padding reader; None without padding."""
    if mask is None:
        return None
    padding = mask(call.args, call.kwargs)
    return None if padding is None else ~padding.reshape(batch, num).bool()


@dataclass(frozen=True)
class QueryKeySite(AttentionSite):
    """An attention whose queries and keys are outputs of submodules.

    Attributes:
        module: the attention module (its call's arguments feed ``rotary`` / ``padding_mask``).
        query, key: where the queries and keys appear (may name the same fused module).
        scale: the logit scale the attention uses (usually ``E ** -0.5``).
        rotary: the rotation the attention applies to ``(q, k)`` after the projections (the module's own
            function, given its call), or None.
        padding_mask: reads the call's ``(B, N)`` padding (True = padding), or None for no padding.
    """

    module: nn.Module
    query: Projection
    key: Projection
    scale: float
    rotary: Rotary | None = None
    padding_mask: PaddingMask | None = None
    reads_output: ClassVar[bool] = False

    def sources(self) -> tuple[nn.Module, ...]:
        if self.query.module is self.key.module:
            return (self.query.module,)
        return (self.query.module, self.key.module)

    def capture(self, module: nn.Module, output: Any) -> dict[str, torch.Tensor]:
        roles = (("query", self.query), ("key", self.key))
        return {role: p.heads(output) for role, p in roles if p.module is module}

    def states(self, call: SiteCall) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, k)`` as the attention uses them: ``(B, H, Nq, E)`` and ``(B, H, N, E)``, the model's dtype."""
        q = call.output_of(self.query.module)["query"]
        k = call.output_of(self.key.module)["key"]
        if q.ndim != 4 or k.ndim != 4 or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
            raise RuntimeError(
                f"{type(self.module).__name__}: the hooked queries {tuple(q.shape)} and keys {tuple(k.shape)} are "
                f"not (B, H, N, E) with the same heads and width"
            )
        if q.shape[0] == 1 and k.shape[0] > 1:  # a learned query shared by the batch
            q = q.expand(k.shape[0], -1, -1, -1)
        q, k = q.detach(), k.detach()  # the score never has a graph; the model's own tensors keep theirs
        if self.rotary is not None:
            with torch.no_grad():
                q, k = self.rotary(q, k, call.args, call.kwargs)
        return q, k

    def row(self, call: SiteCall) -> torch.Tensor:
        q, k = self.states(call)
        real = _real(self.padding_mask, call, k.shape[0], k.shape[2])
        return attention_row(q[:, :, 0], k, scale=self.scale, key_padding_mask=real)

    def received(self, call: SiteCall, *, block_size: int) -> torch.Tensor:
        q, k = self.states(call)
        real = _real(self.padding_mask, call, k.shape[0], k.shape[2])
        return received_attention(q, k, scale=self.scale, key_padding_mask=real, block_size=block_size)


def hf_linear_site(
    attn: nn.Module, *, query: str = "q_proj", key: str = "k_proj", num_heads: int, scale: float
) -> QueryKeySite:
    """A site for an attention with separate query/key projection modules whose ``(B, N, H * E)`` outputs
    are split into heads as they are (transformers' ``q_proj`` / ``k_proj``)."""
    return QueryKeySite(
        module=attn,
        query=Projection(submodule(attn, query), split_heads(num_heads)),
        key=Projection(submodule(attn, key), split_heads(num_heads)),
        scale=float(scale),
    )


def _mha_arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int, default: Any) -> Any:
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else default


@dataclass(frozen=True)
class MultiheadWeightsSite(AttentionSite):
    """A ``torch.nn.MultiheadAttention`` that pools with a separate query (SigLIP's pooling head).

    Called with ``query`` other than ``key`` and ``need_weights=True`` (its default), PyTorch computes the
    probabilities explicitly and returns them; the probe only asks for them per head
    (``average_attn_weights=False``), which changes nothing else, and reads row 0.

    Padding is read from the call's ``key_padding_mask`` (True = padding): those keys get 0.

    Attributes:
        module: the ``nn.MultiheadAttention``.
    """

    module: nn.Module

    def validate(self) -> None:
        if not isinstance(self.module, nn.MultiheadAttention):
            raise ValueError(
                f"the pooling head's attention must be a torch.nn.MultiheadAttention for score='map', got "
                f"{type(self.module).__name__}"
            )

    def rewrite_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        query, key = _mha_arg(args, kwargs, "query", 0, None), _mha_arg(args, kwargs, "key", 1, None)
        if query is key or not _mha_arg(args, kwargs, "need_weights", 4, True):
            # then PyTorch may take another kernel when asked for weights: the output would change
            raise RuntimeError(
                "score='map' reads the probabilities a pooling nn.MultiheadAttention returns, but this call is a "
                "self-attention (query is key) or has need_weights=False"
            )
        if len(args) > 6:  # average_attn_weights given positionally
            return (*args[:6], False, *args[7:]), kwargs
        return args, {**kwargs, "average_attn_weights": False}

    def row(self, call: SiteCall) -> torch.Tensor:
        weights: torch.Tensor = call.output[1]  # (B, H, L, N), L learned queries
        with torch.no_grad():
            probs = weights[:, :, 0].detach().float()  # (B, H, N)
            padding = _mha_arg(call.args, call.kwargs, "key_padding_mask", 3, None)
            if padding is None:
                return probs
            # key_padding_mask: True = padding; an image with only padding gets NaN there: zeros instead
            return probs.masked_fill(padding.bool().to(probs.device).unsqueeze(1), 0.0)


@dataclass(frozen=True)
class PackedProjectionSite(AttentionSite):
    """A batch-first ``torch.nn.MultiheadAttention`` used as self-attention (open_clip's blocks).

    Its in-projection is the parameter ``in_proj_weight``, applied inside one fused call (PyTorch's
    ``_native_multi_head_attention`` or ``F.multi_head_attention_forward``): no module produces q or k, so
    this is the one site that reads a parameter, the same one the module reads in the same call. The
    probe refuses (``ValueError`` when built) a module whose in-projection is not a plain, materialised
    floating parameter: offloaded (``meta``), quantized or otherwise wrapped; PEFT replaces the whole
    module, which the family refuses by type.

    Attributes:
        module: the ``nn.MultiheadAttention``; its call's first argument is the ``(B, N, D)`` tokens.
    """

    module: nn.Module

    def validate(self) -> None:
        mha = self.module
        weight = getattr(mha, "in_proj_weight", None)
        bias = getattr(mha, "in_proj_bias", None)
        if (
            type(mha) is not nn.MultiheadAttention
            or type(weight) is not nn.Parameter
            or not weight.is_floating_point()
            or weight.device.type == "meta"
            or (bias is not None and (type(bias) is not nn.Parameter or bias.device.type == "meta"))
        ):
            raise ValueError(
                f"this attention ({type(mha).__name__}) keeps its query/key projection in a parameter "
                f"(in_proj_weight: {type(weight).__name__}, "
                f"{getattr(weight, 'dtype', None)} on {getattr(weight, 'device', None)}) that no module outputs; the "
                f"probe reads it only as a plain floating parameter on a real device of a plain "
                f"torch.nn.MultiheadAttention, not offloaded (accelerate), quantized or wrapped; use score='norm'"
            )

    def _states(self, call: SiteCall) -> tuple[torch.Tensor, torch.Tensor]:
        mha = cast(nn.MultiheadAttention, self.module)  # validate() refused anything else
        x = call.args[0] if call.args else call.kwargs["query"]  # (B, N, D)
        dim, heads = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        with torch.no_grad():
            qk = torch.nn.functional.linear(x.detach(), w[: 2 * dim], None if b is None else b[: 2 * dim])
        return fused_heads(0, heads, parts=2)(qk), fused_heads(1, heads, parts=2)(qk)  # (B, H, N, E) each

    def row(self, call: SiteCall) -> torch.Tensor:
        q, k = self._states(call)
        return attention_row(q[:, :, 0], k, scale=q.shape[-1] ** -0.5)

    def received(self, call: SiteCall, *, block_size: int) -> torch.Tensor:
        q, k = self._states(call)
        return received_attention(q, k, scale=q.shape[-1] ** -0.5, block_size=block_size)


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
    sites: tuple[AttentionSite, ...]
    num_prefix_tokens: int
    has_cls: bool
    patch_size: int
    num_channels: int
    run: Callable[..., Any]
    pool_site: AttentionSite | None = None
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
