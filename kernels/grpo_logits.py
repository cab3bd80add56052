"""The token-level GRPO-family loss from logits ``(N, V)`` in one pass over the vocabulary.

Forward, one Triton program per token: the row pass of :mod:`grpo_fused.kernels.common`
(online logsumexp, target gather and entropy in fp32), then an epilogue that evaluates the token
terms of the spec (:mod:`grpo_fused.semantics.terms`) on the program's scalars: importance ratio,
the clipped / delta / dual-clip surrogate, cispo, sapo, gpg, the KL estimators (k3, low_var_kl,
k1, k2, abs; optionally times the ratio), the rollout IS weight and the per-token weight of the
reduction. It writes, per token, ``logp``, ``lse``, ``entropy``, the loss contribution,
``dloss/dlogp``, ratio, KL and clip flags; nothing of size V.

The reduction is a per-token weight ``w_t`` (:func:`grpo_fused.semantics.token_weights`, O(N)
torch ops before the launch) times the token loss, so the loss is ``sum_t w_t * l_t`` finished by
``torch.sum`` over the N contributions: a fixed-order second stage with no float atomics, bitwise
reproducible run to run.

Backward is one launch of the vocab backward kernel with ``dlogp = dloss * (dloss/dlogp)_t``
(and the entropy bonus' ``dH``), optionally writing into the logits buffer.

Hyperparameters: the float ones are loaded from ``params`` (the float64 vector of
:class:`grpo_fused.semantics.Slot`); the surrogate and KL codes and the
:class:`grpo_fused.semantics.Option` bits are compile-time (``tl.constexpr``). This file knows
nothing of configs or loss-type names: the Triton backend (:mod:`grpo_fused.backends.triton`)
derives these arguments from the loss-type table.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from grpo_fused.semantics import Option, Slot

from .common import (FLAG_HIGH, FLAG_LOW, KL_K1, KL_K2, KL_K3, KL_LOW_VAR, LOSS_CISPO, LOSS_CLIP, LOSS_GPG, LOSS_SAPO,
                     P_BETA, P_CLIP_HIGH, P_CLIP_LOW, P_CLIP_RATIO_C, P_DELTA, P_ENTROPY_COEF, P_EPSILON_HIGH,
                     P_INV_TEMPERATURE, P_SAPO_TAU_NEG, P_SAPO_TAU_POS, TL_DTYPE, RowLayout, acc_dtype, as_rows,
                     launch_config, launchable, load_param, row_offset, row_softmax_stats, row_vector, triton_op)
from .selective_log_softmax import check_params, dlogits_from_row_grads

Tensor = torch.Tensor

__all__ = ["GRPOLogitsLoss", "TokenTerms", "grpo_fwd"]


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


@triton.jit
def _policy_term(logp, log_ratio, advantage, params, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr,
                 HAS_DUAL_CLIP: tl.constexpr, CISPO_TWO_SIDED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``(loss, dloss/dlogp, ratio, flags)`` of one token's surrogate, before IS weight and reduction.

    ``d ratio / d logp = ratio`` whether or not old logps are given (without them the ratio is
    ``exp(logp - sg(logp))``: value 1, derivative 1), so every ratio-based derivative is
    ``dloss/dratio * ratio``. Where two branches tie (``torch.min``), their derivatives agree
    except on a measure-zero set, so the ``<=`` choice matches the reference's autograd.
    """
    ratio = tl.exp(log_ratio)
    flags = tl.full([], 0, tl.int8)
    if LOSS == LOSS_CLIP:  # clipped surrogate, TRL two-sided delta, verl dual clip
        clip_low = load_param(params, P_CLIP_LOW, ACC_DTYPE)
        clip_high = load_param(params, P_CLIP_HIGH, ACC_DTYPE)
        clipped = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        d_clipped = ((ratio >= clip_low) & (ratio <= clip_high)).to(ratio.dtype)
        if HAS_DELTA:
            delta = load_param(params, P_DELTA, ACC_DTYPE)
            unclipped = tl.minimum(ratio, delta)
            d_unclipped = (ratio <= delta).to(ratio.dtype)
        else:
            unclipped = ratio
            d_unclipped = ratio * 0.0 + 1.0
        take_unclipped = unclipped * advantage <= clipped * advantage
        loss = -tl.where(take_unclipped, unclipped, clipped) * advantage
        dloss_dratio = -tl.where(take_unclipped, d_unclipped, d_clipped) * advantage
        if HAS_DUAL_CLIP:
            bound = -advantage * load_param(params, P_CLIP_RATIO_C, ACC_DTYPE)
            use_bound = (advantage < 0) & (bound < loss)
            loss = tl.where(use_bound, bound, loss)
            dloss_dratio = tl.where(use_bound, 0.0, dloss_dratio)
        dloss_dlogp = dloss_dratio * ratio
        # TRL measures clipping on the ratio after the delta cap.
        capped = unclipped
        flags = tl.where((capped < clip_low) & (advantage < 0), flags | FLAG_LOW, flags)
        flags = tl.where((capped > clip_high) & (advantage > 0), flags | FLAG_HIGH, flags)
    elif LOSS == LOSS_CISPO:  # stop-gradient clipped ratio times A * logp
        cap = load_param(params, P_EPSILON_HIGH, ACC_DTYPE)
        if CISPO_TWO_SIDED:
            weight = tl.minimum(tl.maximum(ratio, load_param(params, P_CLIP_LOW, ACC_DTYPE)),
                                load_param(params, P_CLIP_HIGH, ACC_DTYPE))
        else:
            weight = tl.minimum(ratio, cap)
        loss = -weight * advantage * logp
        dloss_dlogp = -weight * advantage
        flags = tl.where((ratio > cap) & (advantage > 0), flags | FLAG_HIGH, flags)
    elif LOSS == LOSS_SAPO:  # soft gate sigmoid(tau (r - 1)) * 4 / tau
        tau = tl.where(advantage > 0, load_param(params, P_SAPO_TAU_POS, ACC_DTYPE),
                       load_param(params, P_SAPO_TAU_NEG, ACC_DTYPE))
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -gate * 4.0 / tau * advantage
        dloss_dlogp = -4.0 * gate * (1.0 - gate) * advantage * ratio
    else:  # LOSS_GPG, REINFORCE: no ratio at all (the ratio metric is 1)
        loss = -advantage * logp
        dloss_dlogp = -advantage + 0.0 * logp
        ratio = tl.full([], 1.0, ACC_DTYPE)  # not 0 * ratio + 1: gpg never reads old logps (NaN there)
    if LOSS != LOSS_GPG:
        # min / max / clamp drop a NaN operand on the GPU (IEEE minNum); torch.clamp keeps it.
        # A NaN log-ratio (NaN logits in the row, a NaN old logp) gives a NaN loss, as in the spec.
        is_nan = log_ratio != log_ratio
        loss = tl.where(is_nan, log_ratio, loss)
        dloss_dlogp = tl.where(is_nan, log_ratio, dloss_dlogp)
    return loss, dloss_dlogp, ratio, flags


@triton.jit
def _kl_term(logp, ref_logp, KL: tl.constexpr):
    """``(kl, dkl/dlogp)`` of one token for the estimator code ``KL``."""
    if KL == KL_K3:
        d = ref_logp - logp
        e = tl.exp(d)
        kl = e - d - 1.0
        dkl = 1.0 - e
    elif KL == KL_LOW_VAR:  # k3 with verl's clamps; a clamped value has no gradient
        d = ref_logp - logp
        d_clamped = tl.minimum(tl.maximum(d, -20.0), 20.0)
        e = tl.exp(d_clamped)
        raw = e - d_clamped - 1.0
        kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
        kl = tl.where(d != d, d, kl)  # torch.clamp keeps a NaN; min / max would drop it
        passes = (d >= -20.0) & (d <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
        dkl = tl.where(passes, 1.0 - e, 0.0)
    elif KL == KL_K1:
        kl = logp - ref_logp
        dkl = kl * 0.0 + 1.0
    elif KL == KL_K2:
        kl = 0.5 * (logp - ref_logp) * (logp - ref_logp)
        dkl = logp - ref_logp
    else:  # KL_ABS; sign(0) = 0 as torch.abs' gradient
        diff = logp - ref_logp
        kl = tl.abs(diff)
        dkl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    return kl, dkl


@triton.jit
def _grpo_logits_fwd_kernel(
    logits_ptr,  # (N, V) rows addressed through (rows_inner, stride_outer, stride_inner)
    ids_ptr,  # (N,) int32 / int64
    params_ptr,  # (NUM_SLOTS,) float64 hyperparameters
    advantages_ptr,  # (N,) ACC_DTYPE
    old_logps_ptr,  # (N,) or None
    ref_logps_ptr,  # (N,) or None (None also when there is no KL term)
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
    SKIP_MASKED: tl.constexpr,
    VEC: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, rows_inner, stride_outer, stride_inner)
    target = tl.load(ids_ptr + row).to(tl.int64)
    # A masked position has token weight 0 (and entropy weight 0): it is selected out of the loss,
    # its dloss/dlogp is exactly 0 and, with SKIP_MASKED, its row is not read at all.
    token_weight = tl.load(token_weights_ptr + row).to(ACC_DTYPE)
    keep = token_weight != 0.0
    entropy_weight = token_weight * 0.0
    if HAS_ENTROPY_BONUS:
        entropy_weight = tl.load(entropy_weights_ptr + row).to(ACC_DTYPE)
        keep = keep | (entropy_weight != 0.0)
    n_cols = V
    if SKIP_MASKED:
        n_cols = tl.where(keep, V, 0)
    lse, z_target, entropy = row_softmax_stats(
        row_ptr, target, n_cols, load_param(params_ptr, P_INV_TEMPERATURE, ACC_DTYPE), BLOCK_V, VEC,
        COMPUTE_ENTROPY, ACC_DTYPE
    )
    logp = z_target - lse
    if SKIP_MASKED:
        logp = tl.where(keep, logp, 0.0)
        lse = tl.where(keep, lse, 0.0)
        entropy = tl.where(keep, entropy, 0.0)

    advantage = tl.load(advantages_ptr + row).to(ACC_DTYPE)
    if HAS_OLD:
        log_ratio = logp - tl.load(old_logps_ptr + row).to(ACC_DTYPE)
    else:
        log_ratio = logp * 0.0
    loss, dloss_dlogp, ratio, flags = _policy_term(
        logp, log_ratio, advantage, params_ptr, LOSS, HAS_DELTA, HAS_DUAL_CLIP, CISPO_TWO_SIDED, ACC_DTYPE,
    )
    if HAS_IS_WEIGHTS:
        is_weight = tl.load(is_weights_ptr + row).to(ACC_DTYPE)
        loss = loss * is_weight
        dloss_dlogp = dloss_dlogp * is_weight
    if HAS_KL:
        kl, dkl = _kl_term(logp, tl.load(ref_logps_ptr + row).to(ACC_DTYPE), KL)
        if BIAS_CORRECT_KL:
            if LOSS != LOSS_GPG:  # gpg's ratio is the constant 1
                dkl = dkl * ratio + kl * ratio
            kl = kl * ratio
        beta = load_param(params_ptr, P_BETA, ACC_DTYPE)
        loss = loss + beta * kl
        dloss_dlogp = dloss_dlogp + beta * dkl
        tl.store(kl_ptr + row, tl.where(keep, kl, 0.0))
    # Selected, not multiplied: 0 * (a NaN or inf standing at a masked position) would be NaN.
    weighted = token_weight != 0.0
    loss = tl.where(weighted, loss * token_weight, 0.0)
    dloss_dlogp = tl.where(weighted, dloss_dlogp * token_weight, 0.0)
    if HAS_ENTROPY_BONUS:
        entropy_coef = load_param(params_ptr, P_ENTROPY_COEF, ACC_DTYPE)
        loss = loss - tl.where(entropy_weight != 0.0, entropy_coef * entropy_weight * entropy, 0.0)
    ratio = tl.where(keep, ratio, 1.0)
    flags = tl.where(keep, flags, 0)

    tl.store(logps_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    tl.store(loss_ptr + row, loss)
    tl.store(dlogps_ptr + row, dloss_dlogp)
    tl.store(ratio_ptr + row, ratio)
    tl.store(flags_ptr + row, flags)


# --------------------------------------------------------------------------------------
# Launcher and op.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenTerms:
    """Per-token results of :func:`grpo_fwd`, each ``(N,)`` in the accumulation dtype (absent: empty).

    ``loss`` is ``w_t * (policy * is_weight + beta * kl) - entropy_coef * wH_t * H`` so the
    loss is ``loss.sum()``; ``dlogps`` is its derivative in ``logp`` (without the entropy term).
    ``kl`` is empty without a KL term; ``entropy`` empty unless computed; ``flags`` int8
    (``FLAG_LOW`` | ``FLAG_HIGH``).
    """

    logps: Tensor
    lse: Tensor
    entropy: Optional[Tensor]
    loss: Tensor
    dlogps: Tensor
    ratio: Tensor
    kl: Optional[Tensor]
    flags: Tensor


@triton_op("triton_grpo_logits_fwd")
def grpo_fwd(
    logits: Tensor,
    ids: Tensor,
    params: Tensor,
    advantages: Tensor,
    token_weights: Tensor,
    old_logps: Optional[Tensor],
    ref_logps: Optional[Tensor],
    is_weights: Optional[Tensor],
    entropy_weights: Optional[Tensor],
    surrogate: int,
    kl_estimator: int,
    options: int,
    skip_masked: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One launch: vocab pass + token-level GRPO epilogue (the op ``grpo_fused::triton_grpo_logits_fwd``).

    Args:
        logits: ``(N, V)`` or ``(B, T, V)``, last dim contiguous, any float dtype.
        ids: ``N`` int32 / int64 target ids (any shape with N elements).
        params: ``(NUM_SLOTS,)`` float64 hyperparameters on the logits' device.
        advantages, token_weights, old_logps, ref_logps, is_weights, entropy_weights: ``(N,)``
            contiguous in the accumulation dtype (fp32; fp64 for fp64 logits). ``token_weights``
            is the reduction's ``w_t``; ``entropy_weights`` (None: no bonus) the bonus' ``mask /
            max(sum mask, 1)``; ``ref_logps=None`` means no KL term.
        surrogate: a token-level :class:`grpo_fused.semantics.Surrogate` code (not GEO_MEAN).
        kl_estimator: a :class:`grpo_fused.semantics.KLEstimator` code (read only with ``ref_logps``).
        options: :class:`grpo_fused.semantics.Option` bits.
        skip_masked: a row whose token weight (and entropy weight) is 0 -- a masked position --
            is not read: its ``logp``, ``lse``, ``entropy``, ``kl``, loss and ``dlogps`` are 0, its
            ratio 1, its flags 0. Default False (every row read; masked rows still contribute
            nothing: their loss and gradient are selected out, never multiplied by 0).

    Returns:
        The :class:`TokenTerms` fields in order, each ``(N,)``; an absent one is an empty tensor.
    """
    layout = RowLayout.of(logits)
    acc = acc_dtype(logits.dtype)
    n = layout.n_rows
    if ids.numel() != n:
        raise ValueError(f"ids must have {n} elements (one per logits row), got shape {tuple(ids.shape)}")
    check_params(params, logits.device)
    for name, t in (("advantages", advantages), ("token_weights", token_weights), ("old_logps", old_logps),
                    ("ref_logps", ref_logps), ("is_weights", is_weights), ("entropy_weights", entropy_weights)):
        if t is not None and (tuple(t.shape) != (n,) or t.dtype != acc or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({n},) {acc} tensor, got {tuple(t.shape)} {t.dtype}")
    options = Option(options)
    compute_entropy = bool(options & Option.COMPUTE_ENTROPY)
    has_kl = ref_logps is not None

    def new(present=True, dtype=acc):
        return torch.empty(n if present else 0, dtype=dtype, device=logits.device)

    logps, lse, entropy, loss, dlogps, ratio = new(), new(), new(compute_entropy), new(), new(), new()
    kl, flags = new(has_kl), new(dtype=torch.int8)
    if n == 0:
        return logps, lse, entropy, loss, dlogps, ratio, kl, flags
    block, warps = launch_config(layout.vocab)
    launchable(_grpo_logits_fwd_kernel)[(n,)](
        logits, ids.reshape(-1).contiguous(), params, advantages, old_logps, ref_logps, is_weights, token_weights,
        entropy_weights if compute_entropy else None,
        logps, lse, entropy, loss, dlogps, ratio, kl, flags,
        layout.vocab, layout.rows_inner, layout.stride_outer, layout.stride_inner,
        BLOCK_V=block,
        LOSS=surrogate,
        KL=kl_estimator,
        HAS_DELTA=bool(options & Option.DELTA),
        HAS_DUAL_CLIP=bool(options & Option.DUAL_CLIP),
        CISPO_TWO_SIDED=bool(options & Option.CISPO_TWO_SIDED),
        BIAS_CORRECT_KL=bool(options & Option.BIAS_CORRECT_KL),
        HAS_OLD=old_logps is not None,
        HAS_KL=has_kl,
        HAS_IS_WEIGHTS=is_weights is not None,
        HAS_ENTROPY_BONUS=compute_entropy and entropy_weights is not None,
        COMPUTE_ENTROPY=compute_entropy,
        SKIP_MASKED=bool(skip_masked),
        VEC=row_vector(logits, block),
        ACC_DTYPE=TL_DTYPE[acc],
        num_warps=warps,
        enable_fp_fusion=True,
    )
    return logps, lse, entropy, loss, dlogps, ratio, kl, flags


# --------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SavedGRPO:
    inplace_backward: bool
    logits_shape: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class EpilogueCodes:
    """The compile-time half of a token-level loss: what :func:`grpo_fwd` specializes on."""

    surrogate: int
    kl_estimator: Optional[int]
    options: int


class GRPOLogitsLoss(torch.autograd.Function):
    """Token-level GRPO loss: ``(logits, ids, params, per-token inputs) -> (loss, logps, entropy,
    ratio, kl, flags)``.

    Differentiable in ``logits`` only; advantages, old / ref logps and weights are data. The
    backward is one launch of the vocab backward kernel with ``dlogp_t = dloss * (dloss/dlogp)_t``
    and, with an entropy bonus, ``dH_t = -dloss * entropy_coef * wH_t``.
    """

    @staticmethod
    def forward(ctx, logits, ids, params, advantages, token_weights, old_logps, ref_logps, is_weights,
                entropy_weights, codes: EpilogueCodes, inplace_backward: bool, skip_masked: bool = False):
        rows = as_rows(logits)
        has_kl = codes.kl_estimator is not None
        if has_kl and ref_logps is None:
            raise ValueError("ref_logps is required with a KL term")
        terms = TokenTerms(*grpo_fwd(
            rows, ids, params, advantages, token_weights, old_logps, ref_logps if has_kl else None, is_weights,
            entropy_weights, codes.surrogate, codes.kl_estimator or 0, codes.options, bool(skip_masked),
        ))
        compute_entropy = bool(Option(codes.options) & Option.COMPUTE_ENTROPY)
        terms = dataclasses.replace(terms, entropy=terms.entropy if compute_entropy else None,
                                    kl=terms.kl if has_kl else None)
        loss = terms.loss.sum()
        entropy_dweights = None
        if entropy_weights is not None and terms.entropy is not None:
            entropy_dweights = -entropy_weights * params[Slot.ENTROPY_COEF].to(entropy_weights.dtype)
        ctx.saved = _SavedGRPO(inplace_backward, tuple(logits.shape))
        ctx.save_for_backward(rows, ids, params, terms.lse, terms.dlogps, terms.entropy, entropy_dweights)
        outputs = (terms.logps, terms.entropy, terms.ratio, terms.kl, terms.flags)
        ctx.mark_non_differentiable(*[t for t in outputs if t is not None])
        return (loss,) + outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        rows, ids, params, lse, dloss_dlogps, entropy, entropy_dweights = ctx.saved_tensors
        saved: _SavedGRPO = ctx.saved
        dlogps = dloss_dlogps * grad_loss
        dentropy = None if entropy_dweights is None else entropy_dweights * grad_loss
        dlogits = dlogits_from_row_grads(rows, ids, lse, dlogps, dentropy, entropy, params, saved.inplace_backward)
        return (dlogits.view(saved.logits_shape),) + (None,) * 11
