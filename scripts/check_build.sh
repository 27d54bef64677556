#!/usr/bin/env bash
# Checks that lrgptq builds for the user's torch (docs: README "Set-up"), with no GPU, no CUDA
# toolkit and no torch download:
#   1. `pip install .` as users type it (build isolation on) stops at once, before anything is
#      compiled or torch is fetched, with a message naming --no-build-isolation. The isolated build
#      environment gets its build requirements (scikit-build-core, pybind11) from a local wheel
#      cache ($LRGPTQ_BUILD_WHEELS, filled from PyPI on the first run) and pip runs with --no-index,
#      so nothing else can be downloaded.
#   2. A CUDA torch without nvcc: torch's own CMake config stops the configure (simulated: a copy of
#      the installed torch's share/cmake with its CUDA switch on, on a machine without a CUDA
#      toolkit), while lrgptq's CMakeLists, given the same torch (torch.version.cuda and the CMake
#      prefix set through a sitecustomize shim), configures the CPU ops with a warning. The CPU
#      ops themselves compile through that same path in every CPU build (scripts/dev_build.sh).
# Takes about a minute on 2 busy cores (one configure); needs PyPI once, for the wheel cache.
# Usage: scripts/check_build.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/pick_python.sh "${1:-}"
WHEELS="${LRGPTQ_BUILD_WHEELS:-$HOME/.cache/lrgptq/build-wheels}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
fail() { echo "check_build: FAIL: $*" >&2; exit 1; }

# --- 1. build isolation -------------------------------------------------------------------------
if ! ls "$WHEELS"/scikit_build_core-*.whl >/dev/null 2>&1 || ! ls "$WHEELS"/pybind11-*.whl >/dev/null 2>&1; then
  echo "check_build: filling $WHEELS with the build requirements (scikit-build-core, pybind11) from PyPI"
  "$PY" -m pip download -q --only-binary :all: --dest "$WHEELS" "scikit-build-core>=0.10" "pybind11>=2.12"
fi
t0=$SECONDS
set +e
"$PY" -m pip wheel --no-index --find-links "$WHEELS" --no-deps --wheel-dir "$OUT/wheel" . >"$OUT/isolated.log" 2>&1
rc=$?
set -e
secs=$((SECONDS - t0))
[ $rc -ne 0 ] || fail "an isolated build succeeded (it should stop and name --no-build-isolation)"
grep -q -- "pip install --no-build-isolation ." "$OUT/isolated.log" || { cat "$OUT/isolated.log"; fail "no message naming --no-build-isolation"; }
if grep -qi -e "Configuring" -e "Building CXX" -e "torch-[0-9]" "$OUT/isolated.log"; then
  cat "$OUT/isolated.log"; fail "the isolated build went past the check (CMake ran or torch was fetched)"
fi
echo "ok   pip install . with build isolation stops in ${secs} s with the message:"
sed -n '/lrgptq: this build cannot import torch/,/no-build-isolation/p' "$OUT/isolated.log" | sed 's/^/       /'

# --- 2. a CUDA torch without nvcc ---------------------------------------------------------------
# A machine without a CUDA toolkit: nvcc's directories off PATH, no CUDACXX/CUDA_HOME/CUDA_PATH, and
# FindCUDA pointed nowhere (it would look in /usr/local/cuda). cmake and ninja from the venv.
unset CUDACXX CUDA_HOME CUDA_PATH
while command -v nvcc >/dev/null 2>&1; do
  nv_dir="$(dirname "$(command -v nvcc)")"
  PATH="$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$nv_dir" | paste -sd: -)"
done
export PATH="$(dirname "$PY"):$PATH"
NO_TOOLKIT=(-DCUDA_TOOLKIT_ROOT_DIR=/nonexistent)
TORCH_DIR="$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))")"
mkdir -p "$OUT/cudatorch/share" "$OUT/probe"
cp -r "$TORCH_DIR/share/cmake" "$OUT/cudatorch/share/"
cfg="$OUT/cudatorch/share/cmake/Caffe2/Caffe2Config.cmake"
# The lines a CUDA build of torch writes into its config (a CPU build writes 0 and an empty flag).
sed -i -e 's/^if(0)$/if(1)/' -e 's/^  if( AND NOT CAFFE2_USE_CUDA)$/  if(ON AND NOT CAFFE2_USE_CUDA)/' "$cfg"
grep -q "if(ON AND NOT CAFFE2_USE_CUDA)" "$cfg" || fail "torch's Caffe2Config.cmake changed shape; update this check"
printf 'cmake_minimum_required(VERSION 3.18)\nproject(probe LANGUAGES CXX)\nfind_package(Torch REQUIRED)\n' \
  >"$OUT/probe/CMakeLists.txt"
if cmake -S "$OUT/probe" -B "$OUT/probe/build" -DCMAKE_PREFIX_PATH="$OUT/cudatorch/share/cmake" "${NO_TOOLKIT[@]}" \
    >"$OUT/probe.log" 2>&1; then
  cat "$OUT/probe.log"; fail "find_package(Torch) of a CUDA torch configured without a CUDA toolkit"
fi
grep -q "uses CUDA but I cannot find the CUDA" "$OUT/probe.log" || { cat "$OUT/probe.log"; fail "unexpected error"; }
echo "ok   find_package(Torch) of a CUDA torch without a CUDA toolkit stops (as torch's config says)"

mkdir -p "$OUT/shim"
# The shim plays that CUDA torch for every Python CMake starts: torch.version.cuda set, and its
# CMake prefix the patched config above (so a find_package(Torch) on the CPU path would stop).
printf 'import torch.utils, torch.version\ntorch.version.cuda = "12.8"\ntorch.utils.cmake_prefix_path = "%s"\n' \
  "$OUT/cudatorch/share/cmake" >"$OUT/shim/sitecustomize.py"
if ! PYTHONPATH="$OUT/shim" cmake -S . -B "$OUT/cfg" -G Ninja -DPython_EXECUTABLE="$PY" "${NO_TOOLKIT[@]}" \
    >"$OUT/cfg.log" 2>&1; then
  cat "$OUT/cfg.log"; fail "lrgptq did not configure for a CUDA torch without nvcc"
fi
grep -q "building the CPU ops only" "$OUT/cfg.log" || { cat "$OUT/cfg.log"; fail "no warning about the CPU-only build"; }
grep -q "lrgptq: CUDA kernels OFF" "$OUT/cfg.log" || { cat "$OUT/cfg.log"; fail "CUDA kernels not OFF"; }
echo "ok   lrgptq configures the CPU ops for that torch, with the warning:"
sed -n '/CUDA build but no CUDA compiler/,/silences this/p' "$OUT/cfg.log" | sed 's/^/       /'
echo "check_build: all checks passed"
