#!/usr/bin/env bash
# Build the native search kernel (src/anchor_former/_native.c) with AddressSanitizer and
# UndefinedBehaviorSanitizer into a temporary copy of the package, and run the kernel's tests against it.
# Any out-of-bounds access, use after free or undefined behaviour aborts the run with a report.
#
#   scripts/sanitize_native.sh                  # uses .venv-test/bin/python (scripts/test.sh builds it), gcc
#   PYTHON=/path/to/python CC=clang scripts/sanitize_native.sh -k quota   # extra args go to pytest
#
# Needs a C compiler with the sanitizer runtimes (gcc: libasan, libubsan). Leak detection is off:
# CPython and PyTorch keep allocations alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv-test/bin/python}"
CC="${CC:-gcc}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

mkdir -p "$tmp/src"
cp -r src/anchor_former "$tmp/src/"
rm -f "$tmp"/src/anchor_former/_native*.so "$tmp"/src/anchor_former/_native*.pyd
include="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
suffix="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
"$CC" -shared -fPIC -std=c99 -pthread -O1 -g -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -I"$include" src/anchor_former/_native.c -o "$tmp/src/anchor_former/_native$suffix"

# The Python interpreter is not instrumented, so the sanitizer runtimes must be loaded first.
preload="$("$CC" -print-file-name=libasan.so) $("$CC" -print-file-name=libubsan.so)"
echo "== native kernel under ASan+UBSan: $tmp/src/anchor_former/_native$suffix" >&2
export LD_PRELOAD="$preload" PYTHONPATH="$tmp/src"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
"$PYTHON" -c "import anchor_former._native as m, sys; sys.exit(not m.__file__.startswith('$tmp'))" \
    || { echo "the instrumented kernel is not the one imported" >&2; exit 1; }

"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_search.py -m "not slow" \
    -k "native or quotas or ties or layouts or llava or negated or infinities or padding" "$@"
