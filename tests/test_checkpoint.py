"""Safe loading and the layout converters of ``anchor_former.checkpoint``."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile

import pytest
import torch
from torch import nn

from anchor_former.checkpoint import (
    REFERENCE_NUM_ANCHORS,
    CheckpointError,
    detect_layout,
    llava_projector_to_mlp,
    load_checked,
    load_connector_weights,
    load_state_dict,
    reference_acformer_to_anchor_former,
    save_state_dict,
    strip_projector_prefix,
    to_anchor_former,
)
from anchor_former.connectors import AnchorFormer

D, LLM, HEADS, DIM_HEAD, DEPTH, K = 16, 24, 2, 8, 2, 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- a plain re-implementation of the reference AcFormer projector, with its module names -------------


class RefAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        b, nq, _ = q.shape
        out = torch.zeros_like(q)
        width = q.shape[-1] // self.heads
        for h in range(self.heads):  # naive per-head loop
            sl = slice(h * width, (h + 1) * width)
            attn = ((q[..., sl] @ k[..., sl].transpose(1, 2)) * self.scale).softmax(-1)
            out[..., sl] = attn @ v[..., sl]
        return self.to_out(out)


class RefResampler(nn.Module):
    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_latents: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))  # never used, as in the reference
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    RefAttention(dim, dim_head, heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, 4 * dim, bias=False),
                        nn.GELU(),
                        nn.Linear(4 * dim, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, anchor_idx: torch.Tensor) -> torch.Tensor:
        latents = torch.stack([x[b, anchor_idx[b]] for b in range(x.shape[0])])
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


def reference_projector() -> nn.Sequential:
    proj = nn.Sequential(RefResampler(D, DEPTH, DIM_HEAD, HEADS, K), nn.Linear(D, LLM), nn.GELU(), nn.Linear(LLM, LLM))
    for p in proj.parameters():  # non-trivial LayerNorm affine too
        nn.init.normal_(p, std=0.3)
    return proj


def anchor_former() -> AnchorFormer:
    return AnchorFormer(D, LLM, num_anchors=K, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD)


def llava_checkpoint(prefix: str = "model.mm_projector.") -> dict[str, torch.Tensor]:
    mlp = nn.Sequential(nn.Linear(D, LLM), nn.GELU(), nn.Linear(LLM, LLM))
    return {prefix + k: v.half() for k, v in mlp.state_dict().items()}  # LLaVA ships fp16


# --- safe loading ----------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # runs os.system(...) when unpickled
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2), "payload": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*mm_projector.bin': would execute code"):
        load_state_dict(path)
    assert not marker.exists()


def _damaged_files(tmp_path):
    """(name, bytes) of files that are not readable checkpoints, each in both formats' extensions."""
    state = {"w": torch.randn(8, 8), "b": torch.randn(8)}
    save_state_dict(state, tmp_path / "ok.safetensors")
    torch.save(state, tmp_path / "ok.bin")
    st, pt = (tmp_path / "ok.safetensors").read_bytes(), (tmp_path / "ok.bin").read_bytes()
    rng = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist())
    return [
        ("truncated.safetensors", st[: len(st) // 2]), ("header-only.safetensors", st[:40]),
        ("empty.safetensors", b""), ("random.safetensors", noise),
        ("truncated.bin", pt[: len(pt) // 2]), ("empty.bin", b""), ("random.bin", noise),
        ("text.pt", b"not a checkpoint at all\n"), ("json.pth", b'{"w": [1, 2]}'),
        ("plain-pickle.pt", pickle.dumps({"w": [1.0, 2.0]})),
        ("zip-without-pickle.pt", _zip_bytes()),
    ]  # fmt: skip


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/other.txt", "hello")
    return buffer.getvalue()


def test_every_unreadable_file_is_a_checkpoint_error_naming_the_path(tmp_path) -> None:
    """Truncated/empty safetensors raised the library's own error without the path; broken .pt files
    raised OSError/EOFError/RuntimeError; random bytes were called a possibly malicious pickle."""
    for name, data in _damaged_files(tmp_path):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"checkpoint '.*{name}' is corrupt or not a checkpoint"):
            load_state_dict(path)
        with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
            load_connector_weights(nn.Linear(8, 8), path)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_meta_map_location_works_for_both_formats(tmp_path, suffix) -> None:
    state = {"w": torch.randn(4, 3), "b": torch.randn(4).half(), "n": torch.tensor(3)}
    path = tmp_path / f"x{suffix}"
    save_state_dict(state, path) if suffix == ".safetensors" else torch.save(state, path)
    got = load_state_dict(path, map_location="meta")
    assert {k: (v.device.type, v.shape, v.dtype) for k, v in got.items()} == {
        k: ("meta", v.shape, v.dtype) for k, v in state.items()
    }


def _quantized(x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # quantized dtypes are deprecated, but checkpoints holding them exist
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(x, 0.1, 0, torch.qint8)


def _bad_values() -> list[tuple[str, object]]:
    """Values whose shape fits a (3, 4) float32 weight but whose kind does not."""
    return [
        ("sparse", torch.randn(3, 4).to_sparse()),
        ("meta", torch.empty(3, 4, device="meta")),
        ("quantized", _quantized(torch.randn(3, 4))),
        ("complex", torch.randn(3, 4, dtype=torch.complex64)),
        ("integer", torch.ones(3, 4, dtype=torch.int64)),
        ("not a tensor", [[0.0] * 4] * 3),
    ]


@pytest.mark.parametrize(("kind", "value"), _bad_values(), ids=[k for k, _ in _bad_values()])
def test_a_value_of_the_wrong_kind_changes_nothing(kind, value) -> None:
    """load_checked passed its checks when every shape matched, then failed inside load_state_dict with
    most tensors already copied. The bad value sits last, so a half-done copy would show."""
    module = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 3))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = {k: torch.randn_like(v) for k, v in before.items()}
    state["2.weight"] = value
    with pytest.raises(CheckpointError, match=r"values of the wrong kind 2\.weight: "):
        load_checked(module, state)
    after = module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_values_are_converted_to_the_parameters_dtype_and_device() -> None:
    module = nn.Linear(4, 3)
    state = {"weight": torch.randn(3, 4, dtype=torch.float64), "bias": torch.randn(3).half()}
    load_checked(module, state)
    assert module.weight.dtype == torch.float32
    torch.testing.assert_close(module.weight, state["weight"].float(), atol=0, rtol=0)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_round_trip_bin_and_safetensors(tmp_path, suffix) -> None:
    sd = llava_checkpoint()
    path = tmp_path / f"mm_projector{suffix}"
    if suffix == ".bin":
        torch.save(sd, path)
    else:
        save_state_dict(sd, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(loaded[k], sd[k], atol=0, rtol=0)


def test_load_rejects_missing_file_and_non_flat(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="is not a file"):
        load_state_dict(tmp_path / "nope.bin")
    path = tmp_path / "nested.bin"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"flat dict of name -> tensor.*'model' \(dict\)"):
        load_state_dict(path)


# --- layouts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["model.mm_projector.", "base_model.model.model.mm_projector.", ""])
def test_llava_mlp_warm_starts_the_output_mlp(prefix) -> None:
    sd = llava_checkpoint(prefix)
    assert detect_layout(sd) == "llava_mlp"
    module = anchor_former()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    converted, layout = to_anchor_former(sd)
    assert layout == "llava_mlp" and set(converted) == {
        "projector.0.weight",
        "projector.0.bias",
        "projector.2.weight",
        "projector.2.bias",
    }
    load_checked(module, converted, partial=True)
    for k, v in module.state_dict().items():
        if k.startswith("projector."):
            torch.testing.assert_close(v, sd[prefix + k.removeprefix("projector.")].float(), atol=0, rtol=0)
        else:
            torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_hf_projector_names_map_to_llava_indices() -> None:
    lin1, lin2 = nn.Linear(D, LLM), nn.Linear(LLM, LLM)
    sd = {
        "model.multi_modal_projector.linear_1.weight": lin1.weight,
        "model.multi_modal_projector.linear_1.bias": lin1.bias,
        "model.multi_modal_projector.linear_2.weight": lin2.weight,
        "model.multi_modal_projector.linear_2.bias": lin2.bias,
        "model.language_model.embed_tokens.weight": torch.zeros(3, LLM),
    }
    mlp = llava_projector_to_mlp(sd)
    assert mlp["0.weight"] is lin1.weight and mlp["2.bias"] is lin2.bias and len(mlp) == 4


def test_reference_acformer_checkpoint_gives_the_reference_outputs(tmp_path) -> None:
    ref = reference_projector()
    path = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in ref.state_dict().items()}, path)
    sd = load_state_dict(path)
    assert "model.mm_projector.0.latents" in sd and detect_layout(sd) == "reference_acformer"

    module = anchor_former()
    converted, layout = to_anchor_former(sd)
    assert layout == "reference_acformer" and not any(k.endswith("latents") for k in converted)
    load_checked(module, converted)  # strict: every parameter is covered

    x = torch.randn(3, 1 + 16, D)
    idx = torch.stack(
        [torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(16)[:K].sort().values + 1]) for _ in range(3)]
    )
    with torch.no_grad():
        expected = ref[1:](ref[0](x, idx))
        module.fused_attn = False
        manual = module(x, idx)
        module.fused_attn = True
        fused = module(x, idx)
    torch.testing.assert_close(manual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_reference_checkpoint_warns_unless_loaded_with_the_trained_256_anchors() -> None:
    sd = {f"model.mm_projector.{k}": v for k, v in reference_projector().state_dict().items()}
    assert REFERENCE_NUM_ANCHORS == 256
    with pytest.warns(UserWarning, match=r"trains with 256 anchors .* this connector has num_anchors=5"):
        assert load_connector_weights(anchor_former(), sd) == "reference_acformer"
    trained = AnchorFormer(D, LLM, num_anchors=256, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_connector_weights(trained, sd) == "reference_acformer"
        own = {f"model.mm_projector.connector.{k}": v for k, v in anchor_former().state_dict().items()}
        assert load_connector_weights(anchor_former(), own) == "anchor_former"  # only the reference layout warns


def test_own_layout_under_a_prefix_round_trips(tmp_path) -> None:
    module = anchor_former()
    path = tmp_path / "connector.safetensors"
    save_state_dict({f"model.mm_projector.connector.{k}": v for k, v in module.state_dict().items()}, path)
    converted, layout = to_anchor_former(load_state_dict(path))
    assert layout == "anchor_former"
    other = anchor_former()
    load_checked(other, converted)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, atol=0, rtol=0)


# --- errors that name what does not fit ------------------------------------------------------------------


def test_shape_mismatch_and_missing_keys_are_named_and_nothing_changes() -> None:
    module = anchor_former()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    wrong = {k: v for k, v in to_anchor_former(llava_checkpoint())[0].items()}
    wrong["projector.0.weight"] = torch.zeros(LLM, D + 1)
    with pytest.raises(CheckpointError, match=r"projector\.0\.weight: checkpoint \(24, 17\) vs module \(24, 16\)"):
        load_checked(module, wrong, partial=True)
    with pytest.raises(CheckpointError, match=r"missing keys \['layers\.0\.attn"):
        load_checked(module, to_anchor_former(llava_checkpoint())[0])
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_reference_checkpoint_of_other_depth_names_the_keys() -> None:
    sd = {f"model.mm_projector.{k}": v for k, v in reference_projector().state_dict().items()}
    module = AnchorFormer(D, LLM, num_anchors=K, depth=1, heads=HEADS, dim_head=DIM_HEAD)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['layers\.1\."):
        load_checked(module, to_anchor_former(sd)[0])


def test_unknown_layout_and_unexpected_reference_keys() -> None:
    with pytest.raises(CheckpointError, match="unrecognised projector checkpoint layout.*got keys such as: foo.weight"):
        detect_layout({"foo.weight": torch.zeros(1)})
    with pytest.raises(
        CheckpointError, match=r"unexpected keys in a reference AcFormer checkpoint: \['0\.layers\.0\.0\.bogus'\]"
    ):
        reference_acformer_to_anchor_former({"0.layers.0.0.bogus": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a LLaVA linear/mlpNx_gelu projector checkpoint"):
        llava_projector_to_mlp({"mm_projector.0.layers.0.0.to_q.weight": torch.zeros(1)})
    assert strip_projector_prefix({"a.b": torch.zeros(1)}).keys() == {"a.b"}
