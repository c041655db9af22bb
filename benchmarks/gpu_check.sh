#!/usr/bin/env bash
# One-shot GPU check: install in place, run the CUDA tests, run the llava-1.5-7b benchmark preset on CUDA.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on a fresh NVIDIA machine, from the repository root
#   DEVICE=cpu PRESET=tiny bash benchmarks/gpu_check.sh OUT_DIR   # dry run of the plumbing on a CPU
#
# Needs only what the machine already has: its python with torch (and, for the tests, pytest + hypothesis;
# for the benchmarks, transformers). Nothing is downloaded: pip runs with --no-index --no-deps, and when
# that fails the package is used from src/ with the C kernel built in place. Every section has its own
# time limit and writes its log under OUT_DIR as soon as it ends (status.txt: one "section exit-code" line
# each), so a section that hangs or fails loses nothing that came before it. Budget: under 8 minutes on
# an H100 (limits below add up to 7.5 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-llava-1.5-7b}"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/progress.log" >&2; }

# section NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log, record the exit code
section() {
    local name=$1 limit=$2
    shift 2
    log "start $name (limit ${limit} s)"
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1 < /dev/null
    local rc=$?
    echo "$name $rc" >> "$OUT/status.txt"
    log "end $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)')"
    return 0
}

environment() {
    nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "einops", "pytest", "hypothesis", "timm", "safetensors", "matplotlib"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report whatever is missing
        print(name, "MISSING:", type(exc).__name__, exc)
EOF
}

install() {
    if "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e . ; then
        echo "installed editable with pip"
    else
        echo "pip install failed (no setuptools/wheel offline?): building the C kernel in place, using src/"
        "$PYTHON" setup.py build_ext --inplace || echo "no C kernel: the search uses its PyTorch paths"
    fi
    PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
        "import anchor_former as a; print('anchor_former', a.__version__, a.__file__, 'native', a.native_search_available())"
}

if [ "${1:-}" = "--step" ]; then  # a section that is a function of this script, run under `timeout`
    "$2"
    exit $?
fi
OUT="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/status.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # harmless after an editable install
section environment 60 bash "$0" --step environment
section install 90 bash "$0" --step install
# the CUDA tests: every test marked cuda or skipped without a GPU lives in these files
section tests_cuda 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/test_search.py tests/test_triton_search.py tests/test_attention.py tests/connectors/test_acformer.py \
    tests/test_benchmarks.py --junitxml "$OUT/tests_cuda.xml"
# search and probe first: they carry the headline targets and are the quickest
section benchmarks 300 "$PYTHON" -m benchmarks.run --preset "$PRESET" --device "$DEVICE" \
    --benchmarks search,probe,connectors,pipeline --output "$OUT/bench"
log "done; status:"
cat "$OUT/status.txt" >&2
