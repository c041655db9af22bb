"""``extract_anchors``: features, the anchor score and the visual anchors from ONE ordinary forward."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from anchor_former._validation import check_floating, check_ndim, shape_str
from anchor_former.probes._probe import AttentionProbe, Score
from anchor_former.probes._spec import EncoderSpec, InputLayout
from anchor_former.search import Method, anchor_search

__all__ = ["AnchorExtraction", "extract_anchors"]


@dataclass(frozen=True)
class AnchorExtraction:
    """The result of :func:`extract_anchors`.

    Attributes:
        features: ``(B, N, D)`` the selected layer's hidden states (``hidden_states[layer]``), N tokens
            including the ``num_prefix_tokens`` prefix tokens; autograd intact.
        attention: ``(B, H, N)`` float32 per head: the attention row of the scored query ([CLS] for
            ``score="cls"``, the pooling head's probe for ``"map"``) or the attention each token receives,
            averaged over all queries (``"received"``); None for ``score="norm"``.
        scores: what the search ranked: ``attention``, or ``(B, N)`` token norms for ``score="norm"``.
        anchor_idx: ``(B, K + 1)`` = ``[0, sorted anchors]`` with ``include_cls``, else ``(B, K)``
            ascending; indices into the N tokens.
        num_prefix_tokens: leading special tokens ([CLS], registers), never anchors.
        layer: the positive ``hidden_states`` index of the selected layer.
        grid_size: ``(rows, cols)`` of the patch grid; patch token ``num_prefix_tokens + r * cols + c``;
            None when the images of the batch have different grids (SigLIP2 NaFlex): see ``grid_sizes``.
        score: the score that ranked the tokens.
        grid_sizes: ``(rows, cols)`` per image.
        padding: ``(B, N)`` bool, True at padding tokens (variable-resolution inputs), else None. Padding
            tokens get score -1 in ``scores`` (below every real token) and are never anchors.
    """

    features: torch.Tensor
    attention: torch.Tensor | None
    scores: torch.Tensor
    anchor_idx: torch.Tensor
    num_prefix_tokens: int
    layer: int
    grid_size: tuple[int, int] | None
    score: Score
    grid_sizes: tuple[tuple[int, int], ...] = ()
    padding: torch.Tensor | None = None

    @property
    def anchor_features(self) -> torch.Tensor:
        """``(B, K', D)`` the features at ``anchor_idx`` (the AcFormer queries), K' = ``anchor_idx.shape[1]``."""
        index = self.anchor_idx.unsqueeze(-1).expand(-1, -1, self.features.shape[-1])  # (B, K', D)
        return self.features.gather(1, index)


def _image_layout(spec: EncoderSpec, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> InputLayout:
    check_ndim("pixel_values", pixel_values, (4,), f"(B, {spec.num_channels}, H_img, W_img)")
    check_floating("pixel_values", pixel_values)
    if pixel_values.shape[1] != spec.num_channels:
        raise ValueError(
            f"pixel_values must have shape (B, {spec.num_channels}, H_img, W_img) for this {spec.family} "
            f"encoder, got shape {shape_str(pixel_values)}"
        )
    if inputs:
        raise ValueError(
            f"inputs must be empty for this {spec.family} encoder (it takes pixel_values only), "
            f"got keys {sorted(inputs)}"
        )
    height, width = (int(s) for s in pixel_values.shape[-2:])
    if spec.grid is not None:
        grid = cast("tuple[int, int]", tuple(int(g) for g in spec.grid(height, width)))
    else:
        grid = (height // spec.patch_size, width // spec.patch_size)
    return InputLayout(grid_sizes=(grid,) * pixel_values.shape[0])


def extract_anchors(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    num_anchors: int,
    layer: int = -2,
    score: Score = "cls",
    include_cls: bool | None = None,
    method: Method = "auto",
    inputs: Mapping[str, Any] | None = None,
) -> AnchorExtraction:
    """Run ``vision_model`` once (its own attention kernels untouched) and find its visual anchors.

    The selected layer's output is kept by a hook (no ``output_hidden_states``), and its score (the
    [CLS] query's attention row, or the attention each token receives) is computed beside the forward
    from the queries and keys that layer's projection modules output (no ``output_attentions``, nothing
    ``(N, N)`` kept). See ``docs/probes.md``.

    Args:
        vision_model: a supported encoder (:func:`anchor_former.probes.detect_encoder`; the families are
            listed in ``docs/probes.md``).
        pixel_values: ``(B, C, H_img, W_img)`` images as the model expects them; for SigLIP2 (NaFlex) its
            own ``(B, N, C * P * P)`` patch rows, with ``inputs`` holding ``pixel_attention_mask`` and
            ``spatial_shapes`` as its processor returns them.
        num_anchors: K, anchors besides [CLS]; see :func:`anchor_former.anchor_search` (with padding: at
            most the real patch tokens of the smallest image).
        layer: ``hidden_states`` index of the layer (LLaVA's ``mm_vision_select_layer``; ``-2`` =
            penultimate).
        score: ``"cls"`` (the [CLS] attention row of ``layer``), ``"map"`` (the attention-pooling head's
            probe row over the final tokens; SigLIP), ``"received"`` (the attention each token receives
            in ``layer``, averaged over all queries; any encoder) or ``"norm"`` (token norms of ``layer``).
        include_cls: prepend token 0 to ``anchor_idx``; default: whether the model has a [CLS] token.
        method: the search implementation (results are identical).
        inputs: extra keyword inputs of the model's forward (SigLIP2: ``pixel_attention_mask``,
            ``spatial_shapes``); must be empty for the other families.

    Returns:
        :class:`AnchorExtraction` with ``features (B, N, D)``, ``attention (B, H, N)``,
        ``anchor_idx (B, K + 1)`` (or ``(B, K)`` without [CLS]).

    Raises:
        ValueError: unsupported model, ``layer`` out of range, ``score="cls"`` without [CLS],
            ``pixel_values`` not a floating ``(B, C, H_img, W_img)`` tensor with the model's channel
            count (or not in the model's own layout), unexpected or malformed ``inputs``,
            ``include_cls=True`` on a model without [CLS], bad ``num_anchors``.
    """
    probe = AttentionProbe(vision_model, layer=layer, score=score)
    spec = probe.encoder
    inputs = dict(inputs or {})
    layout = spec.layout(pixel_values, inputs) if spec.layout is not None else _image_layout(spec, pixel_values, inputs)
    if include_cls is None:
        include_cls = spec.has_cls
    elif include_cls and not spec.has_cls:
        raise ValueError(f"include_cls=True needs a [CLS] token, but this {spec.family} encoder has none")
    if layout.padding is not None:
        fewest = int((~layout.padding).sum(-1).min()) - spec.num_prefix_tokens
        if isinstance(num_anchors, int) and not isinstance(num_anchors, bool) and num_anchors > fewest:
            raise ValueError(
                f"num_anchors must be at most {fewest}, the real (non-padding) patch tokens of the smallest "
                f"image in this batch, got {num_anchors}"
            )
    with probe:
        spec.run(pixel_values, **inputs)
    scores = probe.scores
    if layout.padding is not None:
        pad = layout.padding.to(scores.device)
        scores = scores.masked_fill(pad if scores.ndim == 2 else pad.unsqueeze(1), -1.0)  # never anchors
    anchor_idx = anchor_search(
        scores, num_anchors, include_cls=include_cls, num_prefix_tokens=spec.num_prefix_tokens, method=method
    )
    grids = layout.grid_sizes
    return AnchorExtraction(
        features=probe.features,
        attention=probe.attention,
        scores=scores,
        anchor_idx=anchor_idx,
        num_prefix_tokens=spec.num_prefix_tokens,
        layer=probe.layer,
        grid_size=grids[0] if len(set(grids)) == 1 else None,
        score=score,
        grid_sizes=grids,
        padding=layout.padding,
    )
