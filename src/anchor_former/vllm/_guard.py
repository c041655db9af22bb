"""The count guard: an image's embeddings must be exactly as many as its placeholder tokens.

vLLM does not check this: the runner copies ``encoder_output[start:end]`` into the placeholder
positions, so extra embeddings are silently dropped. The processor passes the number of placeholders it
wrote for each image to the model (a per-image field), and the model calls :func:`check_counts` before
returning its embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CountMismatchError", "check_counts"]


class CountMismatchError(ValueError):
    """An image's embeddings differ from the placeholder tokens the processor wrote for it."""


def check_counts(embeddings: Sequence[torch.Tensor], placeholders: Sequence[int], *, modality: str = "image") -> None:
    """Raise unless ``embeddings[i]`` has ``placeholders[i]`` rows for every item (never truncates).

    Args:
        embeddings: one ``(T_i, D)`` tensor per item.
        placeholders: the placeholder tokens of each item, as the processor wrote them.
        modality: names the items in the message.

    Raises:
        CountMismatchError: a different number of items, or of rows for some item (the message names the
            item, the expected count and the actual count).
    """
    if len(embeddings) != len(placeholders):
        raise CountMismatchError(
            f"the model produced embeddings for {len(embeddings)} {modality}s, but the prompt has placeholders for "
            f"{len(placeholders)}"
        )
    for index, (tokens, expected) in enumerate(zip(embeddings, placeholders)):
        if tokens.ndim != 2 or tokens.shape[0] != int(expected):
            raise CountMismatchError(
                f"{modality} {index}: the prompt has {int(expected)} placeholder tokens, but the model produced "
                f"embeddings of shape {tuple(tokens.shape)} ({tokens.shape[0] if tokens.ndim else 0} tokens); "
                "vLLM would silently keep the first tokens, so the plugin refuses"
            )
