"""The fused linear path (chunked and tiled strategies) against the reference on materialized logits.

Ground truth is :mod:`grpo_fused.reference` in float64 on the same (rounded) inputs; eager
PyTorch is the same reference on the inputs as they are (fp32 GEMM and token math for bf16 /
fp16 / fp32 inputs, gradients in each input's dtype). Every result answers to the one rule of
tests/tolerance.py: no worse than eager's own error plus a few ulps of its dtype.

Shapes, under the CPU interpreter (tiles 16 x 64 x 16, two vocab splits, see
``linear_tiled.default_config``): B=3, T=5 (N=15, not a multiple of BLOCK_N=16); H=40 (two full
and one partial BLOCK_H slice); V=257 (four full vocab tiles and one 1-column tile, the two
splits uneven). V=40 is smaller than one vocab tile. On CUDA the same tests run, plus larger shapes.
"""

from __future__ import annotations

import pytest
import torch

import grpo_fused as gf
from grpo_fused import reference as R
from grpo_fused import GRPOConfig

from conftest import DEVICE
from tolerance import ULPS_GRAD, ULPS_LOSS, ULPS_VALUE, assert_close_to_truth

pytest.importorskip("triton")

from grpo_fused.backends.triton import resolve_strategy  # noqa: E402
from grpo_fused.kernels import linear_chunked, linear_tiled, splits  # noqa: E402
from grpo_fused.kernels import linear_log_softmax as linear_op  # noqa: E402
from grpo_fused.semantics import vocab_values  # noqa: E402


def temp(temperature):
    """The kernels' hyperparameter vector for a temperature, on the test device."""
    return vocab_values(temperature).to(DEVICE)


def linear_log_softmax(h, w, ids, temperature=1.0, b=None, compute_entropy=False, strategy="auto", *,
                       chunk_size=None, vocab_slice=None, filter_eps=None):
    """A strategy's vocab pass, called directly (``vocab_slice`` is not part of the public API)."""
    chosen = (linear_tiled.Tiled(filter_eps) if resolve_strategy(strategy) == "tiled"
              else linear_chunked.Chunked(chunk_size, vocab_slice))
    return linear_op.linear_log_softmax(h, w, ids, temp(temperature), b, compute_entropy, chosen)


def linear_grpo_loss(config, strategy, **inputs):
    """The public linear loss on the Triton backend."""
    return gf.linear_grpo_loss(config=config, strategy=strategy, backend="triton", **inputs)

STRATEGIES = ("chunked", "tiled")
B, T, H, V = 3, 5, 40, 257
N = B * T
# chunk_size=4 splits N=15 into 4 chunks, the last one ragged (3 tokens); vocab_slice=48 splits
# V=257 into 6 slices in the backward's weight pass, the last one ragged (17 columns).
CHUNKED = {"chunk_size": 4, "vocab_slice": 48}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_linear(n, h, v, dtype, bias=True, seed=0, logit_scale=3.0):
    """hidden (n, h), weight (v, h), bias (v,) with logits of std ~ logit_scale."""
    g = _gen(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (logit_scale / h**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    to = dict(device=DEVICE, dtype=dtype)
    return hidden.to(**to), weight.to(**to), None if b is None else b.to(**to), ids.to(DEVICE)


def _grads(fn, hidden, weight, bias, seed=7, entropy_weight=True):
    """Values of fn(hidden, weight, bias) -> (logps, entropy) and the gradients of a random
    linear functional of them with respect to hidden, weight and bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logps, entropy = fn(*leaves, *([None] if bias is None else []))
    g = _gen(seed)
    gl = torch.randn(logps.shape, generator=g, dtype=torch.float64).to(DEVICE)
    total = (logps.double() * gl).sum()
    if entropy is not None and entropy_weight:
        ge = torch.randn(entropy.shape, generator=g, dtype=torch.float64).to(DEVICE)
        total = total + (entropy.double() * ge).sum()
    grads = torch.autograd.grad(total, leaves)
    return logps.detach(), None if entropy is None else entropy.detach(), grads


NAMES = ("logps", "entropy", "dhidden", "dweight", "dbias")
# Gradients through the GEMMs: fp32 dhidden / dweight / dbias sum over V and N in another order
# than eager's GEMMs [needs up to 8.3 ulps: chunked dweight, cispo two-sided]; bf16 / fp16 ones
# are rounded twice, dlogits to the GEMM's dtype (chunked) and the GEMM's output [0.93: fp16
# dweight]; fp64 [10.6: chunked dweight] as the logits gradients.
ULPS_LINEAR_GRAD = {**ULPS_GRAD, torch.float32: 32, torch.bfloat16: 2, torch.float16: 2}
# Logits of size ~300 (test_large_logits): p = exp(z - lse) carries the rounding of numbers 30x
# those of the other tests, and the tiled weight gradient errs 44 fp32 ulps beyond eager's.
ULPS_LARGE_LOGITS_GRAD = {torch.float32: 128}


def _check(actual, truth, eager, ulp_dtype=None, dtype=None, what="", grad_ulps=ULPS_LINEAR_GRAD):
    """Every result of ``actual`` against ``truth`` (float64), with ``eager``'s error (None: none).
    Values have a floor of 1; gradients none (the upstream weights are N(0, 1), the gradients
    a mean over tokens of smaller size)."""
    eager = _flatten(eager) if eager is not None else [None] * len(NAMES)
    for name, a, t, e in zip(NAMES, _flatten(actual), _flatten(truth), eager):
        if t is None:
            assert a is None, name
            continue
        grad = name.startswith("d")
        assert_close_to_truth(a, t, e, ulps=grad_ulps if grad else ULPS_VALUE, floor=0.0 if grad else 1.0,
                              ulp_dtype=ulp_dtype, dtype=dtype, what=f"{what} {name}")


def _flatten(result):
    logps, entropy, grads = result
    grads = list(grads) + [None] * (3 - len(grads))
    return [logps, entropy] + grads


def _reference(hidden, weight, bias, ids, temperature, compute_entropy, dtype=torch.float64):
    """The reference with the inputs cast to ``dtype`` (float64: the truth), or as they are
    (``dtype=None``: eager PyTorch, which computes bf16 / fp16 / fp32 inputs in fp32)."""
    def fn(h, w, b):
        cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))  # noqa: E731
        return R.linear_log_softmax(cast(h), cast(w), ids, temperature, cast(b), compute_entropy)

    return _grads(fn, hidden, weight, bias)


def _eager(hidden, weight, bias, ids, temperature, compute_entropy):
    return _reference(hidden, weight, bias, ids, temperature, compute_entropy, dtype=None)


def _fused(strategy, hidden, weight, bias, ids, temperature, compute_entropy, **kw):
    def fn(h, w, b):
        return linear_log_softmax(h, w, ids, temperature, b, compute_entropy, strategy, **kw)

    return _grads(fn, hidden, weight, bias)


# --------------------------------------------------------------------------------------
# linear_log_softmax: values and gradients.
# --------------------------------------------------------------------------------------

# A covering subset: every dtype, bias on/off, temperature 1 / not 1, entropy on/off, each
# at least once per strategy; fp64 runs through the chunked strategy at fp64 accuracy.
LOG_SOFTMAX_CASES = [
    (torch.float32, True, 1.0, True),
    (torch.float32, False, 0.7, True),
    (torch.float32, True, 1.6, False),
    (torch.float64, True, 0.9, True),
    (torch.bfloat16, True, 1.0, True),
    (torch.float16, False, 1.2, True),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype,bias,temperature,entropy", LOG_SOFTMAX_CASES)
def test_linear_log_softmax_matches_reference(strategy, dtype, bias, temperature, entropy):
    hidden, weight, b, ids = make_linear(N, H, V, dtype, bias=bias, seed=1)
    truth = _reference(hidden, weight, b, ids, temperature, entropy)
    got = _fused(strategy, hidden, weight, b, ids, temperature, entropy, **(CHUNKED if strategy == "chunked" else {}))
    if dtype != torch.float64:
        _check(got, truth, _eager(hidden, weight, b, ids, temperature, entropy))
    elif strategy == "tiled":  # computes fp64 inputs in fp32: eager fp32 is its baseline, in fp32 ulps
        fp32 = _reference(hidden, weight, b, ids, temperature, entropy, dtype=torch.float32)
        _check(got, truth, fp32, ulp_dtype=torch.float32, dtype=torch.float64)
    else:  # chunked computes fp64 in fp64: eager is the truth
        _check(got, truth, None)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == out_dtype and got[0].shape == (N,)
    assert [g.dtype for g in got[2]] == [dtype] * len(got[2])


def test_chunked_fp64_is_fp64_accurate():
    hidden, weight, b, ids = make_linear(N, H, V, torch.float64, seed=2)
    truth = _reference(hidden, weight, b, ids, 0.8, True)
    got = _fused("chunked", hidden, weight, b, ids, 0.8, True, **CHUNKED)
    _check(got, truth, None)  # eager in fp64 is the truth


def test_chunked_gradcheck_fp64():
    # The chunked strategy computes fp64 inputs in fp64, so autograd.gradcheck applies (fast mode:
    # a few random directions, each a handful of interpreter launches). V=37, 3 tokens, 2 chunks.
    hidden, weight, b, ids = make_linear(3, 8, 37, torch.float64, seed=13)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]

    def fn(h, w, bb):
        logps, entropy = linear_log_softmax(h, w, ids, 0.8, bb, True, "chunked", chunk_size=2, vocab_slice=16)
        return logps, entropy

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_mixed_dtypes_hidden_bf16_weight_fp32():
    # Computed in the promoted dtype (fp32); gradients come back in each input's own dtype.
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=14)
    hidden = hidden.to(torch.bfloat16)
    truth = _reference(hidden, weight, b, ids, 1.0, True)
    eager = _eager(hidden, weight, b, ids, 1.0, True)  # fp32 math, dhidden rounded to bf16
    # dhidden is one fp32 GEMM rounded once to bf16, as eager's: k = 0.5 keeps the former bound
    # (2^-8 of the largest entry), where ULPS_LINEAR_GRAD's 2 would be 4x looser.
    grad_ulps = {**ULPS_LINEAR_GRAD, torch.bfloat16: 0.5}
    for strategy in STRATEGIES:
        got = _fused(strategy, hidden, weight, b, ids, 1.0, True)
        assert [g.dtype for g in got[2]] == [torch.bfloat16, torch.float32, torch.float32]
        _check(got, truth, eager, what=strategy, grad_ulps=grad_ulps)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vocab_smaller_than_one_tile_and_leading_dims(strategy):
    # V=40 < BLOCK_V: every column lane past 40 is masked; hidden (B, T, H) keeps its leading dims.
    hidden, weight, b, ids = make_linear(N, H, 40, torch.float32, seed=3)
    hidden, ids = hidden.view(B, T, H), ids.view(B, T)
    truth = _reference(hidden, weight, b, ids, 1.0, True)
    got = _fused(strategy, hidden, weight, b, ids, 1.0, True)
    assert got[0].shape == (B, T) and got[1].shape == (B, T)
    _check(got, truth, _eager(hidden, weight, b, ids, 1.0, True))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masked_vocab_minus_inf_bias(strategy):
    # Half the vocab masked with a -inf bias, never a target; one row can reach only its target
    # (all its other logits -inf through the mask: logp 0, entropy 0). V=257 so -inf columns fall
    # in every tile, and the 1-column last tile is fully -inf (online-lse NaN trap).
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=4)
    masked = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    masked[1::2] = True
    masked[V - 1] = True
    ids = torch.where(masked[ids], (ids // 2) * 2, ids)
    ids[0] = 0
    bias = b.masked_fill(masked, float("-inf"))
    got = _fused(strategy, hidden, weight, bias, ids, 1.0, True, **(CHUNKED if strategy == "chunked" else {}))
    # The reference's entropy gradient is NaN on -inf columns (0 * -inf); compare logps' gradients
    # there, and the entropy values.
    def reference_logps(cast):
        return _grads(lambda h, w, bb: (R.linear_log_softmax(cast(h), cast(w), ids, 1.0, cast(bb))[0], None),
                      hidden, weight, bias)

    ref_lp, eager_lp = reference_logps(torch.Tensor.double), reference_logps(lambda t: t)
    ours_lp = _grads(lambda h, w, bb: (linear_log_softmax(h, w, ids, 1.0, bb, False, strategy)[0], None),
                     hidden, weight, bias)
    # The bias gradient is 0 (not NaN) on masked columns, both here and in the reference.
    _check(ours_lp, ref_lp, eager_lp, what="logps only")
    ref_ent = R.linear_log_softmax(hidden.double(), weight.double(), ids, 1.0, bias.double(), True)[1]
    eager_ent = R.linear_log_softmax(hidden, weight, ids, 1.0, bias, True)[1]
    assert_close_to_truth(got[1], ref_ent, eager_ent, ulps=ULPS_VALUE, what="entropy")
    for t in _flatten(got):
        assert torch.isfinite(t).all()
    assert (got[2][2][masked] == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_target_reachable(strategy):
    # Every logit -inf but the target's (a -inf bias elsewhere): logp = 0 and entropy = 0
    # exactly, and a zero gradient, with no NaN from the all -inf tiles.
    hidden, weight, _, _ = make_linear(N, H, V, torch.float32, seed=5)
    ids = torch.full((N,), 130, device=DEVICE)
    bias = torch.full((V,), float("-inf"), device=DEVICE)
    bias[130] = 0.0
    logps, entropy, grads = _fused(strategy, hidden, weight, bias, ids, 1.0, True)
    assert (logps == 0).all() and (entropy == 0).all()
    for g in grads:
        assert (g == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_large_logits(strategy):
    # Logits of magnitude ~300: exp overflows unless the max is subtracted.
    # entropy = lse - sum p z cancels two numbers ~300 in size: the bound is PyTorch's own fp32 error.
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=6, logit_scale=100.0)
    truth = _reference(hidden, weight, b, ids, 1.0, True)
    got = _fused(strategy, hidden, weight, b, ids, 1.0, True)
    _check(got, truth, _eager(hidden, weight, b, ids, 1.0, True), grad_ulps=ULPS_LARGE_LOGITS_GRAD)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_inputs_and_int32_ids(strategy):
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=8)
    # hidden as a strided view (every other column of a wider buffer), weight transposed storage.
    wide = torch.zeros(N, 2 * H, device=DEVICE)
    wide[:, ::2] = hidden
    hidden_nc = wide[:, ::2]
    weight_nc = weight.t().contiguous().t()
    assert not hidden_nc.is_contiguous() and not weight_nc.is_contiguous()
    truth = _reference(hidden, weight, b, ids, 1.0, True)
    got = _fused(strategy, hidden_nc, weight_nc, b, ids.to(torch.int32), 1.0, True)
    _check(got, truth, _eager(hidden, weight, b, ids, 1.0, True))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inputs_not_modified(strategy):
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=9)
    copies = [t.clone() for t in (hidden, weight, b, ids)]
    _fused(strategy, hidden, weight, b, ids, 0.9, True)
    for t, c in zip((hidden, weight, b, ids), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_of_logps_only_and_entropy_only(strategy):
    # Backward with one of the two output gradients absent (None inside the Function).
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=10)
    for pick in (0, 1):
        def ref_fn(h, w, bb, cast=torch.Tensor.double):
            out = R.linear_log_softmax(cast(h), cast(w), ids, 1.0, cast(bb), True)
            return out[pick], None

        def fused_fn(h, w, bb):
            out = linear_log_softmax(h, w, ids, 1.0, bb, True, strategy)
            return out[pick], None

        truth = _grads(ref_fn, hidden, weight, b)
        eager = _grads(lambda h, w, bb: ref_fn(h, w, bb, cast=lambda t: t), hidden, weight, b)
        got = _grads(fused_fn, hidden, weight, b)
        _check(got, truth, eager, what=("logps", "entropy")[pick] + " only")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_lm_head_and_frozen_hidden(strategy):
    # Only the leaves that require grad get one (a frozen lm_head, as with LoRA, skips dweight).
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=15)
    truth = _reference(hidden, weight, b, ids, 1.0, True)
    eager = _eager(hidden, weight, b, ids, 1.0, True)
    for trainable in ("hidden", "weight"):
        h = hidden.clone().requires_grad_(trainable == "hidden")
        w = weight.clone().requires_grad_(trainable == "weight")
        logps, entropy = linear_log_softmax(h, w, ids, 1.0, b, True, strategy)
        g = _gen(7)
        gl = torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE)
        ge = torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE)
        ((logps.double() * gl).sum() + (entropy.double() * ge).sum()).backward()
        i = 0 if trainable == "hidden" else 1
        leaf, frozen = (h, w) if trainable == "hidden" else (w, h)
        assert frozen.grad is None
        assert_close_to_truth(leaf.grad, truth[2][i], eager[2][i], ulps=ULPS_LINEAR_GRAD, floor=0,
                              what=f"d{trainable}")


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in bytes) any torch op returns while active. Bytes, not
    elements: the interpreter moves kernel arguments as raw (uint8) storages."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_logits_never_materialized(strategy):
    # The full fp32 logits would be N*V*4 = 65792 bytes; chunked may hold one 16-token chunk of
    # them (16*V*4 = 16448) or one 64-column vocab slice (N*64*4 = 16384), tiled nothing of
    # size V beyond the weight and its gradient (V*H*4 = 8224).
    n, h, v, chunk, width = 64, 8, 257, 16, 64
    hidden, weight, b, ids = make_linear(n, h, v, torch.float32, seed=17)
    hidden.requires_grad_()
    weight.requires_grad_()
    with _LargestTensor() as probe:
        logps, entropy = linear_log_softmax(hidden, weight, ids, 1.0, b, True, strategy,
                                            **({"chunk_size": chunk, "vocab_slice": width} if strategy == "chunked" else {}))
        (logps.sum() + entropy.sum()).backward()
    limit = 4 * (max(chunk * v, n * width) if strategy == "chunked" else v * h)
    assert probe.largest <= limit < 4 * n * v


def test_tiled_vocab_splits_merge():
    # The forward merges per-split partials; 1, 3 and 5 (= one tile each) splits agree with the truth.
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=11)
    truth = R.linear_log_softmax(hidden.double(), weight.double(), ids, 1.0, b.double(), True)
    eager = R.linear_log_softmax(hidden, weight, ids, 1.0, b, True)
    for num_splits in (1, 3, 5):
        cfg = linear_tiled.TiledConfig(block_n=16, block_v=64, block_h=16, num_splits=num_splits, num_warps=4)
        logps, lse, entropy = linear_tiled.Tiled(config=cfg).forward(hidden, weight, b, ids, temp(1.0), True)
        assert_close_to_truth(logps, truth[0], eager[0], ulps=ULPS_VALUE, what=f"{num_splits} splits logps")
        assert_close_to_truth(entropy, truth[1], eager[1], ulps=ULPS_VALUE, what=f"{num_splits} splits entropy")
        # Same split count, same bits: the merge order is fixed.
        again = linear_tiled.Tiled(config=cfg).forward(hidden, weight, b, ids, temp(1.0), True)
        assert all(torch.equal(x, y) for x, y in zip((logps, lse, entropy), again))


def test_tiled_gradient_filtering():
    # Peaked softmax (logit std 12): most tiles hold no probability mass above 2**-12.
    # The interpreter's small tiles on every device, so that which tiles hold a target is known.
    cfg = linear_tiled.TiledConfig(block_n=16, block_v=64, block_h=16, num_splits=2, num_warps=4)
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=12, logit_scale=12.0)

    def tiled(filter_eps):
        return _grads(lambda h, w, bb: linear_op.linear_log_softmax(h, w, ids, temp(1.0), bb, True, linear_tiled.Tiled(filter_eps, cfg)),
                      hidden, weight, b)

    exact = tiled(None)
    # Default threshold: an approximation, but within half a bf16 ulp (2^-8, relative to the
    # largest entry, floor 1) of the unfiltered kernel's gradient, which serves as the truth here.
    filtered = tiled(linear_tiled.DEFAULT_FILTER_EPS)
    assert torch.equal(filtered[0], exact[0])
    for name, a, e in zip(NAMES[2:], filtered[2], exact[2]):
        assert_close_to_truth(a, e, ulps=0.5, ulp_dtype=torch.bfloat16, dtype=e.dtype, what=f"filtered {name}")
    assert not torch.equal(filtered[2][1], exact[2][1])  # some tile was skipped
    # A threshold above any probability skips every tile without a target: those weight rows
    # get exactly zero gradient, the tiles holding a target keep their exact gradient.
    everything = tiled(2.0)
    assert N <= cfg.block_n  # one token block: a tile is kept iff it holds some row's target
    num_tiles = -(-V // cfg.block_v)
    has_target = torch.zeros(num_tiles, dtype=torch.bool, device=DEVICE)
    has_target[ids // cfg.block_v] = True
    kept_rows = has_target.repeat_interleave(cfg.block_v)[:V]
    dweight, dweight_exact = everything[2][1], exact[2][1]
    assert (~kept_rows).any() and (dweight_exact[~kept_rows] != 0).any()
    assert (dweight[~kept_rows] == 0).all()
    assert torch.equal(dweight[kept_rows], dweight_exact[kept_rows])  # same tiles, same order: same bits


def test_chunk_rows_from_shapes():
    # Qwen2.5-7B head in bf16: fp32 logits + bf16 dlogits = 6 bytes a logit.
    assert splits.logit_bytes(torch.bfloat16) == 6
    assert splits.logit_bytes(torch.float32) == 4
    # 512 MiB of them is 588 tokens, rounded down to 576, whatever N.
    assert splits.chunk_rows(16384, 151936, 6) == 576
    assert splits.chunk_rows(131072, 151936, 6) == 576
    # The weight pass's vocab slices at N = 16384: 5461 columns -> 5456.
    assert splits.chunk_rows(151936, 16384, 6) == 5456
    # Few tokens: one chunk of all of them. A huge vocab: never below 16 tokens.
    assert splits.chunk_rows(10, 257, 4) == 10
    assert splits.chunk_rows(1000, 2**24, 4) == 16


def test_resolve_strategy():
    assert resolve_strategy("auto") == "chunked"
    assert resolve_strategy("tiled") == "tiled"
    with pytest.raises(ValueError, match="strategy"):
        gf.linear_log_softmax(torch.zeros(2, 4, device=DEVICE), torch.zeros(3, 4, device=DEVICE),
                              torch.zeros(2, dtype=torch.long, device=DEVICE), strategy="dense", backend="triton")


# --------------------------------------------------------------------------------------
# linear_grpo_loss over the option matrix.
# --------------------------------------------------------------------------------------

# A covering subset of the option matrix: every loss type, both IS levels (sequence level with
# clip and geometric-mean surrogates), every KL estimator, bias correction on/off, delta,
# dual-clip, entropy bonus on/off, temperature, every verl aggregation mode, is_weights,
# num_items_in_batch, the three advantage shapes and the on-policy case (old_logps None).
GRPO_CASES = [
    (dict(loss_type="dapo"), dict(adv="B")),
    (dict(loss_type="grpo", beta=0.04, temperature=0.7), dict(adv="B1", old=False)),
    (dict(loss_type="bnpo", delta=1.1, epsilon_high=0.28), dict(adv="BT")),
    (dict(loss_type="dr_grpo", clip_ratio_c=1.5, max_completion_length=8), dict(adv="B")),
    (dict(loss_type="luspo", importance_sampling_level="sequence"), dict(adv="B1", is_weights="BT")),
    (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, kl_estimator="low_var_kl",
          entropy_coef=0.01), dict(adv="BT")),
    (dict(loss_type="cispo", epsilon_high=1.05, beta=0.02, kl_estimator="k1", use_bias_correction_kl=False),
     dict(adv="B", num_items=40)),
    (dict(loss_type="cispo", cispo_two_sided=True, temperature=1.3), dict(adv="B1")),
    (dict(loss_type="sapo", entropy_coef=0.05), dict(adv="B", is_weights="B")),
    (dict(loss_type="gmpo", beta=0.05, kl_estimator="k2"), dict(adv="B", is_weights="BT")),
    (dict(loss_type="gpg", beta=0.01, kl_estimator="abs"), dict(adv="BT")),
    (dict(loss_type="dapo", loss_agg_mode="token-mean", dp_size=2), dict(adv="B", num_items=30)),
    (dict(loss_type="dapo", loss_agg_mode="seq-mean-token-sum", compute_entropy=False), dict(adv="B1", global_bs=4)),
    (dict(loss_type="grpo", loss_agg_mode="seq-mean-token-mean", importance_sampling_level="sequence"), dict(adv="B")),
    (dict(loss_type="dapo", loss_agg_mode="seq-mean-token-sum-norm", max_completion_length=6), dict(adv="B")),
]


def make_loss_inputs(dtype, seed, opts, temperature, bias=True):
    hidden, weight, b, ids = make_linear(N, H, V, dtype, bias=bias, seed=seed)
    g = _gen(seed + 100)
    hidden, ids = hidden.view(B, T, H), ids.view(B, T)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a sequence with no masked-in token
    mask[0, 0] = True
    adv_shape = {"B": (B,), "B1": (B, 1), "BT": (B, T)}[opts.get("adv", "B")]
    advantages = torch.randn(adv_shape, generator=g)
    # Old / ref log-probs near the current ones, so ratios straddle the clip range.
    current = R.linear_log_softmax(hidden.double(), weight.double(), ids, temperature, None if b is None else b.double())[0]
    old = (current.cpu() + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (current.cpu() + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    is_weights = None
    if opts.get("is_weights"):
        is_weights = torch.rand({"B": (B,), "BT": (B, T)}[opts["is_weights"]], generator=g) + 0.5
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(
        hidden=hidden, weight=weight, bias=b, completion_ids=ids, advantages=dev(advantages),
        completion_mask=dev(mask), old_logps=dev(old) if opts.get("old", True) else None, ref_logps=dev(ref),
        is_weights=dev(is_weights), num_items_in_batch=opts.get("num_items"), global_batch_size=opts.get("global_bs"),
    )


def _loss_and_grads(fn, inputs, dtype=None):
    """(GRPOOutput, grads of the loss w.r.t. hidden, weight, bias) with the leaves cast to dtype."""
    leaves = {k: inputs[k].detach().clone().to(dtype or inputs[k].dtype).requires_grad_()
              for k in ("hidden", "weight", "bias") if inputs[k] is not None}
    out = fn(**{**inputs, **leaves})
    grads = torch.autograd.grad(out.loss, list(leaves.values()))
    return out, grads


def _reference_loss(config, inputs, dtype=None):
    """The reference loss and gradients: the truth with ``dtype=torch.float64``, eager PyTorch with
    the inputs as they are (``None``)."""
    return _loss_and_grads(lambda **kw: R.linear_grpo_loss(config=config, **kw), inputs, dtype)


def _compare_outputs(got, truth, eager, mask):
    """Loss, logps, entropy and metrics (floor 1) and the gradients (floor 0: of a mean loss,
    small by construction) against the truth, with eager's error. Per-token outputs only where
    ``mask`` is in: the public API reads the ids of masked positions as 0 (d0b4523)."""
    (out, grads), (ref_out, ref_grads), (eager_out, eager_grads) = got, truth, eager
    assert set(out.metrics) == set(ref_out.metrics)
    where = None if mask is None else mask != 0
    checks = [("loss", out.loss, ref_out.loss, eager_out.loss, ULPS_LOSS, None),
              ("logps", out.logps, ref_out.logps, eager_out.logps, ULPS_VALUE, where)]
    checks += [(f"metric {k}", out.metrics[k], ref_out.metrics[k], eager_out.metrics[k], ULPS_LOSS, None)
               for k in ref_out.metrics]
    if ref_out.entropy is None:
        assert out.entropy is None
    else:
        checks.append(("entropy", out.entropy, ref_out.entropy, eager_out.entropy, ULPS_VALUE, where))
    for name, a, t, e, k, w in checks:
        assert_close_to_truth(a, t, e, ulps=k, where=w, what=name)
    for name, g, t, e in zip(NAMES[2:], grads, ref_grads, eager_grads):
        assert_close_to_truth(g, t, e, ulps=ULPS_LINEAR_GRAD, floor=0, what=name)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", range(len(GRPO_CASES)))
def test_linear_grpo_loss_option_matrix(strategy, case):
    cfg_kwargs, opts = GRPO_CASES[case]
    config = GRPOConfig(**cfg_kwargs)
    inputs = make_loss_inputs(torch.float32, seed=20 + case, opts=opts, temperature=config.temperature, bias=case % 2 == 0)
    truth = _reference_loss(config, inputs, torch.float64)
    got = _loss_and_grads(lambda **kw: linear_grpo_loss(config=config, strategy=strategy, **kw), inputs)
    _compare_outputs(got, truth, _reference_loss(config, inputs), inputs["completion_mask"])
    # The hidden states' gradient is zero on the fully masked sequence, except where the
    # sequence-level terms or the entropy bonus reach it through other sequences (they do not).
    assert (got[1][0][1] == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_grpo_loss_bf16(strategy):
    config = GRPOConfig(loss_type="grpo", beta=0.04, importance_sampling_level="sequence", entropy_coef=0.01)
    inputs = make_loss_inputs(torch.bfloat16, seed=40, opts=dict(adv="B"), temperature=1.0)
    truth = _reference_loss(config, inputs, torch.float64)
    got = _loss_and_grads(lambda **kw: linear_grpo_loss(config=config, strategy=strategy, **kw), inputs)
    assert got[0].logps.dtype == torch.float32 and [g.dtype for g in got[1]] == [torch.bfloat16] * 3
    _compare_outputs(got, truth, _reference_loss(config, inputs), inputs["completion_mask"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_masked_batch(strategy):
    inputs = make_loss_inputs(torch.float32, seed=41, opts=dict(adv="B"), temperature=1.0)
    inputs["completion_mask"] = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    out, grads = _loss_and_grads(lambda **kw: linear_grpo_loss(config=GRPOConfig(beta=0.04), strategy=strategy, **kw), inputs)
    assert out.loss.item() == 0.0
    for g in grads:
        assert (g == 0).all()


# --------------------------------------------------------------------------------------
# Through the public API and the module.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ("auto", "chunked", "tiled"))
def test_public_api_backend_triton(strategy):
    config = GRPOConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28)
    inputs = make_loss_inputs(torch.float32, seed=50, opts=dict(adv="B"), temperature=1.0)
    truth = _reference_loss(config, inputs, torch.float64)
    eager = _reference_loss(config, inputs)
    got = _loss_and_grads(lambda **kw: gf.linear_grpo_loss(config=config, strategy=strategy, backend="triton", **kw), inputs)
    _compare_outputs(got, truth, eager, inputs["completion_mask"])
    module = gf.LinearGRPOLoss(config, strategy=strategy, backend="triton")
    args = {k: v for k, v in inputs.items() if k not in ("hidden", "weight", "completion_ids", "advantages")}
    by_module = module(inputs["hidden"], inputs["weight"], inputs["completion_ids"], inputs["advantages"], **args)
    assert_close_to_truth(by_module.loss, truth[0].loss, eager[0].loss, ulps=ULPS_LOSS, what="module loss")

    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=51)
    logps, entropy = gf.linear_log_softmax(hidden, weight, ids, 0.8, bias=b, compute_entropy=True,
                                           strategy=strategy, backend="triton")
    ref_logps, ref_entropy = R.linear_log_softmax(hidden.double(), weight.double(), ids, 0.8, b.double(), True)
    eager_logps, eager_entropy = R.linear_log_softmax(hidden, weight, ids, 0.8, b, True)
    assert_close_to_truth(logps, ref_logps, eager_logps, ulps=ULPS_VALUE, what="logps")
    assert_close_to_truth(entropy, ref_entropy, eager_entropy, ulps=ULPS_VALUE, what="entropy")


def test_public_api_bad_inputs():
    hidden, weight, b, ids = make_linear(N, H, V, torch.float32, seed=52)
    hidden, ids = hidden.view(B, T, H), ids.view(B, T)
    adv = torch.randn(B, device=DEVICE)
    with pytest.raises(ValueError, match="strategy"):
        gf.linear_grpo_loss(hidden, weight, ids, adv, strategy="dense", backend="triton")
    with pytest.raises(ValueError, match="strategy"):
        gf.linear_log_softmax(hidden, weight, ids, strategy="dense", backend="triton")
    with pytest.raises(ValueError, match="weight"):
        gf.linear_grpo_loss(hidden, weight[:, :-1], ids, adv, backend="triton")
    with pytest.raises(ValueError, match="bias"):
        gf.linear_log_softmax(hidden, weight, ids, bias=b[:-1], backend="triton")
    with pytest.raises(ValueError, match="completion_ids"):
        gf.linear_grpo_loss(hidden, weight, ids.masked_fill(ids == ids[0, 0], V), adv, backend="triton")


# --------------------------------------------------------------------------------------
# CUDA only: realistic shapes.
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="larger shapes need a CUDA GPU (interpreter too slow)")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_larger_shapes(strategy, dtype):
    # V = 32001: a ragged last tile at every block size; N = 1031 tokens: ragged token blocks and chunks.
    hidden, weight, b, ids = make_linear(1031, 512, 32001, dtype, seed=60)
    truth = _reference(hidden, weight, b, ids, 0.9, True)
    got = _fused(strategy, hidden, weight, b, ids, 0.9, True)
    _check(got, truth, _eager(hidden, weight, b, ids, 0.9, True))
