"""transformers' ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision: SigLIP, anyres images, video;
transformers >= 5.0).

:func:`attach_anchor_former` (also reached through
:func:`~anchor_former.adapters.transformers.attach_anchor_former`, which detects the model class) turns a built
``LlavaOnevisionForConditionalGeneration`` and its ``LlavaOnevisionProcessor`` into
:class:`AnchorFormerLlavaOnevisionForConditionalGeneration` / :class:`AnchorFormerLlavaOnevisionProcessor` in
place. The tower is SigLIP: no [CLS] token, so the anchor score is ``"received"`` by default (the attention
each patch receives from all queries of ``vision_feature_layer``, per head, computed blockwise by the probe;
``"norm"`` also works; ``"cls"`` is refused with that advice).

**Images** are LLaVA-NeXT's anyres views (:mod:`anchor_former.views`, the same code as the LLaVA-NeXT
adapter): the base view, then the crops of the chosen pinpoint. Two things differ from LLaVA-NeXT, and the
adapter reproduces both:

* ``anyres_max_N`` (``config.vision_aspect_ratio``): when the unpadded high-resolution grid holds more than
  about ``1.21 N`` views' patches, the stock model shrinks it bilinearly (after its projector) to
  ``(int(h / r), int(w / r))``, ``r = sqrt(h w / (N s^2))``. With ``connector="select"`` the adapter then
  does exactly the same to the projected crop tokens AND to the crops' score maps (the same bilinear
  weights), and picks the high-resolution anchors among the cells of the shrunk grid, ``k_hi =
  ceil(sum_{v>=1} k_v * cells / sum_{v>=1} c_v)`` of them (the crops' budgets scaled by the shrink); each
  kept grid row is still closed by ``image_newline``. Images the model does not shrink are laid out
  exactly as in the LLaVA-NeXT adapter (anchors per view among its unpadded patches).
* multi-image samples (``batch_num_images > 1``): each image is its base view only, then one
  ``image_newline``; ``"select"`` keeps ``k_0 = min(K or B, s * s)`` base-view anchors (the whole
  budget: there is no other view).

Token layout (``select``; ``k_v`` anchors in view v, ``G`` kept grid rows)::

    single image:  [base: k_0 anchors] [row 1 anchors][NL] ... [row G anchors][NL]
    multi-image:   [base: k_0 anchors][NL]

and for the fixed-size connectors (AcFormer: ``T = K`` per view on SigLIP, ``K + 1`` with a [CLS] query)
the LLaVA-NeXT layout (base view's ``T``, then each row of crops followed by one ``image_newline``; no
shrinking: there is no patch grid left to shrink), or ``[base: T][NL]`` in multi-image samples.

**Video**: every frame is one base view. The stock model projects all ``s x s`` tokens of each frame,
pools them 2x2 (bilinear to ``ceil(s/2) x ceil(s/2)``), concatenates the frames and appends ONE
``image_newline``. ``connector="select"`` chooses ``frame_anchors`` (K per frame, the same for every frame)
**after** that pooling, among the pooled tokens, scored by the same bilinear pooling applied to the frame's
score map: the pooled tokens are what the LLM sees, and only a choice among them makes K = every pooled token
reproduce the stock model exactly (anchors chosen before pooling would be either pooled again, mixing
dropped neighbours back in, or fed unpooled, which at full budget is 4x the stock tokens). The trained
connectors (AcFormer) read each frame's unpooled tokens instead (their queries are ViT anchors and their
keys every token; pooling first would only blur the anchors) and give ``T`` tokens per frame (``K`` for
AcFormer on SigLIP)::

    video (select):    [frame 1: K][frame 2: K] ... [frame F: K][NL]
    video (acformer):  [frame 1: T] ... [frame F: T][NL]

The processor writes exactly these counts (it calls :func:`image_token_count` / :func:`video_token_count`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, cast

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from anchor_former.adapters._host import Plan, attach
from anchor_former.adapters.hf.llava import (
    probed_features,
    recorded_connector,
    run_connector,
)
from anchor_former.adapters.hf.llava_next import (
    LlavaNextHost,
    anyres_token_count,
    concat_views,
    image_sizes_list,
    views_of,
)
from anchor_former.adapters.hf.llava_next import budgets_of as _budgets
from anchor_former.adapters.settings import AnchorSettings
from anchor_former.probes import EncoderSpec, Score
from anchor_former.search import anchor_search
from anchor_former.views import AnyresViews, arrange_fixed, num_selected_tokens, select_view_tokens

__all__ = [
    "AnchorFormerLlavaOnevisionConfig",
    "AnchorFormerLlavaOnevisionForConditionalGeneration",
    "AnchorFormerLlavaOnevisionModel",
    "AnchorFormerLlavaOnevisionProcessor",
    "attach_anchor_former",
    "register_auto_classes",
]


def _max_views(vision_aspect_ratio: str) -> int:
    """``N`` of ``"anyres_max_N"`` (parsed as transformers does)."""
    return int(str(vision_aspect_ratio).removeprefix("anyres_max_"))


def shrunk_grid(views: AnyresViews, vision_aspect_ratio: str) -> tuple[int, int] | None:
    """``(h', w')`` the stock model shrinks the unpadded ``h x w`` patch grid to, or None if it keeps it.

    ``r = sqrt(h w / (N s^2))`` for ``"anyres_max_N"``; shrunk when ``r > 1.1``, to ``(int(h // r), int(w // r))``.
    """
    h, w = views.rows[1] - views.rows[0], views.cols[1] - views.cols[0]
    ratio = math.sqrt(h * w / (_max_views(vision_aspect_ratio) * views.side**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return None


def _high_budget(budgets: tuple[int, ...], views: AnyresViews, cells: int) -> int:
    """Anchors among the ``cells`` of a shrunk grid: the crops' budgets scaled by the shrink (all at full budget)."""
    kept, candidates = sum(budgets[1:]), sum(views.num_candidates()[1:])
    return min(cells, -(-kept * cells // candidates))


def _base_budget(tokens: dict[str, Any], views: AnyresViews) -> int:
    """``k_0`` of an image of a multi-image sample (its base view is its only view): the whole budget, capped."""
    budget = tokens["num_anchors"] if tokens.get("image_budget") is None else tokens["image_budget"]
    return min(int(budget), views.side**2)


def image_token_count(
    tokens: dict[str, Any], views: AnyresViews, *, vision_aspect_ratio: str, multi_image: bool
) -> int:
    """LLM tokens of one image under ``tokens`` (``AnchorSettings.extras["anyres"]``, see the module doc).

    ``multi_image``: the image belongs to a sample with several images (base view only, then a newline).
    """
    if multi_image:
        if tokens["layout"] == "selected":
            return _base_budget(tokens, views) + 1
        return int(tokens["tokens_per_view"]) + 1
    if tokens["layout"] == "selected":
        return selected_token_count(views, _budgets(tokens, views), vision_aspect_ratio=vision_aspect_ratio)
    return anyres_token_count(tokens, views)


def selected_token_count(views: AnyresViews, budgets: tuple[int, ...], *, vision_aspect_ratio: str) -> int:
    """LLM tokens of one image alone in its sample under ``"select"`` with view budgets ``budgets``
    (:func:`select_image_tokens` gives exactly these)."""
    shrunk = shrunk_grid(views, vision_aspect_ratio)
    if shrunk is None:
        return num_selected_tokens(views, budgets)
    return budgets[0] + _high_budget(budgets, views, shrunk[0] * shrunk[1]) + shrunk[0]


def select_image_tokens(
    views: AnyresViews,
    budgets: tuple[int, ...],
    features: torch.Tensor,
    scores: torch.Tensor,
    *,
    vision_aspect_ratio: str,
    prefix: int,
    projector: nn.Module,
    newline: torch.Tensor,
) -> torch.Tensor:
    """One image alone in its sample under ``"select"``: ``(selected_token_count(...), llm_dim)`` tokens.

    Args:
        views: the image's views; ``budgets``: ``k_v`` per view.
        features: ``(V, N, D)`` the views' tokens of ``vision_feature_layer`` (``prefix`` leading non-patch tokens).
        scores: ``(V, H, N)`` attention scores or ``(V, N)`` per-token scores of the same layer.
        vision_aspect_ratio: ``"anyres_max_N"``: the grid is shrunk as the stock model shrinks it
            (:func:`shrunk_grid`), else laid out as LLaVA-NeXT's (:func:`~anchor_former.views.select_view_tokens`).
        projector: the checkpoint's projector; ``newline``: ``(llm_dim,)`` ``image_newline``.
    """
    shrunk = shrunk_grid(views, vision_aspect_ratio)
    if shrunk is None:
        return select_view_tokens(
            views, budgets, features, scores, num_prefix_tokens=prefix, projector=projector, newline=newline
        )
    return _select_shrunk(views, budgets, features, scores, shrunk, prefix=prefix, projector=projector, newline=newline)


def video_token_count(video: dict[str, Any], num_frames: int) -> int:
    """LLM tokens of a video of ``num_frames`` frames under ``video`` (``AnchorSettings.extras["video"]``):
    ``F * K + 1`` (``select``) or ``F * T + 1``; raises ``ValueError`` for ``num_frames < 1``."""
    if num_frames < 1:
        raise ValueError(f"a video must have at least one frame, got num_frames={num_frames}")
    return num_frames * int(video["tokens_per_frame"]) + 1


def _search(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` ascending indices of the anchors in ``scores`` ``(B, H, n)``; all of them when ``k = n``."""
    b, _, n = scores.shape
    if k >= n:
        return torch.arange(n, device=scores.device).expand(b, n)
    return anchor_search(scores, k, include_cls=False, num_prefix_tokens=0)


def _grid_scores(scores: torch.Tensor, prefix: int) -> torch.Tensor:
    """``(V, H, P)`` patch scores from ``(V, H, N)`` attention or ``(V, N)`` norms (prefix tokens dropped)."""
    scores = scores if scores.ndim == 3 else scores[:, None]
    return scores[..., prefix:].float()


def _select_shrunk(
    views: AnyresViews,
    budgets: tuple[int, ...],
    features: torch.Tensor,
    scores: torch.Tensor,
    shrunk: tuple[int, int],
    *,
    prefix: int,
    projector: nn.Module,
    newline: torch.Tensor,
) -> torch.Tensor:
    """One image whose high-resolution grid the stock model shrinks: ``(k_0 + k_hi + h', llm_dim)``.

    The base view's ``k_0`` anchors (raster order), then the ``k_hi`` anchors among the shrunk grid's cells,
    row by row, each kept row closed by ``newline``. Crop tokens and crop scores go through the stock
    model's own steps: projector, crop grid, unpadding, bilinear shrink.
    """
    s, (r, c), (h, w) = views.side, views.grid, shrunk
    (top, bottom), (left, right) = views.rows, views.cols
    patch_scores = _grid_scores(scores, prefix)  # (V, H, P)
    base = _search(patch_scores[:1], budgets[0])[0]  # (k_0,)
    base_tokens = projector(features[0, prefix + base])  # (k_0, L)

    def shrink(x: torch.Tensor) -> torch.Tensor:  # (V - 1, P, X) crops -> (X, h * w) shrunk grid cells
        grid = x.reshape(r, c, s, s, -1).permute(4, 0, 2, 1, 3).reshape(x.shape[-1], r * s, c * s)
        grid = grid[:, top:bottom, left:right]
        return nn.functional.interpolate(grid[None], [h, w], mode="bilinear")[0].flatten(1)

    cells = shrink(projector(features[1:, prefix:]))  # (L, h * w), as the stock model computes it
    cell_scores = shrink(patch_scores[1:].transpose(1, 2))  # (H, h * w)
    kept = _search(cell_scores[None], _high_budget(budgets, views, h * w))[0]  # (k_hi,) ascending
    keys = torch.cat([kept // w * (w + 1) + kept % w, torch.arange(h, device=kept.device) * (w + 1) + w])
    high = torch.cat([cells.T[kept], newline.to(cells.dtype).expand(h, -1)])[keys.argsort()]
    return torch.cat([base_tokens, high])


def select_pooled_tokens(pooled: torch.Tensor, pooled_scores: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Each video frame's ``tokens_per_frame`` anchors among its pooled tokens, in raster order.

    Args:
        pooled: ``(F, n', L)`` the frames' projected tokens after the stock 2x2 pooling.
        pooled_scores: ``(F, H, n')`` the frames' scores after the same pooling.
        tokens_per_frame: K (all ``n'`` tokens, in order, when ``K >= n'``).

    Returns:
        ``(F, min(K, n'), L)``.
    """
    kept = _search(pooled_scores, tokens_per_frame)  # (F, K) ascending
    return pooled.gather(1, kept[..., None].expand(-1, -1, pooled.shape[-1]))


@strict
class AnchorFormerLlavaOnevisionConfig(LlavaOnevisionConfig):
    """``LlavaOnevisionConfig`` plus ``anchor_former``: ``{"connector": name, "score": ..., "connector_config":
    {...}, "anyres": {...}, "video": {"tokens_per_frame": T, ...}}`` (see :func:`image_token_count`,
    :func:`video_token_count`)."""

    model_type = "anchor_former_llava_onevision"

    anchor_former: dict | None = None


class AnchorFormerLlavaOnevisionModel(LlavaOnevisionModel):
    """``LlavaOnevisionModel`` whose projector is a connector fed per view / per frame by a probe."""

    config_class = AnchorFormerLlavaOnevisionConfig
    config: AnchorFormerLlavaOnevisionConfig

    def __init__(self, config: AnchorFormerLlavaOnevisionConfig) -> None:
        super().__init__(config)
        self.multi_modal_projector = recorded_connector(config)  # type: ignore[assignment]  # a connector

    _probed = probed_features

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Vision tower over all views (one forward) + probe + connector, laid out per image (module doc).

        Args:
            pixel_values: ``(B, V_max, C, H_img, W_img)`` views per image (zero-padded), or ``(sum V_i, C, H_img,
                W_img)`` already concatenated.
            image_sizes: ``(B, 2)`` original ``(height, width)`` of each image.
            vision_feature_layer: ``hidden_states`` index the connector reads (default: the config's).
            vision_feature_select_strategy: ignored (checked at attach time).
            vision_aspect_ratio: ``"anyres_max_N"`` (default: the config's).
            batch_num_images: ``(num_samples,)`` images per sample; images of samples with several get their
                base view only (None: every image is alone in its sample).

        Returns:
            The tower's output with ``pooler_output`` = a list of B tensors ``(T_i, llm_dim)``, T_i from
            :func:`image_token_count`.
        """
        aspect = vision_aspect_ratio or self.config.vision_aspect_ratio
        views = [views_of(self.config, size) for size in image_sizes_list(image_sizes)]
        if batch_num_images is None:
            multi = [False] * len(views)
        else:
            multi = [int(n) != 1 for n in batch_num_images for _ in range(int(n))]
        counts = [1 if m else v.num_views for v, m in zip(views, multi)]
        output, features, scores = self._probed(concat_views(pixel_values, counts), vision_feature_layer, **kwargs)
        tokens = cast("dict[str, Any]", self.config.anchor_former)["extras"]["anyres"]
        connector: Any = self.multi_modal_projector  # the recorded connector
        prefix = int(connector.num_prefix_tokens) if hasattr(connector, "num_prefix_tokens") else 0
        newline = self.image_newline
        images, start = [], 0
        for image_views, n, alone in zip(views, counts, (not m for m in multi)):
            f, sc = features[start : start + n], scores[start : start + n]  # (V, N, D), (V, H, N) or (V, N)
            start += n
            if tokens["layout"] != "selected":
                out, _ = run_connector(connector, f, sc)
                images.append(arrange_fixed(image_views, out, newline) if alone else torch.cat([out[0], newline[None]]))
                continue
            if not alone:  # a multi-image sample: the base view takes the whole budget
                kept = _search(_grid_scores(sc, prefix), _base_budget(tokens, image_views))[0]  # (k_0,)
                images.append(torch.cat([connector.projector(f[0, prefix + kept]), newline[None].to(f.dtype)]))
                continue
            images.append(
                select_image_tokens(
                    image_views,
                    _budgets(tokens, image_views),
                    f,
                    sc,
                    vision_aspect_ratio=aspect,
                    prefix=prefix,
                    projector=connector.projector,
                    newline=newline,
                )
            )
        output.pooler_output = images
        return output

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Tower over every frame (one forward) + probe + per-frame anchors (module doc).

        Args:
            pixel_values_videos: ``(B, F, C, H_img, W_img)`` ``F >= 1`` frames per video.
            vision_feature_layer: ``hidden_states`` index the connector reads (default: the config's).
            vision_feature_select_strategy: ignored (checked at attach time).

        Returns:
            The tower's output with ``pooler_output`` ``(B, F * T + 1, llm_dim)``: T tokens per frame (``K``
            pooled-token anchors for ``select``), then one ``image_newline``.

        Raises:
            ValueError: ``pixel_values_videos`` not 5-dimensional or with zero frames (nothing is run).
        """
        if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[1] < 1:
            raise ValueError(
                "pixel_values_videos must have shape (B, F, C, H, W) with F >= 1 frames, got shape "
                f"{tuple(pixel_values_videos.shape)}"
            )
        b, frames = pixel_values_videos.shape[:2]
        output, features, scores = self._probed(pixel_values_videos.flatten(0, 1), vision_feature_layer, **kwargs)
        connector: Any = self.multi_modal_projector  # the recorded connector
        video = cast("dict[str, Any]", self.config.anchor_former)["extras"]["video"]
        if video["layout"] == "selected":
            prefix = int(connector.num_prefix_tokens)
            pooled = self.apply_pooling(connector.projector(features[:, prefix:]))  # (B F, n', L), the stock pooling
            pooled_scores = self.apply_pooling(_grid_scores(scores, prefix).transpose(1, 2)).transpose(1, 2)
            out = select_pooled_tokens(pooled, pooled_scores, int(video["tokens_per_frame"]))  # (B F, K, L)
        else:
            out, _ = run_connector(connector, features, scores)  # (B F, T, L)
        out = out.reshape(b, frames * out.shape[1], -1)  # (B, F T, L)
        newline = self.image_newline[None, None, :].expand(b, 1, -1).to(out.device, out.dtype)
        output.pooler_output = torch.cat([out, newline], dim=1)
        return output


class AnchorFormerLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """``LlavaOnevisionForConditionalGeneration`` with an :class:`AnchorFormerLlavaOnevisionModel` inside."""

    config_class = AnchorFormerLlavaOnevisionConfig
    config: AnchorFormerLlavaOnevisionConfig

    def __init__(self, config: AnchorFormerLlavaOnevisionConfig) -> None:
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = AnchorFormerLlavaOnevisionModel(config)
        text: Any = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()


class AnchorFormerLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` writing the attached model's ``<image>`` / ``<video>`` token counts.

    ``anyres_tokens`` / ``video_tokens``: the model's ``AnchorSettings.extras["anyres"]`` / ``["video"]``
    (saved in ``processor_config.json``); None = the stock counts.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        video_processor: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        anyres_tokens: dict | None = None,
        video_tokens: dict | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor,
            tokenizer,
            video_processor,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )
        self.anyres_tokens = anyres_tokens
        self.video_tokens = video_tokens

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        if not self.anyres_tokens:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        sizes = [int(n) for n in image_inputs["batch_num_images"]]
        multi = [n != 1 for n in sizes for _ in range(n)][image_idx]
        size = image_inputs["image_sizes"][image_idx]
        size = size.tolist() if hasattr(size, "tolist") else list(size)
        view = int(image_inputs["pixel_values"][0][0].shape[-1])
        views = _anyres(size, self.image_processor.image_grid_pinpoints, view, self.num_image_tokens)
        count = image_token_count(
            self.anyres_tokens, views, vision_aspect_ratio=self.vision_aspect_ratio, multi_image=multi
        )
        return self.image_token * count

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        frames = video_inputs["pixel_values_videos"][video_idx]
        num_frames = len(frames) if isinstance(frames, (list, tuple)) else frames.shape[0]
        if not self.video_tokens:
            if num_frames < 1:
                raise ValueError(f"a video must have at least one frame, got num_frames={num_frames}")
            return super().replace_video_token(video_inputs, video_idx, **kwargs)
        return self.video_token * video_token_count(self.video_tokens, num_frames)


def _anyres(size: Any, pinpoints: Any, view_size: int, num_image_tokens: int) -> AnyresViews:
    from anchor_former.views import anyres_views

    side = math.isqrt(int(num_image_tokens))
    return anyres_views(
        [int(v) for v in size], grid_pinpoints=pinpoints, view_size=view_size, patch_size=view_size // side
    )


class LlavaOnevisionHost(LlavaNextHost):
    """LLaVA-OneVision: the LLaVA-NeXT host with SigLIP defaults (``"select"``, ``"received"``), the video
    rule (``frame_anchors``) and its processor."""

    name = "LlavaOnevisionForConditionalGeneration"
    classes: ClassVar[dict[type, tuple[type, type, type]]] = {
        LlavaOnevisionForConditionalGeneration: (
            AnchorFormerLlavaOnevisionConfig,
            AnchorFormerLlavaOnevisionModel,
            AnchorFormerLlavaOnevisionForConditionalGeneration,
        ),
    }
    family = "LLaVA-OneVision"
    default_connector = "select"
    default_score = "received"
    processor_class: ClassVar[type] = LlavaOnevisionProcessor

    def family_options(self, model: nn.Module, connector: str, request: dict[str, Any]) -> dict[str, Any]:
        options = super().family_options(model, connector, request)
        frames = request.pop("frame_anchors", None)
        config: Any = model.config
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        pooled = math.ceil(side / 2) ** 2
        if frames is not None:
            if connector != "select":
                raise ValueError(f"frame_anchors is a connector='select' option, got connector={connector!r}")
            if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= pooled:
                raise ValueError(
                    f"frame_anchors must be an integer in [1, {pooled}] (the tokens of a video frame after the "
                    f"model's 2x2 pooling), got {frames!r}"
                )
        return {**options, "frame_anchors": frames, "pooled": pooled}

    def processor_checks(self, processor: Any, model: nn.Module, spec: EncoderSpec) -> list[tuple[str, Any, Any]]:
        config: Any = model.config
        side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        images = processor.image_processor
        return [
            (
                "image_processor.image_grid_pinpoints",
                [list(p) for p in getattr(images, "image_grid_pinpoints", []) or []],
                [list(p) for p in config.image_grid_pinpoints],
            ),
            ("num_image_tokens", processor.num_image_tokens, side * side),
            ("vision_aspect_ratio", processor.vision_aspect_ratio, config.vision_aspect_ratio),
            ("image_token_id", processor.image_token_id, config.image_token_id),
            ("video_token_id", processor.video_token_id, config.video_token_id),
            ("vision_feature_select_strategy", processor.vision_feature_select_strategy, self.expected_strategy(spec)),
        ]

    def extras(self, model: nn.Module, plan: Plan, connector: nn.Module) -> dict[str, Any]:
        options = dict(plan.data["options"])
        pooled = options.pop("pooled")
        tokens = self.tokens(plan, connector)
        if plan.connector == "select":
            frames = options["frame_anchors"]
            video = {
                "layout": "selected",
                "tokens_per_frame": min(plan.kwargs["num_anchors"], pooled) if frames is None else frames,
            }
        else:
            video = {"layout": "fixed", "tokens_per_frame": tokens["tokens_per_view"]}
        return {**options, "anyres": tokens, "video": video}

    def switch_processor(
        self, processor: Any, settings: AnchorSettings, plan: Plan, connector: nn.Module | None
    ) -> None:
        """Switch to :class:`AnchorFormerLlavaOnevisionProcessor`, checked on a blank 1:3 image and a 2-frame
        video; the pipeline rolls it back on failure."""
        import numpy as np

        tokens, video = settings.extras["anyres"], settings.extras["video"]
        name, config = type(processor).__name__, plan.data["config"]
        processor.__class__ = AnchorFormerLlavaOnevisionProcessor
        processor.anyres_tokens, processor.video_tokens = dict(tokens), dict(video)
        side = int(config.vision_config.image_size)
        shape = (side, 3 * side + 2)
        out = processor(
            text=f"{processor.image_token} {processor.video_token}",
            images=np.zeros((*shape, 3), dtype=np.uint8),
            videos=[np.zeros((2, side, side, 3), dtype=np.uint8)],
            return_tensors="pt",
        )
        ids = out["input_ids"]
        got = int((ids == processor.image_token_id).sum()), int((ids == processor.video_token_id).sum())
        want = (
            image_token_count(
                tokens, views_of(config, shape), vision_aspect_ratio=config.vision_aspect_ratio, multi_image=False
            ),
            video_token_count(video, 2),
        )
        if got != want:
            raise ValueError(
                f"could not make {name} write {want} (image, video) tokens (it wrote {got}); this "
                "transformers version's processor counts tokens differently"
            )


HOST = LlavaOnevisionHost()
HOST.register_key_conversions()


def register_auto_classes() -> None:
    """Register the LLaVA-OneVision classes with ``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText``
    and ``AutoProcessor`` (idempotent)."""
    LlavaOnevisionHost.register({LlavaOnevisionForConditionalGeneration: AnchorFormerLlavaOnevisionProcessor})


def attach_anchor_former(
    model: nn.Module,
    processor: Any = None,
    *,
    num_anchors: int = 144,
    connector: str | None = None,
    score: Score | None = None,
    init_projector: bool = True,
    image_budget: int | None = None,
    frame_anchors: int | None = None,
    **kwargs: Any,
) -> AnchorFormerLlavaOnevisionForConditionalGeneration:
    """Switch a ``LlavaOnevisionForConditionalGeneration`` (and its processor) to anchors, in place.

    Args:
        model: a built ``LlavaOnevisionForConditionalGeneration`` (e.g. ``llava-hf/llava-onevision-qwen2-7b-ov-hf``),
            or one already attached (re-attach: the rule of :mod:`anchor_former.adapters._host`).
        processor: its ``LlavaOnevisionProcessor``; becomes an :class:`AnchorFormerLlavaOnevisionProcessor`.
        num_anchors: K anchors per image view (``"select"``: at most the ``s * s`` patches of a view;
            ``"acformer"``: K tokens per view and per video frame, K + 1 with a [CLS] score).
        connector: ``"select"`` (the default: training-free, the model's projector), ``"acformer"``,
            ``"perceiver"``, ...; on re-attach, the attached one.
        score: ``"received"`` (the default: attention each token receives in ``vision_feature_layer``),
            ``"norm"`` (token norms); ``"cls"`` only on a tower with [CLS].
        init_projector: copy ``linear_1``/``linear_2`` into the connector's output MLP.
        image_budget: ``"select"`` only: one budget per image spread over its views
            (:func:`~anchor_former.views.view_budgets`); at least the most views any pinpoint gives.
        frame_anchors: ``"select"`` only: K per video frame, chosen among the ``ceil(s/2)^2`` pooled tokens of
            a frame (default: ``min(num_anchors, ceil(s/2)^2)``).
        **kwargs: further connector arguments (``depth``, ``heads``, ``dim_head``, ...).

    Raises:
        ValueError: not a ``LlavaOnevisionForConditionalGeneration``; ``vision_feature_layer`` a list;
            ``score="cls"`` on SigLIP (the message names ``"received"``); a ``vision_feature_select_strategy``
            other than ``"full"`` (no [CLS]) / ``"default"`` ([CLS] towers); ``num_anchors`` above a view's
            patches; ``frame_anchors`` above a frame's pooled tokens or below 1, or given for another
            connector; a bad ``image_budget``; ``num_context``; a projector that is not LLaVA's
            ``mlp2x_gelu`` for ``"select"``; a processor of another model; a re-attach that would discard the
            connector's weights. The model, its config and the processor are unchanged then.
    """
    attached = attach(
        HOST,
        model,
        processor,
        num_anchors=num_anchors,
        connector=connector,
        score=score,
        init_projector=init_projector,
        image_budget=image_budget,
        frame_anchors=frame_anchors,
        **kwargs,
    )
    return cast(AnchorFormerLlavaOnevisionForConditionalGeneration, attached)


#: the family's earlier name for :func:`attach_anchor_former`
