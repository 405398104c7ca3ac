#!/usr/bin/env bash
# Quick-start command one: install fastseg, then run the main job — phantom head-and-neck data, class adaptive
# DiceCE training of the reference 3D U-Net, sliding-window prediction of the held-out cases, and the per-organ
# Dice / HD95 table (about ten minutes on 2 CPU cores; longer training on CUDA). Extra arguments go to
# `fastseg demo` (e.g. --iterations 200 --output runs/x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
${PYTHON:-python3} -m fastseg demo "$@"
