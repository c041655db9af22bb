"""A missing optional dependency raises an ImportError that names the extra to install."""

from __future__ import annotations

import sys

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
    with pytest.raises(ImportError, match=r'^reading x needs safetensors, which is not installed: '
                                          r'pip install "anchor-former\[hf\]"$') as info:
        require("safetensors.torch", extra="hf", feature="reading x")
    assert info.value.name == "safetensors"


def test_safetensors_checkpoints_name_the_hf_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    save_state_dict({"w": torch.zeros(2)}, path)
    _hide(monkeypatch, "safetensors", "safetensors.torch")
    with pytest.raises(ImportError, match=r'reading \.safetensors checkpoints needs safetensors.*anchor-former\[hf\]'):
        load_state_dict(path)
    with pytest.raises(ImportError, match=r'saving checkpoints \(safetensors\) needs safetensors.*anchor-former\[hf\]'):
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "v.safetensors")


def test_viz_names_the_viz_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from anchor_former import viz

    _hide(monkeypatch, "matplotlib", "matplotlib.figure", "matplotlib.patches")
    with pytest.raises(ImportError, match=r'anchor_former\.viz needs matplotlib.*pip install "anchor-former\[viz\]"'):
        viz.plot_anchors(torch.tensor([0, 1]), grid_size=(2, 2), num_prefix_tokens=1)
