#!/usr/bin/env bash
# Interop check (issue 12): do the ecosystem's GPTQ readers load lrgptq's checkpoints, and do they
# compute what lrgptq.load computes?  From nothing:
#   1. with lrgptq's own environment, quantize the packaged SmolLM2-135M quickly (RTN: this is about
#      the file format) and save one checkpoint per case (bench/interop_save.py), with lrgptq.load's
#      float32 logits on a fixed token batch beside each;
#   2. build (once, then reused) a separate venv with torch 2.14.1, GPTQModel and optimum, which
#      need a newer torch than lrgptq's;
#   3. load every checkpoint with every reader there and compare logits (bench/interop_load.py);
#   4. print the table checkpoint x reader -> loads? / max |Δlogit| / error.
#
# Usage: bash bench/interop.sh [--python PY] [--venv DIR] [--out DIR] [--venv-only]
#   --python   the interpreter that has lrgptq's dependencies (default .venv/bin/python); lrgptq
#              itself is taken from ./python (PYTHONPATH), so build the core first
#              (scripts/dev_build.sh) or install the package
#   --venv     where the readers' venv lives (default /work/interop-venv); built when missing
#   --out      where checkpoints, logits and the table go (default /tmp/lrgptq-interop)
#   --venv-only  build the readers' venv and stop
# The readers' venv is ~6 GB (torch 2.14.1 is a CUDA build; it runs on the CPU here).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="$repo/.venv/bin/python"
venv="/work/interop-venv"
out="/tmp/lrgptq-interop"
venv_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) py="$2"; shift 2 ;;
        --venv) venv="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --venv-only) venv_only=1; shift ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "interop.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# The readers' versions: the ones issue 12 was checked with.
TORCH_VERSION="2.14.1"
GPTQMODEL_VERSION="7.7.0"
OPTIMUM_VERSION="2.3.0"
TRANSFORMERS_VERSION="5.24.0"

build_venv() {
    if [ -x "$venv/bin/python" ] && [ -f "$venv/.lrgptq-interop-ok" ]; then
        echo "== readers' venv: $venv (reused)"
        return
    fi
    echo "== readers' venv: building $venv (torch $TORCH_VERSION, gptqmodel $GPTQMODEL_VERSION," \
         "optimum $OPTIMUM_VERSION, transformers $TRANSFORMERS_VERSION; ~6 GB, I/O heavy)"
    local base
    base="$("$py" -c 'import sys; print(sys._base_executable)')"
    rm -rf "$venv"
    "$base" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch first, pinned, so that no requirement of the others pulls another build.
    "$venv/bin/python" -m pip install "torch==$TORCH_VERSION"
    # GPTQModel 7.7.0 is pure Python (its kernels are compiled on first use, and only on CUDA),
    # so it needs no build flags to install on a machine without CUDA.
    "$venv/bin/python" -m pip install "torch==$TORCH_VERSION" "gptqmodel==$GPTQMODEL_VERSION" \
        "optimum==$OPTIMUM_VERSION" "transformers==$TRANSFORMERS_VERSION"
    "$venv/bin/python" -m pip freeze > "$venv/lrgptq-interop-freeze.txt"
    touch "$venv/.lrgptq-interop-ok"
}

build_venv
if [ "$venv_only" = 1 ]; then
    exit 0
fi

# 1. Checkpoints and lrgptq's reference logits, with lrgptq's own environment.
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "interop.sh: $out is not empty; pass --out NEW_DIR (or remove it)" >&2
    exit 2
fi
echo "== saving checkpoints with $py into $out"
PYTHONPATH="$repo/python${PYTHONPATH:+:$PYTHONPATH}" "$py" "$here/interop_save.py" --out "$out"

# 2.-4. Every reader on every checkpoint, in the readers' venv (without lrgptq on its path).
# TORCH_COMPILE_DISABLE: GPTQModel's torch kernel would otherwise compile for minutes on a CPU.
echo "== loading with the readers ($venv)"
env -u PYTHONPATH TORCH_COMPILE_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$venv/bin/python" "$here/interop_load.py" --out "$out" | tee "$out/table.md"
