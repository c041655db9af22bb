"""Imports of optional dependencies that fail with the extra to install, not the module that was missing.

``require("safetensors.torch", extra="hf", feature="reading .safetensors checkpoints")`` returns the module,
or raises ``ImportError: reading .safetensors checkpoints needs safetensors, which is not installed:
pip install "anchor-former[hf]"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (dotted), or raise an ``ImportError`` naming ``feature`` and the ``extra`` to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = (err.name or module).split(".")[0]  # the distribution to install, not a submodule
        raise ImportError(
            f'{feature} needs {missing}, which is not installed: pip install "anchor-former[{extra}]"',
            name=missing,
        ) from err
