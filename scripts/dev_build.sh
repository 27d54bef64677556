#!/usr/bin/env bash
# A development build in this checkout, without reinstalling: compiles the C++ core into
# build/dev with the given Python's torch and links it into python/lrgptq, so that
# `PYTHONPATH=python $PY -m pytest -q tests` runs this checkout's code (Python and C++).
# Usage: scripts/dev_build.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pick_python.sh "${1:-}"
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PY" \
  -DLRGPTQ_CUDA="${LRGPTQ_CUDA:-OFF}" >/dev/null
cmake --build build/dev
so="$(ls build/dev/_C*.so)"
ln -sf "$(pwd)/$so" "python/lrgptq/$(basename "$so")"
echo "built $so -> python/lrgptq/$(basename "$so")"
