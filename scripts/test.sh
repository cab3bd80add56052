#!/usr/bin/env bash
# Install grpo-fused with its test extra into ./.venv and run the test suite.
# Works on a fresh machine with Python >= 3.10 and no torch (see venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh test
exec .venv/bin/python -m pytest "$@"
