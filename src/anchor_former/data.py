"""LLaVA-format training data: a JSON list of conversations, each optionally about one image.

The file format is LLaVA's (``llava_v1_5_mix665k.json``, ``blip_laion_cc_sbu_558k.json``)::

    [{"id": "0001", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                        {"from": "gpt", "value": "A bus."}, ...]}, ...]

:func:`load_conversations` reads and checks the WHOLE file before anything trains (and before any
model weight is read): the file is UTF-8 JSON holding a list; every sample is an object with a
``conversations`` list of ``{"from": "human"|"gpt", "value": str}`` turns that alternate human/gpt
starting with human and end with gpt; ``<image>`` placeholders appear in human turns only, as many as
the sample has images (one image per sample: ``image`` is a file name, or a list of one); the image
file exists under ``image_folder`` and decodes. The first violation raises ``ValueError`` naming the
sample index, the JSON file and the field (``image``, ``conversations[j].value``, ...).

:class:`ConversationDataset` turns a sample into ``input_ids (T,)``, ``labels (T,)`` and the image's
model inputs; the ``<image>`` placeholder becomes as many copies of the model's image token as the
model gives that image (K + 1 for AcFormer on LLaVA-1.5; for the anyres families, LLaVA-NeXT and
OneVision, a count that depends on the image size, taken from the attached model's processor), and
``labels`` is ``-100`` everywhere except the answers (the gpt turns and the end-of-turn token after
each). Templates:

* ``"plain"`` (stage 1, LLaVA's caption pretraining): ``<image>`` tokens, the caption, ``"\\n"``; the
  human turn's text is dropped (as LLaVA's ``plain`` template does); samples must be one human + one gpt
  turn with an image.
* ``"vicuna_v1"`` (stage 2, LLaVA-1.5's instruction tuning): ``"{system} USER: {q} ASSISTANT: {a}</s>"``
  per round, ``</s>`` being the tokenizer's end-of-sequence token.

Text pieces are tokenized separately and concatenated, so the answer mask is exact by construction
(LLaVA re-tokenizes whole rounds and masks everything on a length mismatch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "ConversationCollator",
    "ConversationDataset",
    "ConversationSample",
    "ImageCheck",
    "Template",
    "VICUNA_SYSTEM",
    "load_conversations",
]

#: label value the loss ignores (PyTorch's cross-entropy default)
IGNORE_INDEX = -100
#: where the image goes in a human turn
IMAGE_PLACEHOLDER = "<image>"
#: LLaVA-1.5's system prompt for ``vicuna_v1``
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Template = Literal["plain", "vicuna_v1"]
#: how :func:`load_conversations` checks image files: ``"decode"`` (open and decode every pixel) or
#: ``"exists"`` (the file is there; a broken file then fails when its sample is first used)
ImageCheck = Literal["decode", "exists"]
AspectRatio = Literal["pad", "square", "anyres"]
_ROLES = ("human", "gpt")


@dataclass(frozen=True)
class ConversationSample:
    """One validated sample.

    Attributes:
        index: position in the JSON list (error messages name it).
        image: absolute path of the image file, or None for a text-only sample.
        turns: ``(role, text)`` pairs, roles alternating ``"human"`` / ``"gpt"``; when ``image`` is set
            exactly one human turn holds the ``<image>`` placeholder.
    """

    index: int
    image: str | None
    turns: tuple[tuple[str, str], ...]


def _sample_error(index: int, data_path: str, what: str) -> ValueError:
    return ValueError(f"sample {index} of {data_path}: {what}")


def _check_turns(index: int, data_path: str, conversations: Any) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise _sample_error(index, data_path, f"'conversations' must be a non-empty list, got {conversations!r:.80}")
    turns = []
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _sample_error(index, data_path, f"turn {j} must be {{'from': ..., 'value': str}}, got {turn!r:.80}")
        role = turn.get("from")
        if role != _ROLES[j % 2]:
            raise _sample_error(
                index,
                data_path,
                f"turn {j} must be from {_ROLES[j % 2]!r} (turns alternate human/gpt, starting with human), "
                f"got {role!r}",
            )
        if role == "gpt" and IMAGE_PLACEHOLDER in turn["value"]:
            raise _sample_error(
                index,
                data_path,
                f"conversations[{j}].value (a 'gpt' answer) holds {IMAGE_PLACEHOLDER}; the placeholder belongs in "
                "a 'human' turn (the model reads the image, it does not write it)",
            )
        turns.append((role, turn["value"]))
    if turns[-1][0] != "gpt":
        raise _sample_error(
            index,
            data_path,
            f"the last turn must be from 'gpt' (an answer), got {len(turns)} turns ending with 'human'",
        )
    return turns


def _image_name(index: int, data_path: str, image: Any) -> str:
    """The one file name of an ``image`` entry (a string, or a list of one string)."""
    if isinstance(image, list):
        if len(image) != 1:
            raise _sample_error(
                index, data_path, f"'image' lists {len(image)} files; one image per sample is supported"
            )
        image = image[0]
    if not isinstance(image, str) or not image:
        raise _sample_error(index, data_path, f"'image' must be a file name, got {image!r:.80}")
    return image


def _decode_error(path: str) -> str | None:
    """None if ``path`` decodes completely, else what PIL said."""
    from PIL import Image

    try:
        with Image.open(path) as handle:
            handle.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"{type(error).__name__}: {error}"
    return None


def _check_decoding(images: list[tuple[int, str]], data_path: str) -> None:
    """Decode every ``(sample index, path)`` in a thread pool (PIL releases the GIL while decoding); the
    lowest failing sample index raises."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        for (index, path), error in zip(images, pool.map(_decode_error, [p for _, p in images])):
            if error is not None:
                raise _sample_error(index, data_path, f"image file {path} ('image' field) does not decode: {error}")


def _read_json(data_path: str) -> Any:
    try:
        with open(data_path, encoding="utf-8") as handle:
            return json.load(handle)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"data_path {data_path!r} must be UTF-8 encoded JSON: byte {error.start} is not UTF-8 ({error.reason}); "
            "convert the file, e.g. iconv -f latin1 -t utf-8"
        ) from error
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"data_path {data_path!r} must be a readable JSON file: {error}") from error


def load_conversations(
    data_path: str | os.PathLike[str],
    *,
    image_folder: str | os.PathLike[str] | None = None,
    check_images: ImageCheck = "decode",
) -> list[ConversationSample]:
    """Read and validate a LLaVA-format JSON file (every sample, before any training).

    Args:
        data_path: the JSON file (UTF-8): a list of ``{"image"?: str | [str], "conversations": [...]}`` objects.
        image_folder: folder the ``image`` entries are relative to (absolute entries are kept).
        check_images: ``"decode"`` (default: every image file is opened and fully decoded, in a thread pool
            after the structural checks, so a truncated or corrupt file stops the run now, not hours in) or
            ``"exists"`` (only that the file is there).

    Returns:
        One :class:`ConversationSample` per JSON entry, in file order. A sample whose human turns hold no
        ``<image>`` but which has an ``image`` gets ``"<image>\\n"`` prepended to its first turn (as LLaVA does).

    Raises:
        ValueError: a file that is not UTF-8, not JSON, or not a list; a sample that is not an object,
            malformed turns (not alternating human/gpt from human, not ending with gpt, a value that is not
            a string), ``<image>`` in a gpt turn, more ``<image>`` placeholders than images, ``<image>``
            without an ``image`` entry, an ``image`` that is not a file name (or a list of one), an image file
            that does not exist or does not decode. The message names the sample index, ``data_path`` and the
            field.
    """
    if check_images not in ("decode", "exists"):
        raise ValueError(f"check_images must be 'decode' or 'exists', got {check_images!r}")
    data_path = os.fspath(data_path)
    raw = _read_json(data_path)
    if not isinstance(raw, list):
        raise ValueError(f"data_path {data_path!r} must hold a JSON list of samples, got {type(raw).__name__}")
    folder = os.fspath(image_folder) if image_folder is not None else ""
    samples, images = [], []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise _sample_error(index, data_path, f"must be a JSON object, got {type(entry).__name__}")
        turns = _check_turns(index, data_path, entry.get("conversations"))
        count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        image = entry.get("image")
        if image is None:
            if count:
                raise _sample_error(index, data_path, f"has {count} {IMAGE_PLACEHOLDER} placeholder(s) but no 'image'")
        else:
            image = os.path.abspath(os.path.join(folder, _image_name(index, data_path, image)))
            if count > 1:
                raise _sample_error(
                    index,
                    data_path,
                    f"has {count} {IMAGE_PLACEHOLDER} placeholders in its human "
                    "turns for 1 image; one image per sample is supported",
                )
            if not os.path.isfile(image):
                raise _sample_error(index, data_path, f"image file {image} does not exist (image_folder={folder!r})")
            images.append((index, image))
            if count == 0:
                turns[0] = (turns[0][0], f"{IMAGE_PLACEHOLDER}\n{turns[0][1]}")
        samples.append(ConversationSample(index=index, image=image, turns=tuple(turns)))
    if check_images == "decode":
        _check_decoding(images, data_path)
    return samples


def _token_count(num_image_tokens: int | None) -> int:
    """The image token count; a TypeError without one, as ``list * None`` raised before."""
    if num_image_tokens is None:
        raise TypeError("num_image_tokens is needed for a sample with an image (give num_image_tokens or processor)")
    return num_image_tokens


def _expand_to_square(image: Any, background: tuple[int, ...]) -> Any:
    """LLaVA-1.5's ``pad`` aspect ratio: paste the image centred on a square of the processor's mean colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


class ConversationDataset(Dataset):
    """Tokenized samples for causal-LM training with the loss on the answers only.

    Args:
        samples: from :func:`load_conversations`.
        tokenizer: a Hugging Face tokenizer (``__call__`` with ``add_special_tokens``; ``eos_token_id``;
            ``bos_token_id`` may be None).
        image_processor: a Hugging Face image processor (``__call__(images=..., return_tensors="pt")``) for
            models with a fixed number of image tokens (``num_image_tokens``); not needed with ``processor``.
        image_token_id: the model's image token id (``config.image_token_id``).
        num_image_tokens: how many image tokens each image takes (K + 1 for AcFormer on LLaVA-1.5); not
            used with ``processor``.
        processor: instead of ``image_processor`` + ``num_image_tokens``, the model's multimodal processor
            (``LlavaProcessor``, the attached ``AnchorFormerLlavaNextProcessor`` /
            ``AnchorFormerLlavaOnevisionProcessor``): each image goes through it, and the number of image
            tokens it writes for that image is the number the sample gets (for anyres models it depends on
            the image's size).
        template: ``"plain"`` or ``"vicuna_v1"`` (see the module docstring).
        max_length: longest ``input_ids``; longer samples are cut at the end. A cut through the image
            tokens raises ValueError (the model would see a partial image).
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5: pad to a square with the mean colour, then the
            processor), ``"square"`` or ``"anyres"`` (the processor's own handling: resize and crop for
            LLaVA-1.5's, the anyres views for LLaVA-NeXT's and OneVision's).

    ``dataset[i]`` → ``{"input_ids": (T,) long, "labels": (T,) long}`` plus, for a sample with an image,
    ``"pixel_values"`` ``(C, H_img, W_img)`` (fixed-size processors) or ``(V, C, H_img, W_img)`` (V anyres
    views) and, where the processor gives it, ``"image_sizes"`` ``(2,)`` (the image's height and width).
    """

    def __init__(
        self,
        samples: Sequence[ConversationSample],
        *,
        tokenizer: Any,
        image_processor: Any = None,
        image_token_id: int,
        num_image_tokens: int | None = None,
        processor: Any = None,
        template: Template = "vicuna_v1",
        max_length: int = 2048,
        image_aspect_ratio: AspectRatio = "pad",
    ) -> None:
        if template not in ("plain", "vicuna_v1"):
            raise ValueError(f"template must be 'plain' or 'vicuna_v1', got {template!r}")
        if image_aspect_ratio not in ("pad", "square", "anyres"):
            raise ValueError(f"image_aspect_ratio must be 'pad', 'square' or 'anyres', got {image_aspect_ratio!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
        if (
            processor is None
            and num_image_tokens is not None
            and (isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1)
        ):
            raise ValueError(f"num_image_tokens must be an integer >= 1, got {num_image_tokens!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer must have an eos_token (it ends every answer), got eos_token_id=None")
        if (
            any(s.image is not None for s in samples)
            and processor is None
            and (image_processor is None or num_image_tokens is None)
        ):
            raise ValueError(
                "image_processor and num_image_tokens (or processor) are required: some samples have an image"
            )
        if template == "plain":
            for sample in samples:
                if sample.image is None or len(sample.turns) != 2:
                    raise ValueError(
                        f"sample {sample.index}: template 'plain' (caption pretraining) needs an image and exactly "
                        f"one human + one gpt turn, got image={sample.image!r} and {len(sample.turns)} turns"
                    )
        self.samples = list(samples)
        self.tokenizer = tokenizer
        self.processor = processor
        self.image_processor = processor.image_processor if processor is not None else image_processor
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = num_image_tokens
        self.template = template
        self.max_length = max_length
        self.image_aspect_ratio = image_aspect_ratio

    def __len__(self) -> int:
        return len(self.samples)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _prompt_ids(self, text: str, num_image_tokens: int | None) -> list[int]:
        """Text with at most one ``<image>`` → ids with the image tokens in its place."""
        before, _, after = text.partition(IMAGE_PLACEHOLDER)
        if before == text:
            return self._ids(text)
        return self._ids(before) + [self.image_token_id] * _token_count(num_image_tokens) + self._ids(after)

    def encode(
        self, sample: ConversationSample, num_image_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids (T,), labels (T,))`` for one sample; labels are ``-100`` outside the answers.

        ``num_image_tokens``: the image's token count (default: the dataset's ``num_image_tokens``).
        """
        n = self.num_image_tokens if num_image_tokens is None else num_image_tokens
        pieces: list[tuple[list[int], bool]] = []  # (ids, is_answer)
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            pieces.append(([bos], False))
        if self.template == "plain":
            pieces.append(([self.image_token_id] * _token_count(n), False))
            pieces.append((self._ids(sample.turns[1][1] + "\n"), True))
        else:
            prompt = VICUNA_SYSTEM + " "
            for role, text in sample.turns:
                if role == "human":
                    prompt += f"USER: {text} ASSISTANT:"
                else:
                    pieces.append((self._prompt_ids(prompt, n), False))
                    pieces.append((self._ids(" " + text) + [self.tokenizer.eos_token_id], True))
                    prompt = ""
        input_ids = [i for ids, _ in pieces for i in ids]
        labels = [i if answer else IGNORE_INDEX for ids, answer in pieces for i in ids]
        if len(input_ids) > self.max_length:
            cut = input_ids[self.max_length :]
            if self.image_token_id in cut:
                raise ValueError(
                    f"sample {sample.index}: max_length={self.max_length} cuts through its {n} image tokens "
                    f"({len(input_ids)} tokens in all); raise max_length"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def _read_image(self, sample: ConversationSample) -> Any:
        from PIL import Image

        if sample.image is None:
            raise ValueError(f"sample {sample.index} has no image")
        with Image.open(sample.image) as handle:
            image = handle.convert("RGB")
        if self.image_aspect_ratio == "pad":
            mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            image = _expand_to_square(image, tuple(int(round(255 * m)) for m in mean))
        return image

    def load_image(self, sample: ConversationSample) -> torch.Tensor:
        """Pixel values of the sample's image: ``(C, H_img, W_img)``, or ``(V, C, H_img, W_img)`` views."""
        return self.image_inputs(sample)[0]["pixel_values"]

    def image_inputs(self, sample: ConversationSample) -> tuple[dict[str, torch.Tensor], int]:
        """``(model inputs of the sample's image, its number of image tokens)``."""
        image = self._read_image(sample)
        if self.processor is None:
            pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            return {"pixel_values": pixels}, int(_token_count(self.num_image_tokens))
        out = self.processor(text=self.processor.image_token, images=image, return_tensors="pt")
        inputs = {"pixel_values": out["pixel_values"][0]}
        if "image_sizes" in out:
            inputs["image_sizes"] = torch.as_tensor(out["image_sizes"][0])
        return inputs, int((out["input_ids"] == self.image_token_id).sum())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.samples[i]
        if sample.image is None:
            input_ids, labels = self.encode(sample, 0)
            return {"input_ids": input_ids, "labels": labels}
        inputs, count = self.image_inputs(sample)
        input_ids, labels = self.encode(sample, count)
        return {"input_ids": input_ids, "labels": labels, **inputs}


def _stack_views(images: list[torch.Tensor]) -> torch.Tensor:
    """``(I, ...)`` stacked pixel values; anyres images with different view counts V_i are zero-padded to
    ``(I, V_max, C, H_img, W_img)``, as the LLaVA-NeXT / OneVision processors pad a batch."""
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images)
    most = max(int(image.shape[0]) for image in images)
    out = images[0].new_zeros((len(images), most, *images[0].shape[1:]))
    for row, image in enumerate(images):
        out[row, : image.shape[0]] = image
    return out


@dataclass(frozen=True)
class ConversationCollator:
    """Pads a list of :class:`ConversationDataset` items into a batch (right padding).

    Returns ``input_ids (B, T)`` (``pad_token_id``), ``labels (B, T)`` (``-100``), ``attention_mask
    (B, T)`` (1 = token) and, when any sample has an image, for the I samples with one, in batch order:
    ``pixel_values`` ``(I, C, H_img, W_img)`` (what ``LlavaForConditionalGeneration`` expects) or ``(I, V_max,
    C, H_img, W_img)`` (anyres views, zero-padded) and ``image_sizes (I, 2)`` where the items have them.
    """

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(int(item["input_ids"].shape[0]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = int(item["input_ids"].shape[0])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        with_image = [item for item in items if "pixel_values" in item]
        if with_image:
            batch["pixel_values"] = _stack_views([item["pixel_values"] for item in with_image])
            if "image_sizes" in with_image[0]:
                batch["image_sizes"] = torch.stack([item["image_sizes"] for item in with_image])
        return batch
