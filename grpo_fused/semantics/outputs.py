"""What the public ops return."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

Tensor = torch.Tensor

__all__ = ["GRPOOutput", "GroupStats"]


@dataclasses.dataclass
class GRPOOutput:
    """What a loss call returns.

    Attributes:
        loss: scalar, differentiable.
        logps: ``(B, T)`` per-token log-probs of the current policy (detached; 0 at masked positions).
        entropy: ``(B, T)`` per-token entropy (detached; 0 at masked positions), or None.
        metrics: TRL metric names -> 0-dim tensors (no host sync): ``kl`` (beta != 0),
            ``entropy``, ``ratio``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
            ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max`` (clip
            surrogates), ``cispo_clip_ratio`` (cispo), ``dppo/masked_mean``, ``dppo/truncated_mean``
            (dppo_tv, dppo_kl), ``clip_cov/cut_mean`` (clip_cov), ``kl_cov/penalized_mean`` (kl_cov),
            ``abs_log_ratio`` (kl_cov), ``sampling/outside_support`` (a sampling support is set: the
            fraction of masked-in tokens outside it).
    """

    loss: Tensor
    logps: Tensor
    entropy: Optional[Tensor]
    metrics: Dict[str, Tensor]


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
