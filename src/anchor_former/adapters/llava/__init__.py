"""Adapter for the original LLaVA code (``llava-torch``, tested with 1.2.2.post1 on transformers 4.37.2).

LLaVA encodes images as ``mm_projector(vision_tower(images))`` (``LlavaMetaForCausalLM.encode_images``)
for both its batched-tensor and its list-of-images inputs (the list is concatenated first). The adapter
keeps that code untouched and swaps the two modules:

* :class:`AnchorVisionTower` replaces LLaVA's ``CLIPVisionTower``. Its ONE forward of the CLIP model
  (SDPA/eager as the model is configured; no ``output_attentions``) runs inside an
  :class:`~anchor_former.probes.AttentionProbe`, which captures the selected layer's tokens (all of
  them, [CLS] included) and that layer's [CLS] attention row. It returns both as
  :class:`AnchoredFeatures`, so the anchors travel to the projector as data, not as a module attribute.
* :class:`LlavaConnector` replaces ``mm_projector``: it unpacks :class:`AnchoredFeatures` and calls the
  connector ``connector(features, attention=scores)``; the connector's own anchor search picks the
  anchors, and the LLM sees ``num_anchors + 1`` tokens per image (AcFormer) or ``num_anchors +
  num_context`` (the training-free ``connector="select"``, which reuses the model's trained projector).

:func:`attach_anchor_former` does the swap (``enable_anchor_former`` is the same function under its
earlier name). Each tower forward builds its own probe and runs under a lock of the CLIP model, and
eagerly under ``torch.compile`` (:mod:`anchor_former.adapters._probed`), so threads sharing one model and
``torch.compile(model)`` work.

The vision tower keeps LLaVA's attribute names (``vision_tower``, ``image_processor``, ``select_layer``,
``is_loaded``, ``config``, ...) so state-dict keys (``model.vision_tower.vision_tower.*``) and LLaVA's
training/eval scripts are unchanged; the connector's keys are ``model.mm_projector.connector.*``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from anchor_former.adapters._anchors import anchor_kwargs
from anchor_former.adapters._probed import probed_forward
from anchor_former.checkpoint import Layout, load_connector_weights, save_state_dict
from anchor_former.probes import AttentionProbe, Score, detect_encoder

__all__ = [
    "AnchorVisionTower",
    "AnchoredFeatures",
    "LlavaConnector",
    "attach_anchor_former",
    "build_vision_projector",
    "enable_anchor_former",
    "load_projector_weights",
    "register_with_llava",
    "save_projector_weights",
]

_LLAVA_PROJECTORS = re.compile(r"^(linear|identity|mlp\d+x_gelu)$")
#: config key holding the connector's constructor arguments (a JSON-serialisable dict)
CONNECTOR_CONFIG_KEY = "mm_connector_config"


@dataclass(frozen=True)
class AnchoredFeatures:
    """What :class:`AnchorVisionTower` hands to :class:`LlavaConnector`.

    Attributes:
        features: ``(B, N, D)`` the selected layer's tokens, prefix tokens ([CLS]) included.
        scores: the anchor score of that forward: ``(B, H, N)`` [CLS] attention row per head (float32),
            ``(B, N)`` token norms, or None when the connector needs no anchors.
    """

    features: torch.Tensor
    scores: torch.Tensor | None


def _llava_projector_names() -> str:
    from anchor_former.connectors.registry import available_connectors

    names = sorted(set(available_connectors()) | {"linear", "identity", "mlp{N}x_gelu"})
    return ", ".join(names)


def build_vision_projector(config: Any, delay_load: bool = False, **kwargs: Any) -> nn.Module:
    """A superset of LLaVA's ``llava.model.multimodal_projector.builder.build_vision_projector``.

    Config keys (attributes of ``config``), as LLaVA: ``mm_projector_type`` (default ``"linear"``),
    ``mm_hidden_size`` (ViT width D), ``hidden_size`` (LLM width).

    * ``"linear"``, ``"mlp{N}x_gelu"``, ``"identity"``: exactly LLaVA's modules and state-dict keys
      (``nn.Linear``; ``nn.Sequential`` with linears at ``0, 2, ...``; no parameters), fed by LLaVA's own
      vision tower.
    * ``"acformer"``, ``"avgpool"``, ``"cabstractor"``, ``"perceiver"``: a :class:`LlavaConnector`
      around ``build_connector(mm_projector_type, mm_hidden_size, hidden_size, **mm_connector_config,
      **kwargs)``. ``config.mm_connector_config`` (a dict, saved in ``config.json``) holds that
      connector's own arguments, e.g. ``{"num_anchors": 144, "depth": 6, "heads": 8, "dim_head": 64,
      "projector": "mlp2x_gelu"}`` for ``"acformer"`` (its ``connector`` / ``score`` entries, recorded
      for :func:`attach_anchor_former`, are not constructor arguments and are skipped). These connectors need an
      :class:`AnchorVisionTower` (see :func:`attach_anchor_former`).

    Args:
        config: a LLaVA config (or any object with those attributes).
        delay_load: accepted for signature compatibility with LLaVA; unused.
        **kwargs: override entries of ``mm_connector_config``.

    Raises:
        ValueError: unknown ``mm_projector_type`` (the message lists the known ones).
    """
    from anchor_former.connectors.registry import available_connectors, build_connector
    from anchor_former.projector import build_projector

    projector_type = getattr(config, "mm_projector_type", "linear")
    vision_dim, llm_dim = int(config.mm_hidden_size), int(config.hidden_size)
    if isinstance(projector_type, str) and _LLAVA_PROJECTORS.match(projector_type):
        if projector_type == "identity":
            return nn.Identity()  # LLaVA's IdentityMap: no parameters, any call signature
        return build_projector(projector_type, vision_dim, llm_dim)
    if projector_type not in available_connectors():
        raise ValueError(
            f"config.mm_projector_type must be one of {_llava_projector_names()}, got {projector_type!r}"
        )
    connector_kwargs = _constructor_kwargs({**dict(getattr(config, CONNECTOR_CONFIG_KEY, None) or {}), **kwargs})
    return LlavaConnector(build_connector(projector_type, vision_dim, llm_dim, **connector_kwargs))


#: entries of ``mm_connector_config`` that are :func:`attach_anchor_former` arguments, not the connector's
_ATTACH_KEYS = ("connector", "score")


def _constructor_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``mm_connector_config`` as the connector's constructor arguments: without the widths (set by
    ``mm_hidden_size`` / ``hidden_size``) and without the recorded ``connector`` / ``score``."""
    return {k: v for k, v in settings.items() if k not in ("vision_dim", "llm_dim", *_ATTACH_KEYS)}


class LlavaConnector(nn.Module):
    """LLaVA's ``mm_projector`` slot holding a connector that consumes :class:`AnchoredFeatures`.

    ``forward(AnchoredFeatures)`` → ``(B, T, llm_dim)``; a list of them → a list of outputs. The
    connector is at ``.connector`` (state-dict keys ``connector.*``).
    """

    def __init__(self, connector: nn.Module) -> None:
        super().__init__()
        self.connector = connector

    def forward(self, inputs: AnchoredFeatures | list[AnchoredFeatures]) -> torch.Tensor | list[torch.Tensor]:
        """``inputs.features (B, N, D)`` and ``inputs.scores`` → ``(B, T, llm_dim)`` (T = K + 1 for AcFormer)."""
        if isinstance(inputs, (list, tuple)):
            return [self(x) for x in inputs]
        if not isinstance(inputs, AnchoredFeatures):
            got = f"a tensor of shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(
                "LlavaConnector needs AnchoredFeatures (all tokens of the selected layer plus the anchor scores) "
                f"from AnchorVisionTower, got {got}; switch the model with "
                "anchor_former.adapters.llava.attach_anchor_former(model, ...)"
            )
        if getattr(self.connector, "uses_anchors", False):
            if inputs.scores is None:
                raise ValueError("this connector needs anchor scores, but AnchoredFeatures.scores is None")
            return self.connector(inputs.features, attention=inputs.scores)
        return self.connector(inputs.features)


class AnchorVisionTower(nn.Module):
    """Drop-in replacement for LLaVA's ``CLIPVisionTower`` that also yields the anchor scores.

    Args:
        tower: a loaded LLaVA ``CLIPVisionTower`` (its CLIP model and image processor are reused).
        score: ``"cls"`` ([CLS] attention row of the selected layer), ``"norm"`` (token norms), ``"map"``
            (attention-pooling head) or None (no scores, for connectors that use no anchors).

    ``forward(images)``: ``images (B, C, H_img, W_img)`` → :class:`AnchoredFeatures` with
    ``features (B, N, D)``; a list of ``(C, H_img, W_img)`` / ``(1, C, H_img, W_img)`` images → a list of
    :class:`AnchoredFeatures` with ``B = 1`` each (LLaVA's per-image path). Gradients flow into the
    features only if the CLIP model has trainable parameters (LLaVA's tower runs under ``no_grad``).
    """

    def __init__(self, tower: nn.Module, *, score: Score | None = "cls") -> None:
        super().__init__()
        self.vision_tower = tower.vision_tower
        self.image_processor = getattr(tower, "image_processor", None)
        self.vision_tower_name = getattr(tower, "vision_tower_name", None)
        self.select_layer = int(tower.select_layer)
        self.select_feature = "cls_patch"  # all tokens; the connector decides which it consumes
        self.score = score
        self.is_loaded = True
        # fail now, not at the first forward: unsupported encoder, layer out of range, CLS-less + "cls"
        AttentionProbe(self.vision_tower, layer=self.select_layer, score=score or "norm")

    def load_model(self, device_map: Any = None) -> None:
        """Already loaded (LLaVA calls this after ``from_pretrained``); nothing to do."""

    @property
    def num_prefix_tokens(self) -> int:
        return detect_encoder(self.vision_tower).num_prefix_tokens

    def _encode(self, images: torch.Tensor) -> AnchoredFeatures:
        clip = self.vision_tower
        trainable = any(p.requires_grad for p in clip.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            # a fresh probe per call, under the tower's lock and outside torch.compile (see _probed)
            _, probe = probed_forward(clip, lambda: clip(images.to(device=self.device, dtype=self.dtype)),
                                      layer=self.select_layer, score=self.score or "norm")
        features = probe.features.to(images.dtype)  # (B, N, D), as LLaVA casts back to the input dtype
        return AnchoredFeatures(features, None if self.score is None else probe.scores)

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> AnchoredFeatures | list[AnchoredFeatures]:
        if isinstance(images, (list, tuple)):
            return [self._encode(image if image.ndim == 4 else image.unsqueeze(0)) for image in images]
        return self._encode(images)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> Any:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_patches_per_side(self) -> int:
        return int(self.config.image_size) // int(self.config.patch_size)

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


def _llava_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(inner LlavaMetaModel, its vision tower)``, or a ValueError naming what is expected."""
    get_model = getattr(model, "get_model", None)
    inner = get_model() if callable(get_model) else None
    if inner is None or not hasattr(inner, "mm_projector") or not callable(getattr(inner, "get_vision_tower", None)):
        raise ValueError(
            "model must be a built LLaVA model (llava's LlavaLlamaForCausalLM, LlavaMistralForCausalLM, "
            "LlavaMptForCausalLM or another LlavaMetaForCausalLM with get_model().mm_projector and a vision "
            f"tower), got {type(model).__module__}.{type(model).__qualname__}; for transformers' "
            "LlavaForConditionalGeneration use anchor_former.adapters.transformers.attach_anchor_former"
        )
    tower = inner.get_vision_tower()
    if tower is None:
        raise ValueError(f"model {type(model).__name__} has no vision tower (config.mm_vision_tower is unset)")
    return inner, tower


@dataclass(frozen=True)
class _Plan:
    """What :func:`attach_anchor_former` checked and will build (nothing is changed while planning)."""

    inner: nn.Module
    tower: AnchorVisionTower
    connector: str
    score: Score
    kwargs: dict[str, Any]  # the connector's constructor arguments (widths excluded)
    previous: nn.Module | None  # the connector of an already switched model, whose weights carry over
    init_projector: bool
    anyres: bool = False  # LLaVA-NeXT views (image_aspect_ratio="anyres"): see .anyres
    image_budget: int | None = None  # anyres + select: one budget per image, spread over its views


def _plan(model: nn.Module, *, num_anchors: int, connector: str, score: Score, init_projector: bool,
          kwargs: dict[str, Any]) -> _Plan:
    """Validate the arguments against ``model``; raises ``ValueError`` before anything changes (a
    delay-loaded CLIP tower is loaded, as LLaVA itself would on first use)."""
    from anchor_former.connectors.registry import available_connectors

    inner, tower = _llava_parts(model)
    config = model.config
    merge = getattr(config, "mm_patch_merge_type", "flat") or "flat"
    anyres = getattr(config, "image_aspect_ratio", None) == "anyres"  # LLaVA-NeXT views: see .anyres
    if merge != "flat" and not anyres:
        raise ValueError(
            f"config.mm_patch_merge_type must be 'flat' for attach_anchor_former (the connector's tokens are not a "
            f"patch grid that LLaVA's spatial merge could tile), got {merge!r}"
        )
    if connector not in available_connectors() and not re.match(r"^mlp\d+x_gelu$", str(connector)):
        raise ValueError(f"connector must be one of {', '.join(available_connectors())}, got {connector!r}")
    previous = None
    if isinstance(inner.mm_projector, LlavaConnector):
        recorded = getattr(config, "mm_projector_type", None)
        if recorded != connector:
            raise ValueError(
                f"connector must stay {recorded!r} when re-attaching (the model is already switched, and its "
                f"connector's weights carry over), got {connector!r}; to switch connectors, attach to a freshly "
                "loaded stock LLaVA model instead"
            )
        # keep the recorded include_cls unless the score changes (acformer derives it from the score; select
        # from mm_vision_select_feature, which the first attach set to "cls_patch")
        recompute = ("num_anchors",) + (("include_cls",) if score != getattr(config, "mm_anchor_score", score) else ())
        inherited = {k: v for k, v in dict(getattr(config, CONNECTOR_CONFIG_KEY, None) or {}).items()
                     if k not in recompute}
        kwargs = {**_constructor_kwargs(inherited), **kwargs}
        previous = inner.mm_projector.connector
    if not getattr(tower, "is_loaded", True):
        tower.load_model()
    new_tower = AnchorVisionTower(tower, score=score)  # raises for CLS-less + "cls", bad layer
    image_budget = None
    if anyres:
        from anchor_former.adapters.llava.anyres import check_anyres

        image_budget = check_anyres(config, connector, kwargs, view_size=int(new_tower.config.image_size))
    spec = detect_encoder(new_tower.vision_tower)
    kwargs = anchor_kwargs(connector, num_anchors, new_tower.num_patches, kwargs, has_cls=spec.has_cls,
                           score=score, stock_cls=getattr(config, "mm_vision_select_feature", "patch") == "cls_patch")
    old_type = getattr(config, "mm_projector_type", "linear")
    if connector == "select" and previous is None:
        _check_select_source(inner.mm_projector, old_type, init_projector)
    if _LLAVA_PROJECTORS.match(str(connector)):
        kwargs.pop("projector", None)  # the name is the projector
    elif "projector" not in kwargs and isinstance(old_type, str) and re.match(r"^(linear|mlp\d+x_gelu)$", old_type):
        kwargs["projector"] = old_type  # same output MLP as the model had, so its weights carry over
    kwargs.setdefault("num_prefix_tokens", spec.num_prefix_tokens)
    return _Plan(inner=inner, tower=new_tower, connector=connector, score=score, kwargs=kwargs, previous=previous,
                 init_projector=init_projector, anyres=anyres, image_budget=image_budget)


def _build(plan: _Plan, config: Any, model: nn.Module) -> nn.Module:
    """The new connector on the old projector's device and dtype, with its starting weights: the
    previous connector's (re-attach), else the model's LLaVA projector (``init_projector``)."""
    from anchor_former.checkpoint import CheckpointError, load_checked
    from anchor_former.connectors.registry import build_connector

    old_projector = plan.inner.mm_projector
    param = next(iter(old_projector.parameters()), None)
    param = param if param is not None else next(iter(model.parameters()))
    new = build_connector(plan.connector, int(config.mm_hidden_size), int(config.hidden_size), **plan.kwargs,
                          device=param.device, dtype=param.dtype)
    new.num_output_tokens(plan.tower.num_patches + plan.tower.num_prefix_tokens)  # budget checks, before any change
    if plan.previous is not None:
        try:
            load_checked(new, plan.previous.state_dict(), what="the attached connector")
        except CheckpointError as error:
            raise ValueError(
                f"re-attaching keeps the attached connector's weights, so its architecture must stay the same: "
                f"{error}; to change it, attach to a freshly loaded stock LLaVA model instead"
            ) from error
    elif plan.init_projector:
        target = getattr(new, "projector", None)
        if target is not None and _shapes(target) == _shapes(old_projector):
            target.load_state_dict(old_projector.state_dict())
        elif plan.connector == "select":
            raise ValueError(
                f"connector='select' needs the model's {config.mm_projector_type} projector to fit a "
                f"{plan.kwargs['projector']} of width {config.mm_hidden_size} -> {config.hidden_size}; its "
                "parameters have other shapes"
            )
    return new


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _swap(model: nn.Module, plan: _Plan, new: nn.Module) -> None:
    """Install the tower and ``new``, and record the settings in ``model.config`` (every check has passed)."""
    if not getattr(new, "uses_anchors", False):
        plan.tower.score = None  # the connector ignores anchors: skip the probe's attention row
    inner, config = plan.inner, model.config
    if isinstance(getattr(inner, "vision_tower", None), list):  # LLaVA keeps it in a list under FSDP
        inner.vision_tower = [plan.tower]
    else:
        inner.vision_tower = plan.tower
    inner.mm_projector = LlavaConnector(new)
    conn_config = getattr(new, "config", None)
    settings = conn_config.to_dict() if hasattr(conn_config, "to_dict") else dict(plan.kwargs)
    settings = _constructor_kwargs(settings)
    if _LLAVA_PROJECTORS.match(plan.connector):
        settings.pop("projector", None)
    # connector and score too, so attach_anchor_former(model, **config.mm_connector_config) rebuilds it
    settings.update(connector=plan.connector, score=plan.score)
    config.mm_projector_type = plan.connector
    setattr(config, CONNECTOR_CONFIG_KEY, settings)
    config.mm_vision_select_feature = "cls_patch"
    config.mm_anchor_score = plan.score


def attach_anchor_former(
    model: nn.Module,
    *,
    num_anchors: int = 144,
    connector: str = "acformer",
    score: Score = "cls",
    init_projector: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Switch a built LLaVA model to AcFormer (or another connector) in place; returns ``model``.

    Replaces ``model.get_model().vision_tower`` by an :class:`AnchorVisionTower` (same CLIP model, no
    copy) and ``model.get_model().mm_projector`` by a :class:`LlavaConnector`, and records the settings
    in ``model.config`` (``mm_projector_type``, ``mm_connector_config`` (the connector's arguments plus
    ``connector`` and ``score``, so ``attach_anchor_former(model, **model.config.mm_connector_config)``
    rebuilds it), ``mm_vision_select_feature = "cls_patch"``, ``mm_anchor_score``). The LLM then sees
    ``num_anchors + 1`` visual tokens per image. :func:`enable_anchor_former` is the same function.

    Args:
        model: ``LlavaLlamaForCausalLM`` or a sibling (``LlavaMistralForCausalLM``, ...). A delay-loaded
            vision tower is loaded. A model already switched is re-attached (below).
        num_anchors: K anchors. ``"acformer"``: [CLS] is added as query K + 1; ``"select"``: the LLM sees
            the K anchor patches (plus ``num_context``). Ignored by the other connectors.
        connector: a :func:`~anchor_former.build_connector` name: ``"acformer"`` (trained AcFormer),
            ``"select"`` (training-free: the K anchor patches through the model's own projector, no new
            parameters; ``num_context=M`` adds M merged context tokens; [CLS] is kept first only where the
            model's ``mm_vision_select_feature`` is ``"cls_patch"``), ``"perceiver"``, ``"avgpool"``,
            ``"cabstractor"``, ...
        score: anchor score read by the probe at ``mm_vision_select_layer``: ``"cls"`` ([CLS] attention,
            as the paper), ``"norm"`` (token norms; encoders without [CLS]).
        init_projector: copy the model's current ``linear`` / ``mlpNx_gelu`` projector weights into the
            connector's output MLP (which by default gets the same type), i.e. warm start from LLaVA-1.5.
        **kwargs: further connector arguments (``depth``, ``heads``, ``dim_head``, ``ff_mult``, ...).

    Re-attaching (the model is already switched, e.g. to change ``num_anchors``) keeps the connector: the
    same ``connector`` name is required, every weight of the attached connector carries over unchanged
    (none depends on K), connector arguments not passed keep their recorded values, and
    ``init_projector`` does not apply.

    Raises:
        ValueError: not a LLaVA model; ``mm_patch_merge_type`` other than ``"flat"`` (AcFormer's tokens
            are not a patch grid) unless ``image_aspect_ratio="anyres"`` (LLaVA-NeXT views, anchors per view,
            ``image_budget=B`` for one budget per image: :mod:`anchor_former.adapters.llava.anyres`); unknown
            connector; ``score="cls"`` on a tower without [CLS];
            ``num_anchors`` (+ ``num_context``) larger than the tower's patch count; ``"select"`` on a
            projector that is not LLaVA's ``linear`` / ``mlp{N}x_gelu``; on re-attach, another connector
            name or arguments that change the connector's weight shapes. The model is unchanged then.
    """
    plan = _plan(model, num_anchors=num_anchors, connector=connector, score=score, init_projector=init_projector,
                 kwargs=kwargs)
    new = _build(plan, model.config, model)
    _swap(model, plan, new)
    if plan.anyres:
        from anchor_former.adapters.llava.anyres import enable_anyres

        enable_anyres(model, plan.image_budget)
    return model


#: the LLaVA adapter's original name for :func:`attach_anchor_former` (kept; same function)
enable_anchor_former = attach_anchor_former


def _check_select_source(projector: nn.Module, projector_type: Any, init_projector: bool) -> None:
    """``connector="select"`` reuses the model's trained projector: it must be LLaVA's linear / MLP."""
    if not init_projector:
        raise ValueError(
            "connector='select' maps the kept tokens with the model's own trained projector; init_projector=False "
            "would leave it random"
        )
    known = isinstance(projector_type, str) and re.match(r"^(linear|mlp\d+x_gelu)$", projector_type)
    if not known or isinstance(projector, LlavaConnector):
        raise ValueError(
            "connector='select' needs the model's projector to be LLaVA's 'linear' or 'mlp{N}x_gelu' "
            f"(config.mm_projector_type), got mm_projector_type={projector_type!r} ({type(projector).__name__})"
        )


def _connector_of(target: nn.Module) -> nn.Module:
    if isinstance(target, LlavaConnector):
        return target.connector
    get_model = getattr(target, "get_model", None)
    if callable(get_model):
        inner, _ = _llava_parts(target)
        projector = inner.mm_projector
        return projector.connector if isinstance(projector, LlavaConnector) else projector
    return target


def load_projector_weights(
    target: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor]
) -> Layout:
    """Load projector weights into a LLaVA model's connector (or a connector); returns the layout found.

    ``checkpoint``: a path (``.safetensors``, or a ``.bin`` read with ``weights_only=True``) or a state
    dict, in any layout of :mod:`anchor_former.checkpoint`:

    * LLaVA-1.5 ``mm_projector.bin`` (``model.mm_projector.0.*``, ``.2.*``) → the output MLP only
      (``connector.projector``), the rest keeps its values;
    * the reference AcFormer patch's ``mm_projector.bin`` (incl. its unused ``latents``) → everything;
    * :func:`save_projector_weights`' file → everything.

    Raises:
        CheckpointError: unsafe pickle, unknown layout, missing/unexpected keys or shape mismatches (named);
            the model is unchanged then.
    """
    return load_connector_weights(_connector_of(target), checkpoint)


def save_projector_weights(target: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save the connector of a LLaVA model (or a connector) as safetensors, keys
    ``model.mm_projector.connector.*`` (what :func:`load_projector_weights` reads back)."""
    connector = _connector_of(target)
    save_state_dict({f"model.mm_projector.connector.{k}": v for k, v in connector.state_dict().items()}, path)


from anchor_former.adapters.llava.registration import register_with_llava  # noqa: E402  (extends the classes above)
