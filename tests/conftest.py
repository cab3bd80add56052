"""Test configuration shared by every test file.

On a machine without a CUDA GPU the Triton kernels run under Triton's interpreter on CPU
tensors; the variable must be set before Triton is first imported, hence here.

Nothing here needs the network (the models are built from configs, the tokenizers in memory), and
the Hugging Face libraries must not reach for it either: their telemetry and hub lookups would
wait on DNS on a machine without a network. The variables are read at import, hence here too.
"""

import os

for _var in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import faulthandler  # noqa: E402
import sys  # noqa: E402

# Collection imports TRL, transformers and verl and builds the C++ extension (fused_backends below):
# pytest-timeout does not cover it, so a collection that hangs prints every thread's stack and ends
# the run after 20 minutes instead of stalling it. pytest_collection_finish cancels this.
faulthandler.dump_traceback_later(20 * 60, exit=True, file=sys.stderr)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_finish(session):
    faulthandler.cancel_dump_traceback_later()


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_backends(op: str):
    """``pytest.param``s of the fused backends that implement ``op`` on CPU tensors, each skipped
    with the dispatcher's reason when it cannot run here."""
    from grpo_fused import _dispatch

    params = []
    for name in ("cpp", "triton"):
        reason = _dispatch._unavailable_reason(name, op, torch.device("cpu"))
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")))
    return params


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny models: ops on a hidden size of 32 are far too
    small to split, and on a shared 2-core machine extra threads only spin (measured: 0.07 s per
    32x32 matmul with threads, ~1e-5 s without)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
