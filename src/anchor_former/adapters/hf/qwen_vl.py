"""transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL: training-free reduction of the merged visual tokens.

:func:`attach_anchor_former` switches a built ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration`` (transformers >= 5; tested
with 5.24.0) and its processor in
place, so the LLM sees only K *merged* tokens (the unit after the 2 x 2 patch merger) per image, or per
temporal step of a video, instead of all of them. No parameter is added or changed; the vision tower
still runs once, with its configured attention (SDPA, flash or eager), and the merger (the checkpoint's
trained projector) maps every patch as before; the reduction drops merged tokens after it.

Scores. A forward pre-hook, registered for one call only and under the tower's lock
(:func:`~anchor_former.adapters._probed.hooked_forward`, eager under ``torch.compile``), on the attention of
ONE full-attention vision block (``score_layer``; by
default the last full-attention block: block ``fullatt_block_indexes[-1]`` of Qwen2.5-VL, the last
block of Qwen2-VL and Qwen3-VL, where every block attends over the whole image) recomputes that block's
queries and keys exactly as the module does (``qkv`` linear, 2-D vision rotary embedding) and calls
:func:`~anchor_former.probes.received_attention` once per attention segment of ``cu_seqlens``
(one image, or one temporal step of a video), in query blocks, never holding the N x N map. A patch's
score is its received attention averaged over heads; a merged token's score is the SUM over its 2 x 2
group of patches, i.e. the attention mass the four patches the merger fuses receive together (all groups
have four patches, so the mean would rank identically). Qwen2.5-VL orders patches by attention window
inside the tower; the scores are put back in the merger's output order with the tower's own window index.
The cost is one extra ``qkv`` linear of that block plus the ``q @ k^T`` of one layer, in float32.

Budget (``num_anchors``): an int K keeps K merged tokens per image and per temporal step of a video
(``temporal_patch_size`` = 2 frames), which must not exceed that image's merged tokens per step; a float
``f`` in (0, 1] keeps ``ceil(f * n)`` of the n merged tokens of each image / step. Kept tokens stay in
their original (raster, then time) order.

Positions stay true. Every token the LLM sees keeps the M-RoPE position it has in the stock model: a
kept visual token keeps the (t, h, w) of its cell in the full grid, and text after an image continues
from where the full image would have ended (``start + max(h, w) / merge``, the stock rule), as do the
generated tokens. The reduced sequence is the stock sequence with the dropped visual tokens cut out;
nothing is renumbered.

The processor, switched in place, writes the kept count of ``<|image_pad|>`` / ``<|video_pad|>`` per
image and video, and saves its budget (``num_anchors`` in ``processor_config.json``), so
``AutoProcessor.from_pretrained(folder)`` (after :func:`register_auto_classes`) returns the switched
processor. ``save_pretrained`` / ``from_pretrained`` of the model round-trip through the ``AnchorFormerQwen*``
classes (config key ``anchor_former``: the :class:`~anchor_former.adapters.settings.AnchorSettings` record,
``layer`` = the score block, ``extras["block_size"]``), also from a folder in the hub checkpoints' key layout.

Precomputed features: ``model(..., mm_encoder_outputs={"image": model.model.get_image_features(...)})``
gives the kept tokens their true positions (the outputs carry ``kept_indices``); outputs without them
(e.g. the stock model's) are refused with a ``ValueError``.

Qwen3-VL works the same way, with two additions: the features its "deepstack" mergers take from
intermediate vision blocks (added to the first LLM layers at the visual positions) are kept at the same
indices as the merged tokens, and its rope index (one run per video step, timestamp text between the
runs) gets the per-step kept indices.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import can_return_tuple
from transformers.vision_utils import get_vision_window_index

from anchor_former.adapters._host import Plan, attach
from anchor_former.adapters._probed import hooked_forward
from anchor_former.adapters.hf._base import TransformersHost
from anchor_former.adapters.settings import AnchorSettings, normalise
from anchor_former.probes import DEFAULT_BLOCK_SIZE, received_attention

__all__ = [
    "AnchorFormerQwen2VLConfig",
    "AnchorFormerQwen2VLForConditionalGeneration",
    "AnchorFormerQwen2VLModel",
    "AnchorFormerQwen2VLProcessor",
    "AnchorFormerQwen2_5_VLConfig",
    "AnchorFormerQwen2_5_VLForConditionalGeneration",
    "AnchorFormerQwen2_5_VLModel",
    "AnchorFormerQwen2_5_VLProcessor",
    "AnchorFormerQwen3VLConfig",
    "AnchorFormerQwen3VLForConditionalGeneration",
    "AnchorFormerQwen3VLModel",
    "AnchorFormerQwen3VLProcessor",
    "attach_anchor_former",
    "register_auto_classes",
]

Budget = int | float


# --- budget -------------------------------------------------------------------------------------------


def _check_budget(num_anchors: Any) -> Budget:
    """``num_anchors`` validated: an int >= 1 or a float in (0, 1]."""
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, (int, float)):
        raise ValueError(
            f"num_anchors must be an int K >= 1 (merged tokens kept per image / video step) or a float in (0, 1] "
            f"(the fraction kept), got {num_anchors!r}"
        )
    if isinstance(num_anchors, int) and num_anchors < 1:
        raise ValueError(f"num_anchors must be an int K >= 1 or a float in (0, 1], got {num_anchors}")
    if isinstance(num_anchors, float) and not 0.0 < num_anchors <= 1.0:
        raise ValueError(f"num_anchors as a fraction must lie in (0, 1], got {num_anchors}")
    return num_anchors


def kept_per_step(num_anchors: Budget, merged: int, *, what: str = "an image") -> int:
    """Merged tokens kept of the ``merged`` tokens of one image or one temporal step of a video.

    Args:
        num_anchors: K (int, at most ``merged``) or a fraction ``f`` in (0, 1] (keeps ``ceil(f * merged)``,
            at least 1; the product is taken with a 1e-9 tolerance so ``0.1 * 30`` keeps 3, not 4).
        merged: n, the merged tokens per step, ``(h / merge) * (w / merge)``.
        what: names the image or video in the error.

    Raises:
        ValueError: an int K larger than ``merged``.
    """
    if isinstance(num_anchors, float):
        return max(1, math.ceil(num_anchors * merged - 1e-9))
    if num_anchors > merged:
        raise ValueError(
            f"num_anchors={num_anchors} must be at most the {merged} merged tokens per step of {what}; use a "
            "smaller K or a fraction (a float in (0, 1])"
        )
    return num_anchors


def _kept_count(num_anchors: Budget, grid_thw: torch.Tensor, merge: int, what: str) -> int:
    t, h, w = (int(v) for v in grid_thw)
    return t * kept_per_step(num_anchors, (h // merge) * (w // merge), what=f"{what} (grid t,h,w = {t},{h},{w})")


# --- scores -------------------------------------------------------------------------------------------


def merged_token_scores(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    *,
    merge_unit: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Received attention of one Qwen vision attention layer, one score per merged token.

    Computes the layer's queries and keys as ``Qwen2_5_VLVisionAttention`` / ``VisionAttention`` do
    (``qkv`` linear, then the 2-D rotary embedding), then per ``cu_seqlens`` segment the column mean of the
    attention probabilities (:func:`~anchor_former.probes.received_attention`), averaged over heads,
    summed over each run of ``merge_unit`` consecutive patches (one merged token).

    Args:
        attn: the block's attention module (has ``qkv``, ``num_heads``, ``scaling``).
        hidden_states: ``(L, D)`` the attention's input (after ``norm1``), L patches of the packed batch.
        cu_seqlens: ``(S + 1,)`` segment boundaries (one segment per image / video step).
        position_embeddings: ``(cos, sin)``, each ``(L, E)``, as the block receives them.
        merge_unit: patches per merged token (``spatial_merge_size ** 2`` = 4).
        block_size: query rows per step of :func:`received_attention`.

    Returns:
        ``(L / merge_unit,)`` float32, in the order of ``hidden_states``; each segment's scores sum to 1.
    """
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    att: Any = attn  # a transformers Qwen vision attention: qkv, num_heads, scaling
    seq = hidden_states.shape[0]
    with torch.no_grad():
        q, k, _ = att.qkv(hidden_states).reshape(seq, 3, att.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)  # (L, H, E) each
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, L, E)
        bounds = [int(b) for b in cu_seqlens.tolist()]
        patch = torch.cat(
            [
                received_attention(q[None, :, a:b], k[None, :, a:b], scale=att.scaling, block_size=block_size)[0].mean(
                    0
                )
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
        )  # (L,)
    return patch.view(-1, merge_unit).sum(-1)  # (L / merge_unit,)


@dataclass
class QwenVisionSelectOutput(BaseModelOutputWithPooling):
    """The vision tower's output with ``pooler_output`` = a tuple of ``(T_i, llm_dim)`` kept merged tokens
    per image / video and ``kept_indices`` = a tuple of ``(T_i,)`` ascending indices of those tokens in
    the item's full merged sequence (``t * (h/2) * (w/2)``, raster order per step, steps in time order)."""

    pooler_output: Any = None  # a tuple of per-item tensors here, not the stock single tensor
    kept_indices: tuple[torch.Tensor, ...] | None = None
    #: ``(I, 3)`` the items' (t, h, w) patch grids (what ``generate`` no longer passes once it has encoded them)
    grid_thw: torch.Tensor | None = None
    #: Qwen3-VL only: per deepstack layer, a tuple of ``(T_i, llm_dim)`` features at the same kept indices.
    deepstack_features: list[tuple[torch.Tensor, ...]] | None = None


# --- model classes --------------------------------------------------------------------------------------


class _QwenSelectMixin:
    """What the Qwen model classes share: feature selection, the rope index of the reduced sequence, forward."""

    #: Qwen2.5-VL spaces video steps by ``tokens_per_second * second_per_grid_ts``; Qwen2-VL by 1.
    _scales_video_time = False
    #: Qwen3-VL writes each video step as its own run (timestamp text between steps).
    _splits_video_steps = False

    if TYPE_CHECKING:  # what the host Qwen model class supplies
        config: Any
        visual: Any
        rope_deltas: Any

        def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        settings = normalise(config)
        if settings["num_anchors"] is None or settings["layer"] is None:
            raise ValueError(
                f"config.anchor_former must hold num_anchors and the score layer, got {settings!r}; "
                "build the model with attach_anchor_former"
            )

    def _settings(self) -> dict[str, Any]:
        """The settings record as a plain dict (normalised at build, so ``torch.compile`` traces the reads)."""
        return self.config.anchor_former

    def _select(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, what: str) -> QwenVisionSelectOutput:
        """One tower forward with the score hook, then the kept merged tokens of each item."""
        settings = self._settings()
        visual = self.visual
        merge = visual.spatial_merge_size
        budget = settings["num_anchors"]
        counts = [_kept_count(budget, g, merge, f"{what} {i}") for i, g in enumerate(grid_thw)]  # checked first
        captured: list[torch.Tensor] = []  # this call's only: the hook exists for this forward alone

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(
                merged_token_scores(
                    module,
                    hidden,
                    kwargs["cu_seqlens"],
                    kwargs["position_embeddings"],
                    merge_unit=merge * merge,
                    block_size=int(settings["extras"].get("block_size", DEFAULT_BLOCK_SIZE)),
                )
            )

        out = hooked_forward(
            visual,
            lambda: visual(pixel_values.type(visual.dtype), grid_thw=grid_thw),
            pre_hooks={visual.blocks[int(settings["layer"])].attn: hook},
        )
        if len(captured) != 1:
            raise ValueError(f"the score block ran {len(captured)} times in one vision forward, expected once")
        scores = captured[0]  # (sum n_i,) in the tower's internal order
        if getattr(visual, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: undo the window order
            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
            )
            scores = scores[torch.argsort(window_index.to(scores.device))]
        merged = out.pooler_output  # (sum n_i, llm_dim) in merger output order
        sizes = (grid_thw.prod(-1) // (merge * merge)).tolist()
        kept = []
        for score, grid, count in zip(scores.split(sizes), grid_thw, counts):
            steps = int(grid[0])
            per_step = score.shape[0] // steps
            order = torch.argsort(score.view(steps, per_step), dim=1, descending=True, stable=True)[:, : count // steps]
            offsets = torch.arange(steps, device=order.device)[:, None] * per_step  # (t, 1) first token of each step
            kept.append((order.sort(dim=1).values + offsets).flatten())  # (t * k,) ascending

        def pick(features: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (sum n_i, D) -> per item (T_i, D)
            return tuple(f[idx] for f, idx in zip(features.split(sizes), kept))

        deepstack = getattr(out, "deepstack_features", None)
        return QwenVisionSelectOutput(
            last_hidden_state=out.last_hidden_state,
            pooler_output=pick(merged),
            kept_indices=tuple(kept),
            grid_thw=grid_thw,
            deepstack_features=None if deepstack is None else [pick(f) for f in deepstack],
        )

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs: Any
    ) -> QwenVisionSelectOutput:
        """Vision tower + received-attention scores + selection.

        Args:
            pixel_values: ``(L, C * temporal_patch_size * patch_size ** 2)`` the processor's packed patches.
            image_grid_thw: ``(I, 3)`` each image's (t, h, w) patch grid.

        Returns:
            :class:`QwenVisionSelectOutput`: per image ``(T_i, llm_dim)`` kept tokens and their indices.
        """
        return self._select(pixel_values, cast(torch.Tensor, image_grid_thw), "image")

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None, **kwargs: Any
    ) -> QwenVisionSelectOutput:
        """As :meth:`get_image_features` for videos; the budget applies per temporal step."""
        return self._select(pixel_values_videos, cast(torch.Tensor, video_grid_thw), "video")

    def get_rope_index(
        self,
        input_ids: torch.LongTensor,
        mm_token_type_ids: torch.IntTensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        kept_indices: dict[str, tuple[torch.Tensor, ...]] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions of the reduced sequence: the stock positions of the tokens that remain.

        Text runs count on from where the previous item of the FULL sequence ended; a visual run of
        ``T_i`` tokens gets the full grid's (t, h, w) positions at ``kept_indices`` (without them, at
        ``0 .. T_i - 1``: a placeholder that only ``generate``'s first call sees, replaced in
        :meth:`forward` once the kept indices are known; text positions and deltas do not depend on it).

        Args:
            input_ids: ``(B, S)``; mm_token_type_ids: ``(B, S)`` 0 text, 1 image, 2 video.
            image_grid_thw / video_grid_thw: ``(I, 3)`` / ``(V, 3)``; second_per_grid_ts: ``(V,)``.
            attention_mask: ``(B, S)`` 1 = real token (left or right padding).
            kept_indices: ``{"image": (idx_i, ...), "video": (...)}`` as :class:`QwenVisionSelectOutput` gives.

        Returns:
            ``(3, B, S)`` positions (0 at padding) and ``(B, 1)`` deltas: the full sequence's last position
            + 1 minus the reduced length, so generated token ``j`` gets ``len + j + delta``, as in the stock model.
        """
        merge = self.config.vision_config.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1)
        positions = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
        kept = dict(kept_indices or {})
        if self._splits_video_steps and video_grid_thw is not None:  # one (1, h, w) run per step, as the stock model
            if kept.get("video") is not None:
                kept["video"] = tuple(
                    step - s * (int(g[1]) * int(g[2]) // merge**2)
                    for idx, g in zip(kept["video"], video_grid_thw)
                    for s, step in enumerate(idx.view(int(g[0]), -1))
                )
            video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
            video_grid_thw[:, 0] = 1
        grids = {
            1: iter(image_grid_thw if image_grid_thw is not None else ()),
            2: iter(video_grid_thw if video_grid_thw is not None else ()),
        }
        kept_iters = {1: iter(kept.get("image") or ()), 2: iter(kept.get("video") or ())}
        seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else itertools.repeat(1)
        deltas = []
        for b in range(input_ids.shape[0]):
            types = mm_token_type_ids[b]
            real = attention_mask[b].bool() if attention_mask is not None else None
            if real is not None:
                types = types[real]
            current, top, pieces = 0, -1, []
            for modality, run in itertools.groupby(types.tolist()):
                length = len(list(run))
                if modality == 0:
                    pieces.append(torch.arange(current, current + length, device=input_ids.device).expand(3, -1))
                    current += length
                    top = max(top, current - 1)
                    continue
                name = "image" if modality == 1 else "video"
                grid = next(grids[modality], None)
                if grid is None:
                    raise ValueError(f"input_ids hold more {name} runs than {name}_grid_thw has rows")
                interval = tokens_per_second * next(seconds) if modality == 2 and self._scales_video_time else 1
                full = self.get_vision_position_ids(current, grid, 1, merge, interval, device=input_ids.device)
                # full: (3, n) the stock positions of every merged token of this run
                idx = next(kept_iters[modality], None) if kept else None
                idx = torch.arange(length, device=full.device) if idx is None else idx.to(full.device)
                if idx.numel() != length or length > full.shape[1]:
                    raise ValueError(
                        f"input_ids must hold the {idx.numel()} kept {name} tokens of grid {tuple(int(v) for v in grid)} "
                        f"(num_anchors={self._settings()['num_anchors']}), got a run of {length}; "
                        "prepare inputs with the processor passed to attach_anchor_former / attach_qwen_processor"
                    )
                pieces.append(full[:, idx])
                top = max(top, int(full.max()))
                current += max(int(grid[1]), int(grid[2])) // merge
            row = torch.cat(pieces, dim=1) if pieces else positions.new_zeros(3, 0)
            if real is not None:
                positions[:, b, real] = row.to(positions.dtype)
            else:
                positions[:, b] = row.to(positions.dtype)
            deltas.append(top + 1 - types.numel())
        return positions, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The stock forward, with the kept visual tokens and their true positions.

        When this call encodes images or videos and ``input_ids`` / ``mm_token_type_ids`` are given, the
        M-RoPE positions (the last three rows of a ``(4, B, S)`` ``position_ids``) are those of
        :meth:`get_rope_index` with the kept indices, and ``rope_deltas`` is set for decoding, as the stock
        model does. Shapes as the stock ``forward``; ``input_ids`` ``(B, S)`` holds T_i pad tokens per item.
        """
        if mm_encoder_outputs is None and (pixel_values is not None or pixel_values_videos is not None):
            mm_encoder_outputs = {}
            if pixel_values is not None:
                mm_encoder_outputs["image"] = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            if pixel_values_videos is not None:
                mm_encoder_outputs["video"] = self.get_video_features(
                    pixel_values_videos, video_grid_thw, return_dict=True
                )
            pixel_values = pixel_values_videos = None
        if mm_encoder_outputs:
            kept: dict[str, tuple[torch.Tensor, ...]] = {}
            for name, item in mm_encoder_outputs.items():
                if item is None:
                    continue
                indices = getattr(item, "kept_indices", None)
                if indices is None:
                    raise ValueError(
                        f"mm_encoder_outputs[{name!r}] must come from this model's get_{name}_features (a "
                        f"QwenVisionSelectOutput with kept_indices, so the kept tokens get their true positions), "
                        f"got {type(item).__name__} without kept_indices"
                    )
                kept[name] = indices
            if image_grid_thw is None and mm_encoder_outputs.get("image") is not None:
                image_grid_thw = cast(QwenVisionSelectOutput, mm_encoder_outputs["image"]).grid_thw
            if video_grid_thw is None and mm_encoder_outputs.get("video") is not None:
                video_grid_thw = cast(QwenVisionSelectOutput, mm_encoder_outputs["video"]).grid_thw
            if input_ids is not None and mm_token_type_ids is not None:
                rope, self.rope_deltas = self.get_rope_index(
                    input_ids,
                    mm_token_type_ids,
                    image_grid_thw,
                    video_grid_thw,
                    kwargs.get("second_per_grid_ts"),
                    attention_mask,
                    kept_indices=kept,
                )
                position_ids = (
                    rope
                    if position_ids is None or position_ids.shape[0] != 4
                    else torch.cat([position_ids[:1], rope.to(position_ids.dtype)])
                )
        return super().forward(  # type: ignore[misc]
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )


@strict
class AnchorFormerQwen2VLConfig(Qwen2VLConfig):
    """``Qwen2VLConfig`` plus ``anchor_former = {"connector": "select", "score": "received",
    "num_anchors": K or fraction, "score_layer": int, "block_size": int}``."""

    model_type = "anchor_former_qwen2_vl"

    anchor_former: dict | None = None


@strict
class AnchorFormerQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """``Qwen2_5_VLConfig`` plus ``anchor_former`` (the keys of :class:`AnchorFormerQwen2VLConfig`)."""

    model_type = "anchor_former_qwen2_5_vl"

    anchor_former: dict | None = None


@strict
class AnchorFormerQwen3VLConfig(Qwen3VLConfig):
    """``Qwen3VLConfig`` plus ``anchor_former`` (the keys of :class:`AnchorFormerQwen2VLConfig`)."""

    model_type = "anchor_former_qwen3_vl"

    anchor_former: dict | None = None


# the mixin's get_rope_index takes Qwen2.5-VL's positional order (second_per_grid_ts before attention_mask);
# Qwen2-VL / Qwen3-VL place attention_mask there, but their own code passes it by keyword
class AnchorFormerQwen2VLModel(_QwenSelectMixin, Qwen2VLModel):  # type: ignore[misc]
    """``Qwen2VLModel`` that keeps K merged visual tokens per image / video step at their true positions."""

    config_class = AnchorFormerQwen2VLConfig


class AnchorFormerQwen2_5_VLModel(_QwenSelectMixin, Qwen2_5_VLModel):
    """``Qwen2_5_VLModel`` that keeps K merged visual tokens per image / video step at their true positions."""

    config_class = AnchorFormerQwen2_5_VLConfig
    _scales_video_time = True


class AnchorFormerQwen3VLModel(_QwenSelectMixin, Qwen3VLModel):  # type: ignore[misc]  # as Qwen2-VL's above
    """``Qwen3VLModel`` that keeps K merged visual tokens (and their deepstack features) per image / video step."""

    config_class = AnchorFormerQwen3VLConfig
    _splits_video_steps = True


class AnchorFormerQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """``Qwen2VLForConditionalGeneration`` with an :class:`AnchorFormerQwen2VLModel` inside."""

    config_class = AnchorFormerQwen2VLConfig

    def __init__(self, config: AnchorFormerQwen2VLConfig) -> None:
        super().__init__(config)
        self.model = AnchorFormerQwen2VLModel(config)
        self.post_init()


class AnchorFormerQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` with an :class:`AnchorFormerQwen2_5_VLModel` inside."""

    config_class = AnchorFormerQwen2_5_VLConfig

    def __init__(self, config: AnchorFormerQwen2_5_VLConfig) -> None:
        super().__init__(config)
        self.model = AnchorFormerQwen2_5_VLModel(config)
        self.post_init()


class AnchorFormerQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """``Qwen3VLForConditionalGeneration`` with an :class:`AnchorFormerQwen3VLModel` inside."""

    config_class = AnchorFormerQwen3VLConfig

    def __init__(self, config: AnchorFormerQwen3VLConfig) -> None:
        super().__init__(config)
        self.model = AnchorFormerQwen3VLModel(config)
        self.post_init()


# --- processor ------------------------------------------------------------------------------------------


class _SelectProcessorMixin:
    """Writes the kept count of pad tokens per image / video (``self.num_anchors`` is the budget; saved in
    ``processor_config.json`` because ``__init__`` takes it, so ``from_pretrained`` restores it)."""

    num_anchors: Budget | None
    if TYPE_CHECKING:  # what the host Qwen processor class supplies
        image_token: Any
        image_processor: Any
        video_token: Any
        video_processor: Any

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        video_processor: Any = None,
        chat_template: str | None = None,
        num_anchors: Budget | None = None,
        **kwargs: Any,
    ) -> None:  # the stock parameters spelt out: transformers derives the saved attributes from this signature
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)  # type: ignore[call-arg]
        self.num_anchors = num_anchors

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        if self.num_anchors is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)  # type: ignore[misc]
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * _kept_count(
            self.num_anchors, grid, self.image_processor.merge_size, f"image {image_idx}"
        )

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        if self.num_anchors is None:
            return super().replace_video_token(video_inputs, video_idx, **kwargs)  # type: ignore[misc]
        grid = video_inputs["video_grid_thw"][video_idx]
        return self.video_token * _kept_count(
            self.num_anchors, grid, self.video_processor.merge_size, f"video {video_idx}"
        )


class AnchorFormerQwen2VLProcessor(_SelectProcessorMixin, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` writing the kept number of pad tokens."""


class AnchorFormerQwen2_5_VLProcessor(_SelectProcessorMixin, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` writing the kept number of pad tokens."""


class AnchorFormerQwen3VLProcessor(_SelectProcessorMixin, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` writing the kept number of pad tokens (per frame run of a video)."""

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        # the stock text is "<t seconds><|vision_start|>" + n pads + "<|vision_end|>" per step: shorten each run
        text = Qwen3VLProcessor.replace_video_token(self, video_inputs, video_idx, **kwargs)
        if self.num_anchors is None:
            return text
        grid = video_inputs["video_grid_thw"][video_idx]
        merged = int(grid[1]) * int(grid[2]) // self.video_processor.merge_size**2
        kept = kept_per_step(self.num_anchors, merged, what=f"video {video_idx}")
        return text.replace(self.video_token * merged, self.video_token * kept)


_PROCESSORS = {
    Qwen2VLProcessor: AnchorFormerQwen2VLProcessor,
    Qwen2_5_VLProcessor: AnchorFormerQwen2_5_VLProcessor,
    Qwen3VLProcessor: AnchorFormerQwen3VLProcessor,
}
_PROCESSORS.update({v: v for v in list(_PROCESSORS.values())})


def _processor_class(processor: Any) -> type:
    target = _PROCESSORS.get(type(processor))
    if target is None:
        raise ValueError(
            "processor must be a transformers Qwen2VLProcessor, Qwen2_5_VLProcessor or Qwen3VLProcessor, got "
            f"{type(processor).__module__}.{type(processor).__qualname__}"
        )
    return target


def attach_qwen_processor(processor: Any, *, num_anchors: Budget) -> Any:
    """Switch a ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` in place to write the
    kept pad-token counts (``attach_anchor_former`` does this to the processor it is given). Returns it."""
    target = _processor_class(processor)
    budget = _check_budget(num_anchors)
    processor.__class__ = target
    processor.num_anchors = budget
    return processor


# --- entry point ----------------------------------------------------------------------------------------


def _score_layer(vision_config: Any, score_layer: Any) -> int:
    """``score_layer`` resolved to a block index, which must be a full-attention block."""
    depth = int(vision_config.depth)
    full = getattr(vision_config, "fullatt_block_indexes", None)
    full = list(range(depth)) if full is None else sorted(int(i) for i in full)
    if score_layer is None:
        if not full:
            raise ValueError("the vision config has no full-attention block (fullatt_block_indexes is empty)")
        return full[-1]
    if isinstance(score_layer, bool) or not isinstance(score_layer, int) or not -depth <= score_layer < depth:
        raise ValueError(f"score_layer must be an int block index in [-{depth}, {depth}), got {score_layer!r}")
    index = score_layer % depth
    if index not in full:
        raise ValueError(
            f"score_layer must be a full-attention block, one of fullatt_block_indexes={full}; got {score_layer} "
            "(a windowed block, whose attention does not span the image)"
        )
    return index


class QwenHost(TransformersHost):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: no connector module (the merger is the projector); the settings and
    the processor's budget are all that change."""

    name = "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration"
    classes: ClassVar[dict[type, tuple[type, type, type]]] = {
        Qwen2VLForConditionalGeneration: (
            AnchorFormerQwen2VLConfig,
            AnchorFormerQwen2VLModel,
            AnchorFormerQwen2VLForConditionalGeneration,
        ),
        Qwen2_5_VLForConditionalGeneration: (
            AnchorFormerQwen2_5_VLConfig,
            AnchorFormerQwen2_5_VLModel,
            AnchorFormerQwen2_5_VLForConditionalGeneration,
        ),
        Qwen3VLForConditionalGeneration: (
            AnchorFormerQwen3VLConfig,
            AnchorFormerQwen3VLModel,
            AnchorFormerQwen3VLForConditionalGeneration,
        ),
    }
    connector_slot = None

    def check_model(self, model: nn.Module) -> None:
        if self.stock_of(model) is None:
            raise ValueError(
                "model must be a transformers Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration or "
                f"Qwen3VLForConditionalGeneration, got {type(model).__module__}.{type(model).__qualname__}"
            )

    def plan(self, model: nn.Module, processor: Any, request: dict[str, Any], recorded: AnchorSettings | None) -> Plan:
        connector = request.pop("connector", None) or "select"
        score = request.pop("score", None) or "received"
        if connector != "select":
            raise ValueError(f"connector must be 'select' for Qwen-VL (its merger is the projector), got {connector!r}")
        if score != "received":
            raise ValueError(f"score must be 'received' for Qwen-VL (its tower has no [CLS]), got {score!r}")
        if request.get("num_anchors") is None:
            raise ValueError("num_anchors must be given for Qwen-VL: an int K >= 1 or a float in (0, 1], got None")
        budget = _check_budget(request.pop("num_anchors"))
        block_size = request.pop("block_size", None)
        block_size = (recorded.extras.get("block_size") if recorded else None) if block_size is None else block_size
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        layer = request.pop("score_layer", None)
        config: Any = model.config
        layer = _score_layer(config.vision_config, recorded.layer if layer is None and recorded else layer)
        if request:
            raise ValueError(
                f"unknown arguments for Qwen-VL: {sorted(request)} (it takes num_anchors, score_layer, block_size)"
            )
        if processor is not None:
            _processor_class(processor)
        return Plan(
            connector=connector,
            score=score,
            recorded=recorded,
            data={"num_anchors": budget, "layer": layer, "block_size": block_size},
        )

    def settings(self, model: nn.Module, plan: Plan, connector: nn.Module | None) -> AnchorSettings:
        return AnchorSettings(
            connector="select",
            score="received",
            layer=plan.data["layer"],
            num_anchors=plan.data["num_anchors"],
            extras={"block_size": plan.data["block_size"]},
        )

    def switch_processor(
        self, processor: Any, settings: AnchorSettings, plan: Plan, connector: nn.Module | None
    ) -> None:
        assert settings.num_anchors is not None, "plan requires num_anchors for Qwen-VL"
        attach_qwen_processor(processor, num_anchors=settings.num_anchors)


HOST = QwenHost()
HOST.register_key_conversions()


def register_auto_classes() -> None:
    """Register the classes with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` /
    ``AutoProcessor`` (idempotent), so ``AutoModelForImageTextToText.from_pretrained(folder)``,
    ``AutoProcessor.from_pretrained(folder)`` and ``pipeline(model=folder)`` rebuild the attached model."""
    QwenHost.register(
        {
            Qwen2VLForConditionalGeneration: AnchorFormerQwen2VLProcessor,
            Qwen2_5_VLForConditionalGeneration: AnchorFormerQwen2_5_VLProcessor,
            Qwen3VLForConditionalGeneration: AnchorFormerQwen3VLProcessor,
        }
    )


#: the family's earlier name for :func:`register_auto_classes`


def attach_anchor_former(
    model: nn.Module,
    processor: Any = None,
    *,
    num_anchors: Budget | None = None,
    connector: str = "select",
    score: str = "received",
    score_layer: int | None = None,
    block_size: int | None = None,
) -> nn.Module:
    """Switch a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (and its processor) to the training-free reduction in place.

    Args:
        model: a built ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``Qwen3VLForConditionalGeneration``, or one already attached (re-attach: a new budget; the score
            layer and block size keep their recorded values unless given).
        processor: its ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``; switched to
            write the kept number of pad tokens. Without it, prepare ``input_ids`` with that many (see
            :func:`kept_per_step`).
        num_anchors: K merged tokens kept per image and per video step (int), or the fraction kept (float
            in (0, 1]; ``1.0`` keeps all: the stock model). Required.
        connector: ``"select"`` (the only mode: the model's own merger is the projector).
        score: ``"received"`` (the only score: the Qwen tower has no [CLS]).
        score_layer: the vision block whose attention scores the tokens; must be a full-attention block
            (Qwen2.5-VL: one of ``fullatt_block_indexes``). Default: the last full-attention block.
        block_size: query rows per step of the score computation (memory only; default 1024).

    Returns:
        ``model``, now an ``AnchorFormerQwen2VLForConditionalGeneration`` /
        ``AnchorFormerQwen2_5_VLForConditionalGeneration`` / ``AnchorFormerQwen3VLForConditionalGeneration``.

    Raises:
        ValueError: another model class, a bad budget, a windowed ``score_layer``, another connector or score,
            a processor of another kind. The model, its config and the processor are unchanged then.
    """
    return attach(
        HOST,
        model,
        processor,
        num_anchors=num_anchors,
        connector=connector,
        score=score,
        score_layer=score_layer,
        block_size=block_size,
    )


#: the family's earlier name for :func:`attach_anchor_former`
