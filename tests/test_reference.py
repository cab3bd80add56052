"""The eager reference pinned against hand-computed values, gradcheck and the edge cases of DESIGN.md 4."""

import math

import pytest
import torch

import grpo_fused as gf
from grpo_fused import GRPOConfig, reference, semantics

ALL_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "gmpo", "gpg"]


# ---------------------------------------------------------------- hand-computed values


def test_selective_log_softmax_by_hand():
    # Row 0: p = (1/4, 3/4); row 1: p = (1/2, 1/2).
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)
    logps, entropy = reference.selective_log_softmax(logits, torch.tensor([1, 0]), compute_entropy=True)
    torch.testing.assert_close(logps, torch.tensor([math.log(0.75), math.log(0.5)], dtype=torch.float64))
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy, torch.tensor([h0, math.log(2.0)], dtype=torch.float64))
    # Temperature 2 halves the logits: p1 = sqrt(3) / (1 + sqrt(3)).
    logps_t, _ = reference.selective_log_softmax(logits, torch.tensor([1, 0]), temperature=2.0)
    assert logps_t[0].item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), rel=1e-12)


def _token_loss(loss_type, log_ratio, adv, logp=-1.0, **cfg):
    logps = torch.tensor([[logp]], dtype=torch.float64)
    old = logps - log_ratio
    config = GRPOConfig(loss_type=loss_type, **cfg)
    loss, _ = semantics.policy_token_loss(logps, old, torch.tensor([[adv]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), config.params)
    return loss.item()


@pytest.mark.parametrize(
    "adv,cfg,expected",
    [
        (1.0, {}, -1.2),  # r = 1.5 clipped to 1.2 for A > 0
        (-1.0, {}, 1.5),  # for A < 0 the unclipped 1.5 is the larger loss
        (1.0, {"delta": 1.4}, -1.2),
        (-1.0, {"delta": 1.4}, 1.4),  # TRL two-sided clipping caps r at delta
        (-1.0, {"clip_ratio_c": 1.3}, 1.3),  # verl dual-clip bounds the A < 0 loss by -A * c
        (2.0, {"epsilon_high": 0.6}, -3.0),  # inside the clip range: -r * A
    ],
)
def test_clipped_surrogate_by_hand(adv, cfg, expected):
    assert _token_loss("dapo", math.log(1.5), adv, **cfg) == pytest.approx(expected, rel=1e-12)


def test_other_surrogates_by_hand():
    # sapo: -sigmoid(tau (r - 1)) * 4 / tau * A with tau_pos = 1, tau_neg = 1.05.
    assert _token_loss("sapo", math.log(1.5), 1.0) == pytest.approx(-4 / (1 + math.exp(-0.5)), rel=1e-12)
    tau = 1.05
    assert _token_loss("sapo", math.log(1.5), -2.0) == pytest.approx(2.0 * 4 / tau / (1 + math.exp(-tau * 0.5)), rel=1e-12)
    # cispo: -min(r, eps_high) * A * logp (TRL one-sided) and verl's two-sided clamp.
    assert _token_loss("cispo", math.log(1.5), 2.0, logp=-0.7, epsilon_high=1.2) == pytest.approx(1.2 * 2.0 * 0.7, rel=1e-12)
    assert _token_loss("cispo", math.log(0.5), 2.0, logp=-0.7, epsilon_high=0.2, cispo_two_sided=True) == pytest.approx(
        0.8 * 2.0 * 0.7, rel=1e-12
    )
    # gpg / REINFORCE: -A * logp.
    assert _token_loss("gpg", 0.3, 3.0, logp=-0.5) == pytest.approx(1.5, rel=1e-12)


def test_gmpo_by_hand():
    # log ratios (0.5, -0.1), eps 0.4 in log space: A > 0 clips 0.5 to 0.4 -> exp(0.3 / 2).
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    old = logps - torch.tensor([[0.5, -0.1]], dtype=torch.float64)
    cfg = GRPOConfig(loss_type="gmpo", epsilon_low=0.4)
    mask = torch.ones(1, 2, dtype=torch.float64)
    pos, _ = semantics.policy_token_loss(logps, old, torch.tensor([[1.0]], dtype=torch.float64), mask, cfg.params)
    neg, _ = semantics.policy_token_loss(logps, old, torch.tensor([[-1.0]], dtype=torch.float64), mask, cfg.params)
    assert pos.item() == pytest.approx(-math.exp(0.15), rel=1e-7)
    # A < 0: the sign-aware clip keeps 0.5 (larger loss) and clips nothing: exp(0.4 / 2).
    assert neg.item() == pytest.approx(math.exp(0.2), rel=1e-7)


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0], dtype=torch.float64)
    ref = logp + math.log(2.0)  # ref - logp = ln 2
    d = math.log(2.0)
    assert semantics.kl_estimate(logp, ref, "k3").item() == pytest.approx(2 - d - 1, rel=1e-12)
    assert semantics.kl_estimate(logp, ref, "k1").item() == pytest.approx(-d, rel=1e-12)
    assert semantics.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * d * d, rel=1e-12)
    assert semantics.kl_estimate(logp, ref, "abs").item() == pytest.approx(d, rel=1e-12)
    # low_var_kl clamps the log ratio to [-20, 20] and the result to [-10, 10].
    far = logp + 30.0
    assert semantics.kl_estimate(logp, far, "low_var_kl").item() == 10.0
    assert semantics.kl_estimate(logp, far, "k3").item() == pytest.approx(math.exp(30) - 31, rel=1e-12)


REDUCTION_CASES = [
    ({"loss_type": "grpo"}, {}, (1.5 + 4.0) / 2),
    ({"loss_type": "sapo"}, {}, (1.5 + 4.0) / 2),
    ({"loss_type": "bnpo"}, {}, 7 / 3),
    ({"loss_type": "dr_grpo"}, {}, 7 / 6),
    ({"loss_type": "dr_grpo", "max_completion_length": 7}, {}, 7 / 14),
    ({"loss_type": "dapo"}, {}, 7 / 3),
    ({"loss_type": "dapo"}, {"num_items_in_batch": 10}, 0.7),
    ({"loss_type": "cispo"}, {"num_items_in_batch": torch.tensor(14.0)}, 0.5),
    ({"loss_type": "luspo"}, {}, (3 + 4) / 2),
    ({"loss_agg_mode": "token-mean"}, {}, 7 / 3),
    ({"loss_agg_mode": "token-mean", "dp_size": 2}, {"num_items_in_batch": 14}, 1.0),
    ({"loss_agg_mode": "seq-mean-token-sum"}, {}, 3.5),
    ({"loss_agg_mode": "seq-mean-token-sum"}, {"global_batch_size": 7}, 1.0),
    ({"loss_agg_mode": "seq-mean-token-mean"}, {}, 2.75),
    ({"loss_agg_mode": "seq-mean-token-sum-norm"}, {}, (1 + 4 / 3) / 2),
]


@pytest.mark.parametrize("cfg,kwargs,expected", REDUCTION_CASES)
def test_reductions_by_hand(cfg, kwargs, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    got = semantics.reduce_loss(per_token, mask, GRPOConfig(**cfg).params.spec, **kwargs)
    assert got.item() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize(
    "cfg,kwargs,expected",
    [
        # verl: sequence means count only sequences with a token; global counts times dp_size.
        ({"loss_agg_mode": "seq-mean-token-sum"}, {}, 7 / 2),
        ({"loss_agg_mode": "seq-mean-token-mean"}, {}, (1.5 + 4.0) / 2),
        ({"loss_agg_mode": "seq-mean-token-sum", "dp_size": 2}, {"global_batch_size": 7}, 7 / 7 * 2),
        ({"loss_agg_mode": "seq-mean-token-sum-norm", "dp_size": 2}, {"global_batch_size": 4}, 7 / 4 * 2 / 3),
        ({"loss_type": "grpo"}, {}, (1.5 + 4.0 + 0.0) / 3),  # TRL averages over all B
    ],
)
def test_verl_sequence_means_skip_empty_sequences(cfg, kwargs, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    got = semantics.reduce_loss(per_token, mask, GRPOConfig(**cfg).params.spec, **kwargs)
    assert got.item() == pytest.approx(expected, rel=1e-7)


def test_on_policy_dapo_loss_and_gradient_by_hand():
    # Two tokens, on-policy: ratio 1, loss = -A, d loss / d logp = -A / 2 per token.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    out = reference.grpo_loss(logits, torch.tensor([[1, 0]]), torch.tensor([2.0], dtype=torch.float64))
    assert out.loss.item() == pytest.approx(-2.0)
    out.loss.backward()
    # d logp / d z = onehot - p; times d loss / d logp = -1.
    expected = -torch.tensor([[[0 - 0.25, 1 - 0.75], [1 - 0.5, 0 - 0.5]]], dtype=torch.float64)
    torch.testing.assert_close(logits.grad, expected)
    assert out.metrics["ratio"].item() == 1.0
    assert out.metrics["clip_ratio/region_mean"].item() == 0.0


# ---------------------------------------------------------------- gradcheck


def _inputs(B=3, T=4, V=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=dtype)
    mask[1, 2:] = 0
    mask[2, :] = 0  # one empty completion
    logps, _ = reference.selective_log_softmax(logits, ids)
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    return logits, ids, mask, old, ref, adv


@pytest.mark.parametrize("loss_type", ALL_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck_every_loss_type(loss_type, level):
    logits, ids, mask, old, ref, adv = _inputs(seed=ALL_LOSS_TYPES.index(loss_type))
    cfg = GRPOConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_high=0.28,
        temperature=0.7, entropy_coef=0.01,
    )

    def f(z):
        return reference.grpo_loss(z, ids, adv, mask, old, ref, cfg).loss

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_gradcheck_linear_path_all_inputs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3), generator=g)
    adv = torch.tensor([0.5, -1.0], dtype=torch.float64)
    old = torch.full((2, 3), -2.0, dtype=torch.float64)
    cfg = GRPOConfig(loss_type="grpo", importance_sampling_level="sequence")

    def f(h, w, b):
        return reference.linear_grpo_loss(h, w, ids, adv, None, old, None, b, cfg).loss

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- edge cases (DESIGN.md 4)


@pytest.mark.parametrize("loss_type", ALL_LOSS_TYPES)
def test_all_masked_batch_gives_zero_loss_and_zero_gradient(loss_type):
    logits, ids, mask, old, ref, adv = _inputs()
    logits.requires_grad_(True)
    cfg = GRPOConfig(loss_type=loss_type, beta=0.04, loss_agg_mode=None)
    out = reference.grpo_loss(logits, ids, adv, torch.zeros_like(mask), old, ref, cfg)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    assert all(torch.isfinite(v) or torch.isnan(v) for v in out.metrics.values())


def test_masked_vocab_and_huge_logits_stay_finite():
    V = 9
    logits = torch.full((2, 3, V), -float("inf"))
    logits[..., 0] = 1e4  # huge target logit
    logits[0, :, 3] = 1e4 - 1.0
    ids = torch.zeros(2, 3, dtype=torch.long)
    logits.requires_grad_(True)
    out = reference.grpo_loss(logits, ids, torch.tensor([1.0, -1.0]), config=GRPOConfig(loss_type="grpo"))
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.logps).all() and torch.isfinite(out.entropy).all()
    # Row 1 has only its target left: logp 0 and entropy 0 exactly.
    assert out.logps[1].abs().max() == 0 and out.entropy[1].abs().max() == 0
    # Row 0: two logits one apart -> logp = -log(1 + e^-1), to fp32 resolution at 1e4 (ulp ~1e-3).
    torch.testing.assert_close(out.logps[0], torch.full((3,), -math.log1p(math.exp(-1.0))), rtol=0, atol=1e-3)
    out.loss.backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert grad[..., 5].abs().max() == 0  # masked columns get no gradient


def test_entropy_bonus_gradient_is_finite_on_masked_vocab():
    logits = torch.randn(2, 3, 6, dtype=torch.float64)
    logits[..., 4:] = -float("inf")
    ids = torch.zeros(2, 3, dtype=torch.long)
    logits.requires_grad_(True)
    out = reference.grpo_loss(logits, ids, torch.tensor([1.0, -1.0], dtype=torch.float64),
                              config=GRPOConfig(entropy_coef=0.1))
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[..., 4:].abs().max() == 0
    # The same gradient as with the masked columns removed altogether.
    short = logits.detach()[..., :4].clone().requires_grad_(True)
    reference.grpo_loss(short, ids, torch.tensor([1.0, -1.0], dtype=torch.float64),
                        config=GRPOConfig(entropy_coef=0.1)).loss.backward()
    torch.testing.assert_close(logits.grad[..., :4], short.grad)


def test_noncontiguous_inputs_match_contiguous():
    logits, ids, mask, old, ref, adv = _inputs(B=4, T=5, V=7, dtype=torch.float32)
    cfg = GRPOConfig(loss_type="bnpo", beta=0.04)
    base = reference.grpo_loss(logits, ids, adv, mask, old, ref, cfg)
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, (T,B) memory order
    assert not strided.is_contiguous()
    out = reference.grpo_loss(strided, ids, adv, mask, old.t().contiguous().t(), ref, cfg)
    torch.testing.assert_close(out.loss, base.loss, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0), (torch.float16, 0), (torch.float32, 0)])
def test_low_precision_inputs_are_computed_in_fp32(dtype, tol):
    logits, ids, mask, old, ref, adv = _inputs(dtype=torch.float32)
    low = logits.to(dtype)
    out = reference.grpo_loss(low, ids, adv, mask, old, ref, GRPOConfig(beta=0.04))
    exact = reference.grpo_loss(low.to(torch.float32), ids, adv, mask, old, ref, GRPOConfig(beta=0.04))
    assert out.logps.dtype == torch.float32
    torch.testing.assert_close(out.loss, exact.loss, rtol=tol, atol=tol)


def test_sequence_level_ratio_is_the_masked_geometric_mean():
    logps = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    old = torch.tensor([[-1.3, -2.1, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    log_r = semantics.importance_log_ratio(logps, old, mask, sequence_level=True)
    assert log_r.shape == (1, 1)
    assert log_r.item() == pytest.approx((0.3 + 0.1) / 2, rel=1e-12)


def test_rollout_is_weights_scale_the_policy_term_not_the_kl():
    logits, ids, mask, old, ref, adv = _inputs()
    w = torch.full((3, 1), 0.5, dtype=torch.float64)
    base_cfg = GRPOConfig(loss_type="bnpo", beta=0.0)
    plain = reference.grpo_loss(logits, ids, adv, mask, old, ref, base_cfg)
    weighted = reference.grpo_loss(logits, ids, adv, mask, old, ref, base_cfg, is_weights=w)
    torch.testing.assert_close(weighted.loss, 0.5 * plain.loss)
    kl_cfg = base_cfg.replace(beta=0.1)
    with_kl = reference.grpo_loss(logits, ids, adv, mask, old, ref, kl_cfg, is_weights=w)
    kl_only = with_kl.loss - weighted.loss
    torch.testing.assert_close(kl_only, reference.grpo_loss(logits, ids, adv, mask, old, ref, kl_cfg).loss - plain.loss)


def test_public_api_equals_reference_and_linear_equals_logits():
    logits, ids, mask, old, ref, adv = _inputs()
    cfg = GRPOConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28)
    out = gf.grpo_loss(logits, ids, adv, mask, old, ref, config=cfg, backend="reference")
    exp = reference.grpo_loss(logits, ids, adv, mask, old, ref, cfg)
    torch.testing.assert_close(out.loss, exp.loss, rtol=0, atol=0)
    assert set(out.metrics) == set(exp.metrics)

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 8, generator=g, dtype=torch.float64)
    lin = gf.linear_grpo_loss(hidden, weight, ids, adv, mask, old, ref, config=cfg, backend="reference")
    via_logits = reference.grpo_loss(hidden @ weight.T, ids, adv, mask, old, ref, cfg)
    torch.testing.assert_close(lin.loss, via_logits.loss)
    module = gf.LinearGRPOLoss(cfg, backend="reference")
    torch.testing.assert_close(module(hidden, weight, ids, adv, mask, old, ref).loss, via_logits.loss)
    logps, entropy = gf.linear_log_softmax(hidden, weight, ids, 0.5, compute_entropy=True, backend="reference")
    exp_logps, exp_entropy = reference.selective_log_softmax(hidden @ weight.T, ids, 0.5, True)
    torch.testing.assert_close(logps, exp_logps)
    torch.testing.assert_close(entropy, exp_entropy)
