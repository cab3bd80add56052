"""Chunked linear log-softmax: per-token ``logp`` and entropy of ``hidden @ weight.T + bias``,
holding the logits of one token chunk at a time.

Forward, per chunk of ``C`` tokens: one GEMM gives the chunk's ``(C, V)`` logits, the
row kernel of :mod:`grpo_fused.kernels.selective_log_softmax` reduces them to
``(logp, lse, entropy)`` and the chunk is freed. Backward, per chunk: the logits are
recomputed, turned into ``dlogits`` in place by the same module's backward launcher, then
``dhidden[chunk] = dlogits @ W`` and ``dweight += dlogits.T @ hidden[chunk]`` (accumulated in
fp32; fp64 for fp64 inputs) and ``dbias += dlogits.sum(0)``.

Transient memory: one ``(C, V)`` chunk of logits in the compute dtype (at most
``DEFAULT_MAX_CHUNK_BYTES``), plus in backward the fp32 ``(V, H)`` weight-gradient
accumulator and a bounded fp32 slice of each chunk's weight-gradient product. The GEMMs are ``torch`` matmuls, so
this strategy runs wherever the row kernel does (CUDA, or CPU under the Triton interpreter).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .selective_log_softmax import logits_bwd, logits_fwd

Tensor = torch.Tensor

# Upper bound of one chunk's logits. At V = 151936 in bf16 this is 880 tokens a chunk.
DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20


def chunk_rows(n_tokens: int, vocab: int, element_size: int,
               max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> int:
    """Tokens per chunk, from the shapes: as many as fit ``max_chunk_bytes`` of logits, a
    multiple of 16 (GEMM-friendly), at least 16, at most ``n_tokens``.

    Why not smaller: each chunk's backward reads and writes the whole fp32 ``(V, H)``
    weight-gradient accumulator (8*V*H bytes), against 8*C*V*H FLOPs of GEMMs for the chunk;
    on an H100 (~800 TFLOP/s bf16, 3.35 TB/s) that traffic costs ~240/C of the GEMM time,
    so a chunk of a few hundred tokens would spend most of its time on the accumulator.
    """
    rows = max(1, max_chunk_bytes // max(1, vocab * element_size))
    rows = max(16, rows // 16 * 16)
    return max(1, min(rows, n_tokens))


def _compute_operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """hidden, weight, bias in one dtype (the promoted one; a mixed pair costs one cast)."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    return hidden, weight, None if bias is None else bias.to(dtype)


def _chunk_logits(hidden_chunk: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``(C, H) x (V, H) -> (C, V)`` in the inputs' dtype (fp32 accumulation inside the GEMM)."""
    if bias is None:
        return hidden_chunk @ weight.t()
    return torch.addmm(bias, hidden_chunk, weight.t())


# Bound of the fp32 product slice added to the weight-gradient accumulator at a time.
ACC_SLICE_BYTES = 128 * 2**20


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as fp32 from bf16 / fp16 operands: on CUDA one tensor-core GEMM writing fp32
    (``out_dtype``); elsewhere (no such kernel) an fp32 GEMM of upcast operands."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 (fp64) and ``a`` ``(V, C)``, ``b`` ``(C, H)`` possibly bf16 / fp16.

    torch has no GEMM taking bf16 operands and an fp32 ``C`` to add to (``addmm``'s out_dtype
    overload wants ``C`` in the operands' dtype), so the fp32 product is formed slice by slice
    of ``ACC_SLICE_BYTES`` and added: the temporary stays bounded, the GEMM stays on tensor cores.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    rows = max(1, ACC_SLICE_BYTES // (acc.shape[1] * acc.element_size()))
    for start in range(0, a.shape[0], rows):
        acc[start:start + rows] += _mm_fp32(a[start:start + rows], b)


def linear_chunked_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ids: Tensor,
    temperature: float,
    compute_entropy: bool,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Forward of the chunked strategy.

    Args:
        hidden: ``(N, H)`` float. weight: ``(V, H)``. bias: ``(V,)`` or None.
        ids: ``(N,)`` integer in ``[0, V)``. temperature: > 0. compute_entropy: also the entropy.
        chunk_size: tokens per chunk; None picks :func:`chunk_rows`.

    Returns:
        ``(logps, lse, entropy_or_None)``, each ``(N,)`` fp32 (fp64 for fp64 inputs).
    """
    hidden, weight, bias = _compute_operands(hidden, weight, bias)
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = chunk_size or chunk_rows(N, V, hidden.element_size())
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logps = torch.empty(N, dtype=out_dtype, device=hidden.device)
    lse = torch.empty(N, dtype=out_dtype, device=hidden.device)
    entropy = torch.empty(N, dtype=out_dtype, device=hidden.device) if compute_entropy else None
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        logits = _chunk_logits(hidden[start:end], weight, bias)
        chunk_logps, chunk_lse, chunk_entropy = logits_fwd(logits, ids[start:end], temperature, compute_entropy)
        logps[start:end] = chunk_logps
        lse[start:end] = chunk_lse
        if compute_entropy:
            entropy[start:end] = chunk_entropy
        del logits
    return logps, lse, entropy


def linear_chunked_bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ids: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    dlogps: Optional[Tensor],
    dentropy: Optional[Tensor],
    temperature: float,
    chunk_size: Optional[int] = None,
    needs: Tuple[bool, bool, bool] = (True, True, True),
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward of the chunked strategy: recomputes each chunk's logits.

    Args:
        hidden, weight, bias, ids, temperature, chunk_size: as in :func:`linear_chunked_fwd`.
        lse / entropy: ``(N,)`` from the forward (entropy needed only with ``dentropy``).
        dlogps / dentropy: ``(N,)`` gradients of the outputs, or None (zero).
        needs: which of ``(dhidden, dweight, dbias)`` to compute (a frozen lm_head skips the
            fp32 accumulator and its GEMM).

    Returns:
        ``(dhidden, dweight, dbias)`` in the dtypes of hidden, weight and bias; None where not
        needed (dbias also without a bias).
    """
    hidden_dtype, weight_dtype = hidden.dtype, weight.dtype
    bias_dtype = None if bias is None else bias.dtype
    hidden, weight, bias = _compute_operands(hidden, weight, bias)
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = chunk_size or chunk_rows(N, V, hidden.element_size())
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    need_dhidden, need_dweight, need_dbias = needs
    dhidden = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device) if need_dhidden else None
    dweight = torch.zeros((V, H), dtype=acc_dtype, device=hidden.device) if need_dweight else None
    dbias = torch.zeros(V, dtype=acc_dtype, device=hidden.device) if need_dbias and bias is not None else None
    if dlogps is None:
        dlogps = torch.zeros(N, dtype=lse.dtype, device=hidden.device)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        hidden_chunk = hidden[start:end]
        logits = _chunk_logits(hidden_chunk, weight, bias)
        dlogits = logits_bwd(
            logits, ids[start:end], lse[start:end], dlogps[start:end],
            None if dentropy is None else dentropy[start:end],
            None if dentropy is None else entropy[start:end],
            temperature, out=logits,
        )
        if dhidden is not None:
            torch.mm(dlogits, weight, out=dhidden[start:end])
        if dweight is not None:
            _accumulate_fp32(dweight, dlogits.t(), hidden_chunk)
        if dbias is not None:
            dbias += dlogits.sum(0, dtype=acc_dtype)
        del logits, dlogits
    return (
        None if dhidden is None else dhidden.to(hidden_dtype),
        None if dweight is None else dweight.to(weight_dtype),
        None if dbias is None else dbias.to(bias_dtype),
    )


@dataclasses.dataclass(frozen=True)
class _ChunkedState:
    temperature: float
    chunk_size: Optional[int]


class LinearLogSoftmaxChunked(torch.autograd.Function):
    """``(hidden (N, H), weight (V, H), bias, ids (N,)) -> (logps (N,), entropy (N,) or None)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, compute_entropy, chunk_size):
        logps, lse, entropy = linear_chunked_fwd(hidden, weight, bias, ids, temperature, compute_entropy, chunk_size)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, entropy)
        ctx.state = _ChunkedState(temperature, chunk_size)
        return logps, entropy

    @staticmethod
    def backward(ctx, dlogps, dentropy):
        hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
        s: _ChunkedState = ctx.state
        if dlogps is None and dentropy is None:
            return None, None, None, None, None, None, None
        dhidden, dweight, dbias = linear_chunked_bwd(
            hidden, weight, bias, ids, lse, entropy, dlogps, dentropy, s.temperature, s.chunk_size,
            needs=tuple(ctx.needs_input_grad[:3]),
        )
        return dhidden, dweight, dbias, None, None, None, None


def linear_log_softmax_chunked(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    compute_entropy: bool = False,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-token log-prob (and entropy) of ``hidden @ weight.T + bias``, one token chunk at a time.

    Args:
        hidden: ``(..., H)`` float. weight: ``(V, H)``. ids: ``(...)`` integer in ``[0, V)``.
        temperature: divides the logits (default 1.0). bias: ``(V,)`` or None.
        compute_entropy: also return the entropy (default False).
        chunk_size: tokens per chunk; None (default) picks :func:`chunk_rows`.

    Returns:
        ``(logps, entropy_or_None)`` of shape ``(...)``, fp32 (fp64 for fp64 inputs),
        differentiable with respect to hidden, weight and bias.
    """
    lead = hidden.shape[:-1]
    logps, entropy = LinearLogSoftmaxChunked.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, ids.reshape(-1),
        float(temperature), bool(compute_entropy), chunk_size,
    )
    return logps.view(lead), None if entropy is None else entropy.view(lead)
