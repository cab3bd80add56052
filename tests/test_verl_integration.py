"""The verl-signature policy losses against verl's formulas, written out here from verl's published
definitions (``verl/trainer/ppo/core_algos.py``: the registered policy losses and ``agg_loss``), on
random float64 tensors: values, gradients w.r.t. ``log_prob`` and the returned metrics.

verl is not installed (and not imported): the formulas below are the spec. Shapes are small and
ragged (B=5, T=7) with one fully masked sequence and uneven lengths, so every normalizer matters.
"""

import sys
import types

import pytest
import torch

from conftest import fused_backends
from grpo_fused.integrations import verl as gf_verl

B, T = 5, 7


# --------------------------------------------------------------------------------------
# verl, as published (float64, plain torch).
# --------------------------------------------------------------------------------------


def v_masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def v_agg_loss(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    if mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = mask.sum()
        return (loss_mat * mask).sum() / batch_num_tokens * dp_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = (loss_mat * mask).sum(-1)
        seq_mask = (mask.sum(-1) > 0).double()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = (seq_losses * seq_mask).sum() / global_batch_size * dp_size
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    assert mode == "seq-mean-token-mean"
    count = mask.sum(-1)
    seq_losses = (loss_mat * mask).sum(-1) / (count + 1e-8)
    seq_mask = (count > 0).double()
    if global_batch_size is None:
        global_batch_size = seq_mask.sum()
    return (seq_losses * seq_mask).sum() / global_batch_size * dp_size


def v_vanilla(old, logp, adv, mask, mode, cfg, w=None):
    low, high, c = cfg["clip_ratio_low"], cfg["clip_ratio_high"], cfg.get("clip_ratio_c", 3.0)
    nkl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(nkl)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clip1 = torch.maximum(l1, l2)
    l3 = -adv * c
    clip2 = torch.min(l3, clip1)
    losses = torch.where(adv < 0, clip2, clip1)
    if w is not None:
        losses = losses * w
    loss = v_agg_loss(losses, mask, mode, **cfg.get("global_batch_info", {}))
    metrics = {
        "actor/pg_clipfrac": v_masked_mean(torch.gt(l2, l1).double(), mask).item(),
        "actor/ppo_kl": v_masked_mean(-nkl, mask).item(),
        "actor/pg_clipfrac_lower": v_masked_mean(torch.gt(clip1, l3) * (adv < 0).double(), mask).item(),
    }
    return loss, metrics


def v_gspo(old, logp, adv, mask, mode, cfg, w=None):
    low, high = cfg["clip_ratio_low"], cfg["clip_ratio_high"]
    nkl = logp - old
    seq_len = mask.sum(-1).clamp(min=1)
    nkl_seq = (nkl * mask).sum(-1) / seq_len
    log_r = logp - logp.detach() + nkl_seq.detach().unsqueeze(-1)
    log_r = torch.clamp(log_r, max=10.0)
    r = torch.exp(log_r)
    l1 = -adv * r
    l2 = -adv * torch.clamp(r, 1 - low, 1 + high)
    losses = torch.maximum(l1, l2)
    if w is not None:
        losses = losses * w
    loss = v_agg_loss(losses, mask, "seq-mean-token-mean", **cfg.get("global_batch_info", {}))
    metrics = {
        "actor/pg_clipfrac": v_masked_mean(torch.gt(l2, l1).double(), mask).item(),
        "actor/ppo_kl": v_masked_mean(-nkl, mask).item(),
        "actor/pg_clipfrac_lower": 0.0,
    }
    return loss, metrics


def v_sapo(old, logp, adv, mask, mode, cfg, w=None):
    tau_pos, tau_neg = cfg["tau_pos"], cfg["tau_neg"]
    nkl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(nkl)
    taus = torch.where(adv > 0, torch.tensor(tau_pos, dtype=adv.dtype), torch.tensor(tau_neg, dtype=adv.dtype))
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    losses = -gates * adv
    if w is not None:
        losses = losses * w
    loss = v_agg_loss(losses, mask, "seq-mean-token-mean", **cfg.get("global_batch_info", {}))
    return loss, {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": v_masked_mean(-nkl, mask).item(),
                  "actor/pg_clipfrac_lower": 0.0}


def v_gpg(old, logp, adv, mask, mode, cfg, w=None):
    losses = -logp * adv
    if w is not None:
        losses = losses * w
    return v_agg_loss(losses, mask, mode, **cfg.get("global_batch_info", {})), {}


def v_geo_mean(old, logp, adv, mask, mode, cfg, w=None):
    low, high = cfg["clip_ratio_low"], cfg["clip_ratio_high"]
    nkl = logp - old
    sgn = torch.sign(adv)
    nkl_clamp = torch.clamp(nkl, -low, high)
    nkl_min = sgn * torch.min(sgn * nkl, sgn * nkl_clamp)
    n = mask.sum(-1)
    ratio = torch.exp((nkl_min * mask).sum(-1) / (n + 1e-8))
    seq_adv = (adv * mask).sum(-1) / (n + 1e-8)
    losses = -seq_adv * ratio
    if w is not None:
        losses = losses * torch.exp((torch.log(w + 1e-10) * mask).sum(-1) / (n + 1e-8))
    clipped = torch.ne(nkl, nkl_clamp)
    metrics = {
        "actor/pg_clipfrac": v_masked_mean((clipped * (adv > 0)).double(), mask).item(),
        "actor/ppo_kl": v_masked_mean(-nkl, mask).item(),
        "actor/pg_clipfrac_lower": v_masked_mean((clipped * (adv < 0)).double(), mask).item(),
    }
    return losses.mean(), metrics


def v_cispo(old, logp, adv, mask, mode, cfg, w=None):
    low, high = cfg["clip_ratio_low"], cfg["clip_ratio_high"]
    nkl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(nkl)
    clipped = torch.clamp(ratio, 1 - low, 1 + high)
    losses = -clipped.detach() * adv * logp
    clipfrac = v_masked_mean((ratio != clipped).double(), mask)
    if w is not None:
        losses = losses * w
    loss = v_agg_loss(losses, mask, mode, **cfg.get("global_batch_info", {}))
    return loss, {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": v_masked_mean(-nkl, mask).item(),
                  "actor/pg_clipfrac_lower": 0.0}


VERL = {"vanilla": v_vanilla, "gspo": v_gspo, "sapo": v_sapo, "gpg": v_gpg, "geo_mean": v_geo_mean, "cispo": v_cispo}


# --------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------


def make_inputs(seed, token_adv=False, extreme=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 0, 1, 6])  # one empty sequence, one single token
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # Log-ratios of +-0.5 so that both clip sides and the dual clip all fire.
    logp = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    if extreme:
        # Past verl's clamps: +-25 on tokens (vanilla / sapo / cispo), a sequence mean above 10 (gspo).
        logp[0, 1] = old[0, 1] + 25.0
        logp[1, 2] = old[1, 2] - 25.0
        logp[3, 0] = old[3, 0] + 12.0
    if token_adv:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    else:  # verl's GRPO outcome advantages: one value per sequence, broadcast and masked.
        adv = torch.randn(B, 1, generator=g, dtype=torch.float64) * mask
        adv[1] = -adv[1].abs() - 2.0 * mask[1]  # a strongly negative sequence ...
    logp[1, :2] = old[1, :2] + 0.4  # ... whose ratio exceeds a small clip_ratio_c: the dual clip binds
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return old, logp, adv, mask, weights


BASE_CFG = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
            "tau_pos": 1.0, "tau_neg": 1.05}
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
BATCH_INFOS = [
    {},
    {"dp_size": 4, "batch_num_tokens": 71, "global_batch_size": 17, "loss_scale_factor": 9},
]


def _compare(name, mode, cfg, seed=0, token_adv=False, extreme=False, weights=False):
    old, logp, adv, mask, w = make_inputs(seed, token_adv, extreme)
    w = w if weights else None
    lp_ref = logp.clone().requires_grad_(True)
    ref_loss, ref_metrics = VERL[name](old, lp_ref, adv, mask, mode, cfg, w)
    (ref_grad,) = torch.autograd.grad(ref_loss, lp_ref)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = gf_verl.POLICY_LOSSES[name](old, lp, adv, mask.bool(), loss_agg_mode=mode, config=cfg,
                                                rollout_is_weights=w)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-12, abs=1e-12), key
    return ref_loss, ref_grad


@pytest.mark.parametrize("info", range(len(BATCH_INFOS)))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(VERL))
def test_policy_loss_matches_verl(name, mode, info):
    cfg = dict(BASE_CFG, global_batch_info=BATCH_INFOS[info])
    _compare(name, mode, cfg, seed=1)


@pytest.mark.parametrize("name", list(VERL))
def test_policy_loss_with_rollout_weights_and_token_advantages(name):
    cfg = dict(BASE_CFG)
    _compare(name, "token-mean", cfg, seed=2, token_adv=True, weights=True)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "sapo", "cispo"])
def test_policy_loss_past_verl_clamps(name):
    # The gradient past verl's clamps is zero; the emulation must reproduce that, not just the value.
    _, grad = _compare(name, "seq-mean-token-mean", dict(BASE_CFG), seed=3, extreme=True)
    if name in ("vanilla", "sapo"):
        assert grad[0, 1] == 0 and grad[1, 2] == 0
    if name == "gspo":
        assert not grad[3].any()  # sequence 3's mean log-ratio is 12 > 10


def test_vanilla_dual_clip_binds_and_default_c():
    old, logp, adv, mask, _ = make_inputs(1)
    cfg = {k: v for k, v in BASE_CFG.items() if k != "clip_ratio_c"}  # verl's default 3.0
    _compare("vanilla", "token-mean", cfg, seed=1)
    _compare("vanilla", "seq-mean-token-sum", dict(BASE_CFG, clip_ratio_c=1.05), seed=1)
    _, metrics = gf_verl.compute_policy_loss_vanilla(old, logp, adv, mask, config=dict(BASE_CFG, clip_ratio_c=1.05))
    assert metrics["actor/pg_clipfrac_lower"] > 0


def test_config_objects_and_fallback_clip_ratio():
    # Attribute-style configs (verl's ActorConfig / DictConfig) and clip_ratio_low/high = None -> clip_ratio.
    old, logp, adv, mask, _ = make_inputs(4)
    cfg_obj = types.SimpleNamespace(clip_ratio=0.25, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                                    global_batch_info={})
    loss, _ = gf_verl.compute_policy_loss_vanilla(old, logp, adv, mask, config=cfg_obj)
    ref, _ = v_vanilla(old, logp, adv, mask, "token-mean", {"clip_ratio_low": 0.25, "clip_ratio_high": 0.25})
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    old, logp, adv, mask, _ = make_inputs(0)
    with pytest.raises(ValueError, match="config is required"):
        gf_verl.compute_policy_loss_vanilla(old, logp, adv, mask)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        gf_verl.compute_policy_loss_vanilla(old, logp, adv, mask, loss_agg_mode="token-sum", config=BASE_CFG)
    with pytest.raises(ValueError, match="advantages must have shape"):
        gf_verl.compute_policy_loss_gpg(old, logp, adv[:, :3], mask, config=BASE_CFG)
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        gf_verl.compute_policy_loss_gpg(old, logp, adv, mask, config=dict(BASE_CFG, global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="tau_pos"):
        gf_verl.compute_policy_loss_sapo(old, logp, adv, mask, config={"clip_ratio": 0.2})


def test_register_with_verl_uses_verls_registry(monkeypatch):
    registry = {}

    def register_policy_loss(name):
        def decorator(fn):
            registry[name] = fn
            return fn
        return decorator

    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    core_algos.register_policy_loss = register_policy_loss
    for mod in ("verl", "verl.trainer", "verl.trainer.ppo"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core_algos)
    sys.modules["verl.trainer.ppo"].core_algos = core_algos
    assert gf_verl.get_policy_loss_fn("gspo") is gf_verl.compute_policy_loss_gspo
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        gf_verl.get_policy_loss_fn("clip_cov")
    names = gf_verl.register_with_verl(prefix="fused_")
    assert set(names) == {"fused_" + n for n in VERL}
    assert registry["fused_geo_mean"] is gf_verl.compute_policy_loss_geo_mean


# --------------------------------------------------------------------------------------
# kl_penalty and linear_cross_entropy.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "kl+"])
def test_kl_penalty_matches_verl(name):
    g = torch.Generator().manual_seed(5)
    logp = (-torch.rand(4, 6, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    ref = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2
    ref[0, 0] = logp[0, 0].item() + 30.0  # past low_var_kl's clamps
    base = name.rstrip("+")
    d = logp - ref
    if base in ("kl", "k1"):
        expected = d
    elif base == "abs":
        expected = d.abs()
    elif base in ("mse", "k2"):
        expected = 0.5 * d.square()
    else:
        kl = torch.clamp(ref - logp, min=-20, max=20)
        expected = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if name.endswith("+"):
        k2 = 0.5 * d.square()
        expected = k2 - k2.detach() + expected.detach()
    got = gf_verl.kl_penalty(logp, ref, name)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), logp)[0], torch.autograd.grad(expected.sum(), logp)[0])
    with pytest.raises(ValueError, match="kl_penalty must be one of"):
        gf_verl.kl_penalty(logp, ref, "full")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_cross_entropy_contract(temperature):
    # verl passes (B, S, H) hidden and (B, S) labels and gets flat (B*S,) log-probs and entropy.
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(257, 16, generator=g, dtype=torch.float64, requires_grad=True)  # V=257: ragged
    labels = torch.randint(0, 257, (2, 5), generator=g)
    logprobs, entropy = gf_verl.linear_cross_entropy(hidden, weight, labels, temperature, backend="reference")
    assert logprobs.shape == entropy.shape == (10,)
    z = (hidden.reshape(-1, 16) @ weight.T) / temperature
    logsm = torch.log_softmax(z, -1)
    ref_logp = logsm.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    ref_ent = -(logsm.exp() * logsm).sum(-1)
    torch.testing.assert_close(logprobs, ref_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(entropy, ref_ent, rtol=1e-10, atol=1e-10)
    # Both outputs carry gradients (verl's entropy bonus backpropagates through the entropy).
    c1, c2 = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((c1 * logprobs + c2 * entropy).sum(), (hidden, weight))
    want = torch.autograd.grad((c1 * ref_logp + c2 * ref_ent).sum(), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    via_apply = gf_verl.LinearCrossEntropy.apply(hidden, weight, labels, temperature)
    torch.testing.assert_close(via_apply[0], logprobs)


def test_linear_cross_entropy_rejects_what_it_cannot_do():
    hidden, weight, labels = torch.randn(3, 4), torch.randn(9, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        gf_verl.linear_cross_entropy(hidden, weight, labels, 1.0, "sum")
    with pytest.raises(ValueError, match="dist_process_group"):
        gf_verl.linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())
    with pytest.raises(ValueError, match="labels must hold one id per token"):
        gf_verl.linear_cross_entropy(hidden, weight, labels[:2])
    with pytest.raises(ValueError, match="ids must lie in"):
        gf_verl.linear_cross_entropy(hidden, weight, labels + 9)




@pytest.mark.parametrize("backend", fused_backends("linear_log_softmax"))
def test_linear_cross_entropy_fused_backends(backend):
    # fp32 inputs (the Triton interpreter's tl.dot is only right in fp32), float64 ground truth.
    g = torch.Generator().manual_seed(7)
    hidden64 = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    weight64 = torch.randn(257, 16, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, 257, (3, 7), generator=g)
    hidden = hidden64.float().requires_grad_(True)
    weight = weight64.float().requires_grad_(True)
    logprobs, entropy = gf_verl.linear_cross_entropy(hidden, weight, labels, 0.8, backend=backend)
    h64, w64 = hidden64.clone().requires_grad_(True), weight64.clone().requires_grad_(True)
    logsm = torch.log_softmax((h64.reshape(-1, 16) @ w64.T) / 0.8, -1)
    ref_logp = logsm.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    ref_ent = -(logsm.exp() * logsm).sum(-1)
    torch.testing.assert_close(logprobs.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent, rtol=1e-5, atol=1e-5)
    c1, c2 = torch.randn(21, generator=g, dtype=torch.float64), torch.randn(21, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((c1.float() * logprobs + c2.float() * entropy).sum(), (hidden, weight))
    want = torch.autograd.grad((c1 * ref_logp + c2 * ref_ent).sum(), (h64, w64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
