"""grpo-fused's verl adapter against verl 0.9.1's own code, on the same tensors.

verl is installed in the test environment (``scripts/venv.sh``: ``verl==0.9.1`` without its
dependencies, plus the light packages ``core_algos`` imports). Importing verl pulls ``ray`` (through
``verl/protocol.py``); where Ray is not installed a stand-in module is put in ``sys.modules`` while
verl is imported (nothing here calls into Ray), and removed again.

Each policy loss of verl's registry is called with verl's real ``ActorConfig`` and compared with
ours: the loss, its gradient w.r.t. ``log_prob`` and every metric, for every ``loss_agg_mode``,
float64 and float32, bool and float masks. Tolerances:

* float64, float mask: 1e-12 (both compute the same expressions);
* float64, bool mask, ``seq-mean-token-mean`` (and sapo, geo_mean): 1e-7 relative: verl divides
  each sequence's sum by ``count + 1e-8`` where ``count`` is an int64 tensor, so that sum is rounded
  to float32 (= the count), while grpo-fused adds 1e-8 in float64;
* float32: our error against verl in float64 may exceed verl's own float32 error by at most a few
  float32 ulps of the values' scale (the house rule: no worse than PyTorch in that dtype);
* metrics: 1e-6 relative: verl takes several of its fractions in float32 whatever the inputs.
"""

import importlib.metadata
import importlib.util
import sys
import types

import pytest
import torch

from grpo_fused.integrations import verl as gf_verl


class _RayStandIn(types.ModuleType):
    """What verl's modules touch of ``ray`` at import: names in annotations and decorators."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def _import_verl():
    stubbed = importlib.util.find_spec("ray") is None
    if stubbed:
        sys.modules["ray"] = _RayStandIn("ray")  # verl.protocol imports it; nothing here calls it
    try:
        from verl.trainer.config import RolloutCorrectionConfig
        from verl.trainer.ppo import core_algos, rollout_corr_helper
        from verl.utils.experimental import torch_functional as verl_torch_functional
        from verl.utils.kernel import linear_cross_entropy  # noqa: F401  (patched below)
        from verl.workers.config import ActorConfig, PolicyLossConfig
        from verl.workers.utils import losses  # noqa: F401  (patched below)
    finally:
        if stubbed:
            del sys.modules["ray"]
    return core_algos, rollout_corr_helper, verl_torch_functional, ActorConfig, PolicyLossConfig, RolloutCorrectionConfig


core_algos, rch, verl_tf, ActorConfig, PolicyLossConfig, RolloutCorrectionConfig = _import_verl()
VERL_VERSION = importlib.metadata.version("verl")
assert VERL_VERSION == "0.9.1", f"these tests pin verl 0.9.1, found {VERL_VERSION}"

B, T = 5, 7
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSSES = [name for name in gf_verl.POLICY_LOSSES if name != "bypass_mode"]
EPS32 = torch.finfo(torch.float32).eps


def make_inputs(seed, extreme=False):
    """float64 ``(old, log_prob, advantages, bool mask)``; ragged lengths with an empty and a
    one-token sequence; log-ratios of +-0.5 so that every clip side fires."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 0, 1, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[1] = -adv[1].abs() - 2.0  # a strongly negative sequence whose ratio exceeds a small clip_ratio_c
    logp[1, :2] = old[1, :2] + 0.4
    if extreme:
        # Past verl's clamps: +-25 on tokens (vanilla, dppo, sapo, cispo), a sequence mean above 10 (gspo).
        old[0, 1], logp[0, 1] = -30.0, -5.0
        logp[1, 2] = old[1, 2] - 25.0
        old[3, 0], logp[3, 0] = -15.0, -3.0
    return old, logp, adv, mask


def actor_config(global_batch_info=None, correction=None, **fields):
    policy_loss = PolicyLossConfig(
        # A window and ratios that make clip_cov and kl_cov select several tokens of a 25-token batch.
        clip_cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=5.0, kl_cov_ratio=0.2, ppo_kl_coef=0.3, dro_beta=0.4,
        rollout_correction=correction or RolloutCorrectionConfig(),
    )
    fields = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, **fields}
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss, **fields)
    cfg.global_batch_info.update(global_batch_info or {})
    return cfg


def _run(fn, old, logp, adv, mask, mode, cfg, weights=None, seed=0):
    lp = logp.clone().requires_grad_(True)
    torch.manual_seed(seed)  # clip_cov draws its tokens from the default generator
    loss, metrics = fn(old, lp, adv, mask, mode, cfg, weights)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


def _close(ours, theirs, truth, dtype, rel):
    """``ours`` vs verl's ``theirs`` (same dtype) and verl's float64 ``truth``."""
    if dtype == torch.float64:
        torch.testing.assert_close(ours, theirs, rtol=rel, atol=rel)
        return
    scale = truth.abs().max().clamp(min=1.0)
    allowed = (theirs.double() - truth).abs().max() + 8 * EPS32 * scale
    error = (ours.double() - truth).abs().max()
    assert error <= allowed, f"float32 error {error:.3g} > verl's own {allowed - 8 * EPS32 * scale:.3g} + 8 ulp"


def _compare(name, mode, cfg, dtype=torch.float64, float_mask=False, seed=1, extreme=False, weights=None):
    old, logp, adv, mask = make_inputs(seed, extreme)
    m = mask.double() if float_mask else mask
    w = None if weights is None else weights.to(dtype)
    truth = _run(core_algos.POLICY_LOSS_REGISTRY[name], old, logp, adv, m, mode, cfg, weights)
    cast = [t.to(dtype) for t in (old, logp, adv)]
    mask_d = m.to(dtype) if float_mask else m
    theirs = _run(core_algos.POLICY_LOSS_REGISTRY[name], *cast, mask_d, mode, cfg, w)
    ours = _run(gf_verl.POLICY_LOSSES[name], *cast, mask_d, mode, cfg, w)
    # verl's bool-mask count + 1e-8 in float32 (see the module docstring): seq-mean-token-mean,
    # which sapo always uses, and geo_mean's per-sequence means.
    count_quirk = mode == "seq-mean-token-mean" or name in ("sapo", "geo_mean")
    rel = 1e-7 if (dtype == torch.float64 and not float_mask and count_quirk) else 1e-12
    _close(ours[0], theirs[0], truth[0], dtype, rel)
    _close(ours[1], theirs[1], truth[1], dtype, rel)
    assert ours[2].keys() == theirs[2].keys()
    for key, value in theirs[2].items():
        assert ours[2][key] == pytest.approx(value, rel=1e-6, abs=1e-6 if dtype == torch.float32 else 1e-9), key
    return ours


# --------------------------------------------------------------------------------------
# Policy losses: every loss x every aggregation mode x dtype x mask kind.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_policy_loss_matches_verl(name, mode):
    cfg = actor_config()
    for dtype in (torch.float64, torch.float32):
        for float_mask in (False, True):
            _compare(name, mode, cfg, dtype, float_mask)


@pytest.mark.parametrize("name", LOSSES)
def test_policy_loss_with_global_batch_info_and_weights(name):
    # verl's data-parallel normalizers (as its actor sets them) and rollout IS weights.
    info = {"dp_size": 4, "batch_num_tokens": 71, "global_batch_size": 17, "loss_scale_factor": 9}
    cfg = actor_config(info, loss_scale_factor=9)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
    for mode in MODES:
        _compare(name, mode, cfg, float_mask=True, seed=2, weights=weights)


@pytest.mark.parametrize("name", LOSSES)
def test_policy_loss_past_verl_clamps(name):
    # verl's +-20 (token) and <= 10 (gspo sequence) clamps, values and their zero gradients.
    ours = _compare(name, "seq-mean-token-mean", actor_config(), float_mask=True, seed=3, extreme=True)
    if name in ("vanilla", "sapo"):
        assert ours[1][0, 1] == 0 and ours[1][1, 2] == 0
    if name == "gspo":
        assert not ours[1][3].any()  # sequence 3's mean log-ratio is 12 > 10


def test_dual_clip_binds_and_small_clip_ratio_c():
    cfg = actor_config(clip_ratio_c=1.05)
    ours = _compare("vanilla", "token-mean", cfg, float_mask=True)
    assert ours[2]["actor/pg_clipfrac_lower"] > 0
    _compare("dppo_tv", "token-mean", cfg, float_mask=True)  # dppo's ratio cap, binding


def test_cispo_clamp_matters_with_large_clip_ratio_low():
    # verl's CISPO example uses clip_ratio_low = 10: the lower bound is <= 0, so the clamped ratio
    # exp(-20) is the weight of a token whose log-ratio is -25.
    cfg = actor_config(clip_ratio_low=10.0, clip_ratio_high=0.28)
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    new = torch.tensor([[-26.0]], dtype=torch.float64)
    adv, mask = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)
    theirs, _ = core_algos.compute_policy_loss_cispo(old, new, adv, mask, "token-mean", cfg)
    ours, _ = gf_verl.compute_policy_loss_cispo(old, new, adv, mask, "token-mean", cfg)
    assert float(theirs) == pytest.approx(26.0 * 2.061153622438558e-09, rel=1e-12)  # 5.359e-8
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


def test_gspo_follows_loss_agg_mode():
    cfg = actor_config()
    old, logp, adv, mask = make_inputs(4)
    token_mean, _ = gf_verl.compute_policy_loss_gspo(old, logp, adv, mask, "token-mean", cfg)
    seq_mean, _ = gf_verl.compute_policy_loss_gspo(old, logp, adv, mask, "seq-mean-token-mean", cfg)
    theirs, _ = core_algos.compute_policy_loss_gspo(old, logp, adv, mask, "token-mean", cfg)
    torch.testing.assert_close(token_mean, theirs, rtol=1e-12, atol=1e-12)
    assert abs(float(token_mean - seq_mean)) > 1e-3


def test_clip_cov_draws_the_same_tokens_as_verl():
    # Several seeds: each draws a different subset of the candidates; ours must cut the same ones.
    cfg = actor_config()
    cuts = set()
    for seed in range(4):
        ours = _compare("clip_cov", "token-mean", cfg, float_mask=True, seed=5)
        theirs = _run(core_algos.compute_policy_loss_clip_cov, *make_inputs(5)[:3], make_inputs(5)[3].double(),
                      "token-mean", cfg, seed=seed)
        ours = _run(gf_verl.compute_policy_loss_clip_cov, *make_inputs(5)[:3], make_inputs(5)[3].double(),
                    "token-mean", cfg, seed=seed)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-12)
        cuts.add(tuple((ours[1] == 0).flatten().tolist()))
    assert len(cuts) > 1  # the draw matters


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_policy_loss_config_fallbacks(name):
    # A plain mapping whose policy_loss fields are None takes verl's in-function fallbacks
    # (clip_cov 0.0002 / 1.0 / 5.0, kl_cov 0.0002 and ppo_kl_coef 1.0, not PolicyLossConfig's 0.1);
    # verl itself is given an ActorConfig holding those values.
    plain = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None, "global_batch_info": {},
             "policy_loss": {"clip_cov_ratio": None, "clip_cov_lb": None, "clip_cov_ub": None, "kl_cov_ratio": None,
                             "ppo_kl_coef": None}}
    pl = PolicyLossConfig(clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=0.0002, ppo_kl_coef=1.0)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                      clip_ratio_low=0.2, clip_ratio_high=0.2, policy_loss=pl)
    old, logp, adv, mask = make_inputs(6)
    theirs = _run(core_algos.POLICY_LOSS_REGISTRY[name], old, logp, adv, mask.double(), "token-mean", cfg)
    ours = _run(gf_verl.POLICY_LOSSES[name], old, logp, adv, mask.double(), "token-mean", plain)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-12)


def test_dro_needs_a_positive_beta():
    old, logp, adv, mask = make_inputs(6)
    cfg = actor_config()
    cfg.policy_loss.__dict__["dro_beta"] = None  # PolicyLossConfig is frozen; verl's check reads the field
    for fn in (core_algos.compute_policy_loss_dro, gf_verl.compute_policy_loss_dro):
        with pytest.raises(ValueError, match="dro_beta must be a positive"):
            fn(old, logp, adv, mask, "token-mean", cfg)


# --------------------------------------------------------------------------------------
# Rollout correction.
# --------------------------------------------------------------------------------------


def _rollout_inputs(seed=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 0, 1, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rollout = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    train = rollout + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2
    train[0, 3] = rollout[0, 3] + 23.0  # past the +-20 safety bound
    return train.to(dtype), rollout.to(dtype), mask


def _compare_correction(dtype=torch.float64, float_mask=False, **options):
    train, rollout, mask = _rollout_inputs(dtype=dtype)
    m = mask.to(dtype) if float_mask else mask
    proto, their_mask, their_metrics = rch.compute_rollout_correction_and_rejection_mask(train, rollout, m, **options)
    weights, our_mask, our_metrics = gf_verl.compute_rollout_correction_and_rejection_mask(train, rollout, m, **options)
    if proto is None:
        assert weights is None
    else:
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(weights, proto.batch["rollout_is_weights"], rtol=tol, atol=tol)
    assert our_mask.dtype == their_mask.dtype
    assert torch.equal(our_mask, their_mask)
    assert our_metrics.keys() == their_metrics.keys()
    for key, value in their_metrics.items():
        assert our_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    return weights, our_mask, our_metrics


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("threshold", [2.0, "1.5", "0.5_1.5"])
@pytest.mark.parametrize("level", [None, "token", "sequence"])
def test_rollout_is_weights_match_verl(level, threshold, normalize):
    for dtype in (torch.float64, torch.float32):
        _compare_correction(dtype, rollout_is=level, rollout_is_threshold=threshold,
                            rollout_is_batch_normalize=normalize)
    _compare_correction(float_mask=True, rollout_is=level, rollout_is_threshold=threshold,
                        rollout_is_batch_normalize=normalize)


RS_CASES = [
    ("token_k1", "0.6_1.4"), ("token_k1", 1.5), ("token_k2", 0.05), ("token_k3", 0.05),
    ("seq_sum_k1", "0.3_3.0"), ("seq_sum_k2", 0.2), ("seq_sum_k3", 0.2),
    ("seq_mean_k1", 1.3), ("seq_mean_k2", "0.05"), ("seq_mean_k3", 0.05),
    ("seq_max_k2", 0.1), ("seq_max_k3", 0.1),
    ("token_k2, seq_mean_k1,token_k2", "0.05,0.7_1.3"),  # chained, a duplicate, spaces
    ("token_k3,seq_max_k2", "0.08"),  # one threshold shared by both options
]


@pytest.mark.parametrize("rs,threshold", RS_CASES)
def test_rollout_rejection_sampling_matches_verl(rs, threshold):
    for dtype in (torch.float64, torch.float32):
        _compare_correction(dtype, rollout_is="token", rollout_rs=rs, rollout_rs_threshold=threshold)
    _compare_correction(float_mask=True, rollout_is=None, rollout_rs=rs, rollout_rs_threshold=threshold)


@pytest.mark.parametrize("bad", [
    dict(rollout_is="tokens"), dict(rollout_is="token", rollout_is_threshold="2_1"),
    dict(rollout_is="token", rollout_is_threshold=True), dict(rollout_is="token", rollout_is_threshold=-1.0),
    dict(rollout_rs="token_k4", rollout_rs_threshold=1.0), dict(rollout_rs="token_k2", rollout_rs_threshold=None),
    dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"), dict(rollout_rs="token_k2,seq_sum_k2",
                                                                        rollout_rs_threshold="1,2,3"),
])
def test_rollout_correction_refuses_what_verl_refuses(bad):
    train, rollout, mask = _rollout_inputs()
    with pytest.raises((ValueError, TypeError)) as theirs:
        rch.compute_rollout_correction_and_rejection_mask(train, rollout, mask, **bad)
    with pytest.raises(type(theirs.value)):
        gf_verl.compute_rollout_correction_and_rejection_mask(train, rollout, mask, **bad)


def test_offpolicy_metrics_match_verl():
    train, rollout, mask = _rollout_inputs()
    for r in (rollout, None):
        theirs = rch.compute_offpolicy_metrics(train, r, mask)
        ours = gf_verl.compute_offpolicy_metrics(train, r, mask)
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)
    assert gf_verl.compute_rollout_corr_metrics_from_logprobs(train, rollout, mask) == pytest.approx(
        rch.compute_rollout_corr_metrics_from_logprobs(train, rollout, mask), rel=1e-12, abs=1e-12)


BYPASS_CASES = [
    dict(rollout_is="token", rollout_is_threshold=1.2),
    dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True),
    dict(rollout_is=None, rollout_rs="token_k2,seq_mean_k1", rollout_rs_threshold="0.1,0.7_1.3"),
    dict(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="seq_max_k3", rollout_rs_threshold=0.08),
    dict(rollout_is="token", rollout_is_threshold=None),  # a None threshold turns IS off, as in verl
]


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("case", range(len(BYPASS_CASES)))
def test_bypass_mode_matches_verl(case, loss_type):
    correction = RolloutCorrectionConfig(loss_type=loss_type, bypass_mode=True, **BYPASS_CASES[case])
    cfg = actor_config(correction=correction)
    for mode in ("token-mean", "seq-mean-token-sum"):
        for dtype in (torch.float64, torch.float32):
            _compare("bypass_mode", mode, cfg, dtype, float_mask=False, seed=8)


# --------------------------------------------------------------------------------------
# KL, log-probs, and putting it into verl.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "kl+", "abs+", "k2+"])
def test_kl_penalty_matches_verl(name):
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float64, torch.float32):
        logp = (-torch.rand(4, 6, generator=g, dtype=torch.float64) * 2).to(dtype)
        ref = (-torch.rand(4, 6, generator=g, dtype=torch.float64) * 2).to(dtype)
        ref[0, 0] = logp[0, 0] + 30.0  # past low_var_kl's clamps
        a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        theirs, ours = core_algos.kl_penalty(a, ref, name), gf_verl.kl_penalty(b, ref, name)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), b)[0], torch.autograd.grad(theirs.sum(), a)[0],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(2, 5), (9,)])
def test_fused_linear_for_ppo_matches_verls_torch_backend(shape, temperature):
    # verl's torch backend (CPU-capable) in float32 against ours; V = 257 is ragged.
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(*shape, 16, generator=g)
    weight = torch.randn(257, 16, generator=g) * 0.5
    ids = torch.randint(0, 257, shape, generator=g)
    outs = []
    for module in (verl_tf.FusedLinearForPPO(), gf_verl.FusedLinearForPPO(backend="reference")):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        log_probs, entropy = module(h, w, ids, temperature)
        c1 = torch.linspace(-1, 1, log_probs.numel()).reshape(log_probs.shape)
        grads = torch.autograd.grad((c1 * log_probs + 0.3 * entropy).sum(), (h, w))
        outs.append((log_probs, entropy, *grads))
    for ours, theirs in zip(outs[1], outs[0]):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_patch_verl_puts_grpo_fused_into_verl_and_unpatch_restores():
    from verl.utils.kernel import linear_cross_entropy as verl_lce
    from verl.workers.utils import losses as verl_losses

    originals = (dict(core_algos.POLICY_LOSS_REGISTRY), core_algos.kl_penalty, verl_losses.kl_penalty,
                 verl_lce.linear_cross_entropy, verl_tf.FusedLinearForPPO)
    try:
        patched = gf_verl.patch_verl(backend="reference")
        assert gf_verl.patch_verl(backend="reference") == patched  # idempotent
        for name, fn in gf_verl.POLICY_LOSSES.items():
            assert core_algos.get_policy_loss_fn(name) is fn
        assert core_algos.kl_penalty is gf_verl.kl_penalty and verl_losses.kl_penalty is gf_verl.kl_penalty
        # verl's model forward calls these by module attribute at run time.
        hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
        labels = torch.randint(0, 11, (2, 3))
        logprobs, entropy = verl_lce.linear_cross_entropy(hidden, weight, labels, 1.0, "none")
        assert logprobs.shape == entropy.shape == (6,)
        module_lp, _ = verl_tf.FusedLinearForPPO()(hidden, weight, labels, 1.0)
        torch.testing.assert_close(module_lp.reshape(-1), logprobs)
        # The actor's own policy-loss lookup, end to end through verl's registry.
        old, logp, adv, mask = make_inputs(1)
        loss, _ = core_algos.get_policy_loss_fn("gspo")(old, logp, adv, mask, "token-mean", actor_config())
        torch.testing.assert_close(loss, gf_verl.compute_policy_loss_gspo(old, logp, adv, mask, "token-mean",
                                                                          actor_config())[0])
    finally:
        gf_verl.unpatch_verl()
    assert core_algos.POLICY_LOSS_REGISTRY == originals[0]
    assert (core_algos.kl_penalty, verl_losses.kl_penalty, verl_lce.linear_cross_entropy,
            verl_tf.FusedLinearForPPO) == originals[1:]


def test_register_with_verl_prefix_keeps_verls_losses():
    before = dict(core_algos.POLICY_LOSS_REGISTRY)
    try:
        names = gf_verl.register_with_verl(prefix="fused_")
        assert set(names) == {"fused_" + n for n in gf_verl.POLICY_LOSSES} | {"kl_penalty"}
        assert core_algos.POLICY_LOSS_REGISTRY["vanilla"] is before["vanilla"]
        assert core_algos.get_policy_loss_fn("fused_dppo_kl") is gf_verl.compute_policy_loss_dppo_kl
    finally:
        gf_verl.unpatch_verl()
    assert core_algos.POLICY_LOSS_REGISTRY == before


# --------------------------------------------------------------------------------------
# Sampling-support replay (opt-in).
# --------------------------------------------------------------------------------------


def test_sampling_rule_from_verls_rollout_config():
    from verl.workers.config import RolloutConfig

    rule = gf_verl.sampling_rule_from_verl_rollout(RolloutConfig(name="vllm", top_k=20, top_p=0.9))
    assert rule == gf_verl.SamplingRule(top_k=20, top_p=0.9)  # vLLM: exactly k, ties lowest id first
    assert not gf_verl.sampling_rule_from_verl_rollout(RolloutConfig(name="vllm")).active  # verl's defaults: off
    assert gf_verl.sampling_rule_from_verl_rollout(RolloutConfig(name="vllm", do_sample=False)) == \
        gf_verl.SamplingRule(top_k=1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        gf_verl.sampling_rule_from_verl_rollout(RolloutConfig(name="vllm", repetition_penalty=1.2))


def test_policy_passes_replay_the_rollout_rule_and_the_reference_pass_does_not():
    from grpo_fused import reference

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    rollout = types.SimpleNamespace(top_k=6, top_p=0.9, do_sample=True, repetition_penalty=1.0)

    class Worker:  # verl's worker, as far as the wrapper reads it
        config = types.SimpleNamespace(rollout=rollout)

        def compute_log_prob(self):
            return gf_verl.linear_cross_entropy(hidden, weight, labels, 0.8, backend="reference")

        compute_ref_log_prob = compute_log_prob

    policy_pass = gf_verl._policy_pass(Worker.compute_log_prob)
    logprobs, entropy = policy_pass(Worker())
    logits = reference.linear_logits(hidden, weight).reshape(-1, 40)
    want, want_entropy = reference.selective_log_softmax(logits, labels.reshape(-1), 0.8, True, top_k=6, top_p=0.9)
    torch.testing.assert_close(logprobs, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-12)
    assert bool(torch.isneginf(logprobs).any())  # some labels lie outside the support
    full, _ = Worker().compute_ref_log_prob()  # outside a policy pass: the full softmax
    torch.testing.assert_close(full, reference.selective_log_softmax(logits, labels.reshape(-1), 0.8)[0],
                               rtol=0, atol=1e-12)
    assert policy_pass.__name__ == "compute_log_prob"
