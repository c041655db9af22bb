"""Encoder families: how :func:`detect_encoder` recognises a vision model — and, for advanced use, the
extension API for adding a family.

Everyday use needs only :func:`detect_encoder` (also in :mod:`anchor_former.probes`). Adding a family
(a ViT architecture the built-in families do not cover) is an *extension*: subclass
:class:`EncoderFamily`, describe each attention block with a site from this module
(:class:`QueryKeySite` built from the modules whose outputs are the queries and keys, or
:func:`hf_linear_site`), and :func:`register_encoder_family` an instance. ``docs/probes.md`` walks
through an example; the built-in families in this package are written the same way.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from torch import nn

from anchor_former.probes._spec import (
    AttentionSite,
    EncoderSpec,
    InputLayout,
    MultiheadWeightsSite,
    PackedProjectionSite,
    Projection,
    QueryKeySite,
    SiteCall,
    fused_heads,
    head_major,
    hf_linear_site,
    split_heads,
    submodule,
)

__all__ = [
    "AttentionSite",
    "EncoderFamily",
    "EncoderSpec",
    "InputLayout",
    "MultiheadWeightsSite",
    "PackedProjectionSite",
    "Projection",
    "QueryKeySite",
    "SiteCall",
    "detect_encoder",
    "fused_heads",
    "head_major",
    "hf_linear_site",
    "loaded_classes",
    "modules_of_type",
    "register_encoder_family",
    "registered_families",
    "split_heads",
    "submodule",
]


class EncoderFamily(ABC):
    """One supported encoder family. Subclass, then :func:`register_encoder_family` an instance."""

    #: short name, used in :attr:`EncoderSpec.family` and error messages
    name: str = ""
    #: the model classes it accepts, for error messages
    description: str = ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.description}>"

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (by type; must not import optional libraries)."""

    @abstractmethod
    def describe(self, model: nn.Module) -> EncoderSpec:
        """Describe a matching model; raise ``ValueError`` for an unsupported variant."""


_FAMILIES: list[EncoderFamily] = []


def register_encoder_family(family: EncoderFamily, *, replace: bool = False) -> EncoderFamily:
    """Add a family to the registry (looked up after the ones registered before it).

    Raises:
        ValueError: ``family`` is not an :class:`EncoderFamily` with a non-empty ``name``, or a family of
            that name is registered and ``replace`` is False. With ``replace=True`` the new family takes
            the old one's place in the lookup order.
    """
    if not isinstance(family, EncoderFamily) or not isinstance(family.name, str) or not family.name:
        raise ValueError(f"family must be an EncoderFamily with a non-empty name, got {family!r}")
    names = [f.name for f in _FAMILIES]
    if family.name in names:
        if not replace:
            raise ValueError(
                f"family name {family.name!r} is already registered "
                f"({type(_FAMILIES[names.index(family.name)]).__name__}); "
                f"pass replace=True to replace it, or pick another name; registered: {', '.join(names)}"
            )
        _FAMILIES[names.index(family.name)] = family
    else:
        _FAMILIES.append(family)
    return family


def registered_families() -> tuple[EncoderFamily, ...]:
    """The registered families, in lookup order (each prints as ``<name>: <description>``)."""
    return tuple(_FAMILIES)


def loaded_classes(module_name: str, names: Iterable[str]) -> tuple[type[Any], ...]:
    """The classes ``names`` of ``module_name`` if that module is already imported, else ``()``.

    A model instance of a class implies its module is imported, so families can match by type without
    importing transformers or timm themselves.
    """
    module = sys.modules.get(module_name)
    if module is None:
        return ()
    return tuple(getattr(module, n) for n in names if isinstance(getattr(module, n, None), type))


def modules_of_type(model: nn.Module, classes: tuple[type, ...]) -> tuple[nn.Module, ...]:
    """All submodules of ``model`` that are instances of ``classes``, in registration (= layer) order."""
    return tuple(m for m in model.modules() if isinstance(m, classes))


def detect_encoder(vision_model: nn.Module) -> EncoderSpec:
    """Find the family of ``vision_model`` by type and describe it.

    Raises:
        ValueError: ``vision_model`` is not an ``nn.Module`` of a supported family (the message lists the
            supported families), or its family cannot read an attention of it (a projection that is not a
            module, an offloaded parameter the probe would have to read; the message names it).
    """
    if isinstance(vision_model, nn.Module):
        for family in _FAMILIES:
            if family.matches(vision_model):
                return family.describe(vision_model)
    supported = "; ".join(f"{f.name} ({f.description})" for f in _FAMILIES)
    raise ValueError(
        f"vision_model of type {type(vision_model).__module__}.{type(vision_model).__qualname__} is not a "
        f"supported vision encoder; supported families: {supported}"
    )
