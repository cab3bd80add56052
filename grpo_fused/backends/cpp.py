"""The C++ extension backend (``grpo_fused._C``, ops ``torch.ops.grpo_fused_cpp.*``): CPU tensors.

What runs in C++ (``csrc/``):

* ``logits_fwd`` / ``logits_bwd`` (+ ``logits_bwd_inplace``): the vocabulary pass. One read of
  each logits row in the forward (online logsumexp, entropy in the same pass), one read and one
  write in the backward (softmax recomputed from the saved ``lse``), fp32 accumulation (fp64 for
  fp64 logits), ``at::parallel_for`` over rows. Nothing of size V is allocated but the gradient.
* ``linear_fwd`` / ``linear_bwd``: the same from hidden states, ``chunk_rows`` tokens at a time
  (GEMM, then the row kernel on the chunk in place); one chunk of fp32 logits at a time.
* ``group_advantages``: segmented mean / std and the advantages.

The O(B*T) GRPO token math (ratio, clipping, KL, reduction, metrics) is
:func:`grpo_fused.reference.grpo_loss_from_logps` applied to the ``(B, T)`` log-probs the C++
op returns; autograd composes it with the op's registered backward. So every option of the spec
behaves exactly as the reference's.

The ops are registered with ``torch.library`` (fake kernels and autograd formulas below), so
``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .. import _cpp_build
from .. import reference as _ref
from ..config import GRPOConfig
from ..reference import GRPOOutput, GroupStats

Tensor = torch.Tensor

__all__ = [
    "availability",
    "grpo_loss",
    "linear_grpo_loss",
    "selective_log_softmax",
    "linear_log_softmax",
    "group_advantages",
]

# Tokens per GEMM chunk of the linear ops: enough rows to keep the GEMM efficient, few enough
# that the fp32 chunk of logits (rows x V x 4 bytes) stays near this many bytes.
LINEAR_CHUNK_BYTES = 256 * 2**20
LINEAR_STRATEGIES = ("auto", "chunked")
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Fake kernels and autograd formulas of the C++ ops.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LogSoftmaxState:
    """Non-tensor state the backward needs (the tensors go through ``save_for_backward``)."""

    inv_temperature: float
    compute_entropy: bool
    inplace: bool = False
    chunk_rows: int = 0


def _rows_of(features: Tensor) -> int:
    n = 1
    for s in features.shape[:-1]:
        n *= s
    return n


def _logits_fwd_fake(logits, ids, inv_temperature, compute_entropy):
    rows = _rows_of(logits)
    acc = _acc_dtype(logits.dtype)
    entropy_rows = rows if compute_entropy else 0
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc), logits.new_empty(entropy_rows, dtype=acc)


def _logits_bwd_fake(grad_logps, grad_entropy, logits, ids, lse, entropy, inv_temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logits_bwd_inplace_fake(grad_logps, grad_entropy, logits, ids, lse, entropy, inv_temperature):
    return None


def _linear_fwd_fake(hidden, weight, bias, ids, inv_temperature, compute_entropy, chunk_rows):
    return _logits_fwd_fake(hidden, ids, inv_temperature, compute_entropy)


def _linear_bwd_fake(grad_logps, grad_entropy, hidden, weight, bias, ids, lse, entropy, inv_temperature, chunk_rows,
                     compute_dweight, compute_dbias):
    dweight = torch.empty_like(weight) if compute_dweight else weight.new_empty(0, 0)
    dbias = torch.empty_like(bias) if (compute_dbias and bias is not None) else hidden.new_empty(0, dtype=_acc_dtype(hidden.dtype))
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


def _logits_setup_context(ctx, inputs, output):
    logits, ids, inv_temperature, compute_entropy = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, ids, lse, entropy)
    ctx.state = _LogSoftmaxState(inv_temperature, compute_entropy)


def _logits_backward(ctx, grad_logps, grad_lse, grad_entropy):
    logits, ids, lse, entropy = ctx.saved_tensors
    state = ctx.state
    if grad_logps is None:
        grad_logps = torch.zeros_like(lse)
    dlogits = _ops().logits_bwd(
        grad_logps.contiguous(), _entropy_grad(grad_entropy, state, lse), logits, ids, lse, entropy, state.inv_temperature
    )
    return dlogits, None, None, None


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, ids, inv_temperature, compute_entropy, chunk_rows = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, bias, ids, lse, entropy)
    ctx.state = _LogSoftmaxState(inv_temperature, compute_entropy, chunk_rows=chunk_rows)


def _linear_backward(ctx, grad_logps, grad_lse, grad_entropy):
    hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
    state = ctx.state
    if grad_logps is None:
        grad_logps = torch.zeros_like(lse)
    dhidden, dweight, dbias = _ops().linear_bwd(
        grad_logps.contiguous(),
        _entropy_grad(grad_entropy, state, lse),
        hidden,
        weight,
        bias,
        ids,
        lse,
        entropy,
        state.inv_temperature,
        state.chunk_rows,
        ctx.needs_input_grad[1],
        bias is not None and ctx.needs_input_grad[2],
    )
    # A frozen lm_head (weight.requires_grad False) skips the dweight GEMM, a third of the backward.
    return (
        dhidden,
        dweight if ctx.needs_input_grad[1] else None,
        dbias if (bias is not None and ctx.needs_input_grad[2]) else None,
        None, None, None, None,
    )


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    lib = "grpo_fused_cpp::"
    torch.library.register_fake(lib + "logits_fwd", _logits_fwd_fake)
    torch.library.register_fake(lib + "logits_bwd", _logits_bwd_fake)
    torch.library.register_fake(lib + "logits_bwd_inplace", _logits_bwd_inplace_fake)
    torch.library.register_fake(lib + "linear_fwd", _linear_fwd_fake)
    torch.library.register_fake(lib + "linear_bwd", _linear_bwd_fake)
    torch.library.register_fake(lib + "group_advantages", _group_advantages_fake)
    torch.library.register_autograd(lib + "logits_fwd", _logits_backward, setup_context=_logits_setup_context)
    torch.library.register_autograd(lib + "linear_fwd", _linear_backward, setup_context=_linear_setup_context)
    _registered = True


class _InplaceLogSoftmax(torch.autograd.Function):
    """The logits op with a backward that overwrites the logits with their gradient.

    A plain autograd Function (not a registered formula) because the in-place variant hands
    the caller's own buffer back as the gradient, which a functional op schema cannot express.
    """

    @staticmethod
    def forward(ctx, logits, ids, inv_temperature, compute_entropy):
        logps, lse, entropy = _ops().logits_fwd(logits, ids, inv_temperature, compute_entropy)
        ctx.save_for_backward(logits, ids, lse, entropy)
        ctx.state = _LogSoftmaxState(inv_temperature, compute_entropy, inplace=True)
        ctx.mark_non_differentiable(lse)
        return logps, lse, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_lse, grad_entropy):
        logits, ids, lse, entropy = ctx.saved_tensors
        state = ctx.state
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        _ops().logits_bwd_inplace(
            grad_logps.contiguous(), _entropy_grad(grad_entropy, state, lse), logits, ids, lse, entropy,
            state.inv_temperature,
        )
        return logits, None, None, None


# --------------------------------------------------------------------------------------
# Entry points (signatures of the reference functions of the same names).
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


def _log_softmax(logits: Tensor, ids: Tensor, temperature: float, compute_entropy: bool, inplace: bool):
    out_shape = ids.shape
    rows = _as_rows(logits)
    flat_ids = ids.reshape(-1).to(torch.int64).contiguous()
    inv_temperature = 1.0 / float(temperature)
    if inplace and rows.requires_grad:
        logps, _, entropy = _InplaceLogSoftmax.apply(rows, flat_ids, inv_temperature, compute_entropy)
    else:
        logps, _, entropy = _ops().logits_fwd(rows, flat_ids, inv_temperature, compute_entropy)
    return logps.view(out_shape), (entropy.view(out_shape) if compute_entropy else None)


def selective_log_softmax(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, compute_entropy: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    """See :func:`grpo_fused.reference.selective_log_softmax`; logits ``(..., V)`` on CPU."""
    return _log_softmax(logits, ids, temperature, compute_entropy, inplace=False)


def _chunk_rows(rows: int, vocab: int) -> int:
    return max(1, min(rows, LINEAR_CHUNK_BYTES // (4 * max(vocab, 1))))


def _check_strategy(strategy: str) -> None:
    if strategy not in LINEAR_STRATEGIES:
        raise ValueError(
            f"strategy={strategy!r}: the C++ backend implements only the chunked strategy "
            f"(strategy must be one of {LINEAR_STRATEGIES})"
        )


def linear_log_softmax(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    compute_entropy: bool = False,
    strategy: str = "auto",
    *,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """See :func:`grpo_fused.reference.linear_log_softmax`; never holds more than one chunk of logits.

    ``strategy``: ``"auto"`` or ``"chunked"`` (the same here); ``"tiled"`` is a Triton-only strategy.
    ``chunk_size``: tokens per GEMM chunk; None sizes it to ``LINEAR_CHUNK_BYTES`` of fp32 logits.
    """
    _check_strategy(strategy)
    out_shape = ids.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = ids.reshape(-1).to(torch.int64).contiguous()
    logps, _, entropy = _ops().linear_fwd(
        flat_hidden,
        weight,
        bias,
        flat_ids,
        1.0 / float(temperature),
        compute_entropy,
        chunk_size or _chunk_rows(flat_hidden.shape[0], weight.shape[0]),
    )
    return logps.view(out_shape), (entropy.view(out_shape) if compute_entropy else None)


def _loss_from_logps(logps, entropy, completion_ids, advantages, completion_mask, old_logps, ref_logps,
                     config, is_weights, num_items_in_batch, global_batch_size, dtype) -> GRPOOutput:
    return _ref.grpo_output_from_logps(
        logps.to(dtype), None if entropy is None else entropy.to(dtype), completion_ids, advantages,
        completion_mask, old_logps, ref_logps, config, is_weights, num_items_in_batch, global_batch_size,
    )


def grpo_loss(
    logits: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    config: GRPOConfig = GRPOConfig(),
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
    inplace_backward: bool = False,
) -> GRPOOutput:
    """See :func:`grpo_fused.reference.grpo_loss`; logits ``(B, T, V)`` fp32 / bf16 / fp16 / fp64 on CPU.

    ``inplace_backward=True`` writes the logits' gradient into ``logits`` itself (no extra
    memory); ``logits`` must not be read after backward. Default False.
    """
    logps, entropy = _log_softmax(
        logits, completion_ids, config.temperature, config.compute_entropy, inplace=inplace_backward
    )
    return _loss_from_logps(
        logps, entropy, completion_ids, advantages, completion_mask, old_logps, ref_logps, config,
        is_weights, num_items_in_batch, global_batch_size, _ref.compute_dtype(logits.dtype),
    )


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    config: GRPOConfig = GRPOConfig(),
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
    strategy: str = "auto",
    *,
    chunk_size: Optional[int] = None,
) -> GRPOOutput:
    """See :func:`grpo_fused.reference.linear_grpo_loss`; hidden ``(B, T, H)``, weight ``(V, H)`` on CPU.

    The logits are computed ``chunk`` tokens at a time in fp32 (``LINEAR_CHUNK_BYTES`` of logits
    per chunk) and never exist whole. ``strategy``: ``"auto"`` or ``"chunked"``.
    """
    logps, entropy = linear_log_softmax(
        hidden, weight, completion_ids, config.temperature, bias, config.compute_entropy, strategy,
        chunk_size=chunk_size,
    )
    return _loss_from_logps(
        logps, entropy, completion_ids, advantages, completion_mask, old_logps, ref_logps, config,
        is_weights, num_items_in_batch, global_batch_size, _ref.compute_dtype(hidden.dtype),
    )


_SCALE_MODES = {"group": 0, "batch": 1, "none": 2}


def group_advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    group_offsets: Optional[Tensor] = None,
    reward_weights: Optional[Tensor] = None,
    keep_mask: Optional[Tensor] = None,
    scale: str = "group",
    unbiased: bool = True,
    eps: float = 1e-4,
) -> Tuple[Tensor, GroupStats]:
    """See :func:`grpo_fused.reference.group_advantages`; statistics accumulate in float64."""
    if scale not in _SCALE_MODES:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = _ref.combine_rewards(rewards, reward_weights).contiguous()
    index, num_groups = _ref.group_index_from(r.shape[0], group_size, group_ids, group_offsets, r.device)
    keep = r.new_empty(0, dtype=torch.bool) if keep_mask is None else keep_mask.to(torch.bool).contiguous()
    adv, mean, std, count, zero_std = _ops().group_advantages(
        r, index.to(torch.int64).contiguous(), int(num_groups), keep, _SCALE_MODES[scale], bool(unbiased), float(eps)
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
