"""The linear log-softmax op: per-token ``logp`` and entropy of ``hidden @ weight.T + bias`` with
the ``(N, V)`` logits never whole in memory, by one of two strategies.

* :class:`~grpo_fused.kernels.linear_chunked.Chunked`: cuBLAS GEMMs on token chunks (vocab slices
  in the weight's backward pass) plus the row kernels of the logits path; transient memory one
  chunk of logits.
* :class:`~grpo_fused.kernels.linear_tiled.Tiled`: logit tiles built on chip by ``tl.dot`` with an
  online logsumexp (Cut Cross-Entropy style); transient memory O(N) plus the weight gradient.

A strategy is a small frozen object with ``forward(hidden, weight, bias, ids, params,
compute_entropy) -> (logps, lse, entropy)`` and ``backward(..., lse, entropy, dlogps, dentropy,
needs) -> (dhidden, dweight, dbias)``; the autograd Function and the entry point below are the
same for both. A strategy that can apply a sampling support (chunked: each chunk's logits are
whole rows) also has ``forward_on_support(..., compute_entropy, support) -> (logps, lse, entropy,
cutoff)`` and takes the cutoff back in ``backward(..., cutoff=cutoff)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

from .common import acc_dtype
from .linear_chunked import Chunked
from .sampling_support import Cutoff, SupportRule

Tensor = torch.Tensor

__all__ = ["LinearLogSoftmax", "linear_log_softmax"]


@dataclasses.dataclass(frozen=True)
class _Saved:
    strategy: object
    out_dtype: torch.dtype


class LinearLogSoftmax(torch.autograd.Function):
    """``(hidden (N, H), weight (V, H), bias, ids (N,), params) -> (logps (N,), entropy (N,) or None)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, params, compute_entropy, strategy, support=None):
        cutoff = None
        if support is None:
            logps, lse, entropy = strategy.forward(hidden, weight, bias, ids, params, compute_entropy)
        else:
            logps, lse, entropy, cutoff = strategy.forward_on_support(hidden, weight, bias, ids, params,
                                                                      compute_entropy, support)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, ids, params, lse, entropy,
                              *(cutoff or (None,) * len(Cutoff._fields)))
        ctx.saved = _Saved(strategy, acc_dtype(hidden.dtype))
        out_dtype = ctx.saved.out_dtype
        return logps.to(out_dtype), None if entropy is None else entropy.to(out_dtype)

    @staticmethod
    def backward(ctx, dlogps, dentropy):
        hidden, weight, bias, ids, params, lse, entropy, *cutoff = ctx.saved_tensors
        grads = (None, None, None)
        if dlogps is not None or dentropy is not None:
            needs = tuple(ctx.needs_input_grad[:3])
            if cutoff[0] is None:
                grads = ctx.saved.strategy.backward(hidden, weight, bias, ids, params, lse, entropy, dlogps, dentropy,
                                                    needs)
            else:
                grads = ctx.saved.strategy.backward(hidden, weight, bias, ids, params, lse, entropy, dlogps, dentropy,
                                                    needs, cutoff=Cutoff(*cutoff))
        return grads + (None, None, None, None, None)


def linear_log_softmax(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    params: Tensor,
    bias: Optional[Tensor] = None,
    compute_entropy: bool = False,
    strategy=None,
    support: Optional[SupportRule] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-token log-prob (and entropy) of ``hidden @ weight.T + bias``.

    Args:
        hidden: ``(..., H)`` fp32 / bf16 / fp16 / fp64. weight: ``(V, H)``. bias: ``(V,)`` or None.
        ids: ``(...)`` integer in ``[0, V)``.
        params: ``(NUM_SLOTS,)`` float64 hyperparameters on the device (the temperature).
        compute_entropy: also return the entropy (default False).
        strategy: a :class:`~grpo_fused.kernels.linear_chunked.Chunked` (default) or
            :class:`~grpo_fused.kernels.linear_tiled.Tiled`.
        support: None (default: the full softmax), or a sampling rule's compile-time part
            (:class:`~grpo_fused.kernels.sampling_support.SupportRule`, numbers in ``params``):
            the truncated distribution, as :func:`~grpo_fused.kernels.selective_log_softmax.selective_log_softmax`.
            Chunked only (``ValueError`` for a strategy that never holds a whole row).

    Returns:
        ``(logps, entropy_or_None)`` of shape ``(...)``, fp32 (fp64 for fp64 hidden),
        differentiable with respect to hidden, weight and bias.
    """
    lead = hidden.shape[:-1]
    n = math.prod(lead)  # not reshape(-1, H): with H = 0 the -1 would be ambiguous
    strategy = strategy if strategy is not None else Chunked()
    if support is not None and not hasattr(strategy, "forward_on_support"):
        raise ValueError(f"strategy {type(strategy).__name__} cannot apply a sampling rule (it never holds a whole "
                         "row of logits): use Chunked")
    logps, entropy = LinearLogSoftmax.apply(
        hidden.reshape(n, hidden.shape[-1]), weight, bias, ids.reshape(n), params, bool(compute_entropy), strategy,
        support,
    )
    return logps.view(lead), None if entropy is None else entropy.view(lead)
