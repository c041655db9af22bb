"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift from the code.

Blocks of one page run in order in one namespace, inside a temporary working directory. A page can say,
in HTML comments that do not render:

* ``<!-- docs-test: setup [needs REQ]`` ... ``-->``: code run once before the page's first block (tiny
  models and files in place of hub downloads: a folder named like the hub id loads locally);
* right above a block, ``<!-- docs-test: skip: REASON -->`` (the block cannot run anywhere; say why),
  ``<!-- docs-test: needs REQ -->`` (runs only where REQ imports, e.g. ``llava``, or ``transformers>=5``;
  elsewhere it is skipped, so the llava-torch blocks run in ``.venv-llava``), and
  ``<!-- docs-test: replace `OLD` with `NEW` -->`` (a text substitution applied before running, e.g. a
  smaller layer count).

Blocks that are signatures, not code, are fenced as ``text``, not ``python``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->", re.S)
_SETUP = re.compile(r"<!--\s*docs-test:\s*setup\b([^\n]*)\n(.*?)-->", re.S)
_REPLACE = re.compile(r"^replace\s+`(.+?)`\s+with\s+`(.*?)`$", re.S)

# Pages whose owners have not added their markers yet: the same directives, kept here until they move into
# the page. docs/probes.md's snippets use a model and pixels the reader already has.
_PENDING: dict[str, dict[str, object]] = {
    "probes.md": {
        "setup": (
            "from transformers import CLIPVisionConfig, CLIPVisionModel\n"
            "vision_model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,"
            " num_attention_heads=4, image_size=112, patch_size=7)).eval()  # 16 x 16 patches\n"
            "vision_tower, pixel_values, num_anchors = vision_model, torch.randn(2, 3, 112, 112), 144\n"
        ),
        "needs": "transformers",
        # block (found by a line of its code) -> directives
        "block_directives": {"from anchor_former.viz import save_anchor_plot": ["needs matplotlib"],
                             "class FooFamily(EncoderFamily):": [
                                 "skip: registers an encoder family for a library that does not exist"]},
    },
}


@dataclass
class Block:
    page: str
    line: int
    code: str
    directives: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Page:
    name: str
    blocks: list[Block]
    setup: str = ""
    setup_needs: str = ""


def parse_page(path: Path) -> Page:
    """The page's python blocks with the directives right above each, and its setup."""
    text = path.read_text()
    name = path.name
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").split("\n")
        directives = []
        while before and _DIRECTIVE.fullmatch(before[-1].strip()):
            directives.insert(0, _DIRECTIVE.fullmatch(before[-1].strip()).group(1))
            before.pop()
        blocks.append(Block(name, text[: match.start()].count("\n") + 1, match.group(1), directives))
    page = Page(name, blocks)
    setup = _SETUP.search(text)
    if setup:
        page.setup_needs = setup.group(1).strip().removeprefix("needs").strip()
        page.setup = setup.group(2)
    pending = _PENDING.get(name)
    if pending:
        page.setup = page.setup or str(pending["setup"])
        page.setup_needs = page.setup_needs or str(pending["needs"])
        for line, extra in dict(pending["block_directives"]).items():
            for block in blocks:
                if line in block.code and not block.directives:
                    block.directives = list(extra)
    return page


def unmet(requirement: str) -> str | None:
    """Why ``requirement`` (``module`` or ``module>=MAJOR``) is not met here, or None."""
    if not requirement:
        return None
    module, _, version = requirement.partition(">=")
    try:
        imported = importlib.import_module(module.strip())
    except ImportError:
        return f"needs {module.strip()}"
    if version and int(str(getattr(imported, "__version__", "0")).split(".")[0]) < int(version):
        return f"needs {requirement} (have {imported.__version__})"
    return None


def _cases() -> list[pytest.param]:
    cases = []
    for path in PAGES:
        page = parse_page(path)
        cases += [pytest.param(page, i, id=block.id) for i, block in enumerate(page.blocks)]
    return cases


@pytest.fixture(scope="module")
def namespaces() -> dict[str, dict]:
    """One namespace (and working directory) per page, shared by its blocks in order."""
    return {}


def _namespace(page: Page, namespaces: dict, tmp_path_factory: pytest.TempPathFactory,
               monkeypatch: pytest.MonkeyPatch) -> dict:
    if page.name not in namespaces:
        workdir = tmp_path_factory.mktemp(page.name.replace(".", "_"))
        namespaces[page.name] = {"__name__": f"docs_{page.name}", "__workdir__": workdir, "torch": torch}
        monkeypatch.chdir(workdir)
        reason = unmet(page.setup_needs)
        if reason:
            namespaces[page.name]["__skip__"] = f"page setup {reason}"
        elif page.setup:
            torch.manual_seed(0)
            exec(compile(page.setup, f"{page.name} (docs-test setup)", "exec"), namespaces[page.name])
    monkeypatch.chdir(namespaces[page.name]["__workdir__"])
    return namespaces[page.name]


@pytest.mark.parametrize(("page", "index"), _cases())
def test_documented_python_block_runs(page: Page, index: int, namespaces: dict,
                                      tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    block = page.blocks[index]
    code = block.code
    for directive in block.directives:
        if directive.startswith("skip"):
            pytest.skip(f"{block.id}: {directive}")
        if directive.startswith("needs"):
            reason = unmet(directive.removeprefix("needs").strip())
            if reason:
                pytest.skip(f"{block.id}: {reason}")
    namespace = _namespace(page, namespaces, tmp_path_factory, monkeypatch)
    if "__skip__" in namespace:
        pytest.skip(f"{block.id}: {namespace['__skip__']}")
    for directive in block.directives:
        replace = _REPLACE.match(directive)
        if replace:
            assert replace.group(1) in code, f"{block.id}: replace target {replace.group(1)!r} not in the block"
            code = code.replace(replace.group(1), replace.group(2))
    torch.manual_seed(0)
    exec(compile(code, block.id, "exec"), namespace)


def test_package_docstring_opens_with_a_usage_example_that_runs():
    import doctest

    import anchor_former

    assert ">>> from anchor_former import" in anchor_former.__doc__.split("\n\n", 3)[2]  # help() shows it first
    torch.manual_seed(0)
    result = doctest.testmod(anchor_former, verbose=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0


def test_directives_are_understood():
    """A typo in a directive must not silently skip or change a block."""
    known = re.compile(r"^(skip\b.*|needs \S+|replace `.+` with `.*`|setup\b.*)$", re.S)
    for path in PAGES:
        for match in _DIRECTIVE.finditer(path.read_text()):
            assert known.match(match.group(1)), f"{path.name}: unknown docs-test directive {match.group(1)!r}"


def test_signatures_are_not_fenced_as_python():
    """A block whose first line is a bare call signature with ``-> ...`` or ``*,`` is documentation, not code."""
    for path in PAGES:
        for match in _FENCE.finditer(path.read_text()):
            first = match.group(1).lstrip().split("\n")[0]
            assert not re.match(r"^\w+\(.*\)\s*->", first), f"{path.name}: signature fenced as python: {first}"
