"""The Triton logits kernels (vocab pass, GRPO epilogue, backward) against float64 ground truth.

Without a CUDA GPU these run under TRITON_INTERPRET=1 on CPU tensors (set by conftest), where a
launch costs ~0.1-0.4 s, so shapes are small and ragged; with CUDA the same tests run and a few
larger shapes are added.

Tolerances: the one rule of tests/tolerance.py. The kernels accumulate in fp32 as eager
PyTorch does (the reference upcasts the logits), so their error against the float64 truth may
not exceed the reference's own in the test dtype plus a few fp32 ulps; gradients round once
to the logits dtype, as eager's do. Bounds are per row where rows differ in size: a row's lse
is exact up to fp32 rounding of numbers as large as the row's largest |z|.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, has_triton
from tolerance import ULPS_GRAD, ULPS_LOSS, ULPS_VALUE, assert_close_to_truth, dlogits_scale, logit_row_scale

pytestmark = [
    pytest.mark.skipif(not has_triton(), reason="triton is not installed"),
    # The interpreter evaluates both sides of tl.where in numpy; the guarded side may hold the
    # NaN of -inf - -inf (masked vocab columns) that the selected side avoids.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

if has_triton():
    from grpo_fused.kernels import selective_log_softmax as sls

from grpo_fused import reference as ref_impl
from grpo_fused.semantics import compute_dtype, vocab_values


def temp(temperature):
    """The kernels' hyperparameter vector for a temperature, on the test device."""
    return vocab_values(temperature).to(DEVICE)

CUDA = DEVICE == "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# Ground truth and inputs.
# --------------------------------------------------------------------------------------


def truth_vocab(logits, ids, temperature):
    """float64 ``(logps, lse, entropy, p)`` of the (already rounded) logits, masked columns safe."""
    z = logits.double() / temperature
    lse = torch.logsumexp(z, -1)
    log_p = z - lse.unsqueeze(-1)
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    logps = log_p.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    return logps, lse, entropy, p


def truth_dlogits(logits, ids, temperature, dlogps, dentropy):
    """float64 gradient of ``sum(dlogps * logp + dentropy * H)`` (closed form; no 0 * -inf)."""
    logps, lse, entropy, p = truth_vocab(logits, ids, temperature)
    z = logits.double() / temperature
    log_p = z - lse.unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(ids.long(), logits.shape[-1]).double()
    dz = dlogps.double().unsqueeze(-1) * (onehot - p)
    if dentropy is not None:
        plogp = torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), torch.zeros_like(p))
        dz = dz - dentropy.double().unsqueeze(-1) * plogp
    return dz / temperature


def make_logits(n, v, dtype, seed=0, special_rows=True):
    """Random logits ``(n, v)`` (scale 3) with, when there is room, the rows tests must survive:
    row 1 has its first third masked to -inf, row 2 has every logit -inf but the target's,
    row 3 is offset by +1000 (large logits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    ids = torch.randint(0, v, (n,), generator=g)
    if special_rows and n >= 4:
        x[1, : v // 3] = float("-inf")
        ids[1] = v - 1
        x[2, :] = float("-inf")
        x[2, ids[2]] = 0.5
        x[3] += 1000.0
    return x.to(dtype).to(DEVICE), ids.to(DEVICE)


def eager_vocab(logits, ids, temperature, dlogps=None, dentropy=None):
    """Eager PyTorch on the logits as they are (the reference: fp32 token math for bf16 / fp16 /
    fp32 logits): ``(logps, lse, entropy, dlogits)``, the gradient (of ``sum(dlogps * logp +
    dentropy * H)``, None without ``dlogps``) in the logits' dtype."""
    x = logits.detach().clone().requires_grad_()
    logps, entropy = ref_impl.selective_log_softmax(x, ids, temperature, True)
    lse = torch.logsumexp(x.detach().to(compute_dtype(x.dtype)) / temperature, -1)
    dlogits = None
    if dlogps is not None:
        objective = (logps * dlogps.to(logps.dtype)).sum()
        if dentropy is not None:
            objective = objective + (entropy * dentropy.to(entropy.dtype)).sum()
        (dlogits,) = torch.autograd.grad(objective, x)
    return logps.detach(), lse, entropy.detach(), dlogits


def assert_vocab_close(values, logits, ids, temperature, what=""):
    """Each of ``values`` (a dict naming some of logps, lse, entropy) against the truth, with eager
    PyTorch's error per row: a row offset by +1000 may err as its fp32 rounding does, no other row."""
    truth = dict(zip(("logps", "lse", "entropy"), truth_vocab(logits, ids, temperature)[:3]))
    eager = dict(zip(("logps", "lse", "entropy"), eager_vocab(logits, ids, temperature)[:3]))
    scale = logit_row_scale(logits, temperature)
    for name, value in values.items():
        assert_close_to_truth(value, truth[name], eager[name], ulps=ULPS_VALUE, scale=scale, what=f"{what} {name}")


def assert_grad_close(dlogits, logits, ids, temperature, dlogps, dentropy, what=""):
    """The gradient of ``sum(dlogps * logp + dentropy * H)`` against the closed-form truth, on
    :func:`dlogits_scale` per row: the upstream gradient times the row's |z| (the kernel
    multiplies by 1/T where eager divides, and a +1000 row errs ~3x eager's 150 ulps there)."""
    truth = truth_dlogits(logits, ids, temperature, dlogps, dentropy)
    eager = eager_vocab(logits, ids, temperature, dlogps, dentropy)[3]
    upstream = dlogps.double().abs()
    if dentropy is not None:
        upstream = upstream + dentropy.double().abs() * (1 + truth_vocab(logits, ids, temperature)[2].abs())
    assert_close_to_truth(dlogits, truth, eager, ulps=ULPS_GRAD,
                          scale=dlogits_scale(truth, logits, temperature, upstream=upstream.cpu() / temperature),
                          what=what)


# --------------------------------------------------------------------------------------
# Vocab pass: logits_fwd / logits_bwd.
# --------------------------------------------------------------------------------------

# (N, V, BLOCK_V): V=257 in one 512-wide tile; V=257 in 64-wide tiles (ragged last tile);
# V=10 smaller than the smallest block (most lanes masked); N odd throughout.
VOCAB_SHAPES = [(7, 257, None), (5, 257, 64), (5, 10, None)]
if CUDA:
    VOCAB_SHAPES += [(33, 32001, None), (9, 151936, None)]


@pytest.mark.parametrize("n,v,block_v", VOCAB_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vocab_pass_matches_float64_truth(n, v, block_v, dtype, temperature):
    logits, ids = make_logits(n, v, dtype)
    logps, lse, entropy = sls.vocab_fwd(logits, ids, temp(temperature), True, block_v=block_v)
    assert logps.dtype == lse.dtype == entropy.dtype == torch.float32
    assert_vocab_close(dict(logps=logps, lse=lse, entropy=entropy), logits, ids, temperature)

    g = torch.Generator().manual_seed(1)
    dlogps = torch.randn(n, generator=g).to(DEVICE)
    dentropy = torch.randn(n, generator=g).to(DEVICE)
    dlogits = sls.vocab_bwd(logits, ids, lse, dlogps, dentropy, entropy, temp(temperature), block_v=block_v)
    assert_grad_close(dlogits, logits, ids, temperature, dlogps, dentropy, what="dlogits")
    assert torch.isfinite(dlogits).all()


def test_public_launchers_without_entropy_and_inplace():
    logits, ids = make_logits(5, 257, torch.bfloat16)
    keep = logits.clone()
    logps, lse, entropy = sls.logits_fwd(logits, ids.to(torch.int32), temp(1.3), False)
    assert entropy is None
    assert torch.equal(logits, keep), "forward must not modify its input"
    assert_vocab_close(dict(logps=logps, lse=lse), logits, ids, 1.3)
    dlogps = torch.linspace(-1, 2, 5, device=DEVICE)
    expected = sls.logits_bwd(logits, ids, lse, dlogps, None, None, temp(1.3))
    assert torch.equal(logits, keep)
    assert_grad_close(expected, logits, ids, 1.3, dlogps, None, what="dlogits")
    buffer = torch.empty_like(logits)
    assert sls.logits_bwd(logits, ids, lse, dlogps, None, None, temp(1.3), out=buffer) is buffer
    assert torch.equal(buffer, expected)
    out = sls.logits_bwd(logits, ids, lse, dlogps, None, None, temp(1.3), out=logits)
    assert out.data_ptr() == logits.data_ptr()
    assert torch.equal(logits, expected), "in-place gradient must equal the out-of-place one bitwise"


def test_strided_rows_and_sliced_3d_logits_read_in_place():
    base, _ = make_logits(5, 300, torch.float32, special_rows=False)
    logits = base[:, 20:277]  # (5, 257) with row stride 300
    ids = torch.randint(0, 257, (5,), device=DEVICE)
    logps, lse, entropy = sls.logits_fwd(logits, ids, temp(1.0), True)
    assert_vocab_close(dict(logps=logps, lse=lse, entropy=entropy), logits, ids, 1.0, what="strided")
    dlogps = torch.ones(5, device=DEVICE)
    dlogits = sls.logits_bwd(logits, ids, lse, dlogps, None, None, temp(1.0))
    assert_grad_close(dlogits, logits, ids, 1.0, dlogps, None, what="strided dlogits")

    full, _ = make_logits(12, 129, torch.float16, special_rows=False)
    seq = full.view(3, 4, 129)[:, :-1]  # (3, 3, 129): a causal-LM slice, not viewable as (9, 129)
    seq_ids = torch.randint(0, 129, (3, 3), device=DEVICE)
    logps, _, entropy = sls.vocab_fwd(seq, seq_ids, temp(0.9), True)  # flat (9,) results
    assert_vocab_close(dict(logps=logps.view(3, 3), entropy=entropy.view(3, 3)), seq, seq_ids, 0.9, what="3-D")


def test_selective_log_softmax_autograd_and_inplace():
    logits, ids = make_logits(2 * 3, 257, torch.bfloat16)
    logits = logits.view(2, 3, 257)
    ids = ids.view(2, 3)
    dlogps = torch.randn(2, 3, device=DEVICE)
    dentropy = torch.randn(2, 3, device=DEVICE)
    x = logits.clone().requires_grad_()
    logps, entropy = sls.selective_log_softmax(x, ids, temp(0.8), compute_entropy=True)
    assert logps.shape == entropy.shape == (2, 3)
    (logps * dlogps + entropy * dentropy).sum().backward()
    assert_grad_close(x.grad.view(6, 257), logits.view(6, 257), ids.view(6), 0.8,
                      dlogps.view(6), dentropy.view(6), what="autograd dlogits")

    # In place: the gradient lands in the logits' own buffer, bitwise equal to the copy above.
    leaf = torch.zeros(2, 3, 257, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    y = leaf + logits  # non-leaf logits, as a model's output
    logps, entropy = sls.selective_log_softmax(y, ids, temp(0.8), compute_entropy=True, inplace_backward=True)
    (logps * dlogps + entropy * dentropy).sum().backward()
    assert torch.equal(y.detach(), x.grad), "the logits buffer now holds the gradient"
    assert torch.equal(leaf.grad, x.grad)


def test_selective_log_softmax_float64_gradcheck():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 11, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    ids = torch.tensor([0, 10, 4], device=DEVICE)
    logps, entropy = sls.selective_log_softmax(logits, ids, temp(0.5), compute_entropy=True)
    assert logps.dtype == torch.float64
    t_logps, _, t_entropy, _ = truth_vocab(logits.detach(), ids, 0.5)
    # 0.5 is exact in fp32, so fp64 accumulation must reach fp64 precision (eager is the truth).
    assert_close_to_truth(logps, t_logps, ulps=ULPS_VALUE, what="fp64 logps")
    assert_close_to_truth(entropy, t_entropy, ulps=ULPS_VALUE, what="fp64 entropy")
    assert torch.autograd.gradcheck(
        lambda x: sls.selective_log_softmax(x, ids, temp(0.5), compute_entropy=True), (logits,), fast_mode=True
    )


def test_vocab_pass_is_deterministic_and_batch_invariant():
    logits, ids = make_logits(9, 257, torch.bfloat16, seed=5)
    a = sls.logits_fwd(logits, ids, temp(0.7), True)
    b = sls.logits_fwd(logits, ids, temp(0.7), True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # A token's results do not depend on which other rows share the launch.
    sub = sls.logits_fwd(logits[4:6], ids[4:6], temp(0.7), True)
    for x, y in zip(a, sub):
        assert torch.equal(x[4:6], y)


def test_launcher_bad_inputs_raise_before_launch():
    logits, ids = make_logits(4, 33, torch.float32, special_rows=False)
    with pytest.raises(TypeError, match="ids"):
        sls.logits_fwd(logits, ids.float(), temp(1.0), False)
    with pytest.raises(ValueError, match="ids"):
        sls.logits_fwd(logits, ids[:3], temp(1.0), False)
    with pytest.raises(TypeError, match="params"):
        sls.logits_fwd(logits, ids, torch.ones(3, dtype=torch.float64, device=DEVICE), False)
    with pytest.raises(TypeError, match="params"):
        sls.logits_fwd(logits, ids, temp(1.0).float(), False)
    with pytest.raises(ValueError, match="last"):
        sls.logits_fwd(logits.t().contiguous().t(), ids, temp(1.0), False)
    with pytest.raises(TypeError, match="logits"):
        sls.logits_fwd(ids.view(4, 1), ids, temp(1.0), False)
    lse = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="entropy"):
        sls.logits_bwd(logits, ids, lse, lse, lse, None, temp(1.0))
    with pytest.raises(ValueError, match="out"):
        sls.logits_bwd(logits, ids, lse, lse, None, None, temp(1.0), out=logits.half())


def test_public_selective_log_softmax_on_triton_backend():
    import grpo_fused as gf

    logits, ids = make_logits(6, 257, torch.float16)
    logits = logits.view(2, 3, 257).requires_grad_()
    logps, entropy = gf.selective_log_softmax(logits, ids.view(2, 3), 1.1, compute_entropy=True, backend="triton")
    assert_vocab_close(dict(logps=logps, entropy=entropy), logits.detach(), ids.view(2, 3), 1.1)
    logps.sum().backward()
    assert_grad_close(logits.grad.view(6, 257), logits.detach().view(6, 257), ids, 1.1,
                      torch.ones(6, device=DEVICE), None, what="dlogits")


# --------------------------------------------------------------------------------------
# grpo_loss: values, metrics and gradients against the float64 reference.
# --------------------------------------------------------------------------------------

if has_triton():
    from grpo_fused.kernels import grpo_logits as gl


def triton_loss(logits, config=None, **kwargs):
    """The public loss on the Triton backend (validated like every call)."""
    return gf.grpo_loss(logits, config=config, backend="triton", **kwargs)
import grpo_fused as gf
from grpo_fused import GRPOConfig
from grpo_fused.semantics import Option, Surrogate, KLEstimator

# B=3 sequences (row 2 fully masked), T=5, V=257: every option at least once, the interacting
# ones (loss type x IS level, KL estimator x bias correction, delta x dual clip) pairwise.
LOSS_CASES = [
    # (id, config kwargs, input options)
    ("grpo", dict(loss_type="grpo"), dict()),
    ("grpo-delta-T0.7", dict(loss_type="grpo", delta=1.3, temperature=0.7), dict(adv="BT")),
    ("bnpo-dualclip", dict(loss_type="bnpo", clip_ratio_c=2.0), dict(adv="B", spread=1.0, negative_adv=True)),
    ("dr_grpo-mcl", dict(loss_type="dr_grpo", max_completion_length=8), dict()),
    ("dr_grpo-onpolicy", dict(loss_type="dr_grpo"), dict(old=False)),
    ("dapo-asym-delta-dual", dict(loss_type="dapo", epsilon_high=0.28, delta=1.4, clip_ratio_c=3.0), dict(isw="BT", adv="BT", spread=1.0, negative_adv=True)),
    ("dapo-num_items", dict(loss_type="dapo"), dict(num_items=40)),
    ("dapo-nomask", dict(loss_type="dapo", beta=0.1), dict(mask=False)),
    ("luspo", dict(loss_type="luspo", beta=0.04), dict(isw="B1")),
    ("cispo", dict(loss_type="cispo", epsilon_high=1.2), dict()),
    ("cispo-two-sided", dict(loss_type="cispo", cispo_two_sided=True, epsilon_high=0.28), dict(isw="B")),
    ("sapo", dict(loss_type="sapo", beta=0.04, temperature=1.3), dict(adv="BT")),
    ("sapo-onpolicy", dict(loss_type="sapo"), dict(old=False)),
    ("gpg", dict(loss_type="gpg", beta=0.04), dict()),
    ("gpg-k2-nobc", dict(loss_type="gpg", beta=0.5, kl_estimator="k2", use_bias_correction_kl=False), dict()),
    ("k3-no-bias-correction", dict(loss_type="grpo", beta=0.2, use_bias_correction_kl=False), dict()),
    ("low_var_kl", dict(loss_type="dapo", beta=0.2, kl_estimator="low_var_kl"), dict(ref_far=True)),
    ("k1", dict(loss_type="grpo", beta=0.3, kl_estimator="k1"), dict()),
    ("k2-onpolicy", dict(loss_type="bnpo", beta=0.3, kl_estimator="k2"), dict(old=False)),
    ("abs-nobc", dict(loss_type="dapo", beta=0.3, kl_estimator="abs", use_bias_correction_kl=False), dict()),
    ("entropy-bonus", dict(loss_type="dapo", entropy_coef=0.05), dict()),
    # V = 2500: two 2048-wide tiles, the second ragged, through the fused epilogue.
    ("two-tiles-V2500", dict(loss_type="grpo", beta=0.04, entropy_coef=0.01, temperature=0.9), dict(V=2500)),
    ("no-entropy", dict(loss_type="grpo", compute_entropy=False, entropy_coef=0.05), dict()),
    ("agg-token-mean", dict(loss_type="grpo", loss_agg_mode="token-mean", dp_size=2, beta=0.04), dict(num_items=30)),
    ("agg-seq-token-sum", dict(loss_type="dapo", loss_agg_mode="seq-mean-token-sum"), dict(gbs=4)),
    ("agg-seq-token-sum-norm", dict(loss_type="cispo", loss_agg_mode="seq-mean-token-sum-norm", epsilon_high=2.0), dict()),
    ("agg-seq-token-mean", dict(loss_type="sapo", loss_agg_mode="seq-mean-token-mean"), dict()),
    # Sequence level: the vocab pass plus O(B*T) torch math.
    ("gspo-grpo", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04), dict()),
    ("gspo-dapo-advBT", dict(loss_type="dapo", importance_sampling_level="sequence", entropy_coef=0.02), dict(adv="BT")),
    ("gspo-cispo", dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.5), dict(isw="B")),
    ("gspo-sapo", dict(loss_type="sapo", importance_sampling_level="sequence"), dict(old=False)),
    ("gmpo", dict(loss_type="gmpo", beta=0.04, epsilon_low=0.4, epsilon_high=0.4), dict(isw="BT")),
]


def make_loss_inputs(dtype, *, B=3, T=5, V=257, seed=0, adv="B1", old=True, ref=True, isw=None,
                     mask=True, ref_far=False, num_items=None, gbs=None, spread=0.3, negative_adv=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    logps = truth_vocab(logits, ids, 1.0)[0].float()
    shapes = {"B": (B,), "B1": (B, 1), "BT": (B, T)}
    inputs = dict(
        logits=logits,
        completion_ids=ids,
        # negative_adv: every advantage < 0, the side the dual clip acts on.
        advantages=torch.randn(shapes[adv], generator=g).abs().neg() if negative_adv else torch.randn(shapes[adv], generator=g),
        # spread 0.3: ratios over roughly [0.55, 1.8], both clip sides and the delta cap are hit;
        # spread 1.0 reaches ratios > 3, where the dual clip bounds negative-advantage tokens.
        old_logps=(logps + spread * torch.randn(B, T, generator=g)) if old else None,
        ref_logps=(logps + (8.0 if ref_far else 0.4) * torch.randn(B, T, generator=g)) if ref else None,
        is_weights=None if isw is None else torch.rand(shapes[isw], generator=g) + 0.5,
        num_items_in_batch=num_items,
        global_batch_size=gbs,
    )
    if mask:
        m = (torch.rand(B, T, generator=g) > 0.25).to(torch.int64)
        m[0, 0] = 1
        if B > 1:
            m[B - 1] = 0  # a sequence with no token
        inputs["completion_mask"] = m
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def reference_float64(inputs, config):
    """The spec in float64 on the same (rounded) inputs, with the logits' gradient."""
    logits = inputs["logits"].double().requires_grad_()
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in inputs.items() if k != "logits"}
    out = ref_impl.grpo_loss(logits, config=config, **kwargs)
    out.loss.backward()
    return out, logits.grad


def reference_eager(inputs, config):
    """Eager PyTorch on the inputs as they are (fp32 token math, the gradient in the logits' dtype)."""
    logits = inputs["logits"].clone().requires_grad_()
    out = ref_impl.grpo_loss(logits, config=config, **{k: v for k, v in inputs.items() if k != "logits"})
    out.loss.backward()
    return out, logits.grad


def assert_output_matches(out, dlogits, inputs, config):
    """Every output and the logits' gradient against the float64 truth, with eager's error."""
    truth, truth_grad = reference_float64(inputs, config)
    eager, eager_grad = reference_eager(inputs, config)
    assert_close_to_truth(out.loss, truth.loss, eager.loss, ulps=ULPS_LOSS, what="loss")
    # Per token: a row offset by +1000 has 1000x the rounding floor of the others. Masked
    # positions are not compared: the public API reads their ids as 0 (d0b4523).
    scale = logit_row_scale(inputs["logits"], config.temperature)
    mask = inputs.get("completion_mask")
    where = None if mask is None else mask != 0
    assert_close_to_truth(out.logps, truth.logps, eager.logps, ulps=ULPS_VALUE, scale=scale, where=where, what="logps")
    if truth.entropy is None:
        assert out.entropy is None
    else:
        assert_close_to_truth(out.entropy, truth.entropy, eager.entropy, ulps=ULPS_VALUE, scale=scale, where=where,
                              what="entropy")
    assert set(out.metrics) == set(truth.metrics)
    for name, value in truth.metrics.items():
        assert out.metrics[name].dim() == 0, name
        assert_close_to_truth(out.metrics[name], value, eager.metrics[name], ulps=ULPS_LOSS, what=f"metric {name}")
    # fp32 sums of ~V terms relative to the largest entry and the row's |z|, then one rounding to
    # the logits' dtype per entry (dlogits_scale; floor 0: loss gradients are small by construction).
    assert_close_to_truth(dlogits, truth_grad, eager_grad, ulps=ULPS_GRAD,
                          scale=dlogits_scale(truth_grad, inputs["logits"], config.temperature), what="dlogits")


# Each case runs in one dtype (rotating fp32 / bf16 / fp16), and three cases in all of them:
# the interpreter costs ~0.5 s a case, the full product would triple the file's runtime.
_ALL_DTYPE_CASES = ("grpo-delta-T0.7", "dapo-asym-delta-dual", "gspo-grpo")
LOSS_PARAMS = []
for _i, (_id, _cfg, _opts) in enumerate(LOSS_CASES):
    for _dtype in DTYPES if (_id in _ALL_DTYPE_CASES or CUDA) else (DTYPES[_i % 3],):
        LOSS_PARAMS.append(pytest.param(_cfg, _opts, _dtype, id=f"{_id}-{str(_dtype)[6:]}"))


@pytest.mark.parametrize("config_kwargs,options,dtype", LOSS_PARAMS)
def test_grpo_loss_matches_reference(config_kwargs, options, dtype):
    config = GRPOConfig(**config_kwargs)
    inputs = make_loss_inputs(dtype, **options)
    logits = inputs["logits"].clone().requires_grad_()
    kwargs = {k: v for k, v in inputs.items() if k != "logits"}
    out = triton_loss(logits, config=config, **kwargs)
    out.loss.backward()
    assert_output_matches(out, logits.grad, inputs, config)
    assert out.loss.dtype == torch.float32 and out.logps.shape == inputs["completion_ids"].shape


def test_grpo_loss_masked_vocab_and_large_logits():
    # -inf vocab columns, a row that is -inf but for its target, and logits offset by +1000,
    # through the fused epilogue: -inf columns get a gradient of exactly 0, never 0 * -inf = NaN.
    inputs = make_loss_inputs(torch.bfloat16, seed=7)
    logits = inputs["logits"].float()
    logits[0, 1, :100] = float("-inf")
    logits[1, 2, :] = float("-inf")
    logits[1, 2, inputs["completion_ids"][1, 2]] = 1.0
    logits[0, 3] += 1000.0
    inputs["logits"] = logits.to(torch.bfloat16)
    config = GRPOConfig(loss_type="dapo", beta=0.04, delta=1.5)
    x = inputs["logits"].clone().requires_grad_()
    out = triton_loss(x, config=config, **{k: v for k, v in inputs.items() if k != "logits"})
    out.loss.backward()
    assert torch.isfinite(x.grad.float()).all()
    assert (x.grad[0, 1, :100] == 0).all() and (x.grad[1, 2] == 0).all()
    # The +1000 row's logp carries fp32 rounding of numbers near 1000 (ulp 6e-5), as PyTorch's does:
    # the per-row bounds give that row, and only that row, its eager error.
    assert_output_matches(out, x.grad, inputs, config)


def test_grpo_loss_all_masked_batch_gives_zero_loss_and_gradient():
    inputs = make_loss_inputs(torch.float16, seed=2)
    inputs["completion_mask"] = torch.zeros_like(inputs["completion_mask"])
    for loss_type in ("grpo", "dapo", "gspo"):
        kwargs = dict(loss_type="grpo", importance_sampling_level="sequence") if loss_type == "gspo" else dict(loss_type=loss_type)
        config = GRPOConfig(beta=0.04, entropy_coef=0.01, **kwargs)
        x = inputs["logits"].clone().requires_grad_()
        out = triton_loss(x, config=config, **{k: v for k, v in inputs.items() if k != "logits"})
        out.loss.backward()
        assert out.loss.item() == 0.0
        assert (x.grad == 0).all()
        truth, _ = reference_float64(inputs, config)
        eager, _ = reference_eager(inputs, config)
        for name, value in truth.metrics.items():
            assert_close_to_truth(out.metrics[name], value, eager.metrics[name], ulps=ULPS_LOSS, what=name)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_inplace_backward_through_public_api(level):
    import grpo_fused as gf

    inputs = make_loss_inputs(torch.bfloat16, T=4, seed=4)
    config = GRPOConfig(loss_type="dapo", beta=0.04, entropy_coef=0.02, importance_sampling_level=level)
    kwargs = {k: v for k, v in inputs.items() if k != "logits"}
    x = inputs["logits"].clone().requires_grad_()
    expected = gf.grpo_loss(x, config=config, backend="triton", **kwargs)
    expected.loss.backward()

    # A causal-LM slice of a bigger (B, T+1, V) buffer: read and overwritten in place, no copy.
    leaf = torch.zeros(3, 5, 257, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    full = leaf + torch.cat([inputs["logits"], inputs["logits"][:, :1]], dim=1)
    sliced = full[:, :-1]
    out = gf.grpo_loss(sliced, config=config, backend="triton", inplace_backward=True, **kwargs)
    assert torch.equal(out.loss, expected.loss)
    out.loss.backward()
    assert torch.equal(sliced.detach(), x.grad), "the gradient overwrote the logits in place"
    assert torch.equal(leaf.grad[:, :-1], x.grad) and (leaf.grad[:, -1] == 0).all()


def test_grpo_loss_is_deterministic_and_batch_invariant():
    inputs = make_loss_inputs(torch.bfloat16, seed=9)
    config = GRPOConfig(loss_type="dapo", beta=0.04)
    kwargs = {k: v for k, v in inputs.items() if k != "logits"}
    results = []
    for _ in range(2):
        x = inputs["logits"].clone().requires_grad_()
        out = triton_loss(x, config=config, **kwargs)
        out.loss.backward()
        results.append((out, x.grad))
    (a, ga), (b, gb) = results
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb) and torch.equal(a.logps, b.logps)
    for name in a.metrics:
        assert torch.equal(a.metrics[name], b.metrics[name]), name
    # A sequence's logps and entropy do not depend on the rest of the batch.
    one = {k: (v[1:2] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    sub = triton_loss(one.pop("logits"), config=config, **one)
    assert torch.equal(sub.logps, a.logps[1:2]) and torch.equal(sub.entropy, a.entropy[1:2])


def test_grpo_loss_float64_gradcheck():
    inputs = make_loss_inputs(torch.float64, B=2, T=3, V=13, seed=11, adv="BT")
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in inputs.items() if k != "logits"}
    # Only 1.0-exact hyperparameters pass through the kernel's fp32 scalars unrounded.
    config = GRPOConfig(loss_type="dapo", beta=0.25, epsilon_low=0.5, entropy_coef=0.5)
    logits = inputs["logits"].clone().requires_grad_()
    out = triton_loss(logits, config=config, **kwargs)
    truth, _ = reference_float64(inputs, config)
    assert_close_to_truth(out.loss, truth.loss, ulps=ULPS_LOSS, what="fp64 loss")  # eager is the truth
    assert torch.autograd.gradcheck(lambda x: triton_loss(x, config=config, **kwargs).loss, (logits,),
                                    fast_mode=True)


def test_grpo_fwd_bad_inputs_raise_before_launch():
    inputs = make_loss_inputs(torch.float32)
    n = 15
    logits, ids = inputs["logits"], inputs["completion_ids"]
    adv = torch.zeros(n, device=DEVICE)
    w = torch.ones(n, device=DEVICE)
    params = temp(1.0)
    clip = int(Surrogate.CLIP)
    with pytest.raises(ValueError, match="advantages"):
        gl.grpo_fwd(logits, ids, params, adv.double(), w, None, None, None, None, clip, 0, 0)
    with pytest.raises(ValueError, match="token_weights"):
        gl.grpo_fwd(logits, ids, params, adv, w[:3], None, None, None, None, clip, 0, 0)
    with pytest.raises(ValueError, match="ids"):
        gl.grpo_fwd(logits, ids[:, :2], params, adv, w, None, None, None, None, clip, 0, 0)
    with pytest.raises(TypeError, match="params"):
        gl.grpo_fwd(logits, ids, params.float(), adv, w, None, None, None, None, clip, 0, 0)
    codes = gl.EpilogueCodes(clip, int(KLEstimator.K3), 0)
    with pytest.raises(ValueError, match="ref_logps"):
        gl.GRPOLogitsLoss.apply(logits, ids, params, adv, w, None, None, None, None, codes, False)
    with pytest.raises(ValueError, match="inplace_backward"):
        triton_loss(logits.transpose(1, 2).contiguous().transpose(1, 2), completion_ids=ids, advantages=adv[:3],
                    inplace_backward=True)


@pytest.mark.skipif(not CUDA, reason="kernel compilation caches exist only on CUDA (not under the interpreter)")
def test_new_float_hyperparameters_do_not_recompile():
    inputs = make_loss_inputs(torch.bfloat16)
    kwargs = {k: v for k, v in inputs.items() if k != "logits"}
    kernel = gl._grpo_logits_fwd_kernel

    def n_compiled():
        # triton 3.x: device -> (kernel_cache, kernel_key_cache, target, backend, binder)
        return sum(len(entry[0]) for entry in kernel.device_caches.values())

    triton_loss(inputs["logits"], config=GRPOConfig(beta=0.04, temperature=1.0), **kwargs)
    before = n_compiled()
    assert before >= 1
    for beta, temperature, eps in ((0.1, 0.7, 0.1), (0.3, 1.3, 0.25)):
        triton_loss(inputs["logits"], config=GRPOConfig(beta=beta, temperature=temperature, epsilon_low=eps), **kwargs)
    assert n_compiled() == before


def test_ops_are_registered_with_torch_library():
    for name in ("triton_vocab_fwd", "triton_vocab_bwd", "triton_vocab_bwd_out", "triton_vocab_bwd_inplace",
                 "triton_grpo_logits_fwd"):
        assert hasattr(torch.ops.grpo_fused, name), name
    logits, ids = make_logits(5, 40, torch.float32, special_rows=False)
    logps, lse, entropy = torch.ops.grpo_fused.triton_vocab_fwd(logits, ids, temp(1.0), False)
    assert entropy.numel() == 0
    assert_vocab_close(dict(logps=logps, lse=lse), logits, ids, 1.0, what="op")


COMPILE_REASON = "torch.compile cannot trace Triton ops on CPU tensors (fake tensors have no data pointer)"


@pytest.mark.skipif(not CUDA, reason=COMPILE_REASON)
def test_opcheck_on_cuda():
    logits, ids = make_logits(7, 257, torch.bfloat16)
    torch.library.opcheck(torch.ops.grpo_fused.triton_vocab_fwd.default, (logits, ids, temp(0.7), True))
    lse = sls.logits_fwd(logits, ids, temp(0.7), True)[1]
    dlogps = torch.randn(7, device=DEVICE)
    torch.library.opcheck(torch.ops.grpo_fused.triton_vocab_bwd.default, (logits, ids, lse, dlogps, None, None, 0.7))


@pytest.mark.skipif(not CUDA, reason=COMPILE_REASON)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_under_torch_compile_fullgraph(level):
    inputs = make_loss_inputs(torch.bfloat16, B=4, T=33, V=32001)
    kwargs = {k: v for k, v in inputs.items() if k != "logits"}
    config = GRPOConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01, importance_sampling_level=level)

    def step(logits):
        return triton_loss(logits, config=config, **kwargs).loss

    compiled = torch.compile(step, fullgraph=True)
    x_eager = inputs["logits"].clone().requires_grad_()
    x_comp = inputs["logits"].clone().requires_grad_()
    eager = step(x_eager)
    eager.backward()
    loss = compiled(x_comp)
    loss.backward()
    # Same kernels; Inductor may fuse the O(N) torch ops around them with other rounding, so the
    # compiled step answers to the same rule as the eager one.
    truth, truth_grad = reference_float64(inputs, config)
    torch_eager, torch_eager_grad = reference_eager(inputs, config)
    for result in ((eager, x_eager.grad), (loss, x_comp.grad)):
        assert_close_to_truth(result[0], truth.loss, torch_eager.loss, ulps=ULPS_LOSS, what="loss")
        assert_close_to_truth(result[1], truth_grad, torch_eager_grad, ulps=ULPS_GRAD,
                              scale=dlogits_scale(truth_grad, inputs["logits"], config.temperature), what="dlogits")


# --------------------------------------------------------------------------------------
# CUDA only: realistic vocabularies, > 2^31 logits, > 65535 positions.
# --------------------------------------------------------------------------------------

LARGE_REASON = "large shapes run on CUDA only (the interpreter would take many minutes)"


@pytest.mark.skipif(not CUDA, reason=LARGE_REASON)
@pytest.mark.parametrize("B,T,V", [(4, 257, 32001), (2, 129, 151936)])
@pytest.mark.parametrize("config_kwargs", [
    dict(loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01),
    dict(loss_type="grpo", delta=1.4, clip_ratio_c=3.0, temperature=0.7),
    dict(loss_type="cispo", epsilon_high=4.0, beta=0.1, kl_estimator="low_var_kl"),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
], ids=["dapo", "grpo-delta-dual", "cispo", "gspo"])
def test_grpo_loss_large_shapes_on_cuda(B, T, V, config_kwargs):
    config = GRPOConfig(**config_kwargs)
    inputs = make_loss_inputs(torch.bfloat16, B=B, T=T, V=V, adv="BT", isw="BT")
    logits = inputs["logits"].clone().requires_grad_()
    out = triton_loss(logits, config=config, **{k: v for k, v in inputs.items() if k != "logits"})
    out.loss.backward()
    assert_output_matches(out, logits.grad, inputs, config)


@pytest.mark.skipif(not CUDA, reason=LARGE_REASON)
def test_int64_offsets_beyond_two_to_the_31_logits_on_cuda():
    V = 151936
    N = 2**31 // V + 3  # the last rows start past element 2^31
    logits = torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randint(0, V, (N,), device=DEVICE)
    tail = slice(N - 4, N)
    tail_logits = logits[tail].clone()
    logps, lse, entropy = sls.logits_fwd(logits, ids, temp(1.0), True)
    assert_vocab_close(dict(logps=logps[tail], lse=lse[tail], entropy=entropy[tail]), tail_logits, ids[tail], 1.0,
                       what="past 2^31")
    dlogps = torch.randn(N, device=DEVICE)
    sls.logits_bwd(logits, ids, lse, dlogps, None, None, temp(1.0), out=logits)  # in place: no second 4 GB
    assert_grad_close(logits[tail], tail_logits, ids[tail], 1.0, dlogps[tail], None, what="dlogits past 2^31")


@pytest.mark.skipif(not CUDA, reason=LARGE_REASON)
def test_more_than_65535_positions_on_cuda():
    config = GRPOConfig(loss_type="dapo", beta=0.04)
    inputs = make_loss_inputs(torch.float32, B=1, T=70001, V=64)
    logits = inputs["logits"].clone().requires_grad_()
    out = triton_loss(logits, config=config, **{k: v for k, v in inputs.items() if k != "logits"})
    out.loss.backward()
    assert_output_matches(out, logits.grad, inputs, config)


def test_grpo_loss_non_contiguous_inputs():
    inputs = make_loss_inputs(torch.float16, adv="BT", isw="BT", seed=13)
    config = GRPOConfig(loss_type="grpo", beta=0.04, delta=1.6)

    def transposed(t):  # same values, column-major strides
        return t.t().contiguous().t() if isinstance(t, torch.Tensor) and t.dim() == 2 else t

    kwargs = {k: transposed(v) for k, v in inputs.items() if k != "logits"}
    assert not kwargs["completion_ids"].is_contiguous() and not kwargs["old_logps"].is_contiguous()
    wide = torch.zeros(3, 5, 300, dtype=torch.float16, device=DEVICE)
    wide[..., :257] = inputs["logits"]
    logits = wide[..., :257].requires_grad_()  # row stride 300
    out = triton_loss(logits, config=config, **kwargs)
    out.loss.backward()
    assert_output_matches(out, logits.grad, inputs, config)


def test_grpo_loss_with_many_narrow_tiles(monkeypatch):
    # 64-wide tiles: V = 257 is five tiles, the last holding one column, through fwd, epilogue, bwd.
    from grpo_fused.kernels import common

    monkeypatch.setattr(common, "_MAX_BLOCK_V", 64)
    inputs = make_loss_inputs(torch.bfloat16, seed=21, adv="BT")
    inputs["logits"][0, 0, 256] = 30.0  # the row max sits alone in the last tile
    config = GRPOConfig(loss_type="sapo", beta=0.04, entropy_coef=0.02, temperature=0.8)
    logits = inputs["logits"].clone().requires_grad_()
    out = triton_loss(logits, config=config, **{k: v for k, v in inputs.items() if k != "logits"})
    out.loss.backward()
    assert_output_matches(out, logits.grad, inputs, config)
