#!/usr/bin/env bash
# Quick-start command two: install with the test dependencies, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
bash scripts/check_cuda.sh
${PYTHON:-python3} -m pytest -q tests "$@"
