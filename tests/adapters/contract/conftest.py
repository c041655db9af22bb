"""The host contract suite: every row of ``test_contract.py`` runs on every family.

A family is one :class:`family.Family` entry (tiny model and processor builders, one request's inputs, the
attach arguments of a few situations, the stock and attached classes, which rows it supports). Entries
live in modules that load only where their host does:

* ``families_hf.py``: transformers >= 5 (the main environment): ``llava``, ``llava_next``, ``onevision``,
  ``qwen2``, ``qwen2_5``, ``qwen3``;
* ``families_llava_torch.py``: llava-torch (the ``.venv-llava`` environment), e.g. ``llava_torch`` and
  ``llava_torch_anyres_{flat,spatial,spatial_unpad}``.

Each module defines ``FAMILIES: list[Family]`` and raises ``ImportError`` at import where its host is
missing (``import llava`` at the top does that), so the other environment skips it with the reason. A
family added later gets every row by adding one entry; rows its host cannot take part in are left out of
``Family.supports`` (with the reason in ``Family.skip``); rows known to fail today go into
``Family.xfail`` (run as strict xfails, so the fix shows). A new module is listed in ``_MODULES`` below.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

HERE = os.path.dirname(__file__)
for path in (HERE, os.path.dirname(HERE)):  # family.py, and the tiny-model builders of tests/adapters
    if path not in sys.path:
        sys.path.insert(0, path)

_MODULES = {"families_hf": "transformers>=5", "families_llava_torch": "llava-torch"}


def _load():
    families, skipped = [], []
    for module, needs in _MODULES.items():
        if not os.path.exists(os.path.join(HERE, f"{module}.py")):
            continue
        try:
            if module == "families_hf":
                import transformers

                if int(transformers.__version__.split(".")[0]) < 5:
                    raise ImportError(f"transformers {transformers.__version__}")
            families.extend(importlib.import_module(module).FAMILIES)
        except ImportError as error:
            skipped.append(f"{module} ({needs}): {error}")
    return families, skipped


FAMILIES, SKIPPED = _load()


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        if not FAMILIES:
            metafunc.parametrize("family", [pytest.param(None, marks=pytest.mark.skip(reason="; ".join(SKIPPED)))])
        else:
            metafunc.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
