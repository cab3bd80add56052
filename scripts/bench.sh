#!/usr/bin/env bash
# Quick start: install grpo-fused with its bench extra into ./.venv, then measure every
# implementation that can run on this machine and profile peak memory against sequence length.
# Works on a fresh machine with Python >= 3.10 and no torch (see venv.sh).
# Results: a table on stdout; JSON and a PNG under benchmarks/results/ (render.py turns the newest
# into the README table). Options common to both commands (--device, --providers, --ops, --out-dir,
# --plain) may be given, e.g. `scripts/bench.sh --device cpu --plain`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh bench
.venv/bin/grpo-fused static-report  # sm_90a compile + SASS report, predicted times (no GPU needed)
.venv/bin/grpo-fused bench "$@"
.venv/bin/grpo-fused profile-memory "$@"
