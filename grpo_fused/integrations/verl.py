"""verl-compatible entry points, importable without verl installed.

Policy losses with verl's registered-loss signature and names (``verl.trainer.ppo.core_algos``)::

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
       config=actor_config, rollout_is_weights=None) -> (pg_loss, pg_metrics)

for ``vanilla`` (PPO clip with dual-clip), ``gspo``, ``sapo``, ``gpg``, ``geo_mean`` (GMPO) and
``cispo``. All tensors are ``(B, T)``; ``pg_metrics`` holds verl's ``actor/pg_clipfrac``,
``actor/ppo_kl`` and ``actor/pg_clipfrac_lower`` as Python floats (verl's contract, one host sync).
``config`` is verl's ``ActorConfig``, an OmegaConf ``DictConfig`` or a plain mapping with
``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c`` (vanilla, default 3.0),
``tau_pos`` / ``tau_neg`` (sapo) and ``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``), read the way verl reads them. The numbers follow
verl's definitions exactly, including its log-ratio clamps (``[-20, 20]`` for vanilla / sapo /
cispo, ``<= 10`` for gspo's token-level sequence ratio) and their zero gradients.
:func:`register_with_verl` puts them into verl's registry.

:func:`linear_cross_entropy` / :class:`LinearCrossEntropy` follow verl's fused
``LinearCrossEntropy`` contract, ``(hidden, weight, labels, temperature) -> (logprobs, entropy)``,
both differentiable, computed by :func:`grpo_fused.linear_log_softmax` (fused backends never build
the logits). :func:`kl_penalty` follows verl's ``kl_penalty`` names.

These policy losses work on per-token log-probs, i.e. after the vocabulary pass: their cost is a
few ``(B, T)`` elementwise ops, computed with :func:`grpo_fused.semantics.grpo_loss_from_logps`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .. import api
from ..semantics import LOSS_AGG_MODES, GRPOConfig, grpo_loss_from_logps, kl_estimate

Tensor = torch.Tensor

__all__ = [
    "POLICY_LOSSES",
    "LinearCrossEntropy",
    "compute_policy_loss_cispo",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_gspo",
    "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "get_policy_loss_fn",
    "kl_penalty",
    "linear_cross_entropy",
    "register_with_verl",
]

# verl clamps the token log-ratio to this range before exp() in vanilla, sapo and cispo.
_LOG_RATIO_CLAMP = 20.0
# ... and gspo's token-level sequence log-ratio from above.
_GSPO_LOG_RATIO_MAX = 10.0


# --------------------------------------------------------------------------------------
# Reading verl's config.
# --------------------------------------------------------------------------------------


def _get(config, name: str, default=None):
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        try:
            value = getattr(config, name)
        except (AttributeError, KeyError):  # OmegaConf struct configs raise on a missing key
            value = default
    return default if value is None else value


def _clip_bounds(config) -> Tuple[float, float]:
    if config is None:
        raise ValueError("config is required: verl's ActorConfig (or a mapping with clip_ratio, clip_ratio_low, ...)")
    clip = _get(config, "clip_ratio")
    low, high = _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)
    if low is None or high is None:
        raise ValueError("config must give clip_ratio, or both clip_ratio_low and clip_ratio_high")
    return float(low), float(high)


def _reduction(config, loss_agg_mode: str, mask: Tensor) -> Dict[str, Any]:
    """verl's ``agg_loss`` normalizers, expressed as the reference's ``num_items_in_batch`` /
    ``global_batch_size`` with ``dp_size=1`` (verl multiplies by dp_size what it divides by the global count)."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    info = _get(config, "global_batch_info", None) or {}
    dp_size = int(_get(info, "dp_size", 1))
    batch_num_tokens = _get(info, "batch_num_tokens", None)
    global_batch_size = _get(info, "global_batch_size", None)
    scale_factor = _get(info, "loss_scale_factor", None)
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode != "token-mean" and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    kwargs: Dict[str, Any] = {"num_items_in_batch": None, "global_batch_size": None, "max_completion_length": None}
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is not None:
            kwargs["num_items_in_batch"] = torch.as_tensor(batch_num_tokens, dtype=mask.dtype, device=mask.device) / dp_size
    else:
        if global_batch_size is None:
            # verl counts only sequences with at least one token.
            kwargs["global_batch_size"] = (mask.sum(-1) > 0).to(mask.dtype).sum()
        else:
            kwargs["global_batch_size"] = torch.as_tensor(global_batch_size, dtype=mask.dtype, device=mask.device) / dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm" and scale_factor is not None:
            kwargs["max_completion_length"] = int(scale_factor)
    return kwargs


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / (mask.sum() + 1e-8)  # verl_F.masked_mean


def _policy_loss(log_prob, old_log_prob, advantages, mask, rollout_is_weights, loss_agg_mode, config, **cfg_fields):
    reduction = _reduction(config, loss_agg_mode, mask)
    max_len = reduction.pop("max_completion_length")
    cfg = GRPOConfig(loss_agg_mode=loss_agg_mode, max_completion_length=max_len, compute_entropy=False, **cfg_fields)
    loss, _ = grpo_loss_from_logps(
        log_prob, advantages, mask, cfg.params, old_logps=old_log_prob, is_weights=rollout_is_weights, **reduction
    )
    return loss


def _as_float_mask(response_mask: Tensor, like: Tensor) -> Tensor:
    return response_mask.to(like.dtype if like.is_floating_point() else torch.float32)


def _clamped_log_prob(log_prob: Tensor, old_log_prob: Tensor) -> Tuple[Tensor, Tensor]:
    """``(log_prob', log_ratio)``: ``log_prob' - old`` is verl's clamped log-ratio, with its zero
    gradient outside ``[-20, 20]``, so the unclamped loss of ``log_prob'`` is verl's clamped loss."""
    log_ratio = torch.clamp(log_prob - old_log_prob, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return old_log_prob + log_ratio, log_ratio


def _check(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights):
    for name, t in (("old_log_prob", old_log_prob), ("log_prob", log_prob), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be (B, T), got shape {tuple(log_prob.shape)}")
    shape = tuple(log_prob.shape)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} like log_prob, got {tuple(t.shape)}")
    if rollout_is_weights is not None and tuple(rollout_is_weights.shape) not in (shape, (shape[0], 1)):
        raise ValueError(f"rollout_is_weights must have shape {shape} or ({shape[0]}, 1), got {tuple(rollout_is_weights.shape)}")


# --------------------------------------------------------------------------------------
# Policy losses (verl names).
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """One policy-loss call as verl makes it, after the checks: ``mask`` is the float response mask."""

    old_log_prob: Tensor
    log_prob: Tensor
    advantages: Tensor
    mask: Tensor
    loss_agg_mode: str
    config: Any
    rollout_is_weights: Optional[Tensor]

    def loss(self, log_prob=None, old_log_prob=None, loss_agg_mode=None, **cfg_fields) -> Tensor:
        """The spec's loss of this call (verl's normalizers), with the given log-probs / mode / config fields."""
        return _policy_loss(
            self.log_prob if log_prob is None else log_prob,
            self.old_log_prob if old_log_prob is None else old_log_prob,
            self.advantages, self.mask, self.rollout_is_weights, loss_agg_mode or self.loss_agg_mode, self.config,
            **cfg_fields,
        )

    def masked_mean(self, x: Tensor) -> Tensor:
        return _masked_mean(x, self.mask)


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
            call = _Call(old_log_prob, log_prob, advantages, _as_float_mask(response_mask, log_prob), loss_agg_mode,
                         config, rollout_is_weights)
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


@_verl_policy_loss("token-mean")
def compute_policy_loss_vanilla(call: _Call):
    """PPO clipped surrogate with dual-clip (``clip_ratio_c``, default 3.0), verl's ``vanilla``."""
    low, high = _clip_bounds(call.config)
    clip_ratio_c = float(_get(call.config, "clip_ratio_c", 3.0))
    log_prob_c, log_ratio = _clamped_log_prob(call.log_prob, call.old_log_prob)
    loss = call.loss(log_prob_c, loss_type="dapo", epsilon_low=low, epsilon_high=high, clip_ratio_c=clip_ratio_c)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        clipped = torch.maximum(-call.advantages * ratio, -call.advantages * torch.clamp(ratio, 1 - low, 1 + high))
        lower = call.masked_mean(((clipped > -call.advantages * clip_ratio_c) & (call.advantages < 0)).float())
    return loss, _clip_metrics(call, ratio, low, high, log_ratio, lower)


@_verl_policy_loss("seq-mean-token-mean")
def compute_policy_loss_gspo(call: _Call):
    """GSPO as verl writes it: token ratio ``sg(s_i) * pi / sg(pi)`` (value the sequence ratio,
    gradient per token), clipped, aggregated ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says."""
    low, high = _clip_bounds(call.config)
    log_prob, mask = call.log_prob, call.mask
    with torch.no_grad():
        log_ratio = log_prob - call.old_log_prob
        seq_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        capped = torch.clamp(seq_log_ratio, max=_GSPO_LOG_RATIO_MAX)
    # A token-level ratio whose log is log_prob - sg(log_prob) + sg(capped): old = sg(log_prob) - capped;
    # past the cap verl's clamp has zero gradient, so the log-prob is detached there.
    log_prob_g = torch.where(seq_log_ratio <= _GSPO_LOG_RATIO_MAX, log_prob, log_prob.detach())
    loss = call.loss(log_prob_g, log_prob.detach() - capped, "seq-mean-token-mean", loss_type="dapo",
                     epsilon_low=low, epsilon_high=high)
    return loss, _clip_metrics(call, torch.exp(capped).expand_as(log_prob), low, high, log_ratio)


@_verl_policy_loss("seq-mean-token-mean")
def compute_policy_loss_sapo(call: _Call):
    """SAPO soft gate ``sigmoid(tau (r - 1)) * 4 / tau``, ``tau_pos`` / ``tau_neg`` from config,
    aggregated ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says (as verl)."""
    if call.config is None:
        raise ValueError("config is required: verl's ActorConfig (or a mapping with tau_pos, tau_neg)")
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
    if call.config is None:
        raise ValueError("config is required (verl's ActorConfig or a mapping)")
    return call.loss(loss_type="gpg"), {}


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
def compute_policy_loss_cispo(call: _Call):
    """CISPO as verl: ``-sg(clip(r, 1 - low, 1 + high)) * A * log_prob`` (two-sided clip)."""
    low, high = _clip_bounds(call.config)
    # verl's [-20, 20] clamp of the log-ratio cannot change a weight clipped to [1 - low, 1 + high].
    loss = call.loss(loss_type="cispo", epsilon_low=low, epsilon_high=high, cispo_two_sided=True)
    with torch.no_grad():
        log_ratio = torch.clamp(call.log_prob - call.old_log_prob, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        metrics = {
            "actor/pg_clipfrac": call.masked_mean((ratio != torch.clamp(ratio, 1 - low, 1 + high)).float()),
            "actor/ppo_kl": call.masked_mean(-log_ratio),
            "actor/pg_clipfrac_lower": 0.0,
        }
    return loss, metrics


POLICY_LOSSES: Dict[str, Callable] = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg,
    "geo_mean": compute_policy_loss_geo_mean,
    "cispo": compute_policy_loss_cispo,
}


def get_policy_loss_fn(name: str) -> Callable:
    """The policy loss registered under verl's ``name`` (``vanilla``, ``gspo``, ...), as verl's lookup."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"Unsupported loss mode: {name}. Supported modes are: {list(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def register_with_verl(prefix: str = "fused_") -> list:
    """Register the policy losses in verl's registry as ``prefix + name``; returns the names.

    With ``prefix=""`` they replace verl's own ``vanilla``, ``gspo``, ... (select one with
    ``actor_rollout_ref.actor.policy_loss.loss_mode``). Needs verl installed.
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:
        raise ImportError("register_with_verl needs verl installed (pip install verl)") from exc
    names = []
    for name, fn in POLICY_LOSSES.items():
        core_algos.register_policy_loss(prefix + name)(fn)
        names.append(prefix + name)
    return names


# --------------------------------------------------------------------------------------
# KL penalty and the fused log-prob / entropy op.
# --------------------------------------------------------------------------------------

# verl kl_penalty names -> the reference's estimators; verl's "k3" is its clamped low-variance form.
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl", "k3": "low_var_kl"}


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's per-token ``kl_penalty``: ``kl``/``k1``, ``abs``, ``mse``/``k2``, ``low_var_kl``/``k3``;
    a ``+`` suffix (``"k3+"``) keeps the value and takes the gradient of k2 (straight-through)."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base not in _KL_NAMES:
        raise ValueError(f"kl_penalty must be one of {sorted(_KL_NAMES)} (optionally with '+'), got {kl_penalty!r}")
    value = kl_estimate(logprob, ref_logprob, _KL_NAMES[base])
    if not kl_penalty.endswith("+") or base in ("mse", "k2"):
        return value
    k2 = 0.5 * (logprob - ref_logprob).square()
    return k2 - k2.detach() + value.detach()


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
        hidden: ``(..., H)`` (verl passes ``(B, S, H)`` or ``(N, H)``). weight: ``(V, H)``.
        labels: ``(...)`` integer targets in ``[0, V)``. temperature: divides the logits.
        reduction: only ``"none"`` (what verl's actors use). dist_process_group: must be None
            (vocab-parallel heads are not supported).

    Returns:
        ``(logprobs, entropy)``, both ``(N,)`` fp32 with ``N`` the number of tokens (flattened, as
        verl returns them), both differentiable w.r.t. ``hidden`` and ``weight``.
    """
    if reduction != "none":
        raise ValueError(f"reduction must be 'none', got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError("dist_process_group (vocab-parallel lm_head) is not supported; pass None")
    if temperature is None:
        temperature = 1.0
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError("hidden must be a tensor of shape (..., H)")
    if not isinstance(labels, torch.Tensor) or labels.numel() != hidden.numel() // hidden.shape[-1]:
        raise ValueError(f"labels must hold one id per token of hidden {tuple(hidden.shape)}, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    logprobs, entropy = api.linear_log_softmax(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), float(temperature),
        compute_entropy=True, strategy=strategy, backend=backend,
    )
    return logprobs, entropy


class LinearCrossEntropy:
    """Drop-in for verl's ``LinearCrossEntropy`` autograd function:
    ``LinearCrossEntropy.apply(hidden, weight, labels, temperature, reduction, dist_process_group)``."""

    @staticmethod
    def apply(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        return linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)
