"""The host contract suite: every row runs on every family (see ``test_contract.py``).

Families come from modules that load only where their host does: ``families_hf.py`` (transformers >= 5,
the main environment) and ``families_llava_torch.py`` (llava-torch, the ``.venv-llava`` environment).
Each module defines ``FAMILIES``, a list of :class:`family.Family`; adding a family to the suite is adding
one entry there (or one such module, listed in ``_MODULES``).
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
