"""Tiled linear log-softmax: per-token ``logp`` and entropy of ``hidden @ weight.T + bias``
with the ``(N, V)`` logits never written to memory.

Forward: each program owns ``BLOCK_N`` tokens and one contiguous split of the vocab tiles.
It builds each ``(BLOCK_N, BLOCK_V)`` logit tile on chip (``tl.dot`` over ``BLOCK_H``
slices of H), and carries an online logsumexp (running max, sum of exponentials, and the
sum of ``exp(z - max) * (z - max)`` for the entropy) plus the target logit. The per-split partials
``(S, N)`` are then merged in a fixed order, so the forward is deterministic.

Backward: one program per ``(token block, vocab tile)`` recomputes its logit tile, forms
``dlogits`` from the saved ``lse`` (and entropy), and adds ``dlogits @ W`` into ``dhidden``
and ``dlogits.T @ hidden`` into ``dweight`` (fp32 buffers, relaxed atomic adds --
``red.global.add.v4.f32`` with no fence: a reduction publishes nothing and is read only after
the kernel; the default acq_rel atomics put 12 GPU-scope fences in every H step. The summation
order over vocab tiles / token blocks is not fixed, so the last bits of the gradients can differ
from run to run. A deterministic reduction was not chosen: per-block partials of dweight would be
(N / BLOCK_N) x V x H fp32, 557 GB at N = 16k).

Cost model (static sm_90a report, predicted, not measured on GPU): a GEMM tile whose operands
stream from L2 does ``2 BN BV / ((BN + BV) e)`` FLOPs per L2 byte, and the backward reduces
``(N / BN) V H 4 + (V / BV) N H 4`` bytes in L2. At N = 16384, V = 151936, H = 3584 with 128 x 128
tiles that is 558 GB of reductions and ~305-525 ms fwd+bwd against ~135 ms for the chunked
strategy, which ``strategy="auto"`` therefore picks; the tiled strategy is for when its O(N)
memory, or gradient filtering, matters more than time. Optional gradient filtering skips a tile whose softmax is below
``filter_eps`` everywhere and that holds no target id (an approximation; off by default).

Memory beyond the inputs: ``O(N)`` floats in forward; in backward an fp32 ``(N, H)``
``dhidden`` accumulator and an fp32 ``(V, H)`` ``dweight`` accumulator (the weight gradient
itself when the weight is fp32).

Everything here is fp32 math. fp64 inputs are computed in fp32 (and their outputs returned
as fp64); bf16 / fp16 tiles go through the tensor cores with fp32 accumulation.

Both launches are ``torch.library.triton_op``s (``grpo_fused::triton_linear_tiled_fwd`` /
``_bwd``) and read the temperature from ``params`` (the float64 hyperparameter vector of
:class:`grpo_fused.semantics.Slot`), so torch.compile sees them as ops and a new temperature is data.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import P_INV_TEMPERATURE, interpreting, launchable, load_param, triton_op
from .splits import finish_partials, rescale_partials

Tensor = torch.Tensor

# Default softmax threshold of gradient filtering: a dlogit below 2**-12 of the largest one
# is under bf16's 2**-8 relative resolution with margin to spare for summing many of them.
DEFAULT_FILTER_EPS = 2.0**-12


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(
    hidden, weight, bias, rows64, row_ok, cols64, col_ok, H,
    stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``(hidden[rows] @ weight[cols].T + bias[cols]) / T`` in fp32, ``-inf`` past the vocab."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        x = tl.load(hidden + rows64[:, None] * stride_hn + hs[None, :] * stride_hh,
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(weight + cols64[:, None] * stride_wv + hs[None, :] * stride_wh,
                    mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temperature
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _token_block(ids, params_ptr, N, BLOCK_N: tl.constexpr):
    """This program's tokens (axis 0 of the grid): ``(rows64, row_ok, target id, 1 / temperature)``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    target = tl.load(ids + rows64, mask=row_ok, other=-1).to(tl.int64)
    return rows64, row_ok, target, load_param(params_ptr, P_INV_TEMPERATURE, tl.float32)


@triton.jit
def _linear_lse_fwd_kernel(
    # (A kernel parameter may not be called ``params``: Triton's launch binder has a local of that
    # name, and the launch fails on the GPU with "failed to specialize argument of type: dict".)
    hidden, weight, bias, ids, params_ptr,  # (N, H), (V, H), (V,) or None, (N,), (NUM_SLOTS,) float64
    part_max, part_sum, part_pz, part_target,  # (S, N) fp32 each; part_pz None without entropy
    N, V, H, tiles_per_split,
    stride_hn, stride_hh, stride_wv, stride_wh,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    rows64, row_ok, target, inv_temperature = _token_block(ids, params_ptr, N, BLOCK_N)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_pz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    num_tiles = tl.cdiv(V, BLOCK_V)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    for tile in range(tile_lo, tile_hi):
        cols64 = tl.arange(0, BLOCK_V).to(tl.int64) + tile * BLOCK_V
        col_ok = cols64 < V
        z = _logit_tile(hidden, weight, bias, rows64, row_ok, cols64, col_ok, H,
                        stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
                        BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, DOT_PRECISION)
        new_max = tl.maximum(run_max, tl.max(z, 1))
        # A row whose logits so far are all -inf: shift by 0, not -inf, so that
        # exp(-inf - shift) is 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        e = tl.exp(z - shift[:, None])
        if HAS_ENTROPY:
            # run_pz = sum e * (z - shift), kept relative to the running shift: the entropy is
            # then log(sum) - run_pz / sum, with no cancellation of two numbers of the size of z.
            # (z - shift) * e would be -inf * 0 = NaN on -inf columns; they contribute 0.
            old_shift = tl.where(run_max == float("-inf"), 0.0, run_max)
            run_pz = rescale * (run_pz + (old_shift - shift) * run_sum)
            run_pz += tl.sum(e * tl.where(e > 0, z - shift[:, None], 0.0), 1)
        run_sum = run_sum * rescale + tl.sum(e, 1)
        run_max = new_max
        target_logit += tl.sum(tl.where(cols64[None, :] == target[:, None], z, 0.0), 1)

    out = split.to(tl.int64) * N + rows64
    tl.store(part_max + out, run_max, mask=row_ok)
    tl.store(part_sum + out, run_sum, mask=row_ok)
    tl.store(part_target + out, target_logit, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(part_pz + out, run_pz, mask=row_ok)


@triton.jit
def _linear_lse_bwd_kernel(
    hidden, weight, bias, ids, params_ptr, lse, entropy, dlogps, dentropy,  # (N, H), (V, H), (V,), (N,), params, (N,) x4
    dhidden, dweight, dbias,  # fp32 accumulators (N, H), (V, H), (V,); None when not needed
    N, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DLOGPS: tl.constexpr, HAS_DENTROPY: tl.constexpr,
    NEED_DHIDDEN: tl.constexpr, NEED_DWEIGHT: tl.constexpr, NEED_DBIAS: tl.constexpr,
    FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(1)
    rows64, row_ok, target, inv_temperature = _token_block(ids, params_ptr, N, BLOCK_N)
    cols64 = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols64 < V
    row_lse = tl.load(lse + rows64, mask=row_ok, other=0.0)

    z = _logit_tile(hidden, weight, bias, rows64, row_ok, cols64, col_ok, H,
                    stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
                    BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, DOT_PRECISION)
    # z is -inf past the vocab, so p is 0 there without a mask; rows past N are zeroed.
    p = tl.where(row_ok[:, None], tl.exp(z - row_lse[:, None]), 0.0)
    is_target = (cols64[None, :] == target[:, None]) & row_ok[:, None]

    keep = True
    if FILTER:
        keep = (tl.max(tl.max(p, 1), 0) >= filter_eps) | (tl.max(tl.max(is_target.to(tl.int32), 1), 0) > 0)
    if keep:
        if HAS_DLOGPS:
            g = tl.load(dlogps + rows64, mask=row_ok, other=0.0)
        else:
            g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        # dz = g * (onehot - p) - g_H * p * (z - (lse - H)) = g * onehot - p * coef: one tile of
        # coefficients instead of three live tiles (the 128 x 128 tile fits its registers).
        coef = g[:, None]
        if HAS_DENTROPY:
            # d entropy / dz_j = -p_j * (z_j - sum_k p_k z_k) and sum_k p_k z_k = lse - entropy. z is
            # floored at lse - 200, where p = exp(z - lse) is already exactly 0 in fp32, so that a
            # -inf logit (past the vocab, a -inf bias) gives 0 * finite, never 0 * -inf = NaN.
            g_ent = tl.load(dentropy + rows64, mask=row_ok, other=0.0)
            row_ent = tl.load(entropy + rows64, mask=row_ok, other=0.0)
            z_floor = tl.maximum(z, (row_lse - 200.0)[:, None])
            coef = coef + g_ent[:, None] * (z_floor - (row_lse - row_ent)[:, None])
        dlogits = (tl.where(is_target, g[:, None], 0.0) - p * coef) * inv_temperature
        if NEED_DBIAS:
            tl.atomic_add(dbias + cols64, tl.sum(dlogits, 0), mask=col_ok, sem="relaxed")
        dlogits_in = dlogits.to(hidden.dtype.element_ty)
        # Two H loops, not one: only one gradient accumulator is live at a time (registers), and
        # each loop loads only its own operand, so no byte is read twice. The reductions into
        # dhidden / dweight are relaxed atomics (red.global.add, no fences): they publish nothing
        # and are read only after the kernel ends.
        if NEED_DHIDDEN:
            for h0 in range(0, H, BLOCK_H):
                hs = h0 + tl.arange(0, BLOCK_H)
                h_ok = hs < H
                w = tl.load(weight + cols64[:, None] * stride_wv + hs[None, :] * stride_wh,
                            mask=col_ok[:, None] & h_ok[None, :], other=0.0)
                dx = tl.dot(dlogits_in, w, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
                tl.atomic_add(dhidden + rows64[:, None] * H + hs[None, :], dx,
                              mask=row_ok[:, None] & h_ok[None, :], sem="relaxed")
        if NEED_DWEIGHT:
            dlogits_t = tl.trans(dlogits_in)
            for h0 in range(0, H, BLOCK_H):
                hs = h0 + tl.arange(0, BLOCK_H)
                h_ok = hs < H
                x = tl.load(hidden + rows64[:, None] * stride_hn + hs[None, :] * stride_hh,
                            mask=row_ok[:, None] & h_ok[None, :], other=0.0)
                dw = tl.dot(dlogits_t, x, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
                tl.atomic_add(dweight + cols64[:, None] * H + hs[None, :], dw,
                              mask=col_ok[:, None] & h_ok[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TiledConfig:
    """Launch configuration of the tiled kernels.

    Attributes:
        block_n / block_v / block_h: tile sizes (powers of two, >= 16 for ``tl.dot``).
        bwd_block_h: the backward's H step (None: ``block_h``); the backward holds a gradient
            accumulator and the dlogits tile besides its logit tile, so a shorter step keeps it
            out of local memory.
        num_splits: vocab splits of the forward; None picks enough to fill the GPU.
        num_warps / num_stages: passed to the launches.

    The defaults are the bf16 / fp16 config of :func:`default_config` but for its backward's
    32-wide H step.
    """

    block_n: int = 128
    block_v: int = 128
    block_h: int = 64
    num_splits: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 3
    bwd_block_h: Optional[int] = None


# bf16 / fp16 on sm_90: a 128 x 128 logit tile over two warpgroups (each wgmma m64n128k16 from
# shared memory), 3 stages, K = 64 a stage in forward and 32 in backward. Static report (sm_90a,
# V = 151936, H = 3584): forward 185 registers, 96 KB smem; backward 214 registers (254 with bias,
# entropy term and filtering), 0 spills -- also at ragged N and V, where K = 64 spilled 44-68 bytes.
# Against 64 x 128 it halves the logits-tile operand traffic per FLOP in the forward and the L2
# reductions per FLOP in the backward (both scale as (BN + BV) / (BN * BV)).
GPU_CONFIG = TiledConfig(bwd_block_h=32)
# fp32 / fp64 operands run ``tl.dot`` in "ieee" fp32 on the FMA units (no tensor cores): per-thread
# outer products need registers, so 64 x 128 x 32 with one stage (182 / 196 registers, 0 spills;
# 64 x 128 x 64 spilled 340 / 552 bytes in the backward).
GPU_CONFIG_FP32 = TiledConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=1)


def default_config(device: torch.device, dtype: Optional[torch.dtype] = None) -> TiledConfig:
    """A fixed config for operands of ``dtype`` (default bf16 / fp16). Under the CPU interpreter
    the tiles are small, so that the tests' tiny ragged shapes still cover several tiles and every
    masking path; CPU tensors whose launches are recorded for an ahead-of-time compile get the
    GPU config."""
    if device.type == "cpu" and interpreting():
        return TiledConfig(block_n=16, block_v=64, block_h=16, num_splits=2, num_warps=1, num_stages=1)
    return GPU_CONFIG_FP32 if dtype in (torch.float32, torch.float64) else GPU_CONFIG


def _kernel_operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """The operands as the kernels read them, and the ``tl.dot`` precision for them."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # a mixed pair costs one cast
    if dtype == torch.float64:
        # fp64 runs in fp32: tl.dot has no portable fp64 path.
        dtype = torch.float32
    if interpreting():
        # The interpreter stores bf16 as uint16 and its tl.dot on bf16 is wrong: fp32 there.
        dtype = torch.float32
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    if bias is not None and (bias.dtype == torch.float64 or interpreting()):
        bias = bias.float()
    return hidden, weight, bias, precision


def _tiled_fwd_launch(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, params: Tensor,
                      compute_entropy: bool, config: TiledConfig) -> Tensor:
    """One launch of the forward kernel: the per-split partials ``(3 or 4, S, N)`` (max, sum,
    target, entropy partial)."""
    N, H = hidden.shape
    V = weight.shape[0]
    hidden_k, weight_k, bias_k, precision = _kernel_operands(hidden, weight, bias)
    num_tiles = triton.cdiv(V, config.block_v)
    n_blocks = triton.cdiv(N, config.block_n)
    num_splits = config.num_splits
    if num_splits is None:
        # Split the vocab until there are about two programs per SM.
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 1
        num_splits = max(1, min(num_tiles, triton.cdiv(2 * sms, n_blocks)))
    num_splits = max(1, min(num_splits, num_tiles))
    tiles_per_split = triton.cdiv(num_tiles, num_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)
    part = torch.empty((4 if compute_entropy else 3, num_splits, N), dtype=torch.float32, device=hidden.device)
    if N > 0:
        launchable(_linear_lse_fwd_kernel)[(n_blocks, num_splits)](
            hidden_k, weight_k, bias_k, ids.contiguous(), params,
            part[0], part[1], part[3] if compute_entropy else None, part[2],
            N, V, H, tiles_per_split,
            hidden_k.stride(0), hidden_k.stride(1), weight_k.stride(0), weight_k.stride(1),
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h,
            HAS_BIAS=bias_k is not None, HAS_ENTROPY=compute_entropy, DOT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
        )
    return part


def _tiled_bwd_launch(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ids: Tensor,
    params: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    dlogps: Optional[Tensor],
    dentropy: Optional[Tensor],
    filter_eps: Optional[float],
    needs: Tuple[bool, bool, bool],
    config: TiledConfig,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """One launch of the backward kernel into fp32 accumulators ``(dhidden, dweight, dbias)``."""
    N, H = hidden.shape
    V = weight.shape[0]
    hidden_k, weight_k, bias_k, precision = _kernel_operands(hidden, weight, bias)
    need_dhidden, need_dweight, need_dbias = needs
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dhidden = torch.zeros((N, H), **f32) if need_dhidden else None
    dweight = torch.zeros((V, H), **f32) if need_dweight else None
    dbias = torch.zeros((V,), **f32) if need_dbias and bias is not None else None
    if dlogps is not None:
        dlogps = dlogps.float().contiguous()
    if dentropy is not None:
        dentropy = dentropy.float().contiguous()
        entropy = entropy.float().contiguous()
    if N > 0 and (dlogps is not None or dentropy is not None) and (need_dhidden or need_dweight or dbias is not None):
        grid = (triton.cdiv(N, config.block_n), triton.cdiv(V, config.block_v))
        launchable(_linear_lse_bwd_kernel)[grid](
            hidden_k, weight_k, bias_k, ids.contiguous(), params, lse, entropy, dlogps, dentropy,
            dhidden, dweight, dbias,
            N, V, H,
            hidden_k.stride(0), hidden_k.stride(1), weight_k.stride(0), weight_k.stride(1),
            0.0 if filter_eps is None else float(filter_eps),
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h,
            HAS_BIAS=bias_k is not None, HAS_DLOGPS=dlogps is not None, HAS_DENTROPY=dentropy is not None,
            NEED_DHIDDEN=dhidden is not None, NEED_DWEIGHT=dweight is not None, NEED_DBIAS=dbias is not None,
            FILTER=filter_eps is not None, DOT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
        )
    return dhidden, dweight, dbias


# --------------------------------------------------------------------------------------
# torch.library ops (a TiledConfig travels as its fields: an op takes no dataclass).
# --------------------------------------------------------------------------------------


def _config_of(block_n: int, block_v: int, block_h: int, num_splits: int, num_warps: int, num_stages: int) -> TiledConfig:
    return TiledConfig(block_n, block_v, block_h, num_splits if num_splits > 0 else None, num_warps, num_stages)


def _config_fields(config: TiledConfig) -> Tuple[int, ...]:
    return (config.block_n, config.block_v, config.block_h, config.num_splits or 0, config.num_warps,
            config.num_stages)


@triton_op("triton_linear_tiled_fwd")
def _tiled_fwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, params: Tensor, compute_entropy: bool,
    block_n: int, block_v: int, block_h: int, num_splits: int, num_warps: int, num_stages: int,
) -> Tensor:
    return _tiled_fwd_launch(hidden, weight, bias, ids, params, compute_entropy,
                             _config_of(block_n, block_v, block_h, num_splits, num_warps, num_stages))


@triton_op("triton_linear_tiled_bwd")
def _tiled_bwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, params: Tensor, lse: Tensor,
    entropy: Optional[Tensor], dlogps: Optional[Tensor], dentropy: Optional[Tensor], filter_eps: float,
    need_dhidden: bool, need_dweight: bool, need_dbias: bool,
    block_n: int, block_v: int, block_h: int, num_splits: int, num_warps: int, num_stages: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    dhidden, dweight, dbias = _tiled_bwd_launch(
        hidden, weight, bias, ids, params, lse, entropy, dlogps, dentropy, filter_eps if filter_eps > 0 else None,
        (need_dhidden, need_dweight, need_dbias), _config_of(block_n, block_v, block_h, num_splits, num_warps, num_stages),
    )
    # An op returns tensors only, none aliasing another: a fresh empty one stands for "not computed".
    def given(t):
        return hidden.new_empty(0, dtype=torch.float32) if t is None else t

    return given(dhidden), given(dweight), given(dbias)


@dataclasses.dataclass(frozen=True)
class Tiled:
    """The tiled strategy of :func:`grpo_fused.kernels.linear_log_softmax.linear_log_softmax`.

    Attributes:
        filter_eps: gradient filtering threshold (approximate gradients); None (default) = off.
            :data:`DEFAULT_FILTER_EPS` is a sensible value for bf16 training.
        config: launch config; None picks :func:`default_config`.
    """

    filter_eps: Optional[float] = None
    config: Optional[TiledConfig] = None

    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, params: Tensor,
                compute_entropy: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(logps, lse, entropy_or_None)``, each ``(N,)`` fp32 (of ``z = logits / temperature``), from
        hidden ``(N, H)`` (fp32 / bf16 / fp16 / fp64, any strides), weight ``(V, H)``, bias ``(V,)`` or
        None, ids ``(N,)`` and the ``(NUM_SLOTS,)`` float64 ``params`` on the device."""
        cfg = self.config or default_config(hidden.device, torch.promote_types(hidden.dtype, weight.dtype))
        part = _tiled_fwd_op(hidden, weight, bias, ids, params, bool(compute_entropy), *_config_fields(cfg))
        # Merge the splits in index order (deterministic): O(S * N), no pass over V.
        part_max, part_sum, part_target = part[0], part[1], part[2]
        row_max = part_max.amax(0)
        sums, pz = rescale_partials(part_max, part_sum, part[3] if compute_entropy else None, row_max)
        lse, entropy = finish_partials(row_max, sums.sum(0), None if pz is None else pz.sum(0))
        # An id outside [0, V) matches no column (nothing is read for it): its logp is -inf.
        in_vocab = (ids >= 0) & (ids < weight.shape[0])
        logps = torch.where(in_vocab, part_target.sum(0) - lse, torch.full_like(lse, float("-inf")))
        return logps, lse, entropy

    def backward(self, hidden, weight, bias, ids, params, lse, entropy, dlogps, dentropy, needs):
        """``(dhidden, dweight, dbias)`` in the dtypes of hidden, weight and bias (None where ``needs``
        says no, and dbias without a bias), recomputing the logit tiles; ``lse`` / ``entropy`` from
        :meth:`forward`, ``dlogps`` / ``dentropy`` ``(N,)`` or None (zero). With ``filter_eps`` a
        tile whose softmax is below it everywhere and that holds no target is skipped."""
        cfg = self.config or default_config(hidden.device, torch.promote_types(hidden.dtype, weight.dtype))
        need_dbias = needs[2] and bias is not None
        cfg = dataclasses.replace(cfg, block_h=cfg.bwd_block_h or cfg.block_h)
        dhidden, dweight, dbias = _tiled_bwd_op(
            hidden, weight, bias, ids, params, lse, entropy, dlogps, dentropy,
            0.0 if self.filter_eps is None else float(self.filter_eps), needs[0], needs[1], need_dbias,
            *_config_fields(cfg),
        )
        return (
            dhidden.to(hidden.dtype) if needs[0] else None,
            dweight.to(weight.dtype) if needs[1] else None,
            dbias.to(bias.dtype) if need_dbias else None,
        )
