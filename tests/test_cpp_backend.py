"""The C++ CPU backend against the eager reference.

Ground truth is the reference run in float64 on the same (already quantized) inputs; the
backend in the test dtype must land within a tolerance tied to that dtype. The first test that
needs the extension builds it (JIT, cached by torch.utils.cpp_extension).
"""

import itertools
import os
import shutil
import warnings

import pytest
import torch

import grpo_fused as gf
from grpo_fused import _cpp_build, _dispatch
from grpo_fused import reference as ref
from grpo_fused.backends import cpp as cpp_backend
from grpo_fused.semantics import AdvantageRequest, LossBatch, vocab_values

# Value / gradient tolerances per input dtype (absolute, on O(1) quantities). fp32: the kernel
# multiplies by 1/T instead of dividing and sums in a different order; bf16 / fp16: the
# gradient is written in the input dtype (rounding ~2^-8 / 2^-11 relative).
TOL = {
    torch.float64: dict(value=1e-10, grad=1e-10),
    torch.float32: dict(value=3e-5, grad=3e-6),
    torch.float16: dict(value=3e-5, grad=2e-3),
    torch.bfloat16: dict(value=3e-5, grad=8e-3),
}


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


def _truth_log_softmax(logits, ids, temperature, grad_logps, grad_entropy):
    """float64 reference values and the gradient of sum(logps * g1 + entropy * g2)."""
    x = logits.detach().to(torch.float64).requires_grad_()
    logps, entropy = ref.selective_log_softmax(x, ids, temperature, True)
    (logps * grad_logps.double() + entropy * grad_entropy.double()).sum().backward()
    return logps.detach(), entropy.detach(), x.grad


# V: 1 (degenerate), 33 (< one 16-lane step + tail), 257 (ragged), 5003 (three 2048-chunks, ragged).
@pytest.mark.parametrize("vocab", [1, 33, 257, 5003])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_values_and_grads(vocab, dtype, temperature):
    B, T = 3, 5  # N = 15 rows: odd, not a multiple of anything
    logits = _logits((B, T, vocab), dtype).requires_grad_()
    ids = _ids((B, T), vocab)
    g1 = torch.randn(B, T, dtype=torch.float64)
    g2 = torch.randn(B, T, dtype=torch.float64)
    logps, entropy = gf.selective_log_softmax(logits, ids, temperature, compute_entropy=True, backend="cpp")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert logps.dtype == acc and entropy.dtype == acc and logps.shape == (B, T)
    (logps * g1.to(acc) + entropy * g2.to(acc)).sum().backward()
    want_logps, want_entropy, want_grad = _truth_log_softmax(logits, ids, temperature, g1, g2)
    tol = TOL[dtype]
    scale = 1 + want_logps.abs()
    assert ((logps.double() - want_logps).abs() / scale).max() <= tol["value"]
    assert ((entropy.double() - want_entropy).abs() / (1 + want_entropy.abs())).max() <= tol["value"]
    assert logits.grad.dtype == dtype
    assert (logits.grad.double() - want_grad).abs().max() <= tol["grad"] * (1 + want_grad.abs().max())


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
        want_logps, want_entropy = ref.selective_log_softmax(logits, ids, 1.0, True)
        torch.testing.assert_close(logps.double(), want_logps, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-5, atol=1e-5)
        assert logps[1] == 0 and entropy[1] == 0
        # The reference's entropy gradient is NaN on -inf columns (0 * inf in autograd); the
        # logp gradient is the one to compare, and the entropy term must stay finite and 0 there.
        logps.sum().backward(retain_graph=True)
        y = logits.clone().requires_grad_()
        ref.selective_log_softmax(y, ids, 1.0)[0].sum().backward()
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-6)
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
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-5)
    strided_v = _logits((257, 3, 7), torch.float32).permute(1, 2, 0)
    got, _ = gf.selective_log_softmax(strided_v, ids, backend="cpp")
    want, _ = ref.selective_log_softmax(strided_v.double(), ids)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-5)
    # Gradient of a sliced view goes back to the right rows of the parent.
    parent = full.clone().requires_grad_()
    gf.selective_log_softmax(parent[:, :-1], ids, backend="cpp")[0].sum().backward()
    twin = full.double().requires_grad_()
    ref.selective_log_softmax(twin[:, :-1], ids)[0].sum().backward()
    torch.testing.assert_close(parent.grad.double(), twin.grad, rtol=0, atol=3e-6)
    assert (parent.grad[:, -1] == 0).all()


def test_leading_shapes_and_long_sequence():
    # 1-D logits (one token), 4-D logits, and T above 65535 (no grid limits on CPU, int64 rows).
    v = _logits((50,), torch.float32)
    got, _ = gf.selective_log_softmax(v, torch.tensor(3), backend="cpp")
    assert got.shape == ()
    torch.testing.assert_close(got.double(), ref.selective_log_softmax(v.double(), torch.tensor(3))[0], atol=3e-6, rtol=0)
    x = _logits((2, 3, 4, 19), torch.float32)
    ids = _ids((2, 3, 4), 19)
    got, ent = gf.selective_log_softmax(x, ids, compute_entropy=True, backend="cpp")
    want, want_ent = ref.selective_log_softmax(x.double(), ids, 1.0, True)
    torch.testing.assert_close(got.double(), want, atol=3e-6, rtol=0)
    torch.testing.assert_close(ent.double(), want_ent, atol=3e-6, rtol=0)
    long = _logits((1, 70000, 3), torch.float32)
    ids = _ids((1, 70000), 3)
    got, _ = gf.selective_log_softmax(long, ids, backend="cpp")
    torch.testing.assert_close(got.double(), ref.selective_log_softmax(long.double(), ids)[0], atol=3e-6, rtol=0)


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
    a = logits.clone().requires_grad_()
    b = logits.detach().double().requires_grad_()
    got = gf.grpo_loss(a, ids, adv, mask, old, refl, config=config, is_weights=is_w, backend="cpp", **kw)
    want = ref.grpo_loss(b, ids, adv.double(), mask, old, refl, config=config, is_weights=is_w)
    got.loss.backward()
    want.loss.backward()
    return got, want, a.grad, b.grad


def _assert_outputs_close(got, want, grad, want_grad, tol):
    atol = tol["value"] * 10
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=atol, atol=atol)
    torch.testing.assert_close(got.logps.double(), want.logps, rtol=atol, atol=atol)
    if want.entropy is not None:
        torch.testing.assert_close(got.entropy.double(), want.entropy, rtol=atol, atol=atol)
    assert set(got.metrics) == set(want.metrics)
    for k in want.metrics:
        torch.testing.assert_close(got.metrics[k].double(), want.metrics[k], rtol=atol, atol=atol, msg=k)
    assert torch.isfinite(grad).all()
    scale = 1 + want_grad.abs().max()
    assert (grad.double() - want_grad).abs().max() <= tol["grad"] * scale


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
        got, want, grad, want_grad = _both(
            logits, ids, adv, mask if use_mask else None, old if use_old else None, refl if beta else None, cfg,
            is_w if level == "sequence" else None,
        )
        _assert_outputs_close(got, want, grad, want_grad, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "gmpo"])
def test_grpo_loss_low_precision(dtype, loss_type):
    B, T, V = 3, 7, 2111  # V straddles a 2048 chunk
    logits, ids, adv, mask, old, refl, _ = _loss_inputs(B, T, V, dtype, seed=5)
    cfg = gf.GRPOConfig(loss_type=loss_type, beta=0.04, temperature=0.9, entropy_coef=0.01)
    got, want, grad, want_grad = _both(logits, ids, adv, mask, old, refl, cfg)
    _assert_outputs_close(got, want, grad, want_grad, TOL[dtype])


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
    truth = [t.detach().double().requires_grad_() for t in leaves]
    want = ref.linear_grpo_loss(truth[0], truth[1], ids, adv, mask, old, bias=truth[2] if with_bias else None,
                                config=cfg)
    want.loss.backward()
    value_tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=value_tol, atol=value_tol)
    torch.testing.assert_close(got.logps.double(), want.logps, rtol=value_tol, atol=value_tol * 10)
    torch.testing.assert_close(got.entropy.double(), want.entropy, rtol=value_tol, atol=value_tol * 10)
    grad_tol = TOL[dtype]["grad"] * 4  # a GEMM (sum over V) lies between the row gradient and these
    for leaf, twin in zip(leaves, truth):
        assert leaf.grad.dtype == leaf.dtype
        err = (leaf.grad.double() - twin.grad).abs().max()
        assert err <= grad_tol * (1 + twin.grad.abs().max()), err


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
    torch.testing.assert_close(hidden.grad, twin_h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bias.grad, twin_b.grad, rtol=1e-10, atol=1e-12)


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
    assert int(re.search(r"kNumSlots = (\d+)", header).group(1)) == semantics.NUM_SLOTS
    codes = dict(re.findall(r"kScale(\w+) = (\d+)", header))
    assert {name.lower(): int(v) for name, v in codes.items()} == {n: int(s) for n, s in semantics.ADVANTAGE_SCALES.items()}


# --------------------------------------------------------------------------------------
# Group advantages.
# --------------------------------------------------------------------------------------


def _assert_group_outputs(got, want, atol):
    (adv, stats), (want_adv, want_stats) = got, want
    torch.testing.assert_close(adv.double(), want_adv.double(), rtol=atol, atol=atol)
    for name in ("mean", "std"):
        torch.testing.assert_close(getattr(stats, name).double(), getattr(want_stats, name).double(), rtol=atol,
                                   atol=atol, equal_nan=True, msg=name)
    for name in ("count", "zero_std", "group_index"):
        assert torch.equal(getattr(stats, name), getattr(want_stats, name)), name
    torch.testing.assert_close(stats.frac_zero_std.double(), want_stats.frac_zero_std)
    torch.testing.assert_close(stats.rewards.double(), want_stats.rewards, equal_nan=True)


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
            _assert_group_outputs(got, want, 1e-12 if dtype == torch.float64 else 2e-6)
            assert got[0].dtype == dtype and torch.isfinite(got[0]).all()


def test_group_advantages_hand_computed_and_weighted():
    rewards = torch.tensor([[1.0, float("nan")], [2.0, 1.0], [3.0, 1.0], [5.0, 5.0]])
    adv, stats = gf.group_advantages(rewards, 2, reward_weights=torch.tensor([1.0, 0.5]), backend="cpp")
    # combined: [1, 2.5, 3.5, 7.5]; groups [1, 2.5] and [3.5, 7.5]; unbiased stds 1.0607, 2.8284
    torch.testing.assert_close(stats.rewards, torch.tensor([1.0, 2.5, 3.5, 7.5]))
    torch.testing.assert_close(stats.mean, torch.tensor([1.75, 5.5]))
    s1, s2 = 1.5 / 2**0.5, 4.0 / 2**0.5
    torch.testing.assert_close(stats.std, torch.tensor([s1, s2]))
    torch.testing.assert_close(adv, torch.tensor([-0.75 / (s1 + 1e-4), 0.75 / (s1 + 1e-4), -2 / (s2 + 1e-4),
                                                  2 / (s2 + 1e-4)]))


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
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(a.grad, b.grad)

    def adv_fn(r):
        return cpp_backend.group_advantages(r, AdvantageRequest(group_size=4))[0]

    r = torch.randn(16)
    torch.testing.assert_close(torch.compile(adv_fn, fullgraph=True, backend="aot_eager")(r), adv_fn(r))


def test_the_ops_check_their_arguments():
    ops = torch.ops.grpo_fused_cpp
    logits = torch.randn(4, 10)
    params = vocab_values(1.0)
    with pytest.raises(RuntimeError, match="params must be a contiguous \\(12,\\) float64 CPU tensor"):
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
