#!/usr/bin/env bash
# Build arctic-inference (needed by vLLM's `suffix` speculative method) and install it next to vLLM.
#
# PyPI ships arctic-inference==0.1.1 only as a source package, and its build needs torch, nanobind and a
# compiler toolchain that vLLM's environment does not have; it also pins dependencies that would move vLLM's.
# So the wheel is built in a separate throw-away venv (with the torch version of the target environment, for
# the C++ ABI) and installed with --no-deps.
#
# After the install, arctic-inference's own `vllm.general_plugins` entry (written for older vLLM) would load
# in every vLLM process: start vLLM with VLLM_PLUGINS=ouroboros (the benchmark harness does this itself).
#
# usage: benchmarks/build_arctic_inference.sh [--python PYTHON] [--target DIR]
#   --python PYTHON  the interpreter of the environment to install into (default: .venv/bin/python)
#   --target DIR     install into DIR (pip --target) instead, leaving the environment untouched;
#                    use it with PYTHONPATH=DIR
# env: ARCTIC_BUILD_DIR  where the build venv and the wheel go (default ~/.cache/ouroboros-vllm/arctic-build)
set -euo pipefail

VERSION=0.1.1
NANOBIND=2.9.2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON="$REPO/.venv/bin/python"
TARGET=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PYTHON=$2; shift 2 ;;
        --target) TARGET=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
BUILD_DIR=${ARCTIC_BUILD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ouroboros-vllm/arctic-build}

# Same torch as the environment that will import the extension (its C++ ABI must match).
TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
echo "building arctic-inference==$VERSION against torch==$TORCH in $BUILD_DIR"

BUILD_VENV="$BUILD_DIR/venv"
if [[ ! -x "$BUILD_VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$BUILD_VENV"
fi
"$BUILD_VENV/bin/python" -m pip install -q --upgrade pip
"$BUILD_VENV/bin/python" -m pip install -q "torch==$TORCH" "nanobind==$NANOBIND" cmake ninja setuptools wheel grpcio-tools

WHEEL_DIR="$BUILD_DIR/wheels"
mkdir -p "$WHEEL_DIR"
# --no-build-isolation: build against the torch installed above, not whatever pip would fetch;
# CMAKE_ARGS: make CMake find the build venv's Python (and so its nanobind), not the system one.
CMAKE_ARGS="-DPython_EXECUTABLE=$BUILD_VENV/bin/python" \
    "$BUILD_VENV/bin/python" -m pip wheel -q "arctic-inference==$VERSION" \
    --no-build-isolation --no-deps -w "$WHEEL_DIR"
WHEEL=$(ls -t "$WHEEL_DIR"/arctic_inference-"$VERSION"-*.whl | head -n 1)
echo "built $WHEEL"

if [[ -n "$TARGET" ]]; then
    "$PYTHON" -m pip install -q --no-deps --upgrade --target "$TARGET" "$WHEEL"
    echo "installed into $TARGET: run with PYTHONPATH=$TARGET and VLLM_PLUGINS=ouroboros"
else
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL"
    echo "installed into $("$PYTHON" -c 'import sys; print(sys.prefix)'): start vLLM with VLLM_PLUGINS=ouroboros"
fi
"$PYTHON" - <<'PY' ${TARGET:+"$TARGET"}
import sys
sys.path[:0] = sys.argv[1:]
from arctic_inference.suffix_decoding import SuffixDecodingCache  # what vLLM's suffix method imports
print("arctic_inference imports:", SuffixDecodingCache.__module__)
PY
