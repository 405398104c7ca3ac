#!/usr/bin/env bash
# Compiles every CUDA kernel file with plain nvcc (they include no torch header) for sm_80 and sm_90, so
# a CPU-only machine still catches CUDA compile errors. Skipped, with a note, where nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "check_cuda: nvcc not found, CUDA kernels not compiled"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
for f in csrc/*/*.cu; do
  [ -e "$f" ] || continue
  "$NVCC" -c "$f" -o "$out/$(basename "$f").o" -std=c++17 -O2 -Icsrc --expt-relaxed-constexpr \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  n=$((n + 1))
done
echo "check_cuda: $n CUDA file(s) compiled with $("$NVCC" --version | tail -1) for sm_80 and sm_90"
