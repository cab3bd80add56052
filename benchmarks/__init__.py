"""Benchmarks of grpo-fused, installed as ``grpo_fused.benchmarks`` (so ``grpo-fused bench`` runs
from any install).

==============================  ==============================================================
``harness``                     cases, providers, timing and memory measurement, results I/O:
                                what ``grpo-fused bench`` / ``profile-memory`` run
``bench_logits``                logits path at the DESIGN shapes, with its byte floor written out
``bench_advantages``            group advantages, eager vs fused
``bench_cpu``                   the C++ backend against eager on CPU
``profile_linear_memory``       the linear path's peak memory against sequence length
``render``                      the README tables and plot from ``results/``
``suite/``                      the same cases as a pytest-benchmark suite (checkout only)
==============================  ==============================================================
"""
