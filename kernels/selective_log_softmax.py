"""Selective log-softmax over the vocabulary: ``logp = z[id] - logsumexp(z)``, ``z = logits / T``.

One Triton program per token row streams the row's logits once, in ``BLOCK_V`` tiles (the row
pass :func:`grpo_fused.kernels.common.row_softmax_stats`: an online max / sum-exp per thread in
fp32, fp64 for fp64 logits; the target logit with a single scalar load, never outside ``[0, V)``;
the entropy ``H = -sum p log p`` in the same pass). Nothing of size V is written in forward: only
``logps``, ``lse`` and ``entropy`` (N floats each). A row whose ``row_mask`` is 0 is not read.

Backward recomputes ``p = exp(z - lse)`` from the saved ``lse`` and writes, in one read of the
logits and one write,

    dlogits_j = (dlogp * (onehot_j - p_j) - dH * p_j * (log p_j + H)) / T

optionally into the logits buffer itself (``out=logits``: zero extra memory). A row whose
incoming gradient is 0 (a masked position) is written as zeros without being read.

Cost (static sm_90a report, bf16, V = 151936, 8 warps, 2048-column tiles): the streaming loops
issue 82 SASS instructions per 8 columns a thread in forward with the entropy (61 without), 71 in
backward with the entropy term (54 without), 26-32 registers, 8 CTAs per SM, one 16-byte load (and
store) per iteration: memory-bound on an H100 (predicted, not measured on GPU). They were 225 /
145 / 165 / 125 with a running max and sum per column, ``tl.exp`` and per-column selects.

Sampling-support replay (``support=``): the cutoff search of
:mod:`grpo_fused.kernels.sampling_support` runs first, then both kernels run over each row's
support only (``SUPPORT``: a dropped logit counts as -inf in forward and gets a gradient of exactly
0 in backward; a dropped target has ``logp = -inf``). The test is one compare and one select a
column against the row's logit thresholds (the tile holding ``tie_end`` and the last one test
columns too): 100 / 86 SASS instructions per 8 columns with the entropy (static sm_90a report,
predicted memory-bound); with ``SUPPORT`` off the kernels compile exactly as before.

The temperature is read from ``params`` (the float64 hyperparameter vector of
:class:`grpo_fused.semantics.Slot`) inside the kernels: a new temperature is data, not a new
kernel or traced graph.

Layers, top to bottom: :func:`selective_log_softmax` (entry point, autograd) ->
``torch.ops.grpo_fused.triton_vocab_fwd`` / ``triton_vocab_bwd[_out|_inplace]`` (``triton_op``s,
what torch.compile sees) -> :func:`vocab_fwd` / :func:`vocab_bwd` (validate, allocate, launch)
-> the kernels. :func:`logits_fwd` / :func:`logits_bwd` are the ``(N, V)`` entry points other
kernels build on (the chunked linear path runs them on logit chunks).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (LN2, LOG2E, P_INV_TEMPERATURE, TL_DTYPE, RowLayout, acc_dtype, as_rows, check_inplace_backward,
                     check_params, in_support, launch_config, launchable, load_param, row_gradient_tile, row_offset,
                     row_softmax_stats, row_vector, support_split, triton_op)
from .sampling_support import Cutoff, SupportRule, sampling_cutoff

Tensor = torch.Tensor

__all__ = ["logits_fwd", "logits_bwd", "selective_log_softmax", "SelectiveLogSoftmax", "vocab_fwd", "vocab_bwd"]


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


@triton.jit
def _selective_log_softmax_fwd_kernel(
    logits_ptr,  # (N, V) rows addressed through (rows_inner, stride_outer, stride_inner)
    ids_ptr,  # (N,) int32 / int64
    params_ptr,  # (NUM_SLOTS,) float64 hyperparameters
    logps_ptr,  # (N,) ACC_DTYPE
    lse_ptr,  # (N,) ACC_DTYPE
    entropy_ptr,  # (N,) ACC_DTYPE or None
    row_mask_ptr,  # (N,) any dtype, 0 = skip the row (read nothing, write 0s), or None
    x_ties_ptr,  # (N,) ACC_DTYPE sampling cutoff: logits at or above it tie with the cutoff or pass it, or None
    x_above_ptr,  # (N,) ACC_DTYPE sampling cutoff: logits at or above it pass it, or None
    tie_end_ptr,  # (N,) int32 sampling cutoff: tied columns below it are kept, or None
    V,
    rows_inner,
    stride_outer,
    stride_inner,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    SUPPORT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, rows_inner, stride_outer, stride_inner)
    n_cols = V
    if HAS_ROW_MASK:
        keep = tl.load(row_mask_ptr + row) != 0
        n_cols = tl.where(keep, V, 0)
    target = tl.load(ids_ptr + row).to(tl.int64)
    inv_temperature = load_param(params_ptr, P_INV_TEMPERATURE, ACC_DTYPE)
    if SUPPORT:
        lse, z_target, entropy = row_softmax_stats(
            row_ptr, target, n_cols, inv_temperature, BLOCK_V, VEC, COMPUTE_ENTROPY, ACC_DTYPE,
            tl.load(x_ties_ptr + row), tl.load(x_above_ptr + row), tl.load(tie_end_ptr + row), SUPPORT=True,
        )
    else:
        lse, z_target, entropy = row_softmax_stats(
            row_ptr, target, n_cols, inv_temperature, BLOCK_V, VEC, COMPUTE_ENTROPY, ACC_DTYPE
        )
    logp = z_target - lse
    if HAS_ROW_MASK:
        logp = tl.where(keep, logp, 0.0)
        lse = tl.where(keep, lse, 0.0)
        entropy = tl.where(keep, entropy, 0.0)
    tl.store(logps_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _selective_log_softmax_bwd_kernel(
    logits_ptr,  # (N, V), read
    dlogits_ptr,  # (N, V), written; may alias logits_ptr (see the ordering note below)
    ids_ptr,  # (N,)
    params_ptr,  # (NUM_SLOTS,) float64 hyperparameters
    lse_ptr,  # (N,) saved by forward
    dlogps_ptr,  # (N,) upstream gradient of logps
    dentropy_ptr,  # (N,) upstream gradient of entropy, or None
    entropy_ptr,  # (N,) saved entropy (read only with HAS_DENTROPY)
    x_ties_ptr,  # (N,) ACC_DTYPE sampling cutoff (as forward's), or None
    x_above_ptr,  # (N,) ACC_DTYPE
    tie_end_ptr,  # (N,) int32, relative to these rows' first column (a vocab slice shifts it)
    V,
    rows_inner,
    stride_outer,
    stride_inner,
    out_stride_outer,
    out_stride_inner,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    HAS_DENTROPY: tl.constexpr,
    SUPPORT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, rows_inner, stride_outer, stride_inner)
    out_row_ptr = dlogits_ptr + row_offset(row, rows_inner, out_stride_outer, out_stride_inner)
    target = tl.load(ids_ptr + row).to(tl.int64)
    inv_temperature = load_param(params_ptr, P_INV_TEMPERATURE, ACC_DTYPE)
    # d/dlogits = d/dz * inv_temperature: fold it into the row scalars once.
    g = tl.load(dlogps_ptr + row).to(ACC_DTYPE) * inv_temperature
    active = g != 0.0
    g_a = g
    g_b = g * 0.0
    if HAS_DENTROPY:
        g_entropy = tl.load(dentropy_ptr + row).to(ACC_DTYPE) * inv_temperature
        active = active | (g_entropy != 0.0)
        g_a = g + g_entropy * tl.load(entropy_ptr + row).to(ACC_DTYPE)
        g_b = g_entropy * tl.full([], LN2, ACC_DTYPE)
    ROWS: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    out_ty = dlogits_ptr.dtype.element_ty
    full = (V // BLOCK_V) * BLOCK_V
    if active:
        log2e = tl.full([], LOG2E, ACC_DTYPE)
        c = inv_temperature * log2e
        lse2 = tl.load(lse_ptr + row).to(ACC_DTYPE) * log2e
        # The target column's gradient is written after the sweep, from its logit read before it:
        # no per-column id compare in the loop. In place (dlogits aliases logits) the sweep
        # overwrites that logit, so it is read first, and the barriers order the read before the
        # sweep's stores and the sweep's store of that column before the fix-up store (a CTA
        # barrier orders the global accesses of the threads it joins).
        in_vocab = (target >= 0) & (target < V)
        x_target = tl.load(row_ptr + target, mask=in_vocab, other=float("-inf")).to(ACC_DTYPE)
        if SUPPORT:
            # A dropped logit is a constant -inf to the loss: its gradient is exactly 0 (the
            # target's too, whose log-prob is then -inf).
            x_ties = tl.load(x_ties_ptr + row)
            x_above = tl.load(x_above_ptr + row)
            tie_end = tl.load(tie_end_ptr + row)
            in_vocab_kept = in_vocab & in_support(x_target, target, x_ties, x_above, tie_end)
        tl.debug_barrier()
        if SUPPORT:
            split = support_split(tie_end, full, BLOCK_V)
            for start in range(0, split, BLOCK_V):
                x = tl.load(row_ptr + start + offs).to(ACC_DTYPE)
                dz = tl.where(x >= x_ties, row_gradient_tile(x, c, lse2, g, g_a, g_b, HAS_DENTROPY), 0.0)
                tl.store(out_row_ptr + start + offs, dz.to(out_ty))
            if split < full:
                cols = split + offs
                x = tl.load(row_ptr + cols).to(ACC_DTYPE)
                dz = row_gradient_tile(x, c, lse2, g, g_a, g_b, HAS_DENTROPY)
                dz = tl.where(in_support(x, cols, x_ties, x_above, tie_end), dz, 0.0)
                tl.store(out_row_ptr + cols, dz.to(out_ty))
                for start in range(split + BLOCK_V, full, BLOCK_V):
                    x = tl.load(row_ptr + start + offs).to(ACC_DTYPE)
                    dz = tl.where(x >= x_above, row_gradient_tile(x, c, lse2, g, g_a, g_b, HAS_DENTROPY), 0.0)
                    tl.store(out_row_ptr + start + offs, dz.to(out_ty))
        else:
            for start in range(0, full, BLOCK_V):
                x = tl.load(row_ptr + start + offs).to(ACC_DTYPE)
                dz = row_gradient_tile(x, c, lse2, g, g_a, g_b, HAS_DENTROPY)
                tl.store(out_row_ptr + start + offs, dz.to(out_ty))
        if full < V:
            cols = full + offs
            in_row = cols < V
            x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
            dz = row_gradient_tile(x, c, lse2, g, g_a, g_b, HAS_DENTROPY)
            if SUPPORT:
                dz = tl.where(in_support(x, cols, x_ties, x_above, tie_end), dz, 0.0)
            tl.store(out_row_ptr + cols, dz.to(out_ty), mask=in_row)
        tl.debug_barrier()
        dz_target = g + row_gradient_tile(x_target, c, lse2, g, g_a, g_b, HAS_DENTROPY)
        if SUPPORT:
            # A dropped target: the sweep's 0 stands.
            tl.store(out_row_ptr + target, dz_target.to(out_ty), mask=in_vocab_kept)
        else:
            tl.store(out_row_ptr + target, dz_target.to(out_ty), mask=in_vocab)
    else:
        # No incoming gradient (a masked position): the row's gradient is exactly 0, whatever its
        # logits hold (NaN included); nothing is read.
        zeros = tl.zeros([ROWS, VEC], dtype=out_ty)
        for start in range(0, full, BLOCK_V):
            tl.store(out_row_ptr + start + offs, zeros)
        if full < V:
            cols = full + offs
            tl.store(out_row_ptr + cols, zeros, mask=cols < V)


# --------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------


def _check_vocab_inputs(logits: Tensor, ids: Tensor, params: Tensor) -> RowLayout:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    layout = RowLayout.of(logits)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an int64 or int32 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.numel() != layout.n_rows:
        raise ValueError(f"ids must hold one id per logits row ({layout.n_rows}), got shape {tuple(ids.shape)}")
    if ids.device != logits.device:
        raise ValueError(f"ids is on {ids.device} but logits is on {logits.device}")
    check_params(params, logits.device)
    return layout


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1).contiguous()


def _check_row_mask(row_mask: Optional[Tensor], n: int, device: torch.device) -> Optional[Tensor]:
    if row_mask is None:
        return None
    if not isinstance(row_mask, torch.Tensor) or row_mask.numel() != n or row_mask.device != device:
        raise ValueError(f"row_mask must hold one value per logits row ({n}) on {device}, got "
                         f"{getattr(row_mask, 'shape', type(row_mask).__name__)}")
    return row_mask.reshape(-1).contiguous()


def _check_cutoff(cutoff: Optional[Cutoff], n: int, acc: torch.dtype, device: torch.device) -> None:
    if cutoff is None:
        return
    for name, t, dtype in (("x_ties", cutoff.x_ties, acc), ("x_above", cutoff.x_above, acc),
                           ("tie_end", cutoff.tie_end, torch.int32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != n or t.device != device:
            raise ValueError(f"cutoff.{name} must be ({n},) {dtype} on {device} (sampling_cutoff), got "
                             f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")


def _cutoff_args(cutoff: Optional[Cutoff]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The row kernels' three cutoff pointers (``tau`` is not read: the thresholds stand for it)."""
    if cutoff is None:
        return None, None, None
    return _flat(cutoff.x_ties), _flat(cutoff.x_above), _flat(cutoff.tie_end)


def vocab_fwd(logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool, block_v: Optional[int] = None,
              row_mask: Optional[Tensor] = None, cutoff: Optional[Cutoff] = None
              ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The forward launcher: :func:`logits_fwd` for ``(N, V)`` or ``(B, T, V)`` logits, launched
    directly (``block_v`` overrides the tile width); outputs are flat ``(N,)``. A row whose
    ``row_mask`` is 0 is not read: its logp, lse and entropy are 0. With ``cutoff``
    (:func:`~grpo_fused.kernels.sampling_support.sampling_cutoff` of the same logits) the softmax
    runs over each row's sampling support."""
    layout = _check_vocab_inputs(logits, ids, params)
    row_mask = _check_row_mask(row_mask, layout.n_rows, logits.device)
    _check_cutoff(cutoff, layout.n_rows, acc_dtype(logits.dtype), logits.device)
    acc = acc_dtype(logits.dtype)
    n = layout.n_rows
    logps = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    entropy = torch.empty(n, dtype=acc, device=logits.device) if compute_entropy else None
    if n == 0:
        return logps, lse, entropy
    if layout.vocab == 0:
        raise ValueError("logits must have a non-empty vocab dim")
    block, warps = launch_config(layout.vocab, block_v)
    launchable(_selective_log_softmax_fwd_kernel)[(n,)](
        logits, _flat(ids), params, logps, lse, entropy, row_mask, *_cutoff_args(cutoff),
        layout.vocab, layout.rows_inner, layout.stride_outer, layout.stride_inner,
        BLOCK_V=block, VEC=row_vector(logits, block), COMPUTE_ENTROPY=entropy is not None,
        HAS_ROW_MASK=row_mask is not None, SUPPORT=cutoff is not None, ACC_DTYPE=TL_DTYPE[acc], num_warps=warps,
        enable_fp_fusion=True,
    )
    return logps, lse, entropy


def vocab_bwd(logits: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
              entropy: Optional[Tensor], params: Tensor, out: Optional[Tensor] = None, block_v: Optional[int] = None,
              grad_dtype: Optional[torch.dtype] = None, cutoff: Optional[Cutoff] = None) -> Tensor:
    """The backward launcher: :func:`logits_bwd` for ``(N, V)`` or ``(B, T, V)`` logits, launched
    directly; ``dlogps`` etc. are ``(N,)``. Without ``out`` the gradient is allocated in
    ``grad_dtype`` (default the logits' dtype). With ``cutoff`` (the forward's), the gradient is
    that of the softmax over each row's sampling support (0 at dropped columns)."""
    layout = _check_vocab_inputs(logits, ids, params)
    n = layout.n_rows
    _check_cutoff(cutoff, n, acc_dtype(logits.dtype), logits.device)
    for name, t in (("lse", lse), ("dlogps", dlogps), ("dentropy", dentropy), ("entropy", entropy)):
        if t is not None and t.numel() != n:
            raise ValueError(f"{name} must have {n} elements (one per logits row), got shape {tuple(t.shape)}")
    if dentropy is not None and entropy is None:
        raise ValueError("entropy (saved by forward) is required when dentropy is given")
    if out is None:
        if grad_dtype is not None and not grad_dtype.is_floating_point:
            raise TypeError(f"grad_dtype must be a float dtype, got {grad_dtype}")
        out = torch.empty(logits.shape, dtype=grad_dtype or logits.dtype, device=logits.device)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(
            f"out must match logits (shape {tuple(logits.shape)}, {logits.dtype}, {logits.device}), "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    out_layout = RowLayout.of(out)
    if n == 0:
        return out
    acc = acc_dtype(logits.dtype)
    block, warps = launch_config(layout.vocab, block_v)
    launchable(_selective_log_softmax_bwd_kernel)[(n,)](
        logits, out, _flat(ids), params, _flat(lse), _flat(dlogps), _flat(dentropy),
        _flat(entropy) if dentropy is not None else None, *_cutoff_args(cutoff),
        layout.vocab, layout.rows_inner, layout.stride_outer, layout.stride_inner,
        out_layout.stride_outer, out_layout.stride_inner,
        BLOCK_V=block, VEC=row_vector(logits, block, out), HAS_DENTROPY=dentropy is not None,
        SUPPORT=cutoff is not None, ACC_DTYPE=TL_DTYPE[acc], num_warps=warps, enable_fp_fusion=True,
    )
    return out


# --------------------------------------------------------------------------------------
# torch.library ops: what torch.compile(fullgraph=True) traces; the launchers run inside.
# --------------------------------------------------------------------------------------


def _cutoff_of(tau: Optional[Tensor], tie_end: Optional[Tensor], x_ties: Optional[Tensor],
               x_above: Optional[Tensor]) -> Optional[Cutoff]:
    return None if tau is None else Cutoff(tau, tie_end, x_ties, x_above)


def _cutoff_tensors(cutoff: Optional[Cutoff]) -> Tuple[Optional[Tensor], ...]:
    return (None,) * len(Cutoff._fields) if cutoff is None else tuple(cutoff)


# The ops take a sampling cutoff as its four tensors (Cutoff's fields, in order), None without one.
@triton_op("triton_vocab_fwd")
def _vocab_fwd_op(logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool,
                  row_mask: Optional[Tensor] = None, tau: Optional[Tensor] = None, tie_end: Optional[Tensor] = None,
                  x_ties: Optional[Tensor] = None, x_above: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    logps, lse, entropy = vocab_fwd(logits, ids, params, compute_entropy, row_mask=row_mask,
                                    cutoff=_cutoff_of(tau, tie_end, x_ties, x_above))
    # A custom op cannot return None: an empty tensor stands for "entropy not computed".
    return logps, lse, lse.new_empty(0) if entropy is None else entropy


# The backward ops take (logits, ids, lse, dlogps, dentropy, entropy, params[, out]) as vocab_bwd.
@triton_op("triton_vocab_bwd")
def _vocab_bwd_op(logits: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
                  entropy: Optional[Tensor], params: Tensor, grad_dtype: Optional[torch.dtype] = None,
                  tau: Optional[Tensor] = None, tie_end: Optional[Tensor] = None, x_ties: Optional[Tensor] = None,
                  x_above: Optional[Tensor] = None) -> Tensor:
    return vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, params, grad_dtype=grad_dtype,
                     cutoff=_cutoff_of(tau, tie_end, x_ties, x_above))


@triton_op("triton_vocab_bwd_out", mutates_args=("out",))
def _vocab_bwd_out_op(logits: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
                      entropy: Optional[Tensor], params: Tensor, out: Tensor, tau: Optional[Tensor] = None,
                      tie_end: Optional[Tensor] = None, x_ties: Optional[Tensor] = None,
                      x_above: Optional[Tensor] = None) -> None:
    vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, params, out=out,
              cutoff=_cutoff_of(tau, tie_end, x_ties, x_above))


@triton_op("triton_vocab_bwd_inplace", mutates_args=("logits",))
def _vocab_bwd_inplace_op(logits: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
                          entropy: Optional[Tensor], params: Tensor, tau: Optional[Tensor] = None,
                          tie_end: Optional[Tensor] = None, x_ties: Optional[Tensor] = None,
                          x_above: Optional[Tensor] = None) -> None:
    vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, params, out=logits,
              cutoff=_cutoff_of(tau, tie_end, x_ties, x_above))


def logits_fwd(
    logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool, row_mask: Optional[Tensor] = None,
    cutoff: Optional[Cutoff] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-row ``logp``, ``lse`` and (optionally) entropy of ``logits / temperature``.

    Args:
        logits: ``(N, V)`` fp32 / bf16 / fp16 / fp64; any row stride, last dim contiguous.
        ids: ``(N,)`` int64 / int32 target ids in ``[0, V)`` (not checked here: no host sync). An
            id outside ``[0, V)`` is never read: its target logit counts as -inf (``logp = -inf``).
        params: ``(NUM_SLOTS,)`` float64 hyperparameters on the logits' device (the temperature
            slots are read), e.g. ``LossParams.values_on(device)`` or ``vocab_values(T)``.
        compute_entropy: also return ``H = -sum p log p``.
        row_mask: ``(N,)`` or None; a row whose value is 0 is not read at all and gets
            ``logp = lse = entropy = 0`` (for masked positions: no HBM traffic).
        cutoff: the rows' sampling cutoff
            (:func:`~grpo_fused.kernels.sampling_support.sampling_cutoff` of these logits), or None
            (the full softmax). With it, every output is that of the softmax over each row's
            support: ``lse`` over the kept logits, ``logp = -inf`` for a dropped id.

    Returns:
        ``(logps, lse, entropy_or_None)``, each ``(N,)`` fp32 (fp64 for fp64 logits);
        ``lse`` is the logsumexp of ``logits / temperature`` (over the support).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    # Through the op: an eager op call launches the kernel directly (no tracing wrapper), and a
    # caller being traced by torch.compile sees one op.
    logps, lse, entropy = _vocab_fwd_op(logits, ids, params, bool(compute_entropy), row_mask, *_cutoff_tensors(cutoff))
    return logps, lse, entropy if compute_entropy else None


def logits_bwd(
    logits: Tensor,
    ids: Tensor,
    lse: Tensor,
    dlogps: Tensor,
    dentropy: Optional[Tensor],
    entropy: Optional[Tensor],
    params: Tensor,
    out: Optional[Tensor] = None,
    grad_dtype: Optional[torch.dtype] = None,
    cutoff: Optional[Cutoff] = None,
) -> Tensor:
    """Gradient of ``sum(dlogps * logps + dentropy * entropy)`` with respect to ``logits``.

    ``dlogits_j = (dlogps * (onehot_j - p_j) - dentropy * p_j * (log p_j + H)) / temperature``
    with ``p = softmax(logits / temperature)`` recomputed from the saved ``lse``. A row whose
    ``dlogps`` (and ``dentropy``) are 0 is not read: its gradient is written as exact zeros,
    whatever its logits hold (the masked positions of a loss).

    Args:
        logits: ``(N, V)`` as given to :func:`logits_fwd`.
        ids: ``(N,)``. lse: ``(N,)`` from :func:`logits_fwd`.
        dlogps: ``(N,)`` upstream gradient of the logps (any float dtype).
        dentropy: ``(N,)`` upstream gradient of the entropy, or None (no entropy term).
        entropy: ``(N,)`` from :func:`logits_fwd`; required when ``dentropy`` is given.
        params: the forward's hyperparameter vector.
        out: ``(N, V)`` buffer in logits' dtype to write into; ``out=logits`` overwrites the
            logits with their gradient (zero extra memory; the logits are gone afterwards).
        grad_dtype: without ``out``, the dtype of the returned gradient (default logits' dtype):
            the chunked linear path reads fp32 logits and writes bf16 dlogits for its GEMM in
            the same pass (no cast pass).
        cutoff: the forward's sampling cutoff, or None. A slice of the rows' columns (the chunked
            linear path's vocab slices) passes ``tie_end`` less the slice's first column, as its
            ``ids``. Dropped columns get a gradient of exactly 0.

    Returns:
        ``dlogits`` ``(N, V)`` in ``grad_dtype`` or logits' dtype (``out`` when given).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    tensors = _cutoff_tensors(cutoff)
    if out is None:
        return _vocab_bwd_op(logits, ids, lse, dlogps, dentropy, entropy, params, grad_dtype, *tensors)
    if out is logits:
        _vocab_bwd_inplace_op(logits, ids, lse, dlogps, dentropy, entropy, params, *tensors)
    else:
        _vocab_bwd_out_op(logits, ids, lse, dlogps, dentropy, entropy, params, out, *tensors)
    return out


def dlogits_from_row_grads(rows: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
                           entropy: Optional[Tensor], params: Tensor, inplace: bool,
                           cutoff: Optional[Cutoff] = None) -> Tensor:
    """The backward op, in place (the gradient overwrites ``rows``, which is returned) or not.

    Under torch.compile the out-of-place op is used: AOTAutograd does not let a backward graph
    mutate a tensor saved from forward, so the in-place saving is an eager-mode feature.
    """
    tensors = _cutoff_tensors(cutoff)
    if inplace and not torch.compiler.is_compiling():
        _vocab_bwd_inplace_op(rows, ids, lse, dlogps, dentropy, entropy, params, *tensors)
        return rows
    return _vocab_bwd_op(rows, ids, lse, dlogps, dentropy, entropy, params, None, *tensors)


# --------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SavedVocabPass:
    inplace_backward: bool
    out_shape: Tuple[int, ...]


class SelectiveLogSoftmax(torch.autograd.Function):
    """``(logits (..., V), ids (...), params) -> (logps (...), entropy (...) or None)``, differentiable in logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool, inplace_backward: bool,
                row_mask: Optional[Tensor] = None, support: Optional[SupportRule] = None):
        rows = as_rows(logits)
        cutoff = None
        if support is not None:
            # The cutoff reads the rows before the forward pass does, and backward reuses it.
            flat_mask = None if row_mask is None else row_mask.reshape(-1).contiguous()
            cutoff = sampling_cutoff(rows, params, support, flat_mask)
        logps, lse, entropy = _vocab_fwd_op(rows, ids, params, compute_entropy, row_mask, *_cutoff_tensors(cutoff))
        entropy = entropy if compute_entropy else None
        ctx.saved = _SavedVocabPass(inplace_backward, tuple(logits.shape))
        # (No ctx.set_materialize_grads(False): torch.compile cannot trace it. An entropy nobody
        # differentiates arrives as zeros and costs a few FLOPs a column in the backward.)
        ctx.save_for_backward(rows, ids, params, lse, entropy, row_mask, *(cutoff or (None,) * len(Cutoff._fields)))
        out_shape = tuple(logits.shape[:-1])
        if entropy is None:
            return logps.view(out_shape), None
        return logps.view(out_shape), entropy.view(out_shape)

    @staticmethod
    def backward(ctx, dlogps: Optional[Tensor], dentropy: Optional[Tensor]):
        rows, ids, params, lse, entropy, row_mask, *cutoff = ctx.saved_tensors
        saved: _SavedVocabPass = ctx.saved
        if dlogps is None:
            dlogps = torch.zeros_like(lse)
        if row_mask is not None:
            # A masked row's outputs are constants (0): no gradient reaches it, so the backward
            # kernel writes its row as zeros without reading it.
            keep = row_mask.reshape(-1) != 0
            dlogps = torch.where(keep, dlogps.reshape(-1), 0.0)
            if dentropy is not None:
                dentropy = torch.where(keep, dentropy.reshape(-1), 0.0)
        dlogits = dlogits_from_row_grads(
            rows, ids, lse, dlogps.reshape(-1), None if dentropy is None else dentropy.reshape(-1),
            entropy, params, saved.inplace_backward, None if cutoff[0] is None else Cutoff(*cutoff),
        )
        return dlogits.view(saved.out_shape), None, None, None, None, None, None


def selective_log_softmax(
    logits: Tensor,
    ids: Tensor,
    params: Tensor,
    compute_entropy: bool = False,
    inplace_backward: bool = False,
    row_mask: Optional[Tensor] = None,
    support: Optional[SupportRule] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Triton :func:`grpo_fused.reference.selective_log_softmax`, differentiable in ``logits``.

    Args:
        logits: ``(..., V)`` fp32 / bf16 / fp16 / fp64. 2-D and 3-D inputs with a contiguous
            last dim are read in place (any row / batch stride); others are viewed or copied.
        ids: ``(...)`` int64 / int32 in ``[0, V)``.
        params: ``(NUM_SLOTS,)`` float64 hyperparameters on the logits' device (the temperature).
        compute_entropy: also return the per-token entropy (same pass). Default False.
        inplace_backward: backward writes the gradient into ``logits``' buffer; the caller must
            not read those logits after backward (eager mode only; under torch.compile the
            gradient gets its own buffer). Default False.
        row_mask: ``(...)`` or None (default): positions whose value is 0 are not read (their
            logps and entropy are 0, their gradient rows exact zeros). The loss paths pass the
            completion mask, so masked tokens cost no HBM read.
        support: None (default: the full softmax), or the sampling rule's compile-time part
            (:class:`~grpo_fused.kernels.sampling_support.SupportRule`; its numbers are the
            ``TOP_K`` / ``TOP_P`` / ``LOG_MIN_P`` slots of ``params``): logps and entropy of the
            sampler's truncated distribution, ``-inf`` for an id outside the support, no gradient
            to dropped logits. The cutoff search adds a few sweeps over each row in forward.

    Returns:
        ``(logps, entropy)``, ``(...)`` fp32 (fp64 for fp64 logits); entropy is None unless asked.
    """
    if inplace_backward:
        check_inplace_backward(logits)
    return SelectiveLogSoftmax.apply(logits, ids, params, bool(compute_entropy), bool(inplace_backward), row_mask,
                                     support)
