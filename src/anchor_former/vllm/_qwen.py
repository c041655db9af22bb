"""What the Qwen-VL families share on vLLM: K merged visual tokens per image, kept at their original M-RoPE
positions (the families: :mod:`anchor_former.vllm._qwen2_5_vl`, :mod:`anchor_former.vllm._qwen3_vl`).

The same reduction as the transformers adapter (:func:`anchor_former.adapters.hf.qwen_vl.attach_anchor_former`
with ``connector="select"``), so both give the same tokens:

* **Counts** (processor side): each image's ``<|image_pad|>`` becomes ``kept`` placeholders, ``kept = K``
  (an int budget, at most the image's ``(h / 2) * (w / 2)`` merged tokens) or ``ceil(f * n)`` (a fraction
  ``f`` in (0, 1], the saved adapter's budget). K comes from the request's ``mm_processor_kwargs``
  (``num_anchors``) or the model's settings. The processor passes each image's ``(kept, placeholders)`` to
  the model as the per-image field ``anchor_tokens`` (vLLM's processor cache keys on the request kwargs).
* **Scores** (model side): a forward pre-hook on the score block's attention (the last full-attention
  block by default) recomputes that block's queries and keys (``qkv`` + the 2-D vision rotary
  embedding) and takes each patch's received attention (the column mean of the attention
  probabilities, per image, averaged over all heads, gathered across tensor-parallel ranks); a merged
  token scores the sum over its 2 x 2 patches. The tower runs once; its merger (the checkpoint's
  projector) maps every token, and the K best-scoring merged tokens of each image are kept, in raster
  order (ties: the earlier token). Qwen3-VL's deepstack features travel with their merged token.
* **Positions**: a kept token keeps the (t, h, w) M-RoPE position its grid cell has in the stock model,
  and text after an image continues where the full image would have ended. The admission positions
  (:meth:`QwenAnchorModel.get_mrope_input_positions`) are final for text (they depend only on the grid)
  and put every placeholder of an image at the image's start position; after the encoder, each kept
  token's cell travels with its embedding as :data:`POSITION_CHANNELS` extra channels and
  :meth:`QwenAnchorModel.recompute_mrope_positions` (called by vLLM's runner per prefill chunk, see
  :mod:`anchor_former.vllm._runner`) moves exactly the placeholders of that chunk to
  ``start + (0, row, column)``, then drops the channels. The rewrite reads only the unchanged temporal
  channel, so running it twice on a chunk gives the same positions.
* **Count guard**: each image's embeddings are checked against its placeholders
  (:mod:`anchor_former.vllm._guard`).

Images only: video inputs are not accepted (``limit_mm_per_prompt`` has no ``"video"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from anchor_former._optional import require

require("vllm", extra="vllm", feature="anchor_former.vllm (the vLLM plugin's model classes)")

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.multimodal.inputs import MultiModalFieldConfig

from anchor_former.probes import DEFAULT_BLOCK_SIZE, received_attention
from anchor_former.vllm._guard import check_counts
from anchor_former.vllm._settings import BUDGET_KEYS, anchor_record, field_rows
from anchor_former.vllm._tp import gather_heads

__all__ = [
    "FIELD",
    "POSITION_CHANNELS",
    "QwenAnchorModel",
    "QwenAnchorProcessingInfo",
    "QwenAnchorProcessor",
    "QwenServing",
    "kept_tokens",
    "qwen_serving",
]

#: the per-image field the processor hands to the model: (kept tokens, placeholder tokens)
FIELD = "anchor_tokens"
#: extra channels each kept embedding carries to the position rewrite: its cell's (row, column) in the merged
#: grid, each as two base-256 digits (exact in bfloat16, whose integers are exact only up to 256)
POSITION_CHANNELS = 4
_DIGIT = 256

Budget = int | float


def kept_tokens(budget: Budget, merged: int, *, what: str = "image") -> int:
    """Merged tokens kept of an image's ``merged`` tokens: K (an int, at most ``merged``) or ``ceil(f * merged)``
    for a fraction ``f`` in (0, 1] (at least 1; 1e-9 tolerance, as the transformers adapter)."""
    if isinstance(budget, float):
        return max(1, math.ceil(budget * merged - 1e-9))
    if budget > merged:
        raise ValueError(
            f"num_anchors must be at most the {merged} merged tokens of {what}, got num_anchors={budget}; use a "
            "smaller K (or serve with a fraction in (0, 1])"
        )
    return budget


def _check_budget(name: str, value: Any) -> Budget:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int K >= 1 or a float in (0, 1], got {value!r}")
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be an int K >= 1 or a float in (0, 1], got {value!r}")
    return value


@dataclass(frozen=True)
class QwenServing:
    """What a served Qwen2.5-VL / Qwen3-VL model does, resolved from its hf config.

    Attributes:
        num_anchors: the default budget: K merged tokens per image, or a fraction in (0, 1].
        layer: the vision block whose attention scores the tokens (a full-attention block).
        block_size: query rows per step of the score computation (memory only).
        merge: the spatial merge size (2: a merged token is 2 x 2 patches).
    """

    num_anchors: Budget
    layer: int
    block_size: int
    merge: int

    def budget(self, kwargs: Mapping[str, object]) -> Budget:
        """The request's budget: ``kwargs["num_anchors"]`` (its ``mm_processor_kwargs``) or the default."""
        if kwargs.get("num_context"):
            raise ValueError(
                f"mm_processor_kwargs['num_context'] is not supported by Qwen-VL (no context tokens), got "
                f"{kwargs['num_context']!r}"
            )
        value = kwargs.get("num_anchors")
        return self.num_anchors if value is None else _check_budget("mm_processor_kwargs['num_anchors']", value)

    def kept(self, budget: Budget, grid_thw: Sequence[int]) -> int:
        """Placeholders of an image of patch grid ``(t, h, w)`` at ``budget``."""
        t, h, w = (int(v) for v in grid_thw)
        return t * kept_tokens(budget, (h // self.merge) * (w // self.merge), what=f"an image of grid {(t, h, w)}")


def _score_layer(vision_config: Any, layer: Any) -> int:
    """The score block: ``layer`` (a full-attention block) or the last full-attention block."""
    depth = int(vision_config.depth)
    windows = getattr(vision_config, "fullatt_block_indexes", None)  # Qwen2.5-VL; Qwen3-VL has no windows
    full = list(range(depth)) if windows is None else sorted(int(i) for i in windows)
    if layer is None:
        if not full:
            raise ValueError("the vision config has no full-attention block (fullatt_block_indexes is empty)")
        return full[-1]
    if (
        isinstance(layer, bool)
        or not isinstance(layer, int)
        or not -depth <= layer < depth
        or layer % depth not in full
    ):
        raise ValueError(f"the score layer must be a full-attention block, one of {full}, got {layer!r}")
    return layer % depth


def qwen_serving(hf_config: Any) -> QwenServing:
    """Resolve :class:`QwenServing` from a Qwen-VL hf config carrying ``anchor_former`` settings.

    Raises:
        ValueError: missing settings, another connector or score, a bad budget or score layer.
    """
    record = anchor_record(hf_config)
    if record["connector"] != "select" or record.get("score", "received") != "received":
        raise ValueError(
            "Qwen-VL serves the training-free selection only (connector='select', score='received'), got "
            f"connector={record['connector']!r}, score={record.get('score')!r}"
        )
    budget = _check_budget("num_anchors", record["connector_config"].get("num_anchors"))
    block_size = int(record.get("block_size") or DEFAULT_BLOCK_SIZE)
    vision = hf_config.vision_config
    return QwenServing(
        num_anchors=budget,
        layer=_score_layer(vision, record.get("layer")),
        block_size=block_size,
        merge=int(vision.spatial_merge_size),
    )


class QwenAnchorProcessingInfo:
    """Processing-info mixin (before vLLM's Qwen processing info in the bases): images only; the engine
    profiles for the stock (full) token count, the most a budget can keep."""

    if TYPE_CHECKING:  # what vLLM's processing info supplies
        ctx: Any

        def get_hf_config(self) -> Any: ...
        def get_max_image_tokens(self) -> int: ...

    def serving(self) -> QwenServing:
        return qwen_serving(self.get_hf_config())

    def budget(self, mm_kwargs: Mapping[str, object]) -> Budget:
        return self.serving().budget(self.ctx.get_merged_mm_kwargs(mm_kwargs))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}


def _without_budget(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k not in BUDGET_KEYS}


class QwenAnchorProcessor:
    """Processor mixin (before vLLM's Qwen processor in the bases): ``kept`` placeholders per image and the
    per-image ``anchor_tokens`` field."""

    info: Any

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        return super()._call_hf_processor(hf_data, _without_budget(hf_kwargs))  # type: ignore[misc]

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        """Adds ``anchor_tokens`` ``(num_images, 2)``: each image's kept tokens and placeholders, at the request's budget."""
        out = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)  # type: ignore[misc]
        grids = out.get("image_grid_thw")
        if grids is not None:
            serving, budget = self.info.serving(), self.info.budget(hf_processor_mm_kwargs)
            counts = [serving.kept(budget, grid.tolist()) for grid in grids]
            out[FIELD] = torch.tensor([[c, c] for c in counts], dtype=torch.int64)  # (num_images, 2)
        return out

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, _without_budget(hf_processor_mm_kwargs)),  # type: ignore[misc]
            FIELD: MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any):
        from vllm.multimodal.processing import PromptReplacement

        info: Any = self.info
        serving, budget = info.serving(), info.budget(hf_processor_mm_kwargs)
        processor = info.get_hf_processor(**_without_budget(hf_processor_mm_kwargs))
        pad = info.get_tokenizer().get_vocab()[processor.image_token]

        def replacement(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [pad] * serving.kept(budget, grid.tolist())

        return [PromptReplacement(modality="image", target=[pad], replacement=replacement)]


def _position_channels(rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(T, 4)`` the kept cells' (row, column) as base-256 digits: ``[row // 256, row % 256, col // 256, col % 256]``."""
    cells = torch.stack([rows // _DIGIT, rows % _DIGIT, cols // _DIGIT, cols % _DIGIT], dim=1)
    return cells.to(dtype)


def _cells(channels: torch.Tensor) -> torch.Tensor:
    """``(T, 4)`` position channels back to ``(2, T)`` int64 (row, column)."""
    digits = channels.float().round().long()  # (T, 4)
    return torch.stack([digits[:, 0] * _DIGIT + digits[:, 1], digits[:, 2] * _DIGIT + digits[:, 3]])


class QwenAnchorModel:
    """Model mixin (before vLLM's Qwen-VL model class in the bases): K merged tokens per image at their
    original positions (see the module doc)."""

    #: asks vLLM's runner for the post-encoder position rewrite (:mod:`anchor_former.vllm._runner`)
    positions_after_encoder: ClassVar[bool] = True

    if TYPE_CHECKING:  # what vLLM's Qwen-VL model class supplies
        config: Any
        visual: Any
        is_multimodal_pruning_enabled: bool

        def _parse_and_validate_image_input(self, **kwargs: object) -> Any: ...

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:  # vLLM reads these two names
        serving = qwen_serving(vllm_config.model_config.hf_config)  # settings checked before any weight exists
        if vllm_config.use_v2_model_runner:
            raise ValueError(
                f"{type(self).__name__} needs vLLM's V1 model runner (its post-encoder M-RoPE rewrite is enabled "
                "there by the plugin), got the V2 runner; set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.serving = serving
        # the embeddings carry position channels: keep them off vLLM's encoder CUDA-graph path, as with EVS
        self.is_multimodal_pruning_enabled = True

    # --- positions ------------------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """Admission positions ``(3, S)`` and the decode delta: text as in the stock model (final), each
        image's placeholders at the image's start position (moved to their cells after the encoder).

        A full image of merged grid (h', w') starting at position ``s`` spans ``s .. s + max(h', w') - 1``;
        the text after it starts at ``s + max(h', w')`` however many of its tokens are kept."""
        pieces: list[np.ndarray] = []
        current = 0  # the next text position
        done = 0  # tokens placed so far
        merge = int(self.config.vision_config.spatial_merge_size)
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"{type(self).__name__} serves images only, got a {feature.modality!r} input")
            offset, length = feature.mm_position.offset, feature.mm_position.length
            t, h, w = (int(v) for v in feature.data["image_grid_thw"].data.tolist())
            text = offset - done
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + current)
            current += text
            pieces.append(np.full((3, length), current, dtype=np.int64))
            current += max(t, h // merge, w // merge)
            done = offset + length
        text = len(input_tokens) - done
        if not text:
            raise ValueError(
                "the prompt must not end with an image placeholder (Qwen's placeholder text is "
                "'<|vision_start|><|image_pad|><|vision_end|>'), got a prompt whose last token is an image token"
            )
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + current)
        positions = np.concatenate(pieces, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(current + text - len(input_tokens))

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Move the placeholders of one prefill chunk to their kept cells; strip the position channels.

        Args:
            input_ids: ``(S,)`` the request's prompt.
            multimodal_embeddings: the chunk's image embeddings, in prompt order, each ``(T_j, D + 4)``: the
                rows of the image placeholders at and after ``num_computed_tokens``, in order.
            mrope_positions: ``(3, S)`` the request's positions (admission, or rewritten by earlier chunks).
            num_computed_tokens: prompt tokens computed before this chunk.

        Returns:
            ``(embeddings (T_j, D) each, (3, S) positions, decode delta)``; the delta is the admission one
            (text positions never move).
        """
        ids = torch.as_tensor(input_ids, device=mrope_positions.device).long()
        pads = torch.nonzero(ids == int(self.config.image_token_id)).flatten()
        pads = pads[pads >= num_computed_tokens]
        channels = [e[:, -POSITION_CHANNELS:] for e in multimodal_embeddings]
        count = sum(c.shape[0] for c in channels)
        if count > pads.numel():
            raise ValueError(
                f"the chunk carries {count} image embeddings but the prompt has {pads.numel()} image placeholders "
                f"from token {num_computed_tokens} on"
            )
        positions = mrope_positions.clone()
        if count:
            where = pads[:count]
            cells = torch.cat([_cells(c) for c in channels], dim=1).to(positions.device)  # (2, count)
            start = positions[0, where]  # the image's start: placeholders keep it in the temporal channel
            positions[1, where] = start + cells[0]
            positions[2, where] = start + cells[1]
        delta = int(positions[0, -1]) + 1 - positions.shape[1]  # the last token is text (checked at admission)
        return [e[:, :-POSITION_CHANNELS] for e in multimodal_embeddings], positions, delta

    # --- embeddings ---------------------------------------------------------------------------------------

    def _merged_scores(self, pixel_values: torch.Tensor, grid: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One tower forward with the score hook: ``(sum n_i, W)`` merged tokens (W = llm_dim, times
        1 + deepstack levels for Qwen3-VL) and ``(sum n_i,)`` float32 scores, both in the merger's output order
        (raster order per image)."""
        visual = self.visual
        metadata = visual.prepare_encoder_metadata(grid)
        attention = visual.blocks[self.serving.layer].attn
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["x"]
            captured.append(
                self._received(
                    module, hidden, kwargs["cu_seqlens"], kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]
                )
            )

        handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            merged = visual(pixel_values, grid_thw=grid, encoder_metadata=metadata)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the score block ran {len(captured)} times in one tower forward, expected once")
        unit = visual.spatial_merge_unit
        scores = captured[0].view(-1, unit).sum(-1)  # (sum n_i,) the tower's order
        reverse = metadata.get("reverse_indices")  # Qwen2.5-VL's tower runs in window order: undo it
        return merged, scores if reverse is None else scores[reverse.to(scores.device)]

    def _received(
        self, attention: Any, hidden: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """``(L,)`` float32 received attention per patch (heads averaged) of the block's input ``hidden`` ``(L, 1, C)``."""
        local, head_dim = (
            int(attention.num_attention_heads_per_partition),
            int(attention.hidden_size_per_attention_head),
        )
        with torch.no_grad():
            qkv, _ = attention.qkv(hidden)  # (L, 1, 3 * H_r * E): [q | k | v] of this rank's heads
            length = qkv.shape[0]
            qk = qkv.view(length, 3, local, head_dim)[:, :2].permute(1, 0, 2, 3).contiguous()  # (2, L, H_r, E)
            qk = attention.apply_rotary_emb(qk, cos, sin)  # as the layer rotates them
            q, k = qk[0].transpose(0, 1), qk[1].transpose(0, 1)  # (H_r, L, E)
            bounds = [int(b) for b in cu_seqlens.tolist()]
            per_head = torch.cat(
                [
                    received_attention(
                        q[None, :, a:b], k[None, :, a:b], scale=head_dim**-0.5, block_size=self.serving.block_size
                    )[0]
                    for a, b in zip(bounds[:-1], bounds[1:])
                    if b > a
                ],
                dim=1,
            )  # (H_r, L)
        heads = gather_heads(per_head, local_heads=local, total_heads=int(self.visual.num_heads), dim=0)  # (H, L)
        return heads.mean(0)

    def embed_multimodal(self, **kwargs: object) -> Sequence[torch.Tensor]:
        """Per image ``(T_i, W + 4)``: the kept merged tokens and their cells' position channels,
        checked against the image's placeholders."""
        rows = field_rows(kwargs.pop(FIELD, None))
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError(f"{type(self).__name__} serves images only, got video inputs")
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("AnchorFormer serving needs pixel inputs (image embeddings carry no attention scores)")
        grid_thw = image_input["image_grid_thw"]
        grid = [[int(v) for v in g] for g in grid_thw.tolist()]
        if len(rows) != len(grid):
            raise ValueError(f"{FIELD} must hold one row per image ({len(grid)}), got {len(rows)}")
        merged, scores = self._merged_scores(image_input["pixel_values"], grid)
        merge = self.serving.merge
        sizes = [t * (h // merge) * (w // merge) for t, h, w in grid]
        embeds = []
        for tokens, score, (_, _, w), (kept, _) in zip(merged.split(sizes), scores.split(sizes), grid, rows):
            if not 1 <= kept <= tokens.shape[0]:
                raise ValueError(f"{FIELD}: an image of {tokens.shape[0]} merged tokens cannot keep {kept}")
            index = torch.argsort(score, descending=True, stable=True)[:kept].sort().values  # (T,) raster order
            width = w // merge  # merged tokens per row; an image is one temporal step (t = 1)
            channels = _position_channels(index // width, index % width, tokens.dtype)
            embeds.append(torch.cat([tokens[index], channels.to(tokens.device)], dim=1))  # (T, W + 4)
        check_counts(embeds, [placeholders for _, placeholders in rows])
        return embeds
