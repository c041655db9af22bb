"""LLaVA's vision projectors, with LLaVA's exact module layout so its weights load by key.

LLaVA (``llava/model/multimodal_projector/builder.py``) builds, from ``mm_projector_type``:

* ``"linear"``: ``nn.Linear(in_dim, out_dim)``; keys ``weight``, ``bias``.
* ``"mlp{N}x_gelu"``: ``nn.Sequential(Linear(in_dim, out_dim), GELU, Linear(out_dim, out_dim), GELU, ...)``
  with N linear layers; keys ``0.*``, ``2.*``, ..., ``{2N-2}.*``. LLaVA-1.5 uses ``mlp2x_gelu``, whose
  checkpoint keys are ``model.mm_projector.0.*`` and ``model.mm_projector.2.*``.
* ``"identity"``: no parameters; needs ``in_dim == out_dim``.

So ``projector.load_state_dict({k.removeprefix("model.mm_projector."): v ...})`` warm-starts from LLaVA.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

__all__ = ["available_projectors", "build_projector", "projector_flops"]

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def available_projectors() -> tuple[str, ...]:
    """The projector names :func:`build_projector` accepts (``mlp{N}x_gelu`` for any N >= 1)."""
    return ("identity", "linear", "mlp{N}x_gelu")


def _mlp_depth(name: str) -> int | None:
    match = _MLP.match(name) if isinstance(name, str) else None
    return None if match is None else int(match.group(1))


def _check_name(name: str, in_dim: int, out_dim: int) -> None:
    depth = _mlp_depth(name)
    if name not in ("identity", "linear") and (depth is None or depth < 1):
        raise ValueError(
            f"projector must be one of {', '.join(available_projectors())} (N >= 1, e.g. 'mlp2x_gelu'), got {name!r}"
        )
    if name == "identity" and in_dim != out_dim:
        raise ValueError(f"projector='identity' needs in_dim == out_dim, got in_dim={in_dim}, out_dim={out_dim}")


def build_projector(
    name: str,
    in_dim: int,
    out_dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build LLaVA's projector ``name`` mapping width ``in_dim`` to ``out_dim``.

    Args:
        name: ``"linear"``, ``"mlp{N}x_gelu"`` (``"mlp2x_gelu"`` = LLaVA-1.5) or ``"identity"``.
        in_dim: input width D (LLaVA's ``mm_hidden_size``).
        out_dim: output width (LLaVA's ``hidden_size``, the LLM width).
        device, dtype: where and how the parameters are created.

    Returns:
        A module mapping ``(..., D)`` to ``(..., out_dim)`` with LLaVA's state-dict keys.
    """
    _check_name(name, in_dim, out_dim)
    dd: dict[str, Any] = {"device": device, "dtype": dtype}
    if name == "identity":
        return nn.Identity()
    if name == "linear":
        return nn.Linear(in_dim, out_dim, **dd)
    modules: list[nn.Module] = [nn.Linear(in_dim, out_dim, **dd)]
    for _ in range(1, _mlp_depth(name) or 1):
        modules += [nn.GELU(), nn.Linear(out_dim, out_dim, **dd)]
    return nn.Sequential(*modules)


def projector_flops(name: str, in_dim: int, out_dim: int, num_tokens: int) -> int:
    """Forward FLOPs of :func:`build_projector` ``(name, in_dim, out_dim)`` on ``num_tokens`` tokens.

    2 FLOPs per multiply-add of the matrix products; bias adds and GELU are not counted (the convention
    of :class:`torch.utils.flop_counter.FlopCounterMode`).
    """
    _check_name(name, in_dim, out_dim)
    if name == "identity":
        return 0
    depth = 1 if name == "linear" else (_mlp_depth(name) or 1)
    return 2 * num_tokens * (in_dim * out_dim + (depth - 1) * out_dim * out_dim)
