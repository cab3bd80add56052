"""Past one GPU: data-parallel normalizers and vocab-parallel losses on ``torch.distributed``.

Two independent tools, usable together (a DP group and a TP group in Megatron terms):

**Data parallel** (DDP, FSDP, DeepSpeed ZeRO; TRL through accelerate, verl's FSDP workers).
Each rank holds its own slice of the batch and the gradients are averaged (or summed) over
ranks. :func:`dp_normalizers` returns, with one all-reduce of a few numbers per rank, the
``num_items_in_batch`` / ``global_batch_size`` to pass to any grpo-fused loss and the factor
``scale`` to multiply its loss by, such that the averaged gradient equals the gradient of the
single-process loss on the concatenated batch. :func:`global_token_count` is the bare token
count (TRL's ``num_items_in_batch``).

**Vocab parallel** (Megatron-style column-parallel lm_head). Each rank of ``process_group`` holds
a contiguous slice of the vocabulary: logits ``(..., V_r)`` or lm_head weight ``(V_r, H)``.
Each rank runs the vocab pass on its shard and the ranks exchange a few floats per token (local
max with a MAX all-reduce, then rescaled sum-exp, target logit and entropy partial with one SUM
all-reduce), never logits. Backward writes each rank's own ``dlogits`` (or ``dweight`` /
``dbias`` shard) with no communication; the linear path's ``dhidden`` is a sum over vocab
shards and takes one all-reduce of an ``(N, H)`` tensor, as a column-parallel lm_head does.
:func:`vocab_parallel_grpo_loss` and :func:`vocab_parallel_linear_grpo_loss` then apply the
semantics layer's ``(B, T)`` tail (:func:`grpo_fused.semantics.grpo_output`) to the log-probs:
same options, same semantics, same :class:`~grpo_fused.semantics.GRPOOutput` as
:func:`grpo_fused.grpo_loss`, a sampling rule (``top_k`` / ``top_p`` / ``min_p``) included: the
ranks find each row's cutoff together by exchanging their best tokens of the row
(:func:`_sampling_cutoff`). The data-parallel normalizers are derived from the same
normalizer table (:class:`grpo_fused.semantics.Normalizer`), the shards' statistics are merged
by the helpers the tiled kernel uses (:mod:`grpo_fused.kernels.splits`), and the inputs are
checked by :mod:`grpo_fused._validation`, as the public API's are.

Every function also runs without an initialized process group (``process_group=None``): it is
then the single-process computation, which keeps one code path for 1 and for many GPUs.

The per-shard vocab pass (:func:`shard_vocab_partials` / :func:`shard_vocab_grad`) is plain
PyTorch in fp32 (fp64 for fp64 inputs); it is one small function each way so that a fused
kernel can replace it without touching the communication.
"""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import _validation as v
from .kernels.splits import chunk_rows, finish_partials, rescale_partials
from .semantics import (GRPOConfig, GRPOOutput, LossBatch, Normalizer, SamplingRule, Surrogate, compute_dtype,
                        grpo_output, masked_rows)

Tensor = torch.Tensor

__all__ = [
    "DPNormalizers",
    "dp_normalizers",
    "global_token_count",
    "shard_vocab_partials",
    "shard_vocab_grad",
    "vocab_parallel_selective_log_softmax",
    "vocab_parallel_linear_log_softmax",
    "vocab_parallel_grpo_loss",
    "vocab_parallel_linear_grpo_loss",
]

# Bytes a (chunk, V_r) logit costs in the plain-PyTorch shard pass: the compute-dtype logits and
# its three temporaries of the same shape (exponentials, shifted logits, their product).
_SHARD_TEMPORARIES = 4


# --------------------------------------------------------------------------------------
# Process-group plumbing.
# --------------------------------------------------------------------------------------


def _collective_device(process_group, *candidates) -> torch.device:
    """Where a small exchange tensor must live: with the inputs, or where the backend wants it."""
    for t in candidates:
        if isinstance(t, Tensor):
            return t.device
    if dist.is_available() and dist.is_initialized() and dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world(process_group) -> Tuple[int, int]:
    """``(world_size, rank)`` of ``process_group``; ``(1, 0)`` when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        return 1, 0
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def _all_reduce(t: Tensor, op, process_group, world_size: int) -> Tensor:
    if world_size > 1:
        dist.all_reduce(t, op=op, group=process_group)
    return t


def _gather_rows(row: Tensor, process_group, world_size: int, rank: int) -> Tensor:
    """All-gather of a small float64 vector as one SUM all-reduce: ``(k,) -> (world_size, k)``.

    A SUM of a zero table with one filled row per rank works on every backend (gloo, NCCL)
    and needs no list of output tensors.
    """
    table = torch.zeros(world_size, row.numel(), dtype=torch.float64, device=row.device)
    table[rank] = row.to(torch.float64)
    return _all_reduce(table, dist.ReduceOp.SUM, process_group, world_size)


# --------------------------------------------------------------------------------------
# Data parallel: normalizers that make the DP gradient equal the single-process one.
# --------------------------------------------------------------------------------------

GRADIENT_REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class DPNormalizers:
    """What one data-parallel rank passes to a loss call, and the factor it scales the loss by.

    Use: ``out = loss_fn(..., num_items_in_batch=n.num_items_in_batch,
    global_batch_size=n.global_batch_size); (n.scale * out.loss).backward()``.

    Attributes:
        num_items_in_batch: 0-dim tensor for the loss types that take it (``dapo``, ``cispo``,
            ``gpg``, verl ``token-mean``), else None.
        global_batch_size: 0-dim tensor for verl's ``seq-mean-*`` modes, else None.
        scale: 0-dim tensor; backpropagate ``scale * loss``.
        global_tokens: 0-dim, the masked-in token count over all ranks (and micro-batches).
        global_sequences: 0-dim, the sequence count over all ranks (and micro-batches).
        world_size: the number of ranks in the process group.
    """

    num_items_in_batch: Optional[Tensor]
    global_batch_size: Optional[Tensor]
    scale: Tensor
    global_tokens: Tensor
    global_sequences: Tensor
    world_size: int


def _check_masks(name: str, masks) -> List[Tensor]:
    single = isinstance(masks, Tensor)
    masks = [masks] if single else list(masks) if isinstance(masks, (list, tuple)) else None
    if not masks:
        raise TypeError(f"{name} must be a (B, T) tensor or a non-empty list of them (one per micro-batch)")
    for i, m in enumerate(masks):
        label = name if single else f"{name}[{i}]"
        v.check_tensor(label, m, ndim=(2,), kind="mask")
        v.check_same_device(name if single else f"{name}[0]", masks[0], **{label: m})
    return masks


def global_token_count(
    completion_mask: Union[Tensor, Sequence[Tensor]],
    process_group=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The masked-in token count summed over the ranks of ``process_group``: one all-reduce.

    Args:
        completion_mask: this rank's ``(B, T)`` loss mask (bool / int / float), or a list of
            them, one per gradient-accumulation micro-batch (all are counted).
        process_group: the data-parallel group; None means the default group (or a single
            process when torch.distributed is not initialized).
        dtype: dtype of the returned count (float32 is exact up to 2**24 tokens, then within 6e-8).

    Returns:
        0-dim tensor on the mask's device: TRL's ``num_items_in_batch``.
    """
    masks = _check_masks("completion_mask", completion_mask)
    world_size, _ = _world(process_group)
    count = torch.stack([m.to(torch.float64).sum() for m in masks]).sum()
    return _all_reduce(count, dist.ReduceOp.SUM, process_group, world_size).to(dtype)


def dp_normalizers(
    completion_mask: Union[Tensor, Sequence[Tensor]],
    config: Optional[GRPOConfig] = None,
    process_group=None,
    *,
    gradient_reduction: str = "mean",
    dtype: torch.dtype = torch.float32,
) -> Union[DPNormalizers, List[DPNormalizers]]:
    """Normalizers that make data-parallel training equal the single-process loss; one all-reduce.

    Write ``L`` for the loss of the whole batch (every rank's sequences concatenated, padded
    to the longest T) computed in one process, and ``L_k`` for the loss a rank computes on
    its micro-batch ``k`` with the returned ``num_items_in_batch`` / ``global_batch_size``.
    With ``gradient_reduction="mean"`` (DDP, FSDP and DeepSpeed average gradients over the
    ``R`` ranks), ``sum over ranks and micro-batches of scale_k * L_k`` equals ``R * L``, so
    the averaged gradient of ``scale_k * L_k`` is the gradient of ``L``; with ``"sum"``
    (gradients summed over ranks) it equals ``L``. Call it once per optimizer step with the
    masks of every micro-batch of this rank (gradient accumulation sums micro-batch
    gradients). ``N`` is the global masked-in token count, ``S`` the global sequence count,
    ``N_k``, ``B_k``, ``T_k`` the micro-batch's, ``g`` = R for "mean" and 1 for "sum":

    - ``dapo``, ``cispo``, ``gpg`` (``sum l*m / num_items_in_batch``): ``num_items_in_batch
      = N`` (TRL's global count; TRL divides it by the number of processes, which is the same
      as ``scale = g``), ``scale = g``.
    - ``bnpo`` (local token mean, takes no normalizer): ``scale = g * N_k / N``.
    - ``grpo``, ``sapo``, ``gmpo``, ``luspo`` (means over sequences): ``scale = g * B_k / S``,
      which is 1 under DDP when every rank holds the same number of sequences.
    - ``dr_grpo`` (``sum / (B * L)``, L = ``max_completion_length`` or the mask's T):
      ``scale = g * B_k * L_k / (S * L)``; leave ``max_completion_length`` unset only if
      the single-process T would be the longest T of any rank (it is taken as that).
    - verl ``loss_agg_mode`` (with ``config.dp_size``, verl's convention is ``dp_size = R``):
      ``token-mean``: ``num_items_in_batch = N``, ``scale = g / dp_size``; ``seq-mean-*``:
      ``scale = g / dp_size`` and the ``global_batch_size`` that the reference's
      ``seq_losses.sum() / global_batch_size * dp_size`` needs for the global mean over
      ``S`` sequences (for ``gmpo`` the scale is the sequence one and the normalizers follow).

    Every normalizer is clamped to at least one token (a batch with no masked-in token gives
    loss 0 and zero gradients). The KL term is reduced like the policy term, so it is exact
    too. The entropy bonus (``entropy_coef != 0``) is a masked mean over the local tokens in
    the reference; it is exact for ``bnpo`` and, for the other types, when every micro-batch
    holds ``N / (R * micro-batches)`` tokens. Metrics are local to the rank.

    Args:
        completion_mask: this rank's ``(B, T)`` loss mask, or a list of them, one per
            gradient-accumulation micro-batch.
        config: the :class:`GRPOConfig` of the loss; None means ``GRPOConfig()``.
        process_group: the data-parallel group; None means the default group (or a single
            process when torch.distributed is not initialized).
        gradient_reduction: ``"mean"`` (DDP / FSDP / DeepSpeed, default) or ``"sum"``.
        dtype: dtype of the returned tensors (float32 by default; float64 for fp64 losses).

    Returns:
        A :class:`DPNormalizers`, or a list of them (one per micro-batch) when a list of masks
        was given.
    """
    config = v.check_config(config)
    masks = _check_masks("completion_mask", completion_mask)
    if gradient_reduction not in GRADIENT_REDUCTIONS:
        raise ValueError(f"gradient_reduction must be one of {GRADIENT_REDUCTIONS}, got {gradient_reduction!r}")
    world_size, rank = _world(process_group)
    device = masks[0].device
    f64 = dict(dtype=torch.float64, device=device)

    local_tokens = [m.to(torch.float64).sum() for m in masks]
    local_row = torch.stack(
        [
            torch.stack(local_tokens).sum(),
            torch.tensor(float(sum(m.shape[0] for m in masks)), **f64),
            torch.tensor(float(max(m.shape[1] for m in masks)), **f64),
            # verl's sequence means count only sequences with at least one token.
            sum((m.sum(-1) > 0).to(torch.float64).sum() for m in masks),
        ]
    )
    table = _gather_rows(local_row, process_group, world_size, rank)  # (R, 4)
    tokens, sequences, longest = table[:, 0].sum(), table[:, 1].sum(), table[:, 2].max()
    nonempty_sequences = table[:, 3].sum().clamp(min=1.0)

    g = float(world_size if gradient_reduction == "mean" else 1)
    spec = config.params.spec
    norm = spec.normalizer
    dp = float(spec.dp_size)
    tokens_1 = tokens.clamp(min=1.0)
    fixed_length = spec.max_completion_length
    # gmpo's policy term is a plain mean over the local sequences whatever the mode, which fixes
    # the scale; the mode's normalizers then follow from it.
    sequence_mean_policy = spec.loss_type.surrogate is Surrogate.GEO_MEAN

    out = []
    for mask, mask_tokens in zip(masks, local_tokens):
        batch, length = mask.shape
        n = gbs = None
        if norm is Normalizer.GLOBAL_TOKENS:
            scale, n = torch.tensor(g, **f64), tokens_1
        elif norm is Normalizer.LOCAL_TOKEN_MEAN:
            scale = g * mask_tokens.clamp(min=1.0) / tokens_1
        elif norm in (Normalizer.SEQUENCE_MEAN, Normalizer.SEQUENCE_SUM_MEAN):
            scale = g * batch / sequences
        elif norm is Normalizer.FIXED_LENGTH:
            if fixed_length is None:
                scale = g * batch * length / (sequences * longest)
            else:
                scale = g * batch / sequences
        else:  # verl's loss_agg_mode
            scale = g * batch / sequences if sequence_mean_policy else torch.tensor(g / dp, **f64)
            if norm is Normalizer.VERL_TOKEN_MEAN:
                # reference: sum / max(n, 1) * dp  ->  scale * that = g * sum / N
                n = scale * dp * tokens_1 / g
            else:
                # reference: seq_sum / gbs * dp  ->  scale * that = g * seq_sum / S;
                # the sum-norm mode divides by the local T when max_completion_length is unset.
                gbs = scale * dp * nonempty_sequences / g
                if norm is Normalizer.VERL_SEQ_MEAN_TOKEN_SUM_NORM and fixed_length is None:
                    gbs = gbs * longest / length
        out.append(
            DPNormalizers(
                num_items_in_batch=None if n is None else n.to(dtype),
                global_batch_size=None if gbs is None else gbs.to(dtype),
                scale=scale.to(dtype),
                global_tokens=tokens.to(dtype),
                global_sequences=sequences.to(dtype),
                world_size=world_size,
            )
        )
    return out[0] if isinstance(completion_mask, Tensor) else out


# --------------------------------------------------------------------------------------
# Vocab parallel: the per-shard pass (replaceable by a fused kernel).
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardPartials:
    """Per-token partials of one vocab shard, ``(n,)`` each, in the compute dtype.

    Attributes:
        max: max of the shard's ``z = logits / temperature`` (-inf for an all -inf row).
        sumexp: ``sum exp(z - max)`` (``max`` taken as 0 for an all -inf row, so 0 there).
        target: ``z[id]`` when the id falls in the shard, else 0.
        sum_exp_shifted_z: ``sum exp(z - max) * (z - max)`` (entropy), or None.
    """

    max: Tensor
    sumexp: Tensor
    target: Tensor
    sum_exp_shifted_z: Optional[Tensor]


def _shard_z(logits_shard: Tensor, temperature: float) -> Tensor:
    return logits_shard.to(compute_dtype(logits_shard.dtype)) / temperature


def _local_target(local_ids: Tensor, vocab_shard: int) -> Tuple[Tensor, Tensor]:
    """``(clamped column, in_shard)``: a gather index that is always valid, and whether it is real."""
    in_shard = (local_ids >= 0) & (local_ids < vocab_shard)
    return local_ids.clamp(0, vocab_shard - 1), in_shard


def shard_vocab_partials(
    logits_shard: Tensor, local_ids: Tensor, temperature: float, compute_entropy: bool, kept: Optional[Tensor] = None
) -> ShardPartials:
    """The vocab pass over one shard.

    Args:
        logits_shard: ``(n, V_r)`` float, this rank's vocab columns.
        local_ids: ``(n,)`` int64, ``id - vocab_start`` (outside ``[0, V_r)`` when the id is
            in another rank's shard).
        temperature: > 0, divides the logits.
        compute_entropy: also return the entropy partial.
        kept: ``(n, V_r)`` bool, a sampling support's tokens (the softmax runs over them only; a
            target outside it gets ``z = -inf``), or None for every token.
    """
    z = _shard_z(logits_shard, temperature)  # (n, V_r)
    if kept is not None:
        z = torch.where(kept, z, torch.full_like(z, -torch.inf))
    row_max = z.amax(dim=-1)
    # An all -inf row (masked vocab) would give exp(-inf - -inf) = NaN; shift it by 0 instead.
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    zs = z - shift.unsqueeze(-1)
    e = torch.exp(zs)
    column, in_shard = _local_target(local_ids, z.shape[-1])
    target = z.gather(-1, column.unsqueeze(-1)).squeeze(-1)
    target = torch.where(in_shard, target, torch.zeros_like(target))
    weighted = None
    if compute_entropy:
        # 0 * -inf on masked columns is NaN; their contribution is 0.
        weighted = torch.where(e > 0, e * zs, torch.zeros_like(zs)).sum(-1)
    return ShardPartials(row_max, e.sum(-1), target, weighted)


def shard_vocab_grad(
    logits_shard: Tensor,
    local_ids: Tensor,
    temperature: float,
    lse: Tensor,
    entropy: Optional[Tensor],
    grad_logps: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    kept: Optional[Tensor] = None,
) -> Tensor:
    """``d loss / d z`` on one shard, from the global ``lse`` (and entropy): no communication.

    ``d logp / d z_j = onehot_j - p_j`` and ``d H / d z_j = -p_j (log p_j + H)``, with
    ``p_j = exp(z_j - lse)``. Returns ``(n, V_r)`` in the compute dtype, already divided by
    the temperature (so it is the gradient of the logits). ``kept``: as in
    :func:`shard_vocab_partials`; a dropped token (the target too) gets exactly 0.
    """
    z = _shard_z(logits_shard, temperature)
    if kept is not None:
        z = torch.where(kept, z, torch.full_like(z, -torch.inf))
    log_p = z - lse.unsqueeze(-1)
    p = torch.exp(log_p)
    dz = torch.zeros_like(z)
    if grad_logps is not None:
        g = grad_logps.to(z.dtype)
        dz = dz - p * g.unsqueeze(-1)
        column, in_shard = _local_target(local_ids, z.shape[-1])
        if kept is not None:
            in_shard = in_shard & kept.gather(-1, column.unsqueeze(-1)).squeeze(-1)
        dz.scatter_add_(-1, column.unsqueeze(-1), torch.where(in_shard, g, torch.zeros_like(g)).unsqueeze(-1))
    if grad_entropy is not None:
        term = torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), torch.zeros_like(p))
        dz = dz - term * grad_entropy.to(z.dtype).unsqueeze(-1)
    return dz / temperature


def _combine_partials(partials: List[ShardPartials], spec: "_ShardSpec") -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """All-reduce the shards' partials (MAX, then one SUM of 2-3 floats a token).

    ``partials`` holds this rank's token chunks in order; they are concatenated first so that
    each collective runs once per call. Returns ``(lse, entropy or None, target logit)``,
    ``(n,)`` each, global and identical on every rank.
    """
    local_max = torch.cat([p.max for p in partials])
    sumexp = torch.cat([p.sumexp for p in partials])
    target = torch.cat([p.target for p in partials])
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, spec.process_group, spec.world_size)
    weighted = torch.cat([p.sum_exp_shifted_z for p in partials]) if spec.compute_entropy else None
    sumexp, weighted = rescale_partials(local_max, sumexp, weighted, global_max)
    columns = [sumexp, target] + ([weighted] if spec.compute_entropy else [])
    packed = _all_reduce(torch.stack(columns, dim=-1), dist.ReduceOp.SUM, spec.process_group, spec.world_size)
    lse, entropy = finish_partials(global_max, packed[:, 0], packed[:, 2] if spec.compute_entropy else None)
    return lse, entropy, packed[:, 1]


# --------------------------------------------------------------------------------------
# Vocab parallel: sampling support (the cutoff of a top-k / top-p / min-p rule).
# --------------------------------------------------------------------------------------

# Tokens each rank sends per row for the cutoff at first; doubled until every row's cutoff is known.
_FIRST_CANDIDATES = 64
# Ids of the padding a rank sends once its shard is exhausted: past every real id, unique per slot.
_PAD_ID = 1 << 40


class _Cutoff(NamedTuple):
    """A sampling support per row in the kernel form of :mod:`grpo_fused.semantics.sampling`:
    token ``v`` (a global id) is kept when ``z[v] > tau``, or ``z[v] == tau`` and ``v < tie_end``."""

    tau: Tensor  # (n,) compute dtype
    tie_end: Tensor  # (n,) int64


def _kept(z: Tensor, cutoff: _Cutoff, vocab_start: int) -> Tensor:
    """``(n, V_r)`` bool: the shard's tokens inside the support."""
    ids = torch.arange(vocab_start, vocab_start + z.shape[-1], device=z.device)
    tau = cutoff.tau.unsqueeze(-1)
    return (z > tau) | ((z == tau) & (ids < cutoff.tie_end.unsqueeze(-1)))


def _gather_columns(t: Tensor, process_group, world_size: int, rank: int) -> Tensor:
    """``(n, m)`` per rank -> ``(n, world_size * m)``, rank-major, as one SUM all-reduce (see
    :func:`_gather_rows`; ``x + 0`` is exact, ``-inf + 0`` too)."""
    table = torch.zeros((world_size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
    table[rank] = t
    table = _all_reduce(table, dist.ReduceOp.SUM, process_group, world_size)
    return table.permute(1, 0, 2).reshape(t.shape[0], -1)


def _sampling_cutoff(z: Tensor, spec: _ShardSpec) -> _Cutoff:
    """The cutoff of ``spec.sampling`` for the rows ``z`` ``(n, V_r)`` (this rank's columns of
    ``logits / temperature``), identical on every rank.

    The rule is the reference's (:func:`grpo_fused.reference.sampling_support_of`) evaluated on the
    row's global order (descending ``z``, ties by ascending id). Each rank sends its ``m`` largest
    ``z`` (``topk``, no sort of the shard) as ``(z, id)`` pairs and every rank merges them: the merged
    order is the row's true order over the tokens above the largest of the ranks' last sent ``z``
    (whatever a rank did not send is at most its last one). The stages run on that exact prefix, top-p's total being an
    all-reduced sum when top-k is off; while some row's support may end past the prefix, every
    rank asks again with ``2 m``. The ranks take the same decisions from the same gathered numbers,
    so they run the same collectives. The top-p mass is summed in float64, as the reference does,
    in another order (a token whose preceding mass lies within rounding of ``p`` may differ).
    """
    rule, group, world = spec.sampling, spec.process_group, spec.world_size
    _, rank = _world(group)
    n, shard = z.shape
    device = z.device
    gmax = _all_reduce(z.amax(-1), dist.ReduceOp.MAX, group, world)
    sizes = spec.shard_sizes
    widest = max(sizes)
    top_k, p, all_ties = rule.top_k or 0, rule.p, rule.top_k_ties == "all"
    total = None
    if top_k == 0 and p < 1:
        # top-p's total: the mass of min-p's survivors over the whole row.
        survive = ((z - gmax.unsqueeze(-1)) >= rule.log_min_p) | torch.isneginf(gmax).unsqueeze(-1)
        mass = torch.where(survive, torch.exp(z.double() - gmax.double().unsqueeze(-1)), 0.0).sum(-1)
        total = _all_reduce(mass, dist.ReduceOp.SUM, group, world)
    m = min(max(_FIRST_CANDIDATES, top_k + 1), widest)
    while True:
        sent_z, sent_id = torch.topk(z, min(m, shard), dim=-1)  # descending; ties in any order
        sent_id = sent_id + spec.vocab_start
        if shard < m:  # this shard is exhausted: padding after every real token
            pad = m - shard
            sent_z = torch.cat([sent_z, sent_z.new_full((n, pad), -torch.inf)], dim=-1)
            pad_id = _PAD_ID + rank * m + torch.arange(pad, device=device)
            sent_id = torch.cat([sent_id, pad_id.expand(n, pad)], dim=-1)
        all_z = _gather_columns(sent_z.contiguous(), group, world, rank)
        all_id = _gather_columns(sent_id.contiguous(), group, world, rank)
        # Merge: by id, then stably by descending z.
        by_id = torch.sort(all_id, dim=-1, stable=True)
        merged_z = all_z.gather(-1, by_id.indices)
        by_z = torch.sort(merged_z, dim=-1, descending=True, stable=True)
        merged_z, merged_id = by_z.values, by_id.values.gather(-1, by_z.indices)
        length = merged_z.shape[-1]
        bounded = [r for r in range(world) if sizes[r] > m]  # ranks that hold tokens they did not send
        if bounded:
            # A token rank r did not send has z <= its last sent z (a tie of it may have a lower id):
            # the order is exact over the tokens above every such bound.
            bound = all_z[:, [r * m + m - 1 for r in bounded]].amax(-1)
            prefix = (merged_z > bound.unsqueeze(-1)).sum(-1)
        else:
            prefix = torch.full((n,), length, device=device)
        position = torch.arange(length, device=device)
        known = position < prefix.unsqueeze(-1)
        complete = torch.full((n,), not bounded, device=device)  # every token of the row was sent
        top = merged_z[:, :1]
        kept = ((merged_z - top) >= rule.log_min_p) | torch.isneginf(top)
        if top_k:
            if all_ties:  # every token tied with the k-th; a k-th past the prefix keeps the whole prefix
                kth = merged_z[:, min(top_k, length) - 1]
                kth = torch.where(prefix >= top_k, kth, torch.full_like(kth, -torch.inf))
                kept &= merged_z >= kth.unsqueeze(-1)
            else:
                kept &= position < top_k
        settled = torch.ones(n, dtype=torch.bool, device=device)
        if p < 1:
            w = torch.where(kept & known, torch.exp(merged_z.double() - top.double()), 0.0)
            if total is None:  # top-k on: its kept set must end inside the prefix for the total
                settled = (~kept & known).any(-1) | complete
                row_total = w.sum(-1)
            else:
                row_total = total
            kept &= ((torch.cumsum(w, dim=-1) - w) < p * row_total.unsqueeze(-1)) | (position == 0)
        settled &= (~kept & known).any(-1) | complete
        if m >= widest or bool(settled.all()):  # the same answer on every rank
            break
        m = min(2 * m, widest)
    last = ((kept & known).sum(-1) - 1).clamp(min=0).unsqueeze(-1)
    return _Cutoff(merged_z.gather(-1, last).squeeze(-1), merged_id.gather(-1, last).squeeze(-1) + 1)


# --------------------------------------------------------------------------------------
# Vocab parallel: validation agreed on by every rank (one small all-reduce).
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ShardSpec:
    """The vocab layout and options every rank agreed on; kept on ``ctx`` for backward."""

    vocab_start: int
    vocab_shard: int
    temperature: float
    compute_entropy: bool
    process_group: object
    world_size: int
    chunk_size: int = 0
    sampling: Optional[SamplingRule] = None  # active rules only; the chunks then agree across ranks
    shard_sizes: Tuple[int, ...] = ()  # every rank's V_r, from the layout agreement


def _agree_on_shards(
    local_error: Optional[Exception],
    process_group,
    *,
    vocab_start,
    vocab_shard: int,
    ids: Optional[Tensor],
    hidden_size: int,
    device,
) -> Tuple[int, Tuple[int, ...]]:
    """Share each rank's layout in one all-reduce; every rank raises the same way or none does.

    Returns this rank's ``vocab_start`` and every rank's ``V_r``. A rank whose local checks failed
    raises its own error; the others raise a ValueError naming it (instead of waiting on a
    collective it will never join). Checks: ``vocab_start`` given on all ranks or none, the
    shards tile ``[0, V)`` without gap or overlap, the same tokens and ``H`` on every rank,
    the same ids (min, max, sum), and ids in ``[0, V)``.
    """
    world_size, rank = _world(process_group)
    row = torch.zeros(8, dtype=torch.float64, device=device)
    if local_error is not None:
        row[0] = 1.0
    else:
        row[1] = -1.0 if vocab_start is None else float(vocab_start)
        row[2], row[3], row[4] = float(vocab_shard), float(ids.numel()), float(hidden_size)
        if ids.numel() > 0:
            flat = ids.reshape(-1).to(torch.float64)
            row[5], row[6], row[7] = flat.min(), flat.max(), flat.sum()
    table = _gather_rows(row, process_group, world_size, rank).tolist()  # the one host sync
    if local_error is not None:
        raise local_error
    bad = [r for r in range(world_size) if table[r][0] != 0]
    if bad:
        raise ValueError(f"vocab-parallel inputs were rejected on rank(s) {bad} of the process group; see the error there")

    sizes = [int(t[2]) for t in table]
    layout = ", ".join(f"rank {r}: start {int(t[1]) if t[1] >= 0 else None}, size {sizes[r]}" for r, t in enumerate(table))
    given = [t[1] >= 0 for t in table]
    if any(given) and not all(given):
        raise ValueError(f"vocab_start must be given on every rank or on none ({layout})")
    if all(given):
        starts = [int(t[1]) for t in table]
        expected = 0
        for r in sorted(range(world_size), key=lambda r: starts[r]):
            if starts[r] != expected:
                raise ValueError(
                    f"vocab_start={starts[rank]} on rank {rank}: the shards must tile [0, V) without gaps or "
                    f"overlaps ({layout})"
                )
            expected += sizes[r]
    else:
        starts = [sum(sizes[:r]) for r in range(world_size)]
    vocab_size = sum(sizes)

    tokens = {int(t[3]) for t in table}
    if len(tokens) != 1:
        raise ValueError(f"ids must hold the same tokens on every rank; token counts by rank: {[int(t[3]) for t in table]}")
    if len({t[4] for t in table}) != 1:
        raise ValueError(f"hidden must have the same H on every rank; by rank: {[int(t[4]) for t in table]}")
    if tokens.pop() > 0:
        if len({(t[5], t[6], t[7]) for t in table}) != 1:
            raise ValueError("ids must be the same on every rank of the vocab-parallel group (they differ)")
        lo, hi = int(table[0][5]), int(table[0][6])
        if v.CHECK_IDS and (lo < 0 or hi >= vocab_size):
            raise ValueError(f"ids must lie in [0, {vocab_size}) (the vocab size over all shards), found {lo if lo < 0 else hi}")
    return starts[rank], tuple(sizes)


def _check_vocab_start(vocab_start):
    if vocab_start is None:
        return
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
        raise TypeError(f"vocab_start must be None or an int, got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")


def _check_logits_side(logits_shard, ids, temperature, vocab_start, chunk_size):
    v.check_vocab_inputs("logits_shard", logits_shard, ids, temperature, vocab_name="V_r")
    _check_vocab_start(vocab_start)
    v.check_positive_int("chunk_size", chunk_size)


def _check_linear_side(hidden, weight_shard, ids, temperature, bias_shard, vocab_start, chunk_size):
    v.check_linear_inputs(hidden, weight_shard, ids, temperature, bias_shard, "weight_shard", "bias_shard")
    _check_vocab_start(vocab_start)
    v.check_positive_int("chunk_size", chunk_size)


def _checked(check, *args):
    """Run the local checks; return the error instead of raising it (raised after the exchange)."""
    try:
        check(*args)
    except (TypeError, ValueError) as exc:
        return exc
    return None


# --------------------------------------------------------------------------------------
# Vocab parallel: autograd Functions.
# --------------------------------------------------------------------------------------


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """``(logits_shard (N, V_r), ids (N,)) -> (logps (N,), entropy (N,) or None)``.

    Token chunks of ``spec.chunk_size`` bound the fp32 temporaries to ``(chunk, V_r)``; the
    only ``(N, V_r)`` tensor written is the gradient, in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits_shard: Tensor, ids: Tensor, spec: _ShardSpec):
        local_ids = ids.long() - spec.vocab_start
        partials, cutoffs = [], []
        for rows in _chunks(logits_shard.shape[0], spec.chunk_size):
            kept = _support_of(logits_shard[rows], spec, cutoffs)
            partials.append(shard_vocab_partials(logits_shard[rows], local_ids[rows], spec.temperature,
                                                 spec.compute_entropy, kept))
        lse, entropy, target = _combine_partials(partials, spec)
        ctx.save_for_backward(logits_shard, local_ids, lse, entropy, *_joined(cutoffs))
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return target - lse, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        logits_shard, local_ids, lse, entropy, tau, tie_end = ctx.saved_tensors
        spec = ctx.spec
        if not ctx.needs_input_grad[0] or (grad_logps is None and grad_entropy is None):
            return None, None, None
        dlogits = torch.empty_like(logits_shard)
        for rows in _chunks(logits_shard.shape[0], spec.chunk_size):
            dlogits[rows] = shard_vocab_grad(
                logits_shard[rows], local_ids[rows], spec.temperature, lse[rows],
                None if entropy is None else entropy[rows],
                None if grad_logps is None else grad_logps[rows],
                None if grad_entropy is None else grad_entropy[rows],
                _saved_support(logits_shard[rows], spec, tau, tie_end, rows),
            )
        return dlogits, None, None


@dataclasses.dataclass(frozen=True)
class _LinearInputs:
    hidden_dtype: torch.dtype
    weight_dtype: torch.dtype


class _VocabParallelLinearLogSoftmax(torch.autograd.Function):
    """``(hidden (N, H), weight_shard (V_r, H), bias_shard (V_r,) or None, ids (N,)) -> (logps, entropy)``.

    Token chunks of ``spec.chunk_size`` bound the transient ``(chunk, V_r)`` logits; they are
    recomputed in backward from the saved ``lse`` (N floats) and entropy.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight_shard: Tensor, bias_shard: Optional[Tensor], ids: Tensor, spec: _ShardSpec):
        local_ids = ids.long() - spec.vocab_start
        partials, cutoffs = [], []
        for rows in _chunks(hidden.shape[0], spec.chunk_size):
            logits = _chunk_logits(hidden, weight_shard, bias_shard, rows)
            kept = _support_of(logits, spec, cutoffs)
            partials.append(shard_vocab_partials(logits, local_ids[rows], spec.temperature, spec.compute_entropy, kept))
        lse, entropy, target = _combine_partials(partials, spec)
        ctx.save_for_backward(hidden, weight_shard, bias_shard, local_ids, lse, entropy, *_joined(cutoffs))
        ctx.spec = spec
        ctx.inputs = _LinearInputs(hidden.dtype, weight_shard.dtype)
        ctx.set_materialize_grads(False)
        return target - lse, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight_shard, bias_shard, local_ids, lse, entropy, tau, tie_end = ctx.saved_tensors
        spec = ctx.spec
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None, None
        cdt = compute_dtype(hidden.dtype)
        weight = weight_shard.to(cdt)
        dhidden = torch.empty(hidden.shape, dtype=cdt, device=hidden.device) if need_hidden else None
        dweight = torch.zeros_like(weight) if need_weight else None
        dbias = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if need_bias else None
        for rows in _chunks(hidden.shape[0], spec.chunk_size):
            logits = _chunk_logits(hidden, weight_shard, bias_shard, rows)
            dlogits = shard_vocab_grad(
                logits, local_ids[rows], spec.temperature, lse[rows],
                None if entropy is None else entropy[rows],
                None if grad_logps is None else grad_logps[rows],
                None if grad_entropy is None else grad_entropy[rows],
                _saved_support(logits, spec, tau, tie_end, rows),  # the chunk of forward's GEMM shape
            )  # (chunk, V_r)
            if need_hidden:
                dhidden[rows] = dlogits @ weight
            if need_weight:
                dweight += dlogits.T @ hidden[rows].to(cdt)
            if need_bias:
                dbias += dlogits.sum(0)
        if need_hidden:
            # hidden feeds every vocab shard: its gradient is the sum of the shards' (one all-reduce).
            _all_reduce(dhidden, dist.ReduceOp.SUM, spec.process_group, spec.world_size)
            dhidden = dhidden.to(ctx.inputs.hidden_dtype)
        return (
            dhidden,
            None if dweight is None else dweight.to(ctx.inputs.weight_dtype),
            None if dbias is None else dbias.to(bias_shard.dtype),
            None,
            None,
        )


def _chunks(n: int, chunk_size: int):
    step = max(chunk_size, 1)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)] or [slice(0, 0)]


def _support_of(logits: Tensor, spec: _ShardSpec, cutoffs: List[_Cutoff]) -> Optional[Tensor]:
    """Forward: the chunk's kept tokens under ``spec.sampling`` (its cutoff appended to ``cutoffs``),
    or None without a rule."""
    if spec.sampling is None:
        return None
    z = _shard_z(logits, spec.temperature)
    cutoffs.append(_sampling_cutoff(z, spec))
    return _kept(z, cutoffs[-1], spec.vocab_start)


def _joined(cutoffs: List[_Cutoff]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if not cutoffs:
        return None, None
    return torch.cat([c.tau for c in cutoffs]), torch.cat([c.tie_end for c in cutoffs])


def _saved_support(logits: Tensor, spec: _ShardSpec, tau: Optional[Tensor], tie_end: Optional[Tensor],
                   rows: slice) -> Optional[Tensor]:
    """Backward: the chunk's kept tokens from forward's cutoff (the logits recomputed as forward
    computed them: same chunks, same GEMM shapes), or None without a rule."""
    if tau is None:
        return None
    return _kept(_shard_z(logits, spec.temperature), _Cutoff(tau[rows], tie_end[rows]), spec.vocab_start)


def _chunk_logits(hidden: Tensor, weight_shard: Tensor, bias_shard: Optional[Tensor], rows: slice) -> Tensor:
    """``hidden[rows] @ weight_shard.T + bias_shard`` in the compute dtype, like the reference."""
    cdt = compute_dtype(hidden.dtype)
    bias = None if bias_shard is None else bias_shard.to(cdt)
    return torch.nn.functional.linear(hidden[rows].to(cdt), weight_shard.to(cdt), bias)


def _default_chunk(tokens: int, vocab_shard: int, dtype: torch.dtype, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return chunk_size
    element = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    return chunk_rows(max(tokens, 1), vocab_shard, _SHARD_TEMPORARIES * element)


# --------------------------------------------------------------------------------------
# Vocab parallel: entry points.
# --------------------------------------------------------------------------------------


def _common_chunk(chunk: int, sampling: Optional[SamplingRule], process_group, world_size: int, device) -> int:
    """The chunk size; under a sampling rule the smallest of the ranks', since each chunk's cutoff
    is found together (one set of collectives per chunk)."""
    if sampling is None or world_size == 1:
        return chunk
    agreed = _all_reduce(torch.tensor([float(chunk)], device=device), dist.ReduceOp.MIN, process_group, world_size)
    return int(agreed.item())


def _rule(sampling: Optional[SamplingRule]) -> Optional[SamplingRule]:
    return sampling if sampling is not None and sampling.active else None


def _logits_pass(logits_shard, ids, vocab_start, temperature, compute_entropy, process_group, chunk_size, error=None,
                 sampling: Optional[SamplingRule] = None):
    """Local checks (or the caller's ``error``), the layout agreement, then the sharded vocab pass."""
    error = error or _checked(_check_logits_side, logits_shard, ids, temperature, vocab_start, chunk_size)
    device = _collective_device(process_group, logits_shard, ids)
    vocab_start, sizes = _agree_on_shards(
        error, process_group, vocab_start=vocab_start, vocab_shard=0 if error else logits_shard.shape[-1], ids=ids,
        hidden_size=0, device=device,
    )
    world_size, _ = _world(process_group)
    sampling = _rule(sampling)
    chunk = _common_chunk(_default_chunk(ids.numel(), logits_shard.shape[-1], logits_shard.dtype, chunk_size),
                          sampling, process_group, world_size, device)
    spec = _ShardSpec(vocab_start, logits_shard.shape[-1], float(temperature), bool(compute_entropy),
                      process_group, world_size, chunk, sampling, sizes)
    lead = ids.shape
    logps, entropy = _VocabParallelLogSoftmax.apply(logits_shard.reshape(-1, spec.vocab_shard), ids.reshape(-1), spec)
    return logps.reshape(lead), None if entropy is None else entropy.reshape(lead)


def _linear_pass(hidden, weight_shard, ids, vocab_start, temperature, bias_shard, compute_entropy, process_group,
                 chunk_size, error=None, sampling: Optional[SamplingRule] = None):
    """:func:`_logits_pass` of the column-parallel lm_head."""
    error = error or _checked(_check_linear_side, hidden, weight_shard, ids, temperature, bias_shard, vocab_start,
                              chunk_size)
    device = _collective_device(process_group, hidden, ids)
    vocab_start, sizes = _agree_on_shards(
        error, process_group, vocab_start=vocab_start, vocab_shard=0 if error else weight_shard.shape[0], ids=ids,
        hidden_size=0 if error else hidden.shape[-1], device=device,
    )
    world_size, _ = _world(process_group)
    sampling = _rule(sampling)
    chunk = _common_chunk(_default_chunk(ids.numel(), weight_shard.shape[0], hidden.dtype, chunk_size),
                          sampling, process_group, world_size, device)
    spec = _ShardSpec(vocab_start, weight_shard.shape[0], float(temperature), bool(compute_entropy),
                      process_group, world_size, chunk, sampling, sizes)
    lead = ids.shape
    logps, entropy = _VocabParallelLinearLogSoftmax.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias_shard, ids.reshape(-1), spec
    )
    return logps.reshape(lead), None if entropy is None else entropy.reshape(lead)


def vocab_parallel_selective_log_softmax(
    logits_shard: Tensor,
    ids: Tensor,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    process_group=None,
    *,
    chunk_size: Optional[int] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    top_k_ties: str = "exact",
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`grpo_fused.selective_log_softmax` over a vocabulary sharded across ``process_group``.

    Args:
        logits_shard: ``(..., V_r)`` fp32 / bf16 / fp16 / fp64, this rank's columns
            ``[vocab_start, vocab_start + V_r)`` of the logits.
        ids: ``(...)`` integer token ids in the *full* vocab ``[0, V)``, the same on every rank.
        vocab_start: first vocab column of this shard; None means the shards are in rank
            order (rank r starts at the sum of the lower ranks' ``V_r``), as Megatron lays them out.
        temperature: > 0, divides the logits. Default 1.0.
        compute_entropy: also return the per-token entropy of the full distribution. Default False.
        process_group: the vocab-parallel group; None means the default group (or one process
            when torch.distributed is not initialized).
        chunk_size: tokens per chunk of the fp32 ``(chunk, V_r)`` temporaries; None picks
            ``2**24 / V_r`` tokens (64 MB each).
        top_k, top_p, min_p, top_k_ties: the sampler's truncation
            (:class:`~grpo_fused.semantics.SamplingRule`), as in :func:`grpo_fused.selective_log_softmax`.

    Returns:
        ``(logps, entropy)``, ``(...)`` in fp32 (fp64 for fp64 logits), identical on every rank;
        entropy is None unless asked. Both are differentiable: backward writes this rank's
        ``d logits_shard`` with no communication.

    Costs one small all-reduce (layout and ids check, with a host sync) plus, per call, a MAX
    all-reduce of N floats and a SUM all-reduce of 2 (3 with entropy) x N floats. A sampling rule
    adds, per token chunk, the exchange of each rank's best ``m`` tokens of each row (``m`` from 64,
    or ``top_k + 1``, doubled while some row needs more) and a few small all-reduces.
    """
    error, sampling = _sampling_rule(top_k, top_p, min_p, top_k_ties)
    return _logits_pass(logits_shard, ids, vocab_start, temperature, compute_entropy, process_group, chunk_size,
                        error, sampling)


def _sampling_rule(top_k, top_p, min_p, top_k_ties) -> Tuple[Optional[Exception], Optional[SamplingRule]]:
    """``(error or None, rule or None)``; the error is raised after the layout exchange, on every rank."""
    try:
        return None, SamplingRule(top_k=top_k, top_p=top_p, min_p=min_p, top_k_ties=top_k_ties)
    except (TypeError, ValueError) as exc:
        return exc, None


def vocab_parallel_linear_log_softmax(
    hidden: Tensor,
    weight_shard: Tensor,
    ids: Tensor,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    bias_shard: Optional[Tensor] = None,
    compute_entropy: bool = False,
    process_group=None,
    *,
    chunk_size: Optional[int] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    top_k_ties: str = "exact",
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`vocab_parallel_selective_log_softmax` of ``hidden @ weight_shard.T + bias_shard``.

    Args:
        hidden: ``(..., H)`` float, the same on every rank (the input of a column-parallel lm_head).
        weight_shard: ``(V_r, H)`` this rank's rows of the lm_head weight. bias_shard: ``(V_r,)`` or None.
        ids, vocab_start, temperature, compute_entropy, process_group: as in
            :func:`vocab_parallel_selective_log_softmax`.
        chunk_size: tokens per chunk of the transient ``(chunk, V_r)`` fp32 logits; None picks
            ``2**24 / V_r`` tokens (64 MB).
        top_k, top_p, min_p, top_k_ties: as in :func:`vocab_parallel_selective_log_softmax`.

    Returns:
        ``(logps, entropy)`` as :func:`vocab_parallel_selective_log_softmax`. Backward writes this
        rank's ``dweight_shard`` / ``dbias_shard`` with no communication and all-reduces
        ``dhidden`` ``(N, H)`` once (every rank gets the full gradient).
    """
    error, sampling = _sampling_rule(top_k, top_p, min_p, top_k_ties)
    return _linear_pass(hidden, weight_shard, ids, vocab_start, temperature, bias_shard, compute_entropy,
                        process_group, chunk_size, error, sampling)


def _loss_checks(features_name, features, batch, config):
    """``(error or None, config)`` of a loss call's local checks; the error is raised after the
    exchange, on every rank, with a placeholder config meanwhile."""
    try:
        config = v.check_config(config)
        v.check_loss_inputs(features_name, features, batch, config)
    except (TypeError, ValueError) as exc:
        return exc, GRPOConfig()
    return None, config


def vocab_parallel_grpo_loss(
    logits_shard: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    *,
    vocab_start: Optional[int] = None,
    process_group=None,
    config: Optional[GRPOConfig] = None,
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
    chunk_size: Optional[int] = None,
) -> GRPOOutput:
    """:func:`grpo_fused.grpo_loss` with the logits sharded over the vocab across ``process_group``.

    Args:
        logits_shard: ``(B, T, V_r)``, this rank's vocab columns (see
            :func:`vocab_parallel_selective_log_softmax` for ``vocab_start`` and ``process_group``).
        completion_ids: ``(B, T)`` ids in the full vocab ``[0, V)``; every other ``(B, T)``
            argument, ``config``, ``is_weights`` and the normalizers are those of
            :func:`grpo_fused.grpo_loss` and must be the same on every rank of the group.
        chunk_size: see :func:`vocab_parallel_selective_log_softmax`.

    Returns:
        The :class:`GRPOOutput` of the single-process loss on the full logits (loss, logps,
        entropy, metrics), identical on every rank; backward fills this rank's logits-shard gradient.
    """
    batch = LossBatch(completion_ids, advantages, completion_mask, old_logps, ref_logps, is_weights,
                      num_items_in_batch, global_batch_size)
    error, config = _loss_checks("logits_shard", logits_shard, batch, config)
    logps, entropy = _logits_pass(logits_shard, completion_ids, vocab_start, config.temperature, config.compute_entropy,
                                  process_group, chunk_size, error, config.sampling)
    return _tail(logps, entropy, logits_shard.dtype, batch, config)


def vocab_parallel_linear_grpo_loss(
    hidden: Tensor,
    weight_shard: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Optional[Tensor] = None,
    old_logps: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    *,
    bias_shard: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    process_group=None,
    config: Optional[GRPOConfig] = None,
    is_weights: Optional[Tensor] = None,
    num_items_in_batch=None,
    global_batch_size=None,
    chunk_size: Optional[int] = None,
) -> GRPOOutput:
    """:func:`grpo_fused.linear_grpo_loss` with the lm_head sharded over the vocab (column parallel).

    Args:
        hidden: ``(B, T, H)``, the same on every rank. weight_shard: ``(V_r, H)``.
        bias_shard: ``(V_r,)`` or None. chunk_size: see :func:`vocab_parallel_linear_log_softmax`.
        The other arguments are those of :func:`vocab_parallel_grpo_loss`.

    Returns:
        The :class:`GRPOOutput` of the single-process loss on the full lm_head, identical on every
        rank. Backward: ``dhidden`` (one all-reduce, full on every rank), this rank's
        ``dweight_shard`` and ``dbias_shard``.
    """
    batch = LossBatch(completion_ids, advantages, completion_mask, old_logps, ref_logps, is_weights,
                      num_items_in_batch, global_batch_size)
    error, config = _loss_checks("hidden", hidden, batch, config)
    if error is None:
        hidden = masked_rows(hidden, completion_mask)  # a NaN hidden row at padding must not reach dweight
    logps, entropy = _linear_pass(hidden, weight_shard, completion_ids, vocab_start, config.temperature, bias_shard,
                                  config.compute_entropy, process_group, chunk_size, error, config.sampling)
    return _tail(logps, entropy, hidden.dtype, batch, config)


def _tail(logps, entropy, input_dtype, batch: LossBatch, config: GRPOConfig) -> GRPOOutput:
    # The (B, T) tail of the loss, on the log-probs every rank now holds.
    dtype = compute_dtype(input_dtype)
    return grpo_output(logps.to(dtype), None if entropy is None else entropy.to(dtype), batch, config.params)
