"""The attach pipeline, written once for every host family (transformers and llava-torch).

:func:`attach` runs the same steps for every family; a family is a :class:`Host` subclass that supplies only
what differs (the shape of PEFT's tuner base class: the procedure lives in the base, each family fills in
its steps; LLaVA-OneVision is the LLaVA-NeXT host with a few methods overridden)::

    check_model   -> is this the family's model (stock or attached)?            raises ValueError
    plan          -> validate every argument against the model; nothing is      raises ValueError,
                     changed                                                    changes nothing
    build         -> the new connector module (or None), with its start
                     weights; on re-attach the attached connector's weights
                     are carried over (carry_over), or a ValueError names what
                     is attached now
    settings      -> the AnchorSettings record of the attached model
    switch_processor -> the processor writes the new token counts; rolled back
                     (class and attributes) if this or any later step fails
    install       -> record the settings in the config, swap the classes, put
                     the connector in place (model, config and submodule slots
                     are restored if it raises)

Key conversions (loading folders whose weights use a checkpoint's own layout) are registered by each family
at import, with :func:`register_key_conversions` for transformers families.

**Re-attach rule** (the same for every family): a model that is already attached can be attached again
with the same connector; connector arguments not passed keep their recorded values
(:func:`merge_recorded`), the attached connector's weights carry over unchanged when the new connector has
the same parameter names and shapes (:func:`carry_over`), and anything else is a ``ValueError`` naming what
is attached now. A failed attach, re-attach included, leaves the model, its config and the processor as they
were.

The family API, for a host added later: subclass :class:`Host`, implement ``check_model``, ``plan``,
``settings`` and ``install`` (``build`` and ``switch_processor`` default to "no connector module" and "no processor"), and
call :func:`attach` from the family's ``attach_anchor_former``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from anchor_former.adapters.settings import AnchorSettings

__all__ = ["Host", "Plan", "attach", "carry_over", "merge_recorded", "register_key_conversions", "restoring"]


@dataclass(frozen=True)
class Plan:
    """What :func:`attach` will do, decided by :meth:`Host.plan` before anything changes.

    Attributes:
        connector: the connector name.
        score: the anchor score.
        kwargs: the connector's constructor arguments (widths excluded), checked.
        recorded: the settings of the model as it is now (a re-attach), else None.
        previous: the attached connector module whose weights carry over (re-attach), else None.
        data: family-specific values computed while planning (budgets, the tower's spec, ...).
    """

    connector: str
    score: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    recorded: AnchorSettings | None = None
    previous: nn.Module | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Host:
    """One host family's steps of :func:`attach` (see the module doc). Stateless: one instance per family."""

    #: the family's name in messages, e.g. ``"LLaVA-NeXT"``
    name: ClassVar[str] = ""

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` is this family's (stock or attached) model."""
        raise NotImplementedError

    def recorded(self, model: nn.Module) -> AnchorSettings | None:
        """The settings an attached ``model`` recorded, None for a stock model."""
        return AnchorSettings.of(model.config)

    def plan(self, model: nn.Module, processor: Any, request: dict[str, Any], recorded: AnchorSettings | None) -> Plan:
        """Validate ``request`` (the caller's keyword arguments) against ``model`` and ``processor``."""
        raise NotImplementedError

    def build(self, model: nn.Module, plan: Plan) -> nn.Module | None:
        """The new connector with its start weights (before :func:`carry_over`), or None (no module)."""
        return None

    def settings(self, model: nn.Module, plan: Plan, connector: nn.Module | None) -> AnchorSettings:
        """The record of what the attached model will do (the connector's full config included)."""
        raise NotImplementedError

    def switch_processor(
        self, processor: Any, settings: AnchorSettings, plan: Plan, connector: nn.Module | None
    ) -> None:
        """Make ``processor`` write the attached model's token counts (may raise; :func:`attach` rolls back)."""

    def install(self, model: nn.Module, settings: AnchorSettings, plan: Plan, connector: nn.Module | None) -> None:
        """Record ``settings`` in the config, swap the classes, put ``connector`` in place."""
        raise NotImplementedError

    def modules_to_restore(self, model: nn.Module) -> tuple[nn.Module, ...]:
        """The modules :meth:`install` changes (class, attributes, submodules); restored if it raises."""
        return (model,)


def attach(host: Host, model: nn.Module, processor: Any = None, **request: Any) -> nn.Module:
    """Run the pipeline of ``host`` on ``model`` (and ``processor``); returns ``model``, switched in place.

    Raises:
        ValueError: from any step; the model, its config and the processor are unchanged then.
    """
    host.check_model(model)
    recorded = host.recorded(model)
    plan = host.plan(model, processor, dict(request), recorded)
    connector = host.build(model, plan)
    if plan.previous is not None and connector is not None:
        carry_over(connector, plan.previous, recorded, host.name)
    settings = host.settings(model, plan, connector)
    with restoring(processor), restoring(*host.modules_to_restore(model)):
        if processor is not None:
            host.switch_processor(processor, settings, plan, connector)
        host.install(model, settings, plan, connector)
    return model


@contextlib.contextmanager
def restoring(*objects: Any) -> Iterator[None]:
    """Put back the class and the attributes (and an ``nn.Module``'s submodules, parameters and buffers) of
    ``objects`` if the body raises. Shallow: objects the attributes point to are not copied."""
    saved = []
    for obj in objects:
        if obj is None:
            continue
        slots = {
            name: dict(getattr(obj, name))
            for name in ("_modules", "_parameters", "_buffers")
            if isinstance(obj, nn.Module)
        }
        saved.append((obj, obj.__class__, dict(obj.__dict__), slots))
    try:
        yield
    except BaseException:
        for obj, cls, attributes, slots in saved:
            obj.__class__ = cls
            obj.__dict__.clear()
            obj.__dict__.update(attributes)
            for name, values in slots.items():
                getattr(obj, name).clear()
                getattr(obj, name).update(values)
        raise


def merge_recorded(
    request: dict[str, Any], recorded: AnchorSettings, *, connector: str, score: str, host: str
) -> dict[str, Any]:
    """The connector arguments of a re-attach: the recorded ones, overridden by ``request``.

    ``num_anchors`` is always the request's; ``include_cls`` is recomputed when the score changes.

    Raises:
        ValueError: ``connector`` is not the attached connector (the message names it and its settings).
    """
    if connector != recorded.connector:
        raise ValueError(
            f"connector must stay {recorded.connector!r} when re-attaching (the model is already attached: "
            f"{describe(recorded)}; its connector's weights carry over), got {connector!r}; to switch connectors, "
            f"attach to a stock {host} model (from_pretrained of the base model) instead"
        )
    recompute = ("num_anchors", "vision_dim", "llm_dim") + (("include_cls",) if score != recorded.score else ())
    inherited = {k: v for k, v in recorded.connector_config.items() if k not in recompute}
    return {**inherited, **request}


def carry_over(new: nn.Module, previous: nn.Module, recorded: AnchorSettings | None, host: str) -> None:
    """Load ``previous``'s weights into ``new`` (re-attach), or raise ``ValueError`` naming what is attached."""
    from anchor_former.checkpoint import CheckpointError, load_checked

    try:
        load_checked(new, previous.state_dict(), what="the attached connector")
    except CheckpointError as error:
        now = describe(recorded) if recorded is not None else type(previous).__name__
        raise ValueError(
            f"re-attaching keeps the attached connector's weights, so its architecture must stay the same "
            f"(attached now: {now}): {error}; to change it, attach to a stock {host} model instead"
        ) from error


def describe(settings: AnchorSettings) -> str:
    """``connector='acformer', num_anchors=8, score='cls', depth=2, ...`` for messages."""
    parts = {"connector": settings.connector, "num_anchors": settings.num_anchors, "score": settings.score}
    parts.update(
        {k: v for k, v in settings.connector_config.items() if k not in parts and k not in ("vision_dim", "llm_dim")}
    )
    parts.update(settings.extras)
    return ", ".join(f"{k}={v!r}" for k, v in parts.items() if v is not None)


def register_key_conversions(pairs: Mapping[str, str]) -> None:
    """Give each of our model types / class names the checkpoint key conversions transformers has for the
    stock one (``{"anchor_former_llava_next": "llava_next", "AnchorFormerLlavaNextModel": "LlavaNextModel",
    ...}``).

    transformers 5 renames the keys of hub-layout checkpoints at load (``language_model.model.*`` ->
    ``model.language_model.*``, Qwen's ``model.*`` -> ``model.language_model.*``, ...), registered per
    model type and class name, and writes those names again when a model loaded that way is saved.
    Without the same rules under our names, reloading such a folder would leave the language model randomly
    initialised. Idempotent; a no-op for names transformers has no rules for.
    """
    from transformers import conversion_mapping as mapping

    for ours, theirs in pairs.items():
        rules = mapping.get_checkpoint_conversion_mapping(theirs)
        if rules is not None:
            mapping.register_checkpoint_conversion_mapping(ours, rules, overwrite=True)
