#!/usr/bin/env bash
# The lmms-eval integration tests (tests/eval) in their own environment, .venv-lmms, built from the package
# registries (idempotent: a second run only checks the installs); extra arguments go to pytest.
#
#   torch         torch 2.14.1 + torchvision 0.29.1 (override with LMMS_TORCH): transformers' Qwen2.5-VL and
#                 LLaVA-OneVision processors need torchvision (their video processors), and torchvision needs
#                 the torch it was built against, a CUDA build (~5.5 GB installed). LMMS_TORCH="torch==2.13.0"
#                 (the CPU build, much smaller) runs the LLaVA-1.5 / NeXT tests and skips the other two.
#   lmms-eval     0.7.3 without its dependencies, which pull wandb, sentence-transformers, openai, spacy, ...
#                 that no offline run imports; then what its evaluator, command line and the llava_hf /
#                 qwen2_5_vl models do import: decord (imported at the top of both model modules),
#                 qwen-vl-utils (no deps: it needs only torchvision, requests and pillow, already here),
#                 sacrebleu / evaluate / pytablewriter / tenacity / pytz (metrics, tables, retries), and
#                 filelock < 4 (lmms-eval 0.7 patches filelock 3's metaclass).
#   this package  editable, --no-deps (its own dependencies are torch and einops).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LMMS_TORCH="${LMMS_TORCH:-torch==2.14.1 torchvision==0.29.1}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # everything the tests load is built in them

# pip's resolver lists every lmms-eval dependency left out on purpose after each install: drop that noise
pip_q() {
    "$@" 2> >(grep -v -e "^WARNING: Location" -e "^lmms-eval .* requires " -e "^qwen-vl-utils .* requires av" \
                  -e "dependency resolver does not currently" >&2)
}

start=$SECONDS
echo "== lmms-eval environment (.venv-lmms)" >&2
[ -x .venv-lmms/bin/python ] || "$PYTHON" -m venv .venv-lmms
pip_q .venv-lmms/bin/pip install -q $LMMS_TORCH
pip_q .venv-lmms/bin/pip install -q --no-deps "lmms-eval==0.7.3" "qwen-vl-utils==0.0.14"
pip_q .venv-lmms/bin/pip install -q "transformers==5.25.0" "filelock<4" accelerate datasets "decord==0.6.0" \
    sacrebleu evaluate pytablewriter tenacity pytz loguru pyyaml jinja2 pillow einops "pytest>=7"
pip_q .venv-lmms/bin/pip install -q --no-deps -e .
echo "== .venv-lmms ready after $((SECONDS - start)) s; tests/eval" >&2
.venv-lmms/bin/python -m pytest -q -p no:cacheprovider tests/eval "$@"
