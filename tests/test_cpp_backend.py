"""The C++ CPU backend against the eager reference.

Ground truth is the reference run in float64 on the same (already quantized) inputs; the
backend's error may not exceed the reference's own error in the test dtype (eager PyTorch, as
TRL computes it) plus a few ulps (tests/tolerance.py). The first test that needs the extension
builds it (JIT, cached by torch.utils.cpp_extension).
"""

import itertools
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import grpo_fused as gf
from grpo_fused import _cpp_build, _dispatch
from grpo_fused import reference as ref
from grpo_fused.backends import cpp as cpp_backend
from grpo_fused.semantics import NUM_SLOTS, AdvantageRequest, LossBatch, vocab_values

from tolerance import ULPS_ADVANTAGE, ULPS_GRAD, ULPS_LOSS, ULPS_VALUE, assert_close_to_truth, logit_row_scale


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the package falls back to the reference")
    reason = cpp_backend.availability(torch.device("cpu"))
    assert reason is None, reason


def _logits(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _ids(shape, vocab, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _ref_log_softmax(logits, ids, temperature, grad_logps, grad_entropy, dtype):
    """The reference's values and gradient of sum(logps * g1 + entropy * g2) with the logits cast
    to ``dtype``: float64 gives the ground truth, the logits' own dtype eager PyTorch."""
    x = logits.detach().to(dtype).requires_grad_()
    logps, entropy = ref.selective_log_softmax(x, ids, temperature, True)
    (logps * grad_logps.to(logps.dtype) + entropy * grad_entropy.to(entropy.dtype)).sum().backward()
    return logps.detach(), entropy.detach(), x.grad


# V: 1 (degenerate), 33 (< one 16-lane step + tail), 257 (ragged), 5003 (three 2048-chunks, ragged).
@pytest.mark.parametrize("vocab", [1, 33, 257, 5003])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_values_and_grads(vocab, dtype, temperature):
    B, T = 3, 5  # N = 15 rows: odd, not a multiple of anything
    logits = _logits((B, T, vocab), dtype).requires_grad_()
    ids = _ids((B, T), vocab)
    g = torch.Generator().manual_seed(2)
    g1, g2 = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)  # exact in fp32 and fp64
    logps, entropy = gf.selective_log_softmax(logits, ids, temperature, compute_entropy=True, backend="cpp")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert logps.dtype == acc and entropy.dtype == acc and logps.shape == (B, T)
    (logps * g1.to(acc) + entropy * g2.to(acc)).sum().backward()
    want_logps, want_entropy, want_grad = _ref_log_softmax(logits, ids, temperature, g1, g2, torch.float64)
    eager = _ref_log_softmax(logits, ids, temperature, g1, g2, dtype) if dtype != torch.float64 else (None,) * 3
    assert_close_to_truth(logps, want_logps, eager[0], ulps=ULPS_VALUE, dtype=acc, what="logps")
    assert_close_to_truth(entropy, want_entropy, eager[1], ulps=ULPS_VALUE, dtype=acc, what="entropy")
    # The upstream gradients are O(1), so is the natural scale of dlogits (floor 1): with V = 1 the
    # true gradient is exactly 0 and the kernel's is rounding noise of that size.
    assert_close_to_truth(logits.grad, want_grad, eager[2], ulps=ULPS_GRAD, dtype=dtype, what="dlogits")


def test_without_entropy_returns_none_and_same_logps():
    logits = _logits((2, 3, 257), torch.float32)
    ids = _ids((2, 3), 257)
    with_entropy, entropy = gf.selective_log_softmax(logits, ids, compute_entropy=True, backend="cpp")
    without, none = gf.selective_log_softmax(logits, ids, backend="cpp")
    assert none is None and entropy is not None
    torch.testing.assert_close(with_entropy, without, rtol=0, atol=0)


def test_masked_vocab_and_extreme_logits():
    V = 300
    logits = _logits((4, V), torch.float64)
    ids = torch.tensor([5, 7, 299, 0])
    logits[0, 100:] = float("-inf")  # a block of masked vocabulary
    logits[1] = float("-inf")
    logits[1, 7] = 2.0  # every logit -inf but the target's: logp 0, entropy 0
    logits[2] *= 1e4  # very large logits: the max shift must keep exp finite
    logits[3, ::2] = float("-inf")
    for dtype in (torch.float64, torch.float32):
        x = logits.to(dtype).clone().requires_grad_()
        logps, entropy = gf.selective_log_softmax(x, ids, compute_entropy=True, backend="cpp")
        truth = x.detach().double().requires_grad_()  # the rounded logits, in float64
        want_logps, want_entropy = ref.selective_log_softmax(truth, ids, 1.0, True)
        eager = x.detach().clone().requires_grad_()
        eager_logps, eager_entropy = ref.selective_log_softmax(eager, ids, 1.0, True)
        if dtype == torch.float64:
            eager_logps = eager_entropy = None  # eager is the truth's own computation
        # Per row: row 2's logits are ~3e4, and its rounding floor is 3e4 times the others'.
        scale = logit_row_scale(logits)
        assert_close_to_truth(logps, want_logps.detach(), eager_logps, ulps=ULPS_VALUE, scale=scale, dtype=dtype,
                              what="logps")
        assert_close_to_truth(entropy, want_entropy.detach(), eager_entropy, ulps=ULPS_VALUE, scale=scale,
                              dtype=dtype, what="entropy")
        assert logps[1] == 0 and entropy[1] == 0
        # The logp gradient is compared; the entropy term's must stay finite and 0 on -inf columns.
        logps.sum().backward(retain_graph=True)
        want_logps.sum().backward()
        eager_grad = None
        if dtype != torch.float64:
            eager_logps.sum().backward()
            eager_grad = eager.grad
        assert_close_to_truth(x.grad, truth.grad, eager_grad, ulps=ULPS_GRAD, dtype=dtype, what="dlogits")
        x.grad = None
        entropy.sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad[0, 100:] == 0).all() and (x.grad[1] == 0).all()


def test_non_contiguous_logits_are_read_in_place():
    # TRL slices logits[:, :-1] out of a (B, T+1, V) tensor; and a transposed layout has strided V.
    full = _logits((3, 8, 257), torch.float32)
    sliced = full[:, :-1, :]
    ids = _ids((3, 7), 257)
    got, _ = gf.selective_log_softmax(sliced, ids, backend="cpp")
    want, _ = ref.selective_log_softmax(sliced.double(), ids)
    eager, _ = ref.selective_log_softmax(sliced, ids)
    assert_close_to_truth(got, want, eager, ulps=ULPS_VALUE, what="sliced logps")
    strided_v = _logits((257, 3, 7), torch.float32).permute(1, 2, 0)
    got, _ = gf.selective_log_softmax(strided_v, ids, backend="cpp")
    want, _ = ref.selective_log_softmax(strided_v.double(), ids)
    eager, _ = ref.selective_log_softmax(strided_v, ids)
    assert_close_to_truth(got, want, eager, ulps=ULPS_VALUE, what="strided-V logps")
    # Gradient of a sliced view goes back to the right rows of the parent.
    parent = full.clone().requires_grad_()
    gf.selective_log_softmax(parent[:, :-1], ids, backend="cpp")[0].sum().backward()
    twin = full.double().requires_grad_()
    ref.selective_log_softmax(twin[:, :-1], ids)[0].sum().backward()
    eager_parent = full.clone().requires_grad_()
    ref.selective_log_softmax(eager_parent[:, :-1], ids)[0].sum().backward()
    assert_close_to_truth(parent.grad, twin.grad, eager_parent.grad, ulps=ULPS_GRAD, what="parent dlogits")
    assert (parent.grad[:, -1] == 0).all()


def test_leading_shapes_and_long_sequence():
    # 1-D logits (one token), 4-D logits, and T above 65535 (no grid limits on CPU, int64 rows).
    # k = 1, not ULPS_VALUE: these bounds were 3e-6 absolute, about one ulp of the largest logp
    # (~18); the kernel has been no worse than eager here (it needs k = 0), and must stay so.
    v = _logits((50,), torch.float32)
    got, _ = gf.selective_log_softmax(v, torch.tensor(3), backend="cpp")
    assert got.shape == ()
    want, eager = (ref.selective_log_softmax(t, torch.tensor(3))[0] for t in (v.double(), v))
    assert_close_to_truth(got, want, eager, ulps=1, what="1-D logp")
    x = _logits((2, 3, 4, 19), torch.float32)
    ids = _ids((2, 3, 4), 19)
    got, ent = gf.selective_log_softmax(x, ids, compute_entropy=True, backend="cpp")
    want, want_ent = ref.selective_log_softmax(x.double(), ids, 1.0, True)
    eager, eager_ent = ref.selective_log_softmax(x, ids, 1.0, True)
    assert_close_to_truth(got, want, eager, ulps=1, what="4-D logps")
    assert_close_to_truth(ent, want_ent, eager_ent, ulps=1, what="4-D entropy")
    long = _logits((1, 70000, 3), torch.float32)
    ids = _ids((1, 70000), 3)
    got, _ = gf.selective_log_softmax(long, ids, backend="cpp")
    want, eager = (ref.selective_log_softmax(t, ids)[0] for t in (long.double(), long))
    assert_close_to_truth(got, want, eager, ulps=1, what="long-sequence logps")


def test_gradcheck_float64():
    logits = _logits((2, 3, 11), torch.float64).requires_grad_()
    ids = _ids((2, 3), 11)

    def f(x):
        logps, entropy = gf.selective_log_softmax(x, ids, 0.8, compute_entropy=True, backend="cpp")
        return logps, entropy

    assert torch.autograd.gradcheck(f, (logits,))
    hidden = _logits((5, 4), torch.float64, scale=1.0).requires_grad_()
    weight = _logits((9, 4), torch.float64, scale=1.0, seed=3).requires_grad_()
    bias = _logits((9,), torch.float64, scale=1.0, seed=4).requires_grad_()
    ids = _ids((5,), 9)

    def g(h, w, b):
        return gf.linear_log_softmax(h, w, ids, 1.3, bias=b, compute_entropy=True, backend="cpp")

    assert torch.autograd.gradcheck(g, (hidden, weight, bias))


# --------------------------------------------------------------------------------------
# The loss over the option matrix.
# --------------------------------------------------------------------------------------

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "gmpo", "gpg")


def _loss_inputs(B, T, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        base, _ = ref.selective_log_softmax(logits.double(), ids)
    old = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios around [0.6, 1.6]
    refl = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # a sequence with no masked-in tokens
    is_w = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return logits, ids, adv, mask, old, refl, is_w


def _both(logits, ids, adv, mask, old, refl, config, is_w=None, **kw):
    """(cpp output, float64 truth, eager output or None for float64 logits), each with its logits'
    gradient, and where per-token outputs are compared. The float inputs are rounded to the
    compute dtype first, as every backend does, so that the truth sees the same inputs."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    quantized = [None if t is None else t.to(acc).double() for t in (adv, old, refl, is_w)]
    a = logits.clone().requires_grad_()
    got = gf.grpo_loss(a, ids, adv, mask, old, refl, config=config, is_weights=is_w, backend="cpp", **kw)
    got.loss.backward()
    b = logits.detach().double().requires_grad_()
    want = ref.grpo_loss(b, ids, quantized[0], mask, *quantized[1:3], config=config, is_weights=quantized[3])
    want.loss.backward()
    eager = None
    if logits.dtype != torch.float64:
        c = logits.clone().requires_grad_()
        eager = ref.grpo_loss(c, ids, adv, mask, old, refl, config=config, is_weights=is_w)
        eager.loss.backward()
        eager = (eager, c.grad)
    return (got, a.grad), (want, b.grad), eager, _masked_in(mask)


def _masked_in(mask):
    """Where per-token outputs are specified: the public API reads the ids of masked positions as
    0 (d0b4523), so a backend's logp there is not the reference's (which reads the given id)."""
    return None if mask is None else mask != 0


def _field(output, name):
    """``output.name``, or None where there is no eager output (float64 runs)."""
    return None if output is None else getattr(output, name)


def _assert_outputs_close(got, want, eager, where):
    (out, grad), (truth, truth_grad) = got, want
    eager_out, eager_grad = eager if eager is not None else (None, None)
    assert_close_to_truth(out.loss, truth.loss, _field(eager_out, "loss"), ulps=ULPS_LOSS, what="loss")
    assert_close_to_truth(out.logps, truth.logps, _field(eager_out, "logps"), ulps=ULPS_VALUE, where=where,
                          what="logps")
    if truth.entropy is None:
        assert out.entropy is None
    else:
        assert_close_to_truth(out.entropy, truth.entropy, _field(eager_out, "entropy"), ulps=ULPS_VALUE, where=where,
                              what="entropy")
    assert set(out.metrics) == set(truth.metrics)
    for k in truth.metrics:
        eager_metric = None if eager_out is None else eager_out.metrics[k]
        assert_close_to_truth(out.metrics[k], truth.metrics[k], eager_metric, ulps=ULPS_LOSS, what=f"metric {k}")
    assert_close_to_truth(grad, truth_grad, eager_grad, ulps=ULPS_GRAD, floor=0, what="dlogits")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_option_matrix_float64(loss_type):
    # Full matrix in fp64 at a small ragged shape: IS level x beta/KL x delta/dual-clip x
    # mask x temperature x old_logps present x entropy bonus x aggregation.
    B, T, V = 3, 5, 37
    logits, ids, adv, mask, old, refl, is_w = _loss_inputs(B, T, V, torch.float64)
    grid = itertools.product(
        ("token", "sequence"),
        ((0.0, "k3", True), (0.04, "k3", False), (0.1, "low_var_kl", True), (0.1, "k2", False)),
        ((None, None), (1.5, None), (None, 3.0)),
        (True, False),  # mask given
        (1.0, 0.7),  # temperature
        (True, False),  # old_logps given
    )
    for level, (beta, kl, bias_kl), (delta, clip_c), use_mask, temp, use_old in grid:
        cfg = gf.GRPOConfig(
            loss_type=loss_type, epsilon_high=0.28, beta=beta, kl_estimator=kl, use_bias_correction_kl=bias_kl,
            delta=delta, clip_ratio_c=clip_c, temperature=temp, importance_sampling_level=level,
            entropy_coef=0.01 if use_old else 0.0,
            loss_agg_mode="seq-mean-token-mean" if (use_mask and not use_old and beta == 0.1) else None,
        )
        _assert_outputs_close(*_both(
            logits, ids, adv, mask if use_mask else None, old if use_old else None, refl if beta else None, cfg,
            is_w if level == "sequence" else None,
        ))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "gmpo"])
def test_grpo_loss_low_precision(dtype, loss_type):
    B, T, V = 3, 7, 2111  # V straddles a 2048 chunk
    logits, ids, adv, mask, old, refl, _ = _loss_inputs(B, T, V, dtype, seed=5)
    cfg = gf.GRPOConfig(loss_type=loss_type, beta=0.04, temperature=0.9, entropy_coef=0.01)
    _assert_outputs_close(*_both(logits, ids, adv, mask, old, refl, cfg))


def test_all_masked_batch_gives_zero_loss_and_zero_grad():
    logits, ids, adv, mask, old, refl, _ = _loss_inputs(2, 4, 50, torch.float32)
    mask = torch.zeros_like(mask)
    x = logits.clone().requires_grad_()
    out = gf.grpo_loss(x, ids, adv, mask, old, config=gf.GRPOConfig(loss_type="grpo"), backend="cpp")
    out.loss.backward()
    assert out.loss.item() == 0.0 and (x.grad == 0).all()


def test_inplace_backward_overwrites_logits_with_the_gradient():
    logits, ids, adv, mask, old, refl, _ = _loss_inputs(3, 5, 257, torch.float32)
    cfg = gf.GRPOConfig(beta=0.04, entropy_coef=0.02)
    a = logits.clone().requires_grad_()
    out = gf.grpo_loss(a, ids, adv, mask, old, refl, config=cfg, backend="cpp")
    out.loss.backward()
    hidden_state = logits.clone().requires_grad_()
    buffer = hidden_state * 1.0  # a non-leaf buffer, as logits coming out of an lm_head are
    before = buffer.detach().clone()
    out_inplace = gf.grpo_loss(buffer, ids, adv, mask, old, refl, config=cfg, inplace_backward=True, backend="cpp")
    torch.testing.assert_close(out_inplace.loss, out.loss, rtol=0, atol=0)
    torch.testing.assert_close(buffer.detach(), before, rtol=0, atol=0)  # untouched until backward
    out_inplace.loss.backward()
    torch.testing.assert_close(hidden_state.grad, a.grad, rtol=0, atol=0)
    torch.testing.assert_close(buffer.detach(), a.grad, rtol=0, atol=0)


def test_inputs_are_not_modified():
    logits, ids, adv, mask, old, refl, is_w = _loss_inputs(2, 6, 100, torch.bfloat16)
    copies = [t.clone() for t in (logits, ids, adv, mask, old, refl, is_w)]
    x = logits.requires_grad_()
    out = gf.grpo_loss(x, ids, adv, mask, old, refl, config=gf.GRPOConfig(beta=0.1), is_weights=is_w, backend="cpp")
    out.loss.backward()
    for before, after in zip(copies, (logits, ids, adv, mask, old, refl, is_w)):
        assert torch.equal(before, after.detach())


# --------------------------------------------------------------------------------------
# Linear path.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_grpo_loss_matches_reference(dtype, with_bias):
    # Chunks of 4 tokens over N = 15: four chunks, the last one short.
    B, T, H, V = 3, 5, 24, 301
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2 - 5.5
    cfg = gf.GRPOConfig(loss_type="grpo", temperature=0.8, entropy_coef=0.05)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    got = gf.linear_grpo_loss(leaves[0], leaves[1], ids, adv, mask, old, bias=leaves[2] if with_bias else None,
                              config=cfg, strategy="chunked", chunk_size=4, backend="cpp")
    got.loss.backward()
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def reference_run(cast, adv, old):
        twins = [t.detach().to(cast).requires_grad_() for t in leaves]
        out = ref.linear_grpo_loss(twins[0], twins[1], ids, adv, mask, old, bias=twins[2] if with_bias else None,
                                   config=cfg)
        out.loss.backward()
        return out, [t.grad for t in twins]

    # The truth sees the advantages and old log-probs rounded to the compute dtype, as the backend does.
    want, want_grads = reference_run(torch.float64, adv.to(acc).double(), old.to(acc).double())
    eager, eager_grads = reference_run(dtype, adv, old) if dtype != torch.float64 else (None, [None] * len(leaves))
    assert_close_to_truth(got.loss, want.loss, _field(eager, "loss"), ulps=ULPS_LOSS, what="loss")
    where = _masked_in(mask)
    assert_close_to_truth(got.logps, want.logps, _field(eager, "logps"), ulps=ULPS_VALUE, where=where, what="logps")
    assert_close_to_truth(got.entropy, want.entropy, _field(eager, "entropy"), ulps=ULPS_VALUE, where=where,
                          what="entropy")
    for name, leaf, truth_grad, eager_grad in zip(("dhidden", "dweight", "dbias"), leaves, want_grads, eager_grads):
        assert_close_to_truth(leaf.grad, truth_grad, eager_grad, ulps=ULPS_GRAD, floor=0, dtype=leaf.dtype, what=name)


def test_linear_frozen_lm_head_gets_no_weight_gradient():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64)  # frozen
    bias = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 50, (2, 3), generator=g)
    adv = torch.randn(2, generator=g, dtype=torch.float64)
    gf.linear_grpo_loss(hidden, weight, ids, adv, bias=bias, backend="cpp").loss.backward()
    twin_h, twin_b = hidden.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref.linear_grpo_loss(twin_h, weight, ids, adv, bias=twin_b).loss.backward()
    assert weight.grad is None
    assert_close_to_truth(hidden.grad, twin_h.grad, ulps=ULPS_GRAD, floor=0, what="dhidden")
    assert_close_to_truth(bias.grad, twin_b.grad, ulps=ULPS_GRAD, floor=0, what="dbias")


def test_linear_strategy_tiled_is_refused():
    hidden = torch.randn(1, 2, 4)
    weight = torch.randn(6, 4)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="chunked"):
        gf.linear_log_softmax(hidden, weight, ids, strategy="tiled", backend="cpp")


def test_param_slots_and_scale_codes_match_the_cpp_header():
    # csrc/params.h repeats the codes the C++ ops read; they must be the semantics layer's.
    import re

    from grpo_fused import semantics

    header = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "params.h")).read()
    assert int(re.search(r"kSlotInvTemperature = (\d+)", header).group(1)) == semantics.Slot.INV_TEMPERATURE
    assert int(re.search(r"kSlotTopK = (\d+)", header).group(1)) == semantics.Slot.TOP_K
    assert int(re.search(r"kSlotTopP = (\d+)", header).group(1)) == semantics.Slot.TOP_P
    assert int(re.search(r"kSlotLogMinP = (\d+)", header).group(1)) == semantics.Slot.LOG_MIN_P
    assert int(re.search(r"kNumSlots = (\d+)", header).group(1)) == semantics.NUM_SLOTS
    codes = dict(re.findall(r"kScale(\w+) = (\d+)", header))
    assert {name.lower(): int(v) for name, v in codes.items()} == {n: int(s) for n, s in semantics.ADVANTAGE_SCALES.items()}


# --------------------------------------------------------------------------------------
# Group advantages.
# --------------------------------------------------------------------------------------


def _assert_group_outputs(got, want, eager):
    """``got`` (the backend), ``want`` (float64 truth), ``eager`` (the reference in the rewards' dtype;
    None for float64 rewards)."""
    (adv, stats), (want_adv, want_stats) = got, want
    eager_adv, eager_stats = eager if eager is not None else (None, None)
    assert_close_to_truth(adv, want_adv, eager_adv, ulps=ULPS_ADVANTAGE, what="advantages")
    for name in ("mean", "std", "rewards", "frac_zero_std"):
        assert_close_to_truth(getattr(stats, name), getattr(want_stats, name),
                              None if eager is None else getattr(eager_stats, name), ulps=ULPS_ADVANTAGE, what=name)
    for name in ("count", "zero_std", "group_index"):
        assert torch.equal(getattr(stats, name), getattr(want_stats, name)), name


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_matches_reference(scale, unbiased):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(24, generator=g, dtype=torch.float64)
    rewards[3] = float("nan")  # unscored
    rewards[8:12] = 0.5  # a zero-std group
    rewards[13:16] = float("nan")  # a group with one valid reward
    keep = torch.rand(24, generator=g) > 0.15
    ids = torch.randint(0, 5, (24,), generator=g) * 7  # unordered labels, uneven sizes
    offsets = torch.tensor([0, 1, 6, 6, 15, 24])  # a singleton and an empty group
    cases = [
        dict(group_size=4),
        dict(group_size=4, keep_mask=keep),
        dict(group_ids=ids),
        dict(group_offsets=offsets, keep_mask=keep),
    ]
    for kw in cases:
        for dtype in (torch.float64, torch.float32):
            r = rewards.to(dtype)
            got = gf.group_advantages(r, scale=scale, unbiased=unbiased, backend="cpp", **kw)
            want = ref.group_advantages(r.double(), scale=scale, unbiased=unbiased, **kw)
            eager = ref.group_advantages(r, scale=scale, unbiased=unbiased, **kw) if dtype != torch.float64 else None
            _assert_group_outputs(got, want, eager)
            assert got[0].dtype == dtype and torch.isfinite(got[0]).all()


def test_group_advantages_hand_computed_and_weighted():
    rewards = torch.tensor([[1.0, float("nan")], [2.0, 1.0], [3.0, 1.0], [5.0, 5.0]])
    weights = torch.tensor([1.0, 0.5])
    adv, stats = gf.group_advantages(rewards, 2, reward_weights=weights, backend="cpp")
    eager_adv, eager_stats = ref.group_advantages(rewards, 2, reward_weights=weights)
    # combined: [1, 2.5, 3.5, 7.5]; groups [1, 2.5] and [3.5, 7.5]; unbiased stds 1.0607, 2.8284
    f64 = dict(dtype=torch.float64)
    assert_close_to_truth(stats.rewards, torch.tensor([1.0, 2.5, 3.5, 7.5], **f64), eager_stats.rewards,
                          ulps=ULPS_ADVANTAGE, what="rewards")
    assert_close_to_truth(stats.mean, torch.tensor([1.75, 5.5], **f64), eager_stats.mean, ulps=ULPS_ADVANTAGE,
                          what="mean")
    s1, s2 = 1.5 / 2**0.5, 4.0 / 2**0.5
    assert_close_to_truth(stats.std, torch.tensor([s1, s2], **f64), eager_stats.std, ulps=ULPS_ADVANTAGE, what="std")
    want = torch.tensor([-0.75 / (s1 + 1e-4), 0.75 / (s1 + 1e-4), -2 / (s2 + 1e-4), 2 / (s2 + 1e-4)], **f64)
    assert_close_to_truth(adv, want, eager_adv, ulps=ULPS_ADVANTAGE, what="advantages")


# --------------------------------------------------------------------------------------
# Dispatch, compile, bad input.
# --------------------------------------------------------------------------------------


def test_auto_on_cpu_runs_the_cpp_backend(monkeypatch):
    calls = []
    real = cpp_backend.grpo_loss
    monkeypatch.setattr(cpp_backend, "grpo_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits, ids, adv, mask, old, _, _ = _loss_inputs(2, 3, 40, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gf.grpo_loss(logits, ids, adv, mask, old)
    assert calls == [1]
    assert not [w for w in caught if "grpo_fused" in str(w.message)]  # no fallback warning


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(_cpp_build._state, "loaded", False)
    monkeypatch.setitem(_cpp_build._state, "reason", "the C++ extension could not be built or loaded: no compiler")
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.setattr(_dispatch, "_chosen", {})  # the choice is cached per (op, backend, device)
    monkeypatch.setattr(_dispatch, "_loaded", {})
    logits, ids, adv, mask, old, _, _ = _loss_inputs(2, 3, 40, torch.float32)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        out = gf.grpo_loss(logits, ids, adv, mask, old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = gf.grpo_loss(logits, ids, adv, mask, old)
    assert not [w for w in caught if "grpo_fused" in str(w.message)]  # warned once, not twice
    want = ref.grpo_loss(logits, ids, adv, mask, old)
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(again.loss, want.loss, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no compiler"):
        gf.grpo_loss(logits, ids, adv, mask, old, backend="cpp")


def test_build_guard_clears_a_killed_builds_lock_and_excludes_other_builds(tmp_path):
    # A JIT build killed part way leaves torch's plain `lock` file; torch.utils.cpp_extension would
    # then wait on it forever in every later process. Under the guard it is gone before torch looks.
    (tmp_path / "lock").write_text("")
    with _cpp_build._build_guard(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
        # Another process cannot take the guard while this one builds.
        probe = ("import fcntl, sys\n"
                 f"f = open({str(tmp_path / 'grpo_fused_build.lock')!r}, 'a')\n"
                 "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")
        assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 3
    probe_after = subprocess.run([sys.executable, "-c", probe], timeout=60)
    assert probe_after.returncode == 0  # released on exit


def test_torch_compile_fullgraph_through_the_cpp_op():
    torch._dynamo.reset()
    logits, ids, adv, mask, old, refl, _ = _loss_inputs(2, 5, 257, torch.float32)
    cfg = gf.GRPOConfig(loss_type="grpo", beta=0.04, entropy_coef=0.01)

    # The backend function itself: what must trace is the C++ op and the token math around it
    # (tests/test_dispatch.py compiles the public API, dispatcher included).
    def step(x):
        out = cpp_backend.grpo_loss(x, LossBatch(ids, adv, mask, old, refl), cfg.params)
        return out.loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss = compiled(a)
    loss.backward()
    want = step(b)
    want.backward()
    # aot_eager runs the traced ops as they are: the same bits as the uncompiled call, and both
    # answer to the tolerance rule against the float64 truth.
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    (truth, truth_grad), (eager, eager_grad) = _both(logits, ids, adv, mask, old, refl, cfg)[1:3]
    assert_close_to_truth(loss, truth.loss, eager.loss, ulps=ULPS_LOSS, what="compiled loss")
    assert_close_to_truth(a.grad, truth_grad, eager_grad, ulps=ULPS_GRAD, floor=0, what="compiled dlogits")

    def adv_fn(r):
        return cpp_backend.group_advantages(r, AdvantageRequest(group_size=4))[0]

    r = torch.randn(16)
    adv_compiled = torch.compile(adv_fn, fullgraph=True, backend="aot_eager")(r)
    torch.testing.assert_close(adv_compiled, adv_fn(r), rtol=0, atol=0)
    assert_close_to_truth(adv_compiled, ref.group_advantages(r.double(), 4)[0], ref.group_advantages(r, 4)[0],
                          ulps=ULPS_ADVANTAGE, what="compiled advantages")


def test_the_ops_check_their_arguments():
    ops = torch.ops.grpo_fused_cpp
    logits = torch.randn(4, 10)
    params = vocab_values(1.0)
    with pytest.raises(RuntimeError, match=f"params must be a contiguous \\({NUM_SLOTS},\\) float64 CPU tensor"):
        ops.logits_fwd(logits, torch.zeros(4, dtype=torch.long), params.float(), False)
    with pytest.raises(RuntimeError, match="ids must be"):
        ops.logits_fwd(logits, torch.zeros(4, dtype=torch.int32), params, False)
    with pytest.raises(RuntimeError, match="ids must be contiguous \\(4,\\)"):
        ops.logits_fwd(logits, torch.zeros(3, dtype=torch.long), params, False)
    with pytest.raises(RuntimeError, match="ids must lie in \\[0, 10\\), found 10"):
        ops.logits_fwd(logits, torch.tensor([0, 1, 10, 2]), params, False)
    with pytest.raises(RuntimeError, match="logits must be"):
        ops.logits_fwd(torch.randn(10), torch.zeros(1, dtype=torch.long), params, False)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.linear_fwd(torch.randn(4, 3), torch.randn(10, 5), None, torch.zeros(4, dtype=torch.long), params, False, 2)
    with pytest.raises(RuntimeError, match="group_index must lie"):
        ops.group_advantages(torch.randn(4), torch.tensor([0, 1, 2, 9]), 3, torch.empty(0, dtype=torch.bool), 0, True,
                             1e-4)
