"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift from the code.

Blocks of one page run in order in one namespace, inside a temporary working directory. A page can say,
in HTML comments that do not render:

* ``<!-- docs-test: setup [needs REQ]`` ... ``-->``: code run once before the page's first block (tiny
  models and files in place of hub downloads: a folder named like the hub id loads locally);
* right above a block, ``<!-- docs-test: skip: REASON; twin: tests/FILE.py::TEST -->`` (the block cannot
  run in a test, e.g. it downloads a 7B model: say why, and name the test that runs the same steps on a
  tiny model, its twin; the twin must exist), ``<!-- docs-test: needs REQ -->`` (runs only where REQ
  imports, e.g. ``llava``, or ``transformers>=5``; elsewhere it is skipped, so the llava-torch blocks run
  in the LLaVA test environment), and
  ``<!-- docs-test: replace `OLD` with `NEW` -->`` (a text substitution applied before running, e.g. a
  smaller layer count).

Blocks that are signatures, not code, are fenced as ``text``, not ``python``. A skip without a reason or a
twin, a twin that does not exist, or a directive nobody understands fails the suite.
"""

from __future__ import annotations

import ast
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
_SKIP = re.compile(r"^skip:\s*(?P<reason>\S.*?);\s*twin:\s*(?P<twin>tests/\S+\.py::\w+(?:::\w+)?)$", re.S)

# Pages whose owners have not added their markers yet: the same directives, kept here until they move into
# the page (a pending directive that matches no block fails test_pending_directives_match_their_blocks).
# docs/probes.md's snippets use a model and pixels the reader already has.
_PENDING: dict[str, dict[str, object]] = {
    "probes.md": {
        "setup": (
            "from transformers import CLIPVisionConfig, CLIPVisionModel\n"
            "vision_model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,"
            " num_attention_heads=4, image_size=112, patch_size=7)).eval()  # 16 x 16 patches\n"
            "vision_tower, pixel_values, num_anchors = vision_model, torch.randn(2, 3, 112, 112), 144\n"
            "q, k, head_dim = torch.randn(2, 4, 17, 8), torch.randn(2, 4, 17, 8), 8  # a layer's (B, H, N, E)\n"
            "s, padding = head_dim ** -0.5, torch.arange(17).expand(2, 17) >= torch.tensor([[17], [12]])\n"
        ),
        "needs": "transformers",
        # block (found by a line of its code) -> directives
        "block_directives": {
            "from anchor_former.viz import save_anchor_plot": ["needs matplotlib"],
            "class FooFamily(EncoderFamily):": [
                "skip: registers an encoder family for a library that does not exist; "
                "twin: tests/probes/test_encoder_registry.py::test_registering_an_existing_name_needs_replace"
            ],
            "batch = processor(images=images": [
                "skip: needs a SigLIP2 model and processor; "
                "twin: tests/probes/test_siglip2.py::test_extract_anchors_naflex"
            ],
        },
    },
    "llava-next.md": {
        "block_directives": {
            'LlavaNextForConditionalGeneration.from_pretrained("llava-hf/llava-v1.6-vicuna-7b-hf")': [
                "skip: downloads LLaVA-NeXT-7B; "
                "twin: tests/adapters/test_llava_next_hf.py::test_generate_with_reduced_budget"
            ],
            "from llava.mm_utils import process_images": [
                "skip: needs a llava-torch LLaVA-NeXT model and images; "
                "twin: tests/adapters/test_llava_anyres.py::test_generate_with_image_sizes"
            ],
        },
    },
    "qwen-vl.md": {
        "block_directives": {
            'from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")': [
                "skip: downloads Qwen2.5-VL-7B; "
                "twin: tests/adapters/test_qwen_vl.py::test_generate_batched_left_padded_with_reduced_budget"
            ],
        },
    },
    "training.md": {
        "block_directives": {
            '.from_pretrained("out/stage2")': [
                "skip: needs the folder a training run writes; "
                "twin: tests/test_train.py::test_stage_1_trains_only_the_connector_and_stage_2_the_llm_too"
            ]
        },
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
        page.setup = page.setup or str(pending.get("setup", ""))
        page.setup_needs = page.setup_needs or str(pending.get("needs", ""))
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


def _namespace(
    page: Page, namespaces: dict, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> dict:
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
def test_documented_python_block_runs(
    page: Page, index: int, namespaces: dict, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
):
    block = page.blocks[index]
    code = block.code
    for directive in block.directives:
        skip = _SKIP.match(directive)
        if skip:
            pytest.skip(f"{block.id}: {skip['reason']} (its twin: {skip['twin']})")
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


def _directives(path: Path) -> list[str]:
    """Every directive of a page: its own comments and the pending ones for its blocks."""
    own = [match.group(1) for match in _DIRECTIVE.finditer(path.read_text())]
    pending = _PENDING.get(path.name, {}).get("block_directives", {})
    return own + [d for directives in dict(pending).values() for d in directives]


def test_directives_are_understood():
    """A typo in a directive must not silently skip or change a block; a skip says why and names its twin."""
    known = re.compile(r"^(needs \S+|replace `.+` with `.*`|setup\b.*)$", re.S)
    for path in PAGES:
        for directive in _directives(path):
            if directive.startswith("skip"):
                assert _SKIP.match(directive), (
                    f"{path.name}: {directive!r}: a skip needs a reason and the test that runs the same steps: "
                    "`skip: REASON; twin: tests/FILE.py::TEST`"
                )
            else:
                assert known.match(directive), f"{path.name}: unknown docs-test directive {directive!r}"


def _defines(path: Path, name: str) -> bool:
    """Whether ``path`` defines test ``name`` (``test_x`` or ``TestClass::test_x``)."""
    scope: list[ast.stmt] = ast.parse(path.read_text()).body
    for part in name.split("::"):
        found = [node for node in scope if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == part]
        if not found:
            return False
        scope = getattr(found[0], "body", [])
    return True


def test_every_skipped_block_names_a_twin_that_exists():
    """The twin of a skipped block is a test of this suite: the file exists and defines it."""
    for path in PAGES:
        for directive in _directives(path):
            skip = _SKIP.match(directive)
            if skip:
                file, _, name = skip["twin"].partition("::")
                assert (ROOT / file).is_file(), f"{path.name}: the twin {skip['twin']} names a missing file"
                assert _defines(ROOT / file, name), f"{path.name}: {file} defines no test {name} (the twin)"


def test_pending_directives_match_their_blocks():
    """Each pending directive still finds its block; once a page carries its own markers, drop the entry."""
    for name, pending in _PENDING.items():
        page = ROOT / "docs" / name
        assert page.is_file(), f"_PENDING names a page that does not exist: docs/{name}"
        blocks = [m.group(1) for m in _FENCE.finditer(page.read_text())]
        for line in dict(pending["block_directives"]):
            assert any(line in code for code in blocks), (
                f"docs/{name}: no block contains {line!r}; move its directives into the page or drop them here"
            )


def test_a_skip_without_a_twin_is_refused():
    """The check above bites: the old form (a reason only) and a twin that does not exist both fail."""
    assert _SKIP.match("skip: downloads a 7B model; twin: tests/test_docs.py::test_directives_are_understood")
    assert not _SKIP.match("skip: downloads a 7B model")
    assert not _SKIP.match("skip: ; twin: tests/test_docs.py::test_directives_are_understood")
    assert _defines(ROOT / "tests" / "test_docs.py", "test_directives_are_understood")
    assert not _defines(ROOT / "tests" / "test_docs.py", "test_that_does_not_exist")


def test_signatures_are_not_fenced_as_python():
    """A block whose first line is a bare call signature with ``-> ...`` or ``*,`` is documentation, not code."""
    for path in PAGES:
        for match in _FENCE.finditer(path.read_text()):
            first = match.group(1).lstrip().split("\n")[0]
            assert not re.match(r"^\w+\(.*\)\s*->", first), f"{path.name}: signature fenced as python: {first}"
