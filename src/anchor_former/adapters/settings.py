"""One record of what an attached model does, the same for every host family.

:class:`AnchorSettings` is written by every ``attach_anchor_former`` into the model's config, under one key
(:data:`CONFIG_KEY`, ``config.anchor_former``, a plain JSON dict from :meth:`AnchorSettings.to_dict`), and
read back by every reload path (``from_pretrained``, the Auto classes, the processors, a re-attach) with
:meth:`AnchorSettings.from_dict`, which refuses versions and keys it does not know, so a folder written by
a newer release fails loudly instead of loading with settings silently dropped.

Fields shared by all families: ``connector`` (a :func:`~anchor_former.build_connector` name) and
``connector_config`` (its constructor arguments, widths excluded), ``score``, ``layer`` (the vision layer
the probe reads), and the anchor budget ``num_anchors`` / ``num_context`` / ``include_cls``. What only one
family needs goes into ``extras`` (documented by that family's module; e.g. LLaVA-NeXT's ``image_budget``,
OneVision's ``frame_anchors``, Qwen-VL's ``block_size``, llava-torch anyres's ``views`` layout).

Folders saved before the record had a version (a dict with ``connector`` / ``score`` / ``connector_config``
and family keys, no ``version``) are read as version 0 and converted.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CONFIG_KEY", "SETTINGS_VERSION", "AnchorSettings"]

#: the config attribute (and ``config.json`` key) holding :meth:`AnchorSettings.to_dict`
CONFIG_KEY = "anchor_former"
#: the version :meth:`AnchorSettings.to_dict` writes; :meth:`AnchorSettings.from_dict` reads 0 (legacy) and this
SETTINGS_VERSION = 1

# version-0 records: keys that were written beside connector / score / connector_config (all move to extras,
# except the Qwen budget and score layer, which became fields)
_LEGACY_EXTRAS = ("anyres", "video", "image_budget", "frame_anchors", "block_size")


@dataclass(frozen=True, kw_only=True)
class AnchorSettings:
    """What an attached model does; frozen, JSON round trip through :meth:`to_dict` / :meth:`from_dict`.

    Attributes:
        connector: the connector name (``"acformer"``, ``"select"``, ``"perceiver"``, ...).
        connector_config: the connector's constructor arguments, ``vision_dim`` / ``llm_dim`` excluded (they
            come from the model's configs); empty for a family whose "connector" has no module (Qwen-VL).
        score: the anchor score (``"cls"``, ``"norm"``, ``"map"``, ``"received"``).
        layer: the vision layer the probe reads: a ``hidden_states`` index (LLaVA families) or a block index
            (Qwen-VL's ``score_layer``); None where the family has no such choice.
        num_anchors: K anchors per image / view (an int), or for Qwen-VL a fraction in (0, 1]; None for
            connectors without anchors.
        num_context: merged context tokens (``"select"``), else 0.
        include_cls: [CLS] is the first token the connector gives.
        extras: family-specific settings, JSON values only (see the family's module).
        version: the record's format version, :data:`SETTINGS_VERSION`.
    """

    connector: str
    connector_config: dict[str, Any] = field(default_factory=dict)
    score: str = "cls"
    layer: int | None = None
    num_anchors: int | float | None = None
    num_context: int = 0
    include_cls: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    version: int = SETTINGS_VERSION

    def __post_init__(self) -> None:
        if self.version != SETTINGS_VERSION:
            raise ValueError(f"AnchorSettings version must be {SETTINGS_VERSION}, got {self.version!r}")
        if not isinstance(self.connector, str) or not self.connector:
            raise ValueError(f"AnchorSettings.connector must be a connector name, got {self.connector!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-serialisable dict (deep copy), ``version`` included."""
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnchorSettings:
        """The record :meth:`to_dict` wrote (or a version-0 record of an earlier release).

        Raises:
            ValueError: not a mapping, an unknown ``version``, or keys this version does not define.
        """
        if isinstance(data, AnchorSettings):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"{CONFIG_KEY} settings must be a dict, got {type(data).__name__}")
        record: dict[str, Any] = copy.deepcopy(dict(data))
        version = record.get("version", 0)
        if version == 0:
            record = _from_version_0(record)
        elif version != SETTINGS_VERSION:
            raise ValueError(
                f"{CONFIG_KEY} settings version must be 0 or {SETTINGS_VERSION} (this release), got {version!r}; "
                "the folder was written by a newer anchor_former"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise ValueError(
                f"unknown {CONFIG_KEY} settings keys {unknown} for version {version}; known: {sorted(names)}"
            )
        if record.get("connector") is None:
            raise ValueError(f"{CONFIG_KEY} settings must name the connector, got {record!r}")
        return cls(**record)

    def replace(self, **changes: Any) -> AnchorSettings:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, config: Any) -> AnchorSettings | None:
        """The settings recorded in ``config`` (a transformers or LLaVA config), or None if it has none."""
        data = getattr(config, CONFIG_KEY, None)
        return None if data is None else cls.from_dict(data)


def normalise(config: Any) -> dict[str, Any]:
    """Rewrite ``config.anchor_former`` as the current version's dict (checked; a version-0 record is
    converted) and return it. Models call this once when they are built, so their forward reads plain dict
    entries (which ``torch.compile`` traces) instead of parsing the record per call.

    Raises:
        ValueError: the config has no settings, or :meth:`AnchorSettings.from_dict` refuses them.
    """
    settings = AnchorSettings.of(config)
    if settings is None:
        raise ValueError(
            f"config.{CONFIG_KEY} must hold the attached model's settings; build the model with attach_anchor_former"
        )
    record = settings.to_dict()
    setattr(config, CONFIG_KEY, record)
    return record


def _from_version_0(data: dict[str, Any]) -> dict[str, Any]:
    """A record written before :data:`SETTINGS_VERSION` 1 (``{"connector", "score", "connector_config", ...}``)."""
    out: dict[str, Any] = {"connector": data.pop("connector", None), "score": data.pop("score", "cls")}
    config = dict(data.pop("connector_config", None) or {})
    out["connector_config"] = config
    extras = {k: data.pop(k) for k in _LEGACY_EXTRAS if k in data}
    if "num_anchors" in data:  # Qwen-VL kept its budget at the top level
        out["num_anchors"] = data.pop("num_anchors")
    else:
        out["num_anchors"] = config.get("num_anchors")
    if "score_layer" in data:
        out["layer"] = data.pop("score_layer")
    out["num_context"] = int(config.get("num_context", 0) or 0)
    out["include_cls"] = bool(config.get("include_cls", False))
    if data:
        raise ValueError(f"unknown {CONFIG_KEY} settings keys {sorted(data)} in a version-0 record")
    out["extras"] = extras
    return out
