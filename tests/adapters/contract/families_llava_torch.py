"""The llava-torch host families of the contract suite (original LLaVA code, ``.venv-llava`` only).

One entry per family: LLaVA-1.5 (``llava_torch``) and LLaVA-NeXT anyres in each ``mm_patch_merge_type``
(``llava_torch_anyres_flat`` / ``_spatial`` / ``_spatial_unpad``). An entry builds the tiny stock model,
its inputs (what LLaVA's ``process_images`` gives, with ``image_sizes``), and names the attach arguments
of each check; the checks themselves are family-independent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from _llava_torch import CONNECTOR, IMAGE, NUM_PATCHES, llava_config, make_model, prompt
from llava.mm_utils import process_images
from PIL import Image

__all__ = ["FAMILIES", "LlavaTorchFamily"]

# LLaVA-NeXT's five pinpoints scaled to 28-px views, as LLaVA writes them: [width, height]
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
# (width, height): wide 1 x 3 crops with rows unpadded, tall 2 x 2 with columns unpadded
SIZES = [(120, 17), (40, 70)]


@dataclass(frozen=True)
class LlavaTorchFamily:
    """One llava-torch family of the contract suite.

    Attributes:
        name: the family's id in test names.
        overrides: ``LlavaConfig`` fields that make the stock model this family.
        reduced: attach arguments of a reduced training-free budget.
        trained: attach arguments of a trained connector (AcFormer).
        bad: ``(attach arguments, message regex)`` that must be refused with the model unchanged.
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    reduced: dict[str, Any] = field(default_factory=lambda: {"connector": "select", "num_anchors": 6})
    trained: dict[str, Any] = field(default_factory=lambda: {"connector": "acformer", "num_anchors": 4, **CONNECTOR})
    bad: tuple[tuple[dict[str, Any], str], ...] = ()

    @property
    def anyres(self) -> bool:
        return self.overrides.get("image_aspect_ratio") == "anyres"

    @property
    def full_budget(self) -> dict[str, Any]:
        """``select`` keeping every patch of every view: the stock model's logits."""
        return {"connector": "select", "num_anchors": NUM_PATCHES}

    def stock(self, tower_dir: str) -> torch.nn.Module:
        """The tiny stock model (fp32, eval), its CLIP tower loaded."""
        model = make_model(tower_dir, **self.overrides)
        if self.overrides.get("mm_patch_merge_type") == "spatial_unpad":  # LLaVA leaves it torch.empty
            torch.nn.init.normal_(model.get_model().image_newline, std=0.3, generator=torch.Generator().manual_seed(3))
        return model

    def config(self, tower_dir: str) -> Any:
        return llava_config(tower_dir, **self.overrides)

    def inputs(self, model: torch.nn.Module, seed: int = 4, batch: int = 2) -> dict[str, Any]:
        """``model(**inputs)`` arguments: a prompt with one image each, the images as LLaVA prepares them."""
        rng = torch.Generator().manual_seed(seed)
        if not self.anyres:
            images = torch.randn(batch, 3, IMAGE, IMAGE, generator=rng)
            return {"input_ids": prompt(batch), "images": images}
        sizes = SIZES[:batch]
        pictures = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())
                    for w, h in sizes]
        views = process_images(pictures, model.get_vision_tower().image_processor, model.config)
        return {"input_ids": prompt(batch), "images": views, "image_sizes": sizes}

    def image_tokens(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[int]:
        """The LLM tokens of each image of an attached model, computed from its settings (not run)."""
        settings = model.config.anchor_former
        if self.anyres:
            from anchor_former.adapters.llava.anyres import anyres_token_counts

            return anyres_token_counts(model, inputs["image_sizes"])
        connector = model.get_model().mm_projector.connector
        count = connector.num_output_tokens(1 + NUM_PATCHES)
        assert settings["connector"] != "acformer" or count == settings["num_anchors"] + 1
        return [count] * inputs["input_ids"].shape[0]


def _anyres(merge: str) -> LlavaTorchFamily:
    return LlavaTorchFamily(
        name=f"llava_torch_anyres_{merge}",
        overrides={"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS, "mm_patch_merge_type": merge},
        reduced={"connector": "select", "num_anchors": 6, **({"image_budget": 11} if merge == "flat" else {})},
        bad=(
            ({"connector": "select", "num_anchors": 4, "image_budget": 4},
             r"image_budget must be an integer >= 5 \(the most views an image gets.*got 4"),
            ({"connector": "acformer", "num_anchors": 4, "image_budget": 20},
             "image_budget is a connector='select' option, got connector='acformer'"),
            ({"connector": "select", "num_anchors": 4, "num_context": 2},
             "num_context .* is not supported with anyres views, got 2"),
            ({"connector": "select", "num_anchors": NUM_PATCHES + 1},
             rf"num_anchors \+ num_context must be at most the {NUM_PATCHES} patch tokens"),
        ),
    )


FAMILIES: list[LlavaTorchFamily] = [
    LlavaTorchFamily(
        name="llava_torch",
        bad=(
            ({"num_anchors": NUM_PATCHES + 1}, rf"num_anchors must be at most the {NUM_PATCHES} patch tokens"),
            ({"num_anchors": 4, "image_budget": 10}, r"image_budget needs config\.image_aspect_ratio='anyres'"),
            ({"connector": "qformer"}, "connector must be one of .*got 'qformer'"),
        ),
    ),
    *(_anyres(merge) for merge in ("flat", "spatial", "spatial_unpad")),
]
