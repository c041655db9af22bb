"""llava-torch ``image_aspect_ratio="anyres"`` (LLaVA-NeXT / LLaVA-1.6 in the original code) with anchors per view.

With ``anyres``, LLaVA's ``process_images`` turns each image into ``V = 1 + R * C`` views (the base view,
then the crops of the chosen grid pinpoint, row-major) and ``prepare_inputs_labels_for_multimodal``
encodes them, then merges each image's views by ``config.mm_patch_merge_type``: ``"flat"`` (views one
after another), ``"spatial"`` (base view, then the high-resolution grid row by row) or ``"spatial_unpad"``
(as ``"spatial"``, minus the rows/columns that only show padding, each grid row closed by
``model.image_newline``). That merge needs full patch grids, so :func:`~anchor_former.adapters.llava.attach_anchor_former`
switches the model to a subclass of its own class (same name, same state dict) whose
``prepare_inputs_labels_for_multimodal`` computes each image's tokens with :mod:`anchor_former.views`
(the same rules as the transformers LLaVA-NeXT adapter) and hands them to LLaVA's unchanged splicing code
(after :func:`~anchor_former.adapters.llava.register_with_llava`, LLaVA's own class does the same for a
model whose config records the settings, so ``from_pretrained`` / ``load_pretrained_model`` of a saved
folder need no class switch):

* ``connector="select"``: per view, the anchors of its own [CLS] row among its candidate patches (those
  the merge keeps), ``num_anchors`` per view or ``image_budget`` per image; the stock merge's layout
  restricted to the kept patches (newlines kept under ``"spatial_unpad"``). At full budget it is the stock
  model.
* the trained connectors (``"acformer"``: ``K + 1`` tokens per view, ...): per view, base view first,
  crops row-major; under ``"spatial_unpad"`` one ``image_newline`` after each row of crops.

All views of all images go through the vision tower in ONE forward (the probe keeps every view's [CLS]
row). LLaVA's ``image_sizes`` are ``(width, height)`` and its pinpoints ``[width, height]``, converted here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from anchor_former.views import (
    AnyresViews,
    anyres_views,
    arrange_fixed,
    num_fixed_tokens,
    num_selected_tokens,
    select_view_tokens,
    view_budgets,
)

__all__ = [
    "AnyresImageTokens",
    "anyres_class",
    "anyres_image_tokens",
    "anyres_inputs",
    "anyres_token_counts",
    "check_anyres",
    "is_anchored_anyres",
]

_MERGES = ("flat", "spatial", "spatial_unpad")


@dataclass(frozen=True)
class AnyresImageTokens:
    """Each image's finished LLM tokens, passed where LLaVA expects its image batch.

    LLaVA's ``prepare_inputs_labels_for_multimodal`` takes its single-batch branch for an input with
    ``ndim == 4`` and indexes ``encode_images(images)`` per image; the switched model's ``encode_images``
    returns :attr:`tokens` for this type, so LLaVA's own code splices them into the text unchanged.

    Attributes:
        tokens: one ``(T_i, llm_dim)`` tensor per image.
    """

    tokens: list[torch.Tensor]
    ndim: ClassVar[int] = 4


def _pinpoints(config: Any) -> list[tuple[int, int]]:
    """``config.image_grid_pinpoints`` (LLaVA: ``[[width, height], ...]`` or its string) as ``(height, width)``."""
    points = config.image_grid_pinpoints
    if isinstance(points, str):
        points = ast.literal_eval(points)
    return [(int(h), int(w)) for w, h in points]


def _views(config: Any, tower_config: Any, image_size: Any) -> AnyresViews:
    """The views of one image of LLaVA ``image_size = (width, height)``."""
    width, height = (int(v) for v in image_size)
    return anyres_views(
        (height, width), grid_pinpoints=_pinpoints(config), view_size=int(tower_config.image_size),
        patch_size=int(tower_config.patch_size), merge=config.mm_patch_merge_type, rounding="floor",
    )  # fmt: skip


def _budgets(config: Any, connector: nn.Module, views: AnyresViews) -> tuple[int, ...]:
    from anchor_former.adapters.llava import recorded_settings

    settings = recorded_settings(config)
    budget = None if settings is None else settings.extras.get("image_budget")
    if budget is not None:
        return view_budgets(views.num_candidates(), per_image=int(budget))
    return view_budgets(views.num_candidates(), per_view=int(cast(Any, connector).num_anchors))


def anyres_token_counts(model: nn.Module, image_sizes: list[Any]) -> list[int]:
    """LLM tokens per image of a switched model, for LLaVA ``image_sizes`` ``[(width, height), ...]``."""
    llava: Any = model  # llava-torch's LlavaMetaForCausalLM (untyped)
    inner = llava.get_model()
    connector = inner.mm_projector.connector
    tower_config = inner.get_vision_tower().config
    counts = []
    for size in image_sizes:
        views = _views(llava.config, tower_config, size)
        if llava.config.mm_projector_type == "select":
            counts.append(num_selected_tokens(views, _budgets(llava.config, connector, views)))
        else:
            prefix = connector.num_prefix_tokens
            counts.append(num_fixed_tokens(views, connector.num_output_tokens(prefix + views.side**2)))
    return counts


def anyres_image_tokens(
    model: nn.Module, images: torch.Tensor | list[torch.Tensor], image_sizes: Any
) -> list[torch.Tensor]:
    """Each image's LLM tokens ``(T_i, llm_dim)`` from its views.

    Args:
        model: a model switched by ``attach_anchor_former`` with ``image_aspect_ratio="anyres"``.
        images: ``(B, V, C, H_img, W_img)`` or a list of ``(V_i, C, H_img, W_img)`` views (``process_images``).
        image_sizes: B original sizes ``(width, height)``.

    Returns:
        B tensors ``(T_i, llm_dim)`` (:func:`anyres_token_counts`).
    """
    llava: Any = model  # llava-torch's LlavaMetaForCausalLM (untyped)
    inner = llava.get_model()
    tower, projector = inner.get_vision_tower(), inner.mm_projector
    connector = projector.connector
    images = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
    if image_sizes is None or len(image_sizes) != len(images):
        got = None if image_sizes is None else len(image_sizes)
        raise ValueError(f"image_sizes must give the (width, height) of each of the {len(images)} images, got {got}")
    views = [_views(llava.config, tower.config, size) for size in image_sizes]
    for i, (image, image_views) in enumerate(zip(images, views)):
        if image.shape[0] != image_views.num_views:
            raise ValueError(
                f"image {i} of size {tuple(image_sizes[i])} (width, height) must have {image_views.num_views} views "
                f"(1 + {image_views.grid[0]} x {image_views.grid[1]} crops), got {image.shape[0]}"
            )
    encoded = tower(torch.cat(images, dim=0))  # one forward over all views: AnchoredFeatures (sum V_i, N, D)
    newline = getattr(inner, "image_newline", None)
    out, start = [], 0
    for image_views in views:
        n = image_views.num_views
        features = encoded.features[start : start + n]
        scores = None if encoded.scores is None else encoded.scores[start : start + n]
        start += n
        if llava.config.mm_projector_type == "select":
            out.append(select_view_tokens(
                image_views, _budgets(llava.config, connector, image_views), features, cast(torch.Tensor, scores),
                num_prefix_tokens=connector.num_prefix_tokens, projector=connector.projector, newline=newline,
            ))  # fmt: skip
        else:
            per_view = projector(type(encoded)(features, scores))  # (V, T, llm_dim)
            out.append(arrange_fixed(image_views, per_view, newline))
    return out


def is_anchored_anyres(model: nn.Module) -> bool:
    """Whether ``model`` is an attached llava-torch model with ``image_aspect_ratio="anyres"``."""
    from anchor_former.adapters.llava import LlavaConnector

    inner = cast(Any, model).get_model()
    return getattr(model.config, "image_aspect_ratio", None) == "anyres" and isinstance(
        getattr(inner, "mm_projector", None), LlavaConnector
    )


def anyres_inputs(model: nn.Module, input_ids: torch.Tensor, images: Any, image_sizes: Any) -> Any:
    """``images`` as LLaVA's ``prepare_inputs_labels_for_multimodal`` should receive them: the finished
    tokens (:class:`AnyresImageTokens`) for multi-view input to a prompt, else ``images`` unchanged
    (LLaVA skips images while decoding, ``input_ids`` of length 1)."""
    multi_view = images is not None and (isinstance(images, (list, tuple)) or getattr(images, "ndim", 0) == 5)
    if multi_view and input_ids.shape[1] != 1:
        return AnyresImageTokens(anyres_image_tokens(model, images, image_sizes))
    return images


class _AnyresMixin:
    """Computes anyres images' tokens itself and lets LLaVA splice them (see :class:`AnyresImageTokens`)."""

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        images = anyres_inputs(cast(nn.Module, self), input_ids, images, image_sizes)  # mixed into LLaVA's models
        return super().prepare_inputs_labels_for_multimodal(  # type: ignore[misc]
            input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
        )

    def encode_images(self, images):
        if isinstance(images, AnyresImageTokens):
            return images.tokens
        return super().encode_images(images)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def anyres_class(cls: type) -> type:
    """``cls`` with the anyres token path first; same name, so ``save_pretrained`` records ``cls``'s architecture."""
    if issubclass(cls, _AnyresMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            cls.__name__, (_AnyresMixin, cls), {"__qualname__": cls.__qualname__, "__module__": cls.__module__}
        )
    return _CLASSES[cls]


def check_anyres(
    config: Any, connector: str, kwargs: dict[str, Any], *, view_size: int, select_feature: str
) -> int | None:
    """Check an anyres model's settings before anything changes; pop and return ``image_budget`` from ``kwargs``.

    ``select_feature`` is the stock model's ``mm_vision_select_feature`` (the config's, or the one
    recorded at the first attach).

    Raises:
        ValueError: unknown ``mm_patch_merge_type``; ``select_feature`` other than ``"patch"``;
            missing pinpoints; ``num_context``; ``image_budget`` for a connector other than ``"select"`` or
            below the most views an image gets (each view needs an anchor).
    """
    merge = getattr(config, "mm_patch_merge_type", "flat") or "flat"
    if merge not in _MERGES:
        raise ValueError(f"config.mm_patch_merge_type must be one of {', '.join(_MERGES)} for anyres, got {merge!r}")
    if select_feature != "patch":
        raise ValueError(
            f"config.mm_vision_select_feature must be 'patch' for anyres (each view is a patch grid), got "
            f"{select_feature!r}"
        )
    if not getattr(config, "image_grid_pinpoints", None):
        raise ValueError("config.image_grid_pinpoints must list the anyres resolutions, got none")
    if kwargs.get("num_context"):
        raise ValueError(
            f"num_context (context tokens) is not supported with anyres views, got {kwargs['num_context']!r}"
        )
    kwargs.pop("num_context", None)
    budget = kwargs.pop("image_budget", None)
    if budget is None:
        return None
    if connector != "select":
        raise ValueError(f"image_budget is a connector='select' option, got connector={connector!r}")
    most = 1 + max((h // view_size) * (w // view_size) for h, w in _pinpoints(config))
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < most:
        raise ValueError(
            f"image_budget must be an integer >= {most} (the most views an image gets: one anchor each), got {budget!r}"
        )
    return budget
