"""The llava-torch families of the contract suite (``.venv-llava``: the original LLaVA code).

``llava_torch`` (LLaVA-1.5) and LLaVA-NeXT anyres in each ``mm_patch_merge_type``
(``llava_torch_anyres_flat`` / ``_spatial`` / ``_spatial_unpad``). LLaVA has no processor object: its
"processor" here is the CLIP image processor ``process_images`` uses (the attach never changes it, and the
suite checks that a failed attach leaves it as it was); the LLM's image tokens are spliced by the model, so
``tokens`` compares the count the recorded settings give (``anyres_token_counts``, K + 1 for AcFormer) with
the length each image really gets. The documented reload is the by-hand one of plain llava-torch
(``from_pretrained`` with the stock projector type, ``attach_anchor_former(model)``,
``load_projector_weights``); LLaVA's own ``from_pretrained`` / ``load_pretrained_model`` after
``register_with_llava`` are checked in ``tests/adapters/test_llava_usage.py`` and ``test_llava_anyres.py``.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import types
from typing import Any

import llava  # noqa: F401  (ImportError where llava-torch is absent: the conftest skips this module)
import numpy as np
import torch
from _llava_torch import CONNECTOR, IMAGE, NUM_PATCHES, make_model, prompt, save_tiny_tower
from family import Family
from llava.mm_utils import process_images
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from PIL import Image
from transformers import CLIPImageProcessor

from anchor_former.adapters.llava import _HOST, attach_anchor_former, load_projector_weights
from anchor_former.adapters.llava._anyres import anyres_class, anyres_token_counts

# LLaVA-NeXT's five pinpoints scaled to 28-px views, as LLaVA writes them: [width, height]
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
# (width, height) of every anyres request: 1 x 3 crops, two grid rows of each unpadded (one size, so that the
# suite's requests have one shape; tests/adapters/test_llava_anyres.py sweeps sizes)
ANYRES_SIZE = (120, 17)


@functools.cache
def _tower_dir() -> str:
    """The tiny CLIP tower (and its image processor) every model's ``mm_vision_tower`` points at."""
    path = tempfile.mkdtemp(prefix="llava_torch_tower_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return save_tiny_tower(path)


def _processor() -> CLIPImageProcessor:
    return CLIPImageProcessor.from_pretrained(_tower_dir())


def _stock(overrides: dict[str, Any], processor: Any = None) -> torch.nn.Module:
    model = make_model(_tower_dir(), **overrides)
    if overrides.get("mm_patch_merge_type") == "spatial_unpad":  # LLaVA leaves it torch.empty
        torch.nn.init.normal_(model.get_model().image_newline, std=0.3, generator=torch.Generator().manual_seed(3))
    return model


def _inputs(overrides: dict[str, Any], processor: Any, seed: int) -> dict[str, Any]:
    """One request: a prompt with one image, as LLaVA's ``process_images`` prepares it (views for anyres)."""
    width, height = ANYRES_SIZE if overrides.get("image_aspect_ratio") == "anyres" else (IMAGE, IMAGE)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    config = types.SimpleNamespace(
        image_aspect_ratio=overrides.get("image_aspect_ratio", "pad"),
        image_grid_pinpoints=overrides.get("image_grid_pinpoints"),
    )
    images = process_images([Image.fromarray(pixels)], processor, config)
    return {"input_ids": prompt(1), "images": images, "image_sizes": [(width, height)]}


def _logits(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``model(**inputs).logits`` with the images in the model's dtype, as LLaVA's scripts pass them."""
    images = inputs["images"]
    images = [x.to(model.dtype) for x in images] if isinstance(images, list) else images.to(model.dtype)
    return model(**{**inputs, "images": images}).logits


def _tokens(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Image tokens per sample: what the recorded settings give, and what the LLM's sequence really holds."""
    if getattr(model.config, "image_aspect_ratio", None) == "anyres":
        expected = anyres_token_counts(model, inputs["image_sizes"])
    else:
        expected = [model.get_model().mm_projector.connector.num_output_tokens(1 + NUM_PATCHES)]
    with torch.no_grad():
        length = _logits(model, inputs).shape[1]
    return expected, [length - (inputs["input_ids"].shape[1] - 1)]


def _reload(folder) -> torch.nn.Module:
    """The documented by-hand reload of plain llava-torch (docs/llava.md)."""
    model = LlavaLlamaForCausalLM.from_pretrained(folder, mm_projector_type="mlp2x_gelu").eval()
    model.get_vision_tower().load_model()
    attach_anchor_former(model)  # the settings recorded in config.anchor_former
    load_projector_weights(model, folder / "model.safetensors")
    return model


def _family(name: str, overrides: dict[str, Any], bad: tuple[dict[str, Any], str]) -> Family:
    anyres = overrides.get("image_aspect_ratio") == "anyres"
    return Family(
        name=name,
        make_processor=_processor,
        make_model=functools.partial(_stock, overrides),
        inputs=functools.partial(_inputs, overrides),
        attach=lambda model, processor, **kwargs: attach_anchor_former(model, **kwargs),
        host=_HOST,
        full={"connector": "select", "num_anchors": NUM_PATCHES},
        reduced={"connector": "acformer", "num_anchors": 4, **CONNECTOR},
        reattach={"num_anchors": 3},
        reattach_bad=(
            {"num_anchors": 3, "depth": 3},
            r"architecture must stay the same \(attached now: connector='acformer', num_anchors=4",
        ),
        bad=bad,
        tokens=_tokens,
        tower=lambda m: m.get_model().vision_tower.vision_tower,
        projector=lambda m: m.get_model().mm_projector,
        q_k_modules=(r".*vision_tower\.vision_tower\..*\.(q_proj|k_proj)",),
        stock_class=LlavaLlamaForCausalLM,
        attached_class=anyres_class(LlavaLlamaForCausalLM) if anyres else LlavaLlamaForCausalLM,
        reload=_reload,
        reload_processor=CLIPImageProcessor.from_pretrained,
        supports=frozenset({"identity", "bf16", "counts", "reattach", "threads", "compile", "save", "lora", "bnb"}),
        skip={
            "auto": "llava-torch has no transformers Auto class (LLaVA's own builder reloads it)",
            "auto_processor": "llava-torch has no processor class",
            "pipeline": "llava-torch models are not transformers pipeline models",
            "offload": "the suite's projector row names transformers' multi_modal_projector; llava-torch's offload "
            "rows are in tests/adapters/test_llava_usage.py",
            "mm_encoder_outputs": "a transformers 5 argument of Qwen-VL",
            "kept_tokens": "a transformers-adapter helper",
        },
        logits=_logits,
    )


_ANYRES_BAD = (
    {"connector": "select", "num_anchors": 4, "image_budget": 4},
    r"image_budget must be an integer >= 5 \(the most views an image gets: one anchor each\), got 4",
)

FAMILIES: list[Family] = [
    _family(
        "llava_torch",
        {},
        (
            {"num_anchors": 50},
            r"num_anchors must be at most the 49 patch tokens of the "
            r"vision tower, got 50",
        ),
    ),
    *(
        _family(
            f"llava_torch_anyres_{merge}",
            {"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS, "mm_patch_merge_type": merge},
            _ANYRES_BAD,
        )
        for merge in ("flat", "spatial", "spatial_unpad")
    ),
]
