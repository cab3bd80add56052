"""pytest-benchmark suite over the cases of ``grpo-fused bench``; never part of the test run.

Run it with one command from the repository root (the test run's ``testpaths`` is ``tests``, so a
plain ``pytest`` never collects this folder)::

    python -m pytest benchmarks/suite --benchmark-only [--benchmark-json out.json]

Shapes are those of ``grpo_fused.benchmarks.harness.default_cases``: DESIGN.md's reference shapes on a
GPU, small fp32 shapes on CPU. Providers that cannot run here are skipped with their reason.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    # Interpreter timings mean nothing; the harness skips Triton on CPU tensors anyway.
    del os.environ["TRITON_INTERPRET"]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_device():
    return DEVICE
