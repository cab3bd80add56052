"""The per-token (and per-sequence) math of the loss on ``(B, T)`` tensors: ratio, surrogates,
KL estimators, clip flags and metrics. This is the readable spec of everything after the
vocabulary pass; the fused kernels' epilogues compute the same expressions per token.

Hyperparameters come as a :class:`~grpo_fused.semantics.params.Hyper` of 0-dim tensors in the
compute dtype (``params.hyper(dtype, device)``), so a new value is data, not a new graph; code
paths are chosen by the :class:`~grpo_fused.semantics.params.LossSpec`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .params import Hyper, LossParams, LossSpec, Option
from .table import KL_ESTIMATOR_ALIASES, KL_ESTIMATOR_NAMES, KLEstimator, Surrogate

Tensor = torch.Tensor

__all__ = [
    "clip_flags",
    "masked",
    "masked_rows",
    "importance_log_ratio",
    "kl_estimate",
    "masked_sequence_mean",
    "metric_mean",
    "policy_token_loss",
    "token_metrics",
]


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator="k3") -> Tensor:
    """Per-token KL(pi || ref) estimate; ``estimator`` a :class:`KLEstimator` or its name.

    ``k3``: ``exp(ref - logp) - (ref - logp) - 1`` (TRL). ``low_var_kl``: the same with verl's
    clamps (log ratio to [-20, 20], result to [-10, 10]). ``k1``: ``logp - ref``.
    ``k2``: ``0.5 (logp - ref)^2``. ``abs``: ``|logp - ref|``.
    """
    if isinstance(estimator, str):
        name = KL_ESTIMATOR_ALIASES.get(estimator, estimator)
        if name not in KL_ESTIMATOR_NAMES:
            raise ValueError(f"kl_estimator {estimator!r} is not known")
        estimator = KL_ESTIMATOR_NAMES[name]
    if estimator is KLEstimator.K3:
        d = ref_logps - logps
        return torch.exp(d) - d - 1
    if estimator is KLEstimator.LOW_VAR_KL:
        d = torch.clamp(ref_logps - logps, min=-20, max=20)
        return torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    if estimator is KLEstimator.K1:
        return logps - ref_logps
    if estimator is KLEstimator.K2:
        return 0.5 * (logps - ref_logps).square()
    return (logps - ref_logps).abs()


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x * m`` where ``m != 0`` and exactly 0 elsewhere: a masked position is selected out, so an
    inf or NaN standing there reaches neither the value nor the gradient (``0 * inf`` would)."""
    x = x * mask
    return torch.where(mask != 0, x, torch.zeros_like(x))


def masked_rows(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``x`` ``(B, T, D)`` with the rows of masked positions (``mask == 0``) set to 0 (a new tensor;
    ``x`` itself when there is no mask): a NaN hidden state at padding (some attention kernels make
    one for a fully masked query) then reaches neither a weight gradient nor the loss."""
    if mask is None:
        return x
    return torch.where(mask.unsqueeze(-1) != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``sum_t x * m / max(sum_t m, 1)``: ``(B, T) -> (B, 1)``."""
    return masked(x, mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)


def importance_log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, sequence_level: bool) -> Tensor:
    """``log r``: per token ``(B, T)``, or the masked sequence mean ``(B, 1)`` (GSPO)."""
    log_ratio = logps - old_logps
    if sequence_level:
        return masked_sequence_mean(log_ratio, mask)
    return log_ratio


def policy_token_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, params: LossParams
) -> Tuple[Tensor, Tensor]:
    """The surrogate before weights and reduction.

    Returns ``(loss, ratio)``: ``loss`` is ``(B, T)``, or ``(B, 1)`` when it is one value per
    sequence (GSPO with a ``(B, 1)`` advantage, or GMPO); ``ratio`` is the importance ratio used
    for metrics and the bias-corrected KL (``(B, T)`` or ``(B, 1)``), before ``delta``.
    """
    spec = params.spec
    h = params.hyper(logps.dtype, logps.device)
    surrogate = spec.loss_type.surrogate
    if surrogate is Surrogate.GEO_MEAN:
        return _gmpo_sequence_loss(logps, old_logps, advantages, mask, h)
    if surrogate is Surrogate.GPG:
        return -advantages * logps, torch.ones_like(logps)

    ratio = torch.exp(importance_log_ratio(logps, old_logps, mask, spec.sequence_level))
    if surrogate is Surrogate.CISPO:
        if spec.has(Option.CISPO_TWO_SIDED):
            weight = torch.clamp(ratio, h.clip_low, h.clip_high)
        else:
            weight = torch.clamp(ratio, max=h.epsilon_high)
        return -weight.detach() * advantages * logps, ratio
    if surrogate is Surrogate.SAPO:
        tau = torch.where(advantages > 0, h.sapo_tau_pos, h.sapo_tau_neg)
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages, ratio

    # Surrogate.CLIP: the PPO clipped surrogate, TRL's delta cap, verl's dual clip.
    clipped = torch.clamp(ratio, h.clip_low, h.clip_high)
    unclipped = torch.clamp(ratio, max=h.delta) if spec.has(Option.DELTA) else ratio
    loss = -torch.min(unclipped * advantages, clipped * advantages)
    if spec.has(Option.DUAL_CLIP):
        loss = torch.where(advantages < 0, torch.min(loss, -advantages * h.clip_ratio_c), loss)
    return loss, ratio


def _gmpo_sequence_loss(logps, old_logps, advantages, mask, h: Hyper):
    # verl compute_policy_loss_geo_mean: sign-aware clip of the *log* ratio, geometric mean over
    # the sequence's tokens, sequence-mean advantage; 1e-8 (not a clamp) as in verl.
    log_ratio = logps - old_logps
    sign = torch.sign(advantages)
    clamped = torch.clamp(log_ratio, -h.epsilon_low, h.epsilon_high)
    log_ratio_min = sign * torch.min(sign * log_ratio, sign * clamped)
    n = mask.sum(-1, keepdim=True)
    ratio = torch.exp(masked(log_ratio_min, mask).sum(-1, keepdim=True) / (n + 1e-8))
    seq_adv = masked(advantages, mask).sum(-1, keepdim=True) / (n + 1e-8)
    return -seq_adv * ratio, ratio


def clip_flags(ratio: Tensor, advantages: Tensor, params: LossParams) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(low, high)`` clip flags in the ratio's dtype, as TRL counts them (None where the loss has none).

    Clip surrogates: ``low = r' < 1 - eps_low and A < 0``, ``high = r' > 1 + eps_high and A > 0``
    with ``r'`` the ratio after the ``delta`` cap. cispo: ``high = r > eps_high and A > 0`` (capped).
    """
    spec = params.spec
    h = params.hyper(ratio.dtype, ratio.device)
    surrogate = spec.loss_type.surrogate
    if surrogate is Surrogate.CLIP:
        capped = torch.clamp(ratio, max=h.delta) if spec.has(Option.DELTA) else ratio
        low = ((capped < h.clip_low) & (advantages < 0)).to(ratio.dtype)
        high = ((capped > h.clip_high) & (advantages > 0)).to(ratio.dtype)
        return low, high
    if surrogate is Surrogate.CISPO:
        return None, ((ratio > h.epsilon_high) & (advantages > 0)).to(ratio.dtype)
    return None, None


def metric_mean(x: Tensor, mask: Tensor) -> Tensor:
    """TRL's ``global_masked_mean``: a ``(B, 1)`` value is one sample per sequence, a ``(B, T)``
    one per masked-in token (masked positions selected out)."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        return x.sum() / max(x.shape[0], 1)
    return masked(x.expand_as(mask), mask).sum() / mask.sum().clamp(min=1.0)


def _sequence_fraction(flags: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence masked mean ``(B,)`` of a ``(B, T)`` flag; a ``(B, 1)`` flag is already one."""
    if flags.shape[-1] == 1 and mask.shape[-1] != 1:
        return flags[:, 0]
    return masked(flags.expand_as(mask), mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _extreme(values: Tensor, keep: Tensor, largest: bool) -> Tensor:
    """max (or min) of ``values[keep]`` as a 0-dim tensor, NaN when nothing is kept; no host sync."""
    if values.numel() == 0:
        return values.new_tensor(float("nan"))
    fill = torch.full_like(values, -float("inf") if largest else float("inf"))
    kept = torch.where(keep, values, fill)
    out = kept.max() if largest else kept.min()
    return torch.where(keep.any(), out, torch.full_like(out, float("nan")))


def token_metrics(spec: LossSpec, mask: Tensor, ratio: Tensor, kl: Optional[Tensor] = None,
                  entropy: Optional[Tensor] = None, low: Optional[Tensor] = None, high: Optional[Tensor] = None
                  ) -> Dict[str, Tensor]:
    """The metrics the loss type reports (TRL's names), as 0-dim tensors: no host sync.

    ``kl`` (when there is a KL term), ``entropy`` (when computed), ``ratio``, and the loss type's
    own: the clip surrogates' ``clip_ratio/{low,high,region}_mean`` and the extremes over sequences
    ``clip_ratio/low_min`` / ``high_max`` (sequences with no token left out, NaN when all are, as
    TRL's nanmin / nanmax); cispo's ``cispo_clip_ratio``. Inputs are detached ``(B, T)`` or ``(B, 1)``.
    """
    metrics: Dict[str, Tensor] = {}
    if kl is not None:
        metrics["kl"] = metric_mean(kl, mask)
    if entropy is not None:
        metrics["entropy"] = metric_mean(entropy, mask)
    metrics["ratio"] = metric_mean(ratio, mask)
    surrogate = spec.loss_type.surrogate
    if surrogate is Surrogate.CLIP:
        metrics["clip_ratio/low_mean"] = metric_mean(low, mask)
        metrics["clip_ratio/high_mean"] = metric_mean(high, mask)
        metrics["clip_ratio/region_mean"] = metric_mean(torch.maximum(low, high), mask)
        per_sequence = low.shape[-1] == 1 and mask.shape[-1] != 1
        has_tokens = torch.ones_like(mask[:, 0], dtype=torch.bool) if per_sequence else mask.sum(-1) > 0
        metrics["clip_ratio/low_min"] = _extreme(_sequence_fraction(low, mask), has_tokens, largest=False)
        metrics["clip_ratio/high_max"] = _extreme(_sequence_fraction(high, mask), has_tokens, largest=True)
    elif surrogate is Surrogate.CISPO:
        metrics["cispo_clip_ratio"] = metric_mean(high, mask)
    return metrics
