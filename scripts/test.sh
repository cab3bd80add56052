#!/usr/bin/env bash
# Install grpo-fused with its test extra into ./.venv and run the test suite.
# Works on a fresh machine with Python >= 3.10 and no torch: the CPU build of torch is
# installed first, so that nothing later pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
exec .venv/bin/python -m pytest "$@"
