"""Chunked linear log-softmax: per-token ``logp`` and entropy of ``hidden @ weight.T + bias``,
holding the logits of one token chunk (or one vocab slice) at a time.

Forward, per chunk of ``C`` tokens: one GEMM gives the chunk's ``(C, V)`` logits in fp32
(bf16 / fp16 operands on tensor cores, fp32 output: the logits are never rounded to bf16,
as in the reference), the row kernel of :mod:`grpo_fused.kernels.selective_log_softmax`
reduces them to ``(logp, lse, entropy)`` and the chunk is freed.

Backward, two passes that each recompute logits from the saved ``lse`` (and entropy):

* ``dhidden``, over token chunks: the row kernel's backward reads a chunk's fp32 ``(C, V)``
  logits and writes their gradient in the GEMM's dtype (bf16 for bf16 weights: no cast pass;
  in place for fp32), then ``dhidden[chunk] = dlogits @ W``.
* ``dweight`` and ``dbias``, over vocab slices: a slice's ``(N, Vs)`` logits become its
  ``dlogits`` the same way (the softmax of a column needs only its row's ``lse``), then
  ``dweight[slice] = dlogits.T @ hidden``: one GEMM whose fp32 accumulation runs over all
  N tokens, written once in the weight's dtype.

Why two passes rather than accumulating ``dweight`` chunk by chunk: that needs an fp32
``(V, H)`` accumulator (2.2 GB at H=3584, V=151936) that every chunk reads and writes
(8*V*H bytes, ~40-80% of the chunk's GEMM time on an H100 at a few hundred tokens a chunk),
and torch has no bf16 GEMM that adds into an fp32 ``C``. The vocab pass costs one extra
logits GEMM (2*N*V*H FLOPs, +25% of the 8*N*V*H total), holds no ``(V, H)`` state beyond the
gradient itself, and is deterministic.

Sampling support (``Chunked.forward_on_support``): a chunk's logits are whole rows, so the cutoff
search runs on each chunk before its row pass, and the cutoff ``(N,)`` is kept for backward. The
cutoff is a logit value, and the token that sets it lies exactly on it, so the backward must see
each logit rounded as forward's GEMM rounded it: a GEMM of another shape (the vocab-slice pass) may
round that logit one ulp lower and drop the token from ``dweight`` alone (seen with fp64 CPU BLAS).
So under a support the backward has one pass, over forward's token chunks with forward's GEMM
shapes, and ``dweight`` / ``dbias`` accumulate chunk by chunk (for bf16 / fp16 weights in an fp32
``(V, H)`` buffer, each chunk's product written fp32 by the tensor-core GEMM and then added: the memory
and traffic the vocab pass avoids, paid only on this path).

Transient memory: at most :data:`grpo_fused.kernels.splits.DEFAULT_MAX_CHUNK_BYTES` of logit state (fp32 logits plus, for
bf16 / fp16 operands, their operand-dtype gradient copy) at any time. The GEMMs are ``torch``
matmuls, so this strategy runs wherever the row kernel does (CUDA, or CPU under the Triton
interpreter).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .sampling_support import Cutoff, SupportRule, sampling_cutoff
from .selective_log_softmax import logits_bwd, logits_fwd
from .splits import chunk_rows, logit_bytes

Tensor = torch.Tensor

def _compute_operands(hidden: Tensor, weight: Tensor):
    """hidden and weight in one dtype (the promoted one; a mixed pair costs one cast)."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as fp32 from bf16 / fp16 operands: on CUDA one tensor-core GEMM writing fp32
    (``out_dtype``); elsewhere (no such kernel) an fp32 GEMM of upcast operands."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``(n, H) x (v, H) (+ bias (v,)) -> (n, v)`` in fp32 (fp64 for fp64 operands)."""
    if hidden.dtype in (torch.float32, torch.float64):
        if bias is None:
            return hidden @ weight.t()
        return torch.addmm(bias.to(hidden.dtype), hidden, weight.t())
    logits = _mm_fp32(hidden, weight.t())
    if bias is not None:
        logits += bias.float()
    return logits


def linear_chunked_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ids: Tensor,
    params: Tensor,
    compute_entropy: bool,
    chunk_size: Optional[int] = None,
    support: Optional[SupportRule] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Cutoff]]:
    """Forward of the chunked strategy.

    Args:
        hidden: ``(N, H)`` float. weight: ``(V, H)``. bias: ``(V,)`` or None.
        ids: ``(N,)`` integer in ``[0, V)``. params: ``(NUM_SLOTS,)`` float64 hyperparameters on
            the device (the temperature; with ``support`` the sampling slots too).
        compute_entropy: also the entropy.
        chunk_size: tokens per chunk; None picks :func:`chunk_rows`.
        support: None, or the sampling rule: each chunk's logits are whole rows, so the cutoff
            search (:func:`~grpo_fused.kernels.sampling_support.sampling_cutoff`) runs on the chunk
            before its row pass.

    Returns:
        ``(logps, lse, entropy_or_None, cutoff_or_None)``, each ``(N,)``: fp32 (fp64 for fp64
        inputs); the cutoff (with ``support``) is what the backward needs to find the support again.
    """
    hidden, weight = _compute_operands(hidden, weight)
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = chunk_size or chunk_rows(N, V, logit_bytes(hidden.dtype))
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logps = torch.empty(N, dtype=out_dtype, device=hidden.device)
    lse = torch.empty(N, dtype=out_dtype, device=hidden.device)
    entropy = torch.empty(N, dtype=out_dtype, device=hidden.device) if compute_entropy else None
    cutoff = None
    if support is not None:
        cutoff = Cutoff.empty(N, out_dtype, hidden.device)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        logits = _logits(hidden[start:end], weight, bias)
        chunk_cutoff = None
        if support is not None:
            chunk_cutoff = sampling_cutoff(logits, params, support)
            for whole, part in zip(cutoff, chunk_cutoff):
                whole[start:end] = part
        chunk_logps, chunk_lse, chunk_entropy = logits_fwd(logits, ids[start:end], params, compute_entropy,
                                                           cutoff=chunk_cutoff)
        logps[start:end] = chunk_logps
        lse[start:end] = chunk_lse
        if compute_entropy:
            entropy[start:end] = chunk_entropy
        del logits
    return logps, lse, entropy, cutoff


def linear_chunked_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, lse: Tensor,
                       entropy: Optional[Tensor], dlogps: Optional[Tensor], dentropy: Optional[Tensor], params: Tensor,
                       chunk_size: Optional[int] = None, vocab_slice: Optional[int] = None,
                       needs: Tuple[bool, bool, bool] = (True, True, True), cutoff: Optional[Cutoff] = None,
                       ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward of the chunked strategy: a token-chunk pass for ``dhidden``, a vocab-slice pass
    for ``dweight`` / ``dbias``, each recomputing its logits.

    Args:
        hidden, weight, bias, ids, params, chunk_size: as in :func:`linear_chunked_fwd`.
        lse / entropy: ``(N,)`` from the forward (entropy needed only with ``dentropy``).
        dlogps / dentropy: ``(N,)`` gradients of the outputs, or None (zero).
        vocab_slice: vocab columns per slice of the weight pass; None picks them from the shapes.
        needs: which of ``(dhidden, dweight, dbias)`` to compute (a frozen lm_head skips the
            whole vocab pass).
        cutoff: the forward's sampling cutoff, or None (the full softmax). A vocab slice tests its
            columns with ``tie_end`` shifted by the slice's first column.

    Returns:
        ``(dhidden, dweight, dbias)`` in the dtypes of hidden, weight and bias; None where not
        needed (dbias also without a bias).
    """
    hidden_dtype, weight_dtype = hidden.dtype, weight.dtype
    hidden, weight = _compute_operands(hidden, weight)
    N, H = hidden.shape
    V = weight.shape[0]
    per_logit = logit_bytes(hidden.dtype)
    need_dhidden, need_dweight, need_dbias = needs
    need_dbias = need_dbias and bias is not None
    if dlogps is None:
        dlogps = torch.zeros(N, dtype=lse.dtype, device=hidden.device)

    # The gradient GEMMs take dlogits in the operand dtype. For bf16 / fp16 operands the row kernel
    # reads the fp32 logits and writes the bf16 dlogits in the same pass (4 + 2 bytes a logit, no
    # cast pass reading 4 and writing 2 more); for fp32 / fp64 the logits' buffer becomes their
    # gradient in place.
    in_place = hidden.dtype in (torch.float32, torch.float64)

    def dlogits_of(logits, rows, target, first_column=0):
        rows_cutoff = None
        if cutoff is not None:
            rows_cutoff = Cutoff(cutoff.tau[rows], cutoff.tie_end[rows] - first_column, cutoff.x_ties[rows],
                                 cutoff.x_above[rows])
        return logits_bwd(
            logits, target, lse[rows], dlogps[rows],
            None if dentropy is None else dentropy[rows],
            None if dentropy is None else entropy[rows],
            params, out=logits if in_place else None, grad_dtype=None if in_place else weight.dtype,
            cutoff=rows_cutoff,
        )

    dhidden = dweight = dbias = None
    if cutoff is not None and (need_dweight or need_dbias):
        # Forward's logits, bit for bit (module docstring): every gradient from the token chunks.
        dhidden, dweight, dbias = _token_chunk_grads(hidden, weight, bias, ids, dlogits_of, N, V, H, chunk_size,
                                                     per_logit, need_dhidden, need_dweight, need_dbias, lse.dtype)
    if need_dhidden and dhidden is None:
        dhidden = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device)
        chunk = chunk_size or chunk_rows(N, V, per_logit)
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            logits = _logits(hidden[rows], weight, bias)
            dlogits = dlogits_of(logits, rows, ids[rows])
            del logits
            torch.mm(dlogits, weight, out=dhidden[rows])
            del dlogits

    if (need_dweight or need_dbias) and dweight is None and dbias is None:
        dweight = torch.empty((V, H), dtype=weight.dtype, device=hidden.device) if need_dweight else None
        dbias = torch.empty(V, dtype=torch.promote_types(bias.dtype, lse.dtype), device=hidden.device) if need_dbias else None
        width = vocab_slice or chunk_rows(V, N, per_logit)
        every_row = slice(0, N)
        for start in range(0, V, width):
            cols = slice(start, min(start + width, V))
            # Ids shifted into the slice: a token whose id lies outside it has no target column
            # here. The row kernel's backward only compares ids with column indices, never loads
            # at them, so out-of-slice ids are safe (the chunked tests with vocab_slice cover it).
            logits = _logits(hidden, weight[cols], None if bias is None else bias[cols])
            dlogits = dlogits_of(logits, every_row, ids - start, start)
            del logits
            if dbias is not None:
                torch.sum(dlogits, 0, dtype=dbias.dtype, out=dbias[cols])
            if dweight is not None:
                torch.mm(dlogits.t(), hidden, out=dweight[cols])
            del dlogits
    return (
        None if dhidden is None else dhidden.to(hidden_dtype),
        None if dweight is None else dweight.to(weight_dtype),
        None if dbias is None else dbias.to(bias.dtype),
    )


def _token_chunk_grads(hidden, weight, bias, ids, dlogits_of, N, V, H, chunk_size, per_logit, need_dhidden,
                       need_dweight, need_dbias, stat_dtype):
    """``(dhidden, dweight, dbias)`` from one pass over forward's token chunks, ``dweight`` and
    ``dbias`` accumulated chunk by chunk (fp32 for 16-bit weights); None where not needed."""
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    dhidden = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device) if need_dhidden else None
    dweight = torch.zeros((V, H), dtype=acc_dtype, device=hidden.device) if need_dweight else None
    dbias = (torch.zeros(V, dtype=torch.promote_types(bias.dtype, stat_dtype), device=hidden.device)
             if need_dbias else None)
    chunk = chunk_size or chunk_rows(N, V, per_logit)
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        logits = _logits(hidden[rows], weight, bias)  # the shape forward's GEMM had
        dlogits = dlogits_of(logits, rows, ids[rows])
        del logits
        if dhidden is not None:
            torch.mm(dlogits, weight, out=dhidden[rows])
        if dbias is not None:
            dbias += dlogits.sum(0, dtype=dbias.dtype)
        if dweight is not None:
            if dlogits.dtype == acc_dtype:
                dweight.addmm_(dlogits.t(), hidden[rows])
            else:  # 16-bit operands: the tensor-core GEMM writing fp32, then the add (no fp32 GEMM)
                dweight += _mm_fp32(dlogits.t(), hidden[rows])
        del dlogits
    return dhidden, dweight, dbias


@dataclasses.dataclass(frozen=True)
class Chunked:
    """The chunked strategy of :func:`grpo_fused.kernels.linear_log_softmax.linear_log_softmax`.

    Attributes:
        chunk_size: tokens per chunk; None picks :func:`~grpo_fused.kernels.splits.chunk_rows`.
        vocab_slice: vocab columns per slice of the backward's weight pass; None picks them from
            the shapes.
    """

    chunk_size: Optional[int] = None
    vocab_slice: Optional[int] = None

    def forward(self, hidden, weight, bias, ids, params, compute_entropy):
        return linear_chunked_fwd(hidden, weight, bias, ids, params, compute_entropy, self.chunk_size)[:3]

    def forward_on_support(self, hidden, weight, bias, ids, params, compute_entropy, support: SupportRule):
        return linear_chunked_fwd(hidden, weight, bias, ids, params, compute_entropy, self.chunk_size, support)

    def backward(self, hidden, weight, bias, ids, params, lse, entropy, dlogps, dentropy, needs,
                 cutoff: Optional[Cutoff] = None):
        return linear_chunked_bwd(hidden, weight, bias, ids, lse, entropy, dlogps, dentropy, params, self.chunk_size,
                                  self.vocab_slice, needs=needs, cutoff=cutoff)
