"""Backend selection: ``backend="auto" | "triton" | "cpp" | "reference"``.

Each backend is a module under ``grpo_fused.backends`` exposing ``availability(device)``
(``None`` when usable, else the reason it is not) and the ops it implements, with the
signatures of :mod:`grpo_fused.backends.reference` (inputs already validated; a loss takes its
``(B, T)`` inputs as one :class:`~grpo_fused.semantics.LossBatch` and its hyperparameters as one
:class:`~grpo_fused.semantics.LossParams`). An op a backend does not implement is absent from
its module.

``auto`` picks Triton for CUDA tensors and the C++ extension for CPU tensors; when that
backend is not built (or lacks the op) it falls back to the reference with a one-time
warning. Naming a backend explicitly never falls back: it raises instead.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")
# The linear path's strategies: "chunked" (GEMMs on token chunks), "tiled" (logit tiles on chip,
# Triton only), "auto" (the backend's choice). Every backend and entry point reads this tuple.
LINEAR_STRATEGIES = ("auto", "chunked", "tiled")
_warned = set()
_chosen = {}  # (op, backend, device type) -> backend name
_loaded = {}  # backend name -> module


def _module(name: str):
    return importlib.import_module(f"grpo_fused.backends.{name}")


def _unavailable_reason(name: str, op: str, device: torch.device):
    try:
        module = _module(name)
    except ImportError as exc:  # a backend whose dependencies are missing
        return f"it could not be imported ({exc})"
    reason = module.availability(device)
    if reason is None and not hasattr(module, op):
        reason = f"it does not implement {op} yet"
    return reason


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    chosen = _choose(op, backend, device.type)
    return getattr(_loaded[chosen], op)


def _trace_constant(fn):
    # What torch.compiler.assume_constant_result does (torch 2.5 to 2.13), without importing
    # torch._dynamo at package import (2.5 s); tests/test_dispatch.py compiles through it.
    fn._dynamo_marked_constant = True
    return fn


# The choice is a pure function of (op, backend, device type). torch.compile takes it as a
# constant computed once at trace time: tracing the imports, the build and the warning would
# break the graph. It leaves the chosen module in _loaded, where the trace then reads it.
@_trace_constant
def _choose(op: str, backend: str, device_type: str) -> str:
    key = (op, backend, device_type)
    if key not in _chosen:
        _chosen[key] = _resolve(op, backend, torch.device(device_type))
    _loaded.setdefault(_chosen[key], _module(_chosen[key]))
    return _chosen[key]


def _resolve(op: str, backend: str, device: torch.device) -> str:
    if backend == "reference":
        return "reference"
    if backend != "auto":
        reason = _unavailable_reason(backend, op, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run {op} on {device.type} tensors: {reason}")
        return backend
    preferred = "triton" if device.type == "cuda" else "cpp"
    reason = _unavailable_reason(preferred, op, device)
    if reason is None:
        return preferred
    # One warning per backend and device type, not per op: a failed build is one event.
    key = (preferred, device.type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"grpo_fused: the {preferred} backend cannot run {op} on {device.type} tensors ({reason}); "
            "using the eager reference instead (warned once).",
            RuntimeWarning,
            stacklevel=5,
        )
    return "reference"
