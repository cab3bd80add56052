"""Selective log-softmax over the vocabulary: ``logp = z[id] - logsumexp(z)``, ``z = logits / T``.

One Triton program per token row streams the row's logits once, in ``BLOCK_V`` tiles, keeping
an online max / sum-exp per lane in fp32 (fp64 for fp64 logits), and reads the target logit
with a single scalar load. The entropy ``H = -sum p log p`` is accumulated in the same pass.
Nothing of size V is written in forward: only ``logps``, ``lse`` and ``entropy`` (N floats each).

Backward recomputes ``p = exp(z - lse)`` from the saved ``lse`` and writes, in one read of the
logits and one write,

    dlogits_j = (dlogp * (onehot_j - p_j) - dH * p_j * (log p_j + H)) / T

optionally into the logits buffer itself (``out=logits``: zero extra memory).

Layout: rows are addressed as ``(row // rows_inner) * stride_outer + (row % rows_inner) *
stride_inner`` with int64 arithmetic, so ``(N, V)`` with any row stride and ``(B, T, V)``
slices such as ``logits[:, :-1]`` need no copy; the last dim must be contiguous. The grid is
1-D over rows (axis 0 allows 2^31 - 1 programs, unlike axes 1 and 2 capped at 65535).

The same jitted row pass (:func:`_row_softmax_stats`) is the vocabulary loop of the GRPO
kernel in :mod:`grpo_fused.kernels.grpo_logits`.

Layers, top to bottom: :func:`selective_log_softmax` (entry point, autograd) ->
``torch.ops.grpo_fused.triton_vocab_fwd`` / ``triton_vocab_bwd[_out|_inplace]`` (``triton_op``s,
what torch.compile sees) -> :func:`vocab_fwd` / :func:`vocab_bwd` (validate, allocate, launch)
-> the kernels. :func:`logits_fwd` / :func:`logits_bwd` are the ``(N, V)`` launchers other
kernels build on (the fused linear path runs them on logit chunks).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["logits_fwd", "logits_bwd", "selective_log_softmax", "SelectiveLogSoftmax", "RowLayout"]


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


@triton.jit
def _row_softmax_stats(
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


@triton.jit
def _row_offset(row, rows_inner, stride_outer, stride_inner):
    return (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner


@triton.jit
def _selective_log_softmax_fwd_kernel(
    logits_ptr,  # (N, V) rows addressed through (rows_inner, stride_outer, stride_inner)
    ids_ptr,  # (N,) int32 / int64
    logps_ptr,  # (N,) ACC_DTYPE
    lse_ptr,  # (N,) ACC_DTYPE
    entropy_ptr,  # (N,) ACC_DTYPE or None
    V,
    rows_inner,
    stride_outer,
    stride_inner,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, rows_inner, stride_outer, stride_inner)
    target = tl.load(ids_ptr + row).to(tl.int64)
    lse, z_target, entropy = _row_softmax_stats(
        row_ptr, target, V, inv_temperature, BLOCK_V, COMPUTE_ENTROPY, ACC_DTYPE
    )
    tl.store(logps_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _selective_log_softmax_bwd_kernel(
    logits_ptr,  # (N, V), read
    dlogits_ptr,  # (N, V), written; may alias logits_ptr (each element is read before it is written)
    ids_ptr,  # (N,)
    lse_ptr,  # (N,) saved by forward
    dlogps_ptr,  # (N,) upstream gradient of logps
    dentropy_ptr,  # (N,) upstream gradient of entropy, or None
    entropy_ptr,  # (N,) saved entropy (read only with HAS_DENTROPY)
    V,
    rows_inner,
    stride_outer,
    stride_inner,
    out_stride_outer,
    out_stride_inner,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    HAS_DENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, rows_inner, stride_outer, stride_inner)
    out_row_ptr = dlogits_ptr + _row_offset(row, rows_inner, out_stride_outer, out_stride_inner)
    target = tl.load(ids_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row).to(ACC_DTYPE)
    # d/dlogits = d/dz * inv_temperature: fold it into the two row scalars once.
    g_logp = tl.load(dlogps_ptr + row).to(ACC_DTYPE) * inv_temperature
    if HAS_DENTROPY:
        g_entropy = tl.load(dentropy_ptr + row).to(ACC_DTYPE) * inv_temperature
        entropy = tl.load(entropy_ptr + row).to(ACC_DTYPE)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        z = tl.load(row_ptr + offs, mask=in_row, other=float("-inf")).to(ACC_DTYPE) * inv_temperature
        log_p = z - lse
        p = tl.exp(log_p)
        dz = tl.where(offs == target, g_logp, 0.0) - g_logp * p
        if HAS_DENTROPY:
            # p log p -> 0 as p -> 0; a -inf logit must not give 0 * -inf = NaN.
            dz -= g_entropy * p * tl.where(p > 0, log_p + entropy, 0.0)
        tl.store(out_row_ptr + offs, dz.to(dlogits_ptr.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------
# Launchers.
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 so that gradcheck works; every other dtype is accumulated in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def _launchable(kernel):
    """The kernel, launchable both eagerly and inside a ``torch.library.triton_op`` being traced.

    This is the one place the torch.compile integration shapes the kernels: ``wrap_triton``
    accepts plain ``@triton.jit`` functions but not ``@triton.heuristics`` wrappers, so the
    optional-tensor flags (``HAS_OLD``, ``COMPUTE_ENTROPY``, ...) are computed by the launchers
    as ``tensor is not None`` and passed as constexpr keywords instead of by heuristics.
    Launchers run inside the ops below: an eager op call disables the wrapper (the kernel is
    launched directly), a traced one records it.
    """
    return torch.library.wrap_triton(kernel)


# Opt-in tuning knob for a GPU session (benchmarks/bench_logits.py), read once at import:
# GRPO_FUSED_BLOCK_V=4096 tries wider tiles without touching the code.
_MAX_BLOCK_V = int(os.environ.get("GRPO_FUSED_BLOCK_V", "2048"))


def _launch_config(vocab: int, block_v: Optional[int]) -> Tuple[int, int]:
    """``(BLOCK_V, num_warps)``: a fixed config, not autotuned (no tuning race, fast first call).

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


def _check_vocab_inputs(logits: Tensor, ids: Tensor, temperature: float) -> RowLayout:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    layout = RowLayout.of(logits)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an int64 or int32 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.numel() != layout.n_rows:
        raise ValueError(f"ids must hold one id per logits row ({layout.n_rows}), got shape {tuple(ids.shape)}")
    if ids.device != logits.device:
        raise ValueError(f"ids is on {ids.device} but logits is on {logits.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    return layout


def _flat_ids(ids: Tensor) -> Tensor:
    return ids.reshape(-1).contiguous()


def vocab_fwd(
    logits: Tensor,
    ids: Tensor,
    temperature: float,
    compute_entropy: bool,
    block_v: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """:func:`logits_fwd` for ``(N, V)`` or ``(B, T, V)`` logits; outputs are flat ``(N,)``."""
    layout = _check_vocab_inputs(logits, ids, temperature)
    acc = _acc_dtype(logits.dtype)
    n = layout.n_rows
    logps = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    entropy = torch.empty(n, dtype=acc, device=logits.device) if compute_entropy else None
    if n == 0:
        return logps, lse, entropy
    if layout.vocab == 0:
        raise ValueError("logits must have a non-empty vocab dim")
    block, warps = _launch_config(layout.vocab, block_v)
    _launchable(_selective_log_softmax_fwd_kernel)[(n,)](
        logits,
        _flat_ids(ids),
        logps,
        lse,
        entropy,
        layout.vocab,
        layout.rows_inner,
        layout.stride_outer,
        layout.stride_inner,
        1.0 / temperature,
        BLOCK_V=block,
        COMPUTE_ENTROPY=entropy is not None,
        ACC_DTYPE=_TL_DTYPE[acc],
        num_warps=warps,
    )
    return logps, lse, entropy


def vocab_bwd(
    logits: Tensor,
    ids: Tensor,
    lse: Tensor,
    dlogps: Tensor,
    dentropy: Optional[Tensor],
    entropy: Optional[Tensor],
    temperature: float,
    out: Optional[Tensor] = None,
    block_v: Optional[int] = None,
) -> Tensor:
    """:func:`logits_bwd` for ``(N, V)`` or ``(B, T, V)`` logits; ``dlogps`` etc. are ``(N,)``."""
    layout = _check_vocab_inputs(logits, ids, temperature)
    n = layout.n_rows
    for name, t in (("lse", lse), ("dlogps", dlogps), ("dentropy", dentropy), ("entropy", entropy)):
        if t is not None and t.numel() != n:
            raise ValueError(f"{name} must have {n} elements (one per logits row), got shape {tuple(t.shape)}")
    if dentropy is not None and entropy is None:
        raise ValueError("entropy (saved by forward) is required when dentropy is given")
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(
            f"out must match logits (shape {tuple(logits.shape)}, {logits.dtype}, {logits.device}), "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    out_layout = RowLayout.of(out)
    if n == 0:
        return out
    acc = _acc_dtype(logits.dtype)
    block, warps = _launch_config(layout.vocab, block_v)

    def flat(t):
        return None if t is None else t.reshape(-1).contiguous()

    _launchable(_selective_log_softmax_bwd_kernel)[(n,)](
        logits,
        out,
        _flat_ids(ids),
        flat(lse),
        flat(dlogps),
        flat(dentropy),
        flat(entropy) if dentropy is not None else None,
        layout.vocab,
        layout.rows_inner,
        layout.stride_outer,
        layout.stride_inner,
        out_layout.stride_outer,
        out_layout.stride_inner,
        1.0 / temperature,
        BLOCK_V=block,
        HAS_DENTROPY=dentropy is not None,
        ACC_DTYPE=_TL_DTYPE[acc],
        num_warps=warps,
    )
    return out


def logits_fwd(
    logits: Tensor, ids: Tensor, temperature: float, compute_entropy: bool
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-row ``logp``, ``lse`` and (optionally) entropy of ``logits / temperature``.

    Args:
        logits: ``(N, V)`` fp32 / bf16 / fp16 / fp64; any row stride, last dim contiguous.
        ids: ``(N,)`` int64 / int32 target ids in ``[0, V)`` (not checked here: no host sync).
        temperature: > 0, a runtime scalar (a new value does not recompile).
        compute_entropy: also return ``H = -sum p log p``.

    Returns:
        ``(logps, lse, entropy_or_None)``, each ``(N,)`` fp32 (fp64 for fp64 logits);
        ``lse`` is the logsumexp of ``logits / temperature``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    # Through the op: an eager op call launches the kernel directly (no tracing wrapper), and a
    # caller being traced by torch.compile sees one op.
    logps, lse, entropy = _vocab_fwd_op(logits, ids, float(temperature), bool(compute_entropy))
    return logps, lse, entropy if compute_entropy else None


def logits_bwd(
    logits: Tensor,
    ids: Tensor,
    lse: Tensor,
    dlogps: Tensor,
    dentropy: Optional[Tensor],
    entropy: Optional[Tensor],
    temperature: float,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Gradient of ``sum(dlogps * logps + dentropy * entropy)`` with respect to ``logits``.

    ``dlogits_j = (dlogps * (onehot_j - p_j) - dentropy * p_j * (log p_j + H)) / temperature``
    with ``p = softmax(logits / temperature)`` recomputed from the saved ``lse``.

    Args:
        logits: ``(N, V)`` as given to :func:`logits_fwd`.
        ids: ``(N,)``. lse: ``(N,)`` from :func:`logits_fwd`.
        dlogps: ``(N,)`` upstream gradient of the logps (any float dtype).
        dentropy: ``(N,)`` upstream gradient of the entropy, or None (no entropy term).
        entropy: ``(N,)`` from :func:`logits_fwd`; required when ``dentropy`` is given.
        temperature: the forward temperature.
        out: ``(N, V)`` buffer in logits' dtype to write into; ``out=logits`` overwrites the
            logits with their gradient (zero extra memory; the logits are gone afterwards).

    Returns:
        ``dlogits`` ``(N, V)`` in logits' dtype (``out`` when given).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if out is None:
        return _vocab_bwd_op(logits, ids, lse, dlogps, dentropy, entropy, float(temperature))
    if out is logits:
        _vocab_bwd_inplace_op(logits, ids, lse, dlogps, dentropy, entropy, float(temperature))
    else:
        _vocab_bwd_out_op(logits, ids, lse, dlogps, dentropy, entropy, float(temperature), out)
    return out


# --------------------------------------------------------------------------------------
# torch.library ops: what torch.compile(fullgraph=True) traces; the launchers run inside.
# --------------------------------------------------------------------------------------


def triton_op(name: str, mutates_args=()):
    """``torch.library.triton_op("grpo_fused::<name>")``, tolerant of this file being imported twice.

    (The source folder ``kernels/`` is importable as ``kernels`` from a checkout as well as
    ``grpo_fused.kernels`` when installed; a second registration would raise.)
    """

    def register(fn):
        if hasattr(torch.ops.grpo_fused, name):
            return getattr(torch.ops.grpo_fused, name).default
        return torch.library.triton_op(f"grpo_fused::{name}", mutates_args=mutates_args)(fn)

    return register


@triton_op("triton_vocab_fwd")
def _vocab_fwd_op(logits: Tensor, ids: Tensor, temperature: float, compute_entropy: bool) -> Tuple[Tensor, Tensor, Tensor]:
    logps, lse, entropy = vocab_fwd(logits, ids, temperature, compute_entropy)
    # A custom op cannot return None: an empty tensor stands for "entropy not computed".
    return logps, lse, lse.new_empty(0) if entropy is None else entropy


@triton_op("triton_vocab_bwd")
def _vocab_bwd_op(
    logits: Tensor,
    ids: Tensor,
    lse: Tensor,
    dlogps: Tensor,
    dentropy: Optional[Tensor],
    entropy: Optional[Tensor],
    temperature: float,
) -> Tensor:
    return vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, temperature)


@triton_op("triton_vocab_bwd_out", mutates_args=("out",))
def _vocab_bwd_out_op(
    logits: Tensor,
    ids: Tensor,
    lse: Tensor,
    dlogps: Tensor,
    dentropy: Optional[Tensor],
    entropy: Optional[Tensor],
    temperature: float,
    out: Tensor,
) -> None:
    vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, temperature, out=out)


@triton_op("triton_vocab_bwd_inplace", mutates_args=("logits",))
def _vocab_bwd_inplace_op(
    logits: Tensor,
    ids: Tensor,
    lse: Tensor,
    dlogps: Tensor,
    dentropy: Optional[Tensor],
    entropy: Optional[Tensor],
    temperature: float,
) -> None:
    vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, temperature, out=logits)


def dlogits_from_row_grads(
    rows: Tensor,
    ids: Tensor,
    lse: Tensor,
    dlogps: Tensor,
    dentropy: Optional[Tensor],
    entropy: Optional[Tensor],
    temperature: float,
    inplace: bool,
) -> Tensor:
    """The backward op, in place (the gradient overwrites ``rows``, which is returned) or not.

    Under torch.compile the out-of-place op is used: AOTAutograd does not let a backward graph
    mutate a tensor saved from forward, so the in-place saving is an eager-mode feature.
    """
    if inplace and not torch.compiler.is_compiling():
        _vocab_bwd_inplace_op(rows, ids, lse, dlogps, dentropy, entropy, temperature)
        return rows
    return _vocab_bwd_op(rows, ids, lse, dlogps, dentropy, entropy, temperature)


# --------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SavedVocabPass:
    temperature: float
    compute_entropy: bool
    inplace_backward: bool
    out_shape: Tuple[int, ...]


def _as_rows(logits: Tensor) -> Tensor:
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


class SelectiveLogSoftmax(torch.autograd.Function):
    """``(logits (..., V), ids (...)) -> (logps (...), entropy (...) or None)``, differentiable in logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float, compute_entropy: bool, inplace_backward: bool):
        rows = _as_rows(logits)
        logps, lse, entropy = _vocab_fwd_op(rows, ids, temperature, compute_entropy)
        entropy = entropy if compute_entropy else None
        ctx.saved = _SavedVocabPass(temperature, compute_entropy, inplace_backward, tuple(logits.shape))
        # (No ctx.set_materialize_grads(False): torch.compile cannot trace it. An entropy nobody
        # differentiates arrives as zeros and costs a few FLOPs a column in the backward.)
        ctx.save_for_backward(rows, ids, lse, entropy)
        out_shape = tuple(logits.shape[:-1])
        if entropy is None:
            return logps.view(out_shape), None
        return logps.view(out_shape), entropy.view(out_shape)

    @staticmethod
    def backward(ctx, dlogps: Optional[Tensor], dentropy: Optional[Tensor]):
        rows, ids, lse, entropy = ctx.saved_tensors
        saved: _SavedVocabPass = ctx.saved
        if dlogps is None:
            dlogps = torch.zeros_like(lse)
        dlogits = dlogits_from_row_grads(
            rows, ids, lse, dlogps.reshape(-1), None if dentropy is None else dentropy.reshape(-1),
            entropy, saved.temperature, saved.inplace_backward,
        )
        return dlogits.view(saved.out_shape), None, None, None, None


def selective_log_softmax(
    logits: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    inplace_backward: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Triton :func:`grpo_fused.reference.selective_log_softmax`, differentiable in ``logits``.

    Args:
        logits: ``(..., V)`` fp32 / bf16 / fp16 / fp64. 2-D and 3-D inputs with a contiguous
            last dim are read in place (any row / batch stride); others are viewed or copied.
        ids: ``(...)`` int64 / int32 in ``[0, V)``.
        temperature: divides the logits. Default 1.0.
        compute_entropy: also return the per-token entropy (same pass). Default False.
        inplace_backward: backward writes the gradient into ``logits``' buffer; the caller must
            not read those logits after backward (eager mode only; under torch.compile the
            gradient gets its own buffer). Default False.

    Returns:
        ``(logps, entropy)``, ``(...)`` fp32 (fp64 for fp64 logits); entropy is None unless asked.
    """
    if inplace_backward:
        check_inplace_backward(logits)
    return SelectiveLogSoftmax.apply(logits, ids, float(temperature), bool(compute_entropy), bool(inplace_backward))
