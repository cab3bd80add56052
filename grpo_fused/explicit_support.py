"""Log-softmax over an explicit support: the kept ids of each position, given as CSR rows.

For samplers whose truncation is not :class:`~grpo_fused.semantics.SamplingRule` (a grammar, a
typical-p sampler, a vocabulary shard), the caller lists the ids the sampler could draw at each
position (:class:`~grpo_fused.semantics.ExplicitSupport`). The softmax then runs over those
``nnz`` logits only: no vocabulary pass at all, so one implementation (gathers and segmented
reductions) serves every device and backend. From hidden states, the kept logits are
``hidden[n] . weight[id] + bias[id]``, computed and differentiated in chunks of kept ids so that
no ``(nnz, H)`` block of weight rows is kept for backward.

Semantics are those of the truncated path: ``logp = z[id] - logsumexp(z[kept])`` for an id in the
support, ``-inf`` for one outside it, entropy of the renormalized kept distribution, gradient
only into kept logits; a position with an empty support scores every id ``-inf``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .semantics import ExplicitSupport, compute_dtype

Tensor = torch.Tensor

__all__ = ["linear_log_softmax_on_support", "log_softmax_on_support"]

# Kept ids per chunk of the hidden-state path: bounds the gathered (chunk, H) weight rows.
_LINEAR_CHUNK = 8192


def log_softmax_on_support(logits: Tensor, ids: Tensor, support: ExplicitSupport, temperature: float,
                           compute_entropy: bool, mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """``(logps, entropy)`` of ``softmax(logits / temperature)`` restricted to ``support``, ``(...)`` each."""
    rows = logits.reshape(-1, logits.shape[-1])
    row_of, kept = _rows_and_ids(support, rows.shape[0])
    z_kept = rows[row_of, kept].to(compute_dtype(logits.dtype)) / temperature
    return _softmax_on_rows(z_kept, row_of, kept, ids, compute_entropy, mask)


def linear_log_softmax_on_support(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
                                  support: ExplicitSupport, temperature: float, compute_entropy: bool,
                                  mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`log_softmax_on_support` of ``hidden @ weight.T + bias`` (hidden ``(..., H)``, weight ``(V, H)``)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    row_of, kept = _rows_and_ids(support, rows.shape[0])
    z_kept = _KeptLogits.apply(rows, weight, bias, row_of, kept) / temperature
    return _softmax_on_rows(z_kept, row_of, kept, ids, compute_entropy, mask)


def _rows_and_ids(support: ExplicitSupport, num_rows: int) -> Tuple[Tensor, Tensor]:
    """The row of each kept id and the kept ids, both int64 ``(nnz,)``."""
    counts = support.offsets[1:] - support.offsets[:-1]
    row_of = torch.repeat_interleave(torch.arange(num_rows, device=support.ids.device), counts.long(),
                                     output_size=support.ids.numel())
    return row_of, support.ids.long()


def _softmax_on_rows(z_kept: Tensor, row_of: Tensor, kept: Tensor, ids: Tensor, compute_entropy: bool,
                     mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    shape = ids.shape
    ids = ids.reshape(-1).long()
    N = ids.numel()
    if mask is not None:
        # No gradient path through masked rows (see reference.selective_log_softmax).
        z_kept = torch.where(mask.reshape(-1)[row_of] != 0, z_kept, z_kept.detach())
    neg_inf = torch.full((N,), -torch.inf, dtype=z_kept.dtype, device=z_kept.device)
    row_max = neg_inf.scatter_reduce(0, row_of, z_kept.detach(), "amax")
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp_kept = torch.exp(z_kept - shift[row_of])
    total = torch.zeros_like(row_max).index_add(0, row_of, exp_kept)
    # An empty support (or one of -inf logits only) has lse = -inf; the guarded log keeps its zero
    # gradient finite (log'(0) * 0 would be NaN).
    lse = torch.where(total > 0, shift + torch.log(torch.where(total > 0, total, torch.ones_like(total))), neg_inf)
    # The sampled id's kept logit, where it is kept.
    hit = kept == ids[row_of]
    in_support = torch.zeros(N, dtype=torch.bool, device=ids.device).index_fill(0, row_of[hit], True)
    z_id = torch.zeros_like(row_max).index_put((row_of[hit],), z_kept[hit])
    logps = torch.where(in_support, z_id - lse, neg_inf)
    # A NaN kept logit shows as a NaN log-prob, as in the vocabulary pass.
    has_nan = torch.zeros(N, dtype=torch.bool, device=ids.device).index_fill(0, row_of[torch.isnan(z_kept)], True)
    logps = torch.where(has_nan, torch.full_like(logps, torch.nan), logps)
    entropy = None
    if compute_entropy:
        log_p = z_kept - lse[row_of]
        p = torch.exp(log_p)
        plogp = p * torch.where(p > 0, log_p, torch.zeros_like(log_p))
        entropy = -torch.zeros_like(row_max).index_add(0, row_of, plogp)
        entropy = entropy.reshape(shape)
    return logps.reshape(shape), entropy


class _KeptLogits(torch.autograd.Function):
    """``z[j] = rows[row_of[j]] . weight[kept[j]] + bias[kept[j]]`` in the compute dtype, in chunks;
    backward regathers each chunk instead of keeping the ``(nnz, H)`` gathered rows."""

    @staticmethod
    def forward(ctx, rows, weight, bias, row_of, kept):
        dtype = compute_dtype(rows.dtype)
        z = torch.empty(kept.numel(), dtype=dtype, device=rows.device)
        for start in range(0, kept.numel(), _LINEAR_CHUNK):
            r, k = row_of[start:start + _LINEAR_CHUNK], kept[start:start + _LINEAR_CHUNK]
            chunk = (rows[r].to(dtype) * weight[k].to(dtype)).sum(-1)
            if bias is not None:
                chunk = chunk + bias[k].to(dtype)
            z[start:start + _LINEAR_CHUNK] = chunk
        ctx.save_for_backward(rows, weight, bias, row_of, kept)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        rows, weight, bias, row_of, kept = ctx.saved_tensors
        dtype = grad_z.dtype
        grad_rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device).index_add_(0, kept, grad_z)
        for start in range(0, kept.numel(), _LINEAR_CHUNK):
            r, k = row_of[start:start + _LINEAR_CHUNK], kept[start:start + _LINEAR_CHUNK]
            g = grad_z[start:start + _LINEAR_CHUNK].unsqueeze(-1)
            if grad_rows is not None:
                grad_rows.index_add_(0, r, g * weight[k].to(dtype))
            if grad_weight is not None:
                grad_weight.index_add_(0, k, g * rows[r].to(dtype))
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(grad_rows, rows), cast(grad_weight, weight), cast(grad_bias, bias), None, None
