"""The loss from per-token log-probs: what every path runs once the vocabulary pass is done.

:class:`LossBatch` bundles the ``(B, T)`` inputs of a loss call (ids, advantages, mask, old /
reference log-probs, rollout IS weights, global normalizers), so that they travel as one value
from the API through the backends. :func:`grpo_output` is the ``(B, T)`` tail: cast the inputs to
the log-probs' dtype, evaluate the surrogate, KL, entropy bonus and reduction, and package a
:class:`GRPOOutput`. The reference runs it after its materialized log-softmax; the C++ backend,
the linear paths, the sequence-level Triton path and the vocab-parallel losses run it after their
fused vocab pass, and autograd carries its gradient into that pass.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from .outputs import GRPOOutput
from .params import LossParams, Option
from .sampling import ExplicitSupport
from .reduction import entropy_weights, reduce_tokens, token_weights
from .table import Surrogate
from .terms import clip_flags, kl_estimate, masked, policy_token_loss, token_metrics

Tensor = torch.Tensor

__all__ = ["LossBatch", "grpo_loss_from_logps", "grpo_output", "shown"]


@dataclasses.dataclass(frozen=True)
class LossBatch:
    """The per-token inputs of one loss call, as the caller gave them (validated by the API).

    Attributes:
        completion_ids: ``(B, T)`` integer sampled tokens.
        advantages: ``(B,)``, ``(B, 1)`` or ``(B, T)``.
        completion_mask: ``(B, T)`` loss mask (bool / int / float), None = all ones.
        old_logps / ref_logps: ``(B, T)`` or None (on-policy / no KL).
        is_weights: rollout importance-sampling weight ``(B,)``, ``(B, 1)`` or ``(B, T)``, or None.
        num_items_in_batch / global_batch_size: global normalizers (numbers or 0-dim tensors), or None.
        support: the kept ids of each position (:class:`ExplicitSupport`), or None.
    """

    completion_ids: Tensor
    advantages: Tensor
    completion_mask: Optional[Tensor] = None
    old_logps: Optional[Tensor] = None
    ref_logps: Optional[Tensor] = None
    is_weights: Optional[Tensor] = None
    num_items_in_batch: object = None
    global_batch_size: object = None
    support: Optional[ExplicitSupport] = None

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.completion_ids.shape)

    def mask_as(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The ``(B, T)`` float mask in ``dtype`` (ones when none was given)."""
        if self.completion_mask is None:
            return torch.ones(self.shape, dtype=dtype, device=device)
        return self.completion_mask.to(dtype)


def _cast(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if x is None else x.to(dtype)


def _as_column(x: Optional[Tensor]) -> Optional[Tensor]:
    """``(B,)`` -> ``(B, 1)``; ``(B, 1)`` and ``(B, T)`` unchanged."""
    return x.unsqueeze(-1) if x is not None and x.dim() == 1 else x


def _neutral_where_masked(mask: Tensor, logps: Tensor, advantages: Tensor, old_logps: Optional[Tensor],
                          ref_logps: Optional[Tensor], entropy: Optional[Tensor], is_weights: Optional[Tensor]):
    """The inputs with every masked position (``mask == 0``) replaced by a neutral value: log-probs
    and entropy 0 (the vocab pass then receives exactly zero gradient there), old and reference
    log-probs equal to the current ones (ratio 1, KL 0), advantage 0, IS weight 1. A ``(B, 1)``
    advantage or IS weight is replaced on sequences without any masked-in token.

    TRL passes ``ref_logps = 0`` at padding; against a padding logit of -200 that is
    ``exp(200)``: selected out here, it reaches neither the loss, a metric nor a gradient.
    """
    keep = mask != 0
    keep_sequence = keep.any(-1, keepdim=True)

    def select(x, neutral):
        if x is None:
            return None
        where = keep if x.shape[-1] == keep.shape[-1] else keep_sequence
        return torch.where(where, x, neutral)

    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    logps = select(logps, zero)
    anchor = logps.detach()
    return (
        logps,
        select(advantages, zero),
        anchor if old_logps is None else select(old_logps, anchor),
        None if ref_logps is None else select(ref_logps, anchor),
        select(entropy, zero),
        select(is_weights, torch.ones((), dtype=logps.dtype, device=logps.device)),
    )


def grpo_loss_from_logps(logps: Tensor, advantages: Tensor, mask: Tensor, params: LossParams,
                         old_logps: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                         entropy: Optional[Tensor] = None, is_weights: Optional[Tensor] = None,
                         num_items_in_batch=None, global_batch_size=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The GRPO-family loss of per-token log-probs ``(B, T)``; returns ``(loss, metrics)``.

    All tensors in one float dtype. ``old_logps=None`` means ``logps.detach()`` (ratio 1,
    on-policy). ``is_weights`` (TRL's vLLM correction) multiplies the policy term, not the KL;
    for gmpo its masked geometric mean per sequence, as verl does. ``entropy`` enables the
    entropy metric and, with ``Option.ENTROPY_BONUS``, the bonus. Whatever stands at a masked
    position (``mask == 0``) of any input is selected out first (:func:`_neutral_where_masked`).
    """
    spec = params.spec
    h = params.hyper(logps.dtype, logps.device)
    if spec.kl is not None and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0")
    logps, advantages, old_logps, ref_logps, entropy, is_weights = _neutral_where_masked(
        mask, logps, _as_column(advantages), old_logps, ref_logps, entropy, _as_column(is_weights))
    extras: Dict[str, Tensor] = {}
    policy, ratio = policy_token_loss(logps, old_logps, advantages, mask, params, extras)
    geo_mean = spec.loss_type.surrogate is Surrogate.GEO_MEAN
    if is_weights is not None:
        if geo_mean:
            n = mask.sum(-1, keepdim=True)
            log_w = masked(torch.log(is_weights + 1e-10), mask).sum(-1, keepdim=True)
            is_weights = torch.exp(log_w / (n + 1e-8))
        policy = policy * is_weights

    weights = token_weights(mask, spec, num_items_in_batch, global_batch_size)
    if geo_mean:
        # verl: the geometric-mean term is one value per sequence, averaged over sequences
        # whatever the aggregation mode; the KL below follows the mode. No sequence: 0, not NaN.
        loss = policy.sum() / max(policy.shape[0], 1)
    else:
        loss = reduce_tokens(policy, weights, mask)
    kl = None
    if spec.kl is not None:
        kl = kl_estimate(logps, ref_logps, spec.kl)
        if spec.has(Option.BIAS_CORRECT_KL):
            kl = kl * ratio
        loss = loss + h.beta * reduce_tokens(kl, weights, mask)
    if entropy is not None and spec.entropy_bonus:
        loss = loss - h.entropy_coef * reduce_tokens(entropy, entropy_weights(mask), mask)

    r = ratio.detach()
    low, high = clip_flags(r, advantages, params)
    metrics = token_metrics(
        spec, mask, r,
        kl=None if kl is None else kl.detach(),
        entropy=None if entropy is None else entropy.detach(),
        low=low, high=high, extras=extras,
    )
    return loss, metrics


def grpo_output(logps: Tensor, entropy: Optional[Tensor], batch: LossBatch, params: LossParams) -> GRPOOutput:
    """The ``(B, T)`` tail every path shares once the vocab pass has produced ``logps`` (and
    ``entropy``), ``(B, T)`` each in the compute dtype: cast the batch to that dtype, run
    :func:`grpo_loss_from_logps`, package a :class:`GRPOOutput`.

    Under a sampling support (:class:`~grpo_fused.semantics.SamplingRule` or an explicit one), a
    masked-in token whose log-prob is ``-inf`` lies outside the current policy's support: on-policy
    that sampler cannot have drawn it; off-policy (a later iteration on the same rollout) the update
    moved it out, and its ratio is 0 with no gradient either way. It leaves the mask (and the loss:
    a finite value, where its KL would be infinite) and is counted in ``sampling/outside_support``
    (the fraction of masked-in tokens). Global normalizers given by the caller stay as given."""
    dtype = logps.dtype
    mask = batch.mask_as(dtype, logps.device)
    outside = None
    if batch.support is not None or params.spec.has(Option.SAMPLING_SUPPORT):
        outside = (mask != 0) & torch.isneginf(logps.detach())
        counted = (mask != 0).sum().clamp(min=1)
        mask = torch.where(outside, torch.zeros_like(mask), mask)
    loss, metrics = grpo_loss_from_logps(
        logps,
        batch.advantages.to(dtype),
        mask,
        params,
        old_logps=_cast(batch.old_logps, dtype),
        ref_logps=_cast(batch.ref_logps, dtype),
        entropy=entropy,
        is_weights=_cast(batch.is_weights, dtype),
        num_items_in_batch=batch.num_items_in_batch,
        global_batch_size=batch.global_batch_size,
    )
    if outside is not None:
        metrics["sampling/outside_support"] = outside.sum().to(dtype) / counted
    return GRPOOutput(loss, shown(logps, batch.completion_mask), shown(entropy, batch.completion_mask), metrics)


def shown(per_token: Optional[Tensor], completion_mask: Optional[Tensor]) -> Optional[Tensor]:
    """A per-token output as :class:`GRPOOutput` returns it: detached, 0 at masked positions (what
    stands there is padding, and a fused backend does not even read those rows)."""
    if per_token is None:
        return None
    per_token = per_token.detach()
    if completion_mask is None:
        return per_token
    return torch.where(completion_mask != 0, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))


