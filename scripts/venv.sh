# Sourced by test.sh and bench.sh, from the repository root: create ./.venv (Python >= 3.10) and, when
# no torch is importable there, install torch 2.13.0 first, so that nothing later pulls the
# multi-GB CUDA build onto a machine without a GPU (a machine with a GPU normally brings its own
# CUDA build of torch). Then install grpo-fused editable with the extra named in $1.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$1]"
