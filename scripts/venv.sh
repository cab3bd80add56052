# Sourced by test.sh and bench.sh, from the repository root: create ./.venv (Python >= 3.10) and, when
# no torch is importable there, install torch 2.13.0 first, so that nothing later pulls the
# multi-GB CUDA build onto a machine without a GPU (a machine with a GPU normally brings its own
# CUDA build of torch). Then install grpo-fused editable with the extra named in $1.
# pip -qq: errors only (an index that lacks a package prints a warning per package, which would bury
# the test output).
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -qq "torch==2.13.0"
.venv/bin/python -m pip install -qq -e ".[$1]"
# With the test extra, verl 0.9.1 for tests/test_verl_parity.py (grpo-fused's verl adapter against
# verl's own functions): verl without its dependencies (Ray, vLLM, ...), plus the light packages that
# importing verl.trainer.ppo.core_algos needs (tensordict, omegaconf, codetiming, orjson; Ray is
# stood in for inside the test), all without dependencies so that nothing replaces the torch above.
# verl pins tensordict <= 0.10, whose wheels are built against older torch; 0.15.3 is pure Python
# and serves what verl imports.
case ",$1," in *,test,*)
  .venv/bin/python -c "import verl, tensordict, omegaconf, codetiming, orjson" 2>/dev/null ||
    .venv/bin/python -m pip install -qq --no-deps "verl==0.9.1" "tensordict==0.15.3" "pyvers==0.2.3" \
      "cloudpickle>=3" "omegaconf==2.4.0" "PyYAML>=5.1" "codetiming==1.4.0" "orjson==3.13.0"
  ;;
esac
