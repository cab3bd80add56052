"""The executable spec of grpo-fused, in plain PyTorch.

Every backend (Triton, C++) is tested against these functions, every benchmark uses them
as the "eager PyTorch" baseline, and the public API falls back to them when no compiled
backend is available. They are written for clarity, not speed: they materialize the
``(B, T, V)`` fp32 logits exactly as TRL and verl do. No Triton, no C++ here.

Conventions: B sequences, T completion positions, V vocab, H hidden. All token math runs
in float32 (float64 when the inputs are float64, so that ``gradcheck`` works). ``mask`` is
the float loss mask ``(B, T)``. ``advantages`` is ``(B, 1)`` or ``(B, T)``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from .config import GRPOConfig

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Vocabulary pass: per-token log-probability and entropy.
# --------------------------------------------------------------------------------------


def selective_log_softmax(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, compute_entropy: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    """``logp = z[id] - logsumexp(z)`` and ``entropy = lse - sum softmax(z) * z`` with ``z = logits / T``.

    Args:
        logits: ``(..., V)`` float tensor.
        ids: ``(...)`` integer tensor, values in ``[0, V)``.
        temperature: divides the logits.
        compute_entropy: also return the per-token entropy.

    Returns:
        ``(logps, entropy)``, both ``(...)`` in the compute dtype; entropy is None unless asked.
    """
    z = logits.to(compute_dtype(logits.dtype)) / temperature
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
# Token terms: ratio, surrogate, KL.
# --------------------------------------------------------------------------------------


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(pi || ref) estimate.

    ``k3``: ``exp(ref - logp) - (ref - logp) - 1`` (TRL). ``low_var_kl``: the same with verl's
    clamps (log ratio to [-20, 20], result to [-10, 10]). ``k1``: ``logp - ref``.
    ``k2``: ``0.5 (logp - ref)^2``. ``abs``: ``|logp - ref|``.
    """
    if estimator == "k3":
        d = ref_logps - logps
        return torch.exp(d) - d - 1
    if estimator == "low_var_kl":
        d = torch.clamp(ref_logps - logps, min=-20, max=20)
        return torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k2":
        return 0.5 * (logps - ref_logps).square()
    if estimator == "abs":
        return (logps - ref_logps).abs()
    raise ValueError(f"kl_estimator {estimator!r} is not known")


def masked_sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``sum_t x * m / max(sum_t m, 1)``: ``(B, T) -> (B, 1)``."""
    return (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)


def importance_log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str) -> Tensor:
    """``log r``: per token ``(B, T)``, or the masked sequence mean ``(B, 1)`` for GSPO."""
    log_ratio = logps - old_logps
    if level == "sequence":
        return masked_sequence_mean(log_ratio, mask)
    return log_ratio


def policy_token_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, config: GRPOConfig
) -> Tuple[Tensor, Tensor]:
    """The surrogate before weights and reduction.

    Returns ``(loss, ratio)``: ``loss`` is ``(B, T)``, or ``(B, 1)`` when it is one value per
    sequence (GSPO with a ``(B, 1)`` advantage, or GMPO); ``ratio`` is the importance ratio
    used for metrics and the bias-corrected KL (``(B, T)`` or ``(B, 1)``), before ``delta``.
    """
    c = config
    if c.loss_type == "gmpo":
        return _gmpo_sequence_loss(logps, old_logps, advantages, mask, c)
    if c.loss_type == "gpg":
        return -advantages * logps, torch.ones_like(logps)

    ratio = torch.exp(importance_log_ratio(logps, old_logps, mask, c.importance_sampling_level))
    if c.loss_type == "cispo":
        if c.cispo_two_sided:
            weight = torch.clamp(ratio, 1 - c.epsilon_low, 1 + c.eps_high)
        else:
            weight = torch.clamp(ratio, max=c.eps_high)
        return -weight.detach() * advantages * logps, ratio
    if c.loss_type == "sapo":
        pos = torch.full_like(advantages, c.sapo_temperature_pos)
        tau = torch.where(advantages > 0, pos, torch.full_like(advantages, c.sapo_temperature_neg))
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages, ratio

    # grpo, bnpo, dr_grpo, dapo, luspo: the PPO clipped surrogate.
    clipped = torch.clamp(ratio, 1 - c.epsilon_low, 1 + c.eps_high)
    unclipped = ratio if c.delta is None else torch.clamp(ratio, max=c.delta)
    loss = -torch.min(unclipped * advantages, clipped * advantages)
    if c.clip_ratio_c is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -advantages * c.clip_ratio_c), loss)
    return loss, ratio


def _gmpo_sequence_loss(logps, old_logps, advantages, mask, c):
    # verl compute_policy_loss_geo_mean: sign-aware clip of the *log* ratio, geometric mean over
    # the sequence's tokens, sequence-mean advantage; 1e-8 (not a clamp) as in verl.
    log_ratio = logps - old_logps
    sign = torch.sign(advantages)
    clamped = torch.clamp(log_ratio, -c.epsilon_low, c.eps_high)
    log_ratio_min = sign * torch.min(sign * log_ratio, sign * clamped)
    n = mask.sum(-1, keepdim=True)
    ratio = torch.exp((log_ratio_min * mask).sum(-1, keepdim=True) / (n + 1e-8))
    seq_adv = (advantages * mask).sum(-1, keepdim=True) / (n + 1e-8)
    return -seq_adv * ratio, ratio


# --------------------------------------------------------------------------------------
# Reductions.
# --------------------------------------------------------------------------------------


def reduce_loss(
    per_token: Tensor,
    mask: Tensor,
    config: GRPOConfig,
    num_items_in_batch=None,
    global_batch_size=None,
) -> Tensor:
    """Reduce a ``(B, T)`` (or broadcastable ``(B, 1)``) matrix the way the loss type says.

    TRL 1.16 normalizers: ``grpo``/``sapo``/``gmpo``: mean over sequences of the masked
    token mean; ``bnpo``: masked token mean; ``dr_grpo``: sum / (B * max_completion_length);
    ``dapo``/``cispo``/``gpg``: sum / ``num_items_in_batch`` (default: the mask's sum);
    ``luspo``: mean over sequences of the masked token sum. Every normalizer is clamped
    to at least 1, so an all-masked batch gives 0, not NaN.

    With ``config.loss_agg_mode`` set, verl's ``agg_loss`` instead: ``num_items_in_batch``
    is its ``batch_num_tokens``, ``global_batch_size`` its sequence count (default: the
    sequences with at least one token), ``config.dp_size`` its ``dp_size`` multiplier and
    ``max_completion_length`` its ``loss_scale_factor``.
    """
    masked = per_token * mask
    B, T = mask.shape
    if config.loss_agg_mode is not None:
        return _verl_agg_loss(masked, mask, config, num_items_in_batch, global_batch_size)
    lt = config.loss_type
    if lt in ("grpo", "sapo", "gmpo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if lt == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if lt == "dr_grpo":
        return masked.sum() / (B * (config.max_completion_length or T))
    if lt in ("dapo", "cispo", "gpg"):
        return masked.sum() / _token_normalizer(mask, num_items_in_batch)
    if lt == "luspo":
        return masked.sum(-1).mean()
    raise ValueError(f"loss_type {lt!r} has no reduction")


def _token_normalizer(mask: Tensor, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        return mask.sum().clamp(min=1.0)
    return torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device).clamp(min=1.0)


def _verl_agg_loss(masked, mask, config, num_items_in_batch, global_batch_size):
    # verl agg_loss: global normalizers times dp_size (the gradient is averaged over dp ranks).
    # A sequence-mean divides by the count of sequences that have at least one token, unless
    # the caller gives the global count.
    mode, dp = config.loss_agg_mode, config.dp_size
    if mode == "token-mean":
        return masked.sum() / _token_normalizer(mask, num_items_in_batch) * dp
    if global_batch_size is None:
        seqs = (mask.sum(-1) > 0).to(mask.dtype).sum().clamp(min=1.0)
    else:
        seqs = torch.as_tensor(global_batch_size, dtype=mask.dtype, device=mask.device)
    if mode == "seq-mean-token-mean":
        seq_losses = masked.sum(-1) / (mask.sum(-1) + 1e-8)
    else:
        seq_losses = masked.sum(-1)
    loss = seq_losses.sum() / seqs * dp
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (config.max_completion_length or mask.shape[-1])
    return loss


# --------------------------------------------------------------------------------------
# The loss from per-token log-probs (the part every backend shares) and from logits.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class GRPOOutput:
    """What a loss call returns.

    Attributes:
        loss: scalar, differentiable.
        logps: ``(B, T)`` per-token log-probs of the current policy (detached).
        entropy: ``(B, T)`` per-token entropy (detached), or None.
        metrics: TRL metric names -> 0-dim tensors (no host sync): ``kl`` (beta != 0),
            ``entropy``, ``ratio``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
            ``clip_ratio/region_mean`` (clip surrogates), ``cispo_clip_ratio`` (cispo).
    """

    loss: Tensor
    logps: Tensor
    entropy: Optional[Tensor]
    metrics: Dict[str, Tensor]


def _metric_mean(x: Tensor, mask: Tensor) -> Tensor:
    # TRL global_masked_mean: a (B, 1) value is one sample per sequence, a (B, T) one per token.
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        return x.sum() / max(x.shape[0], 1)
    x = x.expand_as(mask)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _sequence_fraction(flags: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence masked mean ``(B,)`` of a ``(B, T)`` flag; a ``(B, 1)`` flag is already one."""
    if flags.shape[-1] == 1 and mask.shape[-1] != 1:
        return flags[:, 0]
    return (flags.expand_as(mask) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _extreme(values: Tensor, keep: Tensor, largest: bool) -> Tensor:
    """max (or min) of ``values[keep]`` as a 0-dim tensor, NaN when nothing is kept; no host sync."""
    if values.numel() == 0:
        return values.new_tensor(float("nan"))
    fill = torch.full_like(values, -float("inf") if largest else float("inf"))
    kept = torch.where(keep, values, fill)
    out = kept.max() if largest else kept.min()
    return torch.where(keep.any(), out, torch.full_like(out, float("nan")))


def _has_tokens(flags: Tensor, mask: Tensor) -> Tensor:
    if flags.shape[-1] == 1 and mask.shape[-1] != 1:
        return torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    return mask.sum(-1) > 0


def grpo_loss_from_logps(
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    config: GRPOConfig = GRPOConfig(),
    entropy: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The GRPO-family loss of per-token log-probs ``(B, T)``; returns ``(loss, metrics)``.

    ``old_logps=None`` means ``logps.detach()`` (ratio 1, on-policy). ``is_weights`` is the
    rollout importance-sampling weight ``(B, T)`` or ``(B, 1)`` (TRL's vLLM correction):
    it multiplies the policy term, not the KL (for gmpo, its masked geometric mean per
    sequence, as verl does). ``entropy`` enables the entropy metric and bonus.
    """
    c = config
    if old_logps is None:
        old_logps = logps.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    policy, ratio = policy_token_loss(logps, old_logps, advantages, mask, c)
    if is_weights is not None:
        if is_weights.dim() == 1:
            is_weights = is_weights.unsqueeze(-1)
        if c.loss_type == "gmpo":
            n = mask.sum(-1, keepdim=True)
            log_w = (torch.log(is_weights + 1e-10) * mask).sum(-1, keepdim=True)
            is_weights = torch.exp(log_w / (n + 1e-8))
        policy = policy * is_weights

    reduce_kwargs = dict(num_items_in_batch=num_items_in_batch, global_batch_size=global_batch_size)
    if c.loss_type == "gmpo":
        # verl: the geometric-mean term is one value per sequence, averaged over sequences
        # whatever the aggregation mode; the KL below follows the mode.
        loss = policy.mean()
    else:
        loss = reduce_loss(policy, mask, c, **reduce_kwargs)
    metrics: Dict[str, Tensor] = {}
    if c.beta != 0.0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta != 0")
        kl = kl_estimate(logps, ref_logps, c.kl_estimator)
        if c.use_bias_correction_kl:
            kl = kl * ratio
        loss = loss + c.beta * reduce_loss(kl, mask, c, **reduce_kwargs)
        metrics["kl"] = _metric_mean(kl.detach(), mask)
    if entropy is not None:
        if c.entropy_coef != 0.0:
            loss = loss - c.entropy_coef * _metric_mean(entropy, mask)
        metrics["entropy"] = _metric_mean(entropy.detach(), mask)

    r = ratio.detach()
    metrics["ratio"] = _metric_mean(r, mask)
    if c.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        # TRL measures clipping on the ratio after the delta cap.
        r_capped = r if c.delta is None else torch.clamp(r, max=c.delta)
        low = ((r_capped < 1 - c.epsilon_low) & (advantages < 0)).to(mask.dtype)
        high = ((r_capped > 1 + c.eps_high) & (advantages > 0)).to(mask.dtype)
        metrics["clip_ratio/low_mean"] = _metric_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _metric_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _metric_mean(torch.maximum(low, high), mask)
        # Extremes over sequences of the per-sequence clipped fraction; sequences with no
        # token are left out (NaN when every sequence is empty), as TRL's nanmin / nanmax.
        has_tokens = _has_tokens(low, mask)
        metrics["clip_ratio/low_min"] = _extreme(_sequence_fraction(low, mask), has_tokens, largest=False)
        metrics["clip_ratio/high_max"] = _extreme(_sequence_fraction(high, mask), has_tokens, largest=True)
    elif c.loss_type == "cispo":
        clipped = ((r > c.eps_high) & (advantages > 0)).to(mask.dtype)
        metrics["cispo_clip_ratio"] = _metric_mean(clipped, mask)
    return loss, metrics


def grpo_loss(
    logits: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    config: GRPOConfig = GRPOConfig(),
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
) -> GRPOOutput:
    """The GRPO-family loss from logits ``(B, T, V)``: materializes fp32 logits, like TRL."""
    logps, entropy = selective_log_softmax(logits, completion_ids, config.temperature, config.compute_entropy)
    return grpo_output_from_logps(
        logps, entropy, completion_ids, advantages, completion_mask, old_logps, ref_logps, config,
        is_weights, num_items_in_batch, global_batch_size,
    )


def grpo_output_from_logps(
    logps: Tensor,
    entropy: Optional[Tensor],
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    config: GRPOConfig = GRPOConfig(),
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
) -> GRPOOutput:
    """The ``(B, T)`` part every path shares once the vocab pass has produced ``logps`` (and
    ``entropy``): cast the per-token inputs to the log-probs' dtype, build the mask, run
    :func:`grpo_loss_from_logps`, and package a :class:`GRPOOutput`."""
    dtype = logps.dtype
    B, T = completion_ids.shape
    mask = torch.ones(B, T, dtype=dtype, device=logps.device) if completion_mask is None else completion_mask.to(dtype)
    loss, metrics = grpo_loss_from_logps(
        logps,
        advantages.to(dtype),
        mask,
        None if old_logps is None else old_logps.to(dtype),
        None if ref_logps is None else ref_logps.to(dtype),
        config,
        entropy=entropy,
        is_weights=None if is_weights is None else is_weights.to(dtype),
        num_items_in_batch=num_items_in_batch,
        global_batch_size=global_batch_size,
    )
    return GRPOOutput(loss, logps.detach(), None if entropy is None else entropy.detach(), metrics)


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
) -> GRPOOutput:
    """:func:`grpo_loss` of ``hidden @ weight.T + bias``, hidden ``(B, T, H)``, weight ``(V, H)``."""
    return grpo_loss(
        linear_logits(hidden, weight, bias),
        completion_ids,
        advantages,
        completion_mask,
        old_logps,
        ref_logps,
        config,
        is_weights,
        num_items_in_batch,
        global_batch_size,
    )


# --------------------------------------------------------------------------------------
# Group advantages.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class GroupStats:
    """Per-group statistics returned with the advantages.

    Attributes:
        group_index: ``(B,)`` int64, the group (0..G-1) of each reward.
        mean: ``(G,)`` mean of each group's valid rewards (NaN when it has none).
        std: ``(G,)`` std of each group's valid rewards (NaN when undefined: fewer than
            2 valid rewards unbiased, none biased).
        count: ``(G,)`` number of valid (non-NaN, kept) rewards per group.
        zero_std: ``(G,)`` bool, the group carries no learning signal: std below 1e-8
            or fewer than 2 valid rewards (DAPO dynamic sampling drops these).
        frac_zero_std: 0-dim, fraction of groups with ``zero_std`` (TRL's ``frac_reward_zero_std``
            counts completions; with equal group sizes the two agree).
        rewards: ``(B,)`` the combined reward (weighted NaN-aware sum over reward functions).
    """

    group_index: Tensor
    mean: Tensor
    std: Tensor
    count: Tensor
    zero_std: Tensor
    frac_zero_std: Tensor
    rewards: Tensor


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
    sq = torch.zeros_like(count).index_add_(0, index, dev * dev)
    std = torch.sqrt(sq / (count - 1 if unbiased else count))
    std = torch.where(count > (1 if unbiased else 0), std, torch.full_like(std, float("nan")))

    if scale == "group":
        denom = std[index] + eps
    elif scale == "batch":
        n = w.sum()
        batch_mean = rv.sum() / n
        batch_dev = torch.where(valid, r - batch_mean, torch.zeros_like(r))
        denom = torch.sqrt((batch_dev * batch_dev).sum() / (n - 1 if unbiased else n)) + eps
    elif scale == "none":
        denom = torch.ones_like(r)
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
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
