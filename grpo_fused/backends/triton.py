"""The Triton backend (``grpo_fused.kernels``): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

The host glue between the loss-type table and the kernels: it turns a :class:`LossBatch` and
:class:`LossParams` into the kernels' arguments (per-token inputs, reduction weights, the
``params`` vector on the device, surrogate / KL codes and option bits) and finishes the metrics
with the semantics layer's :func:`token_metrics`.

* Token-level losses from logits run the fused epilogue kernel (:mod:`grpo_fused.kernels.grpo_logits`):
  one pass over the vocabulary, the reduction a plain sum of per-token contributions.
* Sequence-level losses (GSPO's sequence ratio, GMPO's geometric mean) need every token of a
  sequence before the surrogate can be evaluated, and the table's tail-only rows
  (``fused_epilogue=False``) have no epilogue in the kernel: they run the vocab op, then the ``(B, T)`` tail
  :func:`grpo_fused.semantics.grpo_output` (never re-reading the logits), differentiated by
  autograd down to the per-token ``dlogp`` / ``dH`` the one backward kernel consumes.
* The linear path runs a strategy's vocab pass (``chunked``: GEMMs on token chunks + the row
  kernels; ``tiled``: logit tiles on chip), then the same tail.
* A sampling rule (``top_k`` / ``top_p`` / ``min_p``, :attr:`Option.SAMPLING_SUPPORT`) runs the
  cutoff search of :mod:`grpo_fused.kernels.sampling_support` before the vocab pass (on the logits,
  or on each chunk of the chunked linear path), then the row kernels over each row's support, then
  the ``(B, T)`` tail, which takes outside-support tokens out of the mask (so never the fused
  epilogue, whose normalizers are fixed before the pass). The tiled strategy never holds a row and
  refuses a rule.

Masked positions cost no HBM read (:data:`SKIP_MASKED_ROWS`): the token-level kernel skips rows
whose reduction weight is 0, the sequence-level path hands the completion mask to the vocab op as
its row mask, and every backward writes zeros without reading a row that receives no gradient. The
per-token ``logps`` / ``entropy`` returned at masked positions are then 0 (the tail's neutral value;
nothing at a masked position reaches the loss, a metric or a gradient either way).

Importing this module imports Triton; the dispatcher treats an ImportError as "not available".
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from grpo_fused.kernels import group_advantages as _advantages
from grpo_fused.kernels import grpo_logits as _grpo
from grpo_fused.kernels.linear_chunked import Chunked
from grpo_fused.kernels.linear_log_softmax import linear_log_softmax as _linear_log_softmax
from grpo_fused.kernels.linear_tiled import Tiled
from grpo_fused.kernels import selective_log_softmax as _vocab
from grpo_fused.kernels.sampling_support import SupportRule
from grpo_fused.kernels.common import FLAG_HIGH, FLAG_LOW, check_inplace_backward, cpu_tensors_accepted

from ..semantics import (
    GRPOOutput,
    LossBatch,
    LossParams,
    compute_dtype,
    entropy_weights,
    grpo_output,
    sampling_options,
    shown,
    token_metrics,
    token_weights,
    vocab_values,
)

Tensor = torch.Tensor

group_advantages = _advantages.group_advantages

# Rows at masked positions are not read in forward (1 read of N x V saved per masked token, 1/3 of
# the logits path's bytes there). GRPO_FUSED_SKIP_MASKED_ROWS=0 reads them (their logps and
# entropy are then those of their ids) at the cost of those bytes. Read at each call.
SKIP_MASKED_ROWS = os.environ.get("GRPO_FUSED_SKIP_MASKED_ROWS", "1") != "0"


def availability(device):
    if device.type == "cuda":
        return None
    if device.type == "cpu" and cpu_tensors_accepted():
        return None
    return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"


def resolve_strategy(strategy: str) -> str:
    """``auto`` -> ``chunked``: its GEMMs run at cuBLAS speed, its transient is one chunk of
    logits (about the size of the hidden states), and it computes fp64 inputs in fp64.
    ``tiled`` trades GEMM speed for O(N) memory beyond the weight gradient.

    Predicted at N = 16384, V = 151936, H = 3584, bf16 on an H100 (the static report's model, not
    measured on GPU): chunked ~135 ms fwd+bwd (5 cuBLAS GEMMs, 89 TFLOP, + 80 GB of fp32 logit
    traffic), tiled ~305-525 ms (its backward reduces 558 GB into dhidden / dweight in L2); at
    N = 131072 ~1.1 s against ~2.4-4.2 s. Chunked wins both."""
    return "chunked" if strategy == "auto" else strategy


# --------------------------------------------------------------------------------------
# Log-probs only.
# --------------------------------------------------------------------------------------


def selective_log_softmax(logits, ids, temperature, compute_entropy, inplace_backward=False, sampling=None):
    values = vocab_values(temperature, sampling).to(logits.device, non_blocking=True)
    return _vocab.selective_log_softmax(logits, ids, values, compute_entropy, inplace_backward,
                                        support=SupportRule.of(sampling_options(sampling)))


def _linear_vocab_pass(hidden, weight, bias, ids, values, compute_entropy, strategy, chunk_size, filter_eps,
                       support: Optional[SupportRule] = None):
    if resolve_strategy(strategy) == "tiled":
        if support is not None:
            # Its logit tiles never make a whole row: no cutoff can be searched there.
            raise ValueError("strategy='tiled' cannot apply a sampling rule: use 'chunked' or 'auto'")
        chosen = Tiled(filter_eps)
    else:
        chosen = Chunked(chunk_size)
    return _linear_log_softmax(hidden, weight, ids, values, bias, compute_entropy, chosen, support)


def linear_log_softmax(hidden, weight, bias, ids, temperature, compute_entropy, strategy="auto", chunk_size=None,
                       filter_eps=None, sampling=None):
    values = vocab_values(temperature, sampling).to(hidden.device, non_blocking=True)
    return _linear_vocab_pass(hidden, weight, bias, ids, values, compute_entropy, strategy, chunk_size, filter_eps,
                              SupportRule.of(sampling_options(sampling)))


# --------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------


def _per_token(x: Optional[Tensor], B: int, T: int, dtype: torch.dtype) -> Optional[Tensor]:
    """``(B,)``, ``(B, 1)`` or ``(B, T)`` -> contiguous ``(B*T,)`` in ``dtype`` (a view when it already is)."""
    if x is None:
        return None
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    return x.to(dtype).expand(B, T).reshape(B * T).contiguous()


def grpo_loss(logits: Tensor, batch: LossBatch, params: LossParams, inplace_backward: bool = False) -> GRPOOutput:
    """:func:`grpo_fused.grpo_loss` on Triton: logits ``(B, T, V)``, read in place (a slice such
    as ``logits[:, :-1]`` is never copied)."""
    if inplace_backward:
        check_inplace_backward(logits)
    spec = params.spec
    values = params.values_on(logits.device)
    support = SupportRule.of(spec.options)
    if spec.sequence_level or not spec.loss_type.fused_epilogue or support is not None:
        # The fused epilogue cannot evaluate a sequence-level ratio or a surrogate it does not
        # implement (the table's fused_epilogue=False rows), nor drop the tokens a sampling support
        # excludes from the mask (that changes every normalizer): vocab pass, then the (B, T) tail.
        row_mask = None
        if SKIP_MASKED_ROWS and batch.completion_mask is not None:
            row_mask = batch.completion_mask != 0
        logps, entropy = _vocab.selective_log_softmax(logits, batch.completion_ids, values, spec.compute_entropy,
                                                      inplace_backward, row_mask, support)
        return grpo_output(logps, entropy, batch, params)

    B, T = batch.shape
    acc = compute_dtype(logits.dtype)
    mask = batch.mask_as(acc, logits.device)
    weights = token_weights(mask, spec, batch.num_items_in_batch, batch.global_batch_size)
    bonus_weights = entropy_weights(mask).reshape(-1).contiguous() if spec.entropy_bonus else None
    codes = _grpo.EpilogueCodes(int(spec.loss_type.surrogate), None if spec.kl is None else int(spec.kl),
                                int(spec.options))
    loss, logps, entropy, ratio, kl, flags = _grpo.GRPOLogitsLoss.apply(
        logits,
        batch.completion_ids,
        values,
        _per_token(batch.advantages, B, T, acc),
        weights.reshape(-1).contiguous(),
        _per_token(batch.old_logps, B, T, acc),
        _per_token(batch.ref_logps, B, T, acc) if spec.kl is not None else None,
        _per_token(batch.is_weights, B, T, acc),
        bonus_weights,
        codes,
        bool(inplace_backward),
        SKIP_MASKED_ROWS,
    )

    def rows(t):
        return None if t is None else t.view(B, T)

    low = (flags & FLAG_LOW.value).to(acc).view(B, T)
    high = (flags & FLAG_HIGH.value).ne(0).to(acc).view(B, T)
    metrics = token_metrics(spec, mask, rows(ratio), kl=rows(kl), entropy=rows(entropy), low=low, high=high)
    return GRPOOutput(loss, shown(logps.view(B, T), batch.completion_mask), shown(rows(entropy), batch.completion_mask),
                      metrics)


def linear_grpo_loss(hidden, weight, bias, batch: LossBatch, params: LossParams, strategy="auto", chunk_size=None,
                     filter_eps=None) -> GRPOOutput:
    """:func:`grpo_fused.linear_grpo_loss` on Triton: the strategy's vocab pass, then the ``(B, T)``
    tail (every surrogate, level, KL estimator, bonus and metric of the spec, the same numbers)."""
    spec = params.spec
    logps, entropy = _linear_vocab_pass(hidden, weight, bias, batch.completion_ids, params.values_on(hidden.device),
                                        spec.compute_entropy, strategy, chunk_size, filter_eps,
                                        SupportRule.of(spec.options))
    dtype = compute_dtype(hidden.dtype)
    return grpo_output(logps.to(dtype), None if entropy is None else entropy.to(dtype), batch, params)


