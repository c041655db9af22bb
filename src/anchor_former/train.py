"""Train the connector of a transformers LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision model with ``transformers.Trainer``.

Command line (every ``TrainingArguments`` flag works: ``--per_device_train_batch_size``,
``--gradient_accumulation_steps``, ``--bf16``, ``--fsdp``, ``--deepspeed``, ``--gradient_checkpointing``,
``--report_to``, ``--logging_steps``, ``--resume_from_checkpoint``, ...)::

    # stage 1: connector only, caption data, LLaVA's "plain" template
    python -m anchor_former.train --model_name_or_path llava-hf/llava-1.5-7b-hf --stage 1 \\
        --num_anchors 144 --data_path blip_laion_cc_sbu_558k.json --image_folder images/ --output_dir out/stage1
    # stage 2: connector + LLM (or LoRA on the LLM with --lora_r 128), instruction data, "vicuna_v1"
    python -m anchor_former.train --model_name_or_path out/stage1 --stage 2 \\
        --data_path llava_v1_5_mix665k.json --image_folder images/ --output_dir out/stage2
    torchrun --nproc_per_node 8 -m anchor_former.train ...   # DDP / FSDP / DeepSpeed: the Trainer's own

``--model_name_or_path`` is a stock checkpoint of a supported family (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``; the family comes from
its ``config.json``, read before any weight), switched with the public
:func:`~anchor_former.adapters.transformers.attach_anchor_former` and ``--connector``, ``--num_anchors``,
``--score``, ``--connector_config``; or a folder this module wrote (model type ``anchor_former_llava``,
``anchor_former_llava_next``, ``anchor_former_llava_onevision``; the connector settings come from its
config, and a connector flag that contradicts them is refused). On the anyres families (NeXT, OneVision) the connector runs per view
(AcFormer: K + 1 tokens per view on CLIP, K on SigLIP) in the attached model's layout, and each sample gets
the number of image tokens the attached processor writes for its image. The output folder holds the whole
model and its processor and reloads with the family's ``AnchorFormer*ForConditionalGeneration.from_pretrained``
and processor class (see ``docs/training.md``).

Stage 1 trains the connector (and, on the anyres families, ``image_newline``) and freezes everything
else; stage 2 also trains the language model and ``lm_head`` (or, with ``--lora_r > 0`` and ``peft``
installed, LoRA adapters on the language model's linear layers and the connector as a peft
``modules_to_save`` copy, merged into the weights before saving; ``image_newline`` stays as stage 1 left it).
The vision tower is always frozen.

Before any weight is read, every argument (:mod:`anchor_former.preflight`: family, connector name, keys and
types, budget against the patch grid) and every sample (:func:`anchor_former.data.load_conversations`:
structure, placeholders, image files that decode, encoding) is checked. Checkpoints and the output folder
are written with the running model's own key names, so ``--resume_from_checkpoint`` restores every weight
(a resumed run equals an uninterrupted one). At the end every process logs a SHA-256 digest of its
connector weights; under DDP all ranks print the same.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn

from anchor_former.preflight import CheckpointInfo, check_connector, parse_connector_config, read_checkpoint

__all__ = [
    "DataArguments",
    "ModelArguments",
    "RunPlan",
    "check_run",
    "load_model",
    "main",
    "parse_args",
    "set_trainable",
    "train",
]

logger = logging.getLogger(__name__)

#: LLaMA/Qwen2-family linear layers that LoRA adapts (in the language model only)
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ModelArguments:
    """What to train: the model, the connector and the stage."""

    model_name_or_path: str = field(
        metadata={"help": "a LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision checkpoint or a folder this module wrote"}
    )
    stage: int = field(
        default=1, metadata={"help": "1: connector only; 2: connector + language model", "choices": [1, 2]}
    )
    connector: str | None = field(
        default=None, metadata={"help": "connector name (anchor_former.build_connector); default acformer"}
    )
    num_anchors: int | None = field(
        default=None,
        metadata={
            "help": "K anchors (acformer) per image or per view, default 144; the LLM sees K + 1 tokens per view on CLIP"
        },
    )
    score: str | None = field(
        default=None,
        metadata={
            "help": "anchor score; default: cls (LLaVA-1.5, LLaVA-NeXT), received (OneVision's SigLIP)",
            "choices": ["cls", "norm", "map", "received"],
        },
    )
    connector_config: str | None = field(
        default=None, metadata={"help": "JSON object of further connector arguments, e.g. '{\"depth\": 6}'"}
    )
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights are loaded in (mixed precision comes from --bf16/--fp16)",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )
    lora_r: int = field(
        default=0, metadata={"help": "stage 2: LoRA rank on the language model (0: full fine-tuning; needs peft)"}
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})


@dataclass
class DataArguments:
    """LLaVA-format data (see :mod:`anchor_former.data`)."""

    data_path: str = field(metadata={"help": "LLaVA-format JSON: a list of {image, conversations}"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the 'image' entries are relative to"})
    template: str | None = field(
        default=None,
        metadata={
            "help": "conversation template; default: plain for stage 1, vicuna_v1 for stage 2",
            "choices": ["plain", "vicuna_v1"],
        },
    )
    max_length: int = field(default=2048, metadata={"help": "longest token sequence (image tokens included)"})
    image_aspect_ratio: str | None = field(
        default=None,
        metadata={
            "help": "pad (pad to a square, then the processor), square (LLaVA-1.5's resize and crop) or anyres (the "
            "NeXT / OneVision views); default: pad for LLaVA-1.5, anyres for NeXT and OneVision",
            "choices": ["pad", "square", "anyres"],
        },
    )
    check_images: str = field(
        default="decode",
        metadata={
            "help": "before loading the model: decode every image file (decode) or only check it exists (exists)",
            "choices": ["decode", "exists"],
        },
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, Any]:
    """``(ModelArguments, DataArguments, transformers.TrainingArguments)`` from a command line
    (``sys.argv[1:]`` by default) or a single ``.json`` file path, as ``HfArgumentParser``."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(cast(Any, (ModelArguments, DataArguments, TrainingArguments)))  # typed as NewType(Any)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return cast("tuple[ModelArguments, DataArguments, Any]", parser.parse_json_file(argv[0]))
    return cast("tuple[ModelArguments, DataArguments, Any]", parser.parse_args_into_dataclasses(args=argv))


@dataclass(frozen=True)
class RunPlan:
    """What :func:`check_run` established before any weight is read.

    Attributes:
        checkpoint: the family and patch grid of ``--model_name_or_path`` (:func:`~anchor_former.preflight.read_checkpoint`).
        attach: keyword arguments of ``attach_anchor_former`` (empty for a folder this module wrote).
        image_aspect_ratio: ``--image_aspect_ratio`` or the family's default.
        template: ``--template`` or the stage's default.
    """

    checkpoint: CheckpointInfo
    attach: dict[str, Any]
    image_aspect_ratio: str
    template: str


def _check_distributed(training_args: Any) -> None:
    """Multi-process runs that would silently not be what the command says (see docs/training.md): FSDP or
    DeepSpeed on CPU (accelerate drops them), and torchrun on CPU without ``--use_cpu`` (every process
    then trains alone on the whole dataset: world size 1 in each)."""
    if training_args is None:
        return
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise ValueError(
            f"torchrun started {launched} processes (WORLD_SIZE={launched}) but the Trainer sees world_size="
            f"{training_args.world_size}: without CUDA pass --use_cpu, or each process trains alone"
        )
    if not (training_args.fsdp or training_args.deepspeed):
        return
    if getattr(training_args, "use_cpu", False) or not torch.cuda.is_available():
        flag = "--fsdp" if training_args.fsdp else "--deepspeed"
        raise ValueError(
            f"{flag} needs CUDA devices, got a CPU run (use_cpu={training_args.use_cpu}, "
            f"torch.cuda.is_available()={torch.cuda.is_available()}): on CPU, accelerate keeps the MULTI_CPU "
            "distributed type and drops the FSDP / DeepSpeed plugin without a word, so the run would be plain DDP "
            "with full copies of the model; drop the flag for DDP, or run on GPUs"
        )


DEFAULT_CONNECTOR, DEFAULT_NUM_ANCHORS = "acformer", 144


def _check_recorded(info: CheckpointInfo, model_args: ModelArguments, kwargs: dict[str, Any]) -> None:
    """A folder this module wrote keeps its connector: connector flags may only repeat what it records."""
    from anchor_former.adapters.settings import AnchorSettings

    recorded = AnchorSettings.from_dict(info.anchor_former or {})
    config = {**recorded.connector_config, "num_anchors": recorded.num_anchors}
    given: list[tuple[str, Any, object]] = [
        ("--connector", model_args.connector, recorded.connector),
        ("--score", model_args.score, recorded.score),
        (
            "--num_anchors",
            model_args.num_anchors,
            model_args.num_anchors if recorded.num_anchors is None else recorded.num_anchors,
        ),
    ]
    given += [(f"--connector_config key {key!r}", value, config.get(key, ...)) for key, value in kwargs.items()]
    for flag, value, kept in given:
        if value is not None and value != kept:
            shown = "nothing" if kept is ... else repr(kept)
            raise ValueError(
                f"{flag} must match what {info.path!r} records (config.json anchor_former: {shown}), got {value!r}: "
                "a folder this module wrote keeps its connector; leave the flag out, or start from the stock checkpoint"
            )


def check_run(model_args: ModelArguments, data_args: DataArguments, training_args: Any = None) -> RunPlan:
    """Check every argument against ``--model_name_or_path``'s ``config.json``; reads no weight.

    Raises:
        ValueError: a bad stage / LoRA combination, ``--fsdp`` / ``--deepspeed`` on CPU, an unsupported
            checkpoint family (Qwen-VL included: training-free only), and everything
            :func:`~anchor_former.preflight.check_connector` refuses; an ``--image_aspect_ratio`` the family
            does not use.
    """
    if model_args.stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {model_args.stage!r}")
    if model_args.lora_r < 0:
        raise ValueError(f"--lora_r must be >= 0, got {model_args.lora_r}")
    if model_args.lora_r and model_args.stage != 2:
        raise ValueError(
            f"--lora_r applies to stage 2 (the language model is frozen in stage 1), got --stage {model_args.stage}"
        )
    _check_distributed(training_args)
    info = read_checkpoint(model_args.model_name_or_path)
    family = info.family
    aspect = data_args.image_aspect_ratio or family.aspect_ratios[0]
    if aspect not in family.aspect_ratios:
        raise ValueError(
            f"--image_aspect_ratio must be one of {', '.join(family.aspect_ratios)} for {family.name}, got {aspect!r}"
        )
    attach: dict[str, Any] = {}
    kwargs = parse_connector_config(model_args.connector_config)
    if info.attached:
        _check_recorded(info, model_args, kwargs)
    else:
        connector = model_args.connector or DEFAULT_CONNECTOR
        num_anchors = DEFAULT_NUM_ANCHORS if model_args.num_anchors is None else model_args.num_anchors
        score = model_args.score or family.default_score
        check_connector(info, connector=connector, num_anchors=num_anchors, score=score, kwargs=kwargs)
        attach = {"num_anchors": num_anchors, "connector": connector, "score": score, **kwargs}
    template = data_args.template or ("plain" if model_args.stage == 1 else "vicuna_v1")
    return RunPlan(checkpoint=info, attach=attach, image_aspect_ratio=aspect, template=template)


def _classes(info: CheckpointInfo) -> tuple[Any, Any]:
    """``(model class, processor class)`` that loads ``info``'s checkpoint (stock or attached)."""
    import transformers

    name = info.family.model_type
    if not info.attached:
        stock = {"llava": "Llava", "llava_next": "LlavaNext", "llava_onevision": "LlavaOnevision"}[name]
        return getattr(transformers, f"{stock}ForConditionalGeneration"), transformers.AutoProcessor
    if name == "llava":
        from anchor_former.adapters.hf.llava import AnchorFormerLlavaForConditionalGeneration

        return AnchorFormerLlavaForConditionalGeneration, transformers.AutoProcessor
    if name == "llava_next":
        from anchor_former.adapters.hf.llava_next import (
            AnchorFormerLlavaNextForConditionalGeneration,
            AnchorFormerLlavaNextProcessor,
        )

        return AnchorFormerLlavaNextForConditionalGeneration, AnchorFormerLlavaNextProcessor
    from anchor_former.adapters.hf.llava_onevision import (
        AnchorFormerLlavaOnevisionForConditionalGeneration,
        AnchorFormerLlavaOnevisionProcessor,
    )

    return AnchorFormerLlavaOnevisionForConditionalGeneration, AnchorFormerLlavaOnevisionProcessor


def load_model(model_args: ModelArguments, plan: RunPlan | None = None) -> tuple[nn.Module, Any]:
    """``(attached model, its processor)`` from ``--model_name_or_path`` (checked first when ``plan`` is None).

    A stock checkpoint loads with its family's transformers class and is switched by
    :func:`anchor_former.adapters.transformers.attach_anchor_former`; a folder this module wrote loads
    with the family's ``AnchorFormer*ForConditionalGeneration``.
    """
    from anchor_former.adapters.transformers import attach_anchor_former

    if plan is None:
        plan = check_run(model_args, DataArguments(data_path=""))
    path = model_args.model_name_or_path
    model_class, processor_class = _classes(plan.checkpoint)
    processor = processor_class.from_pretrained(path)
    model = model_class.from_pretrained(path, dtype=getattr(torch, model_args.torch_dtype))
    if plan.attach:
        attach_anchor_former(model, processor, **plan.attach)
    return model, processor


def _base(model: nn.Module) -> Any:
    return cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model


def _companions(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that train with the connector: the anyres families' ``image_newline`` (the LLM token that
    closes each row of views in the layout the connector's tokens are read in)."""
    newline = getattr(_base(model).model, "image_newline", None)
    return [newline] if isinstance(newline, nn.Parameter) else []


def set_trainable(model: nn.Module, model_args: ModelArguments) -> nn.Module:
    """Freeze per stage (see the module docstring); returns the model to train (a peft model with LoRA)."""
    model.requires_grad_(False)
    if model_args.stage == 2:
        if model_args.lora_r:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as error:
                raise ValueError("--lora_r > 0 needs peft (pip install peft)") from error
            # modules_to_save: peft trains a copy of the connector and writes it into its checkpoints, so a
            # resumed LoRA run continues the connector too (merge_and_unload puts the trained copy back)
            lora = LoraConfig(
                r=model_args.lora_r,
                lora_alpha=model_args.lora_alpha,
                lora_dropout=model_args.lora_dropout,
                target_modules=LORA_TARGETS,
                modules_to_save=["multi_modal_projector"],
            )
            return get_peft_model(model, lora)
        cast(Any, model).model.language_model.requires_grad_(True)
        cast(Any, model).lm_head.requires_grad_(True)
    _connector(model).requires_grad_(True)
    for parameter in _companions(model):
        parameter.requires_grad_(True)
    return model


def _connector(model: nn.Module) -> nn.Module:
    connector: nn.Module = _base(model).model.multi_modal_projector
    return connector


def connector_digest(model: nn.Module) -> str:
    """SHA-256 over the connector's state dict (names, dtypes and bytes, in order): equal digests mean
    bitwise equal weights. Under FSDP every rank must call it (the shards are gathered)."""
    digest = hashlib.sha256()
    for name, tensor in _connector(model).state_dict().items():
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor): every rank gathers the whole weight
            tensor = tensor.full_tensor()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _trainer_class() -> type:
    from transformers import PreTrainedModel, Trainer
    from transformers.trainer import TRAINING_ARGS_NAME

    class ConnectorTrainer(Trainer):
        """``Trainer`` that writes weights under the running model's own key names.

        ``save_pretrained`` writes LLaVA-1.5 (and any family with registered key conversions) in
        transformers' older key layout (``language_model.model.*``), which ``from_pretrained`` converts
        back but ``Trainer``'s resume loads with a raw ``load_state_dict(strict=False)``: every renamed
        weight was skipped and the run restarted from the stage's initial weights. With
        ``save_original_format=False`` the checkpoint keys ARE the model's keys, both loaders read them.
        """

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if not isinstance(model, PreTrainedModel) or getattr(self, "is_distributed_loading_by_transformers", False):
                super()._save(output_dir, state_dict)  # peft adapters / sharded loading: the Trainer's own
                return
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            assert output_dir is not None  # TrainingArguments.__post_init__ fills a default output_dir
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

        def _issue_warnings_after_load(self, load_result: Any) -> None:
            """A checkpoint that lacks a weight this run trains is an error, not a warning: resuming would
            silently restart that weight (a checkpoint in another key layout looks exactly like this)."""
            assert self.model is not None  # a checkpoint loads into the Trainer's model
            trained = {name for name, p in self.model.named_parameters() if p.requires_grad}
            lost = sorted(trained & set(load_result.missing_keys))
            if lost:
                raise ValueError(
                    f"--resume_from_checkpoint {self.args.resume_from_checkpoint!r} must hold every weight this run "
                    f"trains, got {len(lost)} missing (e.g. {lost[:3]}) and {len(load_result.unexpected_keys)} keys "
                    f"the model does not have (e.g. {sorted(load_result.unexpected_keys)[:3]}); was it written in "
                    "another key layout (transformers' default save_pretrained) or for another model?"
                )
            super()._issue_warnings_after_load(load_result)

    return ConnectorTrainer


def train(model_args: ModelArguments, data_args: DataArguments, training_args: Any) -> Any:
    """Check arguments and data, load, attach and freeze the model, run ``Trainer.train()`` and save;
    returns the Trainer.

    Raises:
        ValueError: bad arguments (:func:`check_run`) or a dataset problem
            (:func:`~anchor_former.data.load_conversations`), before any weight is read.
    """
    from transformers import set_seed

    from anchor_former.data import ConversationCollator, ConversationDataset, load_conversations

    plan = check_run(model_args, data_args, training_args)
    samples = load_conversations(
        data_args.data_path,
        image_folder=data_args.image_folder,
        check_images=cast(Literal["decode", "exists"], data_args.check_images),  # the field's "choices"
    )
    set_seed(training_args.seed)  # the connector's initialisation: same on every rank and in every run
    model, processor = load_model(model_args, plan)
    config: Any = cast(Any, model).config
    config.use_cache = False
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = ConversationDataset(
        samples,
        tokenizer=tokenizer,
        processor=processor,
        image_token_id=config.image_token_id,
        template=cast(Literal["plain", "vicuna_v1"], plan.template),
        max_length=data_args.max_length,
        image_aspect_ratio=cast(Literal["pad", "square", "anyres"], plan.image_aspect_ratio),
    )
    model = set_trainable(model, model_args)
    trainer = _trainer_class()(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=ConversationCollator(pad_token_id=pad),
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    if model_args.lora_r:
        trainer.model = trainer.model.merge_and_unload()  # plain weights: the folder reloads without peft
    trainer.model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    args = training_args
    print(
        f"[rank {args.process_index}/{args.world_size}] connector sha256 {connector_digest(trainer.model)}", flush=True
    )
    return trainer


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m anchor_former.train``."""
    train(*parse_args(argv))


if __name__ == "__main__":
    main()
