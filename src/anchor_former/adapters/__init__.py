"""Drop-in adapters for host frameworks, one module per host.

* :mod:`anchor_former.adapters.llava`: the original LLaVA code (``llava-torch``):
  :func:`~anchor_former.adapters.llava.attach_anchor_former`, ``build_vision_projector``.
* :mod:`anchor_former.adapters.transformers`: transformers' LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision and
  Qwen2/2.5/3-VL: :func:`~anchor_former.adapters.transformers.attach_anchor_former`,
  :func:`~anchor_former.adapters.transformers.kept_tokens`.

Both hosts run one attach pipeline (:mod:`anchor_former.adapters._host`) and record one settings record
(:class:`anchor_former.adapters.settings.AnchorSettings`, ``config.anchor_former``).

The submodules are imported on first attribute access, so ``import anchor_former.adapters`` pulls in
neither transformers nor llava.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["llava", "transformers"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
