"""Teach the original LLaVA code (``llava-torch`` 1.2.2.post1) this package's connectors, without editing it.

:func:`register_with_llava` replaces six functions of the installed ``llava`` package for the running
process (explicitly, when called; never on import):

* ``llava.model.llava_arch.build_vision_projector`` → :func:`~anchor_former.adapters.llava.build_vision_projector`,
  a superset of LLaVA's (its ``linear`` / ``mlp{N}x_gelu`` / ``identity`` are unchanged), so
  ``mm_projector_type = "acformer"`` (or ``"select"``, ``"perceiver"``, ...) builds a
  :class:`~anchor_former.adapters.llava.LlavaConnector` from the settings recorded in ``config.anchor_former``;
* ``llava.model.llava_arch.build_vision_tower``: for those types, LLaVA's CLIP tower wrapped as an
  :class:`~anchor_former.adapters.llava.AnchorVisionTower` (a :class:`DeferredAnchorVisionTower` while
  LLaVA delays loading the CLIP weights);
* ``LlavaMetaModel.initialize_vision_modules`` (what LLaVA's ``train.py`` calls): records the connector
  settings (``num_anchors``, ``anchor_score``, ``connector_config`` of the model arguments) in the config
  (``config.anchor_former``, an :class:`~anchor_former.adapters.settings.AnchorSettings`) before LLaVA builds
  the projector (replacing a LLaVA projector the model already has, e.g. when
  fine-tuning LLaVA-1.5, whose weights then initialise the connector's output MLP), and loads
  ``--pretrain_mm_mlp_adapter`` with
  :func:`~anchor_former.adapters.llava.load_projector_weights` (safe loading; the layouts it knows: a
  stage-1 ``mm_projector.bin`` with ``model.mm_projector.connector.*`` keys, LLaVA-1.5's
  ``mm_projector.bin`` into the output MLP, the reference AcFormer patch) instead of LLaVA's strict
  ``load_state_dict`` into the projector;
* ``llava.model.builder.load_pretrained_model``: unchanged for every folder (an AcFormer folder reloads
  through the two builders above), plus an optional ``anchor_former={"connector": "select",
  "num_anchors": 144, ...}`` argument that switches the loaded model with
  :func:`~anchor_former.adapters.llava.attach_anchor_former` (the training-free path: a stock LLaVA-1.5
  checkpoint, no connector weights);
* ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`` and ``encode_images``: unchanged, except
  for an attached ``image_aspect_ratio="anyres"`` model, whose images get the anchored views' tokens
  (:func:`~anchor_former.adapters.llava._anyres.anyres_inputs`), so a saved anyres folder reloads by
  ``from_pretrained`` / ``load_pretrained_model`` with every ``mm_patch_merge_type`` and its ``image_budget``.

Calling it again is a no-op; :func:`unregister_from_llava` restores LLaVA's functions.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any, cast

from torch import nn

from anchor_former.adapters.llava import (
    _LLAVA_PROJECTORS,
    AnchorVisionTower,
    LlavaConnector,
    attach_anchor_former,
    build_vision_projector,
    load_projector_weights,
    recorded_settings,
)
from anchor_former.adapters.llava._anyres import AnyresImageTokens, anyres_inputs, is_anchored_anyres
from anchor_former.adapters.settings import CONFIG_KEY, AnchorSettings
from anchor_former.probes import AttentionProbe, Score, detect_encoder

__all__ = ["DeferredAnchorVisionTower", "connector_settings", "register_with_llava", "unregister_from_llava"]

#: LLaVA's functions, saved by register_with_llava: {(module, name): original}
_ORIGINALS: dict[tuple[Any, str], Callable[..., Any]] = {}


def _uses_connector(projector_type: Any) -> bool:
    """Whether ``mm_projector_type`` names one of this package's connectors (not a LLaVA projector)."""
    from anchor_former.connectors import available_connectors

    return (
        isinstance(projector_type, str)
        and not _LLAVA_PROJECTORS.match(projector_type)
        and (projector_type in available_connectors())
    )


class DeferredAnchorVisionTower(AnchorVisionTower):
    """:class:`AnchorVisionTower` around a LLaVA ``CLIPVisionTower`` whose weights are not loaded yet.

    LLaVA builds towers with ``delay_load=True`` when it rebuilds a saved model (``from_pretrained``,
    ``load_pretrained_model``) and loads the CLIP weights later with ``load_model()``. Until then this
    module has no parameters (as LLaVA's tower) and answers ``config`` / ``hidden_size`` from the tower's
    config; ``load_model()`` loads them and makes it a full :class:`AnchorVisionTower`.
    """

    def __init__(self, tower: nn.Module, *, score: Score | None = "cls") -> None:
        nn.Module.__init__(self)
        self._pending: list[Any] = [tower]  # in a list: not a submodule, so no state-dict keys before loading
        self.vision_tower_name = getattr(tower, "vision_tower_name", None)
        self.select_layer = int(self._pending[0].select_layer)  # llava-torch's CLIPVisionTower (untyped)
        self.select_feature = "cls_patch"
        self.score = score
        self.image_processor = None
        self.is_loaded = False

    def load_model(self, device_map: Any = None) -> None:
        """Load the CLIP model and processor as LLaVA's tower does (``device_map`` passed on)."""
        if self.is_loaded:
            return
        tower = self._pending[0]
        tower.load_model(device_map=device_map)
        AttentionProbe(tower.vision_tower, layer=self.select_layer, score=self.score or "norm")  # fail now
        self.vision_tower = tower.vision_tower
        self.image_processor = tower.image_processor
        self._pending.clear()
        self.is_loaded = True

    @property
    def config(self) -> Any:
        return self.vision_tower.config if self.is_loaded else self._pending[0].config


def _score_of(config: Any) -> Score | None:
    settings = recorded_settings(config)
    return cast("Score | None", settings.score if settings is not None else getattr(config, "anchor_score", "cls"))


def _build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> nn.Module:
    """LLaVA's ``build_vision_tower``, wrapped as an anchor tower when the projector type needs one."""
    tower = _ORIGINALS[(_arch(), "build_vision_tower")](vision_tower_cfg, **kwargs)
    if not _uses_connector(getattr(vision_tower_cfg, "mm_projector_type", None)):
        return tower
    score = _score_of(vision_tower_cfg)
    if getattr(tower, "is_loaded", True):
        return AnchorVisionTower(tower, score=score)
    return DeferredAnchorVisionTower(tower, score=score)


def connector_settings(tower: AnchorVisionTower, model_args: Any) -> dict[str, Any]:
    """The connector arguments (``AnchorSettings.connector_config``) for ``model_args.mm_projector_type`` on ``tower``.

    Reads ``model_args.num_anchors`` (default 144; ``acformer`` and ``select``), ``model_args.anchor_score``
    (default ``"cls"``) and ``model_args.connector_config`` (a JSON object or dict of further connector
    arguments, e.g. ``{"depth": 6}``); adds ``num_prefix_tokens`` and, for ``acformer``, ``include_cls``
    from the tower.

    Raises:
        ValueError: ``num_anchors`` not an integer in ``[1, patches]``; ``connector_config`` not a JSON object.
    """
    connector = model_args.mm_projector_type
    extra = getattr(model_args, "connector_config", None) or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as error:
            raise ValueError(f"connector_config must be a JSON object, got {extra!r}: {error}") from error
    if not isinstance(extra, dict):
        raise ValueError(f"connector_config must be a JSON object, got {extra!r}")
    spec = detect_encoder(tower.vision_tower)
    settings: dict[str, Any] = {}
    if connector in ("acformer", "select"):
        num_anchors = getattr(model_args, "num_anchors", 144)
        if (
            isinstance(num_anchors, bool)
            or not isinstance(num_anchors, int)
            or not 1 <= num_anchors <= tower.num_patches
        ):
            raise ValueError(
                f"num_anchors must be an integer in [1, {tower.num_patches}] (the vision tower's patch count), "
                f"got {num_anchors!r}"
            )
        settings["num_anchors"] = num_anchors
        if connector == "acformer":
            settings["include_cls"] = spec.has_cls and tower.score == "cls"
    settings["num_prefix_tokens"] = spec.num_prefix_tokens
    return {**settings, **extra}


def _initialize_vision_modules(self: Any, model_args: Any, fsdp: Any = None) -> None:
    """``LlavaMetaModel.initialize_vision_modules`` for this package's connectors (see the module doc)."""
    original = _ORIGINALS[(_arch().LlavaMetaModel, "initialize_vision_modules")]
    if not _uses_connector(getattr(model_args, "mm_projector_type", None)):
        return original(self, model_args, fsdp=fsdp)
    score = cast(Score, getattr(model_args, "anchor_score", "cls"))
    tower = self.get_vision_tower()
    if tower is None:
        tower = _build_vision_tower(model_args)
    elif not isinstance(tower, AnchorVisionTower):
        if not getattr(tower, "is_loaded", True):
            tower.load_model()
        tower = AnchorVisionTower(tower, score=score)
    else:
        tower.load_model()
    self.vision_tower = [tower] if fsdp else tower  # LLaVA's own branch then only calls load_model (no-op)
    stock = {
        "select_feature": getattr(model_args, "mm_vision_select_feature", "patch"),
        "projector_type": getattr(self.config, "mm_projector_type", None) or "linear",
    }
    connector_name = model_args.mm_projector_type
    settings = AnchorSettings(
        connector=connector_name,
        connector_config=connector_settings(tower, model_args),
        score=score,
        layer=int(tower.select_layer),
        extras=stock,
    )
    setattr(self.config, CONFIG_KEY, settings.to_dict())  # what LLaVA's builder (ours) reads below
    previous = getattr(self, "mm_projector", None)
    if previous is not None and not isinstance(previous, LlavaConnector):
        self.mm_projector = None  # e.g. LLaVA-1.5's mlp2x_gelu: LLaVA builds a projector only where there is none
    args = copy.copy(model_args)
    args.pretrain_mm_mlp_adapter = None  # loaded below, by layout; LLaVA's strict load would reject it
    original(self, args, fsdp=fsdp)
    connector = self.mm_projector.connector
    if previous is not None and not isinstance(previous, LlavaConnector):
        _warm_start(connector, previous)
    config = connector.config.to_dict() if hasattr(getattr(connector, "config", None), "to_dict") else {}
    config = {k: v for k, v in config.items() if k not in ("vision_dim", "llm_dim")} or settings.connector_config
    settings = settings.replace(
        connector_config=config,
        num_anchors=config.get("num_anchors"),
        num_context=int(config.get("num_context", 0) or 0),
        include_cls=bool(config.get("include_cls", False)),
    )
    setattr(self.config, CONFIG_KEY, settings.to_dict())
    if not getattr(connector, "uses_anchors", False):
        tower.score = None  # the connector ignores anchors: skip the probe's attention row
    if model_args.pretrain_mm_mlp_adapter is not None:
        load_projector_weights(self.mm_projector, model_args.pretrain_mm_mlp_adapter)


def _warm_start(connector: nn.Module, projector: nn.Module) -> None:
    """Copy a replaced LLaVA projector into the connector's output MLP when their shapes agree (as
    ``attach_anchor_former(init_projector=True)``): fine-tuning LLaVA-1.5 starts from its trained MLP."""
    target = getattr(connector, "projector", None)
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    if target is not None and shapes and shapes == {k: tuple(v.shape) for k, v in target.state_dict().items()}:
        target.load_state_dict(projector.state_dict())


def _load_pretrained_model(*args: Any, anchor_former: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """``llava.model.builder.load_pretrained_model`` plus ``anchor_former={...}``: keyword arguments of
    :func:`~anchor_former.adapters.llava.attach_anchor_former` applied to the loaded model."""
    import llava.model.builder as builder

    tokenizer, model, image_processor, context_len = _ORIGINALS[(builder, "load_pretrained_model")](*args, **kwargs)
    if anchor_former is not None:
        if not isinstance(anchor_former, dict):
            raise ValueError(f"anchor_former must be a dict of attach_anchor_former arguments, got {anchor_former!r}")
        attach_anchor_former(model, **anchor_former)
    return tokenizer, model, image_processor, context_len


def _prepare_inputs_labels_for_multimodal(
    self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
):
    """LLaVA's, with an attached anyres model's views turned into their tokens first (see the module doc)."""
    if is_anchored_anyres(self):
        images = anyres_inputs(self, input_ids, images, image_sizes)
    original = _ORIGINALS[(_arch().LlavaMetaForCausalLM, "prepare_inputs_labels_for_multimodal")]
    return original(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)


def _encode_images(self, images):
    """LLaVA's, passing :class:`~anchor_former.adapters.llava._anyres.AnyresImageTokens` through."""
    if isinstance(images, AnyresImageTokens):
        return images.tokens
    return _ORIGINALS[(_arch().LlavaMetaForCausalLM, "encode_images")](self, images)


def _arch() -> Any:
    import llava.model.llava_arch as arch

    return arch


def _replacements() -> list[tuple[Any, str, Callable[..., Any]]]:
    import llava.model.builder as builder

    arch = _arch()
    return [
        (arch, "build_vision_projector", build_vision_projector),
        (arch, "build_vision_tower", _build_vision_tower),
        (arch.LlavaMetaModel, "initialize_vision_modules", _initialize_vision_modules),
        (builder, "load_pretrained_model", _load_pretrained_model),
        (arch.LlavaMetaForCausalLM, "prepare_inputs_labels_for_multimodal", _prepare_inputs_labels_for_multimodal),
        (arch.LlavaMetaForCausalLM, "encode_images", _encode_images),
    ]


def register_with_llava() -> None:
    """Make the installed ``llava`` package build, train, save and reload this package's connectors.

    Replaces ``build_vision_projector``, ``build_vision_tower``, ``LlavaMetaModel.initialize_vision_modules``
    and ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`` / ``encode_images`` in
    ``llava.model.llava_arch`` and ``load_pretrained_model`` in ``llava.model.builder`` (see the module
    docstring). Code that imported ``load_pretrained_model`` by name before this call keeps LLaVA's
    (it still reloads AcFormer folders, through the builders). Idempotent.

    Raises:
        ImportError: ``llava`` is not installed.
    """
    for owner, name, function in _replacements():
        if (owner, name) not in _ORIGINALS:
            _ORIGINALS[(owner, name)] = getattr(owner, name)
        setattr(owner, name, function)


def unregister_from_llava() -> None:
    """Put LLaVA's own functions back (undoes :func:`register_with_llava`)."""
    for (owner, name), function in list(_ORIGINALS.items()):
        setattr(owner, name, function)
        del _ORIGINALS[(owner, name)]
