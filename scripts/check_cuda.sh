#!/usr/bin/env bash
# Compile-only check of every CUDA source (csrc/cuda/*.cu) for sm_80 and sm_90, with no GPU and no
# CUDA build of torch: nvcc compiles each file against the installed torch's headers (CPU wheels
# ship ATen's and c10's CUDA headers too). The .cu files include only c10/cuda headers and the
# CUDA runtime, never ATen/cuda/CUDAContext.h (which needs the cuBLAS/cuSOLVER/cuSPARSE headers):
# cuBLAS and cuSOLVER are reached through ATen ops (at::addmm_, at::linalg_*).
# A file that does not compile fails this script (and CI). Nothing is linked or run.
#
# nvcc: $NVCC, else nvcc on PATH, else /usr/local/cuda/bin/nvcc, else the pip package
# nvidia-cuda-nvcc (cu13) installed into a cache dir ($LRGPTQ_CUDA_CACHE, default ~/.cache/lrgptq/cuda).
# Usage: scripts/check_cuda.sh [python [file.cu ...]]
#   python: the one whose torch supplies the headers (default python); files: default csrc/cuda/*.cu
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python}"
shift || true
CACHE="${LRGPTQ_CUDA_CACHE:-$HOME/.cache/lrgptq/cuda}"

find_nvcc() {
  if [ -n "${NVCC:-}" ]; then echo "$NVCC"; return; fi
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda/bin/nvcc; return; fi
  local pipnvcc="$CACHE/pip/nvidia/cu13/bin/nvcc"
  if [ ! -x "$pipnvcc" ]; then
    echo "check_cuda: no nvcc found; installing nvidia-cuda-nvcc (cu13) into $CACHE/pip" >&2
    "$PY" -m pip install -q --no-deps --target "$CACHE/pip" \
      "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*" >&2
  fi
  echo "$pipnvcc"
}

NVCC_BIN="$(find_nvcc)"
mapfile -t TORCH_INC < <("$PY" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")
ABI="$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
PY_INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# The one header a CUDA torch generates at its build time and a CPU wheel lacks: the same content
# as torch's c10/cuda/impl/cuda_cmake_macros.h.in for a shared-library build.
mkdir -p "$OUT/shim/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/shim/c10/cuda/impl/cuda_cmake_macros.h"

FLAGS=(-c -std=c++17 -O3 --expt-relaxed-constexpr --fmad=false -Xcompiler -fPIC -Werror all-warnings
       -DLRGPTQ_WITH_CUDA "-D_GLIBCXX_USE_CXX11_ABI=$ABI"
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
       -Icsrc "-I$PY_INC" "-I$OUT/shim")
for inc in "${TORCH_INC[@]}"; do FLAGS+=("-isystem" "$inc"); done

"$NVCC_BIN" --version | tail -1
shopt -s nullglob
if [ $# -gt 0 ]; then files=("$@"); else files=(csrc/cuda/*.cu); fi
if [ ${#files[@]} -eq 0 ]; then echo "check_cuda: no CUDA sources"; exit 0; fi
# Two at a time (CI has 2 cores); each job's log is printed, and any failure fails the script.
pids=(); names=()
for f in "${files[@]}"; do
  base="$(basename "$f" .cu)"
  ( "$NVCC_BIN" "${FLAGS[@]}" "$f" -o "$OUT/$base.o" >"$OUT/$base.log" 2>&1 ) &
  pids+=($!); names+=("$f")
  if [ ${#pids[@]} -ge "${LRGPTQ_CUDA_JOBS:-2}" ]; then
    wait "${pids[0]}" && echo "ok   ${names[0]}" || { cat "$OUT/$(basename "${names[0]}" .cu).log"; echo "FAIL ${names[0]}"; touch "$OUT/failed"; }
    pids=("${pids[@]:1}"); names=("${names[@]:1}")
  fi
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" && echo "ok   ${names[$i]}" || { cat "$OUT/$(basename "${names[$i]}" .cu).log"; echo "FAIL ${names[$i]}"; touch "$OUT/failed"; }
done
if [ -e "$OUT/failed" ]; then echo "check_cuda: some CUDA sources do not compile" >&2; exit 1; fi
echo "check_cuda: all ${#files[@]} CUDA sources compile for sm_80 and sm_90"

# The host code's CUDA branches (#ifdef LRGPTQ_WITH_CUDA in csrc/*.cpp: dispatch to the kernels,
# TORCH_LIBRARY_IMPL(lrgptq, CUDA, ...)) are compiled only in a CUDA build: check their syntax too.
CXX_FLAGS=(-fsyntax-only -std=c++17 -Wall -Werror -Wno-unused-function -fopenmp -DLRGPTQ_WITH_CUDA
           "-D_GLIBCXX_USE_CXX11_ABI=$ABI" -Icsrc "-I$PY_INC")
for inc in "${TORCH_INC[@]}"; do CXX_FLAGS+=("-isystem" "$inc"); done
mapfile -t hosts < <(grep -l LRGPTQ_WITH_CUDA csrc/*.cpp)
for f in "${hosts[@]}"; do
  "${CXX:-c++}" "${CXX_FLAGS[@]}" "$f" || { echo "FAIL $f (with LRGPTQ_WITH_CUDA)"; exit 1; }
done
echo "check_cuda: the CUDA branches of ${#hosts[@]} host sources compile"
