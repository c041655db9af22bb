"""Every bad argument and every bad sample stops ``anchor_former.train`` BEFORE a weight is read.

Each run points at a folder that holds a real ``config.json`` and processor but NO weight file: reaching
``from_pretrained`` there raises ``OSError`` (checked below), so a ``ValueError`` with the expected
message proves the check ran before any weight load, without mocks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("anchor_former.train uses the transformers adapter (transformers >= 5)", allow_module_level=True)
pytest.importorskip("accelerate")

from PIL import Image  # noqa: E402

from anchor_former.preflight import FAMILIES, read_checkpoint  # noqa: E402
from anchor_former.train import check_run, parse_args, train  # noqa: E402
from tests._train_helpers import run_args, save_config_only, save_data  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    for family in ("llava", "llava_next", "onevision"):
        save_config_only(root, family)
    transformers.Qwen2VLConfig().save_pretrained(root / "qwen2_vl")
    transformers.LlamaConfig().save_pretrained(root / "llama")
    save_data(root, sizes=((28, 28), (30, 40)))
    return root


def run(root, *extra: str, family: str = "llava", data=None, model=None):
    model = model or root / f"config_only_{family}"
    return train(*parse_args(run_args(model, data or root / "data.json", root / "out", "--max_steps", "1", *extra)))


def test_the_config_only_folder_fails_at_the_weight_load(root) -> None:
    """The premise of this file: valid arguments and data get as far as from_pretrained, which fails."""
    with pytest.raises(OSError, match=r"model\.safetensors|pytorch_model\.bin|no file named"):
        run(root)


@pytest.mark.parametrize(
    ("family", "name"), [("llava", "LLaVA-1.5"), ("llava_next", "LLaVA-NeXT"), ("onevision", "LLaVA-OneVision")]
)
def test_the_family_comes_from_config_json(root, family, name) -> None:
    info = read_checkpoint(root / f"config_only_{family}")
    assert info.family.name == name and not info.attached and info.patches == 49
    assert info.has_cls is (family != "onevision")
    assert [f.name for f in FAMILIES] == ["LLaVA-1.5", "LLaVA-NeXT", "LLaVA-OneVision"]


@pytest.mark.parametrize(
    ("extra", "family", "message"),
    [
        (["--connector", "nope"], "llava", r"--connector must be one of .*acformer.*, got 'nope'"),
        (
            ["--connector_config", '{"depth": 1, "depth": 2}'],
            "llava",
            r"--connector_config gives key 'depth' twice "
            r"\(1 and 2\)",
        ),
        (["--connector_config", '{"num_anchors": 4}'], "llava", r"key 'num_anchors' is set by --num_anchors"),
        (["--connector_config", '{"score": "norm"}'], "llava", r"key 'score' is set by --score"),
        (
            ["--connector_config", '{"detph": 2}'],
            "llava",
            r"key 'detph' is not an argument of connector 'acformer' "
            r"\(AnchorFormer\); its arguments: .*depth",
        ),
        (
            ["--connector_config", '{"depth": "2"}'],
            "llava",
            r"key 'depth' of connector 'acformer' must be int, got "
            r"'2' \(str\)",
        ),
        (["--connector_config", '{"fused_attn": 1}'], "llava", r"key 'fused_attn' .* must be bool, got 1 \(int\)"),
        (
            ["--connector_config", "{depth: 2}"],
            "llava",
            r"--connector_config must be a JSON object, got '\{depth: 2\}'",
        ),
        (["--connector_config", "[1, 2]"], "llava", r"--connector_config must be a JSON object, got '\[1, 2\]'"),
        (["--connector_config", '{"depth": 0}'], "llava", r"does not fit this checkpoint .*depth must be an integer"),
        (
            ["--num_anchors", "50"],
            "llava",
            r"--num_anchors must be at most the patches of one view: one view of .* "
            r"has 7x7 = 49 patches \(vision_config image_size 28 / patch_size 4\); got 50",
        ),
        (["--num_anchors", "50"], "llava_next", r"--num_anchors must be at most the patches of one view"),
        (
            ["--connector", "select", "--num_anchors", "40", "--connector_config", '{"num_context": 10}'],
            "llava",
            r"--num_anchors \+ num_context must be at most the patches of one view.*got 50",
        ),
        (
            ["--connector", "select", "--connector_config", '{"num_context": 4}'],
            "llava_next",
            r"num_context is not supported with LLaVA-NeXT views",
        ),
        (
            ["--score", "cls"],
            "onevision",
            r"--score 'cls' needs a vision tower with a \[CLS\] token; "
            r"LLaVA-OneVision's siglip_vision_model has none",
        ),
        (
            ["--image_aspect_ratio", "anyres"],
            "llava",
            r"--image_aspect_ratio must be one of pad, square for LLaVA-1.5, "
            r"got 'anyres'",
        ),
        (["--image_aspect_ratio", "square"], "llava_next", r"must be one of anyres, pad for LLaVA-NeXT"),
        (["--stage", "1", "--lora_r", "8"], "llava", r"--lora_r applies to stage 2"),
    ],
)
def test_bad_arguments_raise_before_the_weights_load(root, extra, family, message) -> None:
    with pytest.raises(ValueError, match=message):
        run(root, *extra, family=family)


def test_fsdp_on_cpu_is_refused_before_the_weights_load(root) -> None:
    """accelerate drops the FSDP plugin on CPU without a word (tests/test_distributed.py pins that); the run
    would be plain DDP. A single CPU process is refused by transformers itself, so the check runs in check_run."""
    model_args, data_args, training_args = parse_args(
        run_args(root / "config_only_llava", root / "data.json", root / "out")
    )
    training_args.fsdp = True  # as TrainingArguments sets it for --fsdp full_shard under torchrun
    with pytest.raises(
        ValueError,
        match=r"--fsdp needs CUDA devices, got a CPU run .* drops the FSDP / DeepSpeed "
        r"plugin without a word",
    ):
        check_run(model_args, data_args, training_args)


def test_qwen_vl_and_other_checkpoints_are_refused_by_name(root) -> None:
    with pytest.raises(
        ValueError,
        match=r"is a Qwen2-VL checkpoint \(model_type 'qwen2_vl'\); Qwen2-VL is "
        r"training-free .* trains connectors for: LLaVA-1.5 \('llava'\), LLaVA-NeXT "
        r"\('llava_next'\), LLaVA-OneVision \('llava_onevision'\)",
    ):
        run(root, model=root / "qwen2_vl")
    with pytest.raises(ValueError, match=r"must be a checkpoint of one of .* got model_type 'llama'"):
        run(root, model=root / "llama")
    with pytest.raises(ValueError, match=r"--model_name_or_path .*nowhere.* must hold a config\.json"):
        run(root, model=root / "nowhere")


# --- data -------------------------------------------------------------------------------------------------------


def turns(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"image": "0.png", "conversations": turns("what ?", "a <image> cat")},
            r"sample 1 of .*bad\.json: conversations\[1\]\.value \(a 'gpt' answer\) holds <image>",
        ),
        (
            {"image": "0.png", "conversations": turns("<image> <image> what ?", "cat")},
            r"sample 1 of .*bad\.json: has 2 <image> placeholders in its human turns for 1 image",
        ),
        (
            {"image": ["0.png", "1.png"], "conversations": turns("<image> <image> what ?", "cat")},
            r"sample 1 of .*bad\.json: 'image' lists 2 files; one image per sample is supported",
        ),
        (
            {"conversations": turns("<image> what ?", "cat")},
            r"sample 1 of .*bad\.json: has 1 <image> .* but no 'image'",
        ),
        (
            {"image": "gone.png", "conversations": turns("<image> what ?", "cat")},
            r"sample 1 of .*bad\.json: image file .*gone\.png does not exist",
        ),
        (
            {"image": "broken.png", "conversations": turns("<image> what ?", "cat")},
            r"sample 1 of .*bad\.json: image file .*broken\.png \('image' field\) does not decode",
        ),
        (
            {"image": "truncated.png", "conversations": turns("<image> what ?", "cat")},
            r"sample 1 of .*bad\.json: image file .*truncated\.png \('image' field\) does not decode",
        ),
    ],
)
def test_bad_samples_raise_before_the_weights_load(root, entry, message) -> None:
    (root / "images" / "broken.png").write_bytes(b"not a png at all")
    whole = (root / "images" / "0.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(whole[: len(whole) // 2])  # a valid header, half the pixels
    good = json.loads((root / "data.json").read_text())[0]
    (root / "bad.json").write_text(json.dumps([good, entry]))
    with pytest.raises(ValueError, match=message):
        run(root, data=root / "bad.json")


def test_non_utf8_json_is_named(root) -> None:
    text = json.dumps(
        [{"image": "0.png", "conversations": turns("<image> qu'est-ce ?", "caf\u00e9")}], ensure_ascii=False
    )
    (root / "latin1.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"data_path '.*latin1\.json' must be UTF-8 encoded JSON: byte \d+ is not UTF-8"
    ):
        run(root, data=root / "latin1.json")


def test_image_check_exists_skips_decoding(root) -> None:
    """--check_images exists: only existence is checked up front (a broken file is then found when used)."""
    from anchor_former.data import load_conversations

    (root / "images" / "broken.png").write_bytes(b"not a png at all")
    (root / "one.json").write_text(json.dumps([{"image": "broken.png", "conversations": turns("<image> q", "a")}]))
    samples = load_conversations(root / "one.json", image_folder=root / "images", check_images="exists")
    assert samples[0].image.endswith("broken.png")
    with pytest.raises(ValueError, match=r"check_images must be 'decode' or 'exists', got 'all'"):
        load_conversations(root / "one.json", image_folder=root / "images", check_images="all")
    assert np.asarray(Image.open(root / "images" / "0.png")).shape == (28, 28, 3)


@pytest.fixture(scope="module")
def attached(root):
    """The config.json and processor of a folder this module wrote (attached, K = 8), no weight file."""
    from anchor_former.adapters.transformers import attach_anchor_former
    from tests.adapters import _hf_llava

    processor = _hf_llava.make_processor()
    model = attach_anchor_former(
        _hf_llava.make_model(processor), processor, num_anchors=8, depth=1, heads=2, dim_head=8
    )
    model.config.save_pretrained(root / "attached")
    processor.save_pretrained(root / "attached")
    return root / "attached"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--num_anchors", "16"],
            r"--num_anchors must match what .*attached.* records \(config.json anchor_former: "
            r"8\), got 16",
        ),
        (["--connector", "perceiver"], r"--connector must match what .* records .*'acformer'\), got 'perceiver'"),
        (["--connector_config", '{"depth": 3}'], r"--connector_config key 'depth' must match .*: 1\), got 3"),
        (["--connector_config", '{"wings": 3}'], r"--connector_config key 'wings' must match .*: nothing\), got 3"),
    ],
)
def test_flags_that_a_written_folder_would_ignore_are_refused(root, attached, extra, message) -> None:
    argv = run_args(attached, root / "data.json", root / "out", "--max_steps", "1")
    for flag in ("--num_anchors", "--connector_config"):  # run_args passes both: start from none
        i = argv.index(flag)
        del argv[i : i + 2]
    with pytest.raises(ValueError, match=message):
        train(*parse_args([*argv, *extra]))
    plan = check_run(*parse_args([*argv, "--num_anchors", "8", "--connector_config", '{"depth": 1}'])[:2])
    assert plan.checkpoint.attached and plan.attach == {}  # repeating the recorded values is fine


def test_torchrun_on_cpu_without_use_cpu_is_refused_before_the_weights_load(root) -> None:
    """Without CUDA and without --use_cpu, the Trainer sees world_size 1 in every torchrun process: each would
    train alone on the whole dataset (found by running the documented command on CPU). Refused, named."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    argv = run_args(root / "config_only_llava", root / "data.json", root / "out", "--max_steps", "1")
    argv.remove("--use_cpu")
    repo = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([os.path.join(repo, "src"), repo, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "anchor_former.train",
            *argv,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode != 0
    assert (
        "ValueError: torchrun started 2 processes (WORLD_SIZE=2) but the Trainer sees world_size=1: without "
        "CUDA pass --use_cpu" in result.stderr + result.stdout
    )
    assert "OSError" not in result.stderr  # the config-only folder was never loaded
