#!/usr/bin/env bash
# Set up both test environments from scratch (idempotent) and run the whole test suite.
#
#   .venv        torch + torchvision, transformers 5.x, timm, hypothesis: everything but the LLaVA code; also
#                runs scripts/test_wheel.sh (wheel with the kernel installed into a fresh venv, sdist contents)
#   .venv-llava  torch 2.13 CPU, transformers 4.37.2, llava-torch 1.2.2.post1 (--no-deps): the original
#                LLaVA code pins ancient dependencies, so it gets its own environment
#
# Override the torch builds with MAIN_TORCH / LLAVA_TORCH (pip requirement strings) if your index differs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
MAIN_TORCH="${MAIN_TORCH:-torch==2.14.1 torchvision==0.29.1}"
LLAVA_TORCH="${LLAVA_TORCH:-torch==2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"

pip_q() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }

echo "== main environment (.venv)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_q .venv/bin/pip install -q $MAIN_TORCH
pip_q .venv/bin/pip install -q -e ".[test,hf,timm,viz]"
# scripts/test_wheel.sh builds without isolation (fast, offline once installed): the build backend of
# pyproject.toml's [build-system] and `build` for the sdist
pip_q .venv/bin/pip install -q "setuptools>=77,<85" build

echo "== LLaVA environment (.venv-llava)" >&2
[ -x .venv-llava/bin/python ] || "$PYTHON" -m venv .venv-llava
pip_q .venv-llava/bin/pip install -q $LLAVA_TORCH
pip_q .venv-llava/bin/pip install -q "transformers==4.37.2" "tokenizers<0.19" einops pillow "pytest>=7" "hypothesis>=6.80" safetensors
pip_q .venv-llava/bin/pip install -q --no-deps "llava-torch==1.2.2.post1"
pip_q .venv-llava/bin/pip install -q --no-deps -e .

status=0
echo "== tests: main environment" >&2
.venv/bin/python -m pytest -q "$@" || status=$?
echo "== packaging: the wheel installed into a fresh venv, the sdist unpacked" >&2
scripts/test_wheel.sh .venv || status=$?
echo "== tests: LLaVA environment (torch 2.13, transformers 4.37.2 + llava-torch)" >&2
# Everything runs here too (the library supports transformers 4.37) except the FLOP-count and benchmark
# tests, which build their reference models with transformers 5.x APIs (the `bench` extra).
.venv-llava/bin/python -m pytest -q -p no:cacheprovider tests \
    --ignore=tests/test_flops.py --ignore=tests/test_benchmarks.py "$@" || status=$?
exit $status
