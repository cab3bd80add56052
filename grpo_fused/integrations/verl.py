"""verl-compatible entry points (numbers of verl 0.9.1), importable without verl installed.

**One line for a verl run.** :func:`patch_verl` makes verl's actor compute its log-probs with
grpo-fused's fused linear kernel and its policy loss, rollout correction and KL with grpo-fused::

    from grpo_fused.integrations.verl import patch_verl
    patch_verl()   # in every process that builds an actor; verl's Ray workers: see below

It registers this module's policy losses under verl's own names (``actor.policy_loss.loss_mode``
keeps selecting them), replaces verl's ``kl_penalty`` and, for actors run with
``actor_rollout_ref.model.use_fused_kernels=True`` (either ``fused_kernel_options.impl_backend``),
verl's ``linear_cross_entropy`` / ``LinearCrossEntropy`` / ``FusedLinearForPPO`` by
:func:`linear_cross_entropy` / :class:`FusedLinearForPPO`. verl's workers are separate Ray
processes; the launch-shell form reaches them (verl imports ``VERL_USE_EXTERNAL_MODULES`` in every
process that imports it, and this module patches on import only when asked)::

    GRPO_FUSED_PATCH_VERL=1 VERL_USE_EXTERNAL_MODULES=grpo_fused.integrations.verl \\
        python -m verl.trainer.main_ppo actor_rollout_ref.model.use_fused_kernels=True ...

:func:`unpatch_verl` restores verl's objects.

**Policy losses** with verl's registered-loss signature and names
(``verl.trainer.ppo.core_algos`` 0.9.1)::

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
       config=actor_config, rollout_is_weights=None) -> (pg_loss, pg_metrics)

for ``vanilla`` (PPO clip with dual-clip), ``dppo_tv``, ``dppo_kl``, ``gspo``, ``sapo``, ``gpg``,
``clip_cov``, ``kl_cov``, ``geo_mean`` (GMPO), ``dro``, ``cispo`` and ``bypass_mode`` (rollout
correction computed inside, then REINFORCE or PPO-clip). All tensors are ``(B, T)``;
``pg_metrics`` holds the metrics verl's function returns, under verl's names, as Python floats
(verl's contract: host syncs). ``config`` is verl's ``ActorConfig``, an OmegaConf ``DictConfig`` or
a plain mapping, read the way verl reads it: ``clip_ratio``, ``clip_ratio_low``,
``clip_ratio_high``, ``clip_ratio_c``, ``tau_pos`` / ``tau_neg``, ``policy_loss`` (``clip_cov_ratio``,
``clip_cov_lb``, ``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``, ``dro_beta``,
``rollout_correction``) and ``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``). Every ``loss_agg_mode`` of verl's ``agg_loss`` is
accepted (``token-mean``, ``token-sum``, ``seq-mean-token-sum``, ``seq-mean-token-mean``,
``seq-mean-token-sum-norm``), followed where verl follows it and ignored where verl ignores it
(``sapo``: always ``seq-mean-token-mean``; ``geo_mean``: a mean over sequences). verl's log-ratio
clamps are reproduced with their zero gradients (``[-20, 20]`` for vanilla, dppo, sapo and cispo;
``<= 10`` for gspo's token-level sequence ratio).

Where the numbers come from: every surrogate is a row of grpo-fused's loss-type table
(:mod:`grpo_fused.semantics`; dppo_tv, dppo_kl, clip_cov, kl_cov and dro are rows too, so
:func:`grpo_fused.grpo_loss` offers them on every backend), evaluated by the semantics layer's
``(B, T)`` tail :func:`grpo_fused.semantics.grpo_loss_from_logps`; this module only maps verl's
config and call onto it and computes verl's metrics.

**Rollout correction** (verl 0.9.1 ``rollout_corr_helper``):
:func:`compute_rollout_correction_and_rejection_mask` computes truncated IS weights (token or
sequence level, TIS upper bound or IcePop ``"lower_upper"`` window, optional batch normalization)
and the rejection mask (``token_k1/k2/k3``, ``seq_sum_k*``, ``seq_mean_k*``, ``seq_max_k2/k3``,
comma-chained), with verl's ``rollout_corr/...`` metrics and off-policy diagnostics
(:func:`compute_offpolicy_metrics`). The weights feed any loss here (``rollout_is_weights``) or
:func:`grpo_fused.grpo_loss` (``is_weights``), the mask its ``completion_mask``.

**Log-probs.** :func:`linear_cross_entropy` / :class:`LinearCrossEntropy` follow verl's fused
``LinearCrossEntropy`` contract ``(hidden, weight, labels, temperature, reduction,
dist_process_group) -> (logprobs, entropy)``, with a vocab-parallel lm_head through
:func:`grpo_fused.distributed.vocab_parallel_linear_log_softmax`; :class:`FusedLinearForPPO`
follows verl's torch-backend module. :func:`kl_penalty` follows verl's ``kl_penalty`` names.

**Sampling-support replay** (opt-in: ``patch_verl(sampling_support=True)``, or
``GRPO_FUSED_SAMPLING_SUPPORT=1`` next to ``GRPO_FUSED_PATCH_VERL=1``): the actor's log-prob passes
(``compute_log_prob`` for the old log-probs, ``update_actor``) score tokens under the truncation
vLLM sampled them with, read from the worker's ``rollout`` config (``top_k``, ``top_p``, ``min_p``
when present; ``do_sample=False`` is top-k 1), so the ratio against vLLM's processed rollout
log-probs compares like with like; the reference's pass (``compute_ref_log_prob``) keeps the full
softmax. :func:`sampling_support` applies a rule to the fused log-prob calls of a block by hand,
a vocab-parallel lm_head (``dist_process_group``) included.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import math
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import api
from ..semantics import LOSS_AGG_MODES, GRPOConfig, SamplingRule, grpo_loss_from_logps, kl_estimate

Tensor = torch.Tensor

__all__ = [
    "POLICY_LOSSES",
    "FusedLinearForPPO",
    "LinearCrossEntropy",
    "compute_offpolicy_metrics",
    "compute_policy_loss_bypass_mode",
    "compute_policy_loss_cispo",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_dro",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_gspo",
    "compute_policy_loss_kl_cov",
    "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "compute_rollout_corr_metrics_from_logprobs",
    "compute_rollout_correction_and_rejection_mask",
    "compute_rollout_correction_weights",
    "compute_rollout_rejection_mask",
    "get_policy_loss_fn",
    "kl_penalty",
    "linear_cross_entropy",
    "patch_verl",
    "register_with_verl",
    "unpatch_verl",
]

# verl clamps the token log-ratio to this range before exp() in vanilla, dppo, sapo and cispo ...
_LOG_RATIO_CLAMP = 20.0
# ... and gspo's token-level sequence log-ratio from above.
_GSPO_LOG_RATIO_MAX = 10.0
# verl's rollout-correction safety bound on log-ratios before exp().
_SAFETY_BOUND = 20.0


# --------------------------------------------------------------------------------------
# Reading verl's config.
# --------------------------------------------------------------------------------------


def _get(config, name: str, default=None):
    """``config.name`` for a mapping, a dataclass (``ActorConfig``) or a ``DictConfig``; ``default``
    when absent or None (verl's ``x if x is not None else default``)."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        try:
            value = getattr(config, name)
        except (AttributeError, KeyError):  # OmegaConf struct configs raise on a missing key
            value = default
    return default if value is None else value


def _lookup(config, name: str, default=None):
    """``config.get(name, default)`` as verl calls it on its configs: a present key's value, None
    included; ``default`` only when the key is absent."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    try:
        return getattr(config, name)
    except (AttributeError, KeyError):
        return default


def _require_config(config, what: str = "clip_ratio, clip_ratio_low, ..."):
    if config is None:
        raise ValueError(f"config is required: verl's ActorConfig (or a mapping with {what})")


def _clip_bounds(config) -> Tuple[float, float]:
    _require_config(config)
    clip = _get(config, "clip_ratio")
    low, high = _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)
    if low is None or high is None:
        raise ValueError("config must give clip_ratio, or both clip_ratio_low and clip_ratio_high")
    return float(low), float(high)


def _policy_loss_config(config):
    """``config.policy_loss`` (verl's ``PolicyLossConfig``); verl asserts it is there."""
    _require_config(config, "policy_loss")
    policy_loss = _get(config, "policy_loss")
    if policy_loss is None:
        raise ValueError("config.policy_loss is required for this loss (verl's PolicyLossConfig or a mapping)")
    return policy_loss


def _reduction(config, loss_agg_mode: str, mask: Tensor) -> Dict[str, Any]:
    """verl's ``agg_loss`` normalizers as the tail's ``num_items_in_batch`` / ``global_batch_size`` /
    config fields. verl multiplies by ``dp_size`` what it divides by a global count; the global
    count divided by ``dp_size`` gives the same number with ``dp_size=1``, except for ``token-sum``,
    which divides by nothing and keeps ``dp_size`` itself."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    info = _get(config, "global_batch_info", None) or {}
    dp_size = int(_get(info, "dp_size", 1))
    batch_num_tokens = _get(info, "batch_num_tokens", None)
    global_batch_size = _get(info, "global_batch_size", None)
    scale_factor = _get(info, "loss_scale_factor", None)
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    kwargs: Dict[str, Any] = {"num_items_in_batch": None, "global_batch_size": None}
    fields: Dict[str, Any] = {"loss_agg_mode": loss_agg_mode}
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is not None:
            kwargs["num_items_in_batch"] = torch.as_tensor(batch_num_tokens, dtype=mask.dtype, device=mask.device) / dp_size
    elif loss_agg_mode == "token-sum":
        fields["dp_size"] = dp_size
    else:
        if global_batch_size is None:
            # verl counts only sequences with at least one token.
            kwargs["global_batch_size"] = (mask.sum(-1) > 0).to(mask.dtype).sum()
        else:
            kwargs["global_batch_size"] = torch.as_tensor(global_batch_size, dtype=mask.dtype, device=mask.device) / dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm" and scale_factor is not None:
            fields["max_completion_length"] = int(scale_factor)
    return {"reduction": kwargs, "fields": fields}


def _verl_mean(x: Tensor, mask: Tensor, axis=None) -> Tensor:
    """verl's ``masked_mean``: positions outside ``mask`` selected out, ``sum / (count + 1e-8)``.
    ``mask`` as verl receives it (a bool mask's count plus 1e-8 is a float32 number there too)."""
    total = (torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)) * mask).sum(axis)
    return total / (mask.sum(axis) + 1e-8)


def _verl_sum(x: Tensor, mask: Tensor, axis=None) -> Tensor:
    """verl's ``masked_sum``."""
    return (torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)) * mask).sum(axis)


def _check(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights):
    for name, t in (("old_log_prob", old_log_prob), ("log_prob", log_prob), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be (B, T), got shape {tuple(log_prob.shape)}")
    shape = tuple(log_prob.shape)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} like log_prob, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if rollout_is_weights is not None and tuple(rollout_is_weights.shape) not in (shape, (shape[0], 1)):
        raise ValueError(f"rollout_is_weights must have shape {shape} or ({shape[0]}, 1), got {tuple(rollout_is_weights.shape)}")


# --------------------------------------------------------------------------------------
# One policy-loss call.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """One policy-loss call as verl makes it, after the checks: ``mask`` is the float response mask
    in the log-probs' dtype, ``response_mask`` the mask as given (verl's metrics use it as is)."""

    old_log_prob: Tensor
    log_prob: Tensor
    advantages: Tensor
    mask: Tensor
    response_mask: Tensor
    loss_agg_mode: str
    config: Any
    rollout_is_weights: Optional[Tensor]

    def loss(self, log_prob=None, old_log_prob=None, loss_agg_mode=None, **cfg_fields) -> Tensor:
        """The tail's loss of this call with verl's normalizers (see :meth:`run`)."""
        return self.run(log_prob, old_log_prob, loss_agg_mode, **cfg_fields)[0]

    def run(self, log_prob=None, old_log_prob=None, loss_agg_mode=None, **cfg_fields) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(loss, tail metrics)`` of this call with the given log-probs / mode / config fields:
        :func:`grpo_loss_from_logps` on ``GRPOConfig(**cfg_fields)`` with verl's normalizers."""
        mode = loss_agg_mode or self.loss_agg_mode
        reduction = _reduction(self.config, mode, self.mask)
        cfg = GRPOConfig(compute_entropy=False, **reduction["fields"], **cfg_fields)
        return grpo_loss_from_logps(
            self.log_prob if log_prob is None else log_prob, self.advantages, self.mask, cfg.params,
            old_logps=self.old_log_prob if old_log_prob is None else old_log_prob,
            is_weights=self.rollout_is_weights, **reduction["reduction"],
        )

    def masked_mean(self, x: Tensor) -> Tensor:
        """verl's ``masked_mean`` over the response mask as given."""
        return _verl_mean(x, self.response_mask)

    def as_verl_mean(self, tail_mean: Tensor) -> Tensor:
        """A tail metric (``sum / max(count, 1)``) as verl's ``masked_mean`` (``sum / (count + 1e-8)``)."""
        total = tail_mean * self.mask.sum().clamp(min=1.0)
        return total / (self.response_mask.sum() + 1e-8)


def _verl_policy_loss(default_agg_mode: str):
    """Give ``core(call) -> (loss, metrics)`` verl's registered-loss signature, checks and float metrics.

    The resulting function is ``fn(old_log_prob, log_prob, advantages, response_mask,
    loss_agg_mode=default_agg_mode, config=None, rollout_is_weights=None) -> (pg_loss, pg_metrics)``;
    the metric tensors are turned into Python floats at the end (verl's contract).
    """

    def wrap(core):
        @functools.wraps(core)
        def fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=default_agg_mode, config=None,
               rollout_is_weights=None):
            _check(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
            mask = response_mask.to(log_prob.dtype)
            call = _Call(old_log_prob, log_prob, advantages, mask, response_mask, loss_agg_mode, config,
                         rollout_is_weights)
            loss, metrics = core(call)
            return loss, {name: float(value) for name, value in metrics.items()}

        return fn

    return wrap


def _clip_metrics(call: _Call, ratio: Tensor, low: float, high: float, log_ratio: Tensor, lower=0.0):
    with torch.no_grad():
        loss1, loss2 = -call.advantages * ratio, -call.advantages * torch.clamp(ratio, 1 - low, 1 + high)
        return {
            "actor/pg_clipfrac": call.masked_mean((loss2 > loss1).float()),
            "actor/ppo_kl": call.masked_mean(-log_ratio),
            "actor/pg_clipfrac_lower": lower,
        }


def _clamped_log_prob(log_prob: Tensor, old_log_prob: Tensor) -> Tuple[Tensor, Tensor]:
    """``(log_prob', log_ratio)``: ``log_prob' - old`` is verl's clamped log-ratio, with its zero
    gradient outside ``[-20, 20]``, so the unclamped loss of ``log_prob'`` is verl's clamped loss."""
    log_ratio = torch.clamp(log_prob - old_log_prob, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return old_log_prob + log_ratio, log_ratio


def _clamped_old(log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    """An ``old'`` with ``log_prob - old'`` equal to verl's clamped log-ratio where the clamp binds
    (and ``old`` itself elsewhere), for losses whose ratio is detached and whose ``log_prob`` must
    stay the caller's (cispo)."""
    with torch.no_grad():
        log_ratio = log_prob - old_log_prob
        clamped = torch.clamp(log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return torch.where(clamped != log_ratio, log_prob - clamped, old_log_prob)


# --------------------------------------------------------------------------------------
# Policy losses (verl names).
# --------------------------------------------------------------------------------------


def _vanilla(call: _Call):
    low, high = _clip_bounds(call.config)
    clip_ratio_c = float(_get(call.config, "clip_ratio_c", 3.0))
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c}")
    log_prob_c, log_ratio = _clamped_log_prob(call.log_prob, call.old_log_prob)
    loss = call.loss(log_prob_c, loss_type="dapo", epsilon_low=low, epsilon_high=high, clip_ratio_c=clip_ratio_c)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        clipped = torch.maximum(-call.advantages * ratio, -call.advantages * torch.clamp(ratio, 1 - low, 1 + high))
        lower = call.masked_mean(((clipped > -call.advantages * clip_ratio_c) & (call.advantages < 0)).float())
    return loss, _clip_metrics(call, ratio, low, high, log_ratio, lower)


@_verl_policy_loss("token-mean")
def compute_policy_loss_vanilla(call: _Call):
    """PPO clipped surrogate with dual-clip (``clip_ratio_c``, default 3.0), verl's ``vanilla``."""
    return _vanilla(call)


def _dppo(call: _Call, loss_type: str):
    low, high = _clip_bounds(call.config)  # trust-region thresholds, not ratio clips
    cap = float(_get(call.config, "clip_ratio_c", 20.0))
    loss, tail = call.run(loss_type=loss_type, epsilon_low=low, epsilon_high=high, clip_ratio_c=cap)
    with torch.no_grad():
        log_ratio = torch.clamp(call.log_prob - call.old_log_prob, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        metrics = {
            "actor/pg_clipfrac": call.as_verl_mean(tail["dppo/masked_mean"]),
            "actor/ppo_kl": call.masked_mean(-log_ratio),
            "actor/pg_clipfrac_lower": call.as_verl_mean(tail["dppo/truncated_mean"]),
        }
    return loss, metrics


@_verl_policy_loss("token-mean")
def compute_policy_loss_dppo_tv(call: _Call):
    """DPPO-Binary-TV: ``-A * sg(min(r, clip_ratio_c)) * log_prob`` on tokens whose probability
    moved by at most ``clip_ratio_high`` up (A > 0) / ``clip_ratio_low`` down (A <= 0); cap
    ``clip_ratio_c`` (verl's fallback 20.0 when the config has none)."""
    return _dppo(call, "dppo_tv")


@_verl_policy_loss("token-mean")
def compute_policy_loss_dppo_kl(call: _Call):
    """DPPO-Binary-KL: as :func:`compute_policy_loss_dppo_tv` with the binary KL between the old and
    new probability of the token as the trust region."""
    return _dppo(call, "dppo_kl")


@_verl_policy_loss("seq-mean-token-mean")
def compute_policy_loss_gspo(call: _Call):
    """GSPO as verl writes it: token ratio ``sg(s_i) * pi / sg(pi)`` (value the sequence ratio,
    gradient per token), clipped, aggregated by ``loss_agg_mode`` (default ``seq-mean-token-mean``)."""
    low, high = _clip_bounds(call.config)
    log_prob, mask = call.log_prob, call.mask
    with torch.no_grad():
        log_ratio = log_prob - call.old_log_prob
        seq_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        capped = torch.clamp(seq_log_ratio, max=_GSPO_LOG_RATIO_MAX)
    # A token-level ratio whose log is log_prob - sg(log_prob) + sg(capped): old = sg(log_prob) - capped;
    # past the cap verl's clamp has zero gradient, so the log-prob is detached there.
    log_prob_g = torch.where(seq_log_ratio <= _GSPO_LOG_RATIO_MAX, log_prob, log_prob.detach())
    loss = call.loss(log_prob_g, log_prob.detach() - capped, loss_type="dapo", epsilon_low=low, epsilon_high=high)
    return loss, _clip_metrics(call, torch.exp(capped).expand_as(log_prob), low, high, log_ratio)


@_verl_policy_loss("seq-mean-token-mean")
def compute_policy_loss_sapo(call: _Call):
    """SAPO soft gate ``sigmoid(tau (r - 1)) * 4 / tau``, ``tau_pos`` / ``tau_neg`` from config,
    aggregated ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says (as verl)."""
    _require_config(call.config, "tau_pos, tau_neg")
    tau_pos, tau_neg = _get(call.config, "tau_pos"), _get(call.config, "tau_neg")
    if tau_pos is None or tau_neg is None:
        raise ValueError("config must give tau_pos and tau_neg for sapo")
    log_prob_c, log_ratio = _clamped_log_prob(call.log_prob, call.old_log_prob)
    loss = call.loss(log_prob_c, None, "seq-mean-token-mean", loss_type="sapo", sapo_temperature_pos=float(tau_pos),
                     sapo_temperature_neg=float(tau_neg))
    metrics = {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": call.masked_mean(-log_ratio.detach()),
               "actor/pg_clipfrac_lower": 0.0}
    return loss, metrics


@_verl_policy_loss("token-mean")
def compute_policy_loss_gpg(call: _Call):
    """GPG / REINFORCE: ``-A * log_prob``, aggregated by ``loss_agg_mode``; no metrics (as verl)."""
    _require_config(call.config, "global_batch_info")
    return call.loss(loss_type="gpg"), {}


@_verl_policy_loss("token-mean")
def compute_policy_loss_clip_cov(call: _Call):
    """Clip-Cov: the PPO clipped surrogate (no dual clip, no log-ratio clamp) whose gradient is cut
    on ``max(int(clip_cov_ratio * tokens), 1)`` tokens drawn at random among the unclipped ones with
    covariance in ``(clip_cov_lb, clip_cov_ub)``; the draw uses ``torch.randperm`` on the default
    CPU generator exactly as verl does, so a seeded run cuts the same tokens."""
    low, high = _clip_bounds(call.config)
    policy_loss = _policy_loss_config(call.config)
    loss, tail = call.run(
        loss_type="clip_cov", epsilon_low=low, epsilon_high=high,
        clip_cov_ratio=float(_get(policy_loss, "clip_cov_ratio", 0.0002)),
        clip_cov_lb=float(_get(policy_loss, "clip_cov_lb", 1.0)),
        clip_cov_ub=float(_get(policy_loss, "clip_cov_ub", 5.0)),
    )
    with torch.no_grad():
        metrics = {
            "actor/pg_clipfrac": call.as_verl_mean(tail["clip_cov/cut_mean"]),
            "actor/ppo_kl": call.masked_mean(call.old_log_prob - call.log_prob),
        }
    return loss, metrics


@_verl_policy_loss("token-mean")
def compute_policy_loss_kl_cov(call: _Call):
    """KL-Cov: the unclipped ``-A * r``, plus ``ppo_kl_coef * |log r|`` on the
    ``max(1, int(tokens * kl_cov_ratio))`` tokens of largest covariance (``ppo_kl_coef`` falls back
    to verl's 1.0 when the config gives None; ``PolicyLossConfig``'s default is 0.1)."""
    policy_loss = _policy_loss_config(call.config)
    loss, tail = call.run(
        loss_type="kl_cov",
        kl_cov_ratio=float(_get(policy_loss, "kl_cov_ratio", 0.0002)),
        ppo_kl_coef=float(_get(policy_loss, "ppo_kl_coef", 1.0)),
    )
    return loss, {"actor/ppo_kl": call.as_verl_mean(tail["abs_log_ratio"])}


@_verl_policy_loss("token-mean")
def compute_policy_loss_geo_mean(call: _Call):
    """GMPO: geometric mean of sign-aware clipped token ratios per sequence, mean over sequences
    (``loss_agg_mode`` unused, as in verl); IS weights enter as their per-sequence geometric mean."""
    low, high = _clip_bounds(call.config)
    cfg = GRPOConfig(loss_type="gmpo", epsilon_low=low, epsilon_high=high, compute_entropy=False)
    loss, _ = grpo_loss_from_logps(call.log_prob, call.advantages, call.mask, cfg.params,
                                   old_logps=call.old_log_prob, is_weights=call.rollout_is_weights)
    with torch.no_grad():
        log_ratio = call.log_prob - call.old_log_prob
        clipped = (log_ratio != torch.clamp(log_ratio, -low, high)).float()
        metrics = {
            "actor/pg_clipfrac": call.masked_mean(clipped * (call.advantages > 0)),
            "actor/ppo_kl": call.masked_mean(-log_ratio),
            "actor/pg_clipfrac_lower": call.masked_mean(clipped * (call.advantages < 0)),
        }
    return loss, metrics


@_verl_policy_loss("token-mean")
def compute_policy_loss_dro(call: _Call):
    """DRO: ``-(A * log_prob - dro_beta / 2 * (log_prob - old)^2)``; ``policy_loss.dro_beta`` > 0 required."""
    policy_loss = _policy_loss_config(call.config)
    beta = _get(policy_loss, "dro_beta")
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    loss = call.loss(loss_type="dro", dro_beta=float(beta))
    with torch.no_grad():
        metrics = {"actor/ppo_kl": call.masked_mean(call.old_log_prob - call.log_prob)}
    return loss, metrics


@_verl_policy_loss("token-mean")
def compute_policy_loss_cispo(call: _Call):
    """CISPO as verl: ``-sg(clip(r, 1 - low, 1 + high)) * A * log_prob`` (two-sided clip) with
    verl's ``[-20, 20]`` clamp of the log-ratio (it matters when ``clip_ratio_low >= 1``)."""
    low, high = _clip_bounds(call.config)
    old = _clamped_old(call.log_prob, call.old_log_prob)
    loss = call.loss(None, old, loss_type="cispo", epsilon_low=low, epsilon_high=high, cispo_two_sided=True)
    with torch.no_grad():
        log_ratio = torch.clamp(call.log_prob - call.old_log_prob, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        metrics = {
            "actor/pg_clipfrac": call.masked_mean((ratio != torch.clamp(ratio, 1 - low, 1 + high)).float()),
            "actor/ppo_kl": call.masked_mean(-log_ratio),
            "actor/pg_clipfrac_lower": 0.0,
        }
    return loss, metrics


@_verl_policy_loss("token-mean")
def compute_policy_loss_bypass_mode(call: _Call):
    """Bypass mode (``old_log_prob`` is the rollout's): rollout correction computed here from the
    current log-probs (``config.policy_loss.rollout_correction``: ``rollout_is``,
    ``rollout_is_threshold``, ``rollout_is_batch_normalize``, ``rollout_rs``,
    ``rollout_rs_threshold``, ``loss_type``), then ``loss_type="reinforce"``: ``-w * A * log_prob``
    with the IS weights ``w``, or ``"ppo_clip"`` (default): ``vanilla`` without weights; both on the
    rejection-sampled mask. The caller's ``rollout_is_weights`` are ignored (as verl);
    ``rollout_corr/...`` metrics are merged in."""
    _require_config(call.config, "policy_loss.rollout_correction")
    policy_loss = _get(call.config, "policy_loss")
    correction = _get(policy_loss, "rollout_correction") if policy_loss is not None else None
    if correction is None:
        raise ValueError("rollout_correction config not found in policy_loss; bypass_mode needs "
                         "config.policy_loss.rollout_correction")
    # Read as verl reads them: a field set to None stays None (rollout_is_threshold=None turns IS off).
    loss_type = _lookup(correction, "loss_type", "ppo_clip")
    if loss_type not in ("reinforce", "ppo_clip"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    with torch.no_grad():
        weights, mask, rollout_metrics = _rollout_correction(
            call.log_prob.detach(), call.old_log_prob, call.response_mask,
            rollout_is=_lookup(correction, "rollout_is", None),
            rollout_is_threshold=_lookup(correction, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=bool(_lookup(correction, "rollout_is_batch_normalize", False)),
            rollout_rs=_lookup(correction, "rollout_rs", None),
            rollout_rs_threshold=_lookup(correction, "rollout_rs_threshold", None),
        )
    if loss_type == "reinforce":
        inner = _Call(call.old_log_prob, call.log_prob, call.advantages, mask.to(call.log_prob.dtype), mask,
                      call.loss_agg_mode, call.config, weights)
        loss = inner.loss(loss_type="gpg")
        metrics = {"actor/ppo_kl": inner.masked_mean((call.old_log_prob - call.log_prob).detach())}
    else:
        inner = _Call(call.old_log_prob, call.log_prob, call.advantages, mask.to(call.log_prob.dtype), mask,
                      call.loss_agg_mode, call.config, None)
        loss, metrics = _vanilla(inner)
    metrics.update(rollout_metrics)
    return loss, metrics


POLICY_LOSSES: Dict[str, Callable] = {
    "vanilla": compute_policy_loss_vanilla,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "geo_mean": compute_policy_loss_geo_mean,
    "dro": compute_policy_loss_dro,
    "cispo": compute_policy_loss_cispo,
    "bypass_mode": compute_policy_loss_bypass_mode,
}


def get_policy_loss_fn(name: str) -> Callable:
    """The policy loss registered under verl's ``name`` (``vanilla``, ``gspo``, ...), as verl's lookup."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"Unsupported loss mode: {name}. Supported modes are: {list(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


# --------------------------------------------------------------------------------------
# Rollout correction (verl 0.9.1 rollout_corr_helper).
# --------------------------------------------------------------------------------------

_RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
               "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def _is_threshold(spec) -> Tuple[float, Optional[float]]:
    """``rollout_is_threshold`` -> ``(upper, lower or None)``: a number (or a number string) is a
    TIS cap, ``"lower_upper"`` an IcePop window."""
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be a float or a 'lower_upper' string, not a bool")
    if isinstance(spec, (int, float)):
        upper, lower = float(spec), None
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("rollout_is_threshold must not be an empty string")
        try:
            if "_" in text:
                low_text, high_text = text.split("_", 1)
                lower, upper = float(low_text), float(high_text)
            else:
                upper, lower = float(text), None
        except ValueError as exc:
            raise ValueError(f"Invalid rollout_is_threshold {spec!r}") from exc
    else:
        raise TypeError(f"rollout_is_threshold must be a float or a 'lower_upper' string, got {type(spec).__name__}")
    if upper <= 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}")
    if lower is not None and lower <= 0:
        raise ValueError(f"rollout_is_threshold lower bound must be positive, got {lower}")
    if lower is not None and lower > upper:
        raise ValueError("rollout_is_threshold lower bound must be <= upper bound")
    return upper, lower


def _rs_options(rollout_rs) -> List[str]:
    if not isinstance(rollout_rs, str) or not rollout_rs:
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options)")
    options: List[str] = []
    for option in (part.strip() for part in rollout_rs.split(",")):
        if not option:
            continue
        if option not in _RS_OPTIONS:
            raise ValueError(f"Invalid rollout_rs option: {option}. Must be one of {sorted(_RS_OPTIONS)}.")
        if option not in options:
            options.append(option)
    if not options:
        raise ValueError("rollout_rs must contain at least one valid option")
    return options


def _rs_thresholds(options: List[str], spec) -> Dict[str, Tuple[Optional[float], float]]:
    """Per option ``(lower, upper)``: k1 options bound the ratio (``"lower_upper"``, or an upper
    bound whose reciprocal is the lower one), the others take one upper bound."""
    if spec is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        parts = [str(spec)]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        raise TypeError("rollout_rs_threshold must be a string or a number")
    if not parts:
        raise ValueError("rollout_rs_threshold must contain at least one threshold value")
    if len(parts) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold needs one threshold for all options or exactly {len(options)} "
                         "(one per rollout_rs option)")
    parts = parts * len(options) if len(parts) == 1 else parts
    out: Dict[str, Tuple[Optional[float], float]] = {}
    for option, part in zip(options, parts):
        try:
            if option.endswith("k1"):
                if "_" in part:
                    low_text, high_text = part.split("_", 1)
                    lower, upper = float(low_text), float(high_text)
                else:
                    upper = float(part)
                    lower = float(str(1.0 / upper))
                if lower <= 0 or upper <= 0:
                    raise ValueError(f"Thresholds for option '{option}' must be positive, got {part}")
                if lower > upper:
                    raise ValueError(f"Thresholds for option '{option}' must be lower <= upper, got {part}")
                out[option] = (lower, upper)
            else:
                if "_" in part:
                    raise ValueError(f"rollout_rs_threshold for option '{option}' takes one upper bound, got {part!r}")
                upper = float(part)
                if upper <= 0:
                    raise ValueError(f"Threshold for option '{option}' must be positive, got {part}")
                out[option] = (None, upper)
        except ValueError as exc:
            if "option" in str(exc):
                raise
            raise ValueError(f"Invalid numeric threshold '{part}' for option '{option}'") from exc
    return out


def _floats(metrics: Dict[str, Any]) -> Dict[str, float]:
    """Every metric as a Python float (tensors read in one transfer)."""
    names = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].detach().to(torch.float64).cpu().reshape(()) for k in names]).tolist() if names else []
    out = {k: float(v) for k, v in metrics.items()}
    out.update(zip(names, values))
    return out


def _rs_metrics(option: str, stat: Tensor, mask: Tensor, seq_valid: Tensor, sequence_level: bool,
                per_sequence: Optional[Tensor], upper: float, lower: float, uses_lower: bool) -> Dict[str, Any]:
    """verl's per-option rejection-sampling metrics (``rollout_rs_<option>_...``)."""
    if not mask.any():
        raise ValueError("response_mask must contain at least one valid token (1).")
    prefix = f"rollout_rs_{option}"
    keep = mask.bool()
    seq_values = per_sequence if per_sequence is not None else _verl_mean(stat, mask, axis=-1)
    seq_values = seq_values.squeeze(-1) if seq_values.dim() > 1 else seq_values
    valid_values = seq_values[seq_valid]
    by_sequence = sequence_level and valid_values.numel() > 0
    m: Dict[str, Any] = {f"{prefix}_mean": _verl_mean(stat, mask)}
    if by_sequence:
        m[f"{prefix}_max"], m[f"{prefix}_min"] = valid_values.max(), valid_values.min()
        m[f"{prefix}_fraction_high"] = (valid_values > upper).float().mean()
        m[f"{prefix}_fraction_low"] = (valid_values < lower).float().mean() if uses_lower else 0.0
    else:
        m[f"{prefix}_max"] = stat.masked_fill(~keep, float("-inf")).max()
        m[f"{prefix}_min"] = stat.masked_fill(~keep, float("inf")).min()
        m[f"{prefix}_fraction_high"] = _verl_mean((stat > upper).float(), mask)
        m[f"{prefix}_fraction_low"] = _verl_mean((stat < lower).float(), mask) if uses_lower else 0.0
    if mask.sum() > 1:
        bounded = stat.clamp(min=lower if uses_lower else 0.0, max=upper)
        mean = _verl_mean(bounded, mask)
        m[f"{prefix}_std"] = torch.sqrt(torch.clamp(_verl_mean(bounded.square(), mask) - mean.square(), min=0.0))
    else:
        m[f"{prefix}_std"] = 0.0
    if valid_values.numel() > 0:
        m[f"{prefix}_seq_mean"] = valid_values.mean()
        m[f"{prefix}_seq_std"] = valid_values.std() if valid_values.numel() > 1 else 0.0
        m[f"{prefix}_seq_max"], m[f"{prefix}_seq_min"] = valid_values.max(), valid_values.min()
        m[f"{prefix}_seq_max_deviation"] = valid_values.abs().max()
        m[f"{prefix}_seq_fraction_high"] = (valid_values > upper).float().mean()
        if uses_lower:
            m[f"{prefix}_seq_fraction_low"] = (valid_values < lower).float().mean()
    else:
        for name in ("seq_mean", "seq_std", "seq_max", "seq_min", "seq_max_deviation", "seq_fraction_high",
                     "seq_fraction_low"):
            m[f"{prefix}_{name}"] = 0.0
    return m


def _rejection_mask(log_ratio: Tensor, response_mask: Tensor, rollout_rs, rollout_rs_threshold):
    """``(mask, metrics as tensors)`` of :func:`compute_rollout_rejection_mask`."""
    options = _rs_options(rollout_rs)
    thresholds = _rs_thresholds(options, rollout_rs_threshold)
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    safe = torch.clamp(log_ratio, min=-_SAFETY_BOUND, max=_SAFETY_BOUND)
    per_token = {"k1": -safe, "k2": 0.5 * safe ** 2, "k3": torch.exp(safe) - 1.0 - safe}
    keep_tokens = response_mask.bool()
    seq_valid = response_mask.sum(dim=-1) > 0
    combined = torch.ones_like(response_mask, dtype=log_ratio.dtype)
    metrics: Dict[str, Any] = {}
    for option in options:
        lower, upper = thresholds[option]
        k1 = option.endswith("k1")
        # k1 bounds compare in log space: log(lower) <= -log r <= log(upper), verl's convention.
        low_bound, high_bound = (math.log(lower), math.log(upper)) if k1 else (None, upper)
        token_stat = per_token[option[-2:]]
        per_sequence = None
        if option.startswith("token"):
            stat = token_stat
        else:
            if option.startswith("seq_sum"):
                per_sequence = _verl_sum(token_stat, response_mask, axis=-1)
            elif option.startswith("seq_mean"):
                per_sequence = _verl_mean(token_stat, response_mask, axis=-1)
            else:  # seq_max: -inf where a sequence has no token becomes 0
                top = token_stat.masked_fill(~keep_tokens, float("-inf")).max(dim=-1).values
                per_sequence = torch.where(top == float("-inf"), torch.zeros_like(top), top)
            stat = per_sequence.unsqueeze(-1).expand_as(response_mask)
        keep = (stat >= low_bound) & (stat <= high_bound) if k1 else stat <= high_bound
        metrics.update(_rs_metrics(option, stat, response_mask, seq_valid, per_sequence is not None, per_sequence,
                                   high_bound, low_bound if k1 else 0.0, k1))
        keep_float = keep.to(log_ratio.dtype)
        combined = combined * keep_float
        metrics[f"rollout_rs_{option}_masked_fraction"] = _verl_mean(1 - keep_float, response_mask)
        seq_kept = (~((~keep) & keep_tokens)).all(dim=-1).to(log_ratio.dtype)
        valid = seq_valid.float()
        metrics[f"rollout_rs_{option}_seq_masked_fraction"] = (
            ((1.0 - seq_kept) * valid).sum() / valid.sum() if bool(valid.sum() > 0) else 0.0)
    metrics["rollout_rs_masked_fraction"] = _verl_mean(1 - combined, response_mask)
    kept = (combined > 0.5) & keep_tokens
    metrics["rollout_rs_seq_masked_fraction"] = (~kept & keep_tokens).any(dim=-1).float().mean()
    return (response_mask * combined).to(dtype=response_mask.dtype), metrics


def compute_rollout_rejection_mask(log_ratio: Tensor, response_mask: Tensor, rollout_rs: str = "token_k1",
                                   rollout_rs_threshold=None) -> Tuple[Tensor, Dict[str, float]]:
    """verl 0.9.1's rejection sampling: the response mask with every token (``token_k*``) or whole
    sequence (``seq_sum_k*``, ``seq_mean_k*``, ``seq_max_k*``) whose divergence between the training
    and rollout policies exceeds its threshold set to 0; several options (comma separated) must all
    pass. Divergences of ``log r`` (``log_ratio`` = training - rollout, clamped to +-20):
    ``k1 = -log r`` (kept when ``log(lower) <= k1 <= log(upper)``, thresholds ``"lower_upper"``
    or an upper bound whose reciprocal is the lower one), ``k2 = (log r)^2 / 2`` and
    ``k3 = r - 1 - log r`` (kept when ``<= upper``).

    Returns ``(mask, metrics)``: the mask in ``response_mask``'s dtype and verl's
    ``rollout_rs_*`` metrics (floats, without the ``rollout_corr/`` prefix).
    """
    mask, metrics = _rejection_mask(log_ratio, response_mask, rollout_rs, rollout_rs_threshold)
    return mask, _floats(metrics)


def _is_metrics(weights: Tensor, raw: Tensor, log_ratio_for_metrics: Tensor, mask: Tensor, level: str,
                upper: float, lower: Optional[float]) -> Dict[str, Any]:
    """verl's ``rollout_is_*`` metrics of the applied (``weights``) and raw weights."""
    if not mask.any():
        raise ValueError("response_mask must contain at least one valid token (1).")
    lower = 1.0 / upper if lower is None else lower
    m: Dict[str, Any] = {}
    if level == "sequence":
        # verl takes these thresholds' logs of float32 tensors (torch's default dtype).
        log_upper = torch.log(torch.tensor(upper, device=weights.device))
        log_lower = torch.log(torch.tensor(lower, device=weights.device))
        m["rollout_is_max"] = torch.exp(torch.clamp(log_ratio_for_metrics.max(), max=_SAFETY_BOUND))
        m["rollout_is_min"] = torch.exp(log_ratio_for_metrics.min())
        m["rollout_is_mean"] = _verl_mean(weights, mask)
        m["rollout_is_ratio_fraction_high"] = (log_ratio_for_metrics > log_upper).float().mean()
        m["rollout_is_ratio_fraction_low"] = (log_ratio_for_metrics < log_lower).float().mean()
    else:
        m["rollout_is_mean"] = _verl_mean(weights, mask)
        m["rollout_is_ratio_fraction_high"] = _verl_mean((raw > upper).float(), mask)
        m["rollout_is_ratio_fraction_low"] = _verl_mean((raw < lower).float(), mask)
        keep = mask.bool()
        m["rollout_is_max"] = weights.masked_fill(~keep, float("-inf")).max()
        m["rollout_is_min"] = weights.masked_fill(~keep, float("inf")).min()
    bounded = weights.clamp(min=0.0, max=upper)
    if mask.sum() > 1:
        mean = _verl_mean(bounded, mask)
        m["rollout_is_std"] = torch.sqrt(torch.clamp(_verl_mean(bounded.square(), mask) - mean.square(), min=0.0))
    else:
        m["rollout_is_std"] = 0.0
    normalized = bounded / (_verl_mean(bounded, mask) + 1e-8)
    m["rollout_is_eff_sample_size"] = 1.0 / float(_verl_mean(normalized.square(), mask))
    if weights.dim() > 1:
        seq_means = _verl_mean(weights, mask, axis=-1)
        m["rollout_is_seq_mean"] = seq_means.mean()
        m["rollout_is_seq_std"] = seq_means.std() if seq_means.numel() > 1 else 0.0
        m["rollout_is_seq_max"], m["rollout_is_seq_min"] = seq_means.max(), seq_means.min()
        m["rollout_is_seq_max_deviation"] = (seq_means - 1.0).abs().max()
        raw_seq_means = _verl_mean(raw, mask, axis=-1)
        m["rollout_is_seq_fraction_high"] = (raw_seq_means > upper).float().mean()
        m["rollout_is_seq_fraction_low"] = (raw_seq_means < lower).float().mean()
    return m


def _is_weights(log_ratio: Tensor, mask: Tensor, rollout_is: str, threshold, batch_normalize: bool):
    """``(weights, metrics as tensors)`` of :func:`compute_rollout_correction_weights`."""
    if rollout_is not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {{'token', 'sequence'}}.")
    upper, lower = _is_threshold(threshold)
    if rollout_is == "token":
        for_metrics = log_ratio
        raw = torch.exp(torch.clamp(log_ratio, min=-_SAFETY_BOUND, max=_SAFETY_BOUND))
    else:  # one weight per sequence: the product of its token ratios
        for_metrics = _verl_sum(log_ratio, mask, axis=-1).unsqueeze(-1)
        raw = torch.exp(torch.clamp(for_metrics, min=-_SAFETY_BOUND, max=_SAFETY_BOUND)).expand_as(log_ratio)
    raw = raw * mask
    if lower is None:  # TIS: truncate at the upper bound
        weights = raw.clamp(max=upper)
    else:  # IcePop: zero outside [lower, upper]
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    metrics = _is_metrics(weights, raw, for_metrics, mask, rollout_is, upper, lower)
    if lower is not None:
        metrics["rollout_is_oob_ratio"] = _verl_mean(((raw < lower) | (raw > upper)).float(), mask)
    weights = weights.detach()  # the weights change the measure, not the objective
    if batch_normalize:
        mask_float = mask.to(dtype=weights.dtype)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rollout_is == "token":
            values, value_mask = weights, mask_float
        else:
            values = _verl_mean(weights, mask, axis=-1)
            value_mask = (mask.sum(dim=-1) > 0).to(dtype=weights.dtype)
        if distributed:  # mean over every rank's batch (the default group, as verl)
            sums = torch.stack([(values * value_mask).sum(), value_mask.sum()])
            torch.distributed.all_reduce(sums)
            mean = sums[0] / sums[1]
        elif rollout_is == "token":
            mean = _verl_mean(weights, mask)
        else:
            mean = (values * value_mask).sum() / value_mask.sum().clamp_min(1e-8)
        if bool(mean > 1e-8):
            weights = weights / mean
            metrics["rollout_is_batch_norm_factor"] = mean
        else:
            metrics["rollout_is_batch_norm_factor"] = 1.0
    return weights, metrics


def compute_rollout_correction_weights(log_ratio: Tensor, response_mask: Tensor, rollout_is: str = "token",
                                       rollout_is_threshold=2.0, rollout_is_batch_normalize: bool = False
                                       ) -> Tuple[Tensor, Dict[str, float]]:
    """verl 0.9.1's rollout IS weights ``pi_train / pi_rollout`` from ``log_ratio`` ``(B, T)``.

    ``rollout_is="token"``: one weight per token; ``"sequence"``: the product over the sequence's
    tokens, repeated at each. Log-ratios are clamped to +-20 before exp. ``rollout_is_threshold``:
    a number truncates the weights at it (TIS), ``"lower_upper"`` zeroes weights outside the window
    (IcePop). ``rollout_is_batch_normalize`` divides by their masked mean (per token or per sequence;
    over the default process group when one is initialized). Returns ``(weights, metrics)``:
    detached ``(B, T)`` weights, 0 at padding, and verl's ``rollout_is_*`` metrics (floats, no prefix).
    """
    weights, metrics = _is_weights(log_ratio, response_mask, rollout_is, rollout_is_threshold,
                                   rollout_is_batch_normalize)
    return weights, _floats(metrics)


def _offpolicy_metrics(old_log_prob: Tensor, rollout_log_prob: Optional[Tensor], mask: Tensor) -> Dict[str, Any]:
    if not mask.any():
        raise ValueError("response_mask must contain at least one valid token (1).")
    train_mean = _verl_mean(old_log_prob, mask, axis=-1)
    m: Dict[str, Any] = {"training_ppl": torch.exp(-train_mean).mean(), "training_log_ppl": (-train_mean).mean()}
    if rollout_log_prob is None:
        return m
    log_ratio = old_log_prob - rollout_log_prob
    m["kl"] = _verl_mean(rollout_log_prob - old_log_prob, mask)
    m["k3_kl"] = _verl_mean(torch.exp(log_ratio) - log_ratio - 1, mask)
    rollout_mean = _verl_mean(rollout_log_prob, mask, axis=-1)
    m["rollout_ppl"] = torch.exp(-rollout_mean).mean()
    m["rollout_log_ppl"] = (-rollout_mean).mean()
    log_ppl_diff = rollout_mean - train_mean
    m["log_ppl_diff"] = log_ppl_diff.mean()
    m["log_ppl_abs_diff"] = log_ppl_diff.abs().mean()
    m["log_ppl_diff_max"], m["log_ppl_diff_min"] = log_ppl_diff.max(), log_ppl_diff.min()
    m["ppl_ratio"] = torch.exp(log_ppl_diff).mean()
    rho = torch.exp(torch.clamp(log_ratio, min=-_SAFETY_BOUND, max=_SAFETY_BOUND))
    m["chi2_token"] = _verl_mean(rho.square(), mask) - 1.0
    seq_log_ratio = torch.clamp(_verl_sum(log_ratio, mask, axis=-1), min=-_SAFETY_BOUND, max=_SAFETY_BOUND)
    m["chi2_seq"] = torch.exp(2.0 * seq_log_ratio).mean() - 1.0
    return m


def compute_offpolicy_metrics(old_log_prob: Tensor, rollout_log_prob: Optional[Tensor], response_mask: Tensor
                              ) -> Dict[str, float]:
    """verl 0.9.1's off-policy diagnostics of the training (``old_log_prob``) against the rollout
    policy: ``training_ppl``, ``training_log_ppl`` and, with rollout log-probs, ``kl``, ``k3_kl``,
    ``rollout_ppl``, ``rollout_log_ppl``, ``log_ppl_diff`` (+ ``_abs_diff``, ``_max``, ``_min``),
    ``ppl_ratio``, ``chi2_token``, ``chi2_seq`` (floats, no prefix)."""
    return _floats(_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask))


def _rollout_correction(old_log_prob, rollout_log_prob, response_mask, rollout_is=None, rollout_is_threshold=2.0,
                        rollout_is_batch_normalize=False, rollout_rs=None, rollout_rs_threshold=None):
    if not response_mask.any():
        raise ValueError("response_mask must contain at least one valid token (1).")
    if old_log_prob.shape != rollout_log_prob.shape or old_log_prob.shape != response_mask.shape:
        raise ValueError(f"old_log_prob {tuple(old_log_prob.shape)}, rollout_log_prob "
                         f"{tuple(rollout_log_prob.shape)} and response_mask {tuple(response_mask.shape)} must match")
    log_ratio = old_log_prob - rollout_log_prob
    metrics: Dict[str, Any] = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        weights, is_metrics = _is_weights(log_ratio, response_mask, rollout_is, rollout_is_threshold,
                                          rollout_is_batch_normalize)
        metrics.update(is_metrics)
    mask = response_mask.clone()
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be given when rollout_rs is enabled")
        mask, rs_metrics = _rejection_mask(log_ratio, response_mask, rollout_rs, rollout_rs_threshold)
        metrics.update(rs_metrics)
    metrics.update(_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask))
    return weights, mask, {f"rollout_corr/{k}": v for k, v in _floats(metrics).items()}


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: Tensor,
    rollout_log_prob: Tensor,
    response_mask: Tensor,
    rollout_is: Optional[str] = None,
    rollout_is_threshold=2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: Optional[str] = None,
    rollout_rs_threshold=None,
) -> Tuple[Optional[Tensor], Tensor, Dict[str, float]]:
    """verl 0.9.1's rollout correction of the training policy (``old_log_prob``) against the rollout
    policy (``rollout_log_prob``), both ``(B, T)``: IS weights
    (:func:`compute_rollout_correction_weights`, when ``rollout_is`` is set), the rejection mask
    (:func:`compute_rollout_rejection_mask`, when ``rollout_rs`` is set) and the off-policy metrics.

    Returns ``(weights or None, mask, metrics)``: the ``(B, T)`` weights themselves (verl wraps them
    in a ``DataProto`` under ``"rollout_is_weights"``), the rejection-sampled mask in
    ``response_mask``'s dtype, and every metric as a float named ``rollout_corr/<name>``.
    """
    return _rollout_correction(old_log_prob, rollout_log_prob, response_mask, rollout_is, rollout_is_threshold,
                               rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold)


def compute_rollout_corr_metrics_from_logprobs(log_prob: Tensor, rollout_log_prob: Tensor, response_mask: Tensor
                                               ) -> Dict[str, float]:
    """The off-policy metrics of the current policy against the rollout's, ``rollout_corr/``-prefixed."""
    return {f"rollout_corr/{k}": v for k, v in compute_offpolicy_metrics(log_prob, rollout_log_prob,
                                                                         response_mask).items()}


# --------------------------------------------------------------------------------------
# KL penalty and the fused log-prob / entropy op.
# --------------------------------------------------------------------------------------

# verl kl_penalty names -> the reference's estimators; verl's "k3" is its clamped low-variance form.
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl", "k3": "low_var_kl"}


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's per-token ``kl_penalty``: ``kl``/``k1``, ``abs``, ``mse``/``k2``, ``low_var_kl``/``k3``;
    a ``+`` suffix (``"k3+"``) keeps the value and takes the gradient of k2 (straight-through)."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base == "full":
        raise NotImplementedError("kl_penalty='full' needs the full distributions (verl does not implement it either)")
    if base not in _KL_NAMES:
        raise ValueError(f"kl_penalty must be one of {sorted(_KL_NAMES)} (optionally with '+'), got {kl_penalty!r}")
    value = kl_estimate(logprob, ref_logprob, _KL_NAMES[base])
    if not kl_penalty.endswith("+") or base in ("mse", "k2"):
        return value
    k2 = 0.5 * (logprob - ref_logprob).square()
    return k2 - k2.detach() + value.detach()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


REDUCTIONS = ("none", "sum", "mean")

# The sampling rule the fused log-prob calls of the running block replay (None: the full softmax).
_SAMPLING: contextvars.ContextVar[Optional[SamplingRule]] = contextvars.ContextVar("grpo_fused_verl_sampling",
                                                                                   default=None)


def sampling_rule_from_verl_rollout(rollout) -> SamplingRule:
    """The truncation of verl's vLLM rollout (``actor_rollout_ref.rollout``): ``top_k`` (<= 0 off),
    ``top_p`` (1 off), ``min_p`` (absent, None or 0 off), ``do_sample=False`` as top-k 1 (greedy: the
    lowest id among tied maxima). ``ValueError`` for a ``repetition_penalty`` other than 1, which no
    rule replays."""
    if float(_get(rollout, "repetition_penalty", 1.0) or 1.0) != 1.0:
        raise ValueError("sampling support cannot replay rollout.repetition_penalty != 1 (it depends on the tokens "
                         "generated so far)")
    if not _get(rollout, "do_sample", True):
        return SamplingRule(top_k=1)
    top_k, top_p, min_p = _get(rollout, "top_k", -1), _get(rollout, "top_p", 1.0), _get(rollout, "min_p", None)
    return SamplingRule(
        top_k=int(top_k) if top_k is not None and int(top_k) > 0 else None,
        top_p=float(top_p) if top_p is not None and float(top_p) < 1.0 else None,
        min_p=float(min_p) if min_p else None,
    )


@contextlib.contextmanager
def sampling_support(rule: Optional[SamplingRule]):
    """Inside the block, :func:`linear_cross_entropy` and :class:`FusedLinearForPPO` score tokens
    under ``rule`` (None or an inactive rule: the full softmax)."""
    if rule is not None and not isinstance(rule, SamplingRule):
        raise TypeError(f"rule must be a grpo_fused.SamplingRule or None, got {type(rule).__name__}")
    token = _SAMPLING.set(rule if rule is not None and rule.active else None)
    try:
        yield
    finally:
        _SAMPLING.reset(token)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
    *,
    strategy: str = "auto",
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """verl's fused ``linear_cross_entropy``: per-token log-prob and entropy of ``hidden @ weight.T / T``.

    Args:
        hidden: ``(..., H)`` (verl passes ``(B, S, H)`` or ``(N, H)``). weight: ``(V, H)``, or with
            ``dist_process_group`` this rank's ``(V_r, H)`` rows of a vocab-parallel lm_head (shards
            in rank order).
        labels: ``(...)`` integer targets in ``[0, V)`` (the full vocabulary), one per token.
        temperature: divides the logits. Default 1.0.
        reduction: ``"none"`` (what verl's actors use): per-token log-probs; ``"sum"`` / ``"mean"``:
            their sum / mean over the tokens, a 0-dim tensor, as verl's kernel returns them.
            The entropy is per token whatever the reduction (as verl).
        dist_process_group: the vocab-parallel group, or None. Computed by
            :func:`grpo_fused.distributed.vocab_parallel_linear_log_softmax` (a few floats per token
            exchanged, never logits); every rank gets the full log-probs and entropy. Backward:
            each rank gets its own ``dweight`` shard, and ``dhidden`` is handed back as verl's
            kernel hands it back, a part per rank whose sum over the group is the full gradient
            (Megatron's sequence-parallel gather sums it in its backward): here ``1 / world_size``
            of the full gradient on each rank.
        strategy, backend: grpo-fused's linear strategy and backend (no process group).

    Returns:
        ``(logprobs, entropy)``: ``(N,)`` each with ``N`` the number of tokens (flattened, as verl
        returns them; ``logprobs`` 0-dim for ``sum`` / ``mean``), fp32 (fp64 for fp64 inputs),
        both differentiable w.r.t. ``hidden`` and ``weight``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if temperature is None:
        temperature = 1.0
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError("hidden must be a tensor of shape (..., H)")
    if not isinstance(labels, torch.Tensor) or labels.numel() != hidden.numel() // max(hidden.shape[-1], 1):
        raise ValueError(f"labels must hold one id per token of hidden {tuple(hidden.shape)}, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    hidden_2d, labels_1d = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rule = _SAMPLING.get()
    sampling = {} if rule is None else dict(top_k=rule.top_k, top_p=rule.top_p, min_p=rule.min_p,
                                            top_k_ties=rule.top_k_ties)
    if dist_process_group is None:
        logprobs, entropy = api.linear_log_softmax(hidden_2d, weight, labels_1d, float(temperature),
                                                   compute_entropy=True, strategy=strategy, backend=backend, **sampling)
    else:
        from ..distributed import vocab_parallel_linear_log_softmax

        world_size = torch.distributed.get_world_size(dist_process_group)
        logprobs, entropy = vocab_parallel_linear_log_softmax(
            _ScaleGrad.apply(hidden_2d, 1.0 / world_size), weight, labels_1d, temperature=float(temperature),
            compute_entropy=True, process_group=dist_process_group, **sampling)
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.sum() / max(labels_1d.numel(), 1)
    return logprobs, entropy


class LinearCrossEntropy:
    """Drop-in for verl's ``LinearCrossEntropy`` autograd function:
    ``LinearCrossEntropy.apply(hidden, weight, labels, temperature, reduction, dist_process_group)``."""

    @staticmethod
    def apply(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        return linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl's torch-backend ``FusedLinearForPPO`` module
    (``verl.utils.experimental.torch_functional``): ``forward(hidden_states, vocab_weights,
    input_ids, temperature) -> (log_probs, entropy)``, shaped like ``input_ids`` (``(B, S)`` or
    ``(T,)``), computed by :func:`grpo_fused.linear_log_softmax` (fused backends never build the
    logits). ``log_probs`` are fp32 (fp64 for fp64 inputs, where verl's rounds to fp32); the entropy
    has the hidden states' dtype, as verl's. ``chunk_size`` and ``impl_backend`` are accepted for
    verl's signature; grpo-fused picks its own chunks and backend (``backend=``)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, backend: str = "auto",
                 strategy: str = "auto"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend
        self.backend = backend
        self.strategy = strategy

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0
                ) -> Tuple[Tensor, Tensor]:
        if hidden_states.dim() not in (2, 3) or tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(f"hidden_states must be (B, S, H) or (T, H) with input_ids (B, S) or (T,), got "
                             f"{tuple(hidden_states.shape)} and {tuple(input_ids.shape)}")
        log_probs, entropy = linear_cross_entropy(hidden_states, vocab_weights, input_ids, temperature,
                                                  strategy=self.strategy, backend=self.backend)
        shape = input_ids.shape
        return log_probs.reshape(shape), entropy.to(hidden_states.dtype).reshape(shape)


# --------------------------------------------------------------------------------------
# Putting it into verl.
# --------------------------------------------------------------------------------------

_SAVED: Dict[Tuple[str, str], Any] = {}  # (module, attribute) -> verl's original object
_MISSING = object()


def _replace(module_name: str, attribute: str, value, *, only_if_loaded: bool = False,
             optional: bool = False) -> Optional[str]:
    """Set ``module.attribute = value`` (importing the module unless ``only_if_loaded``; skipping it
    when ``optional`` and it cannot be imported), keeping verl's original for :func:`unpatch_verl`;
    the ``module.attribute`` name, or None when skipped."""
    if only_if_loaded:
        module = sys.modules.get(module_name)
        if module is None:
            return None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if not optional:
                raise
            return None
    key = (module_name, attribute)
    if key not in _SAVED:
        _SAVED[key] = getattr(module, attribute, _MISSING)
    setattr(module, attribute, value)
    return f"{module_name}.{attribute}"


# The worker methods whose fused log-prob calls are the policy's (compute_ref_log_prob is not).
POLICY_PASSES = ("compute_log_prob", "update_actor")


def _class_key(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _replace_method(cls, name: str, value) -> str:
    """``cls.name = value``, keeping the original for :func:`unpatch_verl`."""
    key = (_class_key(cls), name)
    if key not in _SAVED:
        _SAVED[key] = cls.__dict__.get(name, _MISSING)
    setattr(cls, name, value)
    return f"{key[0]}.{name}"


def _policy_pass(method):
    """``method`` of verl's worker run under the rollout's sampling rule. ``functools.wraps`` keeps
    the attributes verl's ``@register`` dispatch reads from the function."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with sampling_support(sampling_rule_from_verl_rollout(self.config.rollout)):
            return method(self, *args, **kwargs)

    run._grpo_fused_sampling = True
    return run


def _core_algos():
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:
        raise ImportError("this needs verl installed (pip install verl)") from exc
    return core_algos


def register_with_verl(prefix: str = "fused_", kl: bool = True) -> List[str]:
    """Register the policy losses in verl's registry as ``prefix + name`` and, with ``kl``, make
    verl's ``kl_penalty`` grpo-fused's (it takes verl's names, so verl's ``kl_loss_type`` selects it
    unchanged). Returns the registered names (``"kl_penalty"`` for the KL).

    With ``prefix=""`` the losses replace verl's own ``vanilla``, ``gspo``, ... (select one with
    ``actor_rollout_ref.actor.policy_loss.loss_mode``). Needs verl installed.
    """
    core_algos = _core_algos()
    names = []
    registry = getattr(core_algos, "POLICY_LOSS_REGISTRY", None)
    for name, fn in POLICY_LOSSES.items():
        key = ("verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY", prefix + name)
        if registry is not None and key not in _SAVED:
            _SAVED[key] = registry.get(prefix + name, _MISSING)
        core_algos.register_policy_loss(prefix + name)(fn)
        names.append(prefix + name)
    if kl:
        _replace(core_algos.__name__, "kl_penalty", kl_penalty)
        # verl's actor loss binds kl_penalty at its import.
        _replace("verl.workers.utils.losses", "kl_penalty", kl_penalty, only_if_loaded=True)
        names.append("kl_penalty")
    return names


def patch_verl(*, policy_losses: bool = True, kl: bool = True, log_probs: bool = True, backend: str = "auto",
               strategy: str = "auto", sampling_support: bool = False) -> List[str]:
    """Make verl 0.9.1's actor use grpo-fused: the one-line switch. Returns what was replaced.

    * ``policy_losses``: every loss of :data:`POLICY_LOSSES` registered under verl's own name, so
      ``actor.policy_loss.loss_mode`` selects grpo-fused's (rollout correction included in
      ``bypass_mode``).
    * ``kl``: verl's ``kl_penalty`` (in ``core_algos`` and in the actor loss module).
    * ``log_probs``: verl's fused log-prob entry points, used by actors run with
      ``model.use_fused_kernels=True``: ``linear_cross_entropy`` / ``LinearCrossEntropy``
      (``fused_kernel_options.impl_backend=triton``; Megatron's fused forward too, when loaded) and
      ``FusedLinearForPPO`` (``impl_backend=torch``), computed by grpo-fused's ``backend`` /
      ``strategy``.
    * ``sampling_support``: the actor's ``compute_log_prob`` and ``update_actor`` replay the
      rollout's truncation (see the module docstring); off by default.

    Idempotent; :func:`unpatch_verl` undoes it. Call it in every process that runs an actor (for
    verl's Ray workers: ``GRPO_FUSED_PATCH_VERL=1 VERL_USE_EXTERNAL_MODULES=grpo_fused.integrations.verl``).
    """
    patched: List[str] = []
    if policy_losses:
        patched += [f"policy_loss:{name}" for name in register_with_verl(prefix="", kl=False)]
    if kl:
        patched += [n for n in (_replace("verl.trainer.ppo.core_algos", "kl_penalty", kl_penalty),
                                _replace("verl.workers.utils.losses", "kl_penalty", kl_penalty, optional=True)) if n]
    if sampling_support:
        if not log_probs:
            raise ValueError("sampling_support=True needs log_probs=True (it changes the fused log-prob calls)")
        try:
            worker = importlib.import_module("verl.workers.engine_workers").ActorRolloutRefWorker
        except ImportError as exc:
            raise ImportError(f"sampling_support=True wraps verl's ActorRolloutRefWorker, which could not be "
                              f"imported ({exc}); verl's workers need Ray") from exc
        for method in POLICY_PASSES:
            original = _SAVED.get((_class_key(worker), method), worker.__dict__[method])  # idempotent
            patched.append(_replace_method(worker, method, _policy_pass(original)))
    if log_probs:
        fused = functools.partial(linear_cross_entropy, strategy=strategy, backend=backend)

        class _LinearCrossEntropy:
            @staticmethod
            def apply(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
                return fused(hidden, weight, labels, temperature, reduction, dist_process_group)

        module_cls = functools.partial(FusedLinearForPPO, backend=backend, strategy=strategy)
        patched += [n for n in (
            _replace("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", fused),
            _replace("verl.utils.kernel.linear_cross_entropy", "LinearCrossEntropy", _LinearCrossEntropy),
            _replace("verl.utils.experimental.torch_functional", "FusedLinearForPPO", module_cls),
            _replace("verl.models.mcore.model_forward_fused", "linear_cross_entropy", fused, only_if_loaded=True),
            _replace("verl.models.mcore.model_forward_1f1b_overlap", "linear_cross_entropy", fused,
                     only_if_loaded=True),
        ) if n]
    return patched


def unpatch_verl() -> None:
    """Put back every verl object :func:`patch_verl` / :func:`register_with_verl` replaced."""
    for (module_name, attribute), original in list(_SAVED.items()):
        if module_name.endswith(".POLICY_LOSS_REGISTRY"):
            module = sys.modules.get(module_name.rsplit(".", 1)[0])
            registry = getattr(module, "POLICY_LOSS_REGISTRY", None) if module is not None else None
            if registry is not None:
                if original is _MISSING:
                    registry.pop(attribute, None)
                else:
                    registry[attribute] = original
        else:
            owner = _loaded_owner(module_name)
            if owner is not None:
                if original is _MISSING:
                    if attribute in vars(owner):
                        delattr(owner, attribute)
                else:
                    setattr(owner, attribute, original)
        del _SAVED[(module_name, attribute)]


def _loaded_owner(name: str):
    """The loaded module ``name``, or the class ``module.Class`` named so; None when not loaded."""
    if name in sys.modules:
        return sys.modules[name]
    module_name, _, class_name = name.rpartition(".")
    return getattr(sys.modules.get(module_name), class_name, None) if module_name in sys.modules else None


def _patch_from_environment() -> Optional[List[str]]:
    """:func:`patch_verl` when ``GRPO_FUSED_PATCH_VERL`` is set to a value other than ``0``: the
    opt-in that reaches verl's Ray workers through ``VERL_USE_EXTERNAL_MODULES``."""
    if os.environ.get("GRPO_FUSED_PATCH_VERL", "0") in ("", "0"):
        return None
    return patch_verl(sampling_support=os.environ.get("GRPO_FUSED_SAMPLING_SUPPORT", "0") not in ("", "0"))


_patch_from_environment()
