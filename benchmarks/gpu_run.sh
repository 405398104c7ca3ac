#!/usr/bin/env bash
# The one script to run on a GPU machine, from the repo root: builds fastseg with its CUDA kernels, runs the
# CUDA tests and the rest of the test suite, then the loss and metric benchmarks on CUDA, then a short run of
# the main job on CUDA (the trainer's bf16 autocast path). Every log and the results table (<device-name>.md and
# .json, from bench_dice_ce.py) land in $OUT (default: benchmarks/results/gpu).
#
#   bash benchmarks/gpu_run.sh                 # build, test, bench, train
#   bash benchmarks/gpu_run.sh test bench      # stages to run, in order (after an earlier build)
#
# Works offline: pip builds against the installed torch (--no-build-isolation --no-deps). Honours PYTHON,
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: all cores). A failing stage is reported and the
# later stages still run; the exit status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench train)
status=0

# run NAME CMD...: runs CMD, tees its output to $OUT/NAME.log, records a failure.
run() {
  local name=$1
  shift
  echo "== gpu_run $name: $*"
  if ! "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "== gpu_run $name: FAILED"
    status=1
  fi
}

env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  command -v nvcc >/dev/null && nvcc --version | tail -2
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|monai|nnunetv2|pytest|pytest-benchmark|numpy|ninja|setuptools) ' || true
}

build() {
  source scripts/cuda_env.sh
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  "$PY" -m pip install -v --no-build-isolation --no-deps -e . || return 1
  "$PY" -c "import fastseg; info = fastseg.build_info(); print(info); assert info['cuda_kernels'], 'no CUDA kernels'"
}

bench() {
  "$PY" benchmarks/bench_dice_ce.py --device cuda --out "$OUT" || return 1
  # The real masks do not travel with the working tree: carry a copy and point FASTSEG_DATA at it.
  if [ -d "${FASTSEG_DATA:-../shared/data/tcia-han-oar}" ]; then
    "$PY" benchmarks/bench_metrics.py --device cuda --out "$OUT" || return 1
  else
    echo "gpu_run: no head-and-neck masks at ${FASTSEG_DATA:-../shared/data/tcia-han-oar}; metrics benchmark skipped"
  fi
  # The results table, also into this log.
  for f in "$OUT"/*.md; do
    [ -e "$f" ] && { echo "== $f"; cat "$f"; }
  done
}

run env env_report
for stage in "${stages[@]}"; do
  case "$stage" in
    build) run build build ;;
    test)
      run test_cuda "$PY" -m pytest -q -rs tests/test_dice_ce_cuda.py tests/test_edt.py tests/test_surface_metrics.py tests/test_confidence.py -k "cuda or CUDA"
      run test_all "$PY" -m pytest -q tests
      ;;
    bench) run bench bench ;;
    # 300 iterations (the CUDA default is 3000): a check that training, prediction and evaluation run on CUDA
    train) run train "$PY" -m fastseg demo --device cuda --iterations "${FASTSEG_GPU_DEMO_ITERATIONS:-300}" \
             --output "${TMPDIR:-/tmp}/fastseg-gpu-demo" ;;
    *)
      echo "gpu_run: unknown stage '$stage' (build, test, bench, train)"
      status=2
      ;;
  esac
done
echo "== gpu_run: done, status $status; files in $OUT:"
ls -l "$OUT"
exit $status
