"""``AnchorSettings``: the one settings record of every host family (no host imports needed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from anchor_former.adapters.settings import SETTINGS_VERSION, AnchorSettings, normalise


def test_round_trip_through_json() -> None:
    settings = AnchorSettings(
        connector="acformer",
        connector_config={"num_anchors": 8, "depth": 2},
        score="cls",
        layer=-2,
        num_anchors=8,
        include_cls=True,
        extras={"image_budget": None},
    )
    data = json.loads(json.dumps(settings.to_dict()))
    assert data["version"] == SETTINGS_VERSION
    assert AnchorSettings.from_dict(data) == settings
    with pytest.raises(AttributeError):
        settings.connector = "select"  # frozen


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"connector": "select", "version": 2}, r"settings version must be 0 or 1 \(this release\), got 2"),
        (
            {"connector": "select", "version": 1, "budget": 3},
            r"unknown anchor_former settings keys \['budget'\] for version 1",
        ),
        ({"connector": "select", "typo": 1}, r"unknown anchor_former settings keys \['typo'\] in a version-0 record"),
        ([("connector", "select")], r"anchor_former settings must be a dict, got list"),
        ({"version": 1}, r"anchor_former settings must name the connector, got \{'version': 1\}"),
    ],
)
def test_unknown_versions_and_keys_are_refused(data, match) -> None:
    with pytest.raises(ValueError, match=match):
        AnchorSettings.from_dict(data)


def test_version_0_records_are_converted() -> None:
    """What earlier releases wrote: LLaVA-NeXT (connector_config + anyres) and Qwen-VL (top-level budget)."""
    next_record = {
        "connector": "select",
        "score": "cls",
        "anyres": {"layout": "selected", "num_anchors": 5},
        "connector_config": {"num_anchors": 5, "num_context": 0, "include_cls": False},
    }
    settings = AnchorSettings.from_dict(next_record)
    assert (settings.num_anchors, settings.extras["anyres"]["num_anchors"], settings.version) == (
        5,
        5,
        SETTINGS_VERSION,
    )
    qwen = AnchorSettings.from_dict(
        {"connector": "select", "score": "received", "num_anchors": 0.5, "score_layer": 3, "block_size": 64}
    )
    assert (qwen.num_anchors, qwen.layer, qwen.extras) == (0.5, 3, {"block_size": 64})
    qwen_record = {"connector": "select", "num_anchors": 2, "score_layer": 1}
    config = SimpleNamespace(anchor_former=qwen_record)
    assert normalise(config)["layer"] == 1 and config.anchor_former["version"] == SETTINGS_VERSION
    assert qwen_record["score_layer"] == 1  # the caller's dict is not changed
    with pytest.raises(ValueError, match="config.anchor_former must hold the attached model's settings"):
        normalise(SimpleNamespace(anchor_former=None))
