"""The reduction of per-token losses, written once as per-token weights.

For every normalizer of the table, :func:`token_weights` gives ``(B, T)`` weights ``w`` such that
the reduced loss of a per-token matrix ``l`` is ``sum(w * l)`` over masked-in positions. The
normalizer is folded into the weights, so a fused kernel's reduction is a plain sum of its
per-token contributions (fixed order, no atomics), the reference reduces the same way, and the
data-parallel normalizers of :mod:`grpo_fused.distributed` are derived from the same formulas.

TRL 1.16 (every normalizer clamped to >= 1 token, so an all-masked batch gives 0, never NaN):

=====================  ============================================================
``SEQUENCE_MEAN``       grpo, sapo, gmpo: ``mean_b  sum_t l m / max(sum_t m, 1)``
``LOCAL_TOKEN_MEAN``    bnpo: ``sum l m / max(sum m, 1)``
``FIXED_LENGTH``        dr_grpo: ``sum l m / (B * max_completion_length)`` (default T)
``GLOBAL_TOKENS``       dapo, cispo, gpg: ``sum l m / max(num_items_in_batch, 1)`` (default sum m)
``SEQUENCE_SUM_MEAN``   luspo: ``mean_b  sum_t l m``
=====================  ============================================================

verl ``agg_loss`` (``loss_agg_mode``; ``dp_size`` multiplies what a global count divides):
``token-mean`` ``sum l m / max(n, 1) * dp`` with ``n = num_items_in_batch`` (default sum m);
``token-sum`` ``sum l m * dp`` (verl 0.9.1: the data-parallel mean of the ranks' sums is then the
global sum); ``seq-mean-token-sum`` ``sum_b (sum_t l m) / S * dp``; ``seq-mean-token-mean``
``sum_b (sum_t l m / (sum_t m + 1e-8)) / S * dp``; ``seq-mean-token-sum-norm`` the first divided by
``max_completion_length`` (default T); ``S = global_batch_size``, default the number of sequences
with at least one token.
"""

from __future__ import annotations


import torch

from .params import LossSpec
from .table import Normalizer

Tensor = torch.Tensor

__all__ = ["entropy_weights", "reduce_loss", "reduce_tokens", "token_weights"]


def _as_count(value, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _tokens(mask: Tensor, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        return mask.sum().clamp(min=1.0)
    return _as_count(num_items_in_batch, mask).clamp(min=1.0)


def token_weights(
    mask: Tensor, spec: LossSpec, num_items_in_batch=None, global_batch_size=None
) -> Tensor:
    """``(B, T)`` weights ``w`` with ``reduced loss = sum(w * l)``; zero wherever ``mask`` is 0.

    Args:
        mask: ``(B, T)`` float loss mask in the compute dtype.
        spec: the loss's :class:`LossSpec` (normalizer, ``max_completion_length``, ``dp_size``).
        num_items_in_batch: global token count (``GLOBAL_TOKENS``, verl ``token-mean``).
        global_batch_size: verl's sequence count of the ``seq-mean-*`` modes.
    """
    B, T = mask.shape
    norm = spec.normalizer
    length = spec.max_completion_length or T
    if norm is Normalizer.SEQUENCE_MEAN:
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * B)
    if norm is Normalizer.LOCAL_TOKEN_MEAN:
        return mask / mask.sum().clamp(min=1.0)
    if norm is Normalizer.FIXED_LENGTH:
        return mask / (B * length)
    if norm is Normalizer.GLOBAL_TOKENS:
        return mask / _tokens(mask, num_items_in_batch)
    if norm is Normalizer.SEQUENCE_SUM_MEAN:
        return mask / B
    if norm is Normalizer.VERL_TOKEN_MEAN:
        return mask * (spec.dp_size / _tokens(mask, num_items_in_batch))
    if norm is Normalizer.VERL_TOKEN_SUM:
        return mask * float(spec.dp_size)
    # verl's sequence means: sequences with at least one token, unless the caller gives the count.
    if global_batch_size is None:
        sequences = (mask.sum(-1) > 0).to(mask.dtype).sum().clamp(min=1.0)
    else:
        sequences = _as_count(global_batch_size, mask)
    scale = spec.dp_size / sequences
    if norm is Normalizer.VERL_SEQ_MEAN_TOKEN_SUM:
        return mask * scale
    if norm is Normalizer.VERL_SEQ_MEAN_TOKEN_SUM_NORM:
        return mask * (scale / length)
    if norm is Normalizer.VERL_SEQ_MEAN_TOKEN_MEAN:
        return mask / (mask.sum(-1, keepdim=True) + 1e-8) * scale
    raise ValueError(f"normalizer {norm} has no token weights")  # pragma: no cover - the enum is closed


def entropy_weights(mask: Tensor) -> Tensor:
    """``(B, T)`` weights of the entropy bonus and of every token metric: the masked mean."""
    return mask / mask.sum().clamp(min=1.0)


def reduce_tokens(values: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """``sum(w * l)`` over masked-in positions: a masked position is selected out, never multiplied,
    so whatever stands there (inf, NaN) reaches neither the sum nor its gradient. ``values`` may
    be ``(B, T)`` or ``(B, 1)`` (one value per sequence, counted at each of its tokens)."""
    products = weights * values
    return torch.where(mask != 0, products, torch.zeros_like(products)).sum()



def reduce_loss(values: Tensor, mask: Tensor, spec: LossSpec, num_items_in_batch=None, global_batch_size=None) -> Tensor:
    """The reduced loss of per-token ``values`` ``(B, T)`` (or ``(B, 1)``): ``sum(w * l)`` with the
    weights of :func:`token_weights`."""
    return reduce_tokens(values, token_weights(mask, spec, num_items_in_batch, global_batch_size), mask)
