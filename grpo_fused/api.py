"""The functional API: validate, pick a backend, call it.

Every function checks its inputs first (clear errors naming the argument, nothing modified),
then runs the op on the chosen backend (see :mod:`grpo_fused._dispatch`). A loss call hands the
backend its ``(B, T)`` inputs as one :class:`~grpo_fused.semantics.LossBatch` and its
hyperparameters as ``config.params`` (:class:`~grpo_fused.semantics.LossParams`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from . import _dispatch
from . import _validation as v
from ._dispatch import LINEAR_STRATEGIES
from .explicit_support import linear_log_softmax_on_support, log_softmax_on_support
from .semantics import (ADVANTAGE_SCALES, AdvantageRequest, ExplicitSupport, GRPOConfig, GroupStats, GRPOOutput,
                        LossBatch, SamplingRule, grpo_output, masked_rows)

Tensor = torch.Tensor


def grpo_loss(
    logits: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    *,
    config: Optional[GRPOConfig] = None,
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
    support: Optional[ExplicitSupport] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> GRPOOutput:
    """GRPO-family loss from logits.

    Args:
        logits: ``(B, T, V)`` fp32 / bf16 / fp16 / fp64, the completion positions' logits
            (position t predicts ``completion_ids[:, t]``).
        completion_ids: ``(B, T)`` integer sampled tokens, in ``[0, V)``.
        advantages: ``(B,)``, ``(B, 1)`` or ``(B, T)``.
        completion_mask: ``(B, T)`` bool / int / float loss mask; None means all ones.
        old_logps: ``(B, T)`` log-probs of the sampling policy; None means on-policy
            (``logps.detach()``, ratio 1).
        ref_logps: ``(B, T)`` log-probs of the reference policy; required when ``beta != 0``.
        config: :class:`GRPOConfig`; None means ``GRPOConfig()`` (TRL 1.16 defaults).
        is_weights: rollout importance-sampling weight ``(B,)``, ``(B, 1)`` or ``(B, T)``
            (TRL's vLLM correction), multiplying the policy term.
        num_items_in_batch: global token count normalizer of ``dapo``/``cispo``/``gpg`` and of
            verl's ``token-mean``; default the mask's sum.
        global_batch_size: verl's sequence-count normalizer for ``seq-mean-*`` modes.
        support: the kept ids of each position (:class:`ExplicitSupport`, CSR over the ``B * T``
            positions) for a sampler whose truncation ``config.top_k`` / ``top_p`` / ``min_p``
            cannot state; the softmax runs over them only (see ``config.top_k``).
        inplace_backward: write the logits' gradient into the logits buffer (zero extra memory);
            the caller must not read those logits after backward. Fused backends only.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns:
        :class:`GRPOOutput` with ``loss`` (scalar), ``logps`` ``(B, T)``, ``entropy``
        ``(B, T)`` or None, and ``metrics`` (0-dim tensors, TRL names).
    """
    config = v.check_config(config)
    batch = LossBatch(completion_ids, advantages, completion_mask, old_logps, ref_logps, is_weights,
                      num_items_in_batch, global_batch_size, support)
    v.check_loss_inputs("logits", logits, batch, config)
    v.check_ids_in_range("completion_ids", completion_ids, logits.shape[-1], completion_mask)
    _check_support(support, config.sampling, completion_ids, logits.shape[-1], logits.device)
    if inplace_backward:
        v.check_inplace_target("logits", logits)
    if support is not None:
        if inplace_backward:
            raise ValueError("inplace_backward=True does not apply with support= (the gradient reaches the kept "
                             "logits only, through a gather)")
        batch = _readable_ids(batch)
        logps, entropy = log_softmax_on_support(logits, batch.completion_ids, support, config.temperature,
                                                config.compute_entropy, completion_mask)
        return grpo_output(logps, entropy, batch, config.params)
    impl = _dispatch.resolve("grpo_loss", backend, logits.device)
    return impl(logits, _readable_ids(batch), config.params, inplace_backward=inplace_backward)


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    config: Optional[GRPOConfig] = None,
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
    support: Optional[ExplicitSupport] = None,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
    backend: str = "auto",
) -> GRPOOutput:
    """GRPO-family loss straight from hidden states: ``logits = hidden @ weight.T + bias``.

    Args:
        hidden: ``(B, T, H)`` last hidden states of the completion positions.
        weight: ``(V, H)`` lm_head weight. bias: ``(V,)`` or None.
        strategy: ``"chunked"`` (GEMM per token chunk), ``"tiled"`` (logit tiles on chip) or
            ``"auto"`` (the backend's choice); only the fused backends use it (the reference
            materializes the logits).
        chunk_size: chunked strategy: tokens per chunk; None picks it from the shapes.
        filter_eps: tiled strategy: skip backward tiles whose probabilities are all below it
            and hold no target (an approximation; None, the default, is exact).

    The other arguments and the return value are those of :func:`grpo_loss`.
    """
    config = v.check_config(config)
    batch = LossBatch(completion_ids, advantages, completion_mask, old_logps, ref_logps, is_weights,
                      num_items_in_batch, global_batch_size, support)
    v.check_tensor("hidden", hidden, ndim=(3,), kind="float")
    v.check_linear_weights(hidden, weight, bias)
    v.check_loss_inputs("hidden", hidden, batch, config)
    v.check_ids_in_range("completion_ids", completion_ids, weight.shape[0], completion_mask)
    _check_support(support, config.sampling, completion_ids, weight.shape[0], hidden.device)
    _check_strategy_options(strategy, chunk_size, filter_eps)
    # Zeroed hidden rows at masked positions (one O(N H) select): a NaN there must not reach dweight.
    hidden = masked_rows(hidden, completion_mask)
    if support is not None:
        batch = _readable_ids(batch)
        logps, entropy = linear_log_softmax_on_support(hidden, weight, bias, batch.completion_ids, support,
                                                       config.temperature, config.compute_entropy, completion_mask)
        return grpo_output(logps, entropy, batch, config.params)
    impl = _dispatch.resolve("linear_grpo_loss", backend, hidden.device)
    return impl(hidden, weight, bias, _readable_ids(batch), config.params,
                strategy=strategy, chunk_size=chunk_size, filter_eps=filter_eps)


def selective_log_softmax(
    logits: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    *,
    compute_entropy: bool = False,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    top_k_ties: str = "exact",
    support: Optional[ExplicitSupport] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-token ``log softmax(logits / temperature)[id]`` (and entropy), differentiable.

    Args:
        logits: ``(..., V)`` float. ids: ``(...)`` integer, in ``[0, V)``.
        temperature: > 0. compute_entropy: also return the per-token entropy.
        top_k, top_p, min_p, top_k_ties: score under the sampler's truncated distribution (vLLM's
            V1 sampler, :class:`~grpo_fused.semantics.SamplingRule`): log-prob and entropy of the
            renormalized kept tokens, ``-inf`` for an id outside them, gradient into kept logits
            only. None (default) is off.
        support: the kept ids of each position instead (:class:`ExplicitSupport`, CSR over the
            positions of ``ids`` in row-major order).

    Returns:
        ``(logps, entropy)``: fp32 ``(...)`` (fp64 for fp64 logits); entropy is None unless asked.
    """
    v.check_vocab_inputs("logits", logits, ids, temperature)
    v.check_ids_in_range("ids", ids, logits.shape[-1])
    sampling = SamplingRule(top_k, top_p, min_p, top_k_ties)
    _check_support(support, sampling, ids, logits.shape[-1], logits.device)
    if support is not None:
        return log_softmax_on_support(logits, _as_index(ids), support, temperature, compute_entropy)
    impl = _dispatch.resolve("selective_log_softmax", backend, logits.device)
    return impl(logits, _as_index(ids), temperature, compute_entropy, sampling=_active(sampling))


def linear_log_softmax(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    *,
    bias: Optional[Tensor] = None,
    compute_entropy: bool = False,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    top_k_ties: str = "exact",
    support: Optional[ExplicitSupport] = None,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`selective_log_softmax` of ``hidden @ weight.T + bias`` without materializing logits.

    Args:
        hidden: ``(..., H)``. weight: ``(V, H)``. ids: ``(...)``. bias: ``(V,)`` or None.
        top_k, top_p, min_p, top_k_ties, support: as :func:`selective_log_softmax`.
        strategy, chunk_size, filter_eps: as :func:`linear_grpo_loss`.
    """
    v.check_linear_inputs(hidden, weight, ids, temperature, bias)
    v.check_ids_in_range("ids", ids, weight.shape[0])
    sampling = SamplingRule(top_k, top_p, min_p, top_k_ties)
    _check_support(support, sampling, ids, weight.shape[0], hidden.device)
    _check_strategy_options(strategy, chunk_size, filter_eps)
    if support is not None:
        return linear_log_softmax_on_support(hidden, weight, bias, _as_index(ids), support, temperature,
                                             compute_entropy)
    impl = _dispatch.resolve("linear_log_softmax", backend, hidden.device)
    return impl(hidden, weight, bias, _as_index(ids), temperature, compute_entropy, strategy=strategy,
                chunk_size=chunk_size, filter_eps=filter_eps, sampling=_active(sampling))


def group_advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    *,
    group_offsets: Optional[Tensor] = None,
    reward_weights: Optional[Tensor] = None,
    keep_mask: Optional[Tensor] = None,
    scale: str = "group",
    unbiased: bool = True,
    eps: float = 1e-4,
    backend: str = "auto",
) -> Tuple[Tensor, GroupStats]:
    """Group-relative advantages ``(r - mean_g) / (std + eps)`` in one pass.

    Args:
        rewards: ``(B,)`` or ``(B, K)`` float; NaN marks an unscored reward.
        group_size: contiguous groups of this size (B must be a multiple of it), or
        group_ids: ``(B,)`` integer labels, any order, any group sizes, or
        group_offsets: ``(G+1,)`` integer boundaries ``0 = o_0 <= ... <= o_G = B`` of contiguous groups.
        reward_weights: ``(K,)`` per reward function (needs 2-D rewards); default ones.
        keep_mask: ``(B,)`` bool; False leaves a reward out of the statistics (advantage 0).
        scale: ``"group"``, ``"batch"`` or ``"none"``. unbiased: Bessel's correction.
        eps: added to the std (TRL's 1e-4).

    Returns:
        ``(advantages (B,), GroupStats)``; see :func:`grpo_fused.reference.group_advantages`.
    """
    v.check_tensor("rewards", rewards, ndim=(1, 2), kind="float")
    B = rewards.shape[0]
    given = [n for n, x in (("group_size", group_size), ("group_ids", group_ids), ("group_offsets", group_offsets)) if x is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of group_size, group_ids, group_offsets (got {given or 'none'})")
    if group_size is not None:
        v.check_positive_int("group_size", group_size, optional=False)
        if B % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the number of rewards {B}")
    if group_ids is not None:
        v.check_tensor("group_ids", group_ids, ndim=(1,), kind="int")
        if group_ids.shape[0] != B:
            raise ValueError(f"group_ids must have shape ({B},), got {tuple(group_ids.shape)}")
    if group_offsets is not None:
        v.check_tensor("group_offsets", group_offsets, ndim=(1,), kind="int")
        if group_offsets.numel() < 2:
            raise ValueError(f"group_offsets must rise from 0 to {B} (the number of rewards), got {group_offsets.tolist()}")
        # Reading the offsets is a host sync on a GPU; a traced graph skips it (like the id check).
        if not torch.compiler.is_compiling():
            offsets = group_offsets.detach().cpu()
            if offsets[0] != 0 or offsets[-1] != B or bool((offsets[1:] < offsets[:-1]).any()):
                raise ValueError(f"group_offsets must rise from 0 to {B} (the number of rewards), got {offsets.tolist()}")
    if reward_weights is not None:
        v.check_tensor("reward_weights", reward_weights, ndim=(1,), kind="float")
        if rewards.dim() != 2 or reward_weights.shape[0] != rewards.shape[1]:
            raise ValueError(
                f"reward_weights must have shape (K,) with rewards (B, K), got {tuple(reward_weights.shape)} "
                f"and rewards {tuple(rewards.shape)}"
            )
    if keep_mask is not None:
        v.check_tensor("keep_mask", keep_mask, ndim=(1,), kind="mask")
        if keep_mask.shape[0] != B:
            raise ValueError(f"keep_mask must have shape ({B},), got {tuple(keep_mask.shape)}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {tuple(ADVANTAGE_SCALES)}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    v.check_same_device(
        "rewards", rewards, group_ids=group_ids, group_offsets=group_offsets,
        reward_weights=reward_weights, keep_mask=keep_mask,
    )
    impl = _dispatch.resolve("group_advantages", backend, rewards.device)
    return impl(rewards, AdvantageRequest(group_size, group_ids, group_offsets, reward_weights, keep_mask, scale,
                                          bool(unbiased), float(eps)))


def _active(sampling: SamplingRule) -> Optional[SamplingRule]:
    """The rule when it can drop a token, else None (the plain vocabulary pass)."""
    return sampling if sampling.active else None


def _check_support(support, sampling: SamplingRule, ids: Tensor, vocab_size: int, device: torch.device) -> None:
    if support is None:
        return
    if sampling.active:
        raise ValueError(f"give either support= or a sampling rule ({sampling.describe()}), not both")
    v.check_explicit_support(support, ids.numel(), vocab_size, device)


def _as_index(ids: Tensor) -> Tensor:
    """int32 / int64 ids as they are; any other integer dtype widened to int64 (every kernel reads those)."""
    return ids if ids.dtype in (torch.int32, torch.int64) else ids.to(torch.int64)


def _readable_ids(batch: LossBatch) -> LossBatch:
    """The batch with ids every backend may read: id 0 at masked positions (where padding such as
    -100 may stand; nothing there reaches the loss) and an int32 / int64 dtype."""
    ids = _as_index(batch.completion_ids)
    if batch.completion_mask is not None:
        ids = torch.where(batch.completion_mask != 0, ids, torch.zeros_like(ids))
    return dataclasses.replace(batch, completion_ids=ids)


def _check_strategy_options(strategy, chunk_size, filter_eps) -> None:
    if strategy not in LINEAR_STRATEGIES:
        raise ValueError(f"strategy must be one of {LINEAR_STRATEGIES}, got {strategy!r}")
    if chunk_size is not None:
        v.check_positive_int("chunk_size", chunk_size)
        if strategy == "tiled":
            raise ValueError("chunk_size applies to strategy='chunked' (or 'auto'), not 'tiled'")
    if filter_eps is not None:
        if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) or not 0 < filter_eps < 1:
            raise ValueError(f"filter_eps must be a number in (0, 1), got {filter_eps!r}")
        if strategy != "tiled":
            raise ValueError("filter_eps (gradient filtering) applies to strategy='tiled' only")
