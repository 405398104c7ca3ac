#!/usr/bin/env bash
# Builds the whole CUDA extension (the .cu kernels and the ATen .cpp wrappers) against a CUDA build of torch
# in a throwaway venv, then runs the test suite there on the CPU. check_cuda.sh compiles the .cu files alone;
# this is the only place without a GPU where the wrappers and setup.py's CUDA branch are compiled (it caught
# x_cuda.cpp and x_cuda.cu both compiling to x_cuda.o, which breaks every CUDA build).
#
#   bash scripts/check_cuda_build.sh            # torch 2.11.0, the GPU machines' version
#   TORCH_SPEC=torch==2.12.0 bash scripts/check_cuda_build.sh
#
# Skipped, with a note and exit status 0, where nvcc is absent or the CUDA torch wheel cannot be installed
# (it is several GB); a compile error or a failing test is exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
data=${FASTSEG_DATA:-$(cd .. && pwd)/shared/data/tcia-han-oar}  # the tests run in a copy of the tree
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "check_cuda_build: nvcc not found, CUDA extension not built"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
${PYTHON:-python3} -m venv "$work/venv"
py="$work/venv/bin/python"
if ! "$py" -m pip install -q "$TORCH_SPEC" setuptools wheel ninja numpy scipy nibabel pynrrd PyYAML tqdm \
    matplotlib pytest > "$work/pip.log" 2>&1; then
  tail -5 "$work/pip.log"
  echo "check_cuda_build: could not install $TORCH_SPEC (a CUDA build), CUDA extension not built"
  exit 0
fi
PY=$py source scripts/cuda_env.sh

# a copy of the tree, so the build does not replace the CPU extension of an editable install here
mkdir "$work/src"
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$work/src"
(cd "$work/src" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
  "$py" -m pip install -q --no-build-isolation --no-deps -e . > "$work/build.log" 2>&1) || {
  grep -E -i "error" "$work/build.log" | head -40
  echo "check_cuda_build: FAILED to build the CUDA extension against $TORCH_SPEC"
  exit 1
}
(cd "$work/src" && "$py" -c "
import fastseg
info = fastseg.build_info()
print('check_cuda_build:', info)
assert info['cuda_kernels'], 'built without CUDA kernels'
" && FASTSEG_DATA=$data "$py" -m pytest -q -p no:cacheprovider tests) || {
  echo "check_cuda_build: the CUDA build against $TORCH_SPEC fails its import check or tests"
  exit 1
}
echo "check_cuda_build: CUDA extension built against $TORCH_SPEC ($("$NVCC" --version | tail -1)) and tested on the CPU"
