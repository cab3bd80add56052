"""The eager PyTorch backend: the spec itself (:mod:`grpo_fused.reference`)."""

from __future__ import annotations

from .. import reference as _ref
from ..reference import group_advantages, selective_log_softmax

__all__ = ["availability", "grpo_loss", "linear_grpo_loss", "selective_log_softmax", "linear_log_softmax", "group_advantages"]


def availability(device):
    return None


def linear_grpo_loss(*args, strategy="auto", **kwargs):
    # The reference always materializes the logits; ``strategy`` picks among fused kernels only.
    _no_fused_options(kwargs)
    return _ref.linear_grpo_loss(*args, **kwargs)


def linear_log_softmax(*args, strategy="auto", **kwargs):
    _no_fused_options(kwargs)
    return _ref.linear_log_softmax(*args, **kwargs)


def _no_fused_options(kwargs):
    for name in ("chunk_size", "filter_eps"):
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"{name} tunes a fused backend; the reference materializes the logits whole")


def grpo_loss(*args, inplace_backward=False, **kwargs):
    if inplace_backward:
        raise ValueError("inplace_backward=True needs a fused backend (triton or cpp); the reference "
                         "materializes its own fp32 logits")
    return _ref.grpo_loss(*args, **kwargs)
