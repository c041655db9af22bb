"""Input checks shared by the public entry points.

Every check raises :class:`ValueError` whose message names the argument, what was expected and what
arrived (shape, dtype or value), and never modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "shape_str",
    "check_ndim",
    "check_floating",
    "check_integer",
    "check_finite",
    "check_positive_int",
    "check_nonnegative_int",
]


def shape_str(x: torch.Tensor | Sequence[int]) -> str:
    """Format a tensor's shape (or a shape) as a Python tuple: ``(2, 16, 577)``, ``(3,)``, ``()``."""
    dims = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)
    return str(tuple(int(d) for d in dims))


def check_ndim(name: str, x: torch.Tensor, allowed: Sequence[int], expected: str) -> None:
    """Raise unless ``x`` is a tensor whose rank is one of ``allowed``; ``expected`` names the layouts."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.ndim not in allowed:
        raise ValueError(f"{name} must have shape {expected}, got shape {shape_str(x)} ({x.ndim} dims)")


def check_floating(name: str, x: torch.Tensor) -> None:
    """Raise unless ``x`` has a floating-point dtype."""
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype} with shape {shape_str(x)}")


def check_integer(name: str, x: torch.Tensor) -> None:
    """Raise unless ``x`` has an integer dtype (bool excluded)."""
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype} with shape {shape_str(x)}")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN or +-inf.

    On an accelerator this reads one boolean back to the host (a synchronisation). It is skipped while
    ``torch.compile`` traces, where a data-dependent branch would break the graph, and for meta tensors,
    which have no values. Floating dtypes without ``isfinite`` kernels (float8) are upcast exactly first.
    """
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return
    if x.is_floating_point() and x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = x.float()
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        # One reduction instead of an elementwise pass plus a reduction (5x faster on CPU): a float64 sum
        # of these cannot overflow, so it is finite exactly when every element is.
        ok = torch.isfinite(x.sum(dtype=torch.float64))
    else:
        ok = torch.isfinite(x).all()
    if not bool(ok):
        nan = int(torch.isnan(x).sum())
        inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name} must be finite, got {nan} NaN and {inf} inf values in a tensor of shape {shape_str(x)}"
        )


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int, raising unless it is an integer >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    """Return ``value`` as an int, raising unless it is an integer >= 0 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value
