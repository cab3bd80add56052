"""What every Triton kernel file shares: codes, row layout, launch configuration, the row
softmax-statistics pass, and op registration.

* Codes: the float-hyperparameter slots (``P_*``, :class:`grpo_fused.semantics.Slot`) a kernel
  loads from the ``params`` vector, and the surrogate / KL / scale codes it specializes on
  (``LOSS_*``, ``KL_*``, ``SCALE_*``), as ``tl.constexpr`` globals read from the semantics layer,
  the one place they are defined.
* :class:`RowLayout` / :func:`as_rows`: ``(N, V)`` and ``(B, T, V)`` logits (any row and batch
  stride, contiguous vocab) addressed with int64 offsets and a 1-D grid over rows.
* :func:`launch_config`: the fixed ``(BLOCK_V, num_warps)`` of the row kernels.
* :func:`row_softmax_stats`: one streaming pass over a row, ``(lse, z_target, entropy)``.
* :func:`triton_op` / :func:`launchable`: every launcher runs inside a ``torch.library.triton_op``
  so that ``torch.compile(fullgraph=True)`` sees one op per launch.

Only the semantics layer is imported from the package: kernels never read the spec or the API.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from grpo_fused.semantics import AdvantageScale, KLEstimator, Slot, Surrogate, compute_dtype

Tensor = torch.Tensor

__all__ = ["RowLayout", "TL_DTYPE", "acc_dtype", "as_rows", "check_inplace_backward", "launch_config", "launchable",
           "load_param", "row_offset", "row_softmax_stats", "triton_op"]

# --------------------------------------------------------------------------------------
# Codes (tl.constexpr globals: a jit function may read those, and only those, from its module).
# --------------------------------------------------------------------------------------

P_INV_TEMPERATURE = tl.constexpr(int(Slot.INV_TEMPERATURE))
P_EPSILON_HIGH = tl.constexpr(int(Slot.EPSILON_HIGH))
P_CLIP_LOW = tl.constexpr(int(Slot.CLIP_LOW))
P_CLIP_HIGH = tl.constexpr(int(Slot.CLIP_HIGH))
P_DELTA = tl.constexpr(int(Slot.DELTA))
P_CLIP_RATIO_C = tl.constexpr(int(Slot.CLIP_RATIO_C))
P_BETA = tl.constexpr(int(Slot.BETA))
P_SAPO_TAU_POS = tl.constexpr(int(Slot.SAPO_TAU_POS))
P_SAPO_TAU_NEG = tl.constexpr(int(Slot.SAPO_TAU_NEG))
P_ENTROPY_COEF = tl.constexpr(int(Slot.ENTROPY_COEF))

LOSS_CLIP = tl.constexpr(int(Surrogate.CLIP))
LOSS_CISPO = tl.constexpr(int(Surrogate.CISPO))
LOSS_SAPO = tl.constexpr(int(Surrogate.SAPO))
LOSS_GPG = tl.constexpr(int(Surrogate.GPG))

KL_K3 = tl.constexpr(int(KLEstimator.K3))
KL_LOW_VAR = tl.constexpr(int(KLEstimator.LOW_VAR_KL))
KL_K1 = tl.constexpr(int(KLEstimator.K1))
KL_K2 = tl.constexpr(int(KLEstimator.K2))

SCALE_GROUP = tl.constexpr(int(AdvantageScale.GROUP))
SCALE_BATCH = tl.constexpr(int(AdvantageScale.BATCH))

# Per-token clip flags the GRPO epilogue writes (int8): TRL's clip_ratio/low_mean and high_mean
# (cispo: FLAG_HIGH = capped).
FLAG_LOW = tl.constexpr(1)
FLAG_HIGH = tl.constexpr(2)

TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
acc_dtype = compute_dtype  # one rule for the accumulation dtype: the semantics layer's


@triton.jit
def load_param(params, slot: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One float hyperparameter from the float64 ``params`` vector, rounded once to ``ACC_DTYPE``."""
    return tl.load(params + slot).to(ACC_DTYPE)


# --------------------------------------------------------------------------------------
# The row pass.
# --------------------------------------------------------------------------------------


@triton.jit
def row_offset(row, rows_inner, stride_outer, stride_inner):
    return (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner


@triton.jit
def row_softmax_stats(
    row_ptr,
    target,
    V,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """One pass over a row of V logits: ``(lse, z_target, entropy)`` of ``z = logits * inv_temperature``.

    Each lane keeps its own running max ``m``, ``s = sum exp(z - m)`` and, for the entropy,
    ``u = sum exp(z - m) * (z - m)``; lanes are merged once after the loop, so the loop has no
    cross-lane reduction. Tracking ``z - m`` rather than ``z`` keeps the entropy free of the
    ``lse - E[z]`` cancellation when logits are large. Lanes that have seen only -inf (masked
    vocab, the ragged last tile) are guarded so that no ``-inf - -inf`` NaN appears.
    """
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    m = tl.full([BLOCK_V], neg_inf, ACC_DTYPE)
    s = tl.zeros([BLOCK_V], ACC_DTYPE)
    u = tl.zeros([BLOCK_V], ACC_DTYPE)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=neg_inf).to(ACC_DTYPE) * inv_temperature
        # One exp per element instead of two: with gap = -|z - m|, exp(gap) is the rescale of
        # the old sums when z is the lane's new max, and the new term when it is not. The
        # update is otherwise a handful of FMAs: at bf16 and V = 152k the loop must stay under
        # the ~1.5 ms it takes to stream 16k rows from HBM, and a second exp would not.
        is_new_max = z > m
        gap = tl.where(is_new_max, m - z, z - m)
        gap = tl.where(z > neg_inf, gap, neg_inf)  # a masked column adds nothing (and -inf - -inf is NaN)
        t = tl.exp(gap)
        if COMPUTE_ENTROPY:
            # u relative to the new max: t * (u + s * (m - z)) on a new max, else u + t * (z - m).
            rebased = t * (u + tl.where(s > 0, s * gap, 0.0))
            added = u + tl.where(t > 0, t * gap, 0.0)
            u = tl.where(is_new_max, rebased, added)
        s = tl.where(is_new_max, s * t + 1.0, s + t)
        m = tl.maximum(m, z)
    m_row = tl.max(m, axis=0)
    m_row_safe = tl.where(m_row > neg_inf, m_row, 0.0)
    lane_scale = tl.exp(m - m_row_safe)
    sum_exp = tl.sum(s * lane_scale, axis=0)
    log_sum_exp = tl.log(sum_exp)
    lse = m_row_safe + log_sum_exp
    z_target = tl.load(row_ptr + target).to(ACC_DTYPE) * inv_temperature
    entropy = lse * 0.0
    if COMPUTE_ENTROPY:
        shift = tl.where(m > neg_inf, m - m_row_safe, 0.0)
        u_row = tl.sum(lane_scale * (u + s * shift), axis=0)
        entropy = log_sum_exp - u_row / sum_exp
    return lse, z_target, entropy


# --------------------------------------------------------------------------------------
# Host side: layout, launch configuration, registration.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How token rows sit in a logits buffer whose last dim is contiguous.

    Row ``n`` starts at element ``(n // rows_inner) * stride_outer + (n % rows_inner) * stride_inner``:
    ``(N, V)`` is ``rows_inner = N, stride_outer = 0``; ``(B, T, V)`` is ``rows_inner = T``.
    """

    n_rows: int
    vocab: int
    rows_inner: int
    stride_outer: int
    stride_inner: int

    @staticmethod
    def of(x: Tensor) -> "RowLayout":
        if x.dim() not in (2, 3):
            raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(x.shape)}")
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"logits must be contiguous in its last (vocab) dim, got strides {x.stride()}")
        if x.dim() == 2:
            n, v = x.shape
            return RowLayout(n, v, max(n, 1), 0, x.stride(0))
        b, t, v = x.shape
        return RowLayout(b * t, v, max(t, 1), x.stride(0), x.stride(1))


def as_rows(logits: Tensor) -> Tensor:
    """``(..., V)`` -> a 2-D or 3-D tensor :class:`RowLayout` accepts: ``logits`` itself when it
    already is one with a contiguous last dim, else a view, else a copy."""
    if logits.dim() in (2, 3) and (logits.shape[-1] <= 1 or logits.stride(-1) == 1):
        return logits
    if logits.dim() >= 1 and logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        return logits.unsqueeze(0)
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return logits.reshape(-1, logits.shape[-1])


def check_inplace_backward(logits: Tensor) -> None:
    """``inplace_backward`` writes into the logits' storage: refuse inputs read through a copy."""
    if logits.dim() not in (2, 3) or (logits.shape[-1] > 1 and logits.stride(-1) != 1):
        raise ValueError(
            "inplace_backward=True needs 2-D or 3-D logits with a contiguous last dim (there would be "
            f"no buffer to write into), got shape {tuple(logits.shape)} strides {logits.stride()}"
        )


# Opt-in tuning knob for a GPU session (benchmarks/bench_logits.py), read once at import:
# GRPO_FUSED_BLOCK_V=4096 tries wider tiles without touching the code.
_MAX_BLOCK_V = int(os.environ.get("GRPO_FUSED_BLOCK_V", "2048"))


def launch_config(vocab: int, block_v: Optional[int] = None) -> Tuple[int, int]:
    """``(BLOCK_V, num_warps)`` of the row kernels: a fixed config, not autotuned (no tuning race,
    fast first call).

    2048 columns over 8 warps is 8 columns a thread: one 16-byte load of bf16 per tile, and
    ~3 x 8 fp32 accumulators a thread, few enough registers for several programs per SM to keep
    loads in flight (a streaming kernel lives on occupancy). Chosen by that count, not yet
    tuned on a GPU; ``block_v`` (or ``GRPO_FUSED_BLOCK_V``) overrides it. num_warps keeps 8
    columns a thread, capped at 8 warps.
    """
    if block_v is None:
        block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 16)))
    if block_v & (block_v - 1) or block_v < 16:
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    num_warps = max(1, min(8, block_v // 256))
    return block_v, num_warps


def launchable(kernel):
    """The kernel, launchable both eagerly and inside a ``torch.library.triton_op`` being traced.

    This is the one place the torch.compile integration shapes the kernels: ``wrap_triton``
    accepts plain ``@triton.jit`` functions but not ``@triton.heuristics`` wrappers, so the
    optional-tensor flags (``HAS_OLD``, ``COMPUTE_ENTROPY``, ...) are computed by the launchers
    as ``tensor is not None`` and passed as constexpr keywords instead of by heuristics.
    Launchers run inside the ops: an eager op call disables the wrapper (the kernel is launched
    directly), a traced one records it.
    """
    return torch.library.wrap_triton(kernel)


def triton_op(name: str, mutates_args=()):
    """``torch.library.triton_op("grpo_fused::<name>")``, tolerant of a file being imported twice.

    (The source folder ``kernels/`` is importable as ``kernels`` from a checkout as well as
    ``grpo_fused.kernels`` when installed; a second registration would raise.)
    """

    def register(fn):
        if hasattr(torch.ops.grpo_fused, name):
            return getattr(torch.ops.grpo_fused, name).default
        return torch.library.triton_op(f"grpo_fused::{name}", mutates_args=mutates_args)(fn)

    return register
