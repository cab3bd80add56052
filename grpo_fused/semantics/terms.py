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

from .params import Hyper, LossParams, LossSpec, Option, TailSlot
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
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, params: LossParams,
    extras: Optional[Dict[str, Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """The surrogate before weights and reduction.

    Returns ``(loss, ratio)``: ``loss`` is ``(B, T)``, or ``(B, 1)`` when it is one value per
    sequence (GSPO with a ``(B, 1)`` advantage, or GMPO); ``ratio`` is the importance ratio used
    for metrics and the bias-corrected KL (``(B, T)`` or ``(B, 1)``), before ``delta``.
    Positions where ``mask == 0`` hold neutral values here (see :func:`grpo_loss_from_logps`);
    the batch-coupled surrogates (clip_cov, kl_cov) choose their tokens among ``mask != 0``.
    ``extras``, when given, receives the detached ``(B, T)`` per-token quantities behind the loss
    type's own metrics (the row's ``metrics`` names: dppo's masked / truncated flags, clip_cov's
    cut flags, kl_cov's penalized flags and ``|log r|``), for :func:`token_metrics`.
    """
    extras = {} if extras is None else extras
    spec = params.spec
    h = params.hyper(logps.dtype, logps.device)
    surrogate = spec.loss_type.surrogate
    if surrogate is Surrogate.GEO_MEAN:
        return _gmpo_sequence_loss(logps, old_logps, advantages, mask, h)
    if surrogate is Surrogate.GPG:
        return -advantages * logps, torch.ones_like(logps)
    if surrogate in (Surrogate.DPPO_TV, Surrogate.DPPO_KL):
        loss, ratio, valid, truncated = _dppo_terms(logps, old_logps, advantages, h, surrogate)
        extras["dppo/masked_mean"] = 1.0 - valid
        extras["dppo/truncated_mean"] = truncated
        return loss, ratio
    if surrogate is Surrogate.DRO:
        log_ratio = logps - old_logps
        return -(logps * advantages - 0.5 * h.dro_beta * log_ratio.square()), torch.exp(log_ratio)
    if surrogate is Surrogate.KL_COV:
        loss, ratio, penalized = _kl_cov_terms(logps, old_logps, advantages, mask, params)
        extras["kl_cov/penalized_mean"] = penalized
        extras["abs_log_ratio"] = (logps - old_logps).detach().abs()
        return loss, ratio

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
    if surrogate is Surrogate.CLIP_COV:
        keep = _clip_cov_keep(ratio.detach(), logps.detach(), advantages, mask, params)
        extras["clip_cov/cut_mean"] = 1.0 - keep
        loss = loss * keep
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


# verl clamps the token log-ratio to [-20, 20] before exp() in its DPPO losses (and others).
_LOG_RATIO_BOUND = 20.0


def _dppo_terms(logps, old_logps, advantages, h: Hyper, surrogate: Surrogate):
    """DPPO-Binary (verl 0.9.1 ``dppo_tv`` / ``dppo_kl``): ``(loss, ratio, valid, truncated)``.

    The ratio (log clamped to +-20) is capped at ``clip_ratio_c`` and detached, so the gradient is
    the capped ratio times ``A * grad logp``; a token gets none where the policy left the trust
    region in the direction its advantage pushes: TV, the probability moved by more than
    ``epsilon_high`` up (A > 0) or ``epsilon_low`` down (A <= 0); KL, the binary KL between the
    old and new probability of the token exceeds the epsilon of that side.
    """
    log_ratio = torch.clamp(logps - old_logps, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    capped = torch.clamp(ratio, max=h.clip_ratio_c).detach()
    with torch.no_grad():
        prob, old_prob = torch.exp(logps), torch.exp(old_logps)
        if surrogate is Surrogate.DPPO_TV:
            up_ok = (prob - old_prob) <= h.epsilon_high
            down_ok = (prob - old_prob) >= -h.epsilon_low
        else:
            binary_kl = old_prob * (old_logps - logps) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            up_ok = (binary_kl <= h.epsilon_high) | (prob <= old_prob)
            down_ok = (binary_kl <= h.epsilon_low) | (prob >= old_prob)
        valid = torch.where(advantages > 0, up_ok, down_ok).to(logps.dtype)
        truncated = (ratio > h.clip_ratio_c).to(logps.dtype) * valid
    return -advantages * capped * logps * valid, ratio, valid, truncated


def _masked_batch_mean(x: Tensor, mask: Tensor) -> Tensor:
    """verl's ``masked_mean`` over the whole batch: ``sum(x m) / (sum m + 1e-8)``."""
    return masked(x, mask).sum() / (mask.sum() + 1e-8)


def _clip_cov_keep(ratio: Tensor, logps: Tensor, advantages: Tensor, mask: Tensor, params: LossParams) -> Tensor:
    """clip_cov's ``(B, T)`` factor (verl 0.9.1 ``compute_policy_loss_clip_cov``): 0 on the tokens
    whose gradient is cut, 1 elsewhere; detached inputs.

    Candidates: masked-in tokens the PPO clip left alone (``-A clip(r) <= -A r``) whose centred
    covariance ``(A - mean A) (logp - mean logp)`` (masked batch means) lies strictly inside
    ``(clip_cov_lb, clip_cov_ub)``. ``max(int(clip_cov_ratio * tokens), 1)`` of them are drawn
    uniformly by ``torch.randperm`` on the default CPU generator, as verl draws them (so a seeded
    run picks the same tokens). Costs a host sync (the token and candidate counts).
    """
    h = params.hyper(logps.dtype, logps.device)
    keep = mask != 0
    advantages = advantages.expand_as(logps)
    clipped = (-advantages * torch.clamp(ratio, h.clip_low, h.clip_high) > -advantages * ratio) & keep
    cov = (advantages - _masked_batch_mean(advantages, mask)) * (logps - _masked_batch_mean(logps, mask))
    candidates = torch.nonzero((cov > h.clip_cov_lb) & (cov < h.clip_cov_ub) & keep & ~clipped)
    factor = torch.ones_like(logps)
    if candidates.shape[0] > 0:
        count = max(int(params.tail_values[TailSlot.CLIP_COV_RATIO].item() * mask.sum().item()), 1)
        chosen = candidates[torch.randperm(candidates.shape[0])[:count].to(candidates.device)]
        factor[chosen[:, 0], chosen[:, 1]] = 0
    return factor


def _kl_cov_terms(logps, old_logps, advantages, mask, params: LossParams):
    """kl_cov (verl 0.9.1 ``compute_policy_loss_kl_cov``): ``(loss, ratio, penalized)``.

    The unclipped ``-A r``, plus ``ppo_kl_coef * |log r|`` on the ``max(1, int(n * kl_cov_ratio))``
    masked-in tokens (of ``n``) with the largest ``(A - mean A) (logp - mean logp)`` (plain means
    over those tokens, ``torch.topk``). Costs a host sync (the token count).
    """
    h = params.hyper(logps.dtype, logps.device)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    loss = -advantages * ratio
    penalized = torch.zeros_like(logps)
    keep = (mask != 0).reshape(-1)
    positions = torch.nonzero(keep).squeeze(-1)
    n = positions.shape[0]
    if n > 0:
        adv = advantages.expand_as(logps).detach().reshape(-1)[positions]
        lp = logps.detach().reshape(-1)[positions]
        cov = (adv - adv.mean()) * (lp - lp.mean())
        k = max(1, int(n * params.tail_values[TailSlot.KL_COV_RATIO].item()))
        top = positions[torch.topk(cov, k, largest=True).indices]
        penalized.view(-1)[top] = 1.0
        loss = torch.where(penalized != 0, loss + h.ppo_kl_coef * log_ratio.abs(), loss)
    return loss, ratio, penalized

def clip_flags(ratio: Tensor, advantages: Tensor, params: LossParams) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(low, high)`` clip flags in the ratio's dtype, as TRL counts them (None where the loss has none).

    Clip surrogates: ``low = r' < 1 - eps_low and A < 0``, ``high = r' > 1 + eps_high and A > 0``
    with ``r'`` the ratio after the ``delta`` cap. cispo: ``high = r > eps_high and A > 0`` (capped).
    """
    spec = params.spec
    h = params.hyper(ratio.dtype, ratio.device)
    surrogate = spec.loss_type.surrogate
    if surrogate in (Surrogate.CLIP, Surrogate.CLIP_COV):
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
                  entropy: Optional[Tensor] = None, low: Optional[Tensor] = None, high: Optional[Tensor] = None,
                  extras: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """The metrics the loss type reports (TRL's names), as 0-dim tensors: no host sync.

    ``kl`` (when there is a KL term), ``entropy`` (when computed), ``ratio``, and the loss type's
    own: the clip surrogates' ``clip_ratio/{low,high,region}_mean`` and the extremes over sequences
    ``clip_ratio/low_min`` / ``high_max`` (sequences with no token left out, NaN when all are, as
    TRL's nanmin / nanmax); cispo's ``cispo_clip_ratio``; the masked means of the per-token
    ``extras`` that :func:`policy_token_loss` filled in (dppo, clip_cov, kl_cov). Inputs are
    detached ``(B, T)`` or ``(B, 1)``.
    """
    metrics: Dict[str, Tensor] = {}
    if kl is not None:
        metrics["kl"] = metric_mean(kl, mask)
    if entropy is not None:
        metrics["entropy"] = metric_mean(entropy, mask)
    metrics["ratio"] = metric_mean(ratio, mask)
    surrogate = spec.loss_type.surrogate
    if surrogate in (Surrogate.CLIP, Surrogate.CLIP_COV):
        metrics["clip_ratio/low_mean"] = metric_mean(low, mask)
        metrics["clip_ratio/high_mean"] = metric_mean(high, mask)
        metrics["clip_ratio/region_mean"] = metric_mean(torch.maximum(low, high), mask)
        per_sequence = low.shape[-1] == 1 and mask.shape[-1] != 1
        has_tokens = torch.ones_like(mask[:, 0], dtype=torch.bool) if per_sequence else mask.sum(-1) > 0
        metrics["clip_ratio/low_min"] = _extreme(_sequence_fraction(low, mask), has_tokens, largest=False)
        metrics["clip_ratio/high_max"] = _extreme(_sequence_fraction(high, mask), has_tokens, largest=True)
    elif surrogate is Surrogate.CISPO:
        metrics["cispo_clip_ratio"] = metric_mean(high, mask)
    for name in spec.loss_type.metrics:
        if extras is not None and name in extras:
            metrics[name] = metric_mean(extras[name], mask)
    return metrics
