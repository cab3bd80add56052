"""grpo_fused.distributed against the single-process reference on the full vocab and full batch.

Multi-process cases run inside one spawn of 4 processes (gloo on CPU, file:// rendezvous in a
temp dir), on a 2-process subgroup and then on the 4-process default group: every rank builds
the same full tensors from a fixed seed, takes its vocab shard (vocab parallel) or its slice of
the batch (data parallel), and compares its loss and gradients with :mod:`grpo_fused.reference`
run on the whole thing in float64.
Each case is reported as its own test. In-process tests cover the single-process path
(torch.distributed not initialized) and the local input checks.
"""

import datetime
import json
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_fused import GRPOConfig, reference
from grpo_fused import distributed as gd
from grpo_fused.semantics import compute_dtype

from tolerance import ULPS_GRAD, ULPS_LOSS, ULPS_VALUE, assert_close_to_truth, dlogits_scale, logit_row_scale

WORLD_SIZES = (2, 4)
# V = 257 is prime: no world size divides it, so shards are ragged (129/128, 65/64/64/64).
V, H = 257, 8
# B = 4 sequences of T = 5 (N = 20 tokens); the last sequence is fully masked.
B, T = 4, 5

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

CASES = {}


def case(fn):
    CASES[fn.__name__[len("case_"):]] = fn
    return fn


# ---------------------------------------------------------------- shared builders


def _shard(vocab, world, rank, layout="even"):
    """``(start, size)`` of ``rank``'s contiguous vocab slice."""
    if layout == "even":
        sizes = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    else:  # "skewed": rank 0 holds almost everything, the others 7 columns each
        sizes = [vocab - 7 * (world - 1)] + [7] * (world - 1)
    return sum(sizes[:rank]), sizes[rank]


def _loss_inputs(logits_full, ids, seed, temperature, advantage_shape="B", with_is=False):
    """Advantages, mask, old / ref log-probs near the current policy (ratios around 1, some clipped)."""
    g = torch.Generator().manual_seed(seed)
    logps, _ = reference.selective_log_softmax(logits_full.double(), ids, temperature)
    old = logps + 0.3 * torch.randn(logps.shape, generator=g, dtype=torch.float64)
    ref = logps + 0.5 * torch.randn(logps.shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(logps.shape, generator=g) > 0.3).to(torch.float64)
    mask[0, 0] = 1.0
    mask[-1] = 0.0  # a sequence with no token
    shapes = {"B": (logps.shape[0],), "B1": (logps.shape[0], 1), "BT": tuple(logps.shape)}
    adv = torch.randn(shapes[advantage_shape], generator=g, dtype=torch.float64)
    is_weights = (0.5 + torch.rand(logps.shape, generator=g, dtype=torch.float64)) if with_is else None
    return dict(advantages=adv, completion_mask=mask, old_logps=old, ref_logps=ref, is_weights=is_weights)


def _full_logits(seed, dtype=torch.float64, extreme=False):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    if extreme:
        # Masked vocab: the top 40 columns are -inf on the first two sequences (a whole shard row
        # when the layout is skewed), plus scattered -inf columns; never the target's column.
        logits[:2, :, V - 40:] = -float("inf")
        logits[:, :, 3::17] = -float("inf")
        ids[:2] = ids[:2] % (V - 40)
        ids = torch.where(ids % 17 == 3, ids + 1, ids)
        logits[2] += 1.0e4  # very large logits on one sequence
    return logits.to(dtype), ids


def _assert_outputs(out, truth, eager, logits, temperature, loss_scale=None):
    """Loss, metrics, logps and entropy against the float64 truth, with eager's error (None where
    eager is the truth's own computation); logps and entropy per token (logit_row_scale), the
    loss and metrics on ``loss_scale`` (default ``max(1, |value|)``)."""
    def field(o, name):
        return None if o is None else getattr(o, name)

    assert_close_to_truth(out.loss, truth.loss, field(eager, "loss"), ulps=ULPS_LOSS, scale=loss_scale, what="loss")
    scale = logit_row_scale(logits, temperature)
    assert_close_to_truth(out.logps, truth.logps, field(eager, "logps"), ulps=ULPS_VALUE, scale=scale, what="logps")
    if truth.entropy is None:
        assert out.entropy is None
    else:
        assert_close_to_truth(out.entropy, truth.entropy, field(eager, "entropy"), ulps=ULPS_VALUE, scale=scale,
                              what="entropy")
    assert out.metrics.keys() == truth.metrics.keys(), (sorted(out.metrics), sorted(truth.metrics))
    for k in truth.metrics:
        assert_close_to_truth(out.metrics[k], truth.metrics[k], None if eager is None else eager.metrics[k],
                              ulps=ULPS_LOSS, scale=loss_scale, what=f"metric {k}")


def _quantized(inputs, dtype):
    """The float inputs rounded to the compute dtype of ``dtype`` logits (as every backend reads
    them), back in float64: the truth sees the inputs the computation sees."""
    acc = compute_dtype(dtype)
    return {k: v.to(acc).double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def _check_logits_loss(rank, world, group, config, *, seed=0, dtype=torch.float64, layout="even", explicit_start=False,
                       advantage_shape="B", with_is=False, extreme=False, normalizers=None, chunk_size=None):
    full, ids = _full_logits(seed, dtype, extreme)
    inputs = _loss_inputs(full, ids, seed + 1, config.temperature, advantage_shape, with_is)
    start, size = _shard(V, world, rank, layout)
    shard = full[..., start:start + size].clone().requires_grad_()
    before = shard.detach().clone()
    out = gd.vocab_parallel_grpo_loss(
        shard, ids, vocab_start=start if explicit_start else None, process_group=group, config=config,
        chunk_size=chunk_size, **inputs, **(normalizers or {})
    )
    out.loss.backward()
    truth_leaf = full.to(torch.float64, copy=True)
    if extreme:
        # The ground truth for the +1e4 sequence: the same distribution shifted back (exact in
        # fp64), where the reference's lse - sum(p z) does not cancel two numbers near 1e4.
        truth_leaf[2] -= 1.0e4
    truth_leaf.requires_grad_()
    want = reference.grpo_loss(truth_leaf, ids, config=config, **_quantized(inputs, dtype), **(normalizers or {}))
    want.loss.backward()
    eager = eager_grad = None
    if dtype != torch.float64:  # eager PyTorch in the logits' dtype (fp32 token math), on the full vocab
        eager_leaf = full.clone().requires_grad_()
        eager = reference.grpo_loss(eager_leaf, ids, config=config, **inputs, **(normalizers or {}))
        eager.loss.backward()
        eager_grad = eager_leaf.grad[..., start:start + size]
    # Per token: z near 1e4 / temperature carries 1e4 times the rounding of the other rows; and so
    # do the loss and metrics, sums over those logps (130-500 ulps of a scale of 1 measured).
    loss_scale = logit_row_scale(full, config.temperature).max() if extreme else None
    _assert_outputs(out, want, eager, full, config.temperature, loss_scale)
    truth_grad = truth_leaf.grad[..., start:start + size]
    assert_close_to_truth(shard.grad, truth_grad, eager_grad, ulps=ULPS_GRAD, dtype=dtype,
                          scale=dlogits_scale(truth_grad, full, config.temperature), what="dlogits shard")
    assert torch.equal(shard.detach(), before), "logits_shard was modified"


def _check_linear_loss(rank, world, group, config, *, seed=0, layout="even", chunk_size=6, with_bias=True,
                       advantage_shape="B", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    inputs = _loss_inputs(reference.linear_logits(hidden, weight, bias), ids, seed + 1, config.temperature,
                          advantage_shape)
    start, size = _shard(V, world, rank, layout)
    h = hidden.clone().requires_grad_()
    w_shard = weight[start:start + size].clone().requires_grad_()
    b_shard = bias[start:start + size].clone().requires_grad_() if with_bias else None
    out = gd.vocab_parallel_linear_grpo_loss(h, w_shard, ids, bias_shard=b_shard, config=config,
                                             process_group=group, chunk_size=chunk_size, **inputs)
    out.loss.backward()

    def reference_run(cast, inputs):
        leaves = [None if t is None else t.detach().to(cast, copy=True).requires_grad_()
                  for t in (hidden, weight, bias)]
        result = reference.linear_grpo_loss(leaves[0], leaves[1], ids, bias=leaves[2], config=config, **inputs)
        result.loss.backward()
        return result, [None if t is None else t.grad for t in leaves]

    want, truth_grads = reference_run(torch.float64, _quantized(inputs, dtype))
    eager, eager_grads = reference_run(dtype, inputs) if dtype != torch.float64 else (None, [None] * 3)
    _assert_outputs(out, want, eager, reference.linear_logits(hidden, weight, bias), config.temperature)
    shard = slice(start, start + size)
    grads = [(h.grad, truth_grads[0], eager_grads[0], "dhidden"),
             (w_shard.grad, truth_grads[1][shard], None if eager is None else eager_grads[1][shard], "dweight shard")]
    if with_bias:
        grads.append((b_shard.grad, truth_grads[2][shard], None if eager is None else eager_grads[2][shard],
                      "dbias shard"))
    for got, truth, eager_grad, name in grads:
        assert_close_to_truth(got, truth, eager_grad, ulps=ULPS_GRAD, floor=0, dtype=dtype, what=name)


# ---------------------------------------------------------------- vocab parallel: logits path


@case
def case_vp_dapo_token_kl_is_temperature(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04, temperature=0.7)
    _check_logits_loss(rank, world, group, cfg, with_is=True, advantage_shape="BT", chunk_size=6)


@case
def case_vp_dapo_num_items_skewed_explicit_start(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", delta=1.5, beta=0.1, use_bias_correction_kl=False)
    _check_logits_loss(rank, world, group, cfg, layout="skewed", explicit_start=True, normalizers={"num_items_in_batch": 37})


@case
def case_vp_gspo_sequence_level_entropy_bonus(rank, world, group):
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4,
                     entropy_coef=0.01, beta=0.02)
    _check_logits_loss(rank, world, group, cfg, advantage_shape="B1")


@case
def case_vp_bnpo_dual_clip_low_var_kl(rank, world, group):
    cfg = GRPOConfig(loss_type="bnpo", clip_ratio_c=3.0, beta=0.05, kl_estimator="low_var_kl")
    _check_logits_loss(rank, world, group, cfg)


@case
def case_vp_dr_grpo_luspo_sapo_cispo_gpg(rank, world, group):
    for i, cfg in enumerate([
        GRPOConfig(loss_type="dr_grpo", max_completion_length=8),
        GRPOConfig(loss_type="luspo", importance_sampling_level="sequence"),
        GRPOConfig(loss_type="sapo", beta=0.03, kl_estimator="k2"),
        GRPOConfig(loss_type="cispo", epsilon_high=1.2),
        GRPOConfig(loss_type="gpg", compute_entropy=False),
    ]):
        _check_logits_loss(rank, world, group, cfg, seed=10 + i)


@case
def case_vp_gmpo_is_weights(rank, world, group):
    cfg = GRPOConfig(loss_type="gmpo", epsilon_low=0.4, epsilon_high=0.4, beta=0.01, kl_estimator="k1")
    _check_logits_loss(rank, world, group, cfg, with_is=True, layout="skewed")


@case
def case_vp_verl_agg_modes(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", loss_agg_mode="token-mean", dp_size=2)
    _check_logits_loss(rank, world, group, cfg, normalizers={"num_items_in_batch": 23.0})
    cfg = GRPOConfig(loss_type="dapo", loss_agg_mode="seq-mean-token-mean", beta=0.02)
    _check_logits_loss(rank, world, group, cfg, seed=3, normalizers={"global_batch_size": 6})


@case
def case_vp_masked_vocab_and_huge_logits(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", temperature=1.3)
    _check_logits_loss(rank, world, group, cfg, extreme=True, layout="skewed", chunk_size=1)
    _check_logits_loss(rank, world, group, cfg, extreme=True, layout="even", seed=5)


@case
def case_vp_bf16_and_fp32_logits(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.9)
    _check_logits_loss(rank, world, group, cfg, dtype=torch.bfloat16)
    _check_logits_loss(rank, world, group, cfg.replace(loss_type="grpo", importance_sampling_level="sequence"),
                       dtype=torch.float32, seed=2)


@case
def case_vp_selective_log_softmax_gradients(rank, world, group):
    # Flat (N,) ids and upstream gradients on both outputs, then on the entropy alone.
    full, ids = _full_logits(7)
    full, ids = full.reshape(B * T, V), ids.reshape(B * T)
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(B * T, generator=g, dtype=torch.float64), torch.randn(B * T, generator=g, dtype=torch.float64)
    start, size = _shard(V, world, rank)
    for use_logps in (True, False):
        shard = full[:, start:start + size].clone().requires_grad_()
        logps, entropy = gd.vocab_parallel_selective_log_softmax(shard, ids, start, 0.8, True, group)
        leaf = full.clone().requires_grad_()
        want_logps, want_entropy = reference.selective_log_softmax(leaf, ids, 0.8, True)
        # float64 throughout: eager is the truth's own computation, no eager term.
        scale = logit_row_scale(full, 0.8)
        assert_close_to_truth(logps, want_logps, ulps=ULPS_VALUE, scale=scale, what="logps")
        assert_close_to_truth(entropy, want_entropy, ulps=ULPS_VALUE, scale=scale, what="entropy")
        objective = (b * entropy).sum() + ((a * logps).sum() if use_logps else 0)
        want_objective = (b * want_entropy).sum() + ((a * want_logps).sum() if use_logps else 0)
        objective.backward()
        want_objective.backward()
        truth_grad = leaf.grad[:, start:start + size]
        upstream = (a.abs() * use_logps + b.abs() * (1 + want_entropy.detach().abs())) / 0.8  # per row
        assert_close_to_truth(shard.grad, truth_grad, ulps=ULPS_GRAD,
                              scale=dlogits_scale(truth_grad, full, 0.8, upstream=upstream), what="dlogits shard")
    logps, entropy = gd.vocab_parallel_selective_log_softmax(full[:, start:start + size], ids, process_group=group)
    assert entropy is None
    assert_close_to_truth(logps, reference.selective_log_softmax(full, ids)[0], ulps=ULPS_VALUE,
                          scale=logit_row_scale(full), what="logps without entropy")


# ---------------------------------------------------------------- vocab parallel: sampling support
# The support is found across the shards (candidates exchanged, doubled until every row's cutoff is
# known); the truth is the reference's dense support on the full row.


@case
def case_vp_sampling_every_stage_skewed(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02)
    _check_logits_loss(rank, world, group, cfg, layout="skewed", chunk_size=3)


@case
def case_vp_sampling_top_p_alone_needs_more_candidates(rank, world, group):
    # Flat rows (0.3 x N(0, 4)): top-p 0.95 keeps well over the 64 tokens a rank sends first.
    cfg = GRPOConfig(loss_type="grpo", beta=0.02, temperature=7.0, top_p=0.95, compute_entropy=True)
    _check_logits_loss(rank, world, group, cfg, chunk_size=6, seed=3)


@case
def case_vp_sampling_bf16_ties_both_rules(rank, world, group):
    # bf16 logits: many exact ties, broken by id across shard boundaries.
    for ties in ("exact", "all"):
        cfg = GRPOConfig(loss_type="bnpo", top_k=25, top_p=0.97, top_k_ties=ties)
        _check_logits_loss(rank, world, group, cfg, dtype=torch.bfloat16, chunk_size=7, seed=5)


@case
def case_vp_sampling_masked_vocab(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", top_k=60, min_p=0.001)
    _check_logits_loss(rank, world, group, cfg, layout="skewed", extreme=True)


@case
def case_vp_linear_sampling(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.9, top_k=30, top_p=0.95, entropy_coef=0.01)
    _check_linear_loss(rank, world, group, cfg, layout="skewed", chunk_size=4, advantage_shape="BT")


# ---------------------------------------------------------------- vocab parallel: linear path


@case
def case_vp_linear_dapo_token(rank, world, group):
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.8, entropy_coef=0.02)
    _check_linear_loss(rank, world, group, cfg, advantage_shape="BT")


@case
def case_vp_linear_gspo_sequence_no_bias(rank, world, group):
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.02)
    _check_linear_loss(rank, world, group, cfg, with_bias=False, layout="skewed", chunk_size=7, advantage_shape="B1")


@case
def case_vp_linear_fp32_default_chunk(rank, world, group):
    cfg = GRPOConfig(loss_type="bnpo", beta=0.01)
    _check_linear_loss(rank, world, group, cfg, chunk_size=None, dtype=torch.float32, seed=4)


@case
def case_vp_linear_log_softmax_hidden_grad_only(rank, world, group):
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B * T,), generator=g)
    start, size = _shard(V, world, rank, "skewed")
    h = hidden.clone().requires_grad_()
    logps, entropy = gd.vocab_parallel_linear_log_softmax(h, weight[start:start + size], ids, compute_entropy=True,
                                                          process_group=group, chunk_size=3)
    h_ref = hidden.clone().requires_grad_()
    want_logps, want_entropy = reference.linear_log_softmax(h_ref, weight, ids, compute_entropy=True)
    (logps.sum() + 0.5 * entropy.sum()).backward()
    (want_logps.sum() + 0.5 * want_entropy.sum()).backward()
    scale = logit_row_scale(reference.linear_logits(hidden, weight))
    assert_close_to_truth(logps, want_logps, ulps=ULPS_VALUE, scale=scale, what="logps")  # float64: no eager term
    assert_close_to_truth(entropy, want_entropy, ulps=ULPS_VALUE, scale=scale, what="entropy")
    assert_close_to_truth(h.grad, h_ref.grad, ulps=ULPS_GRAD, what="dhidden")  # upstream 1 and 0.5: floor 1


# ---------------------------------------------------------------- vocab parallel: errors agreed on by every rank


def _expect_error(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


@case
def case_vp_errors(rank, world, group):
    full, ids = _full_logits(0)
    adv = torch.randn(B, dtype=torch.float64)
    start, size = _shard(V, world, rank)
    shard = full[..., start:start + size]

    def loss(ids, **kwargs):
        return gd.vocab_parallel_grpo_loss(shard, ids, adv, process_group=group, **kwargs)

    bad_ids = ids.clone()
    bad_ids[1, 2] = V
    _expect_error(lambda: loss(bad_ids), r"ids must lie in \[0, 257\)")
    _expect_error(lambda: loss(ids, vocab_start=start + (rank == 1)), "tile")
    _expect_error(lambda: loss(ids, vocab_start=start if rank == 0 else None), "every rank or on none")
    _expect_error(lambda: loss((ids + rank) % V), "same on every rank")
    # A local error on rank 1 only: it raises its own message, the others name it.
    short = ids[:, :-1] if rank == 1 else ids
    match = "completion_ids must have shape" if rank == 1 else r"rejected on rank\(s\) \[1\]"
    _expect_error(lambda: loss(short), match)
    # After all of that the group is still in step.
    logps, _ = gd.vocab_parallel_selective_log_softmax(shard, ids, process_group=group)
    assert_close_to_truth(logps, reference.selective_log_softmax(full, ids)[0], ulps=ULPS_VALUE,
                          scale=logit_row_scale(full), what="logps after the errors")


# ---------------------------------------------------------------- data parallel


def _dp_batch(world, seed, ragged_length=False, micro_batches=1):
    """The global batch and each rank's rows: ranks hold 2, 3, 1, 4 sequences (uneven token counts)."""
    per_rank = [[2, 3, 1, 4][r % 4] * micro_batches for r in range(world)]
    lengths = [6 - (r % 2 if ragged_length else 0) for r in range(world)]  # each rank pads to its own T
    S, T_max, vocab = sum(per_rank), max(lengths), 11
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T_max, H, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, vocab, (S, T_max), generator=g)
    logps, _ = reference.linear_log_softmax(hidden, weight, ids)
    old = logps + 0.3 * torch.randn(S, T_max, generator=g, dtype=torch.float64)
    ref = logps + 0.5 * torch.randn(S, T_max, generator=g, dtype=torch.float64)
    mask = (torch.rand(S, T_max, generator=g) > 0.35).to(torch.float64)
    mask[0] = 0.0  # a sequence with no token
    adv = torch.randn(S, 1, generator=g, dtype=torch.float64)
    rows, first = [], 0
    for r in range(world):
        rows.append((first, first + per_rank[r], lengths[r]))
        mask[first:first + per_rank[r], lengths[r]:] = 0.0  # beyond that rank's T
        first += per_rank[r]
    tensors = dict(hidden=hidden, ids=ids, old=old, ref=ref, mask=mask, adv=adv)
    return tensors, weight, rows


def _dp_loss(config, t, weight, lo, hi, length, **normalizers):
    logits = reference.linear_logits(t["hidden"][lo:hi, :length], weight)
    return reference.grpo_loss(logits, t["ids"][lo:hi, :length], t["adv"][lo:hi], t["mask"][lo:hi, :length],
                               t["old"][lo:hi, :length], t["ref"][lo:hi, :length], config=config, **normalizers)


def _check_data_parallel(rank, world, group, config, *, seed=0, ragged_length=False, micro_batches=1, reduction="mean"):
    t, weight, rows = _dp_batch(world, seed, ragged_length, micro_batches)
    lo, hi, length = rows[rank]
    step = (hi - lo) // micro_batches
    chunks = [(lo + k * step, lo + (k + 1) * step) for k in range(micro_batches)]
    masks = [t["mask"][a:b, :length] for a, b in chunks]
    norms = gd.dp_normalizers(masks if micro_batches > 1 else masks[0], config, gradient_reduction=reduction,
                              process_group=group, dtype=torch.float64)
    norms = norms if micro_batches > 1 else [norms]
    w = weight.clone().requires_grad_()
    total = 0.0
    for (a, b), n in zip(chunks, norms):
        out = _dp_loss(config, t, w, a, b, length, num_items_in_batch=n.num_items_in_batch,
                       global_batch_size=n.global_batch_size)
        scaled = n.scale * out.loss
        scaled.backward()
        total = total + scaled.detach()
    divisor = world if reduction == "mean" else 1
    dist.all_reduce(w.grad, group=group)
    dist.all_reduce(total, group=group)
    w_ref = weight.clone().requires_grad_()
    S, T_max = t["mask"].shape
    # One process: no data-parallel factor (verl's dp_size is the DP world size).
    want = _dp_loss(config.replace(dp_size=1), t, w_ref, 0, S, T_max)
    want.loss.backward()
    # float64 throughout (the reference per rank, reduced): eager is the truth's own computation.
    assert_close_to_truth(total / divisor, want.loss, ulps=ULPS_LOSS, what="data-parallel loss")
    assert_close_to_truth(w.grad / divisor, w_ref.grad, ulps=ULPS_GRAD, floor=0, what="data-parallel dweight")
    assert norms[0].global_tokens.item() == t["mask"].sum().item()  # a count: exact
    assert norms[0].world_size == world


@case
def case_dp_dapo_trl_normalizer(rank, world, group):
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="dapo", beta=0.05))
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="cispo", epsilon_high=1.3), seed=1, reduction="sum")
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="gpg"), seed=2)


@case
def case_dp_bnpo_with_entropy_bonus(rank, world, group):
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="bnpo", beta=0.05, entropy_coef=0.03))
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="bnpo"), seed=1, reduction="sum")


@case
def case_dp_grpo_sequence_types(rank, world, group):
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="grpo", beta=0.05))
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="grpo", importance_sampling_level="sequence"), seed=1)
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="sapo"), seed=2, reduction="sum")
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="luspo", importance_sampling_level="sequence"), seed=3)
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="gmpo", beta=0.02), seed=4)


@case
def case_dp_dr_grpo_ragged_lengths(rank, world, group):
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="dr_grpo"), ragged_length=True)
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="dr_grpo", max_completion_length=9), seed=1,
                         ragged_length=True)


@case
def case_dp_verl_agg_modes(rank, world, group):
    for i, mode in enumerate(["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]):
        cfg = GRPOConfig(loss_type="dapo", loss_agg_mode=mode, dp_size=world, beta=0.03)
        _check_data_parallel(rank, world, group, cfg, seed=i, ragged_length=True)
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="gmpo", loss_agg_mode="token-mean", beta=0.05), seed=5)
    _check_data_parallel(rank, world, group, GRPOConfig(loss_type="gmpo", loss_agg_mode="seq-mean-token-sum-norm", beta=0.05),
                         seed=6, ragged_length=True)


@case
def case_dp_gradient_accumulation(rank, world, group):
    for i, lt in enumerate(["dapo", "bnpo", "grpo", "dr_grpo"]):
        _check_data_parallel(rank, world, group, GRPOConfig(loss_type=lt, beta=0.02), seed=i, micro_batches=2,
                             ragged_length=lt == "dr_grpo")


@case
def case_dp_real_ddp_module(rank, world, group):
    # torch's DistributedDataParallel averages the gradients itself.
    cfg = GRPOConfig(loss_type="dapo", beta=0.05)
    t, weight, rows = _dp_batch(world, 11)
    lo, hi, length = rows[rank]
    head = torch.nn.Linear(H, weight.shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
    model = torch.nn.parallel.DistributedDataParallel(head, process_group=group)
    n = gd.dp_normalizers(t["mask"][lo:hi, :length], cfg, group, dtype=torch.float64)
    out = reference.grpo_loss(model(t["hidden"][lo:hi, :length]), t["ids"][lo:hi, :length], t["adv"][lo:hi],
                              t["mask"][lo:hi, :length], t["old"][lo:hi, :length], t["ref"][lo:hi, :length],
                              config=cfg, num_items_in_batch=n.num_items_in_batch)
    (n.scale * out.loss).backward()
    w_ref = weight.clone().requires_grad_()
    want = _dp_loss(cfg, t, w_ref, 0, t["mask"].shape[0], t["mask"].shape[1])
    want.loss.backward()
    assert_close_to_truth(head.weight.grad, w_ref.grad, ulps=ULPS_GRAD, floor=0, what="DDP dweight")


@case
def case_dp_global_token_count(rank, world, group):
    t, _, rows = _dp_batch(world, 0)
    lo, hi, length = rows[rank]
    local = t["mask"][lo:hi, :length].bool()
    count = gd.global_token_count(local, group)
    assert count.dtype == torch.float32 and count.dim() == 0
    assert count.item() == t["mask"].sum().item()
    halves = [local[: (hi - lo) // 2], local[(hi - lo) // 2:]]
    assert gd.global_token_count(halves, group, dtype=torch.float64).item() == t["mask"].sum().item()


# ---------------------------------------------------------------- the spawned worlds


# One spawn of max(WORLD_SIZES) = 4 processes runs both worlds: the 2-process cases on the
# subgroup of global ranks 1 and 3 (so group ranks differ from global ranks, and the default
# group is not the one in use), then the 4-process cases on the default group.
PAIR = (1, 3)


def _run_cases(rank, world_size, group):
    results = {}
    for name, fn in CASES.items():
        try:
            fn(rank, world_size, group)
            results[name] = None
        except Exception:  # reported per case by test_multiprocess
            results[name] = traceback.format_exc(limit=-6)
        dist.barrier(group=group)
    return results


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=max(WORLD_SIZES),
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        pair = dist.new_group(list(PAIR))
        if rank in PAIR:
            results[2] = _run_cases(dist.get_rank(pair), 2, pair)
        dist.barrier()
        results[4] = _run_cases(rank, 4, None)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


_RESULTS = {}


def _world_results(world_size):
    """``{case: [errors by rank]}`` of ``world_size``; the one spawn runs on first use."""
    if not _RESULTS:
        with tempfile.TemporaryDirectory() as tmp:
            nprocs = max(WORLD_SIZES)
            mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), tmp), nprocs=nprocs, join=True)
            per_rank = []
            for r in range(nprocs):
                with open(os.path.join(tmp, f"rank{r}.json")) as f:
                    per_rank.append({int(k): res for k, res in json.load(f).items()})
        for world, ranks in ((2, PAIR), (4, range(nprocs))):
            _RESULTS[world] = {
                name: [f"rank {r}:\n{per_rank[r][world][name]}" for r in ranks
                       if per_rank[r].get(world, {}).get(name, "missing")]
                for name in CASES
            }
    return _RESULTS[world_size]


@needs_gloo
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_multiprocess(world_size, name):
    errors = _world_results(world_size)[name]
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------- single process (no process group)


def test_single_process_matches_reference():
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, temperature=0.7)
    _check_logits_loss(0, 1, None, cfg, with_is=True)
    _check_linear_loss(0, 1, None, cfg.replace(loss_type="grpo", importance_sampling_level="sequence"), chunk_size=4)
    # Sampling support on one process: the whole row is one shard.
    _check_logits_loss(0, 1, None, cfg.replace(top_k=40, top_p=0.9, min_p=0.02), chunk_size=3)
    _check_linear_loss(0, 1, None, cfg.replace(top_p=0.9), chunk_size=4)


@pytest.mark.parametrize("first_candidates", [1, 3, 64])
def test_sampling_cutoff_is_the_reference_support(monkeypatch, first_candidates):
    # One process, so the candidate exchange is the identity; few first candidates make every row
    # go through the doubling (a prefix shorter than the support must never settle a row).
    from grpo_fused.semantics import SamplingRule

    monkeypatch.setattr(gd, "_FIRST_CANDIDATES", first_candidates)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, 300, generator=g, dtype=torch.float64) * torch.tensor([0.2, 1, 3, 6, 1, 1]).unsqueeze(-1)
    z[4] = torch.round(z[4])  # ties
    z[5, 100:] = -torch.inf
    rules = [SamplingRule(top_p=0.95), SamplingRule(top_k=7), SamplingRule(top_k=5, top_k_ties="all"),
             SamplingRule(min_p=0.05), SamplingRule(top_k=250, top_p=0.9, min_p=0.001),
             SamplingRule(top_k=3, top_p=0.5, top_k_ties="all")]
    for rule in rules:
        spec = gd._ShardSpec(0, z.shape[-1], 1.0, False, None, 1, z.shape[0], rule, (z.shape[-1],))
        kept = gd._kept(z, gd._sampling_cutoff(z, spec), 0)
        assert torch.equal(kept, reference.sampling_support(z, rule)), rule.describe()


def test_single_process_dp_normalizers_are_identity():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    for lt in ("dapo", "bnpo", "grpo", "dr_grpo", "luspo"):
        n = gd.dp_normalizers(mask, GRPOConfig(loss_type=lt))
        assert n.scale.item() == 1.0 and n.world_size == 1
        assert n.global_tokens.item() == 2.0 and n.global_sequences.item() == 2.0
    assert gd.dp_normalizers(mask, GRPOConfig(loss_type="dapo")).num_items_in_batch.item() == 2.0
    # An all-masked batch: the normalizer is clamped to one token, the loss is 0 not NaN.
    empty = gd.dp_normalizers(torch.zeros(2, 3), GRPOConfig(loss_type="dapo"))
    assert empty.num_items_in_batch.item() == 1.0
    assert gd.global_token_count(mask).item() == 2.0


def test_input_errors_name_the_argument():
    logits = torch.randn(2, 3, 10)
    ids = torch.randint(0, 10, (2, 3))
    adv = torch.randn(2)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        gd.vocab_parallel_grpo_loss(logits, ids + 5, adv)
    with pytest.raises(TypeError, match="vocab_start"):
        gd.vocab_parallel_grpo_loss(logits, ids, adv, vocab_start=1.5)
    with pytest.raises(ValueError, match="vocab_start must be >= 0"):
        gd.vocab_parallel_selective_log_softmax(logits, ids, vocab_start=-1)
    with pytest.raises(ValueError, match="tile"):
        gd.vocab_parallel_grpo_loss(logits, ids, adv, vocab_start=3)
    with pytest.raises(ValueError, match="advantages must have shape"):
        gd.vocab_parallel_grpo_loss(logits, ids, torch.randn(3))
    with pytest.raises(ValueError, match="ref_logps is required"):
        gd.vocab_parallel_grpo_loss(logits, ids, adv, config=GRPOConfig(beta=0.1))
    with pytest.raises(TypeError, match="ids must be an integer"):
        gd.vocab_parallel_selective_log_softmax(logits, ids.float())
    with pytest.raises(ValueError, match="temperature"):
        gd.vocab_parallel_selective_log_softmax(logits, ids, temperature=0.0)
    with pytest.raises(ValueError, match="weight_shard must have shape"):
        gd.vocab_parallel_linear_log_softmax(torch.randn(2, 3, 4), torch.randn(10, 5), ids)
    with pytest.raises(ValueError, match="bias_shard must have shape"):
        gd.vocab_parallel_linear_grpo_loss(torch.randn(2, 3, 4), torch.randn(10, 4), ids, adv, bias_shard=torch.randn(9))
    with pytest.raises(ValueError, match="chunk_size"):
        gd.vocab_parallel_linear_log_softmax(torch.randn(2, 3, 4), torch.randn(10, 4), ids, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        gd.vocab_parallel_grpo_loss(logits, ids, adv, chunk_size=-1)
    with pytest.raises(ValueError, match="process_group was given"):
        gd.vocab_parallel_selective_log_softmax(logits, ids, process_group=object())
    with pytest.raises(ValueError, match="gradient_reduction"):
        gd.dp_normalizers(torch.ones(2, 3), gradient_reduction="avg")
    with pytest.raises(TypeError, match="completion_mask"):
        gd.dp_normalizers([])
    with pytest.raises(ValueError, match=r"completion_mask\[1\] must be 2-D"):
        gd.dp_normalizers([torch.ones(2, 3), torch.ones(3)])
