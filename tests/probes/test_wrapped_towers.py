"""Towers whose projections are wrapped or moved by real libraries: bitsandbytes 8-bit, PEFT LoRA, accelerate
offloading. The probe reads the projections' outputs, so its score equals the same model's own eager attention
(and each test shows the tolerance rejects what the tower would give without the wrapper)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from _probe_helpers import assert_close_and_bites, column_mean, eager_copy, randomize
from transformers import CLIPVisionConfig, CLIPVisionModel

from anchor_former import anchor_search
from anchor_former.probes import AttentionProbe

LAYERS, HEADS, TOKENS = 3, 4, 17


def tiny_clip() -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=32,
        patch_size=8,
    )
    return randomize(CLIPVisionModel(config).eval())  # SDPA where transformers has it (5.x), else eager


def probed(model: torch.nn.Module, pixels: torch.Tensor, score: str, *, grad: bool = False) -> AttentionProbe:
    with contextlib.nullcontext() if grad else torch.no_grad(), AttentionProbe(model, layer=-2, score=score) as probe:
        model(pixel_values=pixels)
    return probe


def eager_score(model: torch.nn.Module, pixels: torch.Tensor, score: str) -> torch.Tensor:
    """Layer -2's score from the model's own eager ``output_attentions`` (the model must run eager)."""
    with torch.no_grad():
        attn = model(pixel_values=pixels, output_attentions=True).attentions[-2]  # (B, H, N, N)
    return attn[:, :, 0].float() if score == "cls" else column_mean(attn)


def uniform() -> torch.Tensor:
    return torch.full((2, HEADS, TOKENS), 1.0 / TOKENS)


@pytest.mark.parametrize("score", ["cls", "received"])
def test_bitsandbytes_8bit_tower_equals_its_own_eager_attention(score: str, tmp_path) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig

    base = tiny_clip()
    base.save_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    try:
        model = CLIPVisionModel.from_pretrained(
            tmp_path,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map="cpu",
            attn_implementation="sdpa",
        ).eval()
        model(pixel_values=pixels)
    except (ImportError, RuntimeError, ValueError, NotImplementedError) as err:
        pytest.skip(f"bitsandbytes cannot load or run an 8-bit model on this machine: {err}")
    attn = next(m for m in model.modules() if type(m).__name__ == "CLIPAttention")
    assert isinstance(attn.q_proj, bnb.nn.Linear8bitLt) and attn.q_proj.weight.dtype == torch.int8
    got = probed(model, pixels, score).attention
    model.set_attn_implementation("eager")  # the same quantized weights, now returning their attention maps
    expected = eager_score(model, pixels, score)
    unquantized = eager_score(eager_copy(base), pixels, score)  # float weights: what the tower is not
    assert_close_and_bites(got, expected, {"float weights": unquantized, "uniform": uniform()}, atol=1e-5)
    assert torch.equal(anchor_search(got, 6, num_prefix_tokens=1), anchor_search(expected, 6, num_prefix_tokens=1))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("score", ["cls", "received"])
def test_lora_on_q_and_k_is_seen(score: str, grad: bool) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed")
    base = tiny_clip()
    pixels = torch.randn(2, 3, 32, 32)
    without = probed(base, pixels, score).attention
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # B != 0
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    tower = wrapped.base_model.model
    attn = next(m for m in tower.modules() if type(m).__name__ == "CLIPAttention")
    assert isinstance(attn.q_proj, peft.tuners.lora.Linear) and isinstance(attn.k_proj, peft.tuners.lora.Linear)
    probe = probed(tower, pixels, score, grad=grad)
    assert probe.features.requires_grad == grad and not probe.attention.requires_grad
    expected = eager_score(eager_copy(tower), pixels, score)
    assert_close_and_bites(probe.attention, expected, {"base without LoRA": without, "uniform": uniform()})
    merged = probed(wrapped.merge_and_unload(), pixels, score).attention  # the same model with LoRA folded in
    torch.testing.assert_close(merged, probe.attention, atol=1e-5, rtol=0)


def _offload(model: CLIPVisionModel, how: str, folder) -> None:
    import accelerate

    cpu = torch.device("cpu")
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=cpu)
    elif how == "disk_offload":
        accelerate.disk_offload(model, str(folder), execution_device=cpu)
    else:  # dispatch_model: the transformer layers on disk, the rest in memory (what device_map="auto" does)
        device_map = {
            name: "disk" if name.endswith("encoder") else "cpu"
            for name, _ in model.named_modules()
            if name.endswith("encoder")
            or name
            in {
                "embeddings",
                "pre_layrnorm",
                "post_layernorm",
                "vision_model.embeddings",
                "vision_model.pre_layrnorm",
                "vision_model.post_layernorm",
            }
        }
        accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(folder), main_device="cpu")


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "dispatch_model"])
@pytest.mark.parametrize("score", ["cls", "received"])
def test_offloaded_tower_equals_eager(score: str, how: str, grad: bool, tmp_path) -> None:
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    model = tiny_clip()
    pixels = torch.randn(2, 3, 32, 32)
    expected = eager_score(eager_copy(model), pixels, score)
    with torch.no_grad():
        plain = model(pixel_values=pixels).last_hidden_state
    _offload(model, how, tmp_path)
    attn = next(m for m in model.modules() if type(m).__name__ == "CLIPAttention")
    assert attn.q_proj.weight.device.type == "meta"  # outside its forward the weight is not there to read
    probe = probed(model, pixels, score, grad=grad)
    assert_close_and_bites(probe.attention, expected, {"uniform": uniform()})
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, plain, atol=1e-6, rtol=0)
    assert probe.features.requires_grad == grad


def test_offloaded_open_clip_attention_is_refused_by_name() -> None:
    """open_clip's nn.MultiheadAttention has no projection module: offloaded, the probe refuses it up front."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")
    oc_transformer = pytest.importorskip("open_clip.transformer", reason="open_clip is not installed")
    model = oc_transformer.VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=3, heads=HEADS, mlp_ratio=2.0, output_dim=16
    ).eval()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    for score in ("cls", "received"):
        with pytest.raises(ValueError, match=r"in_proj_weight: Parameter, torch.float32 on meta.*score='norm'"):
            AttentionProbe(model, score=score)
    AttentionProbe(model, score="norm")  # reads no attention
