"""docs/api.md and the code's public API agree.

The public API is every name in the ``__all__`` of a public module: a module under ``src/anchor_former``
whose dotted path has no component starting with ``_`` (``scripts/public_api.py`` lists them; the modules are
read from disk, not imported, so every host's modules are checked whether or not its library is installed).

* every public module defines ``__all__``;
* every public name appears in docs/api.md as code (`` `name` ``, `` `module.name(...)` ``);
* every ``module.name`` written on the page, where ``module`` is a public module (``views``, ``adapters.llava``,
  ``anchor_former.checkpoint``, ...), names something in that module's ``__all__`` or a public submodule, so a
  renamed, removed or internal name cannot stay documented.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def _load_tool():
    spec = importlib.util.spec_from_file_location("public_api", ROOT / "scripts" / "public_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("public_api", module)
    spec.loader.exec_module(module)
    return module


public_api = _load_tool()
SURFACE: dict[str, list[str]] = public_api.public_api()


# dotted names on the page that belong to other libraries although they start like one of ours
NOT_OURS = {"vllm.general_plugins"}  # vLLM's plugin entry-point group


def documented(name: str, page: str = API) -> bool:
    """``name`` appears in ``page`` as code: `` `name` ``, `` `module.name(...)` ``, a name in a list of them."""
    return re.search(r"`(?:[\w.]+\.)?" + re.escape(name) + r"(?![\w])", page) is not None


def dotted_references(page: str) -> list[str]:
    """The dotted names at the start of each code span: `` `views.view_budgets(a, b)` `` → ``views.view_budgets``."""
    return re.findall(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)", page)


def stale_references(page: str, surface: dict[str, list[str]]) -> list[str]:
    """Each ``module.name`` of ``page`` whose ``module`` is public (written with or without the leading
    ``anchor_former.``) and whose ``name`` is neither in its ``__all__`` nor a public submodule of it. A name after a class
    (``AnchorSettings.to_dict``) is an attribute, and a ``_``-prefixed one is named as internal: neither is
    checked."""
    short = {module.removeprefix("anchor_former."): module for module in surface if module != "anchor_former"}
    stale = []
    for ref in dotted_references(page):
        parts = ref.removeprefix("anchor_former.").split(".")
        if ref.startswith("anchor_former.") and len(parts) == 1:  # anchor_former.<top-level name>
            module, rest = "anchor_former", parts
        else:
            # the longest public module the reference starts with
            cut = next((i for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in short), 0)
            if cut == 0 or cut == len(parts):
                continue  # not a module reference, or the module itself
            module, rest = short[".".join(parts[:cut])], parts[cut:]
        name = rest[0]
        if name.startswith("_") or ref in NOT_OURS:
            continue  # named as internal on purpose, or another library's name
        if name not in surface[module] and f"{module}.{name}" not in surface:
            stale.append(ref)
    return stale


def test_the_tool_sees_the_package() -> None:
    assert "anchor_former" in SURFACE and "anchor_former.connectors" in SURFACE
    assert "attach_anchor_former" in SURFACE["anchor_former"]
    assert not any(part.startswith("_") for module in SURFACE for part in module.split("."))


@pytest.mark.parametrize("module", sorted(SURFACE))
def test_every_public_module_has_all(module: str) -> None:
    path = dict(public_api.public_modules())[module]
    assert public_api.has_all(path), f"{module} ({path}) is public but defines no __all__"


@pytest.mark.parametrize("module", sorted(SURFACE))
def test_every_public_name_is_in_the_api_page(module: str) -> None:
    missing = [name for name in SURFACE[module] if not documented(name)]
    assert not missing, f"{module}.__all__ names missing from docs/api.md: {missing}"


def test_every_documented_module_name_is_public() -> None:
    stale = stale_references(API, SURFACE)
    assert not stale, f"docs/api.md names what no public module's __all__ holds: {stale}"


def test_the_checks_bite() -> None:
    """A page without a name fails; a prefix of a longer name does not count; a documented name that is not
    in its module's ``__all__`` (or a module that is internal) is reported."""
    assert documented("kept_tokens", "| `kept_tokens(model, **inputs)` |")
    assert documented("AnchorSettings", "| `adapters.settings.AnchorSettings` |")
    assert not documented("kept_tokens", "| `kept_tokens_of(model)` |")
    assert not documented("kept_tokens", "kept_tokens without backticks")
    surface = {"anchor_former": ["anchor_search"], "anchor_former.views": ["view_budgets"]}
    page = (
        "`views.view_budgets(c)`, `anchor_former.views.arrange_fixed`, `anchor_former.cls_scores`, `AnyresViews.grid`"
    )
    assert stale_references(page, surface) == ["anchor_former.views.arrange_fixed", "anchor_former.cls_scores"]
