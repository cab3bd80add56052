"""The Triton backend (``grpo_fused.kernels``): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

Importing this module imports Triton; the dispatcher treats an ImportError as "not available".
Each kernel module's entry points are re-exported below; an op missing here is not implemented.
"""

from __future__ import annotations

import os

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from grpo_fused.kernels.grpo_logits import grpo_loss  # noqa: F401
from grpo_fused.kernels.selective_log_softmax import selective_log_softmax  # noqa: F401
from grpo_fused.kernels.group_advantages import group_advantages  # noqa: F401
from grpo_fused.kernels.linear_grpo import linear_grpo_loss, linear_log_softmax  # noqa: F401


def availability(device):
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"
