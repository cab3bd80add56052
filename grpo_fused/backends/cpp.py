"""The C++ extension backend (``grpo_fused._C``): CPU tensors."""

from __future__ import annotations


def availability(device):
    return "the C++ extension is not built yet"
