"""Helpers shared by the probe tests (a plain module: conftest names can clash across test folders)."""

from __future__ import annotations

import copy

from torch import nn


def eager_copy(model: nn.Module) -> nn.Module:
    """A copy of an HF model that runs eager attention (the only path that returns attention maps)."""
    ref = copy.deepcopy(model)
    if hasattr(ref, "set_attn_implementation"):  # transformers 5.x; 4.37 CLIP/DINOv2/SigLIP are eager-only
        ref.set_attn_implementation("eager")
    return ref


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def reference_block(layer: int, num_layers: int) -> int:
    """The block whose output is hidden_states[layer] (hidden_states has num_layers + 1 entries)."""
    return layer - 1 if layer > 0 else num_layers + layer
