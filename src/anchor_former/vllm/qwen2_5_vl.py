"""vLLM's Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) keeping K merged visual tokens per image at their
original M-RoPE positions: architecture ``AnchorFormerQwen2_5_VLForConditionalGeneration``.

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
  order (ties: the earlier token).
* **Positions**: a kept token keeps the (t, h, w) M-RoPE position its grid cell has in the stock model,
  and text after an image continues where the full image would have ended. The admission positions
  (:meth:`~AnchorFormerQwen2_5_VLForConditionalGeneration.get_mrope_input_positions`) are final for text
  (they depend only on the grid) and put every placeholder of an image at the image's start position;
  after the encoder, each kept token's cell travels with its embedding as :data:`POSITION_CHANNELS`
  extra channels and :meth:`~AnchorFormerQwen2_5_VLForConditionalGeneration.recompute_mrope_positions`
  (called by vLLM's runner per prefill chunk, see :mod:`anchor_former.vllm._runner`) moves exactly the
  placeholders of that chunk to ``start + (0, row, column)``, then drops the channels. The rewrite reads
  only the unchanged temporal channel, so running it twice on a chunk gives the same positions.
* **Count guard**: each image's embeddings are checked against its placeholders
  (:mod:`anchor_former.vllm._guard`).

Images only: video inputs are not accepted by this architecture (``limit_mm_per_prompt`` has no
``"video"``). Settings come from ``config.anchor_former`` (:func:`anchor_former.vllm.hf_overrides` with
``family="qwen2_5_vl"``, or a folder saved by the transformers adapter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from anchor_former._optional import require

require("vllm", extra="vllm", feature="anchor_former.vllm (the vLLM plugin's model classes)")

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from anchor_former.probes.scores import DEFAULT_BLOCK_SIZE, received_attention
from anchor_former.vllm._guard import check_counts
from anchor_former.vllm._settings import BUDGET_KEYS, anchor_record, field_rows
from anchor_former.vllm._tp import gather_heads

__all__ = [
    "POSITION_CHANNELS",
    "AnchorFormerQwen2_5_VLForConditionalGeneration",
    "AnchorFormerQwen2_5_VLMultiModalProcessor",
    "AnchorFormerQwen2_5_VLProcessingInfo",
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
    """What a served Qwen2.5-VL model does, resolved from its hf config.

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
                f"mm_processor_kwargs['num_context'] is not supported by Qwen2.5-VL (no context tokens), got "
                f"{kwargs['num_context']!r}"
            )
        value = kwargs.get("num_anchors")
        return self.num_anchors if value is None else _check_budget("mm_processor_kwargs['num_anchors']", value)

    def kept(self, budget: Budget, grid_thw: Sequence[int]) -> int:
        """Placeholders of an image of patch grid ``(t, h, w)`` at ``budget``."""
        t, h, w = (int(v) for v in grid_thw)
        return t * kept_tokens(budget, (h // self.merge) * (w // self.merge), what=f"an image of grid {(t, h, w)}")


def _score_layer(vision_config: Any, layer: Any) -> int:
    full = sorted(int(i) for i in vision_config.fullatt_block_indexes)
    depth = int(vision_config.depth)
    if layer is None:
        if not full:
            raise ValueError("the vision config has no full-attention block (fullatt_block_indexes is empty)")
        return full[-1]
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth or layer % depth not in full:
        raise ValueError(f"the score layer must be a full-attention block, one of {full}, got {layer!r}")
    return layer % depth


def qwen_serving(hf_config: Any) -> QwenServing:
    """Resolve :class:`QwenServing` from a Qwen2.5-VL hf config carrying ``anchor_former`` settings.

    Raises:
        ValueError: missing settings, another connector or score, a bad budget or score layer.
    """
    record = anchor_record(hf_config)
    if record["connector"] != "select" or record.get("score", "received") != "received":
        raise ValueError(
            "Qwen2.5-VL serves the training-free selection only (connector='select', score='received'), got "
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


class AnchorFormerQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Images only; the engine profiles for the stock (full) token count, the most a budget can keep."""

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


class AnchorFormerQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor writing ``kept`` placeholders per image and the per-image ``anchor_tokens`` field."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        info: Any = self.info
        serving, budget = info.serving(), info.budget(hf_kwargs)
        out = super()._call_hf_processor(hf_data, _without_budget(hf_kwargs))
        grids = out.get("image_grid_thw")
        if grids is not None:
            counts = [serving.kept(budget, grid.tolist()) for grid in grids]
            out[FIELD] = torch.tensor([[c, c] for c in counts], dtype=torch.int64)  # (num_images, 2)
        return out

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, _without_budget(hf_processor_mm_kwargs)),
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


@MULTIMODAL_REGISTRY.register_processor(
    AnchorFormerQwen2_5_VLMultiModalProcessor,
    info=AnchorFormerQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class AnchorFormerQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL serving K merged tokens per image at their original positions (see the module doc)."""

    #: asks vLLM's runner for the post-encoder position rewrite (:mod:`anchor_former.vllm._runner`)
    positions_after_encoder: ClassVar[bool] = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        serving = qwen_serving(vllm_config.model_config.hf_config)  # settings checked before any weight exists
        if vllm_config.use_v2_model_runner:
            raise ValueError(
                "AnchorFormerQwen2_5_VLForConditionalGeneration needs vLLM's V1 model runner (its post-encoder "
                "M-RoPE rewrite is enabled there by the plugin), got the V2 runner; set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
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
        for offset, t, h, w, _ in self.iter_mm_grid_thw(mm_features):
            text = offset - done
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + current)
            current += text
            length = next(f.mm_position.length for f in mm_features if f.mm_position.offset == offset)
            pieces.append(np.full((3, length), current, dtype=np.int64))
            current += max(t, h, w)
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
        """One tower forward with the score hook: ``(sum n_i, llm_dim)`` merged tokens and ``(sum n_i,)`` float32
        scores, both in the merger's output order (raster order per image)."""
        visual = self.visual
        metadata = visual.prepare_encoder_metadata(grid)
        attention = visual.blocks[self.serving.layer].attn
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["x"]
            captured.append(
                self._received(module, hidden, kwargs["cu_seqlens"], kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"])
            )

        handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            merged = visual(pixel_values, grid_thw=grid, encoder_metadata=metadata)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the score block ran {len(captured)} times in one tower forward, expected once")
        unit = visual.spatial_merge_unit
        scores = captured[0].view(-1, unit).sum(-1)  # (sum n_i,) the tower's window order
        return merged, scores[metadata["reverse_indices"].to(scores.device)]

    def _received(
        self, attention: Any, hidden: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """``(L,)`` float32 received attention per patch (heads averaged) of the block's input ``hidden`` ``(L, 1, C)``."""
        local, head_dim = int(attention.num_attention_heads_per_partition), int(attention.hidden_size_per_attention_head)
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
        """Per image ``(T_i, llm_dim + 4)``: the kept merged tokens and their cells' position channels,
        checked against the image's placeholders."""
        rows = field_rows(kwargs.pop(FIELD, None))
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError("AnchorFormer's Qwen2.5-VL serves images only, got video inputs")
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
        for tokens, score, (t, h, w), (kept, _) in zip(merged.split(sizes), scores.split(sizes), grid, rows):
            if not 1 <= kept <= tokens.shape[0]:
                raise ValueError(f"{FIELD}: an image of {tokens.shape[0]} merged tokens cannot keep {kept}")
            index = torch.argsort(score, descending=True, stable=True)[:kept].sort().values  # (T,) raster order
            cell = index % ((h // merge) * (w // merge))  # images have t = 1
            channels = _position_channels(cell // (w // merge), cell % (w // merge), tokens.dtype)
            embeds.append(torch.cat([tokens[index], channels.to(tokens.device)], dim=1))  # (T, llm_dim + 4)
        check_counts(embeds, [placeholders for _, placeholders in rows])
        return embeds
