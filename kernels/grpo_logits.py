"""The GRPO-family loss from logits ``(B, T, V)`` in one pass over the vocabulary.

Forward, one Triton program per token: the vocab loop of :mod:`grpo_fused.kernels.selective_log_softmax`
(online logsumexp, target gather and entropy in fp32), then an epilogue that evaluates the token
terms of the spec (:mod:`grpo_fused.reference`) on the program's scalars: importance ratio, the
clipped / delta / dual-clip surrogate (grpo, bnpo, dr_grpo, dapo, luspo), cispo, sapo, gpg, the
KL estimators (k3, low_var_kl, k1, k2, abs; optionally times the ratio), the rollout IS weight and
the per-token weight of the reduction. It writes, per token, ``logp``, ``lse``, ``entropy``, the
loss contribution, ``dloss/dlogp``, ratio, KL and clip flags; nothing of size V.

The reduction is a per-token weight ``w_t`` (the reduction's normalizer folded into the mask,
computed with O(N) torch ops before the launch) times the token loss, so the loss is
``sum_t w_t * l_t`` finished by ``torch.sum`` over the N contributions: a fixed-order second
stage with no float atomics, bitwise reproducible run to run.

Backward is one launch of the vocab backward kernel with ``dlogp = dloss * (dloss/dlogp)_t``
(and the entropy bonus' ``dH``), optionally writing into the logits buffer.

Sequence-level variants (GSPO's sequence ratio, GMPO's geometric mean) need every token of a
sequence before the surrogate can be evaluated; they run the same vocab pass and finish with
O(B*T) torch ops over the per-token ``logps`` (never re-reading the logits): the spec's own
:func:`grpo_fused.reference.grpo_loss_from_logps`, differentiated by autograd down to the
per-token ``dlogp`` / ``dH`` that the one backward kernel consumes.

Both kernels are ``torch.library.triton_op``s (``grpo_fused::triton_grpo_logits_fwd`` here, the
vocab ops in :mod:`grpo_fused.kernels.selective_log_softmax`), so ``torch.compile(fullgraph=True)``
sees them as ops; float hyperparameters are runtime kernel arguments (no Triton recompile).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from grpo_fused.config import GRPOConfig
from grpo_fused.reference import GRPOOutput, grpo_output_from_logps
from grpo_fused.reference import _extreme, _has_tokens, _sequence_fraction

from .selective_log_softmax import (
    _TL_DTYPE,
    RowLayout,
    SelectiveLogSoftmax,
    _acc_dtype,
    _as_rows,
    _launch_config,
    _launchable,
    _row_offset,
    _row_softmax_stats,
    check_inplace_backward,
    dlogits_from_row_grads,
    triton_op,
)

Tensor = torch.Tensor

__all__ = ["grpo_loss", "grpo_fwd", "GRPOLogitsLoss", "TokenTerms", "token_weights"]

# Surrogate families of the epilogue (constexpr codes).
LOSS_CLIP, LOSS_CISPO, LOSS_SAPO, LOSS_GPG = 0, 1, 2, 3
_LOSS_CODE = {
    "grpo": LOSS_CLIP, "bnpo": LOSS_CLIP, "dr_grpo": LOSS_CLIP, "dapo": LOSS_CLIP, "luspo": LOSS_CLIP,
    "cispo": LOSS_CISPO, "sapo": LOSS_SAPO, "gpg": LOSS_GPG,
}
KL_K3, KL_LOW_VAR, KL_K1, KL_K2, KL_ABS = 0, 1, 2, 3, 4
_KL_CODE = {"k3": KL_K3, "low_var_kl": KL_LOW_VAR, "k1": KL_K1, "k2": KL_K2, "abs": KL_ABS}

FLAG_LOW, FLAG_HIGH = 1, 2  # clip_ratio/low_mean, clip_ratio/high_mean (cispo: FLAG_HIGH = capped)


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


@triton.jit
def _policy_term(logp, log_ratio, advantage, clip_low, clip_high, cispo_cap, delta, clip_ratio_c,
                 sapo_tau_pos, sapo_tau_neg,
                 LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
                 CISPO_TWO_SIDED: tl.constexpr):
    """``(loss, dloss/dlogp, ratio, flags)`` of one token's surrogate, before IS weight and reduction.

    ``d ratio / d logp = ratio`` whether or not old logps are given (without them the ratio is
    ``exp(logp - sg(logp))``: value 1, derivative 1), so every ratio-based derivative is
    ``dloss/dratio * ratio``. Where two branches tie (``torch.min``), their derivatives agree
    except on a measure-zero set, so the ``<=`` choice matches the reference's autograd.
    """
    ratio = tl.exp(log_ratio)
    flags = (ratio * 0.0).to(tl.int8)
    if LOSS == 0:  # clipped surrogate, TRL two-sided delta, verl dual clip
        clipped = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        d_clipped = ((ratio >= clip_low) & (ratio <= clip_high)).to(ratio.dtype)
        if HAS_DELTA:
            unclipped = tl.minimum(ratio, delta)
            d_unclipped = (ratio <= delta).to(ratio.dtype)
        else:
            unclipped = ratio
            d_unclipped = ratio * 0.0 + 1.0
        take_unclipped = unclipped * advantage <= clipped * advantage
        loss = -tl.where(take_unclipped, unclipped, clipped) * advantage
        dloss_dratio = -tl.where(take_unclipped, d_unclipped, d_clipped) * advantage
        if HAS_DUAL_CLIP:
            bound = -advantage * clip_ratio_c
            use_bound = (advantage < 0) & (bound < loss)
            loss = tl.where(use_bound, bound, loss)
            dloss_dratio = tl.where(use_bound, 0.0, dloss_dratio)
        dloss_dlogp = dloss_dratio * ratio
        # TRL measures clipping on the ratio after the delta cap.
        capped = unclipped
        flags = tl.where((capped < clip_low) & (advantage < 0), flags | 1, flags)
        flags = tl.where((capped > clip_high) & (advantage > 0), flags | 2, flags)
    elif LOSS == 1:  # cispo: stop-gradient clipped ratio times A * logp
        if CISPO_TWO_SIDED:
            weight = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        else:
            weight = tl.minimum(ratio, cispo_cap)
        loss = -weight * advantage * logp
        dloss_dlogp = -weight * advantage
        flags = tl.where((ratio > cispo_cap) & (advantage > 0), flags | 2, flags)
    elif LOSS == 2:  # sapo: soft gate sigmoid(tau (r - 1)) * 4 / tau
        tau = tl.where(advantage > 0, sapo_tau_pos, sapo_tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -gate * 4.0 / tau * advantage
        dloss_dlogp = -4.0 * gate * (1.0 - gate) * advantage * ratio
    else:  # gpg / REINFORCE: no ratio at all (the ratio metric is 1)
        loss = -advantage * logp
        dloss_dlogp = -advantage + 0.0 * logp
        ratio = ratio * 0.0 + 1.0
    return loss, dloss_dlogp, ratio, flags


@triton.jit
def _kl_term(logp, ref_logp, KL: tl.constexpr):
    """``(kl, dkl/dlogp)`` of one token for the estimator code ``KL``."""
    if KL == 0:  # k3
        d = ref_logp - logp
        e = tl.exp(d)
        kl = e - d - 1.0
        dkl = 1.0 - e
    elif KL == 1:  # low_var_kl: k3 with verl's clamps; a clamped value has no gradient
        d = ref_logp - logp
        d_clamped = tl.minimum(tl.maximum(d, -20.0), 20.0)
        e = tl.exp(d_clamped)
        raw = e - d_clamped - 1.0
        kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
        passes = (d >= -20.0) & (d <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
        dkl = tl.where(passes, 1.0 - e, 0.0)
    elif KL == 2:  # k1
        kl = logp - ref_logp
        dkl = kl * 0.0 + 1.0
    elif KL == 3:  # k2
        kl = 0.5 * (logp - ref_logp) * (logp - ref_logp)
        dkl = logp - ref_logp
    else:  # abs; sign(0) = 0 as torch.abs' gradient
        diff = logp - ref_logp
        kl = tl.abs(diff)
        dkl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    return kl, dkl


@triton.jit
def _grpo_logits_fwd_kernel(
    logits_ptr,  # (N, V) rows addressed through (rows_inner, stride_outer, stride_inner)
    ids_ptr,  # (N,) int32 / int64
    advantages_ptr,  # (N,) ACC_DTYPE
    old_logps_ptr,  # (N,) or None
    ref_logps_ptr,  # (N,) or None (None also when beta == 0)
    is_weights_ptr,  # (N,) or None
    token_weights_ptr,  # (N,) reduction weight w_t (mask / normalizer)
    entropy_weights_ptr,  # (N,) mask / max(sum mask, 1), or None (no entropy bonus)
    logps_ptr,  # out (N,)
    lse_ptr,  # out (N,)
    entropy_ptr,  # out (N,) or None
    loss_ptr,  # out (N,) w_t * token loss
    dlogps_ptr,  # out (N,) d loss / d logp_t
    ratio_ptr,  # out (N,)
    kl_ptr,  # out (N,), written when HAS_KL
    flags_ptr,  # out (N,) int8, FLAG_LOW | FLAG_HIGH
    V,
    rows_inner,
    stride_outer,
    stride_inner,
    inv_temperature,
    clip_low,
    clip_high,
    cispo_cap,
    delta,
    clip_ratio_c,
    beta,
    sapo_tau_pos,
    sapo_tau_neg,
    entropy_coef,
    BLOCK_V: tl.constexpr,
    LOSS: tl.constexpr,
    KL: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    CISPO_TWO_SIDED: tl.constexpr,
    BIAS_CORRECT_KL: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_IS_WEIGHTS: tl.constexpr,
    HAS_ENTROPY_BONUS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, rows_inner, stride_outer, stride_inner)
    target = tl.load(ids_ptr + row).to(tl.int64)
    lse, z_target, entropy = _row_softmax_stats(
        row_ptr, target, V, inv_temperature, BLOCK_V, COMPUTE_ENTROPY, ACC_DTYPE
    )
    logp = z_target - lse

    advantage = tl.load(advantages_ptr + row).to(ACC_DTYPE)
    if HAS_OLD:
        log_ratio = logp - tl.load(old_logps_ptr + row).to(ACC_DTYPE)
    else:
        log_ratio = logp * 0.0
    loss, dloss_dlogp, ratio, flags = _policy_term(
        logp, log_ratio, advantage, clip_low, clip_high, cispo_cap, delta, clip_ratio_c,
        sapo_tau_pos, sapo_tau_neg, LOSS, HAS_DELTA, HAS_DUAL_CLIP, CISPO_TWO_SIDED,
    )
    if HAS_IS_WEIGHTS:
        is_weight = tl.load(is_weights_ptr + row).to(ACC_DTYPE)
        loss = loss * is_weight
        dloss_dlogp = dloss_dlogp * is_weight
    if HAS_KL:
        kl, dkl = _kl_term(logp, tl.load(ref_logps_ptr + row).to(ACC_DTYPE), KL)
        if BIAS_CORRECT_KL:
            if LOSS != 3:  # gpg's ratio is the constant 1
                dkl = dkl * ratio + kl * ratio
            kl = kl * ratio
        loss = loss + beta * kl
        dloss_dlogp = dloss_dlogp + beta * dkl
        tl.store(kl_ptr + row, kl)
    token_weight = tl.load(token_weights_ptr + row).to(ACC_DTYPE)
    loss = loss * token_weight
    dloss_dlogp = dloss_dlogp * token_weight
    if HAS_ENTROPY_BONUS:
        loss = loss - entropy_coef * tl.load(entropy_weights_ptr + row).to(ACC_DTYPE) * entropy

    tl.store(logps_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    tl.store(loss_ptr + row, loss)
    tl.store(dlogps_ptr + row, dloss_dlogp)
    tl.store(ratio_ptr + row, ratio)
    tl.store(flags_ptr + row, flags)


# --------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenTerms:
    """Per-token results of :func:`grpo_fwd`, each ``(N,)`` in the accumulation dtype.

    ``loss`` is ``w_t * (policy * is_weight + beta * kl) - entropy_coef * wH_t * H`` so the
    loss is ``loss.sum()``; ``dlogps`` is its derivative in ``logp`` (without the entropy term).
    ``kl`` is None when beta == 0; ``entropy`` None unless computed; ``flags`` int8.
    """

    logps: Tensor
    lse: Tensor
    entropy: Optional[Tensor]
    loss: Tensor
    dlogps: Tensor
    ratio: Tensor
    kl: Optional[Tensor]
    flags: Tensor


def grpo_fwd(
    logits: Tensor,
    ids: Tensor,
    advantages: Tensor,
    token_weights: Tensor,
    config: GRPOConfig,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    entropy_weights: Optional[Tensor] = None,
) -> TokenTerms:
    """One launch: vocab pass + token-level GRPO epilogue (through the ``torch.library`` op).

    Args:
        logits: ``(N, V)`` or ``(B, T, V)``, last dim contiguous, any float dtype.
        ids: ``N`` int32 / int64 target ids (any shape with N elements).
        advantages, token_weights, old_logps, ref_logps, is_weights, entropy_weights: ``(N,)``
            contiguous in the accumulation dtype (fp32; fp64 for fp64 logits). ``token_weights``
            is the reduction's ``w_t``; ``entropy_weights`` (None: no bonus) the bonus' ``mask /
            max(sum mask, 1)``. ``ref_logps`` is ignored when ``config.beta == 0``.
        config: a token-level config (``importance_sampling_level == "token"``, not gmpo).
    """
    if config.is_sequence_level:
        raise ValueError("grpo_fwd evaluates token-level surrogates only (GSPO/GMPO go through grpo_loss)")
    has_kl = config.beta != 0.0
    if has_kl and ref_logps is None:
        raise ValueError("ref_logps is required when config.beta != 0")
    c = config
    logps, lse, entropy, loss, dlogps, ratio, kl, flags = _grpo_fwd_op(
        logits, ids, advantages, token_weights, old_logps, ref_logps if has_kl else None, is_weights,
        entropy_weights if c.compute_entropy else None,
        c.temperature, c.epsilon_low, c.eps_high,
        c.delta if c.delta is not None else 0.0,
        c.clip_ratio_c if c.clip_ratio_c is not None else 0.0,
        c.beta, c.sapo_temperature_pos, c.sapo_temperature_neg, c.entropy_coef,
        _LOSS_CODE[c.loss_type], _KL_CODE[c.kl_estimator],
        c.delta is not None, c.clip_ratio_c is not None, c.cispo_two_sided, c.use_bias_correction_kl,
        c.compute_entropy,
    )
    return TokenTerms(logps, lse, entropy if c.compute_entropy else None, loss, dlogps, ratio,
                      kl if has_kl else None, flags)


def _grpo_fwd_launch(
    logits: Tensor,
    ids: Tensor,
    advantages: Tensor,
    token_weights: Tensor,
    old_logps: Optional[Tensor],
    ref_logps: Optional[Tensor],
    is_weights: Optional[Tensor],
    entropy_weights: Optional[Tensor],
    temperature: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float,
    clip_ratio_c: float,
    beta: float,
    sapo_tau_pos: float,
    sapo_tau_neg: float,
    entropy_coef: float,
    loss_code: int,
    kl_code: int,
    has_delta: bool,
    has_dual_clip: bool,
    cispo_two_sided: bool,
    bias_correct_kl: bool,
    compute_entropy: bool,
    block_v: Optional[int] = None,
) -> Tuple[Tensor, ...]:
    """Validate, allocate, launch. ``ref_logps=None`` means no KL term; absent outputs are empty."""
    layout = RowLayout.of(logits)
    acc = _acc_dtype(logits.dtype)
    n = layout.n_rows
    if ids.numel() != n:
        raise ValueError(f"ids must have {n} elements (one per logits row), got shape {tuple(ids.shape)}")
    for name, t in (("advantages", advantages), ("token_weights", token_weights), ("old_logps", old_logps),
                    ("ref_logps", ref_logps), ("is_weights", is_weights), ("entropy_weights", entropy_weights)):
        if t is not None and (tuple(t.shape) != (n,) or t.dtype != acc or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({n},) {acc} tensor, got {tuple(t.shape)} {t.dtype}")
    device = logits.device
    has_kl = ref_logps is not None

    def new(present=True, dtype=acc):
        return torch.empty(n if present else 0, dtype=dtype, device=device)

    logps, lse, entropy, loss, dlogps, ratio = new(), new(), new(compute_entropy), new(), new(), new()
    kl, flags = new(has_kl), new(dtype=torch.int8)
    if n == 0:
        return logps, lse, entropy, loss, dlogps, ratio, kl, flags
    block, warps = _launch_config(layout.vocab, block_v)
    _launchable(_grpo_logits_fwd_kernel)[(n,)](
        logits,
        ids.reshape(-1).contiguous(),
        advantages,
        old_logps,
        ref_logps,
        is_weights,
        token_weights,
        entropy_weights if compute_entropy else None,
        logps,
        lse,
        entropy,
        loss,
        dlogps,
        ratio,
        kl,
        flags,
        layout.vocab,
        layout.rows_inner,
        layout.stride_outer,
        layout.stride_inner,
        1.0 / temperature,
        1.0 - epsilon_low,
        1.0 + epsilon_high,
        epsilon_high,
        delta,
        clip_ratio_c,
        beta,
        sapo_tau_pos,
        sapo_tau_neg,
        entropy_coef,
        BLOCK_V=block,
        LOSS=loss_code,
        KL=kl_code,
        HAS_DELTA=has_delta,
        HAS_DUAL_CLIP=has_dual_clip,
        CISPO_TWO_SIDED=cispo_two_sided,
        BIAS_CORRECT_KL=bias_correct_kl,
        HAS_OLD=old_logps is not None,
        HAS_KL=has_kl,
        HAS_IS_WEIGHTS=is_weights is not None,
        HAS_ENTROPY_BONUS=compute_entropy and entropy_weights is not None,
        COMPUTE_ENTROPY=compute_entropy,
        ACC_DTYPE=_TL_DTYPE[acc],
        num_warps=warps,
    )
    return logps, lse, entropy, loss, dlogps, ratio, kl, flags


@triton_op("triton_grpo_logits_fwd")
def _grpo_fwd_op(
    logits: Tensor,
    ids: Tensor,
    advantages: Tensor,
    token_weights: Tensor,
    old_logps: Optional[Tensor],
    ref_logps: Optional[Tensor],
    is_weights: Optional[Tensor],
    entropy_weights: Optional[Tensor],
    temperature: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float,
    clip_ratio_c: float,
    beta: float,
    sapo_tau_pos: float,
    sapo_tau_neg: float,
    entropy_coef: float,
    loss_code: int,
    kl_code: int,
    has_delta: bool,
    has_dual_clip: bool,
    cispo_two_sided: bool,
    bias_correct_kl: bool,
    compute_entropy: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _grpo_fwd_launch(
        logits, ids, advantages, token_weights, old_logps, ref_logps, is_weights, entropy_weights,
        temperature, epsilon_low, epsilon_high, delta, clip_ratio_c, beta, sapo_tau_pos, sapo_tau_neg,
        entropy_coef, loss_code, kl_code, has_delta, has_dual_clip, cispo_two_sided, bias_correct_kl,
        compute_entropy,
    )


# --------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SavedGRPO:
    temperature: float
    inplace_backward: bool
    logits_shape: Tuple[int, ...]


class GRPOLogitsLoss(torch.autograd.Function):
    """Token-level GRPO loss: ``(logits, ids, per-token inputs) -> (loss, TokenTerms fields)``.

    Differentiable in ``logits`` only; advantages, old / ref logps and weights are data. The
    backward is one launch of the vocab backward kernel with ``dlogp_t = dloss * (dloss/dlogp)_t``
    and, with an entropy bonus, ``dH_t = -dloss * entropy_coef * wH_t``.
    """

    @staticmethod
    def forward(ctx, logits, ids, advantages, token_weights, old_logps, ref_logps, is_weights,
                entropy_weights, config: GRPOConfig, inplace_backward: bool):
        rows = _as_rows(logits)
        terms = grpo_fwd(rows, ids, advantages, token_weights, config, old_logps, ref_logps,
                         is_weights, entropy_weights)
        loss = terms.loss.sum()
        entropy_dweights = None
        if entropy_weights is not None and terms.entropy is not None:
            entropy_dweights = entropy_weights * (-config.entropy_coef)
        ctx.saved = _SavedGRPO(config.temperature, inplace_backward, tuple(logits.shape))
        ctx.save_for_backward(rows, ids, terms.lse, terms.dlogps, terms.entropy, entropy_dweights)
        outputs = (terms.logps, terms.entropy, terms.ratio, terms.kl, terms.flags)
        ctx.mark_non_differentiable(*[t for t in outputs if t is not None])
        return (loss,) + outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        rows, ids, lse, dloss_dlogps, entropy, entropy_dweights = ctx.saved_tensors
        saved: _SavedGRPO = ctx.saved
        dlogps = dloss_dlogps * grad_loss
        dentropy = None if entropy_dweights is None else entropy_dweights * grad_loss
        dlogits = dlogits_from_row_grads(rows, ids, lse, dlogps, dentropy, entropy, saved.temperature,
                                         saved.inplace_backward)
        return (dlogits.view(saved.logits_shape),) + (None,) * 9


# --------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------


def token_weights(mask: Tensor, config: GRPOConfig, num_items_in_batch=None, global_batch_size=None) -> Tensor:
    """``(B, T)`` weights ``w`` with ``reduce_loss(x, mask) == sum(w * x)`` for a ``(B, T)`` x.

    The normalizers are those of :func:`grpo_fused.reference.reduce_loss` (TRL 1.16, or verl's
    ``loss_agg_mode``), folded into the mask so that the kernel's reduction is a plain sum.
    """
    B, T = mask.shape
    c = config

    def tokens():
        if num_items_in_batch is None:
            return mask.sum().clamp(min=1.0)
        return torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device).clamp(min=1.0)

    if c.loss_agg_mode is not None:
        if c.loss_agg_mode == "token-mean":
            return mask * (c.dp_size / tokens())
        # verl: sequences with at least one token, unless the caller gives the global count.
        if global_batch_size is None:
            seqs = (mask.sum(-1) > 0).to(mask.dtype).sum().clamp(min=1.0)
        else:
            seqs = torch.as_tensor(global_batch_size, dtype=mask.dtype, device=mask.device)
        scale = c.dp_size / seqs
        if c.loss_agg_mode == "seq-mean-token-sum":
            return mask * scale
        if c.loss_agg_mode == "seq-mean-token-sum-norm":
            return mask * (scale / (c.max_completion_length or T))
        return mask / (mask.sum(-1, keepdim=True) + 1e-8) * scale  # seq-mean-token-mean
    lt = c.loss_type
    if lt in ("grpo", "sapo", "gmpo"):
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * B)
    if lt == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if lt == "dr_grpo":
        return mask / (B * (c.max_completion_length or T))
    if lt in ("dapo", "cispo", "gpg"):
        return mask / tokens()
    if lt == "luspo":
        return mask / B
    raise ValueError(f"loss_type {lt!r} has no reduction")


def _per_token(x: Optional[Tensor], B: int, T: int, dtype: torch.dtype) -> Optional[Tensor]:
    """``(B,)``, ``(B, 1)`` or ``(B, T)`` -> contiguous ``(B*T,)`` in ``dtype`` (a view when it already is)."""
    if x is None:
        return None
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    return x.to(dtype).expand(B, T).reshape(B * T).contiguous()


def _metric_means(values, mask_flat: Tensor) -> Tensor:
    """Masked means ``sum(x * m) / max(sum m, 1)`` of several ``(N,)`` vectors in one matmul."""
    stacked = torch.stack(values)  # (k, N)
    return (stacked @ mask_flat) / mask_flat.sum().clamp(min=1.0)


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
    inplace_backward: bool = False,
) -> GRPOOutput:
    """Triton :func:`grpo_fused.reference.grpo_loss`: same arguments, same :class:`GRPOOutput`.

    Args:
        logits: ``(B, T, V)`` fp32 / bf16 / fp16 / fp64; a slice such as ``logits[:, :-1]`` is
            read in place (last dim contiguous), never upcast or copied.
        completion_ids: ``(B, T)`` int64 / int32. advantages: ``(B,)``, ``(B, 1)`` or ``(B, T)``.
        completion_mask: ``(B, T)`` loss mask, None = ones. old_logps / ref_logps: ``(B, T)`` or None.
        config: :class:`GRPOConfig`. is_weights: ``(B,)``, ``(B, 1)`` or ``(B, T)`` or None.
        num_items_in_batch / global_batch_size: the reduction's global normalizers.
        inplace_backward: backward writes ``dlogits`` into the logits buffer (zero extra memory);
            the caller must not read those logits after backward. Default False.

    Returns:
        :class:`GRPOOutput`; ``loss`` is differentiable in ``logits`` only.
    """
    B, T = completion_ids.shape
    acc = _acc_dtype(logits.dtype)
    device = logits.device
    if inplace_backward:
        check_inplace_backward(logits)
    mask = torch.ones(B, T, dtype=acc, device=device) if completion_mask is None else completion_mask.to(acc)

    if config.is_sequence_level:
        logps, entropy = SelectiveLogSoftmax.apply(
            logits, completion_ids, float(config.temperature), bool(config.compute_entropy), bool(inplace_backward)
        )
        return grpo_output_from_logps(
            logps, entropy, completion_ids, advantages, completion_mask, old_logps, ref_logps, config,
            is_weights, num_items_in_batch, global_batch_size,
        )

    if config.beta != 0.0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0")
    weights = token_weights(mask, config, num_items_in_batch, global_batch_size).reshape(-1).contiguous()
    mask_flat = mask.reshape(-1)
    entropy_weights = None
    if config.compute_entropy and config.entropy_coef != 0.0:
        entropy_weights = (mask_flat / mask_flat.sum().clamp(min=1.0)).contiguous()
    loss, logps, entropy, ratio, kl, flags = GRPOLogitsLoss.apply(
        logits,
        completion_ids,
        _per_token(advantages, B, T, acc),
        weights,
        _per_token(old_logps, B, T, acc),
        _per_token(ref_logps, B, T, acc) if config.beta != 0.0 else None,
        _per_token(is_weights, B, T, acc),
        entropy_weights,
        config,
        bool(inplace_backward),
    )

    names, values = [], []
    if kl is not None:
        names.append("kl")
        values.append(kl)
    if entropy is not None:
        names.append("entropy")
        values.append(entropy)
    names.append("ratio")
    values.append(ratio)
    if config.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        low = (flags & FLAG_LOW).to(acc)
        high = ((flags & FLAG_HIGH) >> 1).to(acc)
        names += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
        values += [low, high, torch.maximum(low, high)]
    elif config.loss_type == "cispo":
        names.append("cispo_clip_ratio")
        values.append(((flags & FLAG_HIGH) >> 1).to(acc))
    means = _metric_means(values, mask_flat)
    metrics = {name: means[i] for i, name in enumerate(names)}
    if config.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        # TRL's per-sequence extremes of the clipped fraction (O(B*T), the reference's helpers).
        has_tokens = _has_tokens(mask, mask)
        metrics["clip_ratio/low_min"] = _extreme(_sequence_fraction(low.view(B, T), mask), has_tokens, largest=False)
        metrics["clip_ratio/high_max"] = _extreme(_sequence_fraction(high.view(B, T), mask), has_tokens, largest=True)
    return GRPOOutput(
        loss, logps.view(B, T), None if entropy is None else entropy.view(B, T), metrics
    )
