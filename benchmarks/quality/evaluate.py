"""Answer accuracy of the toy LLaVA under each token-reduction path.

Two ways in, checked against each other by the tests:

* the package's paths (``select`` with any score and context, trained AcFormer) run the real model:
  :func:`package_accuracy` attaches with ``attach_anchor_former`` to a copy of the LLaVA and calls its
  ``forward`` with ``input_ids`` holding as many image tokens as the connector returns;
* the rules of :mod:`benchmarks.quality.rules` run on one eager forward of the tower
  (:func:`tower_output`, ``output_attentions=True``) and feed their tokens to the same language model
  (:func:`rule_accuracy`), which is what the LLaVA forward does with its own image features.

Accuracy: greedy next token at the answer position equals the answer (the whole vocabulary competes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import CLIPVisionModel

from benchmarks.quality.model import ACFORMER_KWARGS, NUM_PATCHES
from benchmarks.quality.rules import Rule, TowerOutput
from benchmarks.quality.task import QUESTION_TYPES, Batch, make_batch
from benchmarks.quality.train import answer_logits, data_rng

__all__ = [
    "EvalSet",
    "Score",
    "acformer_model",
    "eval_set",
    "language_logits",
    "package_accuracy",
    "rule_accuracy",
    "select_model",
    "tower_output",
]


@dataclass
class Score:
    """Accuracy over a question set, overall and per question type (fractions in [0, 1])."""

    accuracy: float
    by_type: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, predicted: torch.Tensor, batch: Batch) -> Score:
        right = predicted == batch.answers  # (B,)
        kinds = [k[0] for k in batch.kinds]
        by_type = {}
        for kind in QUESTION_TYPES:
            mask = torch.tensor([k == kind for k in kinds])
            if mask.any():
                by_type[kind] = right[mask].float().mean().item()
        return cls(right.float().mean().item(), by_type)


@dataclass
class EvalSet:
    """``questions`` single-question samples drawn from evaluation seed ``seed`` (in one batch)."""

    seed: int
    batch: Batch


def eval_set(seed: int, questions: int) -> EvalSet:
    return EvalSet(seed, make_batch(data_rng("eval", seed), questions))


def _eager_tower(model: torch.nn.Module) -> CLIPVisionModel:
    tower = cast(Any, model).model.vision_tower
    eager = CLIPVisionModel._from_config(tower.config, attn_implementation="eager")
    eager.load_state_dict(tower.state_dict())
    return eager.eval()


@torch.no_grad()
def tower_output(model: torch.nn.Module, pixel_values: torch.Tensor) -> TowerOutput:
    """Layer -2 features, its [CLS] attention rows and keys, from one eager forward of ``model``'s tower."""
    tower = _eager_tower(model)
    layer = cast(Any, model).config.vision_feature_layer  # -2: hidden_states[-2] is the output of encoder.layers[-2]
    attention_module: Any = tower.encoder.layers[layer].self_attn
    captured: dict[str, torch.Tensor] = {}
    handle = attention_module.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("keys", o))
    try:
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        handle.remove()
    heads = attention_module.num_heads
    b, n, d = captured["keys"].shape
    keys = captured["keys"].view(b, n, heads, d // heads).mean(dim=2)  # (B, N, E)
    return TowerOutput(
        features=out.hidden_states[layer],
        cls_attention=out.attentions[layer][:, :, 0],
        keys=keys,
        projector=cast(Any, model).model.multi_modal_projector,
    )


@torch.no_grad()
def language_logits(model: torch.nn.Module, visual: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``(B, V)`` answer-position logits of the LLaVA's language model given ``visual`` ``(B, T, llm_dim)``
    image tokens followed by ``batch.input_ids`` (the sequence the LLaVA forward builds)."""
    llava: Any = model
    text = llava.get_input_embeddings()(batch.input_ids)  # (B, L, llm_dim)
    hidden = llava.model.language_model(inputs_embeds=torch.cat([visual, text], dim=1)).last_hidden_state
    logits = llava.lm_head(hidden[:, visual.shape[1] :])  # (B, L, V)
    return logits[batch.labels != -100]


def rule_accuracy(
    model: torch.nn.Module, data: EvalSet, rule: Rule | None, budget: int, out: TowerOutput | None = None
) -> Score:
    """Accuracy of ``rule`` at ``budget`` tokens (``rule=None``: no image tokens at all)."""
    batch = data.batch
    if rule is None:
        visual = torch.zeros(batch.input_ids.shape[0], 0, cast(Any, model).config.text_config.hidden_size)
    else:
        out = out if out is not None else tower_output(model, batch.pixel_values)
        with torch.no_grad():
            visual = rule(out, budget, data.seed)
    return Score.of(language_logits(model, visual, batch).argmax(-1), batch)


def select_model(
    model: torch.nn.Module, *, num_anchors: int, num_context: int = 0, score: str = "cls"
) -> torch.nn.Module:
    """A copy of ``model`` switched to the package's ``select`` connector."""
    from anchor_former import attach_anchor_former

    reduced = copy.deepcopy(model)
    return attach_anchor_former(
        reduced, None, connector="select", num_anchors=num_anchors, num_context=num_context, score=score
    ).eval()


def acformer_model(model: torch.nn.Module, state: dict[str, torch.Tensor], budget: int) -> torch.nn.Module:
    """A copy of ``model`` with the trained AcFormer connector of ``budget`` tokens."""
    from anchor_former import attach_anchor_former

    reduced = copy.deepcopy(model)
    attach_anchor_former(reduced, None, connector="acformer", num_anchors=budget - 1, score="cls", **ACFORMER_KWARGS)
    cast(Any, reduced).model.multi_modal_projector.load_state_dict(state)
    return reduced.eval()


@torch.no_grad()
def package_accuracy(model: torch.nn.Module, data: EvalSet, num_tokens: int = NUM_PATCHES) -> Score:
    """Accuracy of a (possibly attached) LLaVA through its own forward, ``num_tokens`` image tokens."""
    return Score.of(answer_logits(model, data.batch, num_tokens).argmax(-1), data.batch)
