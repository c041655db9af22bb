"""docs/api.md lists every public name: each name in the ``__all__`` of a public module appears there.

A name added to ``__all__`` without a line in docs/api.md fails here, so the page cannot drift from the code
(the reverse, a documented name that no longer exists, fails where the page's examples run:
tests/test_docs.py). Modules whose host library is missing are skipped.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()

# the public modules: the top level, the building blocks, each host's family modules, serving, evaluation
PUBLIC = [
    "anchor_former",
    "anchor_former.search",
    "anchor_former.probes",
    "anchor_former.probes.registry",
    "anchor_former.connectors",
    "anchor_former.views",
    "anchor_former.flops",
    "anchor_former.checkpoint",
    "anchor_former.viz",
    "anchor_former.adapters.settings",
    "anchor_former.adapters.transformers",
    "anchor_former.adapters.hf.llava_next",
    "anchor_former.adapters.hf.llava_onevision",
    "anchor_former.adapters.hf.qwen_vl",
    "anchor_former.adapters.llava",
    "anchor_former.vllm",
    "anchor_former.eval",
    "anchor_former.train",
    "anchor_former.data",
    "anchor_former.preflight",
]


def documented(name: str, page: str = API) -> bool:
    """``name`` appears in ``page`` as code: `` `name` ``, `` `module.name(...)` ``, a name in a list of them."""
    return re.search(r"`(?:[\w.]+\.)?" + re.escape(name) + r"(?![\w])", page) is not None


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_name_is_in_the_api_page(module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as err:  # a host library (transformers 5, llava-torch) is missing here
        pytest.skip(f"{module}: {err}")
    missing = [name for name in mod.__all__ if not documented(name)]
    assert not missing, f"{module}.__all__ names missing from docs/api.md: {missing}"


def test_the_check_bites() -> None:
    """A page without a name fails the check; a prefix of a longer name does not count as the name."""
    assert documented("kept_tokens", "| `kept_tokens(model, **inputs)` |")
    assert documented("AnchorSettings", "| `adapters.settings.AnchorSettings` |")
    assert not documented("kept_tokens", "| `kept_tokens_of(model)` |")
    assert not documented("kept_tokens", "kept_tokens without backticks")
