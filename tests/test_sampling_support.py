"""Sampling-support replay: log-probs of the truncated distribution vLLM's sampler used.

The reference (:func:`grpo_fused.reference.sampling_support`, a stable sort and a float64
cumulative sum) is checked against hand-computed supports and against a second, independently
written version of vLLM's PyTorch masking (ascending sort, k-th value, ascending cumulative sum
``<= 1 - p`` dropped); a sampler that draws from the truncated distribution matches ``exp(logp)``.

Every fused backend (C++, Triton) is checked against the reference run in float64 on the same
inputs, within the tolerance rule of tests/tolerance.py: log-probs, entropy and gradients of the
logits and linear paths, each stage alone and combined, both tie rules, -inf and NaN logits, masked
rows, fp32 / bf16 / fp64, and the loss with outside-support tokens. The support itself is checked
exactly at its boundary: the support is a prefix of the order (z descending, id ascending), so a
backend that keeps the reference's last kept token and drops its first dropped one keeps exactly
the reference's support. Continuous data is drawn clear of the top-p and min-p boundaries (a kernel
sums the top-p mass in fp32, the reference in float64); integer-valued logits at temperature 1 or
0.5 make ties exact in every precision.
"""

import math

import pytest
import torch

import grpo_fused as gf
from grpo_fused import reference as R
from grpo_fused.semantics import ExplicitSupport, SamplingRule

from conftest import fused_backends
from tolerance import ULPS_GRAD, ULPS_LOSS, ULPS_VALUE, assert_close_to_truth, dlogits_scale, logit_row_scale


def vllm_style_mask(z, top_k=None, top_p=None, min_p=None):
    """vLLM's PyTorch path written from its description: min-p on probabilities, then an ascending
    sort, top-k as "below the k-th largest value is dropped" (ties kept), top-p as "ascending
    cumulative probability <= 1 - p is dropped, the largest always kept". Rows without ties only
    (the two tie rules agree there)."""
    z = z.clone().double()
    if min_p is not None:
        probs = torch.softmax(z, -1)
        z = z.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)
    ascending, index = torch.sort(z, -1)
    if top_k is not None and top_k < z.shape[-1]:
        kth = ascending[..., -top_k].unsqueeze(-1)
        ascending = ascending.masked_fill(ascending < kth, -math.inf)
    if top_p is not None:
        cumulative = torch.softmax(ascending, -1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        ascending = ascending.masked_fill(drop, -math.inf)
    out = torch.empty_like(z).scatter(-1, index, ascending)
    return out > -math.inf


RULES = [
    dict(top_k=1), dict(top_k=5), dict(top_k=40), dict(top_p=0.3), dict(top_p=0.9), dict(top_p=0.999),
    dict(min_p=0.05), dict(min_p=0.5), dict(top_k=8, top_p=0.7), dict(top_k=20, top_p=0.95, min_p=0.02),
    dict(top_p=0.8, min_p=0.1),
]


def _rows(n, V, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g, dtype=torch.float64) * scale


def _clear_of_boundaries(z, rule, margin=1e-6):
    """True when no top-p or min-p decision of any row lies within ``margin`` of its threshold
    (there the float64 reference and a float32 kernel may round to different sides)."""
    z_sorted = torch.sort(z, -1, descending=True).values
    if rule.min_p:
        d = (z_sorted - z_sorted[..., :1]) - math.log(rule.min_p)
        if bool((d.abs() < margin).any()):
            return False
    if rule.top_p is not None:
        keep = R.sampling_support(z, SamplingRule(rule.top_k, None, rule.min_p, rule.top_k_ties))
        w = torch.where(keep, torch.exp(z - z.amax(-1, keepdim=True)), 0.0)
        w_sorted = torch.sort(w, -1, descending=True).values
        before = (w_sorted.cumsum(-1) - w_sorted) / w_sorted.sum(-1, keepdim=True)
        if bool(((before - rule.top_p).abs() < margin).any()):
            return False
    return True


# --------------------------------------------------------------------------------------
# The rule itself.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", RULES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_reference_support_equals_vllm_style_masking(kw):
    z = _rows(64, 300, 2.0, seed=len(str(kw)))
    rule = SamplingRule(**kw)
    assert _clear_of_boundaries(z, rule, margin=1e-10)  # both sides sum in float64
    got = R.sampling_support(z, rule)
    want = vllm_style_mask(z, **kw)
    assert torch.equal(got, want)
    assert bool(got.any(-1).all())  # at least one token kept in every row


def test_hand_computed_supports():
    # probabilities of z = log([0.5, 0.25, 0.15, 0.1]) (ids 0..3)
    z = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]], dtype=torch.float64))  # sorted: id 1, 3, 2, 0
    support = lambda **kw: R.sampling_support(z, SamplingRule(**kw)).int().tolist()[0]  # noqa: E731
    assert support(top_k=2) == [0, 1, 0, 1]
    # top-p 0.6: mass before id1 = 0 < .6 keep; before id3 = .5 < .6 keep; before id2 = .75 drop
    assert support(top_p=0.6) == [0, 1, 0, 1]
    assert support(top_p=0.5) == [0, 1, 0, 0]  # 0.5 before id3 is not < 0.5
    assert support(top_p=0.76) == [0, 1, 1, 1]
    # min-p 0.3: p >= 0.3 * 0.5 = 0.15 keeps ids 1, 3, 2
    assert support(min_p=0.3) == [0, 1, 1, 1]
    # min-p 0.3 then top-p 0.6 on the renormalized survivors (.5/.9, .25/.9, .15/.9): before id2 = .833
    assert support(min_p=0.3, top_p=0.6) == [0, 1, 0, 1]
    # top-k 3 then top-p 0.8 on (.5, .25, .15)/.9: before id2 = .75/.9 = .833 >= .8, dropped
    assert support(top_k=3, top_p=0.8) == [0, 1, 0, 1]
    assert support(top_p=1.0) == [1, 1, 1, 1]
    assert support(min_p=0.0) == [1, 1, 1, 1]


def test_ties_exact_keeps_lowest_ids_all_keeps_every_tie():
    z = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    exact = R.sampling_support(z, SamplingRule(top_k=3)).int().tolist()[0]
    every = R.sampling_support(z, SamplingRule(top_k=3, top_k_ties="all")).int().tolist()[0]
    assert exact == [0, 1, 1, 1, 0, 0]
    assert every == [0, 1, 1, 1, 1, 0]
    # top-p meets the tied tokens lowest id first: masses e^3, e^2, e^2, e^2 ...
    w = torch.exp(z[0] - 3.0)
    total = float(w.sum())
    p = (1.0 + 2 * float(w[2])) / total - 1e-9  # the third token of the tie group is just not needed
    assert R.sampling_support(z, SamplingRule(top_p=p)).int().tolist()[0] == [0, 1, 1, 1, 0, 0]


def test_log_probs_and_entropy_are_the_renormalized_truncated_distribution():
    z = _rows(8, 50, 1.5, seed=3)
    ids = torch.arange(8) * 3
    temperature = 0.7
    rule = dict(top_k=12, top_p=0.85)
    logps, entropy = R.selective_log_softmax(z, ids, temperature, True, **rule)
    keep = R.sampling_support(z / temperature, SamplingRule(**rule))
    probs = torch.where(keep, torch.exp(z / temperature), 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    want_logp = torch.log(probs.gather(-1, ids[:, None]).squeeze(-1))
    torch.testing.assert_close(logps, want_logp, rtol=0, atol=1e-12)
    plogp = torch.where(probs > 0, probs * torch.log(probs), 0.0)
    torch.testing.assert_close(entropy, -plogp.sum(-1), rtol=0, atol=1e-12)
    assert bool(torch.isneginf(logps[~keep.gather(-1, ids[:, None]).squeeze(-1)]).all())


def test_gradient_reaches_kept_logits_only():
    z = _rows(4, 30, 2.0, seed=5).requires_grad_()
    ids = torch.sort(z.detach(), -1, descending=True).indices[:, 0]  # the top token: always kept
    logps, entropy = R.selective_log_softmax(z, ids, 1.0, True, top_k=6, top_p=0.9)
    (logps.sum() + 0.3 * entropy.sum()).backward()
    keep = R.sampling_support(z.detach(), SamplingRule(top_k=6, top_p=0.9))
    assert bool((z.grad[~keep] == 0).all())
    assert bool((z.grad[keep] != 0).any())
    torch.autograd.gradcheck(
        lambda x: R.selective_log_softmax(x, ids, 1.0, True, top_k=6, top_p=0.9),
        (z.detach().clone().requires_grad_(),),
    )


def test_sampled_frequencies_match_exp_logp():
    """Draw from the truncated distribution as vLLM does (mask, softmax, exponential race) and
    compare the empirical frequencies with exp(logp) of every id."""
    V, draws = 40, 200_000
    z = _rows(1, V, 1.2, seed=11)
    rule = dict(top_k=15, top_p=0.9, min_p=0.05)
    keep = vllm_style_mask(z, **rule)
    probs = torch.softmax(z.masked_fill(~keep, -math.inf), -1).expand(draws, V)
    g = torch.Generator().manual_seed(0)
    race = torch.empty(draws, V, dtype=torch.float64).exponential_(generator=g)
    samples = (probs / race).argmax(-1)
    freq = torch.bincount(samples, minlength=V).double() / draws
    logps, _ = R.selective_log_softmax(z.expand(V, V), torch.arange(V), **rule)
    expected = torch.exp(logps)
    assert float(expected.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((freq[expected == 0] == 0).all())  # nothing drawn outside the support
    # 5 standard deviations of a binomial frequency
    sd = torch.sqrt(expected * (1 - expected) / draws)
    assert bool(((freq - expected).abs() <= 5 * sd + 1e-12).all())


# --------------------------------------------------------------------------------------
# The loss: an outside-support token leaves it; the replayed ratio is 1 on-policy.
# --------------------------------------------------------------------------------------


def test_replayed_ratio_is_one_where_the_full_softmax_ratio_is_the_kept_mass():
    B, T, V = 2, 6, 30
    logits = _rows(B * T, V, 2.0, seed=13).view(B, T, V)
    ids = torch.sort(logits, -1, descending=True).indices[..., 0]
    cfg = gf.GRPOConfig(top_p=0.8, compute_entropy=False)
    # The sampler's own log-probs (what vLLM reports with processed log-probs) ...
    rollout, _ = R.selective_log_softmax(logits, ids, top_p=0.8)
    # ... against the training pass with and without replay.
    replay = gf.grpo_loss(logits, ids, torch.ones(B), old_logps=rollout, config=cfg, backend="reference")
    plain = gf.grpo_loss(logits, ids, torch.ones(B), old_logps=rollout, config=cfg.replace(top_p=None),
                         backend="reference")
    assert float(replay.metrics["ratio"]) == pytest.approx(1.0, abs=1e-12)
    keep = R.sampling_support(logits, SamplingRule(top_p=0.8))
    kept_mass = torch.where(keep, torch.softmax(logits, -1), 0.0).sum(-1)
    torch.testing.assert_close(torch.exp(plain.logps - rollout), kept_mass, rtol=0, atol=1e-12)


def test_readme_worked_example():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -2.0]], dtype=torch.float64)
    ids = torch.tensor([1])
    full, _ = R.selective_log_softmax(logits, ids)
    replay, _ = R.selective_log_softmax(logits, ids, top_p=0.8)
    assert R.sampling_support(logits, SamplingRule(top_p=0.8)).tolist() == [[True, True, False, False, False]]
    assert float(replay.exp()) == pytest.approx(0.2689, abs=1e-4)
    assert float(full.exp()) == pytest.approx(0.2217, abs=1e-4)
    assert float((full - replay).exp()) == pytest.approx(0.8245, abs=1e-4)


def test_outside_support_token_leaves_the_loss_and_is_counted():
    B, T, V = 2, 4, 20
    logits = _rows(B * T, V, 2.0, seed=17).view(B, T, V).requires_grad_()
    top = torch.sort(logits.detach(), -1, descending=True).indices
    ids = top[..., 0].clone()
    ids[0, 1] = top[0, 1, -1]  # the least probable token: outside top_k=5
    ids[1, 3] = top[1, 3, -2]
    mask = torch.ones(B, T)
    mask[1, 3] = 0  # ... but masked out here: not counted
    adv = torch.tensor([1.0, -0.5])
    old = torch.randn(B, T, dtype=torch.float64) * 0.1 - 1.0
    cfg = gf.GRPOConfig(top_k=5, loss_type="grpo", beta=0.1)
    ref = torch.randn(B, T, dtype=torch.float64) * 0.1 - 1.0
    out = gf.grpo_loss(logits, ids, adv, mask, old_logps=old, ref_logps=ref, config=cfg, backend="reference")
    assert float(out.metrics["sampling/outside_support"]) == pytest.approx(1 / 7)
    assert math.isinf(float(out.logps[0, 1])) and torch.isfinite(out.loss)
    # The same loss as with that token masked out by hand.
    mask2 = mask.clone()
    mask2[0, 1] = 0
    want = gf.grpo_loss(logits, ids, adv, mask2, old_logps=old, ref_logps=ref, config=cfg, backend="reference")
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    out.loss.backward()
    assert bool(torch.isfinite(logits.grad).all())
    assert bool((logits.grad[0, 1] == 0).all())


# --------------------------------------------------------------------------------------
# Explicit support (CSR kept ids).
# --------------------------------------------------------------------------------------


def _csr_of(keep):
    rows = keep.reshape(-1, keep.shape[-1])
    counts = rows.sum(-1)
    offsets = torch.zeros(rows.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    return ExplicitSupport(offsets, rows.nonzero()[:, 1])


def test_explicit_support_equals_the_rule_it_lists():
    B, T, V, H = 2, 5, 40, 8
    g = torch.Generator().manual_seed(19)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    rule = dict(top_k=9, top_p=0.9)
    logits = R.linear_logits(hidden, weight, bias)
    keep = R.sampling_support(logits / 0.8, SamplingRule(**rule))
    ids = torch.sort(logits, -1, descending=True).indices[..., 2]
    ids[0, 0] = torch.sort(logits[0, 0], descending=True).indices[-1]  # outside
    support = _csr_of(keep)

    want = R.selective_log_softmax(logits, ids, 0.8, True, **rule)
    got = gf.selective_log_softmax(logits, ids, 0.8, compute_entropy=True, support=support)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    params = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    lp, ent = gf.linear_log_softmax(params[0], params[1], ids, 0.8, bias=params[2], compute_entropy=True,
                                    support=support)
    torch.testing.assert_close(lp, want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, want[1], rtol=0, atol=1e-12)
    finite = torch.isfinite(lp)
    (lp[finite].sum() + ent.sum()).backward()
    ref_params = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    lp2, ent2 = R.linear_log_softmax(ref_params[0], ref_params[1], ids, 0.8, ref_params[2], True, **rule)
    (lp2[finite].sum() + ent2.sum()).backward()
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_explicit_support_in_the_loss():
    B, T, V = 2, 3, 16
    logits = _rows(B * T, V, 1.0, seed=23).view(B, T, V)
    keep = R.sampling_support(logits, SamplingRule(top_k=4))
    ids = torch.sort(logits, -1, descending=True).indices[..., 1]
    ids[1, 2] = torch.sort(logits[1, 2], descending=True).indices[-1]
    cfg = gf.GRPOConfig(loss_type="bnpo")
    adv = torch.tensor([0.5, -1.0])
    got = gf.grpo_loss(logits, ids, adv, config=cfg, support=_csr_of(keep))
    want = gf.grpo_loss(logits, ids, adv, config=cfg.replace(top_k=4), backend="reference")
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-12)
    assert float(got.metrics["sampling/outside_support"]) == pytest.approx(1 / 6)


# --------------------------------------------------------------------------------------
# Bad arguments.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, words", [
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(top_k=-3), ValueError, "top_k must be >= 1"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(top_p=0.0), ValueError, "top_p must be in (0, 1]"),
    (dict(top_p=1.01), ValueError, "top_p must be in (0, 1]"),
    (dict(top_p=float("nan")), ValueError, "top_p must be in (0, 1]"),
    (dict(min_p=1.0), ValueError, "min_p must be in [0, 1)"),
    (dict(min_p=-0.1), ValueError, "min_p must be in [0, 1)"),
    (dict(top_k_ties="some"), ValueError, "top_k_ties must be one of"),
])
def test_bad_sampling_arguments_name_the_argument(kw, error, words):
    logits, ids = torch.randn(2, 8), torch.tensor([1, 2])
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        gf.GRPOConfig(**kw)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        gf.selective_log_softmax(logits, ids, **kw)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        gf.linear_log_softmax(torch.randn(2, 4), torch.randn(8, 4), ids, **kw)


@pytest.mark.parametrize("offsets, kept, words", [
    ([0, 2], [1, 2], r"support.offsets must have shape \(3,\)"),
    ([0, 2, 1], [1, 2], "support.offsets must rise from 0 to 2"),
    ([0, 1, 3], [1, 2], "support.offsets must rise from 0 to 2"),
    ([0, 1, 2], [1, 8], r"support.ids must lie in \[0, 8\)"),
    ([0, 2, 2], [3, 3], "distinct within each position"),
])
def test_bad_explicit_support(offsets, kept, words):
    logits, ids = torch.randn(2, 8), torch.tensor([1, 2])
    support = ExplicitSupport(torch.tensor(offsets), torch.tensor(kept))
    with pytest.raises(ValueError, match=words):
        gf.selective_log_softmax(logits, ids, support=support)


def test_support_and_rule_together_are_refused():
    logits, ids = torch.randn(2, 8), torch.tensor([1, 2])
    support = ExplicitSupport(torch.tensor([0, 1, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="either support= or a sampling rule"):
        gf.selective_log_softmax(logits, ids, top_k=3, support=support)
    with pytest.raises(TypeError, match="support must be a grpo_fused.ExplicitSupport"):
        gf.selective_log_softmax(logits, ids, support=(support.offsets, support.ids))


# --------------------------------------------------------------------------------------
# Fused backends against the float64 reference.
# --------------------------------------------------------------------------------------

MARGIN = 1e-4  # relative distance every top-p / min-p decision keeps from its threshold
FUSED_RULES = [  # each stage alone, both tie rules, and the stages combined
    dict(top_k=5), dict(top_k=5, top_k_ties="all"), dict(top_p=0.8), dict(min_p=0.1),
    dict(top_k=12, top_p=0.85), dict(top_k=20, top_p=0.9, min_p=0.02, top_k_ties="all"),
]
_rule_id = lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())  # noqa: E731


def _drawn(make, rule, temperature, seed, margin=MARGIN):
    """``make(generator)`` for the first seed from ``seed`` whose rows keep every support decision
    ``margin`` away from its threshold (asserted, not assumed)."""
    for attempt in range(50):
        x = make(torch.Generator().manual_seed(seed * 100 + attempt))
        if _clear_of_boundaries(x.double() / temperature, rule, margin=margin):
            return x
    raise AssertionError("no draw clear of the boundaries")


def _boundary_rows(x, rule, temperature):
    """Each row of ``x`` twice, with ids: its last kept token, then its first dropped one (a random
    token where nothing is dropped). Returns ``(rows, ids)``."""
    kept = R.sampling_support(x.double() / temperature, rule)
    order = torch.sort(x.double(), dim=-1, descending=True, stable=True).indices
    count = kept.sum(-1)
    last = order.gather(-1, (count - 1).unsqueeze(-1)).squeeze(-1)
    first_dropped = order.gather(-1, count.clamp(max=x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    first_dropped = torch.where(count < x.shape[-1], first_dropped, torch.zeros_like(first_dropped))
    ids = torch.stack([last, first_dropped], -1).reshape(-1)
    return x.repeat_interleave(2, dim=0), ids


def _check_vocab_pass(backend, x, ids, temperature, kw, weights=None):
    """The backend against the float64 reference and eager PyTorch in ``x``'s dtype: log-probs
    (-inf exactly where the truth has it), entropy, and the gradient of ``sum(w1 * finite logps) +
    sum(w2 * entropy)``, 0 at every dropped logit."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(n)
    w1, w2 = weights or (torch.randn(n, generator=g), torch.randn(n, generator=g))
    results = []
    for inp, name in ((x.double(), "reference"), (x, "reference"), (x, backend)):
        inp = inp.clone().requires_grad_()
        logps, entropy = gf.selective_log_softmax(inp, ids, temperature, compute_entropy=True, backend=name, **kw)
        finite = torch.isfinite(logps.detach())
        (torch.where(finite, logps, 0.0) * w1.to(logps)).sum().add((entropy * w2.to(entropy)).sum()).backward()
        results.append((logps.detach(), entropy.detach(), inp.grad))
    (truth_lp, truth_h, truth_g), (eager_lp, eager_h, eager_g), (lp, h, grad) = results
    eager = x.dtype != torch.float64  # a float64 run is the truth's own computation
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = logit_row_scale(x, temperature)
    assert_close_to_truth(lp, truth_lp, eager_lp if eager else None, ulps=ULPS_VALUE, scale=scale, dtype=acc,
                          what="logps")
    assert_close_to_truth(h, truth_h, eager_h if eager else None, ulps=ULPS_VALUE, scale=scale, dtype=acc,
                          what="entropy")
    kept = R.sampling_support(x.double() / temperature, SamplingRule(**kw))
    assert bool((grad[~kept] == 0).all()), "a dropped logit received a gradient"
    assert_close_to_truth(grad, truth_g, eager_g if eager else None, ulps=ULPS_GRAD, floor=0.0,
                          scale=dlogits_scale(truth_g, x, temperature), dtype=x.dtype, what="dlogits")


@pytest.mark.parametrize("backend", fused_backends("selective_log_softmax"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kw", FUSED_RULES, ids=_rule_id)
def test_fused_vocab_pass_equals_the_reference(backend, dtype, kw):
    rule = SamplingRule(**kw)
    # V = 97 (not a multiple of any vector width). Continuous rows at T = 0.7 (z = logits * (1/T)
    # rounded, as every pass computes it) with some -inf columns; integer rows at T = 0.5 (exact
    # ties, a tie group at nearly every cutoff).
    def continuous(g):
        x = (torch.randn(2, 97, generator=g, dtype=torch.float64) * 2).to(dtype)
        x[1, 60:] = float("-inf")
        return x
    for make, temperature in ((continuous, 0.7), (lambda g: torch.randint(-4, 5, (2, 97), generator=g).to(dtype), 0.5)):
        x = _drawn(make, rule, temperature, seed=len(str(kw)))
        rows, ids = _boundary_rows(x, rule, temperature)
        _check_vocab_pass(backend, rows, ids, temperature, kw)


@pytest.mark.parametrize("backend", fused_backends("selective_log_softmax"))
@pytest.mark.parametrize("ties", ["exact", "all"])
def test_fused_tie_groups_across_every_cutoff(backend, ties):
    # Values -2..2 over V = 60: a dozen tokens tied at each value, so every cutoff splits a tie group
    # (exact: lowest ids first) or keeps it whole (all); top-p meets its tie group lowest id first.
    for kw in (dict(top_k=7), dict(top_k=20, top_p=0.6), dict(top_p=0.5), dict(top_k=30, min_p=0.2)):
        kw = dict(kw, top_k_ties=ties) if "top_k" in kw else kw
        rule = SamplingRule(**kw)
        x = _drawn(lambda g: torch.randint(-2, 3, (2, 60), generator=g).float(), rule, 1.0, seed=3)
        rows, ids = _boundary_rows(x, rule, 1.0)
        _check_vocab_pass(backend, rows, ids, 1.0, kw)


@pytest.mark.parametrize("backend", fused_backends("selective_log_softmax"))
def test_fused_non_finite_rows(backend):
    kw = dict(top_k=6, top_p=0.9)
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(5)) * 2
    x[0, ::3] = float("-inf")  # masked vocabulary
    x[1, 1:] = float("-inf")  # one finite logit: the support is that token (and -inf ties after it)
    x[2, 17] = float("nan")  # a NaN row keeps nothing: NaN log-prob and entropy, no gradient
    ids = torch.tensor([int(x[0].argmax()), 0, 4, int(x[3].argmax())])
    assert _clear_of_boundaries(x[[0, 1, 3]].double(), SamplingRule(**kw), margin=MARGIN)
    truth, _ = R.selective_log_softmax(x.double(), ids, 1.0, True, **kw)
    inp = x.clone().requires_grad_()
    logps, entropy = gf.selective_log_softmax(inp, ids, compute_entropy=True, backend=backend, **kw)
    assert math.isnan(logps[2].item()) and math.isnan(entropy[2].item()) and math.isnan(truth[2].item())
    (logps[[0, 1, 3]].sum() + entropy[[0, 1, 3]].sum()).backward()
    assert bool((inp.grad[2] == 0).all())
    finite_rows = torch.tensor([0, 1, 3])
    _check_vocab_pass(backend, x[finite_rows], ids[finite_rows], 1.0, kw)


@pytest.mark.parametrize("backend", fused_backends("linear_log_softmax"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_linear_pass_equals_the_reference(backend, dtype):
    kw = dict(top_k=9, top_p=0.9, min_p=0.01)
    rule = SamplingRule(**kw)
    B, T, H, V = 2, 3, 16, 70

    def make(g):
        return torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g,
                                                                                   dtype=torch.float64) / 2
    for attempt in range(50):
        hidden, weight = make(torch.Generator().manual_seed(31 + attempt))
        bias = torch.linspace(-1, 1, V, dtype=torch.float64)
        if _clear_of_boundaries(R.linear_logits(hidden, weight, bias) / 0.9, rule, margin=MARGIN):
            break
    hidden, weight, bias = (t.to(dtype) for t in (hidden, weight, bias))
    logits = R.linear_logits(hidden.double(), weight.double(), bias.double())
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., 1]
    ids[0, 0] = torch.sort(logits[0, 0], dim=-1, descending=True, stable=True).indices[-1]  # outside
    results = []
    for name, cast in (("reference", torch.float64), ("reference", dtype), (backend, dtype)):
        params = [t.to(cast).clone().requires_grad_() for t in (hidden, weight, bias)]
        extra = dict(chunk_size=2) if name != "reference" else {}  # several chunks of logits
        logps, entropy = gf.linear_log_softmax(params[0], params[1], ids, 0.9, bias=params[2], compute_entropy=True,
                                               backend=name, **kw, **extra)
        finite = torch.isfinite(logps.detach())
        (torch.where(finite, logps, 0.0).sum() + 0.5 * entropy.sum()).backward()
        results.append((logps.detach(), entropy.detach(), [p.grad for p in params]))
    (truth_lp, truth_h, truth_g), (eager_lp, eager_h, eager_g), (lp, h, grads) = results
    eager = dtype != torch.float64
    assert torch.isneginf(lp[0, 0]) and torch.isneginf(truth_lp[0, 0])
    scale = logit_row_scale(logits, 0.9)
    assert_close_to_truth(lp, truth_lp, eager_lp if eager else None, ulps=ULPS_VALUE, scale=scale,
                          dtype=lp.dtype, what="logps")
    assert_close_to_truth(h, truth_h, eager_h if eager else None, ulps=ULPS_VALUE, scale=scale, dtype=h.dtype,
                          what="entropy")
    # The GEMMs of the chunked path sum over V and N in another order than eager's (fp32: 32 ulps,
    # the budget of tests/test_triton_linear.py).
    ulps = {**ULPS_GRAD, torch.float32: 32}
    for got, want, eager_grad, name in zip(grads, truth_g, eager_g, ("dhidden", "dweight", "dbias")):
        assert_close_to_truth(got, want, eager_grad if eager else None, ulps=ulps, floor=0.0, dtype=dtype, what=name)


@pytest.mark.parametrize("backend", fused_backends("grpo_loss"))
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_fused_loss_drops_outside_support_tokens(backend, path):
    """The GRPO loss under top-k / top-p: an outside-support token leaves the loss and is counted, a
    masked row holding NaN logits is not read; loss, metrics and gradients equal the reference's."""
    B, T, V, H = 2, 4, 30, 8
    kw = dict(top_k=6, top_p=0.95)
    g = torch.Generator().manual_seed(37)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    logits = R.linear_logits(hidden, weight)
    assert _clear_of_boundaries(logits.view(-1, V), SamplingRule(**kw), margin=MARGIN)
    top = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    ids = top[..., 0].clone()
    ids[0, 1] = top[0, 1, -1]  # outside top-k
    ids[1, 2] = top[1, 2, 3]
    ids[1, 3] = top[1, 3, -2]  # outside, but masked out: not counted
    mask = torch.ones(B, T)
    mask[1, 3] = 0
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 1.0
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 1.0
    cfg = gf.GRPOConfig(loss_type="dapo", beta=0.1, entropy_coef=0.01, compute_entropy=True, **kw)
    outs, grads = [], []
    for name in ("reference", backend):
        if path == "logits":
            x = logits.clone()
            x[1, 3] = float("nan")  # masked position: never reaches the loss, a metric or a gradient
            x.requires_grad_()
            out = gf.grpo_loss(x, ids, adv, mask, old, ref, config=cfg, backend=name)
            inputs = (x,)
        else:
            inputs = (hidden.clone().requires_grad_(), weight.clone().requires_grad_())
            out = gf.linear_grpo_loss(*inputs, ids, adv, mask, old, ref, config=cfg, backend=name)
        outs.append(out)
        grads.append(torch.autograd.grad(out.loss, inputs))
    want, got = outs
    assert float(got.metrics["sampling/outside_support"]) == pytest.approx(1 / 7)
    assert_close_to_truth(got.loss, want.loss, ulps=ULPS_LOSS, what="loss")
    for name in want.metrics:
        assert_close_to_truth(got.metrics[name], want.metrics[name], ulps=ULPS_LOSS, what=name)
    assert torch.equal(torch.isneginf(got.logps), torch.isneginf(want.logps))
    for got_grad, want_grad in zip(*grads):
        assert bool(torch.isfinite(got_grad).all())
        assert_close_to_truth(got_grad, want_grad, ulps=ULPS_GRAD, floor=0.0, what="gradient")
    if path == "logits":
        assert bool((grads[1][0][1, 3] == 0).all())


# The C++ search (csrc/sampling_support.h) settles the usual rule from its streamed candidates
# (kStreamKeep = 256 best survivors) and falls back to a bounded search (ladder, histograms,
# gathers, tie sweeps) beyond them: rows of a few thousand tokens reach every branch. Triton's
# interpreter spends ~0.3 s a row on its own search (tests/test_triton_sampling_support.py covers it
# at its sizes), so these rows run on the C++ backend only.
CPP_SEARCH_CASES = {
    # the seeded stream settles both stages (LLM-like rows: a few boosted tokens)
    "stream": ("peaked", dict(top_k=50, top_p=0.9)),
    "stream top-p": ("peaked", dict(top_p=0.95, min_p=0.001)),
    # top-k above the seed's guaranteed count: the stream starts from every survivor and compacts
    "stream compacting": ("flat", dict(top_k=200)),
    # a top-p set of ~1000 tokens: the mass ladder, 256-bucket histograms, a gather
    "fallback top-p": ("flat", dict(top_p=0.9)),
    # top-k beyond the stream: the count ladder
    "fallback top-k": ("flat", dict(top_k=400, top_p=0.99)),
    # ~1700 tokens tied at each of 3 values: one tied value larger than the scratch is split
    # arithmetically and its first dropped id found by a sweep; or kept whole
    "tied value, exact": ("ties", dict(top_k=300)),
    "tied value, all": ("ties", dict(top_k=300, top_k_ties="all")),
    "tied value, top-p": ("ties", dict(top_p=0.5)),
    "tied value, min-p": ("ties", dict(min_p=0.2, top_p=0.8)),
}


# Thousands of kept tokens put top-p's preceding masses ~1e-4 apart: these rows keep 2e-5 from every
# threshold (the fp32 sums measured at most 1.5e-6 away from float64 ones).
SEARCH_MARGIN = 2e-5


def _search_rows(kind, V, dtype, seed, rule):
    def make(g):
        if kind == "ties":
            return torch.randint(0, 3, (2, V), generator=g).to(dtype)
        x = torch.randn(2, V, generator=g) * (0.5 if kind == "flat" else 2.0)
        if kind == "peaked":
            x.scatter_add_(1, torch.randint(0, V, (2, 8), generator=g), torch.rand(2, 8, generator=g) * 8 + 4)
        return x.to(dtype)
    return _drawn(make, rule, 1.0, seed, margin=SEARCH_MARGIN)


@pytest.mark.parametrize("backend", [p for p in fused_backends("selective_log_softmax") if p.values == ("cpp",)])
@pytest.mark.parametrize("capability", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CPP_SEARCH_CASES))
def test_cpp_search_settles_every_branch_like_the_reference(backend, case, dtype, capability, monkeypatch):
    # Every compiled variant of the row kernels (a cap above this CPU runs what it has); fp64 runs
    # the scalar search, with no stream seed (its stream compacts).
    monkeypatch.setenv("GRPO_FUSED_CPU_CAPABILITY", capability)
    kind, kw = CPP_SEARCH_CASES[case]
    rule = SamplingRule(**kw)
    x = _search_rows(kind, 5000 if kind == "ties" else 3000, dtype, seed=len(case), rule=rule)
    assert _clear_of_boundaries(x.double(), rule, margin=SEARCH_MARGIN)
    rows, ids = _boundary_rows(x, rule, 1.0)
    _check_vocab_pass(backend, rows, ids, 1.0, kw)
