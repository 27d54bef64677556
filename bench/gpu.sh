#!/usr/bin/env bash
# The whole GPU check in one call, on a machine with a CUDA GPU, nvcc and a CUDA build of torch,
# with no network (the device image of .library/device/KINDS.md: torch 2.11 cu130, nvcc 13.0):
#   1. builds the extension with the CUDA kernels against the machine's torch and installs it into
#      that Python's environment (pip install --no-build-isolation --no-deps --no-index: never
#      fetches; meant for the lent machine, which starts fresh: elsewhere use a venv's python);
#   2. runs the CUDA tests (tests/test_cuda.py) and the whole suite;
#   3. runs compute-sanitizer memcheck, racecheck and initcheck on every kernel (bench/gpu_sanitize.py);
#   4. runs the GPU benchmarks (bench/gpu_bench.py) and prints one table: steps, then figures.
# Logs go to $OUT (the device tool's output folder) or /tmp/lrgptq-gpu.
#
#   bash bench/gpu.sh                 # everything (estimated 10+ minutes on an H100: never timed)
#   bash bench/gpu.sh --quick         # small benchmark shapes
#   bash bench/gpu.sh --no-sanitize   # skip compute-sanitizer
#   bash bench/gpu.sh --no-bench      # build, tests and sanitizers only
#   PYTHON=/path/to/python3 bash bench/gpu.sh
# Under the device tool's 10-minute limit per command, split it: `--no-bench` in one call, then
# `python3 bench/gpu_bench.py` in the next while the machine is warm (the install persists).
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK="" SANITIZE=1 BENCH=1
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=--quick ;;
    --no-sanitize) SANITIZE=0 ;;
    --no-bench) BENCH=0 ;;
    *) echo "gpu.sh: unknown option $arg (use --quick, --no-sanitize, --no-bench)" >&2; exit 2 ;;
  esac
done
LOG="${OUT:-/tmp/lrgptq-gpu}"
mkdir -p "$LOG"
if [ -z "${PYTHON:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then PYTHON=/opt/torch/.venv/bin/python3; else PYTHON="$(command -v python3)"; fi
fi
export PATH="/usr/local/cuda/bin:$PATH" OMP_WAIT_POLICY=PASSIVE
SUMMARY=()

step() {  # step NAME CMD...: runs CMD with its output in $LOG/NAME.log; records ok/FAIL and seconds
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOG/$name.log"
  SUMMARY+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAIL (rc $rc)") | $((SECONDS - t0)) s |")
  return $rc
}

build() {
  CMAKE_ARGS="-DLRGPTQ_CUDA=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v . || return 1
  (cd /tmp && "$PYTHON" -c "import torch, lrgptq
assert torch.cuda.is_available(), 'torch sees no GPU'
for op in ('gptq_quantize', 'qmatmul', 'sketch_update', 'factor'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('lrgptq::' + op, 'CUDA'), op + ': no CUDA kernel'
print('built with CUDA kernels for', torch.cuda.get_device_name(), 'torch', torch.__version__)")
}

sanitize() {  # compute-sanitizer TOOL: the caching allocator off, so out-of-bounds accesses are seen
  local tool="$1"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$PYTHON" bench/gpu_sanitize.py
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$LOG/device.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOG/device.txt"
nvcc --version | tail -1 | tee -a "$LOG/device.txt"

if step build build; then
  step cuda_tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step all_tests "$PYTHON" -m pytest -q -p no:cacheprovider -x tests
  if [ "$SANITIZE" = 0 ]; then
    SUMMARY+=("| sanitizers | skipped (--no-sanitize) | |")
  elif command -v compute-sanitizer >/dev/null 2>&1; then
    step memcheck sanitize memcheck
    step racecheck sanitize racecheck
    step initcheck sanitize initcheck
  else
    SUMMARY+=("| sanitizers | not run: compute-sanitizer is not on PATH | |")
  fi
  if [ "$BENCH" = 1 ]; then step bench "$PYTHON" bench/gpu_bench.py $QUICK; fi
fi

echo
echo "## lrgptq GPU check, $(date -u +%F), $(head -1 "$LOG/device.txt")"
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
echo
[ -f "$LOG/bench.log" ] && grep -E '^(\||#)' "$LOG/bench.log"
grep -q FAIL <(printf '%s\n' "${SUMMARY[@]}") && exit 1
exit 0
