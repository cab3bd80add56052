"""Selective log-softmax over the vocabulary: ``logp = z[id] - logsumexp(z)``, ``z = logits / T``.

One Triton program per token row streams the row's logits once, in ``BLOCK_V`` tiles (the row
pass :func:`grpo_fused.kernels.common.row_softmax_stats`: an online max / sum-exp per lane in fp32,
fp64 for fp64 logits; the target logit with a single scalar load; the entropy ``H = -sum p log p``
in the same pass). Nothing of size V is written in forward: only ``logps``, ``lse`` and
``entropy`` (N floats each).

Backward recomputes ``p = exp(z - lse)`` from the saved ``lse`` and writes, in one read of the
logits and one write,

    dlogits_j = (dlogp * (onehot_j - p_j) - dH * p_j * (log p_j + H)) / T

optionally into the logits buffer itself (``out=logits``: zero extra memory).

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

from grpo_fused.semantics import NUM_SLOTS

from .common import (P_INV_TEMPERATURE, TL_DTYPE, RowLayout, acc_dtype, as_rows, check_inplace_backward, launch_config,
                     launchable, load_param, row_offset, row_softmax_stats, triton_op)

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
    V,
    rows_inner,
    stride_outer,
    stride_inner,
    BLOCK_V: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, rows_inner, stride_outer, stride_inner)
    target = tl.load(ids_ptr + row).to(tl.int64)
    inv_temperature = load_param(params_ptr, P_INV_TEMPERATURE, ACC_DTYPE)
    lse, z_target, entropy = row_softmax_stats(
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
    params_ptr,  # (NUM_SLOTS,) float64 hyperparameters
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
    BLOCK_V: tl.constexpr,
    HAS_DENTROPY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, rows_inner, stride_outer, stride_inner)
    out_row_ptr = dlogits_ptr + row_offset(row, rows_inner, out_stride_outer, out_stride_inner)
    target = tl.load(ids_ptr + row).to(tl.int64)
    inv_temperature = load_param(params_ptr, P_INV_TEMPERATURE, ACC_DTYPE)
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


def check_params(params: Tensor, device: torch.device) -> None:
    """``params`` is the ``(NUM_SLOTS,)`` float64 hyperparameter vector, on the kernels' device."""
    if not isinstance(params, torch.Tensor) or params.dtype != torch.float64 or tuple(params.shape) != (NUM_SLOTS,):
        raise TypeError(f"params must be a ({NUM_SLOTS},) float64 tensor (grpo_fused.semantics.Slot), got "
                        f"{getattr(params, 'shape', type(params).__name__)} {getattr(params, 'dtype', '')}")
    if params.device != device or not params.is_contiguous():
        raise ValueError(f"params must be contiguous on {device}, got {params.device}")


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


def vocab_fwd(logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool, block_v: Optional[int] = None
              ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The forward launcher: :func:`logits_fwd` for ``(N, V)`` or ``(B, T, V)`` logits, launched
    directly (``block_v`` overrides the tile width); outputs are flat ``(N,)``."""
    layout = _check_vocab_inputs(logits, ids, params)
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
        logits, _flat(ids), params, logps, lse, entropy,
        layout.vocab, layout.rows_inner, layout.stride_outer, layout.stride_inner,
        BLOCK_V=block, COMPUTE_ENTROPY=entropy is not None, ACC_DTYPE=TL_DTYPE[acc], num_warps=warps,
    )
    return logps, lse, entropy


def vocab_bwd(logits: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
              entropy: Optional[Tensor], params: Tensor, out: Optional[Tensor] = None, block_v: Optional[int] = None
              ) -> Tensor:
    """The backward launcher: :func:`logits_bwd` for ``(N, V)`` or ``(B, T, V)`` logits, launched
    directly; ``dlogps`` etc. are ``(N,)``."""
    layout = _check_vocab_inputs(logits, ids, params)
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
    acc = acc_dtype(logits.dtype)
    block, warps = launch_config(layout.vocab, block_v)
    launchable(_selective_log_softmax_bwd_kernel)[(n,)](
        logits, out, _flat(ids), params, _flat(lse), _flat(dlogps), _flat(dentropy),
        _flat(entropy) if dentropy is not None else None,
        layout.vocab, layout.rows_inner, layout.stride_outer, layout.stride_inner,
        out_layout.stride_outer, out_layout.stride_inner,
        BLOCK_V=block, HAS_DENTROPY=dentropy is not None, ACC_DTYPE=TL_DTYPE[acc], num_warps=warps,
    )
    return out


# --------------------------------------------------------------------------------------
# torch.library ops: what torch.compile(fullgraph=True) traces; the launchers run inside.
# --------------------------------------------------------------------------------------


@triton_op("triton_vocab_fwd")
def _vocab_fwd_op(logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool) -> Tuple[Tensor, Tensor, Tensor]:
    logps, lse, entropy = vocab_fwd(logits, ids, params, compute_entropy)
    # A custom op cannot return None: an empty tensor stands for "entropy not computed".
    return logps, lse, lse.new_empty(0) if entropy is None else entropy


# The backward ops take (logits, ids, lse, dlogps, dentropy, entropy, params[, out]) as vocab_bwd.
@triton_op("triton_vocab_bwd")
def _vocab_bwd_op(logits: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
                  entropy: Optional[Tensor], params: Tensor) -> Tensor:
    return vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, params)


@triton_op("triton_vocab_bwd_out", mutates_args=("out",))
def _vocab_bwd_out_op(logits: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
                      entropy: Optional[Tensor], params: Tensor, out: Tensor) -> None:
    vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, params, out=out)


@triton_op("triton_vocab_bwd_inplace", mutates_args=("logits",))
def _vocab_bwd_inplace_op(logits: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
                          entropy: Optional[Tensor], params: Tensor) -> None:
    vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, params, out=logits)


def logits_fwd(
    logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-row ``logp``, ``lse`` and (optionally) entropy of ``logits / temperature``.

    Args:
        logits: ``(N, V)`` fp32 / bf16 / fp16 / fp64; any row stride, last dim contiguous.
        ids: ``(N,)`` int64 / int32 target ids in ``[0, V)`` (not checked here: no host sync).
        params: ``(NUM_SLOTS,)`` float64 hyperparameters on the logits' device (the temperature
            slots are read), e.g. ``LossParams.values_on(device)`` or ``vocab_values(T)``.
        compute_entropy: also return ``H = -sum p log p``.

    Returns:
        ``(logps, lse, entropy_or_None)``, each ``(N,)`` fp32 (fp64 for fp64 logits);
        ``lse`` is the logsumexp of ``logits / temperature``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    # Through the op: an eager op call launches the kernel directly (no tracing wrapper), and a
    # caller being traced by torch.compile sees one op.
    logps, lse, entropy = _vocab_fwd_op(logits, ids, params, bool(compute_entropy))
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
        params: the forward's hyperparameter vector.
        out: ``(N, V)`` buffer in logits' dtype to write into; ``out=logits`` overwrites the
            logits with their gradient (zero extra memory; the logits are gone afterwards).

    Returns:
        ``dlogits`` ``(N, V)`` in logits' dtype (``out`` when given).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if out is None:
        return _vocab_bwd_op(logits, ids, lse, dlogps, dentropy, entropy, params)
    if out is logits:
        _vocab_bwd_inplace_op(logits, ids, lse, dlogps, dentropy, entropy, params)
    else:
        _vocab_bwd_out_op(logits, ids, lse, dlogps, dentropy, entropy, params, out)
    return out


def dlogits_from_row_grads(rows: Tensor, ids: Tensor, lse: Tensor, dlogps: Tensor, dentropy: Optional[Tensor],
                           entropy: Optional[Tensor], params: Tensor, inplace: bool) -> Tensor:
    """The backward op, in place (the gradient overwrites ``rows``, which is returned) or not.

    Under torch.compile the out-of-place op is used: AOTAutograd does not let a backward graph
    mutate a tensor saved from forward, so the in-place saving is an eager-mode feature.
    """
    if inplace and not torch.compiler.is_compiling():
        _vocab_bwd_inplace_op(rows, ids, lse, dlogps, dentropy, entropy, params)
        return rows
    return _vocab_bwd_op(rows, ids, lse, dlogps, dentropy, entropy, params)


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
    def forward(ctx, logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool, inplace_backward: bool):
        rows = as_rows(logits)
        logps, lse, entropy = _vocab_fwd_op(rows, ids, params, compute_entropy)
        entropy = entropy if compute_entropy else None
        ctx.saved = _SavedVocabPass(inplace_backward, tuple(logits.shape))
        # (No ctx.set_materialize_grads(False): torch.compile cannot trace it. An entropy nobody
        # differentiates arrives as zeros and costs a few FLOPs a column in the backward.)
        ctx.save_for_backward(rows, ids, params, lse, entropy)
        out_shape = tuple(logits.shape[:-1])
        if entropy is None:
            return logps.view(out_shape), None
        return logps.view(out_shape), entropy.view(out_shape)

    @staticmethod
    def backward(ctx, dlogps: Optional[Tensor], dentropy: Optional[Tensor]):
        rows, ids, params, lse, entropy = ctx.saved_tensors
        saved: _SavedVocabPass = ctx.saved
        if dlogps is None:
            dlogps = torch.zeros_like(lse)
        dlogits = dlogits_from_row_grads(
            rows, ids, lse, dlogps.reshape(-1), None if dentropy is None else dentropy.reshape(-1),
            entropy, params, saved.inplace_backward,
        )
        return dlogits.view(saved.out_shape), None, None, None, None


def selective_log_softmax(
    logits: Tensor,
    ids: Tensor,
    params: Tensor,
    compute_entropy: bool = False,
    inplace_backward: bool = False,
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

    Returns:
        ``(logps, entropy)``, ``(...)`` fp32 (fp64 for fp64 logits); entropy is None unless asked.
    """
    if inplace_backward:
        check_inplace_backward(logits)
    return SelectiveLogSoftmax.apply(logits, ids, params, bool(compute_entropy), bool(inplace_backward))
