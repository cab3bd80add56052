"""Segmented group advantages: rewards -> ``(r - mean_g) / (std_g + eps)`` in one launch.

Semantics are exactly :func:`grpo_fused.reference.group_advantages` (NaN = unscored, ``keep_mask``
leaves rewards out of the statistics, singleton / empty groups give advantage 0, NaN std where it
is undefined, ``zero_std`` = fewer than 2 valid rewards or std <= 1e-8).

Layout. A group is a contiguous run ``[start_g, start_g + size_g)`` of *sorted positions*:
``group_size`` gives ``start_g = g * group_size``; ``group_offsets`` gives the runs directly;
``group_ids`` (any labels, any order) is turned on the host into a stable ``argsort`` permutation
plus the offsets of its runs, so position ``p`` holds reward row ``perm[p]``. Groups are numbered
by sorted label, as the reference's ``torch.unique`` numbers them.

One program owns ``BLOCK_G`` consecutive groups and walks their members in ``(BLOCK_G, BLOCK_S)``
tiles: pass 1 sums and counts the valid rewards (mean), pass 2 sums the squared deviations from
that mean (two-pass variance, no ``E[x^2] - E[x]^2`` cancellation; summed relative to the group's
largest deviation, so rewards near 1e30 do not overflow fp32), pass 3 writes the
advantages, the combined rewards and the group index. When every group fits one tile
(``group_size <= BLOCK_S``) the tile is loaded once and the three passes run in registers;
otherwise passes re-read the group (from L2 on a GPU). Statistics are fp32 (fp64 for fp64
rewards), whatever the reward dtype. A group is never split across programs, so one group much
larger than the rest serializes on one program (correct, just not load-balanced).

The launch is registered as the ``torch.library`` op ``grpo_fused::triton_group_stats``
(``triton_op``), so ``torch.compile(fullgraph=True)`` traces the ``group_size`` and
``group_offsets`` paths; ``group_ids`` has a data-dependent G (``unique_consecutive``), which
Dynamo does not put in a full graph.

Work outside the single kernel launch (all torch ops on the launching stream, no host sync
except where noted):

* always: ``frac_zero_std`` = sum of the ``P`` per-program zero-std counts / G (two tiny ops,
  ``P = ceil(G / BLOCK_G)``);
* ``group_ids``: a stable ``argsort`` of the ids, a gather of the sorted ids and
  ``unique_consecutive`` (one host sync, to learn G), a cumsum for the offsets: O(B log B);
* ``group_offsets``: a cast to contiguous int64 (O(G));
* ``scale="batch"``: the batch std needs every group first, so the kernel writes the unscaled
  ``r - mean_g`` and per-program Chan partials ``(count, mean, sqrt(M2))``; torch merges the ``P``
  partials into the batch std (O(P), float64) and divides the advantages by ``std_batch + eps``, zeroing
  non-finite results (three O(B) elementwise ops).
"""

from __future__ import annotations

import math
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from grpo_fused.semantics import ADVANTAGE_SCALES, AdvantageRequest, GroupStats, compute_dtype

from .common import SCALE_BATCH, SCALE_GROUP, cpu_tensors_accepted, launchable, triton_op

Tensor = torch.Tensor

# Elements per (BLOCK_G, BLOCK_S) tile over GROUP_WARPS warps: 2048 values is 8 per thread at 8
# warps. (At 4 warps, 16 a thread, the variable-size paths -- int64 member rows from the
# permutation, several live tiles -- spilled 88-388 bytes on sm_90a; the static report checks.)
TILE_ELEMENTS = 2048
GROUP_WARPS = 8
MAX_BLOCK_S = 1024
# Variable-size groups get at least this many members per tile row, so a few large groups
# among many small ones do not walk in tiny steps.
MIN_BLOCK_S_VARIABLE = 16
# Columns of the per-program partials: valid count, mean, sqrt(M2) (Chan), number of zero-std groups.
N_PARTIALS = 4

# The reference's zero-std threshold (GroupStats.zero_std).
ZERO_STD_THRESHOLD = tl.constexpr(1e-8)


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


@triton.jit
def _div(num, den, ACC: tl.constexpr):
    # fp32 ``/`` may lower to an approximate divide on GPUs; the reference rounds exactly.
    if ACC == tl.float32:
        return tl.math.div_rn(num, den)
    else:
        return num / den


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    # tl.sqrt is the fast (approximate) fp32 square root; sqrt_rn is fp32 only.
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _member_rows(s0, starts, sizes, perm, BLOCK_S: tl.constexpr, HAS_PERM: tl.constexpr):
    """Reward rows ``(BLOCK_G, BLOCK_S)`` of members ``s0 .. s0 + BLOCK_S`` of each group."""
    members = s0 + tl.arange(0, BLOCK_S)
    in_group = members[None, :] < sizes[:, None]
    positions = starts[:, None] + members[None, :]
    if HAS_PERM:
        rows = tl.load(perm + positions, mask=in_group, other=0).to(tl.int64)
    else:
        rows = positions
    return rows, in_group


@triton.jit
def _combined_rewards(
    rewards, reward_weights, keep_mask, rows, in_group, K,
    stride_rb, stride_rk, stride_w, stride_keep,
    ACC: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """The combined reward (NaN-aware weighted sum over K, NaN when all K are NaN) and validity."""
    total = tl.zeros((BLOCK_G, BLOCK_S), dtype=ACC)
    scored = tl.zeros((BLOCK_G, BLOCK_S), dtype=tl.int1)
    for k in range(K):
        x = tl.load(rewards + rows * stride_rb + k * stride_rk, mask=in_group, other=float("nan")).to(ACC)
        if HAS_WEIGHTS:
            xw = x * tl.load(reward_weights + k * stride_w).to(ACC)
        else:
            xw = x
        # nansum skips a NaN product (NaN reward, or a NaN / inf weight times 0 or inf).
        total += tl.where(xw == xw, xw, 0.0)
        scored = scored | (x == x)
    combined = tl.where(scored, total, float("nan"))
    valid = scored
    if HAS_KEEP:
        keep = tl.load(keep_mask + rows * stride_keep, mask=in_group, other=0)
        valid = valid & (keep != 0)
    return combined, valid


@triton.jit
def _group_advantages_kernel(
    # inputs
    rewards, reward_weights, keep_mask, group_offsets, perm,
    # outputs
    advantages, combined_out, group_index, group_mean_out, group_std_out, group_count_out,
    zero_std_out, partials,
    # sizes, strides, runtime scalars
    num_groups, group_size, K,
    stride_rb, stride_rk, stride_w, stride_keep,
    ddof, eps_hi, eps_lo,
    SCALE: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    ACC: tl.constexpr = group_mean_out.dtype.element_ty
    pid = tl.program_id(0)
    groups = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    group_live = groups < num_groups
    if HAS_OFFSETS:
        starts = tl.load(group_offsets + groups, mask=group_live, other=0).to(tl.int64)
        ends = tl.load(group_offsets + groups + 1, mask=group_live, other=0).to(tl.int64)
        sizes = ends - starts
    else:
        starts = groups * group_size
        sizes = tl.where(group_live, group_size, 0).to(tl.int64)

    # Pass 1: valid count and sum -> mean.  Pass 2: sum of squared deviations -> std.
    if ONE_CHUNK:
        rows, in_group = _member_rows(0, starts, sizes, perm, BLOCK_S, HAS_PERM)
        r, valid = _combined_rewards(
            rewards, reward_weights, keep_mask, rows, in_group, K,
            stride_rb, stride_rk, stride_w, stride_keep, ACC, HAS_WEIGHTS, HAS_KEEP, BLOCK_G, BLOCK_S,
        )
        group_sum = tl.sum(tl.where(valid, r, 0.0), axis=1)
        group_count = tl.sum(valid.to(ACC), axis=1)
        group_mean = tl.where(group_count > 0, _div(group_sum, tl.maximum(group_count, 1.0), ACC), float("nan"))
        dev = tl.where(valid, r - group_mean[:, None], 0.0)
        group_spread = tl.max(tl.abs(dev), axis=1)
        scaled = dev * _div(1.0, tl.where(group_spread > 0, group_spread, 1.0), ACC)[:, None]
        group_m2s = tl.sum(scaled * scaled, axis=1)
    else:
        max_size = tl.max(sizes, axis=0).to(tl.int32)
        group_sum = tl.zeros((BLOCK_G,), dtype=ACC)
        group_count = tl.zeros((BLOCK_G,), dtype=ACC)
        for s0 in range(0, max_size, BLOCK_S):
            rows, in_group = _member_rows(s0, starts, sizes, perm, BLOCK_S, HAS_PERM)
            r, valid = _combined_rewards(
                rewards, reward_weights, keep_mask, rows, in_group, K,
                stride_rb, stride_rk, stride_w, stride_keep, ACC, HAS_WEIGHTS, HAS_KEEP, BLOCK_G, BLOCK_S,
            )
            group_sum += tl.sum(tl.where(valid, r, 0.0), axis=1)
            group_count += tl.sum(valid.to(ACC), axis=1)
        group_mean = tl.where(group_count > 0, _div(group_sum, tl.maximum(group_count, 1.0), ACC), float("nan"))
        group_spread = tl.zeros((BLOCK_G,), dtype=ACC)
        group_m2s = tl.zeros((BLOCK_G,), dtype=ACC)
        for s0 in range(0, max_size, BLOCK_S):
            rows, in_group = _member_rows(s0, starts, sizes, perm, BLOCK_S, HAS_PERM)
            r, valid = _combined_rewards(
                rewards, reward_weights, keep_mask, rows, in_group, K,
                stride_rb, stride_rk, stride_w, stride_keep, ACC, HAS_WEIGHTS, HAS_KEEP, BLOCK_G, BLOCK_S,
            )
            dev = tl.where(valid, r - group_mean[:, None], 0.0)
            # The sum of squares relative to the largest |deviation| so far, rescaled when it grows.
            spread = tl.maximum(group_spread, tl.max(tl.abs(dev), axis=1))
            spread_safe = tl.where(spread > 0, spread, 1.0)
            inv_spread = _div(1.0, spread_safe, ACC)  # one divide a group, not one a member
            old = group_spread * inv_spread
            scaled = dev * inv_spread[:, None]
            group_m2s = group_m2s * old * old + tl.sum(scaled * scaled, axis=1)
            group_spread = spread

    # M2 = spread**2 * m2s: squares of deviations near 1e30 would overflow fp32, their ratios do not.
    group_spread_safe = tl.where(group_spread > 0, group_spread, 1.0)
    group_std = group_spread_safe * _sqrt(_div(group_m2s, tl.maximum(group_count - ddof, 1.0), ACC), ACC)
    group_std = tl.where(group_count > ddof, group_std, float("nan"))
    # NaN std counts as zero std (the reference's ~(std > 1e-8)).
    zero_std = (group_count < 2) | (group_std <= ZERO_STD_THRESHOLD) | (group_std != group_std)
    has_signal = group_count > 1
    if SCALE == SCALE_GROUP:
        denom = (group_std + eps_hi) + eps_lo
    else:
        # "none" divides by nothing; "batch" is divided on the host once the batch std is known.
        denom = tl.full((BLOCK_G,), 1.0, dtype=ACC)

    tl.store(group_mean_out + groups, group_mean, mask=group_live)
    tl.store(group_std_out + groups, group_std, mask=group_live)
    tl.store(group_count_out + groups, group_count.to(tl.int64), mask=group_live)
    tl.store(zero_std_out + groups, zero_std, mask=group_live)

    # Pass 3: advantages, combined rewards and group index of every member.
    if ONE_CHUNK:
        adv = _div(dev, denom[:, None], ACC)
        adv = tl.where(valid & has_signal[:, None] & (tl.abs(adv) < float("inf")), adv, 0.0)
        tl.store(advantages + rows, adv, mask=in_group)
        tl.store(combined_out + rows, r, mask=in_group)
        tl.store(group_index + rows, groups[:, None] + tl.zeros_like(rows), mask=in_group)
    else:
        for s0 in range(0, max_size, BLOCK_S):
            rows, in_group = _member_rows(s0, starts, sizes, perm, BLOCK_S, HAS_PERM)
            r, valid = _combined_rewards(
                rewards, reward_weights, keep_mask, rows, in_group, K,
                stride_rb, stride_rk, stride_w, stride_keep, ACC, HAS_WEIGHTS, HAS_KEEP, BLOCK_G, BLOCK_S,
            )
            dev = tl.where(valid, r - group_mean[:, None], 0.0)
            adv = _div(dev, denom[:, None], ACC)
            adv = tl.where(valid & has_signal[:, None] & (tl.abs(adv) < float("inf")), adv, 0.0)
            tl.store(advantages + rows, adv, mask=in_group)
            tl.store(combined_out + rows, r, mask=in_group)
            tl.store(group_index + rows, groups[:, None] + tl.zeros_like(rows), mask=in_group)

    # Per-program partials: zero-std groups (for frac_zero_std) and, for the batch scale, Chan's
    # (count, mean, sqrt(M2)) of this program's valid rewards, merged on the host in float64.
    zero_std_groups = tl.sum(tl.where(group_live & zero_std, 1.0, 0.0).to(ACC), axis=0)
    if SCALE == SCALE_BATCH:
        n_prog = tl.sum(group_count, axis=0)
        mean_prog = _div(tl.sum(group_sum, axis=0), tl.maximum(n_prog, 1.0), ACC)
        # sqrt(M2_prog) = sqrt(sum_g a_g**2 + b_g**2), a_g = sqrt(M2_g), b_g = |mean_g - mean| sqrt(n_g),
        # summed relative to the largest term (no square overflows).
        live = group_count > 0
        a = tl.where(live, group_spread_safe * _sqrt(group_m2s, ACC), 0.0)
        b = tl.where(live, tl.abs(group_mean - mean_prog) * _sqrt(group_count, ACC), 0.0)
        top = tl.max(tl.maximum(a, b), axis=0)
        top = tl.where(top > 0, top, 1.0)
        a = _div(a, top, ACC)
        b = _div(b, top, ACC)
        m2_prog = top * _sqrt(tl.sum(a * a + b * b, axis=0), ACC)
    else:
        n_prog = tl.sum(tl.zeros((BLOCK_G,), dtype=ACC), axis=0)
        mean_prog = n_prog
        m2_prog = n_prog
    out = partials + pid.to(tl.int64) * 4
    tl.store(out + 0, n_prog)
    tl.store(out + 1, mean_prog)
    tl.store(out + 2, m2_prog)
    tl.store(out + 3, zero_std_groups)


# --------------------------------------------------------------------------------------
# Launcher.
# --------------------------------------------------------------------------------------

def _fp32_pair(x: float) -> Tuple[float, float]:
    """``(hi, lo)`` fp32 values with ``hi + lo == x`` to ~2**-48 relative.

    Triton passes a Python float as an fp32 argument; fp64 statistics would otherwise see
    ``eps`` rounded to fp32 (a 1e-12 relative change of the advantages at eps = 1e-4).
    """
    hi = struct.unpack("f", struct.pack("f", x))[0]
    if math.isinf(hi):  # beyond fp32's range: the advantages are 0 either way, never NaN
        return hi, 0.0
    return hi, x - hi


def _block_shape(batch: int, num_groups: int, group_size: int) -> Tuple[int, int, bool]:
    """``(BLOCK_G, BLOCK_S, ONE_CHUNK)``: tile rows of one group each, sized from the typical group."""
    if group_size > 0:
        block_s = min(triton.next_power_of_2(group_size), MAX_BLOCK_S)
        one_chunk = group_size <= block_s
    else:
        # Sizes vary and reading them would be a host sync: size the tile by the mean group.
        mean_size = -(-batch // max(num_groups, 1))
        block_s = min(max(triton.next_power_of_2(max(mean_size, 1)), MIN_BLOCK_S_VARIABLE), MAX_BLOCK_S)
        one_chunk = False
    block_g = max(1, TILE_ELEMENTS // block_s)
    block_g = min(block_g, triton.next_power_of_2(max(num_groups, 1)))
    return block_g, block_s, one_chunk


def group_stats(
    rewards: Tensor,
    reward_weights: Optional[Tensor],
    keep_mask: Optional[Tensor],
    group_offsets: Optional[Tensor],
    perm: Optional[Tensor],
    num_groups: int,
    group_size: int,
    scale_mode: int,
    ddof: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One launch of the kernel over all groups. Inputs are trusted (checked by the public API).

    Args:
        rewards: ``(B, K)`` float, any strides. reward_weights: ``(K,)`` or None.
        keep_mask: ``(B,)`` bool / int / float or None.
        group_offsets: ``(G+1,)`` int64 contiguous run boundaries of sorted positions, or None
            for runs of ``group_size``. perm: ``(B,)`` int64 row of each sorted position, or None.
        num_groups: G. group_size: the fixed size, 0 when ``group_offsets`` is given.
        scale_mode: the :class:`grpo_fused.semantics.AdvantageScale` code; with BATCH the advantages
            come back unscaled.
        ddof: 1 (Bessel) or 0. eps: added to the group std ("group" scale); passed to the kernel
            as an fp32 pair so fp64 statistics see it unrounded.

    Returns:
        ``(advantages (B,), combined rewards (B,), group index (B,) int64, mean (G,), std (G,),
        count (G,) int64, zero_std (G,) bool, partials (P, 4))``, floats in the compute dtype.
    """
    device = rewards.device
    acc_dtype = compute_dtype(rewards.dtype)
    batch, n_rewards = rewards.shape
    block_g, block_s, one_chunk = _block_shape(batch, num_groups, group_size)
    num_programs = triton.cdiv(num_groups, block_g)

    advantages = torch.empty(batch, dtype=acc_dtype, device=device)
    combined = torch.empty(batch, dtype=acc_dtype, device=device)
    group_index = torch.empty(batch, dtype=torch.int64, device=device)
    mean = torch.empty(num_groups, dtype=acc_dtype, device=device)
    std = torch.empty(num_groups, dtype=acc_dtype, device=device)
    count = torch.empty(num_groups, dtype=torch.int64, device=device)
    zero_std = torch.empty(num_groups, dtype=torch.bool, device=device)
    partials = torch.empty(num_programs, N_PARTIALS, dtype=acc_dtype, device=device)
    if num_programs > 0:
        launchable(_group_advantages_kernel)[(num_programs,)](
            rewards, reward_weights, keep_mask, group_offsets, perm,
            advantages, combined, group_index, mean, std, count, zero_std, partials,
            num_groups, group_size, n_rewards,
            rewards.stride(0), rewards.stride(1),
            reward_weights.stride(0) if reward_weights is not None else 0,
            keep_mask.stride(0) if keep_mask is not None else 0,
            ddof, *_fp32_pair(eps),
            SCALE=scale_mode, ONE_CHUNK=one_chunk, BLOCK_G=block_g, BLOCK_S=block_s,
            HAS_OFFSETS=group_offsets is not None, HAS_PERM=perm is not None,
            HAS_WEIGHTS=reward_weights is not None, HAS_KEEP=keep_mask is not None,
            num_warps=GROUP_WARPS, enable_fp_fusion=True,  # fp fusion pinned: Triton 3.10 turns it off by default
        )
    return advantages, combined, group_index, mean, std, count, zero_std, partials


# --------------------------------------------------------------------------------------
# torch.library op (what torch.compile traces), then the entry point.
# --------------------------------------------------------------------------------------

_group_stats_op = triton_op("triton_group_stats")(group_stats)


def _segments(
    batch: int, group_size: Optional[int], group_ids: Optional[Tensor], group_offsets: Optional[Tensor]
) -> Tuple[int, Optional[Tensor], Optional[Tensor]]:
    """``(G, offsets (G+1,) int64 or None, perm (B,) int64 or None)`` from one group description."""
    if group_size is not None:
        return batch // group_size, None, None
    if group_offsets is not None:
        return group_offsets.shape[0] - 1, group_offsets.to(torch.int64).contiguous(), None
    # Stable, so members of a group keep their row order (the kernel then sums in row order).
    perm = torch.argsort(group_ids, stable=True)
    _, sizes = torch.unique_consecutive(group_ids[perm], return_counts=True)  # host sync: G
    offsets = torch.zeros(sizes.shape[0] + 1, dtype=torch.int64, device=group_ids.device)
    torch.cumsum(sizes, 0, out=offsets[1:])
    return sizes.shape[0], offsets, perm


def _merge_batch_std(partials: Tensor, ddof: int) -> Tensor:
    """0-dim std of all valid rewards from per-program Chan partials ``(P, 4)`` (count, mean,
    sqrt(M2)): O(P) torch ops in float64, where squares of fp32-sized deviations cannot overflow."""
    wide = partials.double()
    count, mean, root_m2 = wide[:, 0], wide[:, 1], wide[:, 2]
    total = count.sum()
    batch_mean = (count * mean).sum() / total
    batch_m2 = (root_m2 * root_m2 + count * (mean - batch_mean) ** 2).sum()
    return torch.sqrt(batch_m2 / (total - ddof)).to(partials.dtype)


def group_advantages(rewards: Tensor, request: AdvantageRequest) -> Tuple[Tensor, GroupStats]:
    """Group-relative advantages with one Triton launch for the group statistics.

    Same results as :func:`grpo_fused.reference.group_advantages`; inputs are checked by
    :func:`grpo_fused.group_advantages`, this entry trusts them.

    Args:
        rewards: ``(B,)`` or ``(B, K)`` fp32 / bf16 / fp16 / fp64, any strides; NaN = unscored.
        request: the :class:`grpo_fused.semantics.AdvantageRequest` (groups given by size, by
            labels in any order (stable argsort on the host) or by offsets (empty groups
            allowed); reward weights, keep mask, scale, Bessel's correction, eps, a runtime scalar
            that never recompiles).

    Returns:
        ``(advantages (B,), GroupStats)``, floats in fp32 (fp64 for fp64 rewards), counts and
        group index int64, ``zero_std`` bool. Extra torch work beyond the launch is listed in the
        module docstring (a frac reduction; argsort for ``group_ids``; O(B) rescale for "batch").
        Rewards are data: there is no gradient (backward through the op raises).
    """
    q = request
    if q.scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {tuple(ADVANTAGE_SCALES)}, got {q.scale!r}")
    if rewards.device.type != "cuda" and not cpu_tensors_accepted():
        raise ValueError(f"rewards must be a CUDA tensor (CPU tensors only under TRITON_INTERPRET=1), "
                         f"got one on {rewards.device}")
    ddof = 1 if q.unbiased else 0
    num_groups, offsets, perm = _segments(rewards.shape[0], q.group_size, q.group_ids, q.group_offsets)
    advantages, combined, group_index, mean, std, count, zero_std, partials = _group_stats_op(
        rewards if rewards.dim() == 2 else rewards.unsqueeze(1),
        q.reward_weights, q.keep_mask, offsets, perm,
        num_groups, q.group_size or 0, int(ADVANTAGE_SCALES[q.scale]), ddof, float(q.eps),
    )
    if q.scale == "batch":
        advantages = advantages / (_merge_batch_std(partials, ddof) + q.eps)
        advantages = torch.where(torch.isfinite(advantages), advantages, 0.0)
    # G = 0 gives 0 / 0 = NaN, as the reference's mean over no groups.
    frac_zero_std = partials[:, 3].sum() / num_groups
    stats = GroupStats(group_index=group_index, mean=mean, std=std, count=count, zero_std=zero_std,
                       frac_zero_std=frac_zero_std, rewards=combined)
    return advantages, stats
