"""LLaVA-format data: up-front validation, answer-only labels (against a one-pass reference), collation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")

from PIL import Image  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast  # noqa: E402

from anchor_former.data import (  # noqa: E402
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    ConversationCollator,
    ConversationDataset,
    load_conversations,
)

IMAGE, NUM_IMAGE_TOKENS = 28, 5
WORDS = ["USER", "ASSISTANT", ":", "what", "is", "this", "?", "and", "now", "a", "red", "blue", "square", "circle"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<image>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
    )


@pytest.fixture(scope="module")
def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})


def conversation(*turns: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": text} for i, text in enumerate(turns)]


@pytest.fixture
def folder(tmp_path):
    """Two images and a valid three-sample file (one two-round, one text-only, one without <image>)."""
    for name, size in (("a.png", (20, 10)), ("b.png", (12, 12))):
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    data = [
        {
            "image": "a.png",
            "conversations": conversation("<image>\nwhat is this ?", "a red square", "and now ?", "a blue circle"),
        },
        {"conversations": conversation("what is this ?", "a square")},
        {"image": "b.png", "conversations": conversation("what is this ?", "a circle")},
    ]
    (tmp_path / "data.json").write_text(json.dumps(data))
    return tmp_path


def write(folder, data) -> str:
    path = folder / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


def dataset(samples, tokenizer, image_processor, **kwargs) -> ConversationDataset:
    return ConversationDataset(
        samples,
        tokenizer=tokenizer,
        image_processor=image_processor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=NUM_IMAGE_TOKENS,
        **kwargs,
    )


# --- validation ----------------------------------------------------------------------------------------


def test_load_conversations_reads_every_sample(folder) -> None:
    samples = load_conversations(folder / "data.json", image_folder=folder)
    assert [s.index for s in samples] == [0, 1, 2]
    assert samples[0].image == str(folder / "a.png") and samples[1].image is None
    assert [role for role, _ in samples[0].turns] == ["human", "gpt", "human", "gpt"]
    assert samples[2].turns[0][1] == "<image>\nwhat is this ?"  # the placeholder is added where LLaVA puts it


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"image": "missing.png", "conversations": conversation("<image> q", "a")},
            r"sample 1 of .*bad\.json: image file .*missing\.png does not exist",
        ),
        ({"conversations": conversation("q", "a", "q2")}, r"sample 1 of .*bad\.json: the last turn must be from 'gpt'"),
        ({"conversations": [{"from": "gpt", "value": "a"}]}, r"sample 1 of .*bad\.json: turn 0 must be from 'human'"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]},
            r"sample 1 of .*bad\.json: turn 1 must be from 'gpt'",
        ),
        (
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
            r"sample 1 of .*bad\.json: turn 0 must be \{'from'",
        ),
        ({"conversations": []}, r"sample 1 of .*bad\.json: 'conversations' must be a non-empty list"),
        (
            {"conversations": conversation("<image> q", "a")},
            r"sample 1 of .*bad\.json: has 1 <image> .* but no 'image'",
        ),
        (
            {"image": "a.png", "conversations": conversation("<image> q <image>", "a")},
            r"sample 1 of .*bad\.json: has 2 <image> placeholders",
        ),
        (
            {"image": 7, "conversations": conversation("q", "a")},
            r"sample 1 of .*bad\.json: 'image' must be a file name",
        ),
        ("text", r"sample 1 of .*bad\.json: must be a JSON object, got str"),
    ],
)
def test_load_conversations_names_the_sample_and_the_file(folder, entry, message) -> None:
    good = {"image": "a.png", "conversations": conversation("<image> q", "a")}
    with pytest.raises(ValueError, match=message):
        load_conversations(write(folder, [good, entry]), image_folder=folder)


def test_load_conversations_rejects_a_file_that_is_not_a_list(folder) -> None:
    with pytest.raises(ValueError, match=r"data_path .*bad\.json.* must hold a JSON list of samples, got dict"):
        load_conversations(write(folder, {"conversations": []}))
    (folder / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"data_path .*broken\.json.* must be a readable JSON file"):
        load_conversations(folder / "broken.json")


# --- tokenization and labels ----------------------------------------------------------------------------


def reference(sample, tokenizer) -> tuple[list[int], list[int]]:
    """One pass over the whole conversation string, then a label mask by walking the tokens: a token is
    an answer token from after each ``ASSISTANT :`` up to and including the next ``</s>``."""
    text = VICUNA_SYSTEM + " "
    for role, value in sample.turns:
        text += f"USER: {value} ASSISTANT:" if role == "human" else f" {value}</s>"
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    image = tokenizer.convert_tokens_to_ids("<image>")
    expanded = [t for i in ids for t in ([image] * NUM_IMAGE_TOKENS if i == image else [i])]
    labels, answering = [], False
    tokens = tokenizer.convert_ids_to_tokens(expanded)
    for pos, (token, token_id) in enumerate(zip(tokens, expanded)):
        labels.append(token_id if answering else IGNORE_INDEX)
        if token == ":" and tokens[pos - 1] == "ASSISTANT":
            answering = True
        elif token == "</s>":
            answering = False
    return expanded, labels


@pytest.mark.parametrize("index", [0, 1, 2])
def test_vicuna_labels_cover_only_the_answers(folder, tokenizer, image_processor, index) -> None:
    samples = load_conversations(folder / "data.json", image_folder=folder)
    input_ids, labels = dataset(samples, tokenizer, image_processor).encode(samples[index])
    expected_ids, expected_labels = reference(samples[index], tokenizer)
    assert input_ids.tolist() == expected_ids
    assert labels.tolist() == expected_labels
    answers = [tokenizer.convert_ids_to_tokens(i) for i in labels.tolist() if i != IGNORE_INDEX]
    assert (
        answers
        == {
            0: ["a", "red", "square", "</s>", "a", "blue", "circle", "</s>"],
            1: ["a", "square", "</s>"],
            2: ["a", "circle", "</s>"],
        }[index]
    )


def test_plain_template_is_image_then_caption(folder, tokenizer, image_processor) -> None:
    samples = load_conversations(folder / "data.json", image_folder=folder)
    data = dataset([samples[2]], tokenizer, image_processor, template="plain")
    input_ids, labels = data.encode(samples[2])
    image = tokenizer.convert_tokens_to_ids("<image>")
    caption = tokenizer("a circle", add_special_tokens=False)["input_ids"]
    assert input_ids.tolist() == [tokenizer.bos_token_id] + [image] * NUM_IMAGE_TOKENS + caption
    assert labels.tolist() == [IGNORE_INDEX] * (1 + NUM_IMAGE_TOKENS) + caption
    with pytest.raises(ValueError, match=r"sample 0: template 'plain' .* needs an image and exactly one human"):
        dataset(samples[:1], tokenizer, image_processor, template="plain")


def test_max_length_cuts_text_but_never_the_image(folder, tokenizer, image_processor) -> None:
    samples = load_conversations(folder / "data.json", image_folder=folder)
    full, _ = dataset(samples, tokenizer, image_processor).encode(samples[0])
    cut, labels = dataset(samples, tokenizer, image_processor, max_length=len(full) - 3).encode(samples[0])
    assert cut.tolist() == full.tolist()[:-3] and labels.shape == cut.shape
    first_image = full.tolist().index(tokenizer.convert_tokens_to_ids("<image>"))
    with pytest.raises(ValueError, match=rf"sample 0: max_length={first_image + 2} cuts through its 5 image tokens"):
        dataset(samples, tokenizer, image_processor, max_length=first_image + 2).encode(samples[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"template": "chatml"}, r"template must be 'plain' or 'vicuna_v1', got 'chatml'"),
        ({"max_length": 0}, r"max_length must be an integer >= 1, got 0"),
        ({"image_aspect_ratio": "stretch"}, r"image_aspect_ratio must be 'pad', 'square' or 'anyres', got 'stretch'"),
        (
            {"image_processor": None},
            r"image_processor and num_image_tokens \(or processor\) are required: some "
            r"samples have an image",
        ),
    ],
)
def test_dataset_rejects_bad_arguments(folder, tokenizer, image_processor, kwargs, message) -> None:
    samples = load_conversations(folder / "data.json", image_folder=folder)
    with pytest.raises(ValueError, match=message):
        dataset(samples, tokenizer, **{"image_processor": image_processor, **kwargs})


# --- images and batches ----------------------------------------------------------------------------------


def test_pad_aspect_ratio_pads_to_a_square_of_the_mean_colour(folder, tokenizer, image_processor) -> None:
    samples = load_conversations(folder / "data.json", image_folder=folder)
    pixels = dataset(samples, tokenizer, image_processor).load_image(samples[0])  # a.png is 20 x 10
    image = np.asarray(Image.open(folder / "a.png").convert("RGB"))
    square = np.empty((20, 20, 3), dtype=np.uint8)
    square[:] = [int(round(255 * m)) for m in image_processor.image_mean]
    square[5:15] = image
    expected = image_processor(images=Image.fromarray(square), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, expected, atol=0, rtol=0)
    squashed = dataset(samples, tokenizer, image_processor, image_aspect_ratio="square").load_image(samples[0])
    assert pixels.shape == squashed.shape == (3, IMAGE, IMAGE) and not torch.equal(pixels, squashed)


def test_collator_pads_and_stacks_only_the_images_present(folder, tokenizer, image_processor) -> None:
    samples = load_conversations(folder / "data.json", image_folder=folder)
    data = dataset(samples, tokenizer, image_processor)
    items = [data[i] for i in range(3)]
    batch = ConversationCollator(pad_token_id=tokenizer.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["pixel_values"].shape == (2, 3, IMAGE, IMAGE)  # samples 0 and 2, in batch order
    torch.testing.assert_close(batch["pixel_values"][1], items[2]["pixel_values"], atol=0, rtol=0)
    for row, item in enumerate(items):
        n = lengths[row]
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"].tolist()
        assert set(batch["input_ids"][row, n:].tolist()) <= {tokenizer.pad_token_id}
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    text_only = ConversationCollator(pad_token_id=0)([items[1]])
    assert "pixel_values" not in text_only


def test_processor_gives_each_image_its_own_token_count_and_the_collator_pads_views(folder) -> None:
    """Anyres (LLaVA-NeXT's processor): a 20 x 10 and a 30 x 90 image get different view and token counts,
    each exactly what the processor writes for that image; the collator zero-pads the views as the
    processor pads a batch, and stacks ``image_sizes``."""
    pytest.importorskip("transformers", minversion="5", reason="LLaVA-NeXT's processor as transformers 5 has it")
    from tests.adapters._hf_llava_next import make_processor

    processor = make_processor()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 30, 3), dtype=np.uint8)).save(folder / "b.png")
    samples = load_conversations(folder / "data.json", image_folder=folder)
    data = ConversationDataset(
        samples,
        tokenizer=processor.tokenizer,
        processor=processor,
        image_token_id=processor.image_token_id,
        image_aspect_ratio="anyres",
    )
    items = [data[0], data[2]]
    for item, name in zip(items, ("a.png", "b.png")):
        image = Image.open(folder / name).convert("RGB")
        reference = processor(text="<image>", images=image, return_tensors="pt")
        count = int((item["input_ids"] == processor.image_token_id).sum())
        assert count == int((reference["input_ids"] == processor.image_token_id).sum())
        torch.testing.assert_close(item["pixel_values"], reference["pixel_values"][0], atol=0, rtol=0)
        assert item["image_sizes"].tolist() == [image.height, image.width]
    views = [int(item["pixel_values"].shape[0]) for item in items]
    assert views[0] != views[1]
    batch = ConversationCollator(pad_token_id=processor.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape == (2, max(views), 3, 28, 28)
    short = views.index(min(views))
    assert not batch["pixel_values"][short, min(views) :].any()  # zero-padded views
    assert batch["image_sizes"].tolist() == [[10, 20], [90, 30]]
