"""The executable spec of grpo-fused, in plain PyTorch.

Every backend (Triton, C++) is tested against these functions, every benchmark uses them
as the "eager PyTorch" baseline, and the public API falls back to them when no compiled
backend is available. They are written for clarity, not speed: they materialize the
``(B, T, V)`` fp32 logits exactly as TRL and verl do. No Triton, no C++ here.

The spec has three parts: the vocabulary pass below (log-softmax gather and entropy of the
materialized logits), the ``(B, T)`` tail of the loss, which is the semantics layer's
(:func:`grpo_fused.semantics.grpo_output`: surrogates, KL, reduction weights and metrics,
defined once in :mod:`grpo_fused.semantics.terms` and :mod:`~grpo_fused.semantics.reduction`),
and group advantages at the end.

Conventions: B sequences, T completion positions, V vocab, H hidden. All token math runs
in float32 (float64 when the inputs are float64, so that ``gradcheck`` works). ``mask`` is
the float loss mask ``(B, T)``. ``advantages`` is ``(B, 1)`` or ``(B, T)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .semantics import ADVANTAGE_SCALES, GRPOConfig, GroupStats, GRPOOutput, LossBatch, compute_dtype, grpo_output, masked_rows

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# Vocabulary pass: per-token log-probability and entropy.
# --------------------------------------------------------------------------------------


def selective_log_softmax(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, compute_entropy: bool = False, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Optional[Tensor]]:
    """``logp = z[id] - logsumexp(z)`` and ``entropy = lse - sum softmax(z) * z`` with ``z = logits / T``.

    Args:
        logits: ``(..., V)`` float tensor.
        ids: ``(...)`` integer tensor, values in ``[0, V)``.
        temperature: divides the logits.
        compute_entropy: also return the per-token entropy.
        mask: ``(...)`` loss mask or None; rows where it is 0 pass no gradient back to the logits,
            so a NaN or inf there reaches no gradient.

    Returns:
        ``(logps, entropy)``, both ``(...)`` in the compute dtype; entropy is None unless asked.
    """
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    if mask is not None:
        # The same values, but no gradient path through masked rows: a NaN or inf standing there
        # would otherwise turn the zero gradient they receive into 0 * NaN.
        z = torch.where(mask.unsqueeze(-1) != 0, z, z.detach())
    lse = torch.logsumexp(z, dim=-1)
    logps = z.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if compute_entropy:
        log_p = z - lse.unsqueeze(-1)
        p = torch.exp(log_p)
        # H = -sum p log p. On masked (-inf) columns p log p is 0 * -inf; zero log p there
        # *before* the product so that neither the value nor its gradient sees a NaN.
        log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
        entropy = -(p * log_p).sum(-1)
    return logps, entropy


def linear_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``hidden @ weight.T + bias`` in the compute dtype: ``(..., H) x (V, H) -> (..., V)``."""
    dtype = compute_dtype(hidden.dtype)
    b = None if bias is None else bias.to(dtype)
    return torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), b)


def linear_log_softmax(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    compute_entropy: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`selective_log_softmax` of ``hidden @ weight.T + bias`` (materialized here)."""
    return selective_log_softmax(linear_logits(hidden, weight, bias), ids, temperature, compute_entropy)


# --------------------------------------------------------------------------------------
# The loss: the vocabulary pass, then the (B, T) tail.
# --------------------------------------------------------------------------------------


def grpo_loss(logits: Tensor, completion_ids: Tensor, advantages: Tensor, completion_mask: Optional[Tensor] = None,
              old_logps: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None, config: GRPOConfig = GRPOConfig(),
              is_weights: Optional[Tensor] = None, num_items_in_batch=None, global_batch_size=None) -> GRPOOutput:
    """The GRPO-family loss from logits ``(B, T, V)``: materializes fp32 logits, like TRL.

    The arguments are those of :func:`grpo_fused.grpo_loss`; the ``(B, T)`` math after the
    log-softmax is :func:`grpo_fused.semantics.grpo_output`.
    """
    logps, entropy = selective_log_softmax(logits, completion_ids, config.temperature, config.compute_entropy,
                                           completion_mask)
    batch = LossBatch(completion_ids, advantages, completion_mask, old_logps, ref_logps, is_weights,
                      num_items_in_batch, global_batch_size)
    return grpo_output(logps, entropy, batch, config.params)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, completion_ids: Tensor, advantages: Tensor,
                     completion_mask: Optional[Tensor] = None, old_logps: Optional[Tensor] = None,
                     ref_logps: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     config: GRPOConfig = GRPOConfig(), is_weights: Optional[Tensor] = None, num_items_in_batch=None,
                     global_batch_size=None) -> GRPOOutput:
    """:func:`grpo_loss` of ``hidden @ weight.T + bias``, hidden ``(B, T, H)``, weight ``(V, H)``; the
    arguments are those of :func:`grpo_fused.linear_grpo_loss`."""
    return grpo_loss(
        linear_logits(masked_rows(hidden, completion_mask), weight, bias), completion_ids, advantages,
        completion_mask, old_logps, ref_logps, config, is_weights, num_items_in_batch, global_batch_size,
    )


# --------------------------------------------------------------------------------------
# Group advantages.
# --------------------------------------------------------------------------------------


def combine_rewards(rewards: Tensor, reward_weights: Optional[Tensor] = None) -> Tensor:
    """``(B,)`` stays; ``(B, K)`` -> NaN-aware weighted sum; a row that is all NaN stays NaN (TRL)."""
    if rewards.dim() == 1:
        return rewards.to(compute_dtype(rewards.dtype))
    r = rewards.to(compute_dtype(rewards.dtype))
    w = torch.ones(r.shape[1], dtype=r.dtype, device=r.device) if reward_weights is None else reward_weights.to(r)
    total = (r * w).nansum(dim=1)
    return torch.where(torch.isnan(r).all(dim=1), torch.full_like(total, float("nan")), total)


def group_index_from(
    batch: int, group_size=None, group_ids=None, group_offsets=None, device=None
) -> Tuple[Tensor, int]:
    """``(B,)`` group index in ``[0, G)`` and G, from one of the three group descriptions.

    ``group_size``: contiguous runs of that size. ``group_offsets``: ``(G+1,)`` boundaries of
    contiguous groups of any size. ``group_ids``: any integer labels, in any order; groups are
    numbered by sorted label.
    """
    if group_size is not None:
        return torch.arange(batch, device=device) // group_size, batch // group_size
    if group_offsets is not None:
        sizes = group_offsets[1:] - group_offsets[:-1]
        index = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes.to(device))
        return index, len(sizes)
    labels, index = torch.unique(group_ids, return_inverse=True)
    return index, labels.numel()


def group_advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    group_offsets: Optional[Tensor] = None,
    reward_weights: Optional[Tensor] = None,
    keep_mask: Optional[Tensor] = None,
    scale: str = "group",
    unbiased: bool = True,
    eps: float = 1e-4,
) -> Tuple[Tensor, GroupStats]:
    """GRPO advantages ``(r - mean_g) / (std + eps)`` over groups.

    Args:
        rewards: ``(B,)``, or ``(B, K)`` combined by :func:`combine_rewards`. NaN = unscored.
        group_size / group_ids / group_offsets: exactly one group description.
        reward_weights: ``(K,)`` weights of the reward functions (default ones).
        keep_mask: ``(B,)`` bool; rewards with False are left out of the statistics and get
            advantage 0 (GFPO-style filtering).
        scale: ``"group"`` divides by the group std, ``"batch"`` by the std of all valid
            rewards (LitePPO), ``"none"`` does not divide (Dr. GRPO).
        unbiased: Bessel's correction (TRL, verl); False gives the 1/n std.
        eps: added to the std. TRL's 1e-4 by default (verl uses 1e-6).

    Returns:
        ``(advantages (B,), GroupStats)``. Unscored, filtered-out and singleton-group rewards
        get advantage 0, never NaN.
    """
    r = combine_rewards(rewards, reward_weights)
    B = r.shape[0]
    index, G = group_index_from(B, group_size, group_ids, group_offsets, r.device)
    valid = ~torch.isnan(r)
    if keep_mask is not None:
        valid = valid & keep_mask.to(torch.bool)
    rv = torch.where(valid, r, torch.zeros_like(r))
    w = valid.to(r.dtype)

    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, index, w)
    total = torch.zeros_like(count).index_add_(0, index, rv)
    mean = total / count  # NaN for a group with no valid reward
    dev = torch.where(valid, r - mean[index], torch.zeros_like(r))
    # Squares of deviations near 1e30 overflow fp32: sum the squares of dev / max|dev| instead.
    spread = torch.zeros_like(count).scatter_reduce_(0, index, dev.abs(), "amax")
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    scaled = dev / spread[index]
    sq = torch.zeros_like(count).index_add_(0, index, scaled * scaled)
    std = spread * torch.sqrt(sq / (count - 1 if unbiased else count))
    std = torch.where(count > (1 if unbiased else 0), std, torch.full_like(std, float("nan")))

    if scale == "group":
        denom = std[index] + eps
    elif scale == "batch":
        n = w.sum()
        batch_mean = rv.sum() / n
        batch_dev = torch.where(valid, r - batch_mean, torch.zeros_like(r))
        batch_spread = batch_dev.abs().max() if B > 0 else torch.ones((), dtype=r.dtype, device=r.device)
        batch_spread = torch.where(batch_spread > 0, batch_spread, torch.ones_like(batch_spread))
        batch_scaled = batch_dev / batch_spread
        denom = batch_spread * torch.sqrt((batch_scaled * batch_scaled).sum() / (n - 1 if unbiased else n)) + eps
    elif scale == "none":
        denom = torch.ones_like(r)
    else:
        raise ValueError(f"scale must be one of {tuple(ADVANTAGE_SCALES)}, got {scale!r}")
    adv = dev / denom
    has_signal = valid & (count[index] > 1)
    adv = torch.where(has_signal & torch.isfinite(adv), adv, torch.zeros_like(adv))

    zero_std = (count < 2) | ~(std > 1e-8)
    stats = GroupStats(
        group_index=index,
        mean=mean,
        std=std,
        count=count.to(torch.int64),
        zero_std=zero_std,
        frac_zero_std=zero_std.to(r.dtype).mean(),
        rewards=r,
    )
    return adv, stats
