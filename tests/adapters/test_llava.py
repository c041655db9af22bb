"""The LLaVA adapter against the real llava-torch 1.2.2.post1 (runs only in ``.venv-llava``).

Run: ``.venv-llava/bin/python -m pytest tests/adapters/test_llava.py -q``. Skips where llava is absent.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

llava = pytest.importorskip("llava")

from _llava_torch import (  # noqa: E402
    CONNECTOR,
    IMAGE,
    LLM_DIM,
    NUM_PATCHES,
    PATCH,
    VISION_DIM,
    K,
    images,
    llava_config,
    make_model,
    prompt,
    save_tiny_tower,
)
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # noqa: E402
from llava.model.multimodal_projector.builder import build_vision_projector as llava_build_vision_projector  # noqa: E402

from anchor_former.adapters.llava import (  # noqa: E402
    AnchoredFeatures,
    AnchorVisionTower,
    LlavaConnector,
    attach_anchor_former,
    build_vision_projector,
    load_projector_weights,
    save_projector_weights,
)
from anchor_former.checkpoint import CheckpointError, save_state_dict  # noqa: E402
from anchor_former.connectors import AnchorFormer  # noqa: E402
from anchor_former.search import anchor_search  # noqa: E402


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A saved tiny CLIPVisionModel + CLIPImageProcessor, what ``mm_vision_tower`` points at."""
    return save_tiny_tower(tmp_path_factory.mktemp("clip_tower"))


def enabled(tower_dir: str) -> LlavaLlamaForCausalLM:
    return attach_anchor_former(make_model(tower_dir), num_anchors=K, **CONNECTOR)


def reference_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The reference path: eager CLIP with output_attentions, the [CLS] row of the selected layer,
    anchor_search, then the connector on explicit indices."""
    clip = model.get_model().vision_tower.vision_tower
    connector = model.get_model().mm_projector.connector
    with torch.no_grad():
        out = clip(pixel_values, output_hidden_states=True, output_attentions=True)
        features = out.hidden_states[-2]  # (B, N, D)
        cls_row = out.attentions[-2][:, :, 0]  # (B, H, N): the layer that produced hidden_states[-2]
        idx = anchor_search(cls_row, K)
        return connector(features, idx)


# --- build_vision_projector ------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu", "mlp3x_gelu", "identity"])
def test_build_vision_projector_matches_llava_modules_and_keys(projector_type) -> None:
    dim = LLM_DIM if projector_type == "identity" else VISION_DIM
    config = types.SimpleNamespace(mm_projector_type=projector_type, mm_hidden_size=dim, hidden_size=LLM_DIM)
    ours, theirs = build_vision_projector(config), llava_build_vision_projector(config)
    assert [type(m).__name__ for m in ours.modules()][1:] == [type(m).__name__ for m in theirs.modules()][1:]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    x = torch.randn(2, 5, dim)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)


def test_build_vision_projector_acformer_from_config_keys() -> None:
    from anchor_former.adapters.settings import AnchorSettings

    settings = AnchorSettings(connector="acformer", connector_config={"num_anchors": K, **CONNECTOR}, num_anchors=K)
    config = types.SimpleNamespace(
        mm_projector_type="acformer", mm_hidden_size=VISION_DIM, hidden_size=LLM_DIM, anchor_former=settings.to_dict()
    )
    projector = build_vision_projector(config)
    assert isinstance(projector, LlavaConnector) and isinstance(projector.connector, AnchorFormer)
    assert projector.connector.config.num_anchors == K and projector.connector.config.depth == 2
    assert build_vision_projector(config, depth=1).connector.config.depth == 1  # kwargs override the config


def test_build_vision_projector_unknown_type_lists_the_known_ones() -> None:
    config = types.SimpleNamespace(mm_projector_type="qformer", mm_hidden_size=VISION_DIM, hidden_size=LLM_DIM)
    with pytest.raises(
        ValueError, match=r"mm_projector_type must be one of .*acformer.*cabstractor.*mlp\{N\}x_gelu.*got 'qformer'"
    ):
        build_vision_projector(config)


# --- attach_anchor_former --------------------------------------------------------------------------------


def test_enable_swaps_modules_keeps_tower_keys_and_warm_starts_mlp(tower_dir) -> None:
    model = make_model(tower_dir)
    old_mlp = {k: v.clone() for k, v in model.get_model().mm_projector.state_dict().items()}
    tower_keys = {k for k in model.state_dict() if ".vision_tower." in k}
    attach_anchor_former(model, num_anchors=K, **CONNECTOR)
    inner = model.get_model()
    assert isinstance(inner.vision_tower, AnchorVisionTower) and isinstance(inner.mm_projector, LlavaConnector)
    assert {k for k in model.state_dict() if ".vision_tower." in k} == tower_keys
    for k, v in inner.mm_projector.connector.projector.state_dict().items():
        torch.testing.assert_close(v, old_mlp[k], atol=0, rtol=0)
    assert model.config.mm_projector_type == "acformer"
    settings = model.config.anchor_former
    assert settings["connector_config"]["num_anchors"] == K and settings["extras"]["select_feature"] == "patch"
    assert model.config.mm_vision_select_feature == "patch"  # the stock value stays
    # the recorded config rebuilds the same connector
    rebuilt = build_vision_projector(model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in inner.mm_projector.state_dict().items()
    }


def test_encode_images_matches_the_eager_reference(tower_dir) -> None:
    model = enabled(tower_dir)
    pixel_values = images(3)
    with torch.no_grad():
        tokens = model.encode_images(pixel_values)
    assert tokens.shape == (3, K + 1, LLM_DIM)
    torch.testing.assert_close(tokens, reference_tokens(model, pixel_values), atol=1e-5, rtol=1e-5)


def test_tower_outputs_features_with_cls_and_list_path(tower_dir) -> None:
    model = enabled(tower_dir)
    tower = model.get_vision_tower()
    pixel_values = images(2)
    out = tower(pixel_values)
    assert isinstance(out, AnchoredFeatures)
    assert out.features.shape == (2, 1 + NUM_PATCHES, VISION_DIM) and out.scores.shape == (2, 4, 1 + NUM_PATCHES)
    listed = tower([pixel_values[0], pixel_values[1:2]])
    assert len(listed) == 2 and listed[0].features.shape == (1, 1 + NUM_PATCHES, VISION_DIM)
    torch.testing.assert_close(torch.cat([x.features for x in listed]), out.features, atol=1e-5, rtol=1e-5)
    projected = model.get_model().mm_projector(listed)
    assert [p.shape for p in projected] == [(1, K + 1, LLM_DIM)] * 2


@pytest.mark.parametrize("as_list", [False, True])
def test_llm_sees_num_anchors_plus_one_tokens(tower_dir, as_list) -> None:
    model = enabled(tower_dir)
    ids, pixel_values = prompt(2), images(2)
    batch_images = list(pixel_values) if as_list else pixel_values
    with torch.no_grad():
        _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, batch_images)
        expected_image = reference_tokens(model, pixel_values)
    assert embeds.shape == (2, ids.shape[1] - 1 + K + 1, LLM_DIM)
    torch.testing.assert_close(embeds[:, 2 : 2 + K + 1], expected_image, atol=1e-5, rtol=1e-5)


def test_training_step_reaches_the_connector(tower_dir) -> None:
    model = enabled(tower_dir).train()
    ids = prompt(2)
    labels = ids.clone()
    labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels, images=images(2))
    assert out.logits.shape == (2, ids.shape[1] - 1 + K + 1, 64) and torch.isfinite(out.loss)
    out.loss.backward()
    connector = model.get_model().mm_projector.connector
    for name, p in connector.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in connector.layers.parameters())
    assert all(p.grad is None for p in model.get_vision_tower().parameters())  # tower frozen, as in LLaVA


def test_generate(tower_dir) -> None:
    model = enabled(tower_dir)
    ids = prompt(1)
    pixel_values = images(1)
    out = model.generate(ids, images=pixel_values, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 1 and out.shape[1] >= 3  # transformers 4.37 may prepend the BOS it starts from
    with torch.no_grad():  # greedy: the first new token is the argmax after the prompt with K + 1 image tokens
        logits = model(input_ids=ids, images=pixel_values).logits
    assert logits.shape[1] == ids.shape[1] - 1 + K + 1
    assert out[0, -3] == logits[0, -1].argmax()


# --- weights ---------------------------------------------------------------------------------------------


def test_llava15_mm_projector_bin_warm_starts(tower_dir, tmp_path) -> None:
    model = enabled(tower_dir)
    mlp = nn.Sequential(nn.Linear(VISION_DIM, LLM_DIM), nn.GELU(), nn.Linear(LLM_DIM, LLM_DIM))
    path = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v.half() for k, v in mlp.state_dict().items()}, path)
    layers_before = {k: v.clone() for k, v in model.get_model().mm_projector.connector.layers.state_dict().items()}
    assert load_projector_weights(model, path) == "llava_mlp"
    connector = model.get_model().mm_projector.connector
    for k, v in connector.projector.state_dict().items():
        torch.testing.assert_close(v, mlp.state_dict()[k].half().float(), atol=0, rtol=0)
    for k, v in connector.layers.state_dict().items():
        torch.testing.assert_close(v, layers_before[k], atol=0, rtol=0)


def test_save_and_load_connector_round_trip(tower_dir, tmp_path) -> None:
    trained = enabled(tower_dir)
    for p in trained.get_model().mm_projector.parameters():
        nn.init.normal_(p, std=0.2)
    path = tmp_path / "connector.safetensors"
    save_projector_weights(trained, path)
    fresh = enabled(tower_dir)
    assert load_projector_weights(fresh, path) == "anchor_former"
    pixel_values = images(2)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.encode_images(pixel_values), trained.encode_images(pixel_values), atol=0, rtol=0
        )


def test_checkpoint_that_does_not_fit_is_named_and_model_unchanged(tower_dir, tmp_path) -> None:
    model = enabled(tower_dir)
    before = {k: v.clone() for k, v in model.get_model().mm_projector.state_dict().items()}
    path = tmp_path / "wrong.safetensors"
    save_state_dict(
        {
            "model.mm_projector.0.weight": torch.zeros(LLM_DIM, VISION_DIM + 1),
            "model.mm_projector.0.bias": torch.zeros(LLM_DIM),
        },
        path,
    )
    with pytest.raises(CheckpointError, match=r"projector\.0\.weight: checkpoint \(48, 33\) vs module \(48, 32\)"):
        load_projector_weights(model, path)
    for k, v in model.get_model().mm_projector.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


# --- bad input -------------------------------------------------------------------------------------------


def test_errors(tower_dir) -> None:
    with pytest.raises(ValueError, match=r"model must be a built LLaVA model .*got torch\.nn\.modules\.linear\.Linear"):
        attach_anchor_former(nn.Linear(2, 2))
    model = make_model(tower_dir)
    with pytest.raises(
        ValueError, match=rf"num_anchors must be at most the {NUM_PATCHES} patch tokens of the vision tower, got 50"
    ):
        attach_anchor_former(model, num_anchors=50)
    with pytest.raises(ValueError, match="connector must be one of .*got 'qformer'"):
        attach_anchor_former(model, connector="qformer")
    assert isinstance(model.get_model().mm_projector, nn.Sequential)  # unchanged after the failures
    spatial = make_model(tower_dir, mm_patch_merge_type="spatial_unpad")
    with pytest.raises(ValueError, match="mm_patch_merge_type must be 'flat'.*got 'spatial_unpad'"):
        attach_anchor_former(spatial, num_anchors=K)
    enabled_model = enabled(tower_dir)
    with pytest.raises(
        ValueError, match=r"LlavaConnector needs AnchoredFeatures .*got a tensor of shape \(1, 49, 32\)"
    ):
        enabled_model.get_model().mm_projector(torch.zeros(1, NUM_PATCHES, VISION_DIM))


def test_cls_less_tower_asked_for_cls_anchors() -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    siglip = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=VISION_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE,
            patch_size=PATCH,
        )
    )
    tower = types.SimpleNamespace(vision_tower=siglip, select_layer=-2, image_processor=None)
    with pytest.raises(ValueError, match=r"score='cls' needs a \[CLS\] token"):
        AnchorVisionTower(tower, score="cls")
    norm_tower = AnchorVisionTower(tower, score="norm")
    out = norm_tower(images(1))
    assert out.features.shape == (1, NUM_PATCHES, VISION_DIM) and out.scores.shape == (1, NUM_PATCHES)


def to_reference_layout(connector: AnchorFormer) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the reference patch's ``mm_projector`` layout (the authors' resampler keys, see docs/connectors.md)."""
    out = {"model.mm_projector.0.latents": torch.randn(K, VISION_DIM)}  # the reference's unused parameter
    for key, value in connector.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers":
            sub = "0" if parts[2] == "attn" else "1"
            ref = f"0.layers.{parts[1]}.{sub}.{'.'.join(parts[3:])}"
        elif parts[0] == "norm":
            ref = f"0.{key}"
        else:  # projector.{0,2}.* -> {1,3}.*
            ref = f"{int(parts[1]) + 1}.{parts[2]}"
        out[f"model.mm_projector.{ref}"] = value.clone()
    return out


def test_reference_acformer_checkpoint_loads_into_the_llava_model(tower_dir, tmp_path) -> None:
    trained = enabled(tower_dir)
    for p in trained.get_model().mm_projector.parameters():
        nn.init.normal_(p, std=0.2)
    path = tmp_path / "mm_projector.bin"
    torch.save(to_reference_layout(trained.get_model().mm_projector.connector), path)
    fresh = enabled(tower_dir)
    assert load_projector_weights(fresh, path) == "reference_acformer"
    pixel_values = images(2)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.encode_images(pixel_values), trained.encode_images(pixel_values), atol=0, rtol=0
        )


def test_save_pretrained_then_rebuild_and_load(tower_dir, tmp_path) -> None:
    """The documented reload of a whole saved model: LLaVA's own builder does not know 'acformer', so
    load with the base projector type, attach (the recorded settings), then load the weights."""
    trained = enabled(tower_dir)
    for p in trained.get_model().mm_projector.parameters():
        nn.init.normal_(p, std=0.2)
    trained.save_pretrained(tmp_path)
    model = LlavaLlamaForCausalLM.from_pretrained(tmp_path, mm_projector_type="mlp2x_gelu").eval()
    model.get_vision_tower().load_model()
    attach_anchor_former(model)
    assert load_projector_weights(model, tmp_path / "model.safetensors") == "anchor_former"
    ids, pixel_values = prompt(2), images(2)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, images=pixel_values).logits,
            trained(input_ids=ids, images=pixel_values).logits,
            atol=1e-6,
            rtol=1e-6,
        )


@pytest.mark.parametrize("connector", ["perceiver", "avgpool"])
def test_baseline_connectors_through_the_same_switch(tower_dir, connector) -> None:
    extra = {"num_queries": 6, **CONNECTOR} if connector == "perceiver" else {}
    model = attach_anchor_former(make_model(tower_dir), connector=connector, **extra)
    projector = model.get_model().mm_projector.connector
    assert model.get_vision_tower().score is None  # no anchors needed: no attention row computed
    ids = prompt(2)
    with torch.no_grad():
        logits = model(input_ids=ids, images=images(2)).logits
    assert logits.shape[1] == ids.shape[1] - 1 + projector.num_output_tokens(1 + NUM_PATCHES)


def snapshot(model) -> tuple:
    """Everything a failed attach must leave as it was: class, modules, config, every tensor."""
    inner = model.get_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return type(model), inner.vision_tower, inner.mm_projector, model.config.to_dict(), state


def assert_unchanged(model, before: tuple) -> None:
    cls, tower, projector, config, state = before
    inner = model.get_model()
    assert (type(model), inner.vision_tower, inner.mm_projector) == (cls, tower, projector)
    assert model.config.to_dict() == config
    now = model.state_dict()
    assert sorted(now) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"num_anchors": K, "depht": 2},
            r"keyword arguments must be arguments of the 'acformer' connector, got \[.*'depht'.*unexpected keyword argument 'depht'",
        ),
        ({"num_anchors": K, "image_budget": 10}, r"image_budget needs config\.image_aspect_ratio='anyres', got None"),
        (
            {"num_anchors": K, "connector": "select", "init_projector": "yes"},
            r"init_projector must be a bool, got 'yes'",
        ),
        ({"num_anchors": 0}, r"num_anchors must be an integer >= 1, got 0"),
    ],
)
def test_failed_attach_leaves_model_and_config_bit_identical(tower_dir, kwargs, match) -> None:
    """Before: an unknown connector argument or image_budget raised TypeError, init_projector='yes' was taken
    as True, num_anchors=0 was not refused as such."""
    model = make_model(tower_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        attach_anchor_former(model, **kwargs)
    assert_unchanged(model, before)


def test_failed_attach_leaves_a_delay_loaded_tower_unloaded(tower_dir) -> None:
    """Planning loads a delay-loaded CLIP tower (as LLaVA does on first use); a failed attach unloads it
    again. Before: the tower stayed loaded (the state dict gained its weights)."""
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(llava_config(tower_dir)).eval()  # LLaVA delays loading the CLIP weights
    assert not model.get_vision_tower().is_loaded
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"num_anchors must be at most the {NUM_PATCHES} patch tokens"):
        attach_anchor_former(model, num_anchors=NUM_PATCHES + 1)
    assert not model.get_vision_tower().is_loaded
    assert_unchanged(model, before)
    attach_anchor_former(model, num_anchors=K, **CONNECTOR)  # and a good attach then loads it
    assert model.get_vision_tower().is_loaded
