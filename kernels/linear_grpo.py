"""The fused linear path: GRPO-family loss and log-softmax straight from hidden states.

``linear_log_softmax`` runs one of two strategies (see :mod:`.linear_chunked` and
:mod:`.linear_tiled`) to get the per-token ``(logps, entropy)`` without the ``(N, V)``
logits ever existing in full; ``linear_grpo_loss`` puts
:func:`grpo_fused.reference.grpo_output_from_logps` on top of them. That part is O(B*T)
work on ``(B, T)`` tensors, so every surrogate, importance-sampling level (sequence-level
GSPO / GMPO included), KL estimator, entropy bonus and metric of the reference comes for
free, with the same numbers, and autograd carries its gradient into the vocab pass.

Both functions have the signatures of their reference namesakes plus ``strategy``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from grpo_fused.config import GRPOConfig
from grpo_fused.reference import GRPOOutput, compute_dtype, grpo_output_from_logps

from .linear_chunked import linear_log_softmax_chunked
from .linear_tiled import linear_log_softmax_tiled

Tensor = torch.Tensor

STRATEGIES = ("auto", "chunked", "tiled")


def resolve_strategy(strategy: str) -> str:
    """``auto`` -> ``chunked``: its GEMMs run at cuBLAS speed, its transient is one chunk of
    logits (about the size of the hidden states), and it computes fp64 inputs in fp64.
    ``tiled`` trades GEMM speed for O(N) memory beyond the weight gradient."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return "chunked" if strategy == "auto" else strategy


def linear_log_softmax(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    compute_entropy: bool = False,
    strategy: str = "auto",
    *,
    filter_eps: Optional[float] = None,
    chunk_size: Optional[int] = None,
    vocab_slice: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-token ``log softmax((hidden @ weight.T + bias) / temperature)[id]`` and entropy.

    Args:
        hidden: ``(..., H)`` fp32 / bf16 / fp16 / fp64. weight: ``(V, H)``. bias: ``(V,)`` or None.
        ids: ``(...)`` integer in ``[0, V)``. temperature: > 0 (default 1.0).
        compute_entropy: also return the per-token entropy (default False).
        strategy: ``"auto"`` (default, = ``"chunked"``), ``"chunked"`` or ``"tiled"``.
        filter_eps: tiled only: gradient filtering threshold (approximate); None = off.
        chunk_size / vocab_slice: chunked only: tokens per chunk, vocab columns per slice of the
            backward's weight pass; None picks them from the shapes.

    Returns:
        ``(logps, entropy_or_None)``, shape ``(...)``, fp32 (fp64 for fp64 hidden), with
        gradients for hidden, weight and bias.
    """
    if resolve_strategy(strategy) == "tiled":
        return linear_log_softmax_tiled(hidden, weight, ids, temperature, bias, compute_entropy, filter_eps)
    return linear_log_softmax_chunked(hidden, weight, ids, temperature, bias, compute_entropy, chunk_size, vocab_slice)


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    config: GRPOConfig = GRPOConfig(),
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
    strategy: str = "auto",
    *,
    filter_eps: Optional[float] = None,
    chunk_size: Optional[int] = None,
    vocab_slice: Optional[int] = None,
) -> GRPOOutput:
    """GRPO-family loss of ``logits = hidden @ weight.T + bias`` without materializing them.

    Args:
        hidden: ``(B, T, H)``. weight: ``(V, H)``. bias: ``(V,)`` or None.
        completion_ids, advantages, completion_mask, old_logps, ref_logps, config, is_weights,
        num_items_in_batch, global_batch_size: as :func:`grpo_fused.reference.grpo_loss`.
        strategy, filter_eps, chunk_size, vocab_slice: as :func:`linear_log_softmax`.

    Returns:
        :class:`GRPOOutput` equal to :func:`grpo_fused.reference.linear_grpo_loss`'s (same
        loss, logps, entropy and metrics); the loss backpropagates into hidden, weight, bias.
    """
    dtype = compute_dtype(hidden.dtype)
    logps, entropy = linear_log_softmax(
        hidden, weight, completion_ids, config.temperature, bias, config.compute_entropy, strategy,
        filter_eps=filter_eps, chunk_size=chunk_size, vocab_slice=vocab_slice,
    )
    return grpo_output_from_logps(
        logps.to(dtype), None if entropy is None else entropy.to(dtype), completion_ids, advantages,
        completion_mask, old_logps, ref_logps, config, is_weights, num_items_in_batch, global_batch_size,
    )
