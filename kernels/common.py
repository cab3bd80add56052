"""What every Triton kernel file shares: codes, row layout, launch configuration, the row
softmax-statistics pass, and op registration.

* Codes: the float-hyperparameter slots (``P_*``, :class:`grpo_fused.semantics.Slot`) a kernel
  loads from the ``params`` vector, and the surrogate / KL / scale codes it specializes on
  (``LOSS_*``, ``KL_*``, ``SCALE_*``), as ``tl.constexpr`` globals read from the semantics layer,
  the one place they are defined.
* :class:`RowLayout` / :func:`as_rows`: ``(N, V)`` and ``(B, T, V)`` logits (any row and batch
  stride, contiguous vocab) addressed with int64 offsets and a 1-D grid over rows.
* :func:`launch_config`: the fixed ``(BLOCK_V, num_warps)`` of the row kernels.
* :func:`row_softmax_stats`: one streaming pass over a row, ``(lse, z_target, entropy)``, over the
  whole row or over a sampling support; :func:`row_gradient_tile`: the gradient of one tile of a
  row from the saved ``lse``.
* :func:`scaled_logits`: ``z``, computed in one place for every pass that compares it;
  :func:`in_support`: the sampling-support test of the row passes, on the raw logits against the
  thresholds the cutoff search (:mod:`grpo_fused.kernels.sampling_support`) derived from ``z``.
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

from grpo_fused.semantics import NUM_SLOTS, AdvantageScale, KLEstimator, Slot, Surrogate, compute_dtype

Tensor = torch.Tensor

__all__ = ["LN2", "LOG2E", "RowLayout", "TL_DTYPE", "acc_dtype", "as_rows", "check_inplace_backward", "check_params",
           "cpu_tensors_accepted",
           "in_support", "interpreting", "launch_config", "launchable", "load_param", "order_key", "recording_launches",
           "row_offset", "row_gradient_tile", "row_softmax_stats", "row_vector", "scaled_logits", "support_split",
           "triton_op", "value_of_key"]

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
P_TOP_K = tl.constexpr(int(Slot.TOP_K))
P_TOP_P = tl.constexpr(int(Slot.TOP_P))
P_LOG_MIN_P = tl.constexpr(int(Slot.LOG_MIN_P))

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


# log2(e) and ln(2): the row passes work in base 2 (``ex2.approx.ftz.f32`` is one MUFU op; ``tl.exp``
# is a multiply, a range check and two fix-ups around it).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# A log2-domain floor that ex2 turns into exactly 0 (fp32 flushes below 2**-126): multiplying by
# it instead of by -inf keeps 0 * -inf = NaN out of the entropy sums without a select.
LOG2_FLOOR = tl.constexpr(-1000.0)


@triton.jit
def scaled_logits(x, inv_temperature):
    """``z = x * inv_temperature`` of logits ``x`` already in the compute dtype: the sampling cutoff
    search computes every ``z`` it compares here (one rounded multiply; a comparison never sees it
    contracted into an FMA), and the support thresholds of the row passes are derived from it."""
    return x * inv_temperature


@triton.jit
def in_support(x, cols, x_ties, x_above, tie_end):
    """The sampling support in kernel form (:mod:`grpo_fused.semantics.sampling`), on the raw logits
    ``x`` (compute dtype) of columns ``cols``: kept when ``z > tau`` (``x >= x_above``), or ``z == tau``
    (``x >= x_ties``) and ``cols < tie_end``. ``z = x * inv_temperature`` rounds monotonically, so
    the thresholds (:class:`~grpo_fused.kernels.sampling_support.Cutoff`) make these tests exactly
    those on ``z``. NaN thresholds keep nothing."""
    return (x >= x_above) | ((x >= x_ties) & (cols < tie_end))


@triton.jit
def order_key(z):
    """The unsigned integer whose order is that of the float ``z`` (sign-magnitude to offset binary;
    ``-0.0`` sits just below ``+0.0``, NaNs beyond the infinities)."""
    if z.dtype == tl.float64:
        bits = z.to(tl.uint64, bitcast=True)
        sign = tl.full([], 1, tl.uint64) << 63
    else:
        bits = z.to(tl.uint32, bitcast=True)
        sign = tl.full([], 1, tl.uint32) << 31
    return tl.where((bits & sign) != 0, ~bits, bits | sign)


@triton.jit
def value_of_key(key, ACC_DTYPE: tl.constexpr):
    """The float of an order key (inverse of :func:`order_key`)."""
    if ACC_DTYPE == tl.float64:
        sign = tl.full([], 1, tl.uint64) << 63
    else:
        sign = tl.full([], 1, tl.uint32) << 31
    bits = tl.where((key & sign) != 0, key ^ sign, ~key)
    return bits.to(ACC_DTYPE, bitcast=True)


@triton.jit
def _stats_tile(x, m, s, u, c, COMPUTE_ENTROPY: tl.constexpr):
    """Fold one ``(R, VEC)`` tile of raw logits ``x`` (ACC_DTYPE, -inf where masked) into each
    thread's running state: ``m`` (R,) the max of the raw logits seen, ``s = sum 2**d`` and
    ``u = sum 2**d * d`` with ``d = (x - m) * c`` the log2-probability up to the row constant,
    ``c = log2(e) / temperature``.

    Per element this is one max, one FMA, one ``ex2``, one add (and for the entropy one max and
    one FMA): the tile's VEC columns a thread holds are reduced in registers, so the running
    state is one value a thread, not one a column. NaN propagates through ``s`` (``ex2(NaN)``),
    which the max does not (``max(NaN, y) = y``).
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    # A thread that has seen only -inf shifts by 0 (no -inf - -inf = NaN).
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    d = x * c - (m_safe * c)[:, None]
    e = tl.exp2(d)
    shift = tl.maximum((m - m_safe) * c, LOG2_FLOOR)  # <= 0: the rescale of the old sums
    alpha = tl.exp2(shift)
    if COMPUTE_ENTROPY:
        u = alpha * (u + s * shift) + tl.sum(e * tl.maximum(d, LOG2_FLOOR), axis=1)
    s = s * alpha + tl.sum(e, axis=1)
    return m_new, s, u


@triton.jit
def row_softmax_stats(
    row_ptr,
    target,
    n_cols,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    x_ties=0.0,
    x_above=0.0,
    tie_end=0,
    SUPPORT: tl.constexpr = False,
):
    """One pass over the first ``n_cols`` logits of a row: ``(lse, z_target, entropy)`` of
    ``z = logits * inv_temperature``.

    With ``SUPPORT`` the pass runs over the sampling support of the cutoff ``(x_ties, x_above,
    tie_end)`` (:func:`in_support`) only: a dropped logit counts as -inf, and so does a dropped
    target (``logp = -inf``). The tiles before the one holding ``tie_end`` test ``x >= x_ties``,
    those after it ``x >= x_above`` (one compare and one select a column), that tile and the
    masked last one the whole test. Without ``SUPPORT``, the code is that of the plain pass (the
    branches are pruned at compile time).

    ``n_cols`` is the row's V, or 0 for a row that is skipped (nothing is read; the caller
    replaces the outputs). The target logit is read only when ``0 <= target < n_cols``; an id
    outside the vocabulary gives ``z_target = -inf`` (so ``logp = -inf``), never a load elsewhere.

    The row is streamed in ``BLOCK_V`` tiles shaped ``(BLOCK_V // VEC, VEC)`` so that each thread
    owns ``VEC`` contiguous columns (one 16-byte load) and keeps one running max / sum / entropy
    partial per tile row (:func:`_stats_tile`); full tiles are read unmasked and one masked tile
    finishes the row. The threads' states are merged once after the loop. Tracking
    ``sum p * (z - m)`` rather than ``sum p * z`` keeps the entropy free of the ``lse - E[z]``
    cancellation when logits are large.
    """
    neg_inf = float("-inf")
    ROWS: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    log2e = tl.full([], LOG2E, ACC_DTYPE)
    c = inv_temperature * log2e
    m = tl.full([ROWS], neg_inf, ACC_DTYPE)
    s = tl.zeros([ROWS], ACC_DTYPE)
    u = tl.zeros([ROWS], ACC_DTYPE)
    full = (n_cols // BLOCK_V) * BLOCK_V
    if SUPPORT:
        split = support_split(tie_end, full, BLOCK_V)
        for start in range(0, split, BLOCK_V):
            x = tl.load(row_ptr + start + offs).to(ACC_DTYPE)
            m, s, u = _stats_tile(tl.where(x >= x_ties, x, neg_inf), m, s, u, c, COMPUTE_ENTROPY)
        if split < full:
            cols = split + offs
            x = tl.load(row_ptr + cols).to(ACC_DTYPE)
            x = tl.where(in_support(x, cols, x_ties, x_above, tie_end), x, neg_inf)
            m, s, u = _stats_tile(x, m, s, u, c, COMPUTE_ENTROPY)
            for start in range(split + BLOCK_V, full, BLOCK_V):
                x = tl.load(row_ptr + start + offs).to(ACC_DTYPE)
                m, s, u = _stats_tile(tl.where(x >= x_above, x, neg_inf), m, s, u, c, COMPUTE_ENTROPY)
    else:
        for start in range(0, full, BLOCK_V):
            x = tl.load(row_ptr + start + offs).to(ACC_DTYPE)
            m, s, u = _stats_tile(x, m, s, u, c, COMPUTE_ENTROPY)
    if full < n_cols:
        cols = full + offs
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=neg_inf).to(ACC_DTYPE)
        if SUPPORT:
            x = tl.where(in_support(x, cols, x_ties, x_above, tie_end), x, neg_inf)
        m, s, u = _stats_tile(x, m, s, u, c, COMPUTE_ENTROPY)
    m_row = tl.max(m, axis=0)
    m_row_safe = tl.where(m_row > neg_inf, m_row, 0.0)
    shift = tl.maximum((m - m_row_safe) * c, LOG2_FLOOR)
    scale = tl.exp2(shift)
    sum_exp = tl.sum(s * scale, axis=0)
    log2_sum = tl.log2(sum_exp)
    ln2 = tl.full([], LN2, ACC_DTYPE)
    lse = m_row_safe * inv_temperature + log2_sum * ln2
    in_vocab = (target >= 0) & (target < n_cols)
    x_target = tl.load(row_ptr + target, mask=in_vocab, other=neg_inf).to(ACC_DTYPE)
    z_target = x_target * inv_temperature
    if SUPPORT:
        z_target = tl.where(in_support(x_target, target, x_ties, x_above, tie_end), z_target, neg_inf)
    entropy = lse * 0.0
    if COMPUTE_ENTROPY:
        u_row = tl.sum(scale * (u + s * shift), axis=0)
        entropy = (log2_sum - u_row / sum_exp) * ln2
    return lse, z_target, entropy


@triton.jit
def support_split(tie_end, full, BLOCK_V: tl.constexpr):
    """Where a row pass over a sampling support switches from ``x >= x_ties`` to ``x >= x_above``: the
    first column of the full tile holding ``tie_end`` (``full`` when no full tile does; ``tie_end``
    may lie outside the row, as in a vocab slice)."""
    return tl.minimum((tl.minimum(tl.maximum(tie_end, 0), full) // BLOCK_V) * BLOCK_V, full)


@triton.jit
def row_gradient_tile(x, c, lse2, g, g_entropy_a, g_entropy_b, HAS_DENTROPY: tl.constexpr):
    """``dz`` of one tile of raw logits without the one-hot term: ``-p * g`` and, with the entropy
    term, ``-p * (g + g_H * H + g_H * ln2 * log2 p)`` folded into ``-p * (a + b * log2 p)``.

    ``p = 2**(x * c - lse2)`` with ``c = log2(e) / T``, ``lse2 = lse * log2(e)``; ``g`` etc. are
    already divided by the temperature. ``p log p -> 0`` as ``p -> 0``: the log is floored, so a
    -inf logit gives ``0 * finite``, not ``0 * -inf``; a NaN logit gives NaN.
    """
    d = x * c - lse2
    p = tl.exp2(d)
    if HAS_DENTROPY:
        return -p * (g_entropy_a + g_entropy_b * tl.maximum(d, LOG2_FLOOR))
    return -p * g


# --------------------------------------------------------------------------------------
# Host side: where the kernels run, layout, launch configuration, registration.
# --------------------------------------------------------------------------------------


def interpreting() -> bool:
    """The kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``): launchers then pick
    the small test configurations and fp32 ``tl.dot`` operands."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_RECORDING = [False]


class recording_launches:
    """While active, launchers accept CPU tensors *without* the interpreter, because the launches
    are recorded, not run: :mod:`grpo_fused.benchmarks.static_report` replaces ``JITFunction.run``
    by a recorder and compiles each launch ahead of time for sm_90a. The CPU tensors then only
    carry dtypes, shapes, strides and alignment, and the launchers choose their GPU configuration
    (they do whenever :func:`interpreting` is false). Not re-entrant; tooling only."""

    def __enter__(self):
        _RECORDING[0] = True
        return self

    def __exit__(self, *exc):
        _RECORDING[0] = False
        return False


def cpu_tensors_accepted() -> bool:
    """CPU tensors may be handed to the launchers: under the interpreter, or while launches are
    recorded (:class:`recording_launches`)."""
    return interpreting() or _RECORDING[0]



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


def check_params(params: Tensor, device: torch.device) -> None:
    """``params`` is the ``(NUM_SLOTS,)`` float64 hyperparameter vector, on the kernels' device."""
    if not isinstance(params, torch.Tensor) or params.dtype != torch.float64 or tuple(params.shape) != (NUM_SLOTS,):
        raise TypeError(f"params must be a ({NUM_SLOTS},) float64 tensor (grpo_fused.semantics.Slot), got "
                        f"{getattr(params, 'shape', type(params).__name__)} {getattr(params, 'dtype', '')}")
    if params.device != device or not params.is_contiguous():
        raise ValueError(f"params must be contiguous on {device}, got {params.device}")


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


def row_vector(logits: Tensor, block_v: int, out: Optional[Tensor] = None) -> int:
    """``VEC``: contiguous columns a thread owns in a tile: one 16-byte access of the narrowest of
    ``logits`` and ``out`` (8 bf16 / fp16, 4 fp32, 2 fp64), so fp32 logits with a bf16 gradient
    are read with two 16-byte loads and written with one 16-byte store."""
    size = logits.element_size() if out is None else min(logits.element_size(), out.element_size())
    return max(1, min(block_v, 16 // size))


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
