"""The C++ extension backend (``grpo_fused._C``, ops ``torch.ops.grpo_fused_cpp.*``): CPU tensors.

What runs in C++ (``csrc/``):

* ``logits_fwd`` / ``logits_bwd`` (+ ``logits_bwd_inplace``): the vocabulary pass. One read of
  each logits row in the forward (online logsumexp, entropy in the same pass), one read and one
  write in the backward (softmax recomputed from the saved ``lse``), fp32 accumulation (fp64 for
  fp64 logits), ``at::parallel_for`` over rows. Nothing of size V is allocated but the gradient.
* ``linear_fwd`` / ``linear_bwd``: the same from hidden states, ``chunk_rows`` tokens at a time
  (GEMM, then the row kernel on the chunk in place); one chunk of fp32 logits at a time.
* ``logits_fwd_support`` / ``linear_fwd_support``: the forwards under a sampling support
  (:class:`~grpo_fused.semantics.SamplingRule`, ``Option.SAMPLING_SUPPORT``): each row's cutoff
  (``csrc/sampling_support.h``: a few sweeps over the row while it sits in L2, no sort, no mask),
  then the softmax of the kept tokens. They also return the cutoffs, ``(N, 2)`` float64, which the
  backwards take (``cutoff=``) to give dropped tokens a zero gradient.
* ``group_advantages``: segmented mean / std and the advantages.

Every op reads the temperature (and the sampling rule's ``top_k`` / ``top_p`` / ``log_min_p``) from
``params``, the float64 hyperparameter vector of :class:`grpo_fused.semantics.Slot` (``csrc/params.h``),
so a new temperature or ``top_p`` is data, not a new traced graph; only the tie rule
(``Option.TOP_K_ALL_TIES``) is an op argument. The O(B*T) GRPO token math (ratio, clipping, KL,
reduction, metrics) is the semantics layer's :func:`grpo_fused.semantics.grpo_output` applied to the
``(B, T)`` log-probs the C++ op returns; autograd composes it with the op's registered backward. So
every option of the spec behaves exactly as the reference's.

The ops are registered with ``torch.library`` (fake kernels and autograd formulas below), so
``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .. import _cpp_build
from .._dispatch import LINEAR_STRATEGIES
from ..kernels.splits import chunk_rows
from ..semantics import (ADVANTAGE_SCALES, AdvantageRequest, GroupStats, GRPOOutput, LossBatch, LossParams, Option,
                         compute_dtype, grpo_output, sampling_options, vocab_values)
from ..reference import combine_rewards, group_index_from

Tensor = torch.Tensor

__all__ = [
    "availability",
    "grpo_loss",
    "linear_grpo_loss",
    "selective_log_softmax",
    "linear_log_softmax",
    "group_advantages",
]

_registered = False


def availability(device) -> Optional[str]:
    """None when the C++ ops can run on ``device`` (building them on first use), else why not."""
    if torch.device(device).type != "cpu":
        return f"the C++ kernels run on CPU tensors, not {torch.device(device).type}"
    reason = _cpp_build.unavailable_reason()
    if reason is None:
        _register_python_parts()
    return reason


def _ops():
    return torch.ops.grpo_fused_cpp


# --------------------------------------------------------------------------------------
# Fake kernels and autograd formulas of the C++ ops.
# --------------------------------------------------------------------------------------


# Columns of a sampling support's cutoff, (N, 2) float64: [tau, tie_end] (csrc/cpu_kernels.h).
_CUTOFF_FIELDS = 2


@dataclasses.dataclass(frozen=True)
class _LogSoftmaxState:
    """Non-tensor state the backward needs (the tensors go through ``save_for_backward``)."""

    compute_entropy: bool
    chunk_rows: int = 0
    num_inputs: int = 4  # of the forward op: the backward returns one gradient (or None) per input


def _rows_of(features: Tensor) -> int:
    n = 1
    for s in features.shape[:-1]:
        n *= s
    return n


def _logits_fwd_fake(logits, ids, params, compute_entropy):
    rows = _rows_of(logits)
    acc = compute_dtype(logits.dtype)
    entropy_rows = rows if compute_entropy else 0
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc), logits.new_empty(entropy_rows, dtype=acc)


def _cutoff_fake(features):
    return features.new_empty(_rows_of(features), _CUTOFF_FIELDS, dtype=torch.float64)


def _logits_fwd_support_fake(logits, ids, params, compute_entropy, top_k_all_ties):
    return (*_logits_fwd_fake(logits, ids, params, compute_entropy), _cutoff_fake(logits))


def _logits_bwd_fake(grad_logps, grad_entropy, logits, ids, lse, entropy, params, cutoff=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logits_bwd_inplace_fake(grad_logps, grad_entropy, logits, ids, lse, entropy, params, cutoff=None):
    return None


def _linear_fwd_fake(hidden, weight, bias, ids, params, compute_entropy, chunk_rows):
    return _logits_fwd_fake(hidden, ids, params, compute_entropy)


def _linear_fwd_support_fake(hidden, weight, bias, ids, params, compute_entropy, chunk_rows, top_k_all_ties):
    return (*_logits_fwd_fake(hidden, ids, params, compute_entropy), _cutoff_fake(hidden))


def _linear_bwd_fake(grad_logps, grad_entropy, hidden, weight, bias, ids, lse, entropy, params, chunk_rows,
                     compute_dweight, compute_dbias, cutoff=None):
    dweight = torch.empty_like(weight) if compute_dweight else weight.new_empty(0, 0)
    dbias = (torch.empty_like(bias) if (compute_dbias and bias is not None)
             else hidden.new_empty(0, dtype=compute_dtype(hidden.dtype)))
    return torch.empty_like(hidden), dweight, dbias


def _group_advantages_fake(rewards, group_index, num_groups, keep_mask, scale_mode, unbiased, eps):
    g = num_groups
    return (
        torch.empty_like(rewards),
        rewards.new_empty(g),
        rewards.new_empty(g),
        rewards.new_empty(g, dtype=torch.int64),
        rewards.new_empty(g, dtype=torch.bool),
    )


def _entropy_grad(grad_entropy: Optional[Tensor], state: _LogSoftmaxState, like: Tensor) -> Tensor:
    # An empty tensor tells the kernel there is no entropy term (cheaper backward).
    if grad_entropy is None or not state.compute_entropy:
        return like.new_empty(0)
    return grad_entropy.contiguous()


# One autograd formula serves the plain forward op and its sampling-support twin: the twin has one more
# input (top_k_all_ties) and one more output (the cutoff), which the backward op takes.


def _cutoff_of(output):
    return output[3] if len(output) > 3 else None


def _logits_setup_context(ctx, inputs, output):
    logits, ids, params, compute_entropy = inputs[:4]
    _, lse, entropy = output[:3]
    ctx.save_for_backward(logits, ids, params, lse, entropy, _cutoff_of(output))
    ctx.state = _LogSoftmaxState(compute_entropy, num_inputs=len(inputs))


def _logits_backward(ctx, grad_logps, grad_lse, grad_entropy, *grad_cutoff):
    logits, ids, params, lse, entropy, cutoff = ctx.saved_tensors
    if grad_logps is None:
        grad_logps = torch.zeros_like(lse)
    dlogits = _ops().logits_bwd(
        grad_logps.contiguous(), _entropy_grad(grad_entropy, ctx.state, lse), logits, ids, lse, entropy, params,
        cutoff,
    )
    return (dlogits,) + (None,) * (ctx.state.num_inputs - 1)


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, ids, params, compute_entropy, chunk_rows = inputs[:7]
    _, lse, entropy = output[:3]
    ctx.save_for_backward(hidden, weight, bias, ids, params, lse, entropy, _cutoff_of(output))
    ctx.state = _LogSoftmaxState(compute_entropy, chunk_rows=chunk_rows, num_inputs=len(inputs))


def _linear_backward(ctx, grad_logps, grad_lse, grad_entropy, *grad_cutoff):
    hidden, weight, bias, ids, params, lse, entropy, cutoff = ctx.saved_tensors
    state = ctx.state
    if grad_logps is None:
        grad_logps = torch.zeros_like(lse)
    need_dweight = ctx.needs_input_grad[1]
    need_dbias = bias is not None and ctx.needs_input_grad[2]
    dhidden, dweight, dbias = _ops().linear_bwd(
        grad_logps.contiguous(), _entropy_grad(grad_entropy, state, lse), hidden, weight, bias, ids, lse, entropy,
        params, state.chunk_rows, need_dweight, need_dbias, cutoff,
    )
    # A frozen lm_head (weight.requires_grad False) skips the dweight GEMM, a third of the backward.
    grads = (dhidden, dweight if need_dweight else None, dbias if need_dbias else None)
    return grads + (None,) * (state.num_inputs - len(grads))


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    lib = "grpo_fused_cpp::"
    torch.library.register_fake(lib + "logits_fwd", _logits_fwd_fake)
    torch.library.register_fake(lib + "logits_fwd_support", _logits_fwd_support_fake)
    torch.library.register_fake(lib + "logits_bwd", _logits_bwd_fake)
    torch.library.register_fake(lib + "logits_bwd_inplace", _logits_bwd_inplace_fake)
    torch.library.register_fake(lib + "linear_fwd", _linear_fwd_fake)
    torch.library.register_fake(lib + "linear_fwd_support", _linear_fwd_support_fake)
    torch.library.register_fake(lib + "linear_bwd", _linear_bwd_fake)
    torch.library.register_fake(lib + "group_advantages", _group_advantages_fake)
    for op in ("logits_fwd", "logits_fwd_support"):
        torch.library.register_autograd(lib + op, _logits_backward, setup_context=_logits_setup_context)
    for op in ("linear_fwd", "linear_fwd_support"):
        torch.library.register_autograd(lib + op, _linear_backward, setup_context=_linear_setup_context)
    _registered = True


class _InplaceLogSoftmax(torch.autograd.Function):
    """The logits op with a backward that overwrites the logits with their gradient.

    A plain autograd Function (not a registered formula) because the in-place variant hands
    the caller's own buffer back as the gradient, which a functional op schema cannot express.
    """

    @staticmethod
    def forward(ctx, logits, ids, params, compute_entropy, options):
        logps, lse, entropy, cutoff = _logits_fwd(logits, ids, params, compute_entropy, options)
        ctx.save_for_backward(logits, ids, params, lse, entropy, cutoff)
        ctx.state = _LogSoftmaxState(compute_entropy)
        ctx.mark_non_differentiable(lse)
        return logps, lse, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_lse, grad_entropy):
        logits, ids, params, lse, entropy, cutoff = ctx.saved_tensors
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        _ops().logits_bwd_inplace(
            grad_logps.contiguous(), _entropy_grad(grad_entropy, ctx.state, lse), logits, ids, lse, entropy, params,
            cutoff,
        )
        return logits, None, None, None, None


# --------------------------------------------------------------------------------------
# Entry points (the signatures of grpo_fused.backends.reference).
# --------------------------------------------------------------------------------------


def _as_rows(features: Tensor) -> Tensor:
    """A 2-D ``(N, D)`` or 3-D ``(B, T, D)`` view the kernels accept; copies only if D is strided."""
    if features.dim() == 1:
        features = features.unsqueeze(0)
    elif features.dim() > 3:
        features = features.reshape(-1, features.shape[-1])
    if features.stride(-1) != 1 and features.shape[-1] != 1:
        features = features.contiguous()
    return features


def _logits_fwd(rows, ids, params, compute_entropy, options: Option):
    """``(logps, lse, entropy, cutoff)``: the plain op (cutoff None), or its sampling-support twin
    when ``options`` has :attr:`Option.SAMPLING_SUPPORT`."""
    if options & Option.SAMPLING_SUPPORT:
        return _ops().logits_fwd_support(rows, ids, params, compute_entropy, bool(options & Option.TOP_K_ALL_TIES))
    return (*_ops().logits_fwd(rows, ids, params, compute_entropy), None)


def _log_softmax(logits: Tensor, ids: Tensor, params: Tensor, compute_entropy: bool, inplace: bool, options: Option):
    """``options``: the :class:`Option` flags; only the sampling-support ones are read here."""
    out_shape = ids.shape
    rows = _as_rows(logits)
    flat_ids = ids.reshape(-1).to(torch.int64).contiguous()
    if inplace and rows.requires_grad:
        logps, _, entropy = _InplaceLogSoftmax.apply(rows, flat_ids, params, compute_entropy, options)
    else:
        logps, _, entropy, _ = _logits_fwd(rows, flat_ids, params, compute_entropy, options)
    return logps.view(out_shape), (entropy.view(out_shape) if compute_entropy else None)


def selective_log_softmax(logits: Tensor, ids: Tensor, temperature: float, compute_entropy: bool, sampling=None):
    return _log_softmax(logits, ids, vocab_values(temperature, sampling), compute_entropy, inplace=False,
                        options=sampling_options(sampling))


def _check_strategy(strategy: str) -> None:
    if strategy not in ("auto", "chunked"):
        raise ValueError(f"strategy={strategy!r}: the C++ backend implements only the chunked strategy "
                         f"(strategy must be 'auto' or 'chunked' of {LINEAR_STRATEGIES})")


def _linear_vocab_pass(hidden, weight, bias, ids, params, compute_entropy, strategy, chunk_size, filter_eps,
                       options: Option):
    _check_strategy(strategy)
    if filter_eps is not None:
        raise ValueError("filter_eps applies to the tiled strategy, which the C++ backend does not have")
    out_shape = ids.shape
    flat_hidden = hidden.reshape(ids.numel(), hidden.shape[-1])  # explicit N: H may be 0
    flat_ids = ids.reshape(-1).to(torch.int64).contiguous()
    # One chunk policy for every path: the C++ chunk holds fp32 (fp64) logits and nothing else.
    rows = chunk_size or chunk_rows(flat_hidden.shape[0], weight.shape[0],
                                    torch.empty((), dtype=compute_dtype(hidden.dtype)).element_size())
    if options & Option.SAMPLING_SUPPORT:
        logps, _, entropy, _ = _ops().linear_fwd_support(flat_hidden, weight, bias, flat_ids, params, compute_entropy,
                                                         rows, bool(options & Option.TOP_K_ALL_TIES))
    else:
        logps, _, entropy = _ops().linear_fwd(flat_hidden, weight, bias, flat_ids, params, compute_entropy, rows)
    return logps.view(out_shape), (entropy.view(out_shape) if compute_entropy else None)


def linear_log_softmax(hidden, weight, bias, ids, temperature, compute_entropy, strategy="auto", chunk_size=None,
                       filter_eps=None, sampling=None):
    """Never holds more than one chunk of logits (``chunk_size`` tokens; None: the chunk policy)."""
    return _linear_vocab_pass(hidden, weight, bias, ids, vocab_values(temperature, sampling), compute_entropy,
                              strategy, chunk_size, filter_eps, sampling_options(sampling))


def grpo_loss(logits: Tensor, batch: LossBatch, params: LossParams, inplace_backward: bool = False) -> GRPOOutput:
    """``inplace_backward=True`` writes the logits' gradient into ``logits`` itself (no extra
    memory); ``logits`` must not be read after backward."""
    logps, entropy = _log_softmax(logits, batch.completion_ids, params.values, params.spec.compute_entropy,
                                  inplace=inplace_backward, options=params.spec.options)
    return _tail(logps, entropy, batch, params, logits.dtype)


def linear_grpo_loss(hidden, weight, bias, batch: LossBatch, params: LossParams, strategy="auto", chunk_size=None,
                     filter_eps=None) -> GRPOOutput:
    logps, entropy = _linear_vocab_pass(hidden, weight, bias, batch.completion_ids, params.values,
                                        params.spec.compute_entropy, strategy, chunk_size, filter_eps,
                                        params.spec.options)
    return _tail(logps, entropy, batch, params, hidden.dtype)


def _tail(logps, entropy, batch, params, input_dtype) -> GRPOOutput:
    dtype = compute_dtype(input_dtype)
    return grpo_output(logps.to(dtype), None if entropy is None else entropy.to(dtype), batch, params)


def group_advantages(rewards: Tensor, request: AdvantageRequest) -> Tuple[Tensor, GroupStats]:
    """See :func:`grpo_fused.reference.group_advantages`; statistics accumulate in float64."""
    q = request
    r = combine_rewards(rewards, q.reward_weights).contiguous()
    index, num_groups = group_index_from(r.shape[0], q.group_size, q.group_ids, q.group_offsets, r.device)
    keep = r.new_empty(0, dtype=torch.bool) if q.keep_mask is None else q.keep_mask.to(torch.bool).contiguous()
    adv, mean, std, count, zero_std = _ops().group_advantages(
        r, index.to(torch.int64).contiguous(), int(num_groups), keep, int(ADVANTAGE_SCALES[q.scale]), q.unbiased,
        q.eps,
    )
    stats = GroupStats(
        group_index=index,
        mean=mean,
        std=std,
        count=count,
        zero_std=zero_std,
        frac_zero_std=zero_std.to(r.dtype).mean(),
        rewards=r,
    )
    return adv, stats
