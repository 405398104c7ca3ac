#!/usr/bin/env bash
# Quick-start command one: install fastseg and run the main job. Until the reference trainer exists, the
# main job is the loss benchmark against MONAI and nnU-Net; it prints its table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
${PYTHON:-python3} benchmarks/bench_dice_ce.py --quick "$@"
