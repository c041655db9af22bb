"""Every connector round-trips through its config with one ``from_config`` signature, and reads its own checkpoints."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from anchor_former import available_connectors, build_connector
from anchor_former.connectors import AnchorFormer, Connector

D, LLM = 16, 24
TINY = {
    "acformer": dict(num_anchors=8, depth=2, heads=2, dim_head=8, ff_mult=2, fused_attn=False),
    "perceiver": dict(num_queries=5, depth=1, heads=2, dim_head=8, ff_mult=2, gradient_checkpointing=True),
    "cabstractor": dict(depth=1, grid=2, num_patches=36),
    "select": dict(num_anchors=8, num_context=2, include_cls=True),
    "avgpool": dict(pool=3),
}
NAMES = [*available_connectors(), "mlp3x_gelu"]


def build(name: str) -> Connector:
    torch.manual_seed(0)
    return build_connector(name, D, D if name == "identity" else LLM, **TINY.get(name, {}))


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_one_from_config_signature() -> None:
    classes = {type(build(name)) for name in NAMES}
    assert len(classes) == 6  # acformer, avgpool, cabstractor, mlp, perceiver, select
    for cls in classes:
        assert cls.from_config.__func__ is Connector.from_config.__func__, cls
        assert type(cls.config) is property
    assert str(inspect.signature(Connector.from_config)) == (
        "(config: 'ConnectorConfig | Mapping[str, Any]', *, device: 'torch.device | str | None' = None, "
        "dtype: 'torch.dtype | None' = None) -> 'M'"
    )


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name: str) -> None:
    connector = build(name)
    config = connector.config
    assert isinstance(config, type(connector).config_class)
    for source in (config, config.to_dict(), json.loads(config.to_json())):
        clone = type(connector).from_config(source)
        assert type(clone) is type(connector) and clone.config == config
        assert shapes(clone) == shapes(connector)  # the same keys and shapes: a state dict loads as it is
        clone.load_state_dict(connector.state_dict())
    assert type(config).from_dict(config.to_dict()) == config
    assert type(config).from_json(config.to_json()) == config


def test_runtime_switches_are_in_the_config() -> None:
    former = build("acformer")
    assert former.config.fused_attn is False
    former.fused_attn = True
    assert AnchorFormer.from_config(former.config).fused_attn is True


@pytest.mark.parametrize("name", ["acformer", "select", "mlp2x_gelu"])
def test_from_config_places_parameters(name: str) -> None:
    connector = build(name)
    clone = type(connector).from_config(connector.config, device="cpu", dtype=torch.float64)
    assert {p.dtype for p in clone.parameters()} == {torch.float64}
    assert all(
        p.device.type == "meta" for p in type(connector).from_config(connector.config, device="meta").parameters()
    )


@pytest.mark.parametrize("name", NAMES)
def test_bad_configs_are_named(name: str) -> None:
    connector = build(name)
    cls, config = type(connector), connector.config
    before = {k: v.clone() for k, v in connector.state_dict().items()}
    with pytest.raises(
        ValueError, match=rf"unknown {type(config).__name__} keys \['bogus'\]; known keys: \[.*'vision_dim'"
    ):
        cls.from_config({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"vision_dim must be .*got 0"):
        cls.from_config({**config.to_dict(), "vision_dim": 0})
    other = next(build(n).config for n in NAMES if type(build(n)) is not cls)
    with pytest.raises(
        ValueError,
        match=rf"config must be a {type(config).__name__} \(or its dict\) for "
        rf"{cls.__name__}, got {type(other).__name__}",
    ):
        cls.from_config(other)
    with pytest.raises(ValueError, match=rf"config must be a {type(config).__name__} .*got str"):
        cls.from_config("mlp2x_gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"data must be a mapping of {type(config).__name__} fields, got list"):
        type(config).from_dict([("vision_dim", 4)])  # type: ignore[arg-type]
    assert connector.config == config
    assert all(torch.equal(v, before[k]) for k, v in connector.state_dict().items())


@pytest.mark.parametrize("name", [n for n in NAMES if n != "identity"])
def test_convert_checkpoint_reads_its_own_and_llava_layouts(name: str) -> None:
    connector = build(name)
    own = connector.state_dict()
    for prefix in ("", "model.mm_projector.", "model.mm_projector.connector."):
        converted, layout = connector.convert_checkpoint({prefix + k: v for k, v in own.items()})
        assert layout == "anchor_former" and converted.keys() == own.keys()
    llava = {f"model.mm_projector.{k}": v for k, v in connector.projector.state_dict().items()}
    converted, layout = connector.convert_checkpoint(llava)
    assert layout == "llava_mlp" and set(converted) == {f"projector.{k}" for k in connector.projector.state_dict()}


def test_a_llava_linear_projector_loads() -> None:
    """LLaVA-1's ``linear`` projector is a bare nn.Linear: keys ``mm_projector.weight`` / ``.bias``."""
    from anchor_former.checkpoint import load_connector_weights

    source = torch.nn.Linear(D, LLM)
    state = {f"model.mm_projector.{k}": v for k, v in source.state_dict().items()}
    connector = build("linear")
    assert load_connector_weights(connector, state) == "llava_mlp"
    assert torch.equal(connector.projector.weight, source.weight)
    bare = torch.nn.Linear(D, LLM)
    assert load_connector_weights(bare, state) == "llava_mlp" and torch.equal(bare.bias, source.bias)
