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

:func:`attach_anchor_former` does the swap through the attach pipeline every host family shares
(:mod:`anchor_former.adapters._host`: plan, build or carry over, record one
:class:`~anchor_former.adapters.settings.AnchorSettings` in ``config.anchor_former``, install; a failed
attach leaves model and config as they were). Each tower forward builds its own probe and runs under a
lock of the CLIP model, and eagerly under ``torch.compile`` (:mod:`anchor_former.adapters._probed`), so
threads sharing one model and ``torch.compile(model)`` work.

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
from anchor_former.adapters._host import Host, Plan, attach, merge_recorded, restoring
from anchor_former.adapters._probed import probed_forward
from anchor_former.adapters.settings import CONFIG_KEY, AnchorSettings
from anchor_former.checkpoint import Layout, load_connector_weights, save_state_dict
from anchor_former.probes import AttentionProbe, Score, detect_encoder

__all__ = [
    "AnchorVisionTower",
    "AnchoredFeatures",
    "LlavaConnector",
    "attach_anchor_former",
    "build_vision_projector",
    "load_projector_weights",
    "recorded_settings",
    "register_with_llava",
    "save_projector_weights",
    "unregister_from_llava",
]

_LLAVA_PROJECTORS = re.compile(r"^(linear|identity|mlp\d+x_gelu)$")
#: LLaVA's projector types with weights (what ``select`` reuses and AcFormer's output MLP copies)
_LLAVA_MLPS = re.compile(r"^(linear|mlp\d+x_gelu)$")
#: config key of an earlier release holding the connector's arguments (read for folders saved then)
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
    from anchor_former.connectors import available_connectors

    names = sorted(set(available_connectors()) | {"linear", "identity", "mlp{N}x_gelu"})
    return ", ".join(names)


def build_vision_projector(config: Any, delay_load: bool = False, **kwargs: Any) -> nn.Module:
    """A superset of LLaVA's ``llava.model.multimodal_projector.builder.build_vision_projector``.

    Config keys (attributes of ``config``), as LLaVA: ``mm_projector_type`` (default ``"linear"``),
    ``mm_hidden_size`` (ViT width D), ``hidden_size`` (LLM width).

    * ``"linear"``, ``"mlp{N}x_gelu"``, ``"identity"``: exactly LLaVA's modules and state-dict keys
      (``nn.Linear``; ``nn.Sequential`` with linears at ``0, 2, ...``; no parameters), fed by LLaVA's own
      vision tower.
    * ``"acformer"``, ``"select"``, ``"avgpool"``, ``"cabstractor"``, ``"perceiver"``: a
      :class:`LlavaConnector` around ``build_connector(mm_projector_type, mm_hidden_size, hidden_size,
      **connector_config, **kwargs)``, where ``connector_config`` is the recorded settings' (``config.anchor_former``,
      see :func:`recorded_settings`), e.g. ``{"num_anchors": 144, "depth": 6, "heads": 8, "dim_head": 64,
      "projector": "mlp2x_gelu"}`` for ``"acformer"``. These connectors need an :class:`AnchorVisionTower`
      (see :func:`attach_anchor_former`).

    Args:
        config: a LLaVA config (or any object with those attributes).
        delay_load: accepted for signature compatibility with LLaVA; unused.
        **kwargs: override entries of the recorded ``connector_config``.

    Raises:
        ValueError: unknown ``mm_projector_type`` (the message lists the known ones).
    """
    from anchor_former._projector import build_projector
    from anchor_former.connectors import available_connectors, build_connector

    projector_type = getattr(config, "mm_projector_type", "linear")
    vision_dim, llm_dim = int(config.mm_hidden_size), int(config.hidden_size)
    if isinstance(projector_type, str) and _LLAVA_PROJECTORS.match(projector_type):
        if projector_type == "identity":
            return nn.Identity()  # LLaVA's IdentityMap: no parameters, any call signature
        return build_projector(projector_type, vision_dim, llm_dim)
    if projector_type not in available_connectors():
        raise ValueError(f"config.mm_projector_type must be one of {_llava_projector_names()}, got {projector_type!r}")
    settings = recorded_settings(config)
    recorded = settings.connector_config if settings is not None else getattr(config, CONNECTOR_CONFIG_KEY, None)
    connector_kwargs = {**_constructor_kwargs(recorded or {}), **kwargs}
    return LlavaConnector(build_connector(projector_type, vision_dim, llm_dim, **connector_kwargs))


#: entries of an earlier release's ``mm_connector_config`` that were attach arguments, not the connector's
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
            got = (
                f"a tensor of shape {tuple(inputs.shape)}"
                if isinstance(inputs, torch.Tensor)
                else type(inputs).__name__
            )
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
        stock: Any = tower  # llava-torch's CLIPVisionTower (untyped)
        self.vision_tower: Any = stock.vision_tower  # a transformers CLIPVisionModel
        self.image_processor = getattr(tower, "image_processor", None)
        self.vision_tower_name = getattr(tower, "vision_tower_name", None)
        self.select_layer = int(stock.select_layer)
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
            _, probe = probed_forward(
                clip,
                lambda: clip(images.to(device=self.device, dtype=self.dtype)),
                layer=self.select_layer,
                score=self.score or "norm",
            )
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
        """Where the CLIP model computes: accelerate's execution device when it is offloaded (its parameters
        then sit on ``meta``), else its parameters' device."""
        device = self.vision_tower.device
        if device.type == "meta":  # accelerate hooks the offloaded submodules, each with its execution device
            for module in self.vision_tower.modules():
                execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
                if execution is not None:
                    return torch.device(execution)
        return device

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


def _llava_parts(model: nn.Module) -> tuple[Any, Any]:
    """``(inner LlavaMetaModel, its vision tower)`` (llava-torch is untyped), or a ValueError naming what is expected."""
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


def recorded_settings(config: Any) -> AnchorSettings | None:
    """The :class:`~anchor_former.adapters.settings.AnchorSettings` a LLaVA config records, or None.

    Reads ``config.anchor_former``; a folder saved by an earlier release (``mm_connector_config`` with
    ``connector`` / ``score`` entries, ``mm_anchor_score``, ``mm_anyres_image_budget``) is read as the same
    record. llava-torch's ``extras``: ``select_feature`` and ``projector_type`` (the stock model's
    ``mm_vision_select_feature`` / ``mm_projector_type``) and ``image_budget`` (anyres ``select``).
    """
    settings = AnchorSettings.of(config)
    legacy = getattr(config, CONNECTOR_CONFIG_KEY, None)
    if settings is not None or not isinstance(legacy, Mapping) or "connector" not in legacy:
        return settings
    kwargs = _constructor_kwargs(legacy)
    anyres = getattr(config, "image_aspect_ratio", None) == "anyres"
    # earlier releases overwrote mm_vision_select_feature with "cls_patch"; only "select" kept the stock [CLS]
    stock_cls = not anyres and legacy["connector"] == "select" and bool(kwargs.get("include_cls"))
    extras = {
        "select_feature": "cls_patch" if stock_cls else "patch",
        "projector_type": kwargs.get("projector", "linear"),
    }
    if anyres:
        extras["image_budget"] = getattr(config, "mm_anyres_image_budget", None)
    return AnchorSettings(
        connector=legacy["connector"],
        connector_config=kwargs,
        score=legacy.get("score") or "cls",
        layer=getattr(config, "mm_vision_select_layer", None),
        num_anchors=kwargs.get("num_anchors"),
        num_context=int(kwargs.get("num_context", 0) or 0),
        include_cls=bool(kwargs.get("include_cls")),
        extras=extras,
    )


class _LlavaTorch(Host):
    """The llava-torch family of :func:`~anchor_former.adapters._host.attach` (LLaVA-1.5 and anyres)."""

    name = "LLaVA (llava-torch)"

    def check_model(self, model: nn.Module) -> None:
        _llava_parts(model)

    def recorded(self, model: nn.Module) -> AnchorSettings | None:
        return recorded_settings(model.config)

    def plan(self, model: nn.Module, processor: Any, request: dict[str, Any], recorded: AnchorSettings | None) -> Plan:
        inner, tower = _llava_parts(model)
        config: Any = model.config
        init_projector = request.pop("init_projector")
        if not isinstance(init_projector, bool):
            raise ValueError(f"init_projector must be a bool, got {init_projector!r}")
        attached = isinstance(inner.mm_projector, LlavaConnector)
        if attached and recorded is None:
            raise ValueError(
                "model.get_model().mm_projector is a LlavaConnector but config.anchor_former records no settings; "
                "attach to a stock LLaVA model (or one saved after attach_anchor_former) instead"
            )
        if any(p.device.type == "meta" for p in inner.mm_projector.parameters()):
            raise ValueError(
                "model.get_model().mm_projector must hold its weights to attach (they are on the 'meta' device: "
                "offloaded or not loaded), got parameters on 'meta'; attach before offloading the projector"
            )
        connector, score, num_anchors, request = _requested(request, recorded, self.name)
        extras = dict(recorded.extras) if recorded else {}  # the stock model's strategy, kept from the first attach
        stock = {
            "select_feature": extras.get("select_feature", getattr(config, "mm_vision_select_feature", "patch")),
            "projector_type": extras.get("projector_type", getattr(config, "mm_projector_type", "linear")),
        }
        anyres = getattr(config, "image_aspect_ratio", None) == "anyres"  # LLaVA-NeXT views: see .anyres
        merge = getattr(config, "mm_patch_merge_type", "flat") or "flat"
        if merge != "flat" and not anyres:
            raise ValueError(
                f"config.mm_patch_merge_type must be 'flat' for attach_anchor_former (the connector's tokens are "
                f"not a patch grid that LLaVA's spatial merge could tile), got {merge!r}"
            )
        if not getattr(tower, "is_loaded", True):
            tower.load_model()  # as LLaVA itself would on first use; undone if the attach fails
        new_tower = AnchorVisionTower(tower, score=score)  # raises for CLS-less + "cls", bad layer
        if anyres:
            from anchor_former.adapters.llava._anyres import check_anyres

            stock["image_budget"] = check_anyres(
                config,
                connector,
                request,
                select_feature=stock["select_feature"],
                view_size=int(new_tower.config.image_size),
            )
        elif "image_budget" in request:
            raise ValueError(
                f"image_budget needs config.image_aspect_ratio='anyres', got "
                f"{getattr(config, 'image_aspect_ratio', None)!r}"
            )
        if connector == "select" and not attached:
            _check_select_source(inner.mm_projector, getattr(config, "mm_projector_type", "linear"), init_projector)
        kwargs = _connector_kwargs(
            connector, num_anchors, score, request, new_tower, stock, getattr(config, "mm_projector_type", "linear")
        )
        return Plan(
            connector=connector,
            score=score,
            kwargs=kwargs,
            recorded=recorded,
            previous=inner.mm_projector.connector if attached else None,
            data={
                "inner": inner,
                "tower": new_tower,
                "init_projector": init_projector,
                "anyres": anyres,
                "extras": stock,
            },
        )

    def build(self, model: nn.Module, plan: Plan) -> nn.Module:
        """The new connector on the old projector's device and dtype; warm-started from the model's LLaVA
        projector (``init_projector``) unless a re-attach carries the attached connector's weights over."""
        from anchor_former.connectors import build_connector

        old_projector = plan.data["inner"].mm_projector
        config: Any = model.config
        param = next(iter(old_projector.parameters()), None)
        param = param if param is not None else next(iter(model.parameters()))
        try:
            new = build_connector(
                plan.connector,
                int(config.mm_hidden_size),
                int(config.hidden_size),
                **plan.kwargs,
                device=param.device,
                dtype=param.dtype,
            )
        except TypeError as error:  # an argument the connector does not take
            raise ValueError(
                f"keyword arguments must be arguments of the {plan.connector!r} connector, got "
                f"{sorted(plan.kwargs)}: {error}"
            ) from error
        tower = plan.data["tower"]
        new.num_output_tokens(tower.num_patches + tower.num_prefix_tokens)  # budget checks, before any change
        if plan.previous is None and plan.data["init_projector"]:
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

    def settings(self, model: nn.Module, plan: Plan, connector: nn.Module | None) -> AnchorSettings:
        conn_config: Any = getattr(connector, "config", None)
        kwargs = _constructor_kwargs(conn_config.to_dict() if hasattr(conn_config, "to_dict") else plan.kwargs)
        if _LLAVA_PROJECTORS.match(plan.connector):
            kwargs.pop("projector", None)
        return AnchorSettings(
            connector=plan.connector,
            connector_config=kwargs,
            score=plan.score,
            layer=int(plan.data["tower"].select_layer),
            num_anchors=kwargs.get("num_anchors"),
            num_context=int(kwargs.get("num_context", 0) or 0),
            include_cls=bool(kwargs.get("include_cls", False)),
            extras=plan.data["extras"],
        )

    def install(self, model: nn.Module, settings: AnchorSettings, plan: Plan, connector: nn.Module | None) -> None:
        inner, tower = plan.data["inner"], plan.data["tower"]
        config: Any = model.config
        if not getattr(connector, "uses_anchors", False):
            tower.score = None  # the connector ignores anchors: skip the probe's attention row
        inner.vision_tower = (
            [tower] if isinstance(getattr(inner, "vision_tower", None), list) else tower
        )  # FSDP: a list
        assert connector is not None, "build always returns a connector"
        inner.mm_projector = LlavaConnector(connector)
        config.mm_projector_type = settings.connector  # LLaVA's builder (after register_with_llava) rebuilds it
        setattr(config, CONFIG_KEY, settings.to_dict())
        config.mm_vision_select_feature = settings.extras["select_feature"]  # the stock value, for the stock code
        for key in _LEGACY_KEYS:  # one record: an earlier release's keys go
            config.__dict__.pop(key, None)
        if plan.data["anyres"]:
            from anchor_former.adapters.llava._anyres import anyres_class

            model.__class__ = anyres_class(type(model))

    def modules_to_restore(self, model: nn.Module) -> tuple[Any, ...]:
        inner, _ = _llava_parts(model)
        return (model, inner, model.config)


_HOST = _LlavaTorch()


def _requested(
    request: dict[str, Any], recorded: AnchorSettings | None, host: str
) -> tuple[str, Score, int, dict[str, Any]]:
    """``(connector, score, num_anchors, further arguments)``: the caller's, else the recorded (re-attach,
    by-hand reload; :func:`~anchor_former.adapters._host.merge_recorded`), else the defaults."""
    from anchor_former.connectors import available_connectors

    defaults = recorded or AnchorSettings(connector="acformer", score="cls", num_anchors=144)
    connector = request.pop("connector", defaults.connector)
    score = request.pop("score", defaults.score)
    num_anchors = request.pop("num_anchors", 144 if defaults.num_anchors is None else defaults.num_anchors)
    if connector not in available_connectors() and not _LLAVA_PROJECTORS.match(str(connector)):
        raise ValueError(f"connector must be one of {', '.join(available_connectors())}, got {connector!r}")
    if recorded is not None:
        if "image_budget" not in request and recorded.extras.get("image_budget") is not None:
            request["image_budget"] = recorded.extras["image_budget"]
        request = merge_recorded(request, recorded, connector=connector, score=score, host=host)
    return connector, score, num_anchors, request


def _connector_kwargs(
    connector: str,
    num_anchors: int,
    score: Score,
    request: dict[str, Any],
    tower: AnchorVisionTower,
    stock: dict[str, Any],
    projector_type: Any,
) -> dict[str, Any]:
    """The connector's constructor arguments: the anchor settings (checked against the tower), the output
    MLP of the model's current projector type (so its weights carry over), the tower's prefix tokens."""
    spec = detect_encoder(tower.vision_tower)
    kwargs = anchor_kwargs(
        connector,
        num_anchors,
        tower.num_patches,
        request,
        has_cls=spec.has_cls,
        score=score,
        stock_cls=stock["select_feature"] == "cls_patch",
    )
    if _LLAVA_PROJECTORS.match(str(connector)):
        kwargs.pop("projector", None)  # the name is the projector
    elif "projector" not in kwargs and isinstance(projector_type, str) and _LLAVA_MLPS.match(projector_type):
        kwargs["projector"] = projector_type
    kwargs.setdefault("num_prefix_tokens", spec.num_prefix_tokens)
    return kwargs


#: config keys of an earlier release, replaced by ``config.anchor_former``
_LEGACY_KEYS = (CONNECTOR_CONFIG_KEY, "mm_anchor_score", "mm_anyres_image_budget")


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def attach_anchor_former(
    model: nn.Module,
    *,
    num_anchors: int | None = None,
    connector: str | None = None,
    score: Score | None = None,
    init_projector: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Switch a built LLaVA model to AcFormer (or another connector) in place; returns ``model``.

    Replaces ``model.get_model().vision_tower`` by an :class:`AnchorVisionTower` (same CLIP model, no
    copy) and ``model.get_model().mm_projector`` by a :class:`LlavaConnector`, sets
    ``config.mm_projector_type`` to the connector's name (as LLaVA's training does) and records an
    :class:`~anchor_former.adapters.settings.AnchorSettings` in ``config.anchor_former`` (the connector's
    arguments, the score, and the stock model's ``mm_vision_select_feature`` / ``mm_projector_type``; the
    config's other fields keep the stock values). The LLM then sees ``num_anchors + 1`` visual tokens per
    image (AcFormer).

    Args:
        model: ``LlavaLlamaForCausalLM`` or a sibling (``LlavaMistralForCausalLM``, ...). A delay-loaded
            vision tower is loaded. A model whose config records settings is re-attached (below).
        num_anchors: K anchors (default 144, or the recorded K). ``"acformer"``: [CLS] is added as query
            K + 1; ``"select"``: the LLM sees the K anchor patches (plus ``num_context``). Ignored by the
            other connectors.
        connector: a :func:`~anchor_former.build_connector` name (default ``"acformer"``, or the recorded
            one): ``"acformer"`` (trained AcFormer), ``"select"`` (training-free: the K anchor patches
            through the model's own projector, no new parameters; ``num_context=M`` adds M merged context
            tokens; [CLS] is kept first only where the model's ``mm_vision_select_feature`` is
            ``"cls_patch"``), ``"perceiver"``, ``"avgpool"``, ``"cabstractor"``, ...
        score: anchor score read by the probe at ``mm_vision_select_layer`` (default ``"cls"``, or the
            recorded one): ``"cls"`` ([CLS] attention, as the paper), ``"norm"`` (token norms; encoders
            without [CLS]), ``"received"``.
        init_projector: copy the model's current ``linear`` / ``mlpNx_gelu`` projector weights into the
            connector's output MLP (which by default gets the same type), i.e. warm start from LLaVA-1.5.
        **kwargs: further connector arguments (``depth``, ``heads``, ``dim_head``, ``ff_mult``, ...);
            ``image_budget=B`` with ``image_aspect_ratio="anyres"`` and ``"select"``
            (:mod:`anchor_former.adapters.llava._anyres`).

    Re-attaching (the config records settings) follows the rule of every family: the same ``connector``
    is required, arguments not passed keep their recorded values (``image_budget`` included), and when
    the model is attached now every weight of its connector carries over unchanged (none depends on K;
    ``init_projector`` does not apply). A model loaded by hand from a saved folder (stock modules, recorded
    settings; see docs/llava.md) is attached with the recorded settings by ``attach_anchor_former(model)``.

    Raises:
        ValueError: not a LLaVA model; ``mm_patch_merge_type`` other than ``"flat"`` (AcFormer's tokens
            are not a patch grid) unless ``image_aspect_ratio="anyres"``; unknown connector; ``score="cls"``
            on a tower without [CLS]; ``num_anchors`` (+ ``num_context``) larger than the tower's patch
            count; ``"select"`` on a projector that is not LLaVA's ``linear`` / ``mlp{N}x_gelu``; on
            re-attach, another connector or arguments that change the connector's weight shapes (the
            message names what is attached). The model and its config are unchanged then.
    """
    request = {"num_anchors": num_anchors, "connector": connector, "score": score}
    request = {k: v for k, v in request.items() if v is not None}
    _, tower = _llava_parts(model)
    with restoring(tower):  # planning loads a delay-loaded tower: unloaded again if any step fails
        return attach(_HOST, model, None, init_projector=init_projector, **request, **kwargs)


def _check_select_source(projector: nn.Module, projector_type: Any, init_projector: bool) -> None:
    """``connector="select"`` reuses the model's trained projector: it must be LLaVA's linear / MLP."""
    if not init_projector:
        raise ValueError(
            "connector='select' maps the kept tokens with the model's own trained projector; init_projector=False "
            "would leave it random"
        )
    known = isinstance(projector_type, str) and _LLAVA_MLPS.match(projector_type)
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


from anchor_former.adapters.llava._registration import (  # noqa: E402  (extends the classes above)
    register_with_llava,
    unregister_from_llava,
)
