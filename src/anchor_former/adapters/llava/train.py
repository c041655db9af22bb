"""Run LLaVA's own ``llava.train.train.train()`` with this package's connectors.

::

    python -m anchor_former.adapters.llava.train <LLaVA's train.py arguments> \\
        --mm_projector_type acformer [--num_anchors 144] [--anchor_score cls] \\
        [--connector_config '{"depth": 6, "heads": 8, "dim_head": 64}'] [--attn_implementation flash_attention_2]

It calls :func:`~anchor_former.adapters.llava._registration.register_with_llava`, adds three fields to
LLaVA's ``ModelArguments`` (``num_anchors``, ``anchor_score``, ``connector_config``; parsed by LLaVA's own
``HfArgumentParser`` with all its other flags) and runs LLaVA's unmodified training code, so
``deepspeed llava/train/train_mem.py ...`` becomes ``deepspeed --module anchor_former.adapters.llava.train
...`` (or ``torchrun -m anchor_former.adapters.llava.train ...``) with the same arguments.
``--attn_implementation`` is what LLaVA's ``train_mem.py`` passes to ``train()`` (``flash_attention_2``);
default: transformers' choice.

Stage 1 (``--tune_mm_mlp_adapter True``) writes ``mm_projector.bin`` (keys
``model.mm_projector.connector.*``); stage 2 loads it with ``--pretrain_mm_mlp_adapter`` and saves a
full model folder that ``llava.model.builder.load_pretrained_model`` reloads after ``register_with_llava()``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, is_dataclass
from typing import Any

from anchor_former.adapters.llava._registration import register_with_llava

__all__ = ["main"]


def anchor_model_arguments(base: type) -> type:
    """LLaVA's ``ModelArguments`` dataclass plus ``num_anchors``, ``anchor_score``, ``connector_config``."""
    if not is_dataclass(base):
        raise ValueError(f"base must be LLaVA's ModelArguments dataclass, got {base!r}")
    if "num_anchors" in {f for f in base.__dataclass_fields__}:
        return base

    @dataclass
    class AnchorModelArguments(base):
        num_anchors: int = field(default=144, metadata={"help": "K anchors (acformer, select)"})
        anchor_score: str = field(default="cls", metadata={"help": "anchor score: cls ([CLS] attention) or norm"})
        connector_config: str | None = field(
            default=None, metadata={"help": "JSON object of further connector arguments, e.g. '{\"depth\": 6}'"}
        )

    AnchorModelArguments.__qualname__ = AnchorModelArguments.__name__ = "ModelArguments"
    return AnchorModelArguments


def main(argv: Sequence[str] | None = None) -> Any:
    """Register, extend LLaVA's arguments and run ``llava.train.train.train()`` on ``argv``
    (default ``sys.argv[1:]``)."""
    import llava.train.train as llava_train

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--attn_implementation", default=None)
    ours, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    register_with_llava()
    llava_train.ModelArguments = anchor_model_arguments(llava_train.ModelArguments)
    sys.argv = [sys.argv[0], *rest]  # LLaVA's train() parses sys.argv itself
    return llava_train.train(attn_implementation=ours.attn_implementation)


if __name__ == "__main__":
    main()
