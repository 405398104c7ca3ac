#!/usr/bin/env bash
# Installs fastseg (editable, compiled against the installed torch) and, with --test, the test
# dependencies. Never lets pip replace torch: every install runs under a constraints file pinning the
# torch that is installed (torch==2.13.0 is installed first if there is none; FASTSEG_TORCH overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

if ! $PY -c "import torch" >/dev/null 2>&1; then
  $PIP "torch==${FASTSEG_TORCH:-2.13.0}"
fi
mkdir -p build
$PY -c "import torch; print('torch==' + torch.__version__)" > build/constraints.txt
echo "fastseg install: pinning $(cat build/constraints.txt)"

$PIP -c build/constraints.txt "setuptools>=64" wheel pybind11 ninja "numpy>=1.23"
# fastseg's runtime dependencies (pyproject.toml), installed here because the editable install below uses
# --no-deps: pip must not resolve torch itself.
$PIP -c build/constraints.txt "scipy>=1.10" "nibabel>=5" "pynrrd>=1.0" "PyYAML>=6" "tqdm>=4.60" "matplotlib>=3.7"
if [ "${1:-}" = "--test" ]; then
  $PIP -c build/constraints.txt pytest pytest-benchmark "monai==1.6.1"
  # nnU-Net's loss modules import without its dependencies; its own would pull a new torch.
  $PIP --no-deps "nnunetv2==2.8.1"
  # DeepMind's surface-distance: reference of the metric tests; it needs only numpy and scipy at runtime
  # (its declared absl-py is unused), so nothing else is pulled in.
  $PIP --no-deps "surface-distance==0.1"
fi
$PIP -c build/constraints.txt --no-build-isolation --no-deps -e .
$PY -c "import fastseg; print('fastseg', fastseg.__version__, fastseg.build_info())"
