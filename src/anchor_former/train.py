"""Train the connector of a transformers Llava model with ``transformers.Trainer``.

Command line (every ``TrainingArguments`` flag works: ``--per_device_train_batch_size``,
``--gradient_accumulation_steps``, ``--bf16``, ``--fsdp``, ``--deepspeed``, ``--gradient_checkpointing``,
``--report_to``, ``--logging_steps``, ...)::

    # stage 1: connector only, caption data, LLaVA's "plain" template
    python -m anchor_former.train --model_name_or_path llava-hf/llava-1.5-7b-hf --stage 1 \\
        --num_anchors 144 --data_path blip_laion_cc_sbu_558k.json --image_folder images/ --output_dir out/stage1
    # stage 2: connector + LLM (or LoRA on the LLM with --lora_r 128), instruction data, "vicuna_v1"
    python -m anchor_former.train --model_name_or_path out/stage1 --stage 2 \\
        --data_path llava_v1_5_mix665k.json --image_folder images/ --output_dir out/stage2
    torchrun --nproc_per_node 8 -m anchor_former.train ...   # DDP / FSDP / DeepSpeed: the Trainer's own

``--model_name_or_path`` is either a ``LlavaForConditionalGeneration`` checkpoint (switched with
:func:`~anchor_former.adapters.transformers.attach_anchor_former` and ``--connector``, ``--num_anchors``,
``--score``, ``--connector_config``) or a folder this module wrote (model type ``anchor_former_llava``;
the connector settings come from its config and those flags are ignored). The output folder holds the
whole model and its processor and reloads with
``AnchorFormerLlavaForConditionalGeneration.from_pretrained`` / ``LlavaProcessor.from_pretrained``.

Stage 1 trains the connector and freezes everything else; stage 2 also trains the language model and
``lm_head`` (or, with ``--lora_r > 0`` and ``peft`` installed, LoRA adapters on the language model's
linear layers, merged into the weights before saving). The vision tower is always frozen.
The dataset is read and checked in full before the model is loaded (:func:`anchor_former.data.load_conversations`).
At the end every process logs a SHA-256 digest of its connector weights; under DDP all ranks print the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "DataArguments",
    "ModelArguments",
    "connector_digest",
    "load_model",
    "main",
    "parse_args",
    "set_trainable",
    "train",
]

logger = logging.getLogger(__name__)

#: LLaMA-family linear layers that LoRA adapts (in the language model only)
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ModelArguments:
    """What to train: the model, the connector and the stage."""

    model_name_or_path: str = field(metadata={"help": "a LlavaForConditionalGeneration checkpoint or a folder this "
                                                      "module wrote (model type anchor_former_llava)"})
    stage: int = field(default=1, metadata={"help": "1: connector only; 2: connector + language model",
                                            "choices": [1, 2]})
    connector: str = field(default="acformer", metadata={"help": "connector name (anchor_former.build_connector)"})
    num_anchors: int = field(default=144, metadata={"help": "K anchors (acformer); the LLM sees K + 1 tokens"})
    score: str = field(default="cls", metadata={"help": "anchor score", "choices": ["cls", "norm", "map"]})
    connector_config: str | None = field(default=None, metadata={"help": "JSON object of further connector "
                                                                          "arguments, e.g. '{\"depth\": 6}'"})
    torch_dtype: str = field(default="float32", metadata={
        "help": "dtype the weights are loaded in (mixed precision comes from --bf16/--fp16)",
        "choices": ["float32", "bfloat16", "float16"]})
    lora_r: int = field(default=0, metadata={"help": "stage 2: LoRA rank on the language model (0: full fine-tuning; "
                                                     "needs peft)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})


@dataclass
class DataArguments:
    """LLaVA-format data (see :mod:`anchor_former.data`)."""

    data_path: str = field(metadata={"help": "LLaVA-format JSON: a list of {image, conversations}"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the 'image' entries are relative to"})
    template: str | None = field(default=None, metadata={
        "help": "conversation template; default: plain for stage 1, vicuna_v1 for stage 2",
        "choices": ["plain", "vicuna_v1"]})
    max_length: int = field(default=2048, metadata={"help": "longest token sequence (image tokens included)"})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad (LLaVA-1.5) or square",
                                                             "choices": ["pad", "square"]})


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, Any]:
    """``(ModelArguments, DataArguments, transformers.TrainingArguments)`` from a command line
    (``sys.argv[1:]`` by default) or a single ``.json`` file path, as ``HfArgumentParser``."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def _connector_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--connector_config must be a JSON object, got {text!r}: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"--connector_config must be a JSON object, got {text!r}")
    return value


def _check_args(model_args: ModelArguments) -> None:
    if model_args.stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {model_args.stage!r}")
    if model_args.lora_r < 0:
        raise ValueError(f"--lora_r must be >= 0, got {model_args.lora_r}")
    if model_args.lora_r and model_args.stage != 2:
        raise ValueError(f"--lora_r applies to stage 2 (the language model is frozen in stage 1), got --stage "
                         f"{model_args.stage}")


def load_model(model_args: ModelArguments) -> tuple[nn.Module, Any]:
    """``(AnchorFormerLlavaForConditionalGeneration, its processor)`` from ``--model_name_or_path``."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from anchor_former.adapters.transformers import (
        AnchorFormerLlavaConfig,
        AnchorFormerLlavaForConditionalGeneration,
        attach_anchor_former,
        register_auto_classes,
    )

    register_auto_classes()
    path = model_args.model_name_or_path
    dtype = getattr(torch, model_args.torch_dtype)
    processor = AutoProcessor.from_pretrained(path)
    if AutoConfig.from_pretrained(path).model_type == AnchorFormerLlavaConfig.model_type:
        model = AnchorFormerLlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        attach_anchor_former(model, processor, num_anchors=model_args.num_anchors, connector=model_args.connector,
                             score=model_args.score, **_connector_kwargs(model_args.connector_config))
    return model, processor


def set_trainable(model: nn.Module, model_args: ModelArguments) -> nn.Module:
    """Freeze per stage (see the module docstring); returns the model to train (a peft model with LoRA)."""
    model.requires_grad_(False)
    if model_args.stage == 2:
        if model_args.lora_r:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as error:
                raise ValueError("--lora_r > 0 needs peft (pip install peft)") from error
            lora = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                              lora_dropout=model_args.lora_dropout, target_modules=LORA_TARGETS)
            model = get_peft_model(model, lora)
        else:
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
    _connector(model).requires_grad_(True)
    return model


def _connector(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.multi_modal_projector


def connector_digest(model: nn.Module) -> str:
    """SHA-256 over the connector's state dict (names, dtypes and bytes, in order): equal digests mean
    bitwise equal weights."""
    digest = hashlib.sha256()
    for name, tensor in _connector(model).state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train(model_args: ModelArguments, data_args: DataArguments, training_args: Any) -> Any:
    """Validate the data, load and freeze the model, run ``Trainer.train()`` and save; returns the Trainer.

    Raises:
        ValueError: bad arguments, or a dataset problem (:func:`~anchor_former.data.load_conversations`),
            before the model is loaded.
    """
    from transformers import Trainer, set_seed

    from anchor_former.data import ConversationCollator, ConversationDataset, load_conversations

    _check_args(model_args)
    samples = load_conversations(data_args.data_path, image_folder=data_args.image_folder)
    set_seed(training_args.seed)  # the connector's initialisation: same on every rank and in every run
    model, processor = load_model(model_args)
    model.config.use_cache = False
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    template = data_args.template or ("plain" if model_args.stage == 1 else "vicuna_v1")
    dataset = ConversationDataset(
        samples, tokenizer=tokenizer, image_processor=processor.image_processor,
        image_token_id=model.config.image_token_id, num_image_tokens=int(model.config.image_seq_length),
        template=template, max_length=data_args.max_length, image_aspect_ratio=data_args.image_aspect_ratio,
    )
    model = set_trainable(model, model_args)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=ConversationCollator(pad_token_id=pad), processing_class=processor)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    if model_args.lora_r:
        trainer.model = trainer.model.merge_and_unload()  # plain weights: the folder reloads without peft
    trainer.model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    args = training_args
    print(f"[rank {args.process_index}/{args.world_size}] connector sha256 {connector_digest(trainer.model)}",
          flush=True)
    return trainer


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m anchor_former.train``."""
    train(*parse_args(argv))


if __name__ == "__main__":
    main()
