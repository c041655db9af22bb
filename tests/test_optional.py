"""A missing optional dependency raises an ImportError that names the extra to install."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from anchor_former._optional import require
from anchor_former.checkpoint import load_state_dict, save_state_dict


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import module`` fail as if it were not installed (a None entry in sys.modules)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_require_returns_the_module_or_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("torch.nn", extra="hf", feature="x") is torch.nn
    _hide(monkeypatch, "safetensors", "safetensors.torch")
    with pytest.raises(
        ImportError,
        match=r"^reading x needs safetensors, which is not installed: "
        r'pip install "anchor-former\[hf\]"$',
    ) as info:
        require("safetensors.torch", extra="hf", feature="reading x")
    assert info.value.name == "safetensors"


def test_safetensors_checkpoints_name_the_hf_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    save_state_dict({"w": torch.zeros(2)}, path)
    _hide(monkeypatch, "safetensors", "safetensors.torch")
    with pytest.raises(ImportError, match=r"reading \.safetensors checkpoints needs safetensors.*anchor-former\[hf\]"):
        load_state_dict(path)
    with pytest.raises(ImportError, match=r"saving checkpoints \(safetensors\) needs safetensors.*anchor-former\[hf\]"):
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "v.safetensors")


def test_viz_names_the_viz_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from anchor_former import viz

    _hide(monkeypatch, "matplotlib", "matplotlib.figure", "matplotlib.patches")
    with pytest.raises(ImportError, match=r'anchor_former\.viz needs matplotlib.*pip install "anchor-former\[viz\]"'):
        viz.plot_anchors(torch.tensor([0, 1]), grid_size=(2, 2), num_prefix_tokens=1)


# Runs in a fresh interpreter: every distribution outside the core install (torch, einops and what torch
# itself requires) is made unimportable by a meta-path finder, as in an environment where only
# `pip install anchor-former` ran; then each module of the package is imported.
_CORE_ONLY = r'''
import importlib, importlib.metadata as md, json, pathlib, re, sys

def requirements(dist):
    names = set()
    for req in md.requires(dist) or []:
        if "extra ==" in req:
            continue
        names.add(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return names

core, todo = set(), ["torch", "einops"]
while todo:
    dist = todo.pop()
    if dist in core:
        continue
    core.add(dist)
    try:
        todo += requirements(dist)
    except md.PackageNotFoundError:
        pass
core |= {"anchor-former", "anchor_former"}
owners = md.packages_distributions()
blocked = {top for top, dists in owners.items()
           if top not in sys.stdlib_module_names
           and not any(d.lower().replace("_", "-") in core for d in dists)}

class NotInstalled:
    """Wraps a finder: blocked names are not found (``find_spec`` answers None, as for a missing module)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
        return getattr(self.finder, attr)

sys.meta_path[:] = [NotInstalled(finder) for finder in sys.meta_path]
import anchor_former
root = pathlib.Path(anchor_former.__file__).parent
modules = sorted(".".join(("anchor_former", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
                 for p in root.rglob("*.py") if p.name != "__main__.py")
results = {}
for name in modules:
    try:
        importlib.import_module(name)
        results[name] = None
    except Exception as err:
        results[name] = f"{type(err).__name__}: {err}"
print(json.dumps({"blocked": sorted(blocked), "results": results}))
'''


# Private modules whose dependency is no extra of this package, and why no user meets the bare error.
_NOT_AN_EXTRA = {
    # triton ships with CUDA builds of PyTorch; anchor_search(method="triton") checks for it before this
    # module is imported and raises a RuntimeError that says so
    "anchor_former._triton_search": "triton",
}


def test_every_module_imports_or_names_its_extra_without_the_optional_dependencies(tmp_path):
    """A core-only install: each module imports, or its ImportError names the extra to install."""
    import importlib.util
    import json
    import os
    import subprocess

    import anchor_former

    src = str(os.path.dirname(os.path.dirname(anchor_former.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _CORE_ONLY], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for installed in ("transformers", "huggingface_hub", "safetensors", "matplotlib"):  # the blocker bites
        if importlib.util.find_spec(installed) is not None:
            assert installed in report["blocked"], installed
    extras = _declared_extras()
    failures = {name: error for name, error in report["results"].items() if error is not None}
    bad = {}
    for name, error in failures.items():
        if name in _NOT_AN_EXTRA:
            dependency = _NOT_AN_EXTRA[name]
            if error != f"ModuleNotFoundError: No module named '{dependency}'":
                bad[name] = error
            continue
        named = re.search(r'pip install "anchor-former\[([\w-]+)\]"', error)
        if not error.startswith("ImportError: ") or named is None or (extras and named.group(1) not in extras):
            bad[name] = error
    assert not bad, f"modules that fail without naming an extra of pyproject.toml: {bad}"
    assert report["results"]["anchor_former"] is None  # the core itself imports


def _declared_extras() -> set[str]:
    """The extras of pyproject.toml (empty where it is not beside the tests or tomllib is missing)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return set()
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.exists():
        return set()
    return set(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"])
