"""State-dict key layouts every connector shares: LLaVA's projector keys and this package's own.

A leaf module (no connector imports), so each connector can hold the converters of the layouts it comes
from (:meth:`anchor_former.connectors.Connector.convert_checkpoint`) and :mod:`anchor_former.checkpoint` can hold
the file reading, without an import cycle between them. :mod:`anchor_former.checkpoint` re-exports the
public names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch

__all__ = [
    "CheckpointError",
    "Layout",
    "StateDict",
    "is_mlp_key",
    "llava_projector_to_mlp",
    "own_or_llava_keys",
    "strip_projector_prefix",
]

Layout = Literal["llava_mlp", "reference_acformer", "anchor_former"]
StateDict = dict[str, torch.Tensor]

_PROJECTOR_MARK = "mm_projector."
_HF_PROJECTOR = re.compile(r"^(?:.*\.)?multi_modal_projector\.linear_(\d+)\.(weight|bias)$")
_MLP_KEY = re.compile(r"^(?:\d+\.)?(weight|bias)$")  # mlpNx_gelu: {j}.weight; linear (a bare nn.Linear): weight


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the module it is loaded into."""

    __module__ = "anchor_former.checkpoint"


def is_mlp_key(key: str) -> bool:
    """Whether ``key`` is a LLaVA projector key relative to the projector (``0.weight``, ``2.bias``, ... of
    ``mlpNx_gelu``; ``weight`` / ``bias`` of ``linear``, a bare ``nn.Linear``)."""
    return _MLP_KEY.match(key) is not None


def strip_projector_prefix(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop everything up to and including ``mm_projector.`` from each key; keep only those keys if any
    key has that mark, else return the keys unchanged. transformers' ``multi_modal_projector.linear_{n}``
    keys become LLaVA's ``{2(n-1)}.*``."""
    hf = {}
    for key, value in state_dict.items():
        match = _HF_PROJECTOR.match(key)
        if match:
            hf[f"{2 * (int(match.group(1)) - 1)}.{match.group(2)}"] = value
    if hf:
        return hf
    if any(_PROJECTOR_MARK in k for k in state_dict):
        return {k.split(_PROJECTOR_MARK, 1)[1]: v for k, v in state_dict.items() if _PROJECTOR_MARK in k}
    return dict(state_dict)


def llava_projector_to_mlp(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """LLaVA ``mm_projector`` weights → the keys of an ``mlpNx_gelu`` / ``linear`` projector
    (``0.weight``, ``0.bias``, ``2.weight``, ...; ``weight``, ``bias`` for ``linear``), e.g. for
    ``AnchorFormer.projector``.

    Accepts ``model.mm_projector.{j}.*``, any other prefix ending in ``mm_projector.``, bare ``{j}.*`` keys,
    and transformers' ``multi_modal_projector.linear_{n}.*``.
    """
    stripped = strip_projector_prefix(state_dict)
    bad = sorted(k for k in stripped if not is_mlp_key(k))
    if bad:
        raise CheckpointError(
            f"not a LLaVA linear/mlpNx_gelu projector checkpoint: unexpected keys {bad[:8]} "
            "(expected only mm_projector.{j}.weight / .bias)"
        )
    if not stripped:
        raise CheckpointError("no mm_projector.* (or multi_modal_projector.*) keys in the checkpoint")
    return stripped


def own_or_llava_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, Layout]:
    """The two layouts every connector with an output projector at ``.projector`` loads.

    * LLaVA's projector (``mm_projector.{j}.*``, transformers' ``multi_modal_projector.linear_{n}.*``, bare
      ``{j}.*``) -> ``projector.{j}.*``, layout ``"llava_mlp"`` (a warm start of the projector only);
    * this package's own state dict, possibly under a prefix up to ``mm_projector.`` and then
      ``connector.`` -> its keys as they are, layout ``"anchor_former"``.
    """
    stripped = strip_projector_prefix(state_dict)
    converted = {k.removeprefix("connector."): v for k, v in stripped.items()}
    if converted and all(is_mlp_key(k) for k in converted):
        return {f"projector.{k}": v for k, v in converted.items()}, "llava_mlp"
    return converted, "anchor_former"
