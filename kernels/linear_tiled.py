"""Tiled linear log-softmax: per-token ``logp`` and entropy of ``hidden @ weight.T + bias``
with the ``(N, V)`` logits never written to memory.

Forward: each program owns ``BLOCK_N`` tokens and one contiguous split of the vocab tiles.
It builds each ``(BLOCK_N, BLOCK_V)`` logit tile on chip (``tl.dot`` over ``BLOCK_H``
slices of H), and carries an online logsumexp (running max, sum of exponentials, and the
sum of ``exp(z - max) * (z - max)`` for the entropy) plus the target logit. The per-split partials
``(S, N)`` are then merged in a fixed order, so the forward is deterministic.

Backward: one program per ``(token block, vocab tile)`` recomputes its logit tile, forms
``dlogits`` from the saved ``lse`` (and entropy), and adds ``dlogits @ W`` into ``dhidden``
and ``dlogits.T @ hidden`` into ``dweight`` (fp32 buffers, atomic adds: the summation order
over vocab tiles / token blocks is not fixed, so the last bits of the gradients can differ
from run to run). Optional gradient filtering skips a tile whose softmax is below
``filter_eps`` everywhere and that holds no target id (an approximation; off by default).

Memory beyond the inputs: ``O(N)`` floats in forward; in backward an fp32 ``(N, H)``
``dhidden`` accumulator and an fp32 ``(V, H)`` ``dweight`` accumulator (the weight gradient
itself when the weight is fp32).

Everything here is fp32 math. fp64 inputs are computed in fp32 (and their outputs returned
as fp64); bf16 / fp16 tiles go through the tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Default softmax threshold of gradient filtering: a dlogit below 2**-12 of the largest one
# is under bf16's 2**-8 relative resolution with margin to spare for summing many of them.
DEFAULT_FILTER_EPS = 2.0**-12


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias"] is not None,
    "HAS_ENTROPY": lambda args: args["part_pz"] is not None,
})
@triton.jit
def _linear_lse_fwd_kernel(
    hidden, weight, bias, ids,  # (N, H), (V, H), (V,) or None, (N,)
    part_max, part_sum, part_pz, part_target,  # (S, N) fp32 each; part_pz None without entropy
    N, V, H, tiles_per_split,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    target = tl.load(ids + rows64, mask=row_ok, other=-1).to(tl.int64)

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


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias"] is not None,
    "HAS_DLOGPS": lambda args: args["dlogps"] is not None,
    "HAS_DENTROPY": lambda args: args["dentropy"] is not None,
    "NEED_DHIDDEN": lambda args: args["dhidden"] is not None,
    "NEED_DWEIGHT": lambda args: args["dweight"] is not None,
    "NEED_DBIAS": lambda args: args["dbias"] is not None,
})
@triton.jit
def _linear_lse_bwd_kernel(
    hidden, weight, bias, ids, lse, entropy, dlogps, dentropy,  # (N, H), (V, H), (V,), (N,) x5
    dhidden, dweight, dbias,  # fp32 accumulators (N, H), (V, H), (V,); None when not needed
    N, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temperature, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DLOGPS: tl.constexpr, HAS_DENTROPY: tl.constexpr,
    NEED_DHIDDEN: tl.constexpr, NEED_DWEIGHT: tl.constexpr, NEED_DBIAS: tl.constexpr,
    FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    cols64 = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols64 < V
    target = tl.load(ids + rows64, mask=row_ok, other=-1).to(tl.int64)
    row_lse = tl.load(lse + rows64, mask=row_ok, other=0.0)

    z = _logit_tile(hidden, weight, bias, rows64, row_ok, cols64, col_ok, H,
                    stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature,
                    BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, DOT_PRECISION)
    valid = row_ok[:, None] & col_ok[None, :] & (z > float("-inf"))
    p = tl.where(valid, tl.exp(z - row_lse[:, None]), 0.0)
    is_target = (cols64[None, :] == target[:, None]) & row_ok[:, None]

    keep = True
    if FILTER:
        keep = (tl.max(tl.max(p, 1), 0) >= filter_eps) | (tl.max(tl.max(is_target.to(tl.int32), 1), 0) > 0)
    if keep:
        dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        if HAS_DLOGPS:
            g = tl.load(dlogps + rows64, mask=row_ok, other=0.0)
            dz += g[:, None] * (is_target.to(tl.float32) - p)
        if HAS_DENTROPY:
            # d entropy / dz_j = -p_j * (z_j - sum_k p_k z_k) and sum_k p_k z_k = lse - entropy.
            g_ent = tl.load(dentropy + rows64, mask=row_ok, other=0.0)
            row_ent = tl.load(entropy + rows64, mask=row_ok, other=0.0)
            centered = tl.where(valid, z - (row_lse - row_ent)[:, None], 0.0)
            dz -= g_ent[:, None] * p * centered
        dlogits = tl.where(valid, dz * inv_temperature, 0.0)
        if NEED_DBIAS:
            tl.atomic_add(dbias + cols64, tl.sum(dlogits, 0), mask=col_ok)
        dlogits_in = dlogits.to(hidden.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            if NEED_DHIDDEN:
                w = tl.load(weight + cols64[:, None] * stride_wv + hs[None, :] * stride_wh,
                            mask=col_ok[:, None] & h_ok[None, :], other=0.0)
                dx = tl.dot(dlogits_in, w, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
                tl.atomic_add(dhidden + rows64[:, None] * H + hs[None, :], dx,
                              mask=row_ok[:, None] & h_ok[None, :])
            if NEED_DWEIGHT:
                x = tl.load(hidden + rows64[:, None] * stride_hn + hs[None, :] * stride_hh,
                            mask=row_ok[:, None] & h_ok[None, :], other=0.0)
                dw = tl.dot(tl.trans(dlogits_in), x, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
                tl.atomic_add(dweight + cols64[:, None] * H + hs[None, :], dw,
                              mask=col_ok[:, None] & h_ok[None, :])


# --------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TiledConfig:
    """Launch configuration of the tiled kernels.

    Attributes:
        block_n / block_v / block_h: tile sizes (powers of two, >= 16 for ``tl.dot``).
        num_splits: vocab splits of the forward; None picks enough to fill the GPU.
        num_warps / num_stages: passed to the launches.
    """

    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    num_splits: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 2


def default_config(device: torch.device) -> TiledConfig:
    """A fixed config per device type. Under the CPU interpreter the tiles are small, so that
    the tests' tiny ragged shapes still cover several tiles and every masking path."""
    if device.type == "cpu":
        return TiledConfig(block_n=16, block_v=64, block_h=16, num_splits=2, num_warps=1, num_stages=1)
    return TiledConfig()


def _kernel_operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """The operands as the kernels read them, and the ``tl.dot`` precision for them."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # a mixed pair costs one cast
    if dtype == torch.float64:
        # fp64 runs in fp32: tl.dot has no portable fp64 path.
        dtype = torch.float32
    if _interpreting():
        # The interpreter stores bf16 as uint16 and its tl.dot on bf16 is wrong: fp32 there.
        dtype = torch.float32
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    if bias is not None and (bias.dtype == torch.float64 or _interpreting()):
        bias = bias.float()
    return hidden, weight, bias, precision


def linear_lse_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ids: Tensor,
    temperature: float,
    compute_entropy: bool,
    config: Optional[TiledConfig] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Forward of the tiled strategy.

    Args:
        hidden: ``(N, H)`` fp32 / bf16 / fp16 / fp64, any strides. weight: ``(V, H)``, any strides.
        bias: ``(V,)`` or None. ids: ``(N,)`` integer in ``[0, V)``. temperature: > 0.
        compute_entropy: also return the entropy.

    Returns:
        ``(logps, lse, entropy_or_None)``, each ``(N,)`` fp32 (of ``z = logits / temperature``).
    """
    cfg = config or default_config(hidden.device)
    N, H = hidden.shape
    V = weight.shape[0]
    hidden_k, weight_k, bias_k, precision = _kernel_operands(hidden, weight, bias)
    ids = ids.contiguous()
    num_tiles = triton.cdiv(V, cfg.block_v)
    n_blocks = triton.cdiv(N, cfg.block_n)
    num_splits = cfg.num_splits
    if num_splits is None:
        # Split the vocab until there are about two programs per SM.
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 1
        num_splits = max(1, min(num_tiles, triton.cdiv(2 * sms, n_blocks)))
    num_splits = max(1, min(num_splits, num_tiles))
    tiles_per_split = triton.cdiv(num_tiles, num_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)

    part = torch.empty((4 if compute_entropy else 3, num_splits, N), dtype=torch.float32, device=hidden.device)
    part_max, part_sum, part_target = part[0], part[1], part[2]
    part_pz = part[3] if compute_entropy else None
    if N > 0:
        _linear_lse_fwd_kernel[(n_blocks, num_splits)](
            hidden_k, weight_k, bias_k, ids,
            part_max, part_sum, part_pz, part_target,
            N, V, H, tiles_per_split,
            hidden_k.stride(0), hidden_k.stride(1), weight_k.stride(0), weight_k.stride(1),
            1.0 / temperature,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # Merge the splits in index order (deterministic): O(S * N), no pass over V.
    row_max = part_max.amax(0)
    shift = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    scale = torch.exp(part_max - shift)
    total = (part_sum * scale).sum(0)
    lse = shift + torch.log(total)
    logps = part_target.sum(0) - lse
    entropy = None
    if compute_entropy:
        # Each split's sum e * (z - shift_s), moved to the common shift.
        split_shift = torch.where(part_max == float("-inf"), torch.zeros_like(part_max), part_max)
        centered = (scale * (part_pz + (split_shift - shift) * part_sum)).sum(0)
        entropy = torch.log(total) - centered / total
    return logps, lse, entropy


def linear_lse_bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ids: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    dlogps: Optional[Tensor],
    dentropy: Optional[Tensor],
    temperature: float,
    filter_eps: Optional[float] = None,
    config: Optional[TiledConfig] = None,
    needs: Tuple[bool, bool, bool] = (True, True, True),
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward of the tiled strategy: recomputes the logit tiles.

    Args:
        hidden, weight, bias, ids, temperature: as in :func:`linear_lse_fwd`.
        lse / entropy: ``(N,)`` fp32 from the forward (entropy needed only with ``dentropy``).
        dlogps / dentropy: ``(N,)`` gradients of the outputs, or None (zero).
        filter_eps: skip tiles whose softmax is below it everywhere and that hold no target
            (gradient filtering, an approximation); None (default) computes every tile.
        needs: which of ``(dhidden, dweight, dbias)`` to compute (a frozen lm_head skips its
            fp32 accumulator and half the backward GEMM work).

    Returns:
        ``(dhidden, dweight, dbias)`` in the dtypes of hidden, weight and bias; None where not
        needed (dbias also without a bias).
    """
    cfg = config or default_config(hidden.device)
    N, H = hidden.shape
    V = weight.shape[0]
    hidden_k, weight_k, bias_k, precision = _kernel_operands(hidden, weight, bias)
    ids = ids.contiguous()
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
        grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v))
        _linear_lse_bwd_kernel[grid](
            hidden_k, weight_k, bias_k, ids, lse, entropy, dlogps, dentropy,
            dhidden, dweight, dbias,
            N, V, H,
            hidden_k.stride(0), hidden_k.stride(1), weight_k.stride(0), weight_k.stride(1),
            1.0 / temperature, 0.0 if filter_eps is None else float(filter_eps),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            FILTER=filter_eps is not None, DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return (
        None if dhidden is None else dhidden.to(hidden.dtype),
        None if dweight is None else dweight.to(weight.dtype),
        None if dbias is None else dbias.to(bias.dtype),
    )


# --------------------------------------------------------------------------------------
# Autograd function and entry point.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TiledState:
    temperature: float
    filter_eps: Optional[float]
    config: Optional[TiledConfig]
    has_bias: bool


class LinearLogSoftmaxTiled(torch.autograd.Function):
    """``(hidden (N, H), weight (V, H), bias, ids (N,)) -> (logps (N,), entropy (N,) or None)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, compute_entropy, filter_eps, config):
        logps, lse, entropy = linear_lse_fwd(hidden, weight, bias, ids, temperature, compute_entropy, config)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, entropy)
        ctx.state = _TiledState(temperature, filter_eps, config, bias is not None)
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return logps.to(out_dtype), None if entropy is None else entropy.to(out_dtype)

    @staticmethod
    def backward(ctx, dlogps, dentropy):
        hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
        s: _TiledState = ctx.state
        dhidden, dweight, dbias = linear_lse_bwd(
            hidden, weight, bias, ids, lse, entropy, dlogps, dentropy, s.temperature, s.filter_eps, s.config,
            needs=tuple(ctx.needs_input_grad[:3]),
        )
        return dhidden, dweight, dbias, None, None, None, None, None


def linear_log_softmax_tiled(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    bias: Optional[Tensor] = None,
    compute_entropy: bool = False,
    filter_eps: Optional[float] = None,
    config: Optional[TiledConfig] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-token log-prob (and entropy) of ``hidden @ weight.T + bias`` over the vocab, tiled.

    Args:
        hidden: ``(..., H)`` float. weight: ``(V, H)``. ids: ``(...)`` integer in ``[0, V)``.
        temperature: divides the logits (default 1.0). bias: ``(V,)`` or None.
        compute_entropy: also return the entropy (default False).
        filter_eps: gradient filtering threshold (approximate gradients); None (default) = off.
            :data:`DEFAULT_FILTER_EPS` is a sensible value for bf16 training.
        config: launch config; None picks :func:`default_config`.

    Returns:
        ``(logps, entropy_or_None)`` of shape ``(...)``, fp32 (fp64 for fp64 hidden),
        differentiable with respect to hidden, weight and bias.
    """
    lead = hidden.shape[:-1]
    logps, entropy = LinearLogSoftmaxTiled.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, ids.reshape(-1),
        float(temperature), bool(compute_entropy), filter_eps, config,
    )
    return logps.view(lead), None if entropy is None else entropy.view(lead)
