#!/usr/bin/env bash
# Packaging check, against what a user installs rather than the source tree:
#   1. `pip wheel .` builds a wheel that carries the compiled search kernel;
#   2. that wheel goes into a fresh venv, which reuses the given environment's packages (torch, transformers,
#      pytest, ...) through a .pth line but not its editable anchor-former, and part of the suite runs there
#      from a copy of tests/ with no src/ anywhere on the path;
#   3. the sdist carries every tracked file under tests/, benchmarks/ and docs/, and tests run from it unpacked.
#
#   scripts/test_wheel.sh [ENV]     ENV: a virtual environment with torch, transformers, pytest, hypothesis,
#                                   `build` and setuptools>=77,<85 (builds run without isolation): default .venv-test,
#                                   as scripts/test.sh sets it up; about 30 s of CPU
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv-test}/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== wheel: build" >&2
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . 2> >(grep -v "^WARNING: Location" >&2)
wheel="$(ls "$work"/dist/anchor_former-*.whl)"
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
kernels = [n for n in names if n.startswith("anchor_former/_native") and n.endswith((".so", ".pyd"))]
assert kernels, f"the wheel carries no compiled kernel: {names}"
print(f"wheel {sys.argv[1].rsplit('/', 1)[-1]} carries {kernels[0]}", file=sys.stderr)
PY

echo "== wheel: install into a fresh venv and test the installed package" >&2
"$py" -m venv --without-pip "$work/venv"
site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
site_of "$py" > "$(site_of "$work/venv/bin/python")/_reuse_main_env.pth"
"$py" -m pip --python "$work/venv/bin/python" install -q --no-deps "$wheel" 2> >(grep -v "^WARNING: Location" >&2)
mkdir "$work/run"
cp -r tests pyproject.toml "$work/run/"  # pyproject.toml for pytest's settings only; no src/ there
(
    cd "$work/run"
    "$work/venv/bin/python" - <<'PY'
import anchor_former
path = anchor_former.__file__
assert "/site-packages/" in path.replace("\\", "/"), f"anchor_former imported from {path}, not the wheel"
assert anchor_former.native_search_available(), "the installed wheel's kernel does not load"
print(f"testing the installed package at {path}")
PY
    "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_checkpoint.py \
        tests/connectors/test_registry.py tests/test_search.py -k "native or checkpoint or registry" -m "not slow" -x
)

echo "== sdist: carries tests/, benchmarks/, docs/; tests run from it unpacked" >&2
"$py" -m build --sdist --no-isolation -o "$work/sdist" . > "$work/sdist.log" 2>&1 || { cat "$work/sdist.log" >&2; exit 1; }
tar xzf "$work"/sdist/anchor_former-*.tar.gz -C "$work/sdist"
unpacked="$(ls -d "$work"/sdist/anchor_former-*/)"
if git rev-parse --git-dir > /dev/null 2>&1; then
    missing="$(git ls-files tests benchmarks docs | while read -r f; do [ -e "$unpacked/$f" ] || echo "$f"; done)"
    [ -z "$missing" ] || { echo "missing from the sdist: $missing" >&2; exit 1; }
fi
(cd "$unpacked" && "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_benchmarks.py \
    -k "bad_arguments or default_output" -x)
