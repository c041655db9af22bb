"""List the package's public surface: every public module and the names in its ``__all__``.

A module is public when no component of its dotted path starts with ``_`` (``anchor_former._optional`` and
``anchor_former.adapters.hf._base`` are internal; their ``__all__`` lists are house style, not API). The
modules are found on disk and read without importing them, so a module whose host library (transformers,
llava-torch, vLLM, lmms-eval) is missing is listed all the same.

    python scripts/public_api.py            # module: names, one module a line, then the totals
    python scripts/public_api.py --count    # the totals only
    python scripts/public_api.py --json     # {module: [names]}

``tests/test_api_docs.py`` uses :func:`public_api` to check docs/api.md against the code.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

__all__ = ["PACKAGE_ROOT", "has_all", "is_public", "module_name", "public_api", "public_modules", "read_all"]

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "anchor_former"


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    """``src/anchor_former/probes/__init__.py`` → ``anchor_former.probes``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_public(module: str) -> bool:
    """No component of the dotted path starts with an underscore."""
    return not any(part.startswith("_") for part in module.split("."))


def _all_node(path: Path) -> ast.expr | None:
    """The value assigned to the module's top-level ``__all__``, or None."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            return node.value
    return None


def has_all(path: Path) -> bool:
    """Whether the module assigns ``__all__`` at its top level."""
    return _all_node(path) is not None


def read_all(path: Path) -> list[str]:
    """The names of the module's ``__all__`` (a literal list or tuple of strings); ``[]`` when it has none."""
    node = _all_node(path)
    return [] if node is None else [str(name) for name in ast.literal_eval(node)]


def public_modules(root: Path = PACKAGE_ROOT) -> list[tuple[str, Path]]:
    """``(dotted name, file)`` of every public module under ``root``, sorted by name."""
    found = [(module_name(path, root), path) for path in root.rglob("*.py")]
    return sorted((name, path) for name, path in found if is_public(name))


def public_api(root: Path = PACKAGE_ROOT) -> dict[str, list[str]]:
    """``{module: __all__}`` of every public module (modules without ``__all__`` map to ``[]``)."""
    return {name: read_all(path) for name, path in public_modules(root)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print {module: [names]} as JSON")
    parser.add_argument("--count", action="store_true", help="print the totals only")
    parser.add_argument("--root", type=Path, default=PACKAGE_ROOT, help="the package folder (default: this tree's)")
    args = parser.parse_args(argv)
    api = public_api(args.root)
    if args.json:
        json.dump(api, sys.stdout, indent=1)
        print()
        return 0
    if not args.count:
        for module, names in api.items():
            print(f"{module}: {', '.join(names) if names else '-'}")
    total = sum(len(names) for names in api.values())
    with_all = sum(1 for names in api.values() if names)
    print(f"{total} public names in {len(api)} public modules ({with_all} with a non-empty __all__)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
