"""Sampling-support replay on the Triton backend against the float64 reference.

The cutoff kernel (kernels/sampling_support.py) must find exactly the reference's support
(:func:`grpo_fused.reference.sampling_support`), ties included, and the row kernels must score and
differentiate over it: log-probs, entropy and gradients of the logits path and of the chunked
linear path, within the tolerance rule of tests/tolerance.py (the kernel's error against the
float64 truth no worse than eager fp32 PyTorch's, plus a few ulps), a dropped token's gradient
exactly 0.

Data. Integer-valued logits (and hidden states / weights whose products are integers) at
temperature 1 or 0.5 make ties exact in every precision, so both tie rules are tested where they
differ. Continuous rows are drawn clear of the top-p and min-p boundaries (the kernel sums the
top-p mass in fp32, the reference in float64): ``_clear_of_boundaries`` of test_sampling_support,
at a 1e-4 margin, is asserted on every such input.

Under TRITON_INTERPRET=1 (CPU) a cutoff costs ~0.3 s a row, so shapes are small (V <= 300, a few
rows); the kernel then holds 32 candidates (INTERPRETER_CANDIDATES), so rows of 257 also run its
refining sweeps, and a test with 4 candidates runs the sweep that places ``tie_end`` for a tie
group larger than the candidates.
"""

from __future__ import annotations

import math

import pytest
import torch

import grpo_fused as gf
from grpo_fused import reference as R
from grpo_fused.semantics import SamplingRule, vocab_values

from conftest import DEVICE, has_triton
from test_sampling_support import _clear_of_boundaries
from tolerance import ULPS_GRAD, ULPS_LOSS, ULPS_VALUE, assert_close_to_truth, dlogits_scale, logit_row_scale

pytestmark = [
    pytest.mark.skipif(not has_triton(), reason="triton is not installed"),
    # The interpreter evaluates both sides of tl.where in numpy (-inf - -inf, exp of NaN padding).
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

if has_triton():
    from grpo_fused.kernels import sampling_support as ss

MARGIN = 1e-4  # relative top-p / min-p distance kept from every threshold (fp32 sums vs float64)
# Gradients through the chunked path's GEMMs sum over V and N in another order than eager's: the
# budget of tests/test_triton_linear.py (ULPS_LINEAR_GRAD) for fp32.
ULPS_LINEAR_GRAD = {**ULPS_GRAD, torch.float32: 32}


def _support_of(logits, cutoff, temperature):
    """The kept mask of a Cutoff, read both ways: on z with (tau, tie_end), and on the raw logits
    with the thresholds the row kernels use; the two must agree."""
    z = logits.float() / temperature
    cols = torch.arange(z.shape[-1], device=z.device)
    tau, tie_end, x_ties, x_above = (t.unsqueeze(-1) for t in cutoff)
    by_tau = (z > tau) | ((z == tau) & (cols < tie_end))
    x = logits.float()
    by_threshold = (x >= x_above) | ((x >= x_ties) & (cols < tie_end))
    assert torch.equal(by_tau, by_threshold), "the logit thresholds disagree with (tau, tie_end)"
    return by_tau


def _draw(make, rule, temperature, seed):
    """``make(generator)`` for the first seed from ``seed`` whose rows have every support decision
    clear of the rounding boundaries (asserted, not assumed)."""
    for attempt in range(50):
        x = make(torch.Generator().manual_seed(seed * 100 + attempt))
        if rule is None or _clear_of_boundaries(x.double() / temperature, rule, margin=MARGIN):
            return x
    raise AssertionError("no draw clear of the boundaries")


def _continuous(n, V, scale, seed, rule, temperature=1.0, neg_inf_from=None):
    """fp32 logits ``(n, V)`` (the last row -inf from column ``neg_inf_from`` on)."""
    def make(g):
        x = torch.randn(n, V, generator=g) * scale
        if neg_inf_from is not None:
            x[-1, neg_inf_from:] = float("-inf")
        return x
    return _draw(make, rule, temperature, seed)


def _integers(n, V, low, high, seed, rule=None, temperature=1.0):
    """Integer-valued fp32 logits: many exact ties."""
    return _draw(lambda g: torch.randint(low, high, (n, V), generator=g).float(), rule, temperature, seed)


# Each stage alone, both tie rules, and the stages combined (min-p, then top-k, then top-p).
RULES = [
    dict(top_k=1),
    dict(top_k=7),
    dict(top_k=7, top_k_ties="all"),
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(top_k=20, top_p=0.87),
    dict(top_k=12, top_p=0.85, min_p=0.02, top_k_ties="all"),
]
_ids = lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())  # noqa: E731


# --------------------------------------------------------------------------------------
# The cutoff kernel alone: exactly the reference's support.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", RULES, ids=_ids)
def test_cutoff_is_the_reference_support(kw):
    rule = SamplingRule(**kw)
    # V = 257 (ragged): continuous rows at T = 1, integer rows (ties everywhere) at T = 0.5, and a
    # row whose first third is -inf (masked vocab: those tokens are ties at -inf).
    integers = _integers(2, 257, -4, 5, seed=1, rule=rule, temperature=0.5)
    integers[1, :85] = float("-inf")
    assert _clear_of_boundaries(integers.double() / 0.5, rule, margin=MARGIN)
    x = torch.cat([_continuous(2, 257, 2.0, seed=len(str(kw)), rule=rule), integers])
    for rows, temperature in ((x[:2], 1.0), (x[2:], 0.5)):
        cutoff = ss.sampling_cutoff(rows.to(DEVICE), vocab_values(temperature, rule).to(DEVICE),
                                    ss.SupportRule(all_ties=rule.top_k_ties == "all"))
        got = _support_of(rows.to(DEVICE), cutoff, temperature).cpu()
        want = R.sampling_support(rows.double() / temperature, rule)
        assert torch.equal(got, want), (kw, temperature, (got != want).sum(-1))


def test_cutoff_with_few_candidates_refines_and_counts_ties():
    """4 candidates: every stage narrows by refining sweeps; a tie group larger than the candidates
    is placed by the tie sweep (exact top-k inside 60 tokens tied at the top)."""
    x = _integers(3, 129, 0, 3, seed=2)  # values 0, 1, 2: ~43 tokens tied at each
    x[2] = torch.arange(129).float() % 5 - 2.0
    for kw in (dict(top_k=30), dict(top_k=50, top_p=0.6), dict(top_p=0.35, min_p=0.2)):
        rule = SamplingRule(**kw)
        assert _clear_of_boundaries(x.double(), rule, margin=MARGIN)
        cutoff = ss.cutoff_launch(x.to(DEVICE), vocab_values(1.0, rule).to(DEVICE), False, candidates=4)
        got = _support_of(x.to(DEVICE), cutoff, 1.0).cpu()
        assert torch.equal(got, R.sampling_support(x.double(), rule)), kw


def test_cutoff_on_fp64_and_bf16_logits():
    # fp64 logits search 64-bit keys; bf16 rows tie often (8 bits of mantissa).
    rule = SamplingRule(top_k=9, top_p=0.7)
    x64 = _continuous(2, 100, 3.0, seed=3, rule=rule).double()
    xb = _integers(2, 100, -3, 4, seed=4, rule=rule).bfloat16()
    for x in (x64, xb):
        cutoff = ss.sampling_cutoff(x.to(DEVICE), vocab_values(1.0, rule).to(DEVICE), ss.SupportRule())
        assert cutoff.tau.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        assert torch.equal(_support_of(x.to(DEVICE), cutoff, 1.0).cpu(), R.sampling_support(x.double(), rule))


def test_nan_row_and_skipped_rows_keep_nothing():
    rule = SamplingRule(top_p=0.9)
    x = _integers(3, 40, -3, 4, seed=5, rule=rule)
    x[1, 7] = float("nan")
    row_mask = torch.tensor([1, 1, 0])
    cutoff = ss.sampling_cutoff(x.to(DEVICE), vocab_values(1.0, rule).to(DEVICE), ss.SupportRule(),
                                row_mask.to(DEVICE))
    kept = _support_of(x.to(DEVICE), cutoff, 1.0).cpu()
    assert torch.equal(kept[0], R.sampling_support(x[:1].double(), rule)[0])
    assert not kept[1].any() and not kept[2].any()


# --------------------------------------------------------------------------------------
# The vocab op: log-probs, entropy, gradients.
# --------------------------------------------------------------------------------------


def _vocab_case(x, ids, temperature, kw, weights):
    """Triton against float64 truth and fp32 eager: logps, entropy and the gradient of
    ``sum(w_logp * logp over finite logps) + sum(w_H * H)``."""
    truth_in = x.double().requires_grad_()
    eager_in = x.clone().requires_grad_()
    got_in = x.clone().to(DEVICE).requires_grad_()
    w_logp, w_entropy = weights
    results = []
    for inp, fn in ((truth_in, R.selective_log_softmax), (eager_in, R.selective_log_softmax),
                    (got_in, lambda *a, **k: gf.selective_log_softmax(*a, backend="triton", **k))):
        if fn is R.selective_log_softmax:
            logps, entropy = fn(inp, ids, temperature, True, **kw)
        else:
            logps, entropy = fn(inp, ids.to(DEVICE), temperature, compute_entropy=True, **kw)
        results.append((logps, entropy))
    truth, eager, got = results
    outside = torch.isneginf(truth[0])
    assert torch.equal(torch.isneginf(got[0].cpu()), outside), "outside-support ids differ"
    scale = logit_row_scale(x, temperature)
    assert_close_to_truth(got[0].cpu(), truth[0].detach(), eager[0].detach(), ulps=ULPS_VALUE, scale=scale,
                          what="logps")
    assert_close_to_truth(got[1].cpu(), truth[1].detach(), eager[1].detach(), ulps=ULPS_VALUE, scale=scale,
                          what="entropy")
    for inp, (logps, entropy) in zip((truth_in, eager_in, got_in), results):
        finite = ~outside.to(logps.device)
        (torch.where(finite, logps, 0.0) * w_logp.to(logps)).sum().backward(retain_graph=True)
        (entropy * w_entropy.to(entropy)).sum().backward()
    kept = R.sampling_support(x.double() / temperature, SamplingRule(**kw))
    assert bool((got_in.grad.cpu()[~kept] == 0).all()), "a dropped logit received a gradient"
    assert_close_to_truth(got_in.grad.cpu(), truth_in.grad, eager_in.grad, ulps=ULPS_GRAD, floor=0.0,
                          scale=dlogits_scale(truth_in.grad, x, temperature), what="dlogits")


@pytest.mark.parametrize("kw", [dict(top_k=7), dict(top_p=0.8, min_p=0.05), dict(top_k=12, top_p=0.85,
                                                                                  top_k_ties="all")], ids=_ids)
def test_log_probs_entropy_and_gradients(kw):
    rule = SamplingRule(**kw)
    # Rows: continuous (T = 1), integer-valued with ties (T = 0.5), and one with -inf columns.
    x = torch.cat([_continuous(2, 200, 2.0, seed=7, rule=rule, neg_inf_from=150),
                   _integers(2, 200, -4, 5, seed=8, rule=rule, temperature=0.5)])
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    # Ids: the top token, a deep one (outside every rule here), one near the cutoff, and the
    # lowest-id token tied at the top of an integer row.
    ids = torch.stack([order[0, 0], order[1, 120], order[2, 5], order[3, 0]])
    weights = (torch.tensor([1.0, -0.5, 0.7, 2.0]), torch.tensor([0.3, 0.2, -0.4, 0.1]))
    for rows, temperature in (([0, 1], 1.0), ([2, 3], 0.5)):
        _vocab_case(x[rows], ids[rows], temperature, kw, (weights[0][rows], weights[1][rows]))


def test_nan_row_gives_nan_and_no_gradient():
    x = _integers(2, 50, -3, 4, seed=9)
    x[1, 3] = float("nan")
    ids = torch.tensor([int(x[0].argmax()), 0])
    inp = x.to(DEVICE).requires_grad_()
    logps, entropy = gf.selective_log_softmax(inp, ids.to(DEVICE), compute_entropy=True, top_p=0.9, backend="triton")
    want_logps, want_entropy = R.selective_log_softmax(x.double(), ids, 1.0, True, top_p=0.9)
    assert math.isnan(logps[1].item()) and math.isnan(entropy[1].item()) and math.isnan(want_logps[1].item())
    assert_close_to_truth(logps[:1].cpu(), want_logps[:1], ulps=ULPS_VALUE, scale=logit_row_scale(x[:1]),
                          dtype=torch.float32)
    logps[0].backward()
    assert bool((inp.grad[1] == 0).all())  # a NaN row keeps nothing: no gradient (the reference's too)


# --------------------------------------------------------------------------------------
# The loss: outside-support tokens leave it; masked rows are not read; in-place backward.
# --------------------------------------------------------------------------------------


def _loss_inputs(seed, rule, temperature):
    B, T, V = 2, 4, 60
    x = _integers(B * T, V, -4, 5, seed=seed, rule=rule, temperature=temperature).view(B, T, V)
    top = torch.sort(x, dim=-1, descending=True, stable=True).indices
    ids = top[..., 0].clone()
    ids[0, 1] = top[0, 1, -1]  # outside top_k = 5
    ids[1, 2] = top[1, 2, 1]
    ids[1, 3] = top[1, 3, -2]  # outside, but masked out: not counted
    mask = torch.ones(B, T)
    mask[1, 3] = 0
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g) * 0.1 - 1.0
    ref = torch.randn(B, T, generator=g) * 0.1 - 1.0
    return x, ids, torch.tensor([1.0, -0.5]), mask, old, ref


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence")])
def test_loss_drops_outside_support_tokens(loss_type, level):
    x, ids, adv, mask, old, ref = _loss_inputs(11, SamplingRule(top_k=5), 0.5)
    cfg = gf.GRPOConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.1, top_k=5,
                        temperature=0.5, entropy_coef=0.01)
    truth_in = x.double().requires_grad_()
    want = gf.grpo_loss(truth_in, ids, adv, mask, old.double(), ref.double(), config=cfg, backend="reference")
    eager_in = x.clone().requires_grad_()
    eager = gf.grpo_loss(eager_in, ids, adv, mask, old, ref, config=cfg, backend="reference")
    got_in = x.clone().to(DEVICE).requires_grad_()
    got = gf.grpo_loss(got_in, ids.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE), old.to(DEVICE), ref.to(DEVICE),
                       config=cfg, backend="triton")
    assert float(got.metrics["sampling/outside_support"]) == pytest.approx(1 / 7)
    assert math.isinf(float(got.logps[0, 1])) and torch.isfinite(got.loss)
    assert_close_to_truth(got.loss.cpu(), want.loss.detach(), eager.loss.detach(), ulps=ULPS_LOSS, what="loss")
    for name in ("ratio", "kl", "entropy", "sampling/outside_support"):
        assert_close_to_truth(got.metrics[name].cpu(), want.metrics[name], eager.metrics[name], ulps=ULPS_LOSS,
                              what=name)
    for out, inp in ((want, truth_in), (eager, eager_in), (got, got_in)):
        out.loss.backward()
    assert bool((got_in.grad[0, 1] == 0).all()) and bool((got_in.grad[1, 3] == 0).all())
    assert_close_to_truth(got_in.grad.cpu(), truth_in.grad, eager_in.grad, ulps=ULPS_GRAD, floor=0.0,
                          scale=dlogits_scale(truth_in.grad, x, 0.5), what="dlogits")


def test_inplace_backward_and_masked_rows_unread():
    """inplace_backward with a rule writes the same gradient into the logits buffer; a masked
    position holding NaN is not read (its row is skipped by the cutoff and both row passes)."""
    cfg = gf.GRPOConfig(loss_type="bnpo", top_p=0.7, min_p=0.05)
    x, ids, adv, mask, old, _ = _loss_inputs(12, cfg.sampling, 1.0)
    x[1, 3] = float("nan")  # masked position
    plain_in = x.clone().to(DEVICE).requires_grad_()
    plain = gf.grpo_loss(plain_in, ids.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE), old.to(DEVICE), config=cfg,
                         backend="triton")
    plain.loss.backward()
    buffer = x.clone().to(DEVICE).requires_grad_()
    inplace = gf.grpo_loss(buffer, ids.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE), old.to(DEVICE), config=cfg,
                           inplace_backward=True, backend="triton")
    inplace.loss.backward()
    assert torch.equal(inplace.loss, plain.loss)
    assert torch.equal(buffer.detach(), plain_in.grad)  # the buffer now holds the gradient
    assert bool(torch.isfinite(plain_in.grad).all()) and bool((plain_in.grad[1, 3] == 0).all())
    want = gf.grpo_loss(x.double(), ids, adv, mask, old.double(), config=cfg, backend="reference")
    assert_close_to_truth(plain.loss.cpu(), want.loss, ulps=ULPS_LOSS, dtype=torch.float32, what="loss")


# --------------------------------------------------------------------------------------
# The chunked linear path.
# --------------------------------------------------------------------------------------


def test_linear_chunked_log_probs_and_gradients():
    """Integer hidden states and weights: the logits are exact integers in fp32 (ties) and every
    GEMM of the chunked path (forward chunks, backward chunks, vocab slices) rounds them alike.
    Chunks of 3 tokens and vocab slices of 16 columns put ties across slice boundaries."""
    N, H, V = 7, 6, 70
    g = torch.Generator().manual_seed(13)
    hidden = torch.randint(-2, 3, (N, H), generator=g).float()
    weight = torch.randint(-2, 3, (V, H), generator=g).float()
    bias = torch.randint(-1, 2, (V,), generator=g).float()
    logits = hidden @ weight.T + bias
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, 2]
    ids[3] = torch.sort(logits[3], descending=True, stable=True).indices[-1]  # outside
    kw = dict(top_k=9, top_p=0.8, min_p=0.02)
    from grpo_fused.kernels.linear_chunked import Chunked
    from grpo_fused.kernels.linear_log_softmax import linear_log_softmax

    values = vocab_values(0.5, SamplingRule(**kw)).to(DEVICE)
    params = [t.clone().to(DEVICE).requires_grad_() for t in (hidden, weight, bias)]
    logps, entropy = linear_log_softmax(params[0], params[1], ids.to(DEVICE), values, params[2], True,
                                        Chunked(chunk_size=3, vocab_slice=16), ss.SupportRule())
    truth = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    want_logps, want_entropy = R.linear_log_softmax(truth[0], truth[1], ids, 0.5, truth[2], True, **kw)
    eager = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    eager_logps, eager_entropy = R.linear_log_softmax(eager[0], eager[1], ids, 0.5, eager[2], True, **kw)
    assert torch.equal(torch.isneginf(logps.cpu()), torch.isneginf(want_logps)) and math.isinf(float(logps[3].detach()))
    scale = logit_row_scale(logits, 0.5)
    assert_close_to_truth(logps.cpu(), want_logps.detach(), eager_logps.detach(), ulps=ULPS_VALUE, scale=scale,
                          what="logps")
    assert_close_to_truth(entropy.cpu(), want_entropy.detach(), eager_entropy.detach(), ulps=ULPS_VALUE,
                          scale=scale, what="entropy")
    finite = torch.isfinite(want_logps)
    for (lp, ent), inputs in (((logps, entropy), params), ((want_logps, want_entropy), truth),
                              ((eager_logps, eager_entropy), eager)):
        (lp[finite.to(lp.device)].sum() + 0.5 * ent.sum()).backward()
    for name, got, want, ref in zip(("dhidden", "dweight", "dbias"), params, truth, eager):
        assert_close_to_truth(got.grad.cpu(), want.grad, ref.grad, ulps=ULPS_LINEAR_GRAD, floor=0.0, what=name)


def test_linear_grpo_loss_chunked_and_tiled_refusal():
    B, T, H, V = 2, 3, 5, 40
    g = torch.Generator().manual_seed(14)
    hidden = torch.randint(-2, 3, (B, T, H), generator=g).float()
    weight = torch.randint(-2, 3, (V, H), generator=g).float()
    order = torch.sort(hidden @ weight.T, dim=-1, descending=True, stable=True).indices
    ids = order.gather(-1, torch.tensor([[0, 3, 30], [1, 0, 12]]).unsqueeze(-1)).squeeze(-1)  # in, in, out ...
    adv = torch.tensor([0.5, -1.0])
    cfg = gf.GRPOConfig(loss_type="dr_grpo", top_k=6, top_k_ties="all")
    want = gf.linear_grpo_loss(hidden.double(), weight.double(), ids, adv, config=cfg, backend="reference")
    got = gf.linear_grpo_loss(hidden.to(DEVICE), weight.to(DEVICE), ids.to(DEVICE), adv.to(DEVICE), config=cfg,
                              strategy="auto", backend="triton")
    assert_close_to_truth(got.loss.cpu(), want.loss, ulps=ULPS_LOSS, dtype=torch.float32, what="loss")
    assert_close_to_truth(got.metrics["sampling/outside_support"].cpu(), want.metrics["sampling/outside_support"],
                          ulps=ULPS_LOSS, dtype=torch.float32, what="outside_support")
    with pytest.raises(ValueError, match="strategy='tiled' cannot apply a sampling rule"):
        gf.linear_grpo_loss(hidden.to(DEVICE), weight.to(DEVICE), ids.to(DEVICE), adv.to(DEVICE), config=cfg,
                            strategy="tiled", backend="triton")
    with pytest.raises(ValueError, match="strategy='tiled' cannot apply a sampling rule"):
        gf.linear_log_softmax(hidden.to(DEVICE), weight.to(DEVICE), ids.to(DEVICE), top_p=0.9, strategy="tiled",
                              backend="triton")


# --------------------------------------------------------------------------------------
# The rule's numbers are data.
# --------------------------------------------------------------------------------------


def test_new_top_p_compiles_nothing(monkeypatch):
    """Every kernel launch of a new top_p / top_k / min_p has the specialization of the first: the
    same constexprs and argument types (what Triton's compile cache keys on, beside alignment),
    with the rule only in the params tensor's contents."""
    launches = []
    kernels = (ss._sampling_cutoff_kernel,)
    from grpo_fused.kernels import selective_log_softmax as sls

    kernels += (sls._selective_log_softmax_fwd_kernel, sls._selective_log_softmax_bwd_kernel)
    runner = type(kernels[0])
    original = runner.run

    def record(self, *args, grid, warmup, **kwargs):
        if self in kernels:
            key = [self.fn.__name__ if hasattr(self, "fn") else str(self)]
            key += [(a.dtype, a.dim()) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
            key += sorted((k, str(v)) for k, v in kwargs.items())
            launches.append(tuple(key))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(runner, "run", record)
    x = _integers(2, 30, -3, 4, seed=15).to(DEVICE).requires_grad_()
    ids = torch.tensor([0, 1], device=DEVICE)
    keys = []
    for kw in (dict(top_p=0.9), dict(top_p=0.5), dict(top_k=3, top_p=0.7, min_p=0.1)):
        launches.clear()
        logps, entropy = gf.selective_log_softmax(x, ids, compute_entropy=True, backend="triton", **kw)
        (logps.sum() + entropy.sum()).backward()
        keys.append(list(launches))
    assert len(keys[0]) == 3 and keys[0] == keys[1] == keys[2]
