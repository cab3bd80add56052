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

from .semantics import (ADVANTAGE_SCALES, GRPOConfig, GroupStats, GRPOOutput, LossBatch, SamplingRule, compute_dtype,
                        grpo_output, masked_rows)

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# Vocabulary pass: per-token log-probability and entropy.
# --------------------------------------------------------------------------------------


def sampling_support(z: Tensor, sampling: Optional[SamplingRule]) -> Tensor:
    """The tokens vLLM's sampler can draw from ``softmax(z)``: a bool ``(..., V)`` mask.

    ``z`` are the logits already divided by the temperature. The dense definition of
    :class:`~grpo_fused.semantics.SamplingRule` (vLLM V1, commit
    ``01fa3fe74b058bb604f236341ab2361c7cf3d25b``): sort by descending ``z``, ties by ascending id
    (a stable sort); min-p, then top-k, then top-p, each on the survivors of the one before. Each
    stage keeps a prefix of that order, so the support is a prefix too. The top-p mass is summed
    in float64.
    """
    if sampling is None or not sampling.active:
        return torch.ones_like(z, dtype=torch.bool)
    return sampling_support_of(z, sampling.top_k or 0, sampling.p, sampling.log_min_p, sampling.top_k_ties == "all")


def sampling_support_of(z: Tensor, top_k, top_p, log_min_p, all_ties: bool) -> Tensor:
    """:func:`sampling_support` with the rule's numbers as Python numbers or 0-dim tensors (the
    values slots: ``top_k = 0``, ``top_p = 1`` and ``log_min_p = -inf`` are off)."""
    z_sorted, order = torch.sort(z.detach(), dim=-1, descending=True, stable=True)
    V = z.shape[-1]
    rank = torch.arange(V, device=z.device)
    z_max = z_sorted[..., :1]
    # min-p: softmax(z) >= min_p * max softmax(z). A row of -inf keeps everything (it has no mass).
    kept = ((z_sorted - z_max) >= log_min_p) | torch.isneginf(z_max)
    # top-k: exactly k tokens, or every token tied with the k-th.
    k = torch.as_tensor(top_k, device=z.device).long()
    if all_ties:
        kth = z_sorted.gather(-1, (k.clamp(1, V) - 1).expand(*z.shape[:-1], 1))
        kept &= (z_sorted >= kth) | (k == 0)
    else:
        kept &= (rank < k) | (k == 0)
    # top-p on the survivors: keep each token whose preceding mass is below p (summed in float64).
    w = torch.where(kept, torch.exp(z_sorted.double() - z_max.double()), 0.0)
    before = torch.cumsum(w, dim=-1) - w
    p = torch.as_tensor(top_p, dtype=torch.float64, device=z.device)
    kept &= (before < p * w.sum(-1, keepdim=True)) | (rank == 0) | (p >= 1)
    return torch.ones_like(z, dtype=torch.bool).scatter(-1, order, kept)


def selective_log_softmax(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, compute_entropy: bool = False, mask: Optional[Tensor] = None,
    top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
    top_k_ties: str = "exact",
) -> Tuple[Tensor, Optional[Tensor]]:
    """``logp = z[id] - logsumexp(z)`` and ``entropy = lse - sum softmax(z) * z`` with ``z = logits / T``.

    With ``top_k`` / ``top_p`` / ``min_p`` the softmax is that of the sampler's truncated
    distribution: ``z`` outside :func:`sampling_support` is ``-inf`` (no gradient reaches it), an
    id outside the support gets ``logp = -inf`` and the entropy is the truncated distribution's.

    Args:
        logits: ``(..., V)`` float tensor.
        ids: ``(...)`` integer tensor, values in ``[0, V)``.
        temperature: divides the logits.
        compute_entropy: also return the per-token entropy.
        mask: ``(...)`` loss mask or None; rows where it is 0 pass no gradient back to the logits,
            so a NaN or inf there reaches no gradient.
        top_k, top_p, min_p, top_k_ties: the sampler's truncation
            (:class:`~grpo_fused.semantics.SamplingRule`); None is off.

    Returns:
        ``(logps, entropy)``, both ``(...)`` in the compute dtype; entropy is None unless asked.
    """
    sampling = SamplingRule(top_k, top_p, min_p, top_k_ties)
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    support = sampling_support(z, sampling) if sampling.active else None
    return log_softmax_on(z, ids, compute_entropy, mask, support)


def log_softmax_on(z: Tensor, ids: Tensor, compute_entropy: bool, mask: Optional[Tensor] = None,
                   support: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`selective_log_softmax` of ``z = logits / temperature`` (compute dtype) restricted to
    the bool ``support`` (None: every token)."""
    if mask is not None:
        # The same values, but no gradient path through masked rows: a NaN or inf standing there
        # would otherwise turn the zero gradient they receive into 0 * NaN.
        z = torch.where(mask.unsqueeze(-1) != 0, z, z.detach())
    index = ids.long().unsqueeze(-1)
    z_id = z.gather(-1, index).squeeze(-1)
    if support is not None:
        has_nan = torch.isnan(z).any(-1)
        # The support is a constant: dropped logits become -inf and pass no gradient back.
        z = torch.where(support, z, torch.full_like(z, -torch.inf))
        in_support = support.gather(-1, index).squeeze(-1)
        z_id = torch.where(in_support, z_id, torch.full_like(z_id, -torch.inf))
        # A NaN logit stays visible as a NaN log-prob (the sort above would hide it).
        z_id = torch.where(has_nan, torch.full_like(z_id, torch.nan), z_id)
    lse = torch.logsumexp(z, dim=-1)
    logps = z_id - lse
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
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    top_k_ties: str = "exact",
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`selective_log_softmax` of ``hidden @ weight.T + bias`` (materialized here)."""
    return selective_log_softmax(linear_logits(hidden, weight, bias), ids, temperature, compute_entropy,
                                 top_k=top_k, top_p=top_p, min_p=min_p, top_k_ties=top_k_ties)


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
    rule = config.sampling
    logps, entropy = selective_log_softmax(logits, completion_ids, config.temperature, config.compute_entropy,
                                           completion_mask, rule.top_k, rule.top_p, rule.min_p, rule.top_k_ties)
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
