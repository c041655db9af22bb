"""Make the shipped toy VLM: tower pretraining, LLaVA training, one AcFormer connector per budget.

    python -m benchmarks.quality.train                     # all phases, writes benchmarks/quality/weights/
    python -m benchmarks.quality.train --phase acformer    # only the AcFormer connectors (needs the LLaVA)
    python -m benchmarks.quality.train --seed 1 --output /tmp/quality-seed1   # another training seed

Every phase is a pure function of its seed (data streams from :func:`data_rng`, initialisation from
``torch.manual_seed``); run single-threaded (``--threads 1``, the default) the result is bit-for-bit the
same on the same torch build. Per-phase times and losses go to stderr and ``weights/train_log.json``.

1. **tower** (``CLIPVisionModel``, all parameters but the zero position embedding): on layer -2 (the
   layer LLaVA reads), a per-patch colour and shape classifier, and the [CLS] token predicting which
   colour-shape pairs the image holds (multi-label); the same [CLS] loss on the pooled output. The
   per-patch loss is what makes patch features carry their object; the [CLS] loss is what makes [CLS]
   attend to the objects, as a trained CLIP's [CLS] attends to content.
2. **llava** (tower frozen; projector and Llama trained): several question-answer pairs per image after
   the 64 image tokens, cross-entropy on the answers only, all patches (full budget); question types
   weighted towards ``exists`` and ``above`` (:attr:`Recipe.llava_weights`), and a curriculum: the first
   1,500 steps show at most 4 objects per image (:attr:`Recipe.llava_curriculum`; with fewer distractors
   the lookups are learned several times faster). Every 500th step's log entry also holds the accuracy on
   a held-out evaluation seed.
3. **acformer** (per budget T of :data:`BUDGETS`): ``attach_anchor_former(connector="acformer",
   num_anchors=T - 1)`` (T tokens: [CLS] + T - 1 anchors), the projector initialised from the LLaVA's,
   then the connector alone fine-tuned (tower and Llama frozen).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.quality.model import (
    ACFORMER_KWARGS,
    NUM_PATCHES,
    WEIGHTS,
    build_llava,
    build_tower,
    load_llava,
    save_acformer,
)
from benchmarks.quality.task import COLOURS, IMAGE_ID, SHAPES, Batch, make_batch

if TYPE_CHECKING:
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

__all__ = [
    "BUDGETS",
    "PROBE_EVERY",
    "Recipe",
    "answer_logits",
    "data_rng",
    "main",
    "seeded_recipe",
    "train_acformer",
    "train_llava",
    "train_tower",
]

#: visual-token budgets of the benchmark: 50 / 25 / 12.5 / 6.25 % of the 64 patches
BUDGETS = (32, 16, 8, 4)
#: steps between two held-out accuracy probes of the LLaVA phase
PROBE_EVERY = 500


class Recipe:
    """Steps, batch sizes, learning rates and data of the three phases (the shipped weights use the defaults)."""

    seed = 0
    tower_steps, tower_batch, tower_lr = 300, 64, 2e-3
    llava_steps, llava_batch, llava_questions, llava_lr = 4000, 32, 8, 2e-3
    #: question-type probabilities of the LLaVA phase (colour, shape, exists, above); None: uniform
    llava_weights: tuple[float, ...] | None = (0.15, 0.15, 0.3, 0.4)
    #: curriculum: the first ``llava_curriculum[0]`` steps show at most ``llava_curriculum[1]`` objects
    llava_curriculum: tuple[int, int] = (1500, 4)
    llava_layers = 3
    acformer_steps, acformer_batch, acformer_lr = 100, 32, 2e-3


def seeded_recipe(seed: int) -> type[Recipe]:
    """:class:`Recipe` with training seed ``seed`` and every other value unchanged (seed 0: the shipped one)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return Recipe if seed == Recipe.seed else type("Recipe", (Recipe,), {"seed": seed})


def data_rng(phase: str, seed: int, *extra: int) -> np.random.Generator:
    """The data stream of ``phase`` (``tower``, ``llava``, ``acformer``, ``eval``): independent per phase."""
    phases = ("tower", "llava", "acformer", "eval")
    return np.random.default_rng((phases.index(phase), seed, *extra))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10 % of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_tower(recipe: type[Recipe] = Recipe, log: list | None = None) -> CLIPVisionModel:
    """Phase 1: the pretrained tower (a ``CLIPVisionModel``)."""
    tower = build_tower(recipe.seed)
    width = tower.config.hidden_size
    torch.manual_seed(recipe.seed + 1)
    heads = torch.nn.ModuleDict(
        {
            "colour": torch.nn.Linear(width, len(COLOURS) + 1),
            "shape": torch.nn.Linear(width, len(SHAPES) + 1),
            "cls": torch.nn.Linear(width, len(COLOURS) * len(SHAPES)),
            "pooled": torch.nn.Linear(width, len(COLOURS) * len(SHAPES)),
        }
    )
    params = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.tower_lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, recipe.tower_steps)
    rng = data_rng("tower", recipe.seed)
    start = time.perf_counter()
    tower.train()
    for step in range(recipe.tower_steps):
        batch = make_batch(rng, recipe.tower_batch)
        out = tower(batch.pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[-2]  # (B, 1 + P, D): the layer LLaVA reads
        patches = hidden[:, 1:]
        loss_colour = F.cross_entropy(heads["colour"](patches).flatten(0, 1), batch.patch_colour.flatten())
        loss_shape = F.cross_entropy(heads["shape"](patches).flatten(0, 1), batch.patch_shape.flatten())
        loss_cls = F.binary_cross_entropy_with_logits(heads["cls"](hidden[:, 0]), batch.cls_targets)
        loss_pooled = F.binary_cross_entropy_with_logits(heads["pooled"](out.pooler_output), batch.cls_targets)
        loss = loss_colour + loss_shape + loss_cls + loss_pooled
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == recipe.tower_steps - 1:
            entry = {
                "phase": "tower",
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "loss_colour": loss_colour.item(),
                "loss_shape": loss_shape.item(),
                "loss_cls": loss_cls.item(),
                "loss_pooled": loss_pooled.item(),
            }
            _log(json.dumps(entry))
            if log is not None:
                log.append(entry)
    return tower.eval()


def answer_logits(model: torch.nn.Module, batch: Batch, num_image_tokens: int = NUM_PATCHES) -> torch.Tensor:
    """``(Q, V)`` logits of the answer positions of ``batch`` (``Q`` = answers in the batch, row-major).

    The sequence is ``num_image_tokens`` image placeholders, then ``batch.input_ids``; ``model`` is any
    LLaVA-style model taking ``input_ids`` and ``pixel_values`` (the stock one or an attached one).
    """
    b = batch.input_ids.shape[0]
    image = torch.full((b, num_image_tokens), IMAGE_ID, dtype=torch.long)
    logits = model(input_ids=torch.cat([image, batch.input_ids], dim=1), pixel_values=batch.pixel_values).logits
    return logits[:, num_image_tokens:][batch.labels != -100]  # (Q, V)


def _train_answers(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    *,
    steps: int,
    batch_size: int,
    questions: int,
    lr: float,
    rng: np.random.Generator,
    num_image_tokens: int,
    phase: str,
    log: list | None,
    weights: tuple[float, ...] | None = None,
    curriculum: tuple[int, int] = (0, 8),
    probe: Callable[[int], dict] | None = None,
) -> None:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, steps)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        max_objects = curriculum[1] if step < curriculum[0] else 8
        batch = make_batch(rng, batch_size, questions=questions, weights=weights, max_objects=max_objects)
        logits = answer_logits(model, batch, num_image_tokens)
        targets = batch.labels[batch.labels != -100]
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            accuracy = (logits.argmax(-1) == targets).float().mean().item()
            entry = {
                "phase": phase,
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": loss.item(),
                "train_accuracy": accuracy,
            }
            if probe is not None and (step % PROBE_EVERY == 0 or step == steps - 1):
                model.eval()
                entry.update(probe(step))
                model.train()
            _log(json.dumps(entry))
            if log is not None:
                log.append(entry)
    model.eval()


def train_llava(
    tower: CLIPVisionModel,
    recipe: type[Recipe] = Recipe,
    log: list | None = None,
    probe: Callable[[torch.nn.Module, int], dict] | None = None,
) -> LlavaForConditionalGeneration:
    """Phase 2: the LLaVA (a ``LlavaForConditionalGeneration``; tower frozen). ``probe(model, step)``, if
    given, adds its entries to every 500th step's log entry (it must not touch the data streams)."""
    model = build_llava(tower, recipe.seed + 2, layers=recipe.llava_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    _train_answers(
        model,
        params,
        steps=recipe.llava_steps,
        batch_size=recipe.llava_batch,
        questions=recipe.llava_questions,
        lr=recipe.llava_lr,
        rng=data_rng("llava", recipe.seed),
        num_image_tokens=NUM_PATCHES,
        phase="llava",
        log=log,
        weights=recipe.llava_weights,
        curriculum=recipe.llava_curriculum,
        probe=None if probe is None else (lambda step: probe(model, step)),
    )
    return model


def train_acformer(
    llava: torch.nn.Module, budget: int, recipe: type[Recipe] = Recipe, log: list | None = None
) -> torch.nn.Module:
    """Phase 3: the AcFormer connector of ``budget`` tokens ([CLS] + ``budget - 1`` anchors) for ``llava``."""
    from anchor_former import attach_anchor_former

    model = copy.deepcopy(llava)
    torch.manual_seed(recipe.seed + 3 + budget)
    attach_anchor_former(model, None, connector="acformer", num_anchors=budget - 1, score="cls", **ACFORMER_KWARGS)
    model.requires_grad_(False)
    connector: torch.nn.Module = cast(Any, model).model.multi_modal_projector
    connector.requires_grad_(True)
    _train_answers(
        model,
        list(connector.parameters()),
        steps=recipe.acformer_steps,
        batch_size=recipe.acformer_batch,
        questions=recipe.llava_questions,
        lr=recipe.acformer_lr,
        rng=data_rng("acformer", recipe.seed, budget),
        num_image_tokens=budget,
        phase=f"acformer-{budget}",
        log=log,
    )
    return connector


def _probe() -> Callable[[torch.nn.Module, int], dict]:
    """Accuracy (overall and per question type) on 400 questions of evaluation seed 99, which neither the
    benchmark (seeds 0-2) nor the tests (seed 100) use; it reads no training data, so it changes nothing."""
    from benchmarks.quality.evaluate import eval_set, package_accuracy

    data = eval_set(99, 400)

    def probe(model: torch.nn.Module, step: int) -> dict:
        score = package_accuracy(model, data)
        return {"eval": round(score.accuracy, 3), **{k: round(v, 3) for k, v in score.by_type.items()}}

    return probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--phase",
        choices=("all", "llava", "acformer"),
        default="all",
        help="all: tower, LLaVA and AcFormer; llava: tower and LLaVA; acformer: only the "
        "connectors, for the LLaVA already in --output",
    )
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--seed", type=int, default=Recipe.seed, help="training seed of every phase (0: the shipped weights)"
    )
    args = parser.parse_args(argv)
    recipe = seeded_recipe(args.seed)
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    log_path = args.output / "train_log.json"
    log: list = json.loads(log_path.read_text()) if args.phase == "acformer" and log_path.exists() else []
    times: dict[str, float] = {}
    if args.phase in ("all", "llava"):
        start = time.perf_counter()
        tower = train_tower(recipe, log=log)
        times["tower"] = time.perf_counter() - start
        start = time.perf_counter()
        llava = train_llava(tower, recipe, log=log, probe=_probe())
        times["llava"] = time.perf_counter() - start
        llava.save_pretrained(args.output)
    if args.phase in ("all", "acformer"):
        llava = load_llava(args.output)
        connectors = {}
        for budget in BUDGETS:
            start = time.perf_counter()
            connectors[budget] = train_acformer(llava, budget, recipe, log=log)
            times[f"acformer-{budget}"] = time.perf_counter() - start
        save_acformer(connectors, args.output)
    log.append(
        {
            "phase_seconds": {k: round(v, 1) for k, v in times.items()},
            "seed": recipe.seed,
            "threads": args.threads,
            "torch": torch.__version__,
        }
    )
    log_path.write_text(json.dumps(log, indent=0) + "\n")
    _log(f"phase seconds: {times}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
