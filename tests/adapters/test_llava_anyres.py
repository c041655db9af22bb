"""llava-torch ``image_aspect_ratio="anyres"`` with anchors per view (runs only in ``.venv-llava``).

The spine: at full budget (K = every patch of every view) the switched model's logits equal the stock
model's for a batch of two images of different sizes, in each ``mm_patch_merge_type``.
"""

from __future__ import annotations

import copy

import pytest
import torch

llava = pytest.importorskip("llava")

from _llava_torch import CONNECTOR, LLM_DIM, NUM_PATCHES, make_model, prompt, save_tiny_tower  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # noqa: E402
from PIL import Image  # noqa: E402

from anchor_former import anchor_search  # noqa: E402
from anchor_former.adapters.llava import attach_anchor_former, load_projector_weights  # noqa: E402
from anchor_former.adapters.llava._anyres import anyres_token_counts  # noqa: E402
from anchor_former.adapters.llava._registration import register_with_llava, unregister_from_llava  # noqa: E402
from anchor_former.connectors import SelectConnector  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 0}  # fp32
# LLaVA-NeXT's five pinpoints scaled to 28-px views, as LLaVA writes them: [width, height]
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
MERGES = ["flat", "spatial", "spatial_unpad"]
# (width, height) as LLaVA's image_sizes: wide 1 x 3 crops with rows unpadded, tall 2 x 2 with columns unpadded
SIZES = [(120, 17), (40, 70)]
SWEEP = [(28, 28), (56, 56), (90, 30), (30, 90), (70, 40), (40, 70), (100, 33), (45, 100), (120, 17), (25, 45)]


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return save_tiny_tower(tmp_path_factory.mktemp("clip_tower"))


def anyres_model(tower_dir, merge: str):
    model = make_model(
        tower_dir, image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, mm_patch_merge_type=merge
    )
    if merge == "spatial_unpad":  # LLaVA creates image_newline with torch.empty; a checkpoint would fill it
        torch.nn.init.normal_(model.get_model().image_newline, std=0.3, generator=torch.Generator().manual_seed(3))
    return model


def views_of(model, sizes):
    rng = torch.Generator().manual_seed(4)
    pictures = [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()) for w, h in sizes
    ]
    return process_images(pictures, model.get_vision_tower().image_processor, model.config)


def logits(model, ids, images, sizes) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, images=images, image_sizes=sizes).logits


@pytest.mark.parametrize("merge", MERGES)
def test_full_budget_equals_the_stock_model(tower_dir, merge) -> None:
    stock = anyres_model(tower_dir, merge)
    reduced = attach_anchor_former(copy.deepcopy(stock), connector="select", num_anchors=NUM_PATCHES)
    assert isinstance(reduced.get_model().mm_projector.connector, SelectConnector)
    assert type(reduced).__name__ == type(stock).__name__ and type(reduced) is not type(stock)
    ids, images = prompt(2), views_of(stock, SIZES)
    assert isinstance(images, list) and [x.shape[0] for x in images] == [4, 5]
    want = logits(stock, ids, images, SIZES)
    torch.testing.assert_close(logits(reduced, ids, images, SIZES), want, **TOL)
    # the longer image sets the padded length
    assert want.shape[1] == ids.shape[1] - 1 + max(anyres_token_counts(reduced, SIZES))


def test_full_budget_identity_catches_swapped_crops(tower_dir) -> None:
    """The tolerance bites: two crops of the first image exchanged change the stock logits."""
    stock = anyres_model(tower_dir, "spatial_unpad")
    ids, images = prompt(2), views_of(stock, SIZES)
    swapped = [images[0][[0, 2, 1, 3]], images[1]]
    assert (logits(stock, ids, swapped, SIZES) - logits(stock, ids, images, SIZES)).abs().max() > 1e-3


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"connector": "select", "num_anchors": 6},
        {"connector": "select", "num_anchors": 6, "image_budget": 11},
        {"connector": "acformer", "num_anchors": 4, **CONNECTOR},
    ],
)
def test_token_counts_over_the_size_sweep(tower_dir, merge, kwargs) -> None:
    model = attach_anchor_former(anyres_model(tower_dir, merge), **kwargs)
    images = views_of(model, SWEEP)
    ids = prompt(len(SWEEP))
    with torch.no_grad():
        *_, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images, SWEEP)
    counts = anyres_token_counts(model, SWEEP)
    assert embeds.shape == (len(SWEEP), ids.shape[1] - 1 + max(counts), LLM_DIM)
    with torch.no_grad():  # each image alone: its own length
        for i, size in enumerate(SWEEP):
            *_, alone, _ = model.prepare_inputs_labels_for_multimodal(
                ids[i : i + 1], None, None, None, None, [images[i]], [size]
            )
            assert alone.shape[1] == ids.shape[1] - 1 + counts[i]
    if kwargs["connector"] == "acformer":  # K + 1 = 5 tokens per view, + one newline per crop row (unpad)
        from anchor_former.adapters.llava._anyres import _views

        rows = [_views(model.config, model.get_vision_tower().config, size).grid[0] for size in SWEEP]
        extra = rows if merge == "spatial_unpad" else [0] * len(SWEEP)
        assert counts == [5 * len(x) + e for x, e in zip(images, extra)]


def test_reduced_budget_keeps_only_each_views_anchors(tower_dir) -> None:
    """The image tokens are the stock model's full-budget tokens at each view's own anchors (eager [CLS]
    rows, candidates = the unpadded patches), in the stock order, with every grid row's newline."""
    k = 5  # SIZES[0]: 1 x 3 crops; grid rows 2..4 of 7 survive unpadding
    stock = anyres_model(tower_dir, "spatial_unpad")
    model = attach_anchor_former(copy.deepcopy(stock), connector="select", num_anchors=k)
    ids, images = prompt(1), views_of(stock, SIZES[:1])
    with torch.no_grad():
        *_, full, _ = stock.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images, SIZES[:1])
        *_, got, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images, SIZES[:1])
        clip = model.get_model().vision_tower.vision_tower
        rows = clip(images[0], output_attentions=True).attentions[-2][:, :, 0]  # (4, H, N) eager [CLS] rows
    full, got = full[0, 2 : 2 + NUM_PATCHES + 3 * 21 + 3], got[0, 2:-4]  # the image's tokens (4 text after)
    side, top, line = 7, 2, 21 + 1  # a stock row: 21 patches across the 3 crops + the newline
    positions = anchor_search(rows[:1], k, include_cls=False)[0].sub(1).tolist()  # base view: raster position
    real = torch.zeros(1, 1 + NUM_PATCHES, dtype=torch.bool)
    real[0, 0] = True
    real[0, 1 + top * side : 1 + 5 * side] = True
    for c in range(3):
        for p in (anchor_search(rows[1 + c : 2 + c], k, include_cls=False, key_padding_mask=real)[0] - 1).tolist():
            positions.append(NUM_PATCHES + (p // side - top) * line + c * side + p % side)
    positions += [NUM_PATCHES + r * line + line - 1 for r in range(3)]  # the newlines
    assert got.shape == (k + 3 * k + 3, LLM_DIM)
    torch.testing.assert_close(got, full[sorted(positions)], **TOL)


def test_generate_with_image_sizes(tower_dir) -> None:
    model = attach_anchor_former(anyres_model(tower_dir, "spatial_unpad"), connector="select", num_anchors=4)
    ids = prompt(1)
    images = views_of(model, SIZES[:1])
    out = model.generate(
        ids, images=images, image_sizes=SIZES[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape[1] >= 3
    assert out[0, -3] == logits(model, ids, images, SIZES[:1])[0, -1].argmax()


@pytest.mark.parametrize(
    "overrides,kwargs,match",
    [
        (
            {"mm_patch_merge_type": "spatial_grid"},
            {"connector": "select", "num_anchors": 4},
            "mm_patch_merge_type must be one of flat, spatial, spatial_unpad for anyres, got 'spatial_grid'",
        ),
        (
            {},
            {"connector": "select", "num_anchors": 4, "image_budget": 4},
            r"image_budget must be an integer >= 5 \(the most views an image gets.*got 4",
        ),
        (
            {},
            {"connector": "acformer", "num_anchors": 4, "image_budget": 20},
            "image_budget is a connector='select' option, got connector='acformer'",
        ),
        (
            {},
            {"connector": "select", "num_anchors": NUM_PATCHES + 1},
            rf"num_anchors \+ num_context must be at most the {NUM_PATCHES} patch tokens",
        ),
        (
            {"mm_vision_select_feature": "cls_patch"},
            {"connector": "select", "num_anchors": 4},
            "mm_vision_select_feature must be 'patch' for anyres",
        ),
    ],
)
def test_bad_input_changes_nothing(tower_dir, overrides, kwargs, match) -> None:
    model = anyres_model(tower_dir, "spatial_unpad")
    for key, value in overrides.items():
        setattr(model.config, key, value)
    ids, images = prompt(2), views_of(model, SIZES)
    modules = (model.get_model().vision_tower, model.get_model().mm_projector, type(model))
    config = model.config.to_dict()
    with pytest.raises(ValueError, match=match):
        attach_anchor_former(model, **kwargs)
    assert (model.get_model().vision_tower, model.get_model().mm_projector, type(model)) == modules
    assert model.config.to_dict() == config
    if not overrides:
        assert torch.isfinite(logits(model, ids, images, SIZES)).all()


# --- save -> reload, by hand, re-attach ---------------------------------------------------------------------


@pytest.fixture
def registered():
    register_with_llava()
    yield
    unregister_from_llava()


def perturb(module: torch.nn.Module) -> None:
    """Values no initialisation would give, so a reload that re-initialises shows."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


RELOADS = [
    ("spatial", {"connector": "select", "num_anchors": 6}),
    ("spatial_unpad", {"connector": "select", "num_anchors": 6}),
    ("flat", {"connector": "select", "num_anchors": 6, "image_budget": 11}),
    ("spatial_unpad", {"connector": "acformer", "num_anchors": 4, **CONNECTOR}),
]


@pytest.mark.parametrize(("merge", "kwargs"), RELOADS)
def test_saved_folder_reloads_with_its_settings(tower_dir, tmp_path, registered, merge, kwargs) -> None:
    """``from_pretrained`` after ``register_with_llava()`` gives the saved model: same settings, same logits.
    Before: ``spatial`` / ``spatial_unpad`` raised a bare AssertionError in LLaVA's merge, and ``flat``
    dropped ``image_budget`` (36 image tokens instead of 17)."""
    model = attach_anchor_former(anyres_model(tower_dir, merge), **kwargs)
    perturb(model.get_model().mm_projector)
    model.save_pretrained(tmp_path)
    loaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path).eval()
    loaded.get_vision_tower().load_model()
    assert loaded.config.anchor_former == model.config.anchor_former
    assert loaded.config.mm_vision_select_feature == "patch"
    ids, images = prompt(2), views_of(model, SIZES)
    want = logits(model, ids, images, SIZES)
    assert want.shape[1] == ids.shape[1] - 1 + max(anyres_token_counts(model, SIZES))
    torch.testing.assert_close(logits(loaded, ids, images, SIZES), want, atol=0, rtol=0)


@pytest.mark.parametrize("merge", MERGES)
def test_by_hand_reload_and_reattach_keep_the_settings(tower_dir, tmp_path, merge) -> None:
    """Plain llava-torch: ``from_pretrained(dir, mm_projector_type=...)``, ``attach_anchor_former(model)``
    (the recorded settings), ``load_projector_weights``; then a re-attach keeps ``image_budget`` unless
    given. Before: both attaches were refused (the first attach had written
    ``mm_vision_select_feature='cls_patch'`` into the config)."""
    model = attach_anchor_former(anyres_model(tower_dir, merge), connector="select", num_anchors=6, image_budget=11)
    assert model.config.mm_vision_select_feature == "patch"
    model.save_pretrained(tmp_path)
    loaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path, mm_projector_type="mlp2x_gelu").eval()
    loaded.get_vision_tower().load_model()
    attach_anchor_former(loaded)
    load_projector_weights(loaded, tmp_path / "model.safetensors")
    assert loaded.config.anchor_former == model.config.anchor_former
    ids, images = prompt(2), views_of(model, SIZES)
    torch.testing.assert_close(logits(loaded, ids, images, SIZES), logits(model, ids, images, SIZES), atol=0, rtol=0)

    attach_anchor_former(loaded, num_anchors=4)
    assert (
        loaded.config.anchor_former["extras"]["image_budget"] == 11 and loaded.config.anchor_former["num_anchors"] == 4
    )
    attach_anchor_former(loaded, image_budget=None)  # per view again, K = 4 kept
    fresh = attach_anchor_former(anyres_model(tower_dir, merge), connector="select", num_anchors=4)
    assert anyres_token_counts(loaded, SWEEP) == anyres_token_counts(fresh, SWEEP)
    torch.testing.assert_close(logits(loaded, ids, images, SIZES), logits(fresh, ids, images, SIZES), atol=0, rtol=0)
