"""Sampling-support cutoff: where vLLM's truncation (min-p, then top-k, then top-p) cuts each row,
found with a bounded number of sweeps over the row (no sort of the row, no ``(N, V)`` mask or copy).

The kernel form of :mod:`grpo_fused.semantics.sampling`: every stage keeps a prefix of the order
(descending ``z``, then ascending id), so a row's support is one cutoff, written here as
:class:`Cutoff` ``(tau, tie_end, x_ties, x_above)``: token ``v`` is kept when ``z[v] > tau``, or
``z[v] == tau`` and ``v < tie_end``. ``tie_end`` is the semantics' ``ties_kept`` turned into a
column bound (one past the id of the last kept token tied at ``tau``; ``V`` when every tie is kept):
the row passes then test a column without counting the ties before it, which a vocab slice of the
row (the chunked linear path's weight pass) could not do. ``x_ties`` and ``x_above`` are the
smallest logits (in the compute dtype) whose ``z`` reaches / passes ``tau``: ``z = x *
inv_temperature`` rounds monotonically, so the row passes test the raw logits against them
(:func:`grpo_fused.kernels.common.in_support`) with the very outcome of the tests on ``z``, and
without a multiply a column.

``z`` is computed in one place (:func:`~grpo_fused.kernels.common.scaled_logits`), the rest in fp32
(fp64 for fp64 logits). Per row (a persistent grid: each program takes rows in turn and keeps a
scratch of :data:`CANDIDATES` values and columns):

1. a sweep for the row maximum (a NaN-propagating max: a row with a NaN keeps nothing, so its
   log-prob and entropy are NaN and its gradient 0, as in the reference);
2. min-p's threshold ``t0`` (the smallest ``t`` with ``t - max >= log(min_p)``, by bisection of the
   float's order key: 33 scalar steps), then the ladder sweep: count and mass ``sum exp(z - max)``
   at or above ``t0`` and each rung of :data:`LADDER` (0 included: a row whose top token alone
   meets top-p, or top-k = 1, brackets its cutoff at once);
3. per stage (top-k when ``k`` is below the survivors' count, then top-p when ``p < 1``): the
   interval ``[lo, hi)`` of order keys that brackets the stage's cutoff (the count at or above
   ``lo`` meets ``k`` (or the survivors' mass meets ``p M``), at ``hi`` it falls short) is narrowed
   by the ladder, then by refining sweeps of :data:`PIVOTS` pivots (the first
   :data:`VALUE_SWEEPS` spaced evenly in value, then in key space; each also snaps the interval
   to the smallest and largest value inside it) until it holds at most ``CANDIDATES`` tokens or
   one value. One sweep gathers those tokens (``tl.cumsum`` places them) and the stage is solved
   in registers: a sort of the candidates' keys, top-k by rank, top-p by walking the cumulative
   mass (the survivors after top-k, renormalized). Top-p reuses top-k's candidates when its
   cutoff lies among them;
4. ``tie_end``: from the candidates (their columns, in column order), or, when the cutoff value
   alone had more than ``CANDIDATES`` tokens, one sweep that counts them in column order.

Sweeps a row: typically 3 (max, ladder, gather) for one stage, 4 for top-k and top-p; at most
:func:`sweep_bound` (32-bit keys: 2 + 2 x (13 + 1) + 1 = 31), since key-space pivots leave at most
``ceil(d / (PIVOTS + 1))`` of ``d`` keys (9**11 > 2**32).

Cost (static sm_90a report, ``benchmarks/static_report.py``, bf16, V = 151936; predicted, not
measured on GPU): 231 registers, no spills, one 8-warp program an SM; SASS instructions per 8
columns a thread: max 23 (memory-bound), ladder 307, refine 326, gather 302, tie 207, against ~141
for a bf16 sweep to be memory-bound on an H100: the pivot and gather sweeps are issue-bound, ~2.1x
a memory sweep (9 pivots x a compare, an add and an FMA a column; a block-wide ``tl.cumsum`` a
tile). At N = 16384 with 25 % of the rows masked: 3 sweeps (+11.2 GB of reads) ~5.9 ms, 4 sweeps
~8.3 ms, the 31-sweep bound ~77 ms; the row kernels over the support stay memory-bound (100 / 86
per 8 columns), so a sampling rule takes the loss from ~3.7 ms to ~9.6 ms (one stage). Compiling
the kernel takes 10-18 s a specialization (two in-register sorts of ``CANDIDATES`` keys).

Layers: :func:`sampling_cutoff` (entry point) -> ``torch.ops.grpo_fused.triton_sampling_cutoff`` ->
:func:`cutoff_launch` (validate, allocate, launch) -> the kernel.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from grpo_fused.semantics import Option

from .common import (LOG2E, P_INV_TEMPERATURE, P_LOG_MIN_P, P_TOP_K, P_TOP_P, TL_DTYPE, RowLayout, acc_dtype,
                     check_params, interpreting, launch_config, launchable, load_param, order_key, row_offset,
                     row_vector, scaled_logits, triton_op, value_of_key)

Tensor = torch.Tensor

__all__ = ["Cutoff", "SupportRule", "cutoff_launch", "sampling_cutoff"]

# Pivots a refining sweep evaluates.
PIVOTS = 8
# The ladder sweep's pivots, in nats of log-probability below the row maximum: dense where top-p and
# top-k cut peaked rows, sparse in the tail (0 included: a row whose top token alone meets top-p, or
# top-k = 1, needs no other pivot).
LADDER = (0.0, 0.5, 1.0, 2.0, 3.0, 4.5, 6.5, 9.0)
_LADDER = tl.constexpr(LADDER)
# Refining sweeps whose pivots are spread evenly in value (then in key space, which bounds the count).
_VALUE_SWEEPS = 2
VALUE_SWEEPS = tl.constexpr(_VALUE_SWEEPS)
# Candidates a program can hold and solve in registers (scratch per program, then one sort). Under
# Triton's interpreter (the CPU tests) a sort costs ~0.3 ms an element, so fewer are held there,
# which also runs the refining sweeps on small rows.
CANDIDATES = 2048
INTERPRETER_CANDIDATES = 32
# Programs per SM of the persistent grid: each keeps CANDIDATES scratch slots, reused row after row.
PROGRAMS_PER_SM = 4
SMS_WITHOUT_DEVICE = 132  # the grid when no CUDA device says otherwise (interpreter, static report)


def refine_sweep_bound(key_bits: int, pivots: int = PIVOTS, value_sweeps: int = _VALUE_SWEEPS) -> int:
    """Refining sweeps one stage can take: key-space pivots leave at most ``ceil(d / (pivots + 1))``
    of ``d`` keys, down to one key."""
    keys, sweeps = 2**key_bits, value_sweeps
    while keys > 1:
        keys = -(-keys // (pivots + 1))
        sweeps += 1
    return sweeps


def sweep_bound(key_bits: int = 32) -> int:
    """Sweeps over a row at most: max, ladder, two stages of refining plus one compaction, one tie
    sweep."""
    return 2 + 2 * (refine_sweep_bound(key_bits) + 1) + 1


@dataclasses.dataclass(frozen=True)
class SupportRule:
    """What the kernels specialize on when a sampling rule applies (its numbers are the ``TOP_K``,
    ``TOP_P`` and ``LOG_MIN_P`` slots of ``params``, read at run time).

    Attributes:
        all_ties: top-k keeps every token tied with the ``k``-th (:attr:`Option.TOP_K_ALL_TIES`),
            not exactly ``k``.
    """

    all_ties: bool = False

    @staticmethod
    def of(options: Option) -> Optional["SupportRule"]:
        """The rule of :class:`~grpo_fused.semantics.Option` flags; None without
        :attr:`Option.SAMPLING_SUPPORT`."""
        if not options & Option.SAMPLING_SUPPORT:
            return None
        return SupportRule(all_ties=bool(options & Option.TOP_K_ALL_TIES))


class Cutoff(NamedTuple):
    """Per-row sampling cutoff, each field ``(N,)``.

    Attributes:
        tau: the cutoff value of ``z = logits / temperature`` (compute dtype; NaN: nothing kept).
        tie_end: int32; of the tokens with ``z == tau``, those in columns below it are kept.
        x_ties: the smallest logit (compute dtype) whose ``z`` is at least ``tau``.
        x_above: the smallest logit whose ``z`` exceeds ``tau``.
    """

    tau: Tensor
    tie_end: Tensor
    x_ties: Tensor
    x_above: Tensor

    @staticmethod
    def empty(n: int, dtype: torch.dtype, device: torch.device) -> "Cutoff":
        """Uninitialized cutoffs of ``n`` rows with values in ``dtype``."""
        return Cutoff(torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=torch.int32, device=device),
                      torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device))


# --------------------------------------------------------------------------------------
# Kernel.
# --------------------------------------------------------------------------------------


@triton.jit
def _tile_z(row_ptr, cols, n_cols, inv_temperature, MASKED: tl.constexpr, PAD: tl.constexpr,
            ACC_DTYPE: tl.constexpr):
    """``z`` of one tile of columns; columns past the row read as ``PAD``."""
    if MASKED:
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=PAD)
    else:
        x = tl.load(row_ptr + cols)
    return scaled_logits(x.to(ACC_DTYPE), inv_temperature)


@triton.jit
def _mass(z, z_max):
    """``exp(z - z_max)``: the unnormalized probability the top-p walk sums (0 at -inf)."""
    return tl.exp2((z - z_max) * LOG2E)


@triton.jit
def _max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_sweep(row_ptr, n_cols, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The row's largest logit, NaN if it holds one (one NaN-propagating max a column). ``z`` rounds
    monotonically, so ``max z`` is ``scaled_logits`` of it."""
    ROWS: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m = tl.full([ROWS, VEC], float("-inf"), ACC_DTYPE)
    full = (n_cols // BLOCK_V) * BLOCK_V
    for start in range(0, full, BLOCK_V):
        x = tl.load(row_ptr + start + offs).to(ACC_DTYPE)
        m = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
    if full < n_cols:
        cols = full + offs
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(ACC_DTYPE)
        m = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
    return tl.reduce(tl.reduce(m, 1, _max_with_nan), 0, _max_with_nan)


@triton.jit
def _passes(x, a, b, TEST: tl.constexpr):
    """The monotone tests the cutoff's thresholds answer: ``x - a >= b`` (min-p, ``a = max z``,
    ``b = log min_p``), ``scaled_logits(x, a) >= b`` and ``> b`` (``a = 1 / T``, ``b = tau``)."""
    if TEST == 0:
        return (x - a) >= b
    elif TEST == 1:
        return scaled_logits(x, a) >= b
    else:
        return scaled_logits(x, a) > b


@triton.jit
def _first_passing(guess, lowest, highest, a, b, TEST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The smallest order key in ``[lowest, highest]`` whose value passes ``TEST`` (``highest`` when
    none below it does): a bisection, started on 128 keys around ``guess`` (within an ulp or two
    of the answer) and widened to the whole range when the answer lies outside them."""
    window = 64
    g = tl.minimum(tl.maximum(order_key(guess), lowest), highest)
    lo = tl.where(g - lowest > window, g - window, lowest)
    hi = tl.where(highest - g > window, g + window, highest)
    if (lo > lowest) & _passes(value_of_key(lo, ACC_DTYPE), a, b, TEST):
        lo = lowest
    if (hi < highest) & ~_passes(value_of_key(hi, ACC_DTYPE), a, b, TEST):
        hi = highest
    while lo < hi:
        mid = lo + (hi - lo) // 2
        ok = _passes(value_of_key(mid, ACC_DTYPE), a, b, TEST)
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    return hi


@triton.jit
def _min_p_threshold(z_max_safe, log_min_p, ACC_DTYPE: tl.constexpr):
    """The smallest ``t`` with ``t - max z >= log_min_p`` (min-p keeps exactly the tokens at or above
    it), the test rounded as the reference's ``z - max z``."""
    lowest = order_key(tl.full([], float("-inf"), ACC_DTYPE))
    key = _first_passing(z_max_safe + log_min_p, lowest, order_key(z_max_safe), z_max_safe, log_min_p, 0, ACC_DTYPE)
    return value_of_key(key, ACC_DTYPE)


@triton.jit
def _logit_threshold(tau, inv_temperature, STRICT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The smallest logit ``x`` whose ``scaled_logits(x)`` exceeds (``STRICT``) or reaches ``tau``
    (NaN when none does, or ``tau`` is NaN)."""
    lowest = order_key(tl.full([], float("-inf"), ACC_DTYPE))
    none = order_key(tl.full([], float("inf"), ACC_DTYPE)) + 1  # a NaN key
    key = _first_passing(tau / inv_temperature, lowest, none, inv_temperature, tau, 2 if STRICT else 1, ACC_DTYPE)
    return value_of_key(key, ACC_DTYPE)


@triton.jit
def _pivot_tile(z, e, pivots, count, mass, NP: tl.constexpr):
    """Fold one tile into the per-thread count and mass of the tokens at or above each pivot (a
    NaN ``z`` is above none): one compare, one add and one FMA a token and pivot."""
    for j in tl.static_range(NP):
        above = (z >= pivots[j]).to(e.dtype)
        count = count[:j] + (count[j] + tl.sum(above, axis=1),) + count[j + 1:]
        mass = mass[:j] + (mass[j] + tl.sum(above * e, axis=1),) + mass[j + 1:]
    return count, mass


@triton.jit
def _interval_tile(z, lo_z, hi_z, vmin, vmax):
    inside = (z >= lo_z) & (z < hi_z)
    vmin = tl.minimum(vmin, tl.min(tl.where(inside, z, float("inf")), axis=1))
    vmax = tl.maximum(vmax, tl.max(tl.where(inside, z, float("-inf")), axis=1))
    return vmin, vmax


@triton.jit
def _pivot_sweep(row_ptr, n_cols, inv_temperature, z_max_safe, pivots, lo_z, hi_z, NP: tl.constexpr,
                 TRACK: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One sweep: the count and mass at or above each of the ``NP`` pivots (tuples of scalars) and,
    with ``TRACK``, the smallest and largest ``z`` in ``[lo_z, hi_z)``."""
    ROWS: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    count = (tl.zeros([ROWS], ACC_DTYPE),) * NP
    mass = (tl.zeros([ROWS], ACC_DTYPE),) * NP
    vmin = tl.full([ROWS], float("inf"), ACC_DTYPE)
    vmax = tl.full([ROWS], float("-inf"), ACC_DTYPE)
    full = (n_cols // BLOCK_V) * BLOCK_V
    for start in range(0, full, BLOCK_V):
        z = _tile_z(row_ptr, start + offs, n_cols, inv_temperature, False, float("nan"), ACC_DTYPE)
        count, mass = _pivot_tile(z, _mass(z, z_max_safe), pivots, count, mass, NP)
        if TRACK:
            vmin, vmax = _interval_tile(z, lo_z, hi_z, vmin, vmax)
    if full < n_cols:
        # Columns past the row read as NaN: above no pivot, and of mass 0 (not NaN: 0 * NaN).
        z = _tile_z(row_ptr, full + offs, n_cols, inv_temperature, True, float("nan"), ACC_DTYPE)
        count, mass = _pivot_tile(z, tl.where(z == z, _mass(z, z_max_safe), 0.0), pivots, count, mass, NP)
        if TRACK:
            vmin, vmax = _interval_tile(z, lo_z, hi_z, vmin, vmax)
    counts = ()
    masses = ()
    for j in tl.static_range(NP):
        counts = counts + (tl.sum(count[j], axis=0).to(tl.int32),)
        masses = masses + (tl.sum(mass[j], axis=0),)
    return counts, masses, tl.min(vmin, axis=0), tl.max(vmax, axis=0)


@triton.jit
def _narrow(keys, counts, masses, NP: tl.constexpr, target, BY_MASS: tl.constexpr, lo, hi, lo_count, lo_mass,
            hi_count, hi_mass, excluded):
    """The interval ``[lo, hi)`` after a sweep measured the count / mass at or above the pivot ``keys``:
    ``lo`` rises to the highest pivot inside meeting ``target``, ``hi`` falls to the lowest pivot
    above that which does not. (``excluded``: tokens at ``lo``'s value that an earlier stage
    dropped; none once ``lo`` moves.)"""
    new_lo = lo
    for j in tl.static_range(NP):
        if BY_MASS:
            meets = masses[j] >= target
        else:
            meets = counts[j].to(target.dtype) >= target
        up = (keys[j] > new_lo) & (keys[j] < hi) & meets
        new_lo = tl.where(up, keys[j], new_lo)
        lo_count = tl.where(up, counts[j], lo_count)
        lo_mass = tl.where(up, masses[j], lo_mass)
    new_hi = hi
    for j in tl.static_range(NP):
        if BY_MASS:
            meets = masses[j] >= target
        else:
            meets = counts[j].to(target.dtype) >= target
        down = (keys[j] > new_lo) & (keys[j] < new_hi) & ~meets
        new_hi = tl.where(down, keys[j], new_hi)
        hi_count = tl.where(down, counts[j], hi_count)
        hi_mass = tl.where(down, masses[j], hi_mass)
    excluded = tl.where(new_lo == lo, excluded, 0)
    return new_lo, new_hi, lo_count, lo_mass, hi_count, hi_mass, excluded


@triton.jit
def _refine(row_ptr, n_cols, inv_temperature, z_max_safe, target, lo, hi, lo_count, lo_mass, hi_count, hi_mass,
            excluded, BY_MASS: tl.constexpr, CAP: tl.constexpr, MAX_SWEEPS: tl.constexpr, BLOCK_V: tl.constexpr,
            VEC: tl.constexpr, P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Pivot sweeps until ``[lo, hi)`` holds at most ``CAP`` tokens (the caller then gathers them) or
    one value (``hi == lo + 1``). Each sweep also snaps the interval to the smallest and largest
    value inside it."""
    sweep = 0
    while (lo_count - hi_count > CAP) & (hi - lo > 1) & (sweep < MAX_SWEEPS):
        lo_z = value_of_key(lo, ACC_DTYPE)
        hi_z = value_of_key(hi, ACC_DTYPE)
        # Pivots strictly inside (lo, hi): evenly spaced values first (an interval spanning binades
        # has most of its keys at tiny magnitudes), then evenly spaced keys (which bound the count).
        width = hi - lo
        use_value = (sweep < VALUE_SWEEPS) & (hi_z - lo_z < float("inf"))
        keys = ()
        pivots = ()
        for j in tl.static_range(P):
            by_key = lo + (width // (P + 1)) * (j + 1) + ((width % (P + 1)) * (j + 1)) // (P + 1)
            by_value = order_key(lo_z + (hi_z - lo_z) * ((j + 1) / (P + 1)))
            key = tl.where(use_value, tl.minimum(tl.maximum(by_value, lo + 1), hi - 1), by_key)
            keys = keys + (key,)
            pivots = pivots + (value_of_key(key, ACC_DTYPE),)
        counts, masses, vmin, vmax = _pivot_sweep(row_ptr, n_cols, inv_temperature, z_max_safe, pivots, lo_z, hi_z,
                                                  P, True, BLOCK_V, VEC, ACC_DTYPE)
        if vmin < vmax:
            # The interval's tokens lie in [vmin, vmax]: no count or mass changes outside it.
            snapped = tl.maximum(lo, order_key(vmin))
            excluded = tl.where(snapped == lo, excluded, 0)
            lo = snapped
            hi = tl.minimum(hi, order_key(vmax) + 1)
            lo, hi, lo_count, lo_mass, hi_count, hi_mass, excluded = _narrow(
                keys, counts, masses, P, target, BY_MASS, lo, hi, lo_count, lo_mass, hi_count, hi_mass, excluded)
        else:
            # One distinct value left: the answer. (An empty interval, which only sums rounded
            # differently from sweep to sweep could produce, ends at lo.)
            snapped = tl.where(vmin == vmax, tl.maximum(lo, order_key(vmin)), lo)
            excluded = tl.where(snapped == lo, excluded, 0)
            lo = snapped
            hi = lo + 1
        sweep += 1
    return lo, hi, lo_count, lo_mass, hi_count, hi_mass, excluded


@triton.jit
def _gather(row_ptr, n_cols, inv_temperature, lo_z, hi_z, scratch_z, scratch_id, CAP: tl.constexpr,
            BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Write the ``z`` and column of every token in ``[lo_z, hi_z)`` to the program's scratch, in
    column order (``tl.cumsum`` places them); returns how many (at most ``CAP`` are written)."""
    offs = tl.arange(0, BLOCK_V)
    written = 0
    tl.debug_barrier()  # the previous candidates are read
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        z = _tile_z(row_ptr, cols, n_cols, inv_temperature, True, float("nan"), ACC_DTYPE)
        inside = (z >= lo_z) & (z < hi_z)
        slot = written + tl.cumsum(inside.to(tl.int32), axis=0) - 1
        keep = inside & (slot < CAP)
        tl.store(scratch_z + slot, z, mask=keep)
        tl.store(scratch_id + slot, cols, mask=keep)
        written += tl.sum(inside.to(tl.int32), axis=0)
    tl.debug_barrier()  # the candidates are visible to every thread of the program
    return tl.minimum(written, CAP)


@triton.jit
def _sorted_candidates(scratch_z, count, CAP: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The candidates' values in descending order (``[CAP]``; entries from ``count`` on are NaN)."""
    slot = tl.arange(0, CAP)
    z = tl.load(scratch_z + slot, mask=slot < count, other=0.0)
    keys = tl.where(slot < count, order_key(z), 0)
    return value_of_key(tl.sort(keys, descending=True), ACC_DTYPE)


@triton.jit
def _at(values, slot, index):
    return tl.sum(tl.where(slot == index, values, 0.0), axis=0)


@triton.jit
def _tie_end_of_candidates(scratch_z, scratch_id, count, tau, ties, CAP: tl.constexpr):
    """One past the column of the ``ties``-th candidate (in column order) with ``z == tau``."""
    slot = tl.arange(0, CAP)
    z = tl.load(scratch_z + slot, mask=slot < count, other=float("nan"))
    cols = tl.load(scratch_id + slot, mask=slot < count, other=-1)
    tied = (z == tau).to(tl.int32)
    rank = tl.cumsum(tied, axis=0)
    return tl.max(tl.where((tied != 0) & (rank == ties), cols, -1), axis=0) + 1


@triton.jit
def _tie_end_sweep(row_ptr, n_cols, inv_temperature, tau, ties, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One past the column of the ``ties``-th token (in column order) with ``z == tau``: one sweep
    counting them (``tl.cumsum``); only for a cutoff value held by more than ``CANDIDATES`` tokens."""
    offs = tl.arange(0, BLOCK_V)
    seen = 0
    last = -1
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        z = _tile_z(row_ptr, cols, n_cols, inv_temperature, True, float("nan"), ACC_DTYPE)
        tied = (z == tau).to(tl.int32)
        rank = tl.cumsum(tied, axis=0) + seen
        last = tl.maximum(last, tl.max(tl.where((tied != 0) & (rank == ties), cols, -1), axis=0))
        seen += tl.sum(tied, axis=0)
    return last + 1


@triton.jit
def _row_cutoff(row_ptr, n_cols, params_ptr, inv_temperature, scratch_z, scratch_id, BLOCK_V: tl.constexpr,
                VEC: tl.constexpr, CAP: tl.constexpr, ALL_TIES: tl.constexpr, ACC_DTYPE: tl.constexpr,
                BITS: tl.constexpr, P: tl.constexpr, L: tl.constexpr, MAX_SWEEPS: tl.constexpr):
    """``(tau, tie_end)`` of one row (see the module docstring for the stages)."""
    top_k = tl.load(params_ptr + P_TOP_K).to(tl.int32)
    top_p = load_param(params_ptr, P_TOP_P, ACC_DTYPE)
    log_min_p = load_param(params_ptr, P_LOG_MIN_P, ACC_DTYPE)

    z_max = scaled_logits(_max_sweep(row_ptr, n_cols, BLOCK_V, VEC, ACC_DTYPE), inv_temperature)
    tau = tl.full([], float("nan"), ACC_DTYPE)  # a NaN row (or a skipped one) keeps nothing
    tie_end = n_cols * 0
    if (n_cols > 0) & (z_max == z_max):
        # A row of -inf has no mass: shift by 0 there (no -inf - -inf), and min-p keeps all of it
        # (as the reference does).
        z_max_safe = tl.where(z_max > float("-inf"), z_max, 0.0)
        log_min_p = tl.where(z_max > float("-inf"), log_min_p, float("-inf"))
        t0 = _min_p_threshold(z_max_safe, log_min_p, ACC_DTYPE)
        top = order_key(z_max) + 1

        # The ladder sweep: min-p's survivors (z >= t0) and the rungs below the maximum.
        ladder = (t0,)
        for j in tl.static_range(L):
            ladder = ladder + (z_max - _LADDER[j],)
        ladder_keys = ()
        for j in tl.static_range(L + 1):
            ladder_keys = ladder_keys + (order_key(ladder[j]),)
        ladder_counts, ladder_masses, _vmin, _vmax = _pivot_sweep(
            row_ptr, n_cols, inv_temperature, z_max_safe, ladder, t0, t0, L + 1, False, BLOCK_V, VEC, ACC_DTYPE)
        n0 = ladder_counts[0]

        # The survivors so far are the tokens at or above lo, but for `excluded` tokens at lo's
        # value; lo_mass is the survivors' mass.
        lo = ladder_keys[0]
        lo_count = n0
        lo_mass = ladder_masses[0]
        hi = top
        hi_count = n0 * 0
        hi_mass = lo_mass * 0.0
        excluded = n0 * 0
        cutoff = lo  # key of the cutoff value
        tied = n0 * 0  # tokens of the row at the cutoff value (0: no stage cut inside a tie group)
        ties = n0 * 0  # ... of which the support keeps the first `ties`
        # Candidates in scratch: [gathered_lo, gathered_hi) of the row, `gathered` of them, with the
        # count and mass at or above gathered_hi.
        gathered = n0 * 0
        gathered_hi = hi
        gathered_hi_count = hi_count
        gathered_hi_mass = hi_mass

        if (top_k > 0) & (top_k < n0):
            target = top_k.to(ACC_DTYPE)
            lo, hi, lo_count, lo_mass, hi_count, hi_mass, excluded = _narrow(
                ladder_keys, ladder_counts, ladder_masses, L + 1, target, False, lo, hi, lo_count, lo_mass, hi_count,
                hi_mass, excluded)
            lo, hi, lo_count, lo_mass, hi_count, hi_mass, excluded = _refine(
                row_ptr, n_cols, inv_temperature, z_max_safe, target, lo, hi, lo_count, lo_mass, hi_count, hi_mass,
                excluded, False, CAP, MAX_SWEEPS, BLOCK_V, VEC, P, ACC_DTYPE)
            above = hi_count
            above_mass = hi_mass
            tied = lo_count - hi_count
            cutoff = lo
            if hi - lo > 1:
                gathered = _gather(row_ptr, n_cols, inv_temperature, value_of_key(lo, ACC_DTYPE),
                                   value_of_key(hi, ACC_DTYPE), scratch_z, scratch_id, CAP, BLOCK_V,
                                   ACC_DTYPE)
                gathered_hi = hi
                gathered_hi_count = hi_count
                gathered_hi_mass = hi_mass
                slot = tl.arange(0, CAP)
                values = _sorted_candidates(scratch_z, gathered, CAP, ACC_DTYPE)
                value = _at(values, slot, top_k - hi_count - 1)
                cutoff = order_key(value)
                listed = slot < gathered
                above += tl.sum((listed & (values > value)).to(tl.int32), axis=0)
                above_mass += tl.sum(tl.where(listed & (values > value), _mass(values, z_max_safe), 0.0), axis=0)
                tied = tl.sum((listed & (values == value)).to(tl.int32), axis=0)
            if ALL_TIES:
                ties = tied
            else:
                ties = top_k - above
            # Top-p walks the survivors: the tokens above the cutoff and `ties` of those at it.
            lo = cutoff
            lo_count = above + tied
            lo_mass = above_mass + ties.to(ACC_DTYPE) * _mass(value_of_key(cutoff, ACC_DTYPE), z_max_safe)
            excluded = tied - ties
            hi = top
            hi_count = n0 * 0
            hi_mass = lo_mass * 0.0

        if top_p < 1.0:
            target = top_p * lo_mass
            if (gathered > 0) & (gathered_hi_mass < target):
                # The walk ends among the candidates top-k gathered: solve it there.
                hi = gathered_hi
                hi_count = gathered_hi_count
                hi_mass = gathered_hi_mass
            else:
                if gathered > 0:
                    # It ends at or above the candidates: search from their upper end.
                    lo = gathered_hi
                    lo_count = gathered_hi_count
                    lo_mass = gathered_hi_mass
                    excluded = 0
                gathered = 0
                lo, hi, lo_count, lo_mass, hi_count, hi_mass, excluded = _narrow(
                    ladder_keys, ladder_counts, ladder_masses, L + 1, target, True, lo, hi, lo_count, lo_mass,
                    hi_count, hi_mass, excluded)
                lo, hi, lo_count, lo_mass, hi_count, hi_mass, excluded = _refine(
                    row_ptr, n_cols, inv_temperature, z_max_safe, target, lo, hi, lo_count, lo_mass, hi_count,
                    hi_mass, excluded, True, CAP, MAX_SWEEPS, BLOCK_V, VEC, P, ACC_DTYPE)
                if hi - lo > 1:
                    gathered = _gather(row_ptr, n_cols, inv_temperature, value_of_key(lo, ACC_DTYPE),
                                       value_of_key(hi, ACC_DTYPE), scratch_z, scratch_id, CAP, BLOCK_V,
                                       ACC_DTYPE)
            if gathered > 0:
                # Walk the candidates' survivors in order (the `excluded` ones sort last: they sit
                # at lo's value, the smallest); the j-th is kept while the mass before it is below
                # the target (the first always: the mass above the candidates is below it).
                slot = tl.arange(0, CAP)
                values = _sorted_candidates(scratch_z, gathered, CAP, ACC_DTYPE)
                lo_value = value_of_key(lo, ACC_DTYPE)
                survivors = tl.sum(((slot < gathered) & (values >= lo_value)).to(tl.int32), axis=0) - excluded
                mass = tl.where(slot < survivors, _mass(values, z_max_safe), 0.0)
                before = hi_mass + tl.cumsum(mass, axis=0) - mass
                kept = tl.maximum(tl.sum(((slot < survivors) & (before < target)).to(tl.int32), axis=0), 1)
                value = _at(values, slot, kept - 1)
                cutoff = order_key(value)
                listed = slot < gathered
                above = hi_count + tl.sum((listed & (values > value)).to(tl.int32), axis=0)
                tied = tl.sum((listed & (values == value)).to(tl.int32), axis=0)
                ties = kept - (above - hi_count)
            else:
                # One value left at lo: its survivors are kept lowest id first while the mass
                # before them, above + j w, stays below the target.
                cutoff = lo
                candidates = lo_count - excluded - hi_count
                tied = lo_count - hi_count
                needed = (target - hi_mass) / _mass(value_of_key(lo, ACC_DTYPE), z_max_safe)
                ties = tl.where(needed > 1.0, tl.minimum(tl.ceil(needed), candidates.to(ACC_DTYPE)), 1.0).to(tl.int32)

        tau = value_of_key(cutoff, ACC_DTYPE)
        tie_end = n_cols
        if ties < tied:
            if gathered > 0:
                tie_end = _tie_end_of_candidates(scratch_z, scratch_id, gathered, tau, ties, CAP)
            else:
                tie_end = _tie_end_sweep(row_ptr, n_cols, inv_temperature, tau, ties, BLOCK_V, ACC_DTYPE)
    return tau, tie_end


@triton.jit
def _sampling_cutoff_kernel(
    logits_ptr,  # (N, V) rows addressed through (rows_inner, stride_outer, stride_inner)
    params_ptr,  # (NUM_SLOTS,) float64 hyperparameters: INV_TEMPERATURE, TOP_K, TOP_P, LOG_MIN_P
    tau_ptr,  # (N,) ACC_DTYPE, written (Cutoff's fields)
    tie_end_ptr,  # (N,) int32, written
    x_ties_ptr,  # (N,) ACC_DTYPE, written
    x_above_ptr,  # (N,) ACC_DTYPE, written
    row_mask_ptr,  # (N,) any dtype, 0 = skip the row (read nothing), or None
    scratch_z_ptr,  # (programs, CAP) ACC_DTYPE candidate values, one slice per program
    scratch_id_ptr,  # (programs, CAP) int32 candidate columns
    n_rows,
    V,
    rows_inner,
    stride_outer,
    stride_inner,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    CAP: tl.constexpr,
    ALL_TIES: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BITS: tl.constexpr,
    P: tl.constexpr,
    L: tl.constexpr,
    MAX_SWEEPS: tl.constexpr,
):
    program = tl.program_id(0)
    inv_temperature = load_param(params_ptr, P_INV_TEMPERATURE, ACC_DTYPE)
    scratch_z = scratch_z_ptr + program.to(tl.int64) * CAP
    scratch_id = scratch_id_ptr + program.to(tl.int64) * CAP
    # Persistent: each program takes rows program, program + programs, ... (its scratch is reused).
    row = program.to(tl.int64)
    while row < n_rows:
        row_ptr = logits_ptr + row_offset(row, rows_inner, stride_outer, stride_inner)
        n_cols = V
        if HAS_ROW_MASK:
            n_cols = tl.where(tl.load(row_mask_ptr + row) != 0, V, 0)
        tau, tie_end = _row_cutoff(row_ptr, n_cols, params_ptr, inv_temperature, scratch_z, scratch_id, BLOCK_V,
                                   VEC, CAP, ALL_TIES, ACC_DTYPE, BITS, P, L, MAX_SWEEPS)
        tl.store(tau_ptr + row, tau)
        tl.store(tie_end_ptr + row, tie_end)
        tl.store(x_ties_ptr + row, _logit_threshold(tau, inv_temperature, False, ACC_DTYPE))
        tl.store(x_above_ptr + row, _logit_threshold(tau, inv_temperature, True, ACC_DTYPE))
        row += tl.num_programs(0)


# --------------------------------------------------------------------------------------
# Launcher.
# --------------------------------------------------------------------------------------


def _programs(n_rows: int, device: torch.device) -> int:
    sms = SMS_WITHOUT_DEVICE
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, PROGRAMS_PER_SM * sms))


def cutoff_launch(logits: Tensor, params: Tensor, all_ties: bool, row_mask: Optional[Tensor] = None,
                  block_v: Optional[int] = None, candidates: Optional[int] = None) -> Cutoff:
    """The cutoff of every row of ``(N, V)`` or ``(B, T, V)`` logits (last dim contiguous), launched
    directly; ``row_mask`` is flat ``(N,)`` or None (a row whose value is 0 is not read; its cutoff
    keeps nothing). ``params``: the ``(NUM_SLOTS,)`` float64 hyperparameters on the logits' device.
    ``candidates`` (a power of two) overrides how many tokens a program gathers and solves in
    registers (default :data:`CANDIDATES`, :data:`INTERPRETER_CANDIDATES` under the interpreter; at
    most the padded row)."""
    layout = RowLayout.of(logits)
    check_params(params, logits.device)
    acc = acc_dtype(logits.dtype)
    n = layout.n_rows
    cutoff = Cutoff.empty(n, acc, logits.device)
    if n == 0:
        return cutoff
    if layout.vocab == 0:
        raise ValueError("logits must have a non-empty vocab dim")
    if layout.vocab >= 2**24:
        raise ValueError(f"a sampling support needs V < 2**24 (counts in fp32), got {layout.vocab}")
    block, warps = launch_config(layout.vocab, block_v)
    cap = candidates or min(INTERPRETER_CANDIDATES if interpreting() else CANDIDATES,
                            triton.next_power_of_2(layout.vocab))
    if cap & (cap - 1) or cap < 1:
        raise ValueError(f"candidates must be a power of two, got {cap}")
    bits = 64 if acc == torch.float64 else 32
    programs = _programs(n, logits.device)
    scratch_z = torch.empty(programs, cap, dtype=acc, device=logits.device)
    scratch_id = torch.empty(programs, cap, dtype=torch.int32, device=logits.device)
    launchable(_sampling_cutoff_kernel)[(programs,)](
        logits, params, *cutoff, row_mask, scratch_z, scratch_id,
        n, layout.vocab, layout.rows_inner, layout.stride_outer, layout.stride_inner,
        BLOCK_V=block, VEC=row_vector(logits, block), CAP=cap, ALL_TIES=bool(all_ties),
        HAS_ROW_MASK=row_mask is not None, ACC_DTYPE=TL_DTYPE[acc], BITS=bits, P=PIVOTS,
        L=len(LADDER), MAX_SWEEPS=refine_sweep_bound(bits), num_warps=warps, enable_fp_fusion=True,
    )
    return cutoff


@triton_op("triton_sampling_cutoff")
def _cutoff_op(logits: Tensor, params: Tensor, all_ties: bool,
               row_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(cutoff_launch(logits, params, all_ties, row_mask))


def sampling_cutoff(logits: Tensor, params: Tensor, rule: SupportRule, row_mask: Optional[Tensor] = None) -> Cutoff:
    """Per-row cutoff ``(tau, tie_end)`` of the sampling support of ``z = logits / temperature``.

    Args:
        logits: ``(N, V)`` or ``(B, T, V)``, fp32 / bf16 / fp16 / fp64, last dim contiguous.
        params: ``(NUM_SLOTS,)`` float64 on the logits' device; the ``INV_TEMPERATURE``, ``TOP_K``
            (0 = off), ``TOP_P`` (1 = off) and ``LOG_MIN_P`` (-inf = off) slots are read.
        rule: the compile-time part of the rule (:class:`SupportRule`).
        row_mask: flat ``(N,)`` or None; rows whose value is 0 are not read.

    Returns:
        :class:`Cutoff`, each field ``(N,)``: values fp32 (fp64 for fp64 logits), ``tie_end`` int32.
    """
    return Cutoff(*_cutoff_op(logits, params, bool(rule.all_ties), row_mask))
