#!/usr/bin/env bash
# Set up the test environments from scratch (idempotent) and run the whole test suite: what CI runs.
#
#   .venv-test        torch + torchvision, transformers 5.x, timm, hypothesis, ruff, mypy: everything but the
#                     original LLaVA code; runs the linters, the suite, scripts/test_wheel.sh (the wheel with
#                     the kernel installed into a fresh venv, the sdist's contents) and the sanitizer run
#   .venv-test-llava  torch 2.13 CPU, transformers 4.37.2, llava-torch 1.2.2.post1 (--no-deps): the original
#                     LLaVA code pins ancient dependencies, so it gets its own environment
#   scripts/test_<name>.sh, for each name in EXTRA_ENVS below whose script exists: environments that need
#                     their own pins (each script creates its own .venv-<name>, runs its tests, exits non-zero
#                     on failure)
#
# It never touches .venv, the environment the README's commands create for you.
#
# Environment variables:
#   MAIN_TORCH / LLAVA_TORCH   pip requirement strings for the two torch builds, if your index differs
#   TEST_VENV / LLAVA_VENV     the two environments' folders (default .venv-test, .venv-test-llava)
#   RUFF_FORMAT_CHECK=0        skip `ruff format --check` (lint and mypy still run)
#   LINT=0                     skip ruff and mypy altogether
#   SANITIZE=0                 skip the AddressSanitizer + UBSan run of the search kernel
#   EXTRA_ENVS="..."           which scripts/test_<name>.sh to run (default: vllm lmms; "" for none)
# Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
MAIN_TORCH="${MAIN_TORCH:-torch==2.14.1 torchvision==0.29.1}"
LLAVA_TORCH="${LLAVA_TORCH:-torch==2.13.0}"
TEST_VENV="${TEST_VENV:-.venv-test}"
LLAVA_VENV="${LLAVA_VENV:-.venv-test-llava}"
RUFF_FORMAT_CHECK="${RUFF_FORMAT_CHECK:-1}"
EXTRA_ENVS="${EXTRA_ENVS-vllm lmms}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"

pip_q() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }

echo "== main test environment ($TEST_VENV)" >&2
[ -x "$TEST_VENV/bin/python" ] || "$PYTHON" -m venv "$TEST_VENV"
pip_q "$TEST_VENV/bin/pip" install -q $MAIN_TORCH
pip_q "$TEST_VENV/bin/pip" install -q -e ".[test,hf,hf-vision,timm,viz,train,lora,lint]"
# scripts/test_wheel.sh builds without isolation (fast, offline once installed): the build backend of
# pyproject.toml's [build-system] and `build` for the sdist
pip_q "$TEST_VENV/bin/pip" install -q "setuptools>=77,<85" build
# open_clip towers for the probe tests (tests/probes/test_openclip.py skips without it): its other
# dependencies (torchvision, timm, regex, huggingface_hub, safetensors, tqdm) are already here
pip_q "$TEST_VENV/bin/pip" install -q ftfy
pip_q "$TEST_VENV/bin/pip" install -q --no-deps "open_clip_torch>=3.0"
# bitsandbytes: the 8-bit tower rows of the probe and contract tests (its CPU backend; they skip without it)
pip_q "$TEST_VENV/bin/pip" install -q "bitsandbytes==0.50.2"

echo "== LLaVA test environment ($LLAVA_VENV)" >&2
[ -x "$LLAVA_VENV/bin/python" ] || "$PYTHON" -m venv "$LLAVA_VENV"
pip_q "$LLAVA_VENV/bin/pip" install -q $LLAVA_TORCH
pip_q "$LLAVA_VENV/bin/pip" install -q "transformers==4.37.2" "tokenizers<0.19" einops pillow "pytest>=7" "hypothesis>=6.80" safetensors \
    "accelerate==0.34.2" sentencepiece "peft==0.11.1"  # peft: the last release that imports on transformers 4.37
# LLaVA's trainer imports deepspeed when it saves (maybe_zero_3); pure-Python install, no CUDA ops built
# (about 40 s, 21 MB; imports on CPU). accelerate < 1.0: transformers 4.37's Trainer passes arguments 1.0 removed.
DS_BUILD_OPS=0 pip_q "$LLAVA_VENV/bin/pip" install -q "deepspeed==0.19.8"
pip_q "$LLAVA_VENV/bin/pip" install -q --no-deps "llava-torch==1.2.2.post1"
pip_q "$LLAVA_VENV/bin/pip" install -q --no-deps -e .

status=0
if [ "${LINT:-1}" = 1 ]; then
    # versions pinned by the `lint` extra; settings in pyproject.toml ([tool.ruff], [tool.mypy])
    echo "== lint: ruff check" >&2
    "$TEST_VENV/bin/ruff" check . || status=$?
    if [ "$RUFF_FORMAT_CHECK" = 1 ]; then
        echo "== lint: ruff format --check" >&2
        "$TEST_VENV/bin/ruff" format --check . || status=$?
    fi
    echo "== types: mypy (strict on the core, see [tool.mypy] in pyproject.toml)" >&2
    "$TEST_VENV/bin/mypy" || status=$?
fi
echo "== tests: main environment" >&2
"$TEST_VENV/bin/python" -m pytest -q "$@" || status=$?
echo "== packaging: the wheel installed into a fresh venv, the sdist unpacked" >&2
scripts/test_wheel.sh "$TEST_VENV" || status=$?
echo "== tests: LLaVA environment (torch 2.13, transformers 4.37.2 + llava-torch)" >&2
# Everything runs here too (the library supports transformers 4.37) except the FLOP-count and benchmark
# tests, which build their reference models with transformers 5.x APIs (the `bench` extra).
"$LLAVA_VENV/bin/python" -m pytest -q -p no:cacheprovider tests \
    --ignore=tests/test_flops.py --ignore=tests/test_benchmarks.py "$@" || status=$?
# The compiled search kernel's tests once more under AddressSanitizer + UBSan (about 1 min); skipped
# when the compiler has no sanitizer runtimes, or with SANITIZE=0.
if [ "${SANITIZE:-1}" = 1 ] && [ -f "$(${CC:-gcc} -print-file-name=libasan.so 2>/dev/null)" ]; then
    echo "== native search kernel under AddressSanitizer + UBSan" >&2
    PYTHON="$TEST_VENV/bin/python" scripts/sanitize_native.sh || status=$?
fi
# Environments with pins of their own (a serving engine, an evaluation harness): one script each, called
# here when it exists. Adding one is adding its name to EXTRA_ENVS.
for name in $EXTRA_ENVS; do
    script="scripts/test_$name.sh"
    if [ -f "$script" ]; then
        echo "== environment: $name ($script)" >&2
        bash "$script" || status=$?
    else
        echo "== environment: $name: $script not present, skipped" >&2
    fi
done
exit $status
