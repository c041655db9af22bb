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
pip_q .venv/bin/pip install -q -e ".[test,hf,timm,viz,train,lora]"
# scripts/test_wheel.sh builds without isolation (fast, offline once installed): the build backend of
# pyproject.toml's [build-system] and `build` for the sdist
pip_q .venv/bin/pip install -q "setuptools>=77,<85" build
# open_clip towers for the probe tests (tests/probes/test_openclip.py skips without it): its other
# dependencies (torchvision, timm, regex, huggingface_hub, safetensors, tqdm) are already here
pip_q .venv/bin/pip install -q ftfy
pip_q .venv/bin/pip install -q --no-deps "open_clip_torch>=3.0"

echo "== LLaVA environment (.venv-llava)" >&2
[ -x .venv-llava/bin/python ] || "$PYTHON" -m venv .venv-llava
pip_q .venv-llava/bin/pip install -q $LLAVA_TORCH
pip_q .venv-llava/bin/pip install -q "transformers==4.37.2" "tokenizers<0.19" einops pillow "pytest>=7" "hypothesis>=6.80" safetensors \
    "accelerate==0.34.2" sentencepiece "peft==0.11.1"  # peft: the last release that imports on transformers 4.37
# LLaVA's trainer imports deepspeed when it saves (maybe_zero_3); pure-Python install, no CUDA ops built
# (about 40 s, 21 MB; imports on CPU). accelerate < 1.0: transformers 4.37's Trainer passes arguments 1.0 removed.
DS_BUILD_OPS=0 pip_q .venv-llava/bin/pip install -q "deepspeed==0.19.8"
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
# The compiled search kernel's tests once more under AddressSanitizer + UBSan (about 1 min); skipped
# when the compiler has no sanitizer runtimes, or with SANITIZE=0.
if [ "${SANITIZE:-1}" = 1 ] && [ -f "$(${CC:-gcc} -print-file-name=libasan.so 2>/dev/null)" ]; then
    echo "== native search kernel under AddressSanitizer + UBSan" >&2
    PYTHON=.venv/bin/python scripts/sanitize_native.sh || status=$?
fi
exit $status
