#!/usr/bin/env bash
# Quick start: install grpo-fused with its bench extra into ./.venv, then measure every
# implementation that can run on this machine and profile peak memory against sequence length.
# Works on a fresh machine with Python >= 3.10 and no torch: torch 2.13.0 is installed only when
# none is importable (a machine with a GPU normally brings its own CUDA build of torch).
# Results: a table on stdout; JSON and a PNG under benchmarks/results/ (render.py turns the newest
# into the README table). Options common to both commands (--device, --providers, --ops, --out-dir,
# --plain) may be given, e.g. `scripts/bench.sh --device cpu --plain`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[bench]"
.venv/bin/grpo-fused bench "$@"
.venv/bin/grpo-fused profile-memory "$@"
