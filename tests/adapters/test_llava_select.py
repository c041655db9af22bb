"""Training-free ``connector="select"`` on the real llava-torch 1.2.2.post1 (runs only in ``.venv-llava``).

The spine: at full budget (K = every patch, M = 0) the switched model's logits equal the stock model's,
for the batched-tensor and the list-of-images paths.
"""

from __future__ import annotations

import copy

import pytest
import torch

llava = pytest.importorskip("llava")

from _llava_torch import LLM_DIM, NUM_PATCHES, images, make_model, prompt, save_tiny_tower  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.adapters.llava import (  # noqa: E402
    LlavaConnector,
    attach_anchor_former,
    build_vision_projector,
    load_projector_weights,
)
from anchor_former.connectors import SelectConnector  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 0}  # fp32


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return save_tiny_tower(tmp_path_factory.mktemp("clip_tower"))


def logits(model, ids, pixel_values, as_list: bool) -> torch.Tensor:
    batch = list(pixel_values) if as_list else pixel_values
    with torch.no_grad():
        return model(input_ids=ids, images=batch).logits


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
@pytest.mark.parametrize("as_list", [False, True])
def test_full_budget_equals_the_stock_model(tower_dir, as_list, select_feature) -> None:
    stock = make_model(tower_dir, mm_vision_select_feature=select_feature)
    reduced = attach_anchor_former(copy.deepcopy(stock), connector="select", num_anchors=NUM_PATCHES)
    connector = reduced.get_model().mm_projector.connector
    assert isinstance(connector, SelectConnector) and connector.config.include_cls == (select_feature == "cls_patch")
    ids, pixel_values = prompt(2), images(2)
    want = logits(stock, ids, pixel_values, as_list)
    torch.testing.assert_close(logits(reduced, ids, pixel_values, as_list), want, **TOL)
    assert want.shape[1] == ids.shape[1] - 1 + NUM_PATCHES + (select_feature == "cls_patch")


def test_full_budget_identity_catches_a_dropped_token(tower_dir) -> None:
    """The tolerance bites: one patch fewer (and a context token in its place) changes the logits."""
    stock = make_model(tower_dir)
    off = attach_anchor_former(copy.deepcopy(stock), connector="select", num_anchors=NUM_PATCHES - 1, num_context=1)
    ids, pixel_values = prompt(2), images(2)
    got, want = logits(off, ids, pixel_values, False), logits(stock, ids, pixel_values, False)
    assert got.shape == want.shape and (got - want).abs().max() > 1e-3


@pytest.mark.parametrize("as_list", [False, True])
def test_reduced_budget_tokens_are_the_anchor_patches(tower_dir, as_list) -> None:
    k, m = 8, 3
    model = attach_anchor_former(make_model(tower_dir), connector="select", num_anchors=k, num_context=m)
    ids, pixel_values = prompt(2), images(2)
    with torch.no_grad():
        batch = list(pixel_values) if as_list else pixel_values
        _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, batch)
        clip = model.get_model().vision_tower.vision_tower
        eager = clip(pixel_values, output_hidden_states=True, output_attentions=True)
        idx = anchor_search(eager.attentions[-2][:, :, 0], k, include_cls=False)
        expected = model.get_model().mm_projector.connector(eager.hidden_states[-2], idx)
    assert embeds.shape == (2, ids.shape[1] - 1 + k + m, LLM_DIM)
    torch.testing.assert_close(embeds[:, 2 : 2 + k + m], expected, **TOL)
    assert model.config.mm_projector_type == "select"
    settings = model.config.anchor_former
    assert (
        settings["num_anchors"] == k
        and settings["num_context"] == m
        and settings["connector_config"]["num_context"] == m
    )


def test_generate_and_no_new_parameters(tower_dir) -> None:
    stock = make_model(tower_dir)
    model = attach_anchor_former(copy.deepcopy(stock), connector="select", num_anchors=6, num_context=2)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stock.parameters())
    ids = prompt(1)
    out = model.generate(ids, images=images(1), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 1 and out.shape[1] >= 3  # transformers 4.37 may prepend the BOS it starts from
    assert out[0, -3] == logits(model, ids, images(1), False)[0, -1].argmax()


def test_norm_score(tower_dir) -> None:
    model = attach_anchor_former(make_model(tower_dir), connector="select", num_anchors=5, score="norm")
    ids, pixel_values = prompt(2), images(2)
    with torch.no_grad():
        clip = model.get_model().vision_tower.vision_tower
        features = clip(pixel_values, output_hidden_states=True).hidden_states[-2]
        idx = anchor_search(features.norm(dim=-1), 5, include_cls=False)
        expected = model.get_model().mm_projector.connector(features, idx)
        _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixel_values)
    torch.testing.assert_close(embeds[:, 2:7], expected, **TOL)


def test_llava_mm_projector_file_loads_into_the_select_connector(tower_dir, tmp_path) -> None:
    """A LLaVA-1.5 ``mm_projector.bin`` (keys ``model.mm_projector.0/2.*``) loads unchanged."""
    stock = make_model(tower_dir)
    path = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in stock.get_model().mm_projector.state_dict().items()}, path)
    model = make_model(tower_dir)
    torch.nn.init.zeros_(model.get_model().mm_projector[0].weight)
    attach_anchor_former(model, connector="select", num_anchors=NUM_PATCHES)
    assert load_projector_weights(model, path) == "llava_mlp"
    ids, pixel_values = prompt(2), images(2)
    torch.testing.assert_close(logits(model, ids, pixel_values, False), logits(stock, ids, pixel_values, False), **TOL)


def test_recorded_config_rebuilds_the_connector(tower_dir) -> None:
    model = attach_anchor_former(make_model(tower_dir), connector="select", num_anchors=7, num_context=2)
    rebuilt = build_vision_projector(model.config)
    assert (
        isinstance(rebuilt, LlavaConnector)
        and rebuilt.connector.config == model.get_model().mm_projector.connector.config
    )


# --- bad input: clear error, model unchanged ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"num_anchors": NUM_PATCHES + 1},
            rf"num_anchors \+ num_context must be at most the {NUM_PATCHES} patch tokens",
        ),
        ({"num_anchors": 40, "num_context": 10}, rf"at most the {NUM_PATCHES} patch tokens .*got 50"),
        ({"num_anchors": 8, "num_context": -1}, "num_context must be an integer >= 0, got -1"),
        ({"num_anchors": 8, "init_projector": False}, "init_projector=False would leave it random"),
    ],
)
def test_bad_input_changes_nothing(tower_dir, kwargs, match) -> None:
    model = make_model(tower_dir)
    ids, pixel_values = prompt(2), images(2)
    before = logits(model, ids, pixel_values, False)
    modules = (model.get_model().vision_tower, model.get_model().mm_projector)
    config = model.config.to_dict()
    with pytest.raises(ValueError, match=match):
        attach_anchor_former(model, connector="select", **kwargs)
    assert (model.get_model().vision_tower, model.get_model().mm_projector) == modules
    assert model.config.to_dict() == config
    torch.testing.assert_close(logits(model, ids, pixel_values, False), before, rtol=0, atol=0)


def test_projector_the_package_does_not_know_is_refused(tower_dir) -> None:
    model = make_model(tower_dir)
    model.config.mm_projector_type = "qformer_custom"
    with pytest.raises(
        ValueError,
        match=r"connector='select' needs the model's projector to be LLaVA's 'linear' or "
        r"'mlp\{N\}x_gelu'.*got mm_projector_type='qformer_custom'",
    ):
        attach_anchor_former(model, connector="select", num_anchors=8)
    model = attach_anchor_former(make_model(tower_dir), num_anchors=8, depth=1, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="connector must stay 'acformer' when re-attaching.*got 'select'"):
        attach_anchor_former(model, connector="select", num_anchors=8)


def test_padded_batch_equals_each_sample_alone(tower_dir) -> None:
    model = attach_anchor_former(make_model(tower_dir), connector="select", num_anchors=6, num_context=2)
    ids = prompt(2)
    ids[1, 5:] = 0  # sample 1 is 5 tokens long, right-padded with pad_token_id 0
    mask = ids != 0
    mask[:, :5] = True
    pixel_values = images(2)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, images=pixel_values).logits
        for i, length in ((0, 7), (1, 5)):
            alone = model(input_ids=ids[i : i + 1, :length], images=pixel_values[i : i + 1]).logits[0]
            torch.testing.assert_close(batched[i, : alone.shape[0]], alone, **TOL)
