"""AnchorFormer: visual anchors as the queries of a cross-attention resampler, then LLaVA's projector.

The architecture of the reference (the authors' published patch to LLaVA-1.5), at the defaults:

* queries = the features at the anchor indices (``[CLS] + K anchors``, in ``anchor_idx`` order);
  keys/values = ALL tokens of the same features, [CLS] included; queries are not concatenated into the
  keys/values (``kv_include_queries=False``);
* ``depth`` layers of ``q = q + Attn(LN_q(q), LN_kv(x))``, ``q = q + FF(q)``
  (:class:`~anchor_former._layers.ResamplerLayer`), a final LayerNorm, then LLaVA's projector
  (``mlp2x_gelu``: ``Linear(vision_dim, llm_dim), GELU, Linear(llm_dim, llm_dim)``).

What it does not copy from the reference: anchors arrive as an argument (never a module attribute set
before the call), there is no unused ``latents`` parameter (DDP with ``find_unused_parameters=False``
works), padded batches are supported through ``key_padding_mask``.

State-dict layout (``depth`` layers, ``i`` in ``0..depth-1``)::

    layers.{i}.attn.norm_media.{weight,bias}     LayerNorm(vision_dim) on the keys/values
    layers.{i}.attn.norm_latents.{weight,bias}   LayerNorm(vision_dim) on the queries
    layers.{i}.attn.to_q.weight                  (heads*dim_head, vision_dim)
    layers.{i}.attn.to_kv.weight                 (2*heads*dim_head, vision_dim), k rows then v rows
    layers.{i}.attn.to_out.weight                (vision_dim, heads*dim_head)
    layers.{i}.ff.0.{weight,bias}                LayerNorm(vision_dim)
    layers.{i}.ff.1.weight                       (ff_mult*vision_dim, vision_dim)
    layers.{i}.ff.3.weight                       (vision_dim, ff_mult*vision_dim)
    norm.{weight,bias}                           final LayerNorm(vision_dim)
    projector.0.{weight,bias}, projector.2.*     LLaVA mlp2x_gelu (LLaVA-1.5 mm_projector.0/.2 load by key)

From the reference's ``mm_projector.*`` keys (:func:`reference_acformer_to_anchor_former`, used by
:meth:`AnchorFormer.convert_checkpoint`): ``0.layers.{i}.0.X -> layers.{i}.attn.X``,
``0.layers.{i}.1.j -> layers.{i}.ff.j``, ``0.norm -> norm``, ``1.* -> projector.0.*``,
``3.* -> projector.2.*``, and ``0.latents`` is dropped.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from anchor_former._state_keys import CheckpointError, Layout, StateDict, is_mlp_key, strip_projector_prefix
from anchor_former._validation import check_floating, check_integer, check_ndim, shape_str
from anchor_former.connectors._base import ConnectorConfig
from anchor_former.connectors._resampler import ResamplerConnector
from anchor_former.search import AnchorSearch, cls_scores

__all__ = [
    "REFERENCE_NUM_ANCHORS",
    "AnchorFormer",
    "AnchorFormerConfig",
    "is_reference_acformer",
    "reference_acformer_to_anchor_former",
]

# Anchors the authors' published code selects (a constant in its CLIP encoder); their checkpoints saw 257 queries.
REFERENCE_NUM_ANCHORS = 256

_REF_LAYER = re.compile(r"^0\.layers\.(\d+)\.([01])\.(.+)$")
_REF_ATTN = {
    "norm_media.weight",
    "norm_media.bias",
    "norm_latents.weight",
    "norm_latents.bias",
    "to_q.weight",
    "to_kv.weight",
    "to_out.weight",
}
_REF_FF = {"0.weight", "0.bias", "1.weight", "3.weight"}


def is_reference_acformer(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a projector state dict is the reference AcFormer patch's (after the ``mm_projector.`` prefix)."""
    keys = strip_projector_prefix(state_dict)
    return any(_REF_LAYER.match(k) for k in keys) or "0.latents" in keys


def reference_acformer_to_anchor_former(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The reference AcFormer patch's ``mm_projector`` → an :class:`AnchorFormer` state dict.

    ``0.layers.{i}.0.X → layers.{i}.attn.X``, ``0.layers.{i}.1.j.* → layers.{i}.ff.j.*``,
    ``0.norm.* → norm.*``, ``1.* → projector.0.*``, ``3.* → projector.2.*``; the unused ``0.latents`` is
    dropped. Any other key raises :class:`~anchor_former.checkpoint.CheckpointError` naming it.
    """
    out: StateDict = {}
    unexpected: list[str] = []
    for key, value in strip_projector_prefix(state_dict).items():
        layer = _REF_LAYER.match(key)
        if key == "0.latents":
            continue  # never used by the reference's forward
        if layer and layer.group(2) == "0" and layer.group(3) in _REF_ATTN:
            out[f"layers.{layer.group(1)}.attn.{layer.group(3)}"] = value
        elif layer and layer.group(2) == "1" and layer.group(3) in _REF_FF:
            out[f"layers.{layer.group(1)}.ff.{layer.group(3)}"] = value
        elif key in ("0.norm.weight", "0.norm.bias"):
            out[key[2:]] = value
        elif is_mlp_key(key) and key.split(".")[0] in ("1", "3"):
            index, kind = key.split(".")
            out[f"projector.{0 if index == '1' else 2}.{kind}"] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"unexpected keys in a reference AcFormer checkpoint: {sorted(unexpected)[:8]}"
            + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
            + " (expected mm_projector.0.layers.{i}.{0,1}.*, 0.norm.*, 0.latents, 1.*, 3.*)"
        )
    return out


@dataclass(frozen=True)
class AnchorFormerConfig(ConnectorConfig):
    """Configuration of :class:`AnchorFormer`; round-trips through :meth:`to_dict` / :meth:`from_dict`.

    Fields: see :class:`AnchorFormer`.
    """

    vision_dim: int = 1024
    llm_dim: int = 4096
    num_anchors: int = 144
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    projector: str = "mlp2x_gelu"
    num_prefix_tokens: int = 1
    include_cls: bool = True
    kv_include_queries: bool = False
    fused_attn: bool = True
    gradient_checkpointing: bool = False
    check_indices: bool = True


class AnchorFormer(ResamplerConnector):
    """The AcFormer connector: anchor tokens attend over all tokens, then LLaVA's projector.

    Args:
        vision_dim: D, width of the ViT features (1024 for CLIP ViT-L/14).
        llm_dim: width of the LLM tokens (4096 for LLaMA/Vicuna-7B).
        num_anchors: K anchors the built-in search picks when ``forward`` gets ``attention``; with
            ``include_cls`` the module outputs ``K + 1`` tokens. Explicit ``anchor_idx`` may have any length.
        depth: number of :class:`~anchor_former._layers.ResamplerLayer` s.
        heads, dim_head: attention heads H and per-head width d (inner width ``H * d``).
        ff_mult: feed-forward hidden width is ``ff_mult * D``.
        projector: LLaVA projector name (``"mlp2x_gelu"``, ``"linear"``, ``"mlp{N}x_gelu"``, ``"identity"``).
        num_prefix_tokens: leading special tokens of ``features`` (1 = [CLS]; 1 + registers; 0 = no [CLS]);
            they are never anchors but are keys/values.
        include_cls: the built-in search puts token 0 first among the queries (needs a [CLS]).
        kv_include_queries: keys/values are ``cat(all tokens, queries)`` per layer (Flamingo); off in the
            reference.
        fused_attn: SDPA (True) or the explicit attention path (False; the test and FLOP-count reference).
        gradient_checkpointing: recompute each layer's activations in the backward pass.
        check_indices: check that ``anchor_idx`` is in range and points at real (unpadded) tokens. This
            reads one flag back to the host (a sync on CUDA); skipped while ``torch.compile`` traces.
        device, dtype: where and how the parameters are created.

    Shapes:
        ``forward(features (B, N, D), anchor_idx (B, K))`` → ``(B, K, llm_dim)``, in ``anchor_idx`` order.
    """

    uses_anchors = True
    config_class = AnchorFormerConfig
    _config: AnchorFormerConfig

    def __init__(
        self,
        vision_dim: int = 1024,
        llm_dim: int = 4096,
        *,
        num_anchors: int = 144,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        projector: str = "mlp2x_gelu",
        num_prefix_tokens: int = 1,
        include_cls: bool = True,
        kv_include_queries: bool = False,
        fused_attn: bool = True,
        gradient_checkpointing: bool = False,
        check_indices: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_widths(vision_dim, llm_dim, num_prefix_tokens)
        self._build_resampler(
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            ff_mult=ff_mult,
            projector=projector,
            kv_include_queries=kv_include_queries,
            fused_attn=fused_attn,
            gradient_checkpointing=gradient_checkpointing,
            device=device,
            dtype=dtype,
        )
        # The search validates num_anchors and include_cls.
        self.search = AnchorSearch(num_anchors, include_cls=include_cls, num_prefix_tokens=num_prefix_tokens)
        self.check_indices = check_indices
        self._config = AnchorFormerConfig(
            vision_dim=vision_dim,
            llm_dim=llm_dim,
            num_anchors=num_anchors,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            ff_mult=ff_mult,
            projector=projector,
            num_prefix_tokens=num_prefix_tokens,
            include_cls=include_cls,
            kv_include_queries=kv_include_queries,
        )

    @property
    def config(self) -> AnchorFormerConfig:
        """The current configuration, runtime switches included."""
        return dataclasses.replace(
            self._config,
            fused_attn=self.fused_attn,
            gradient_checkpointing=self.gradient_checkpointing,
            check_indices=self.check_indices,
        )

    def convert_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, Layout]:
        """Also reads the reference AcFormer patch's ``mm_projector`` (layout ``"reference_acformer"``,
        :func:`reference_acformer_to_anchor_former`); warns when this connector's ``num_anchors`` differs from
        the :data:`REFERENCE_NUM_ANCHORS` its checkpoints were trained with. Otherwise as
        :meth:`Connector.convert_checkpoint <anchor_former.connectors.Connector.convert_checkpoint>`."""
        if not is_reference_acformer(state_dict):
            return super().convert_checkpoint(state_dict)
        if self.search.num_anchors != REFERENCE_NUM_ANCHORS:
            warnings.warn(
                f"the authors' AcFormer code trains with {REFERENCE_NUM_ANCHORS} anchors (num_count = 256 in its CLIP "
                f"encoder; its num_latents=144 is unused), but this connector has num_anchors="
                f"{self.search.num_anchors}: the weights load, but the model differs from the one trained; "
                f"build it with num_anchors={REFERENCE_NUM_ANCHORS} to reproduce it",
                UserWarning,
                stacklevel=3,
            )
        return reference_acformer_to_anchor_former(state_dict), "reference_acformer"

    @property
    def num_queries(self) -> int:
        """Queries the built-in search yields: ``num_anchors + include_cls``."""
        return self.search.num_queries

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """``num_anchors + include_cls`` (145 at the defaults), independent of N."""
        patches = self._num_patches(num_input_tokens)
        if self.search.num_anchors > patches:
            raise ValueError(
                f"num_anchors={self.search.num_anchors} exceeds the {patches} patch tokens of N={num_input_tokens}"
            )
        return self.num_queries

    def analytic_flops(self, num_input_tokens: int) -> int:
        """Forward FLOPs per sample with ``num_queries`` queries over N tokens (layers + projector)."""
        return self._resampler_flops(self.num_output_tokens(num_input_tokens), num_input_tokens)

    def _check_anchor_idx(self, anchor_idx: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None) -> None:
        b, n = features.shape[:2]
        expected = f"(B, K) = ({b}, K) token indices in [0, {n}) for features of shape {shape_str(features)}"
        check_ndim("anchor_idx", anchor_idx, (2,), expected)
        check_integer("anchor_idx", anchor_idx)
        if anchor_idx.shape[0] != b or anchor_idx.shape[1] < 1:
            raise ValueError(f"anchor_idx must have shape {expected}, got shape {shape_str(anchor_idx)}")
        if anchor_idx.device != features.device:
            raise ValueError(
                f"anchor_idx must be on the device of features ({features.device}), got {anchor_idx.device}"
            )
        if not self.check_indices or torch.compiler.is_compiling():
            return
        idx = anchor_idx.long()
        ok = ((idx >= 0) & (idx < n)).all()
        if mask is not None:
            ok = ok & mask.gather(1, idx.clamp(0, n - 1)).all()
        if bool(ok):  # the only host read on the happy path
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(
                f"anchor_idx must hold token indices in [0, {n}) for features of shape {shape_str(features)}, "
                f"got values in [{lo}, {hi}] (anchor_idx shape {shape_str(anchor_idx)})"
            )
        raise ValueError(
            f"anchor_idx of shape {shape_str(anchor_idx)} points at padded tokens (key_padding_mask False); "
            "anchors must be real tokens"
        )

    def forward(
        self,
        features: torch.Tensor,
        anchor_idx: torch.Tensor | None = None,
        *,
        attention: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Aggregate the image into one LLM token per anchor.

        Args:
            features: ``(B, N, D)``, the selected ViT layer's tokens, prefix tokens ([CLS]) included.
                All N tokens are keys/values.
            anchor_idx: ``(B, K)`` integer token indices, the queries, as :func:`~anchor_former.anchor_search`
                returns them (``[0, sorted anchors]``); any order and any K >= 1 work.
            attention: instead of ``anchor_idx``, the ViT's attention in any layout
                :func:`~anchor_former.anchor_search` accepts (``(B, H, N, N)``, ``(B, H, N)``, ``(B, N)``);
                the module's own search picks ``num_anchors`` anchors (plus [CLS]). Padded tokens are
                never picked (they are not candidates); a sample with fewer than ``num_anchors`` real
                patch tokens raises.
            key_padding_mask: ``(B, N)`` bool, True = real token, False = padding (ignored as a key).
                A padded batch gives, per sample, the result of running that sample alone.

        Returns:
            ``(B, K, llm_dim)``: output token ``k`` belongs to query ``anchor_idx[:, k]``.
        """
        self._check_features(features)
        self._check_mask(key_padding_mask, features)
        if (anchor_idx is None) == (attention is None):
            raise ValueError(
                "pass exactly one of anchor_idx (B, K) and attention; got "
                f"anchor_idx={'None' if anchor_idx is None else shape_str(anchor_idx)}, "
                f"attention={'None' if attention is None else shape_str(attention)}"
            )
        if anchor_idx is None:  # the search never picks padding (too few real tokens raise there)
            assert attention is not None  # exactly one of the two is given (checked above)
            anchor_idx = self._search(attention, features, key_padding_mask)
        else:
            self._check_anchor_idx(anchor_idx, features, key_padding_mask)
        index = anchor_idx.long().unsqueeze(-1).expand(-1, -1, features.shape[-1])  # (B, K, D)
        queries = features.gather(1, index)  # (B, K, D)
        return self._resample(queries, features, key_padding_mask)  # (B, K, llm_dim)

    def _search(
        self, attention: torch.Tensor, features: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the built-in search; padded tokens are excluded from the candidates (not given a low score,
        which a real token could tie)."""
        b, n = features.shape[:2]
        scores = cls_scores(attention, num_prefix_tokens=self.num_prefix_tokens)  # (B, H, N)
        check_floating("attention", attention)
        if scores.shape[0] != b or scores.shape[-1] != n:
            raise ValueError(
                f"attention must cover the B={b} samples and N={n} tokens of features of shape "
                f"{shape_str(features)}, got attention of shape {shape_str(attention)}"
            )
        anchors: torch.Tensor = self.search(scores, layout="b h n", key_padding_mask=key_padding_mask)
        return anchors

    def extra_repr(self) -> str:
        a = self._config
        return (
            f"vision_dim={a.vision_dim}, llm_dim={a.llm_dim}, num_anchors={a.num_anchors}, "
            f"include_cls={a.include_cls}, num_prefix_tokens={a.num_prefix_tokens}"
        )
