"""The verl adapter where verl itself is not needed: config reading, checks and refusals, the
fused log-prob entry points (``linear_cross_entropy`` with every reduction, a vocab-parallel
process group, the fused backends), the verl loss types through the main API on every CPU
backend. The numbers against verl 0.9.1's own functions are in ``tests/test_verl_parity.py``.

Shapes are small and ragged (B=5, T=7) with one fully masked sequence and uneven lengths.
"""

import datetime
import json
import os
import tempfile
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo_fused as gf
from conftest import fused_backends
from grpo_fused.integrations import verl as gf_verl

B, T = 5, 7


def make_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 0, 1, 6])  # one empty sequence, one single token
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return old, logp, adv, mask, weights


BASE_CFG = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
            "tau_pos": 1.0, "tau_neg": 1.05,
            "policy_loss": {"clip_cov_ratio": 0.2, "clip_cov_lb": -1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.2,
                            "ppo_kl_coef": 0.1, "dro_beta": 0.3}}


def test_config_objects_and_fallback_clip_ratio():
    # Attribute-style configs (verl's ActorConfig / DictConfig) read like mappings, and
    # clip_ratio_low/high = None fall back to clip_ratio.
    old, logp, adv, mask, _ = make_inputs(4)
    as_object = types.SimpleNamespace(clip_ratio=0.25, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                                      global_batch_info={})
    as_mapping = {"clip_ratio_low": 0.25, "clip_ratio_high": 0.25}
    for name in ("vanilla", "cispo", "dppo_tv", "gspo"):
        a, ma = gf_verl.POLICY_LOSSES[name](old, logp, adv, mask, config=as_object)
        b, mb = gf_verl.POLICY_LOSSES[name](old, logp, adv, mask, config=as_mapping)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert ma == mb


def test_verl_default_aggregation_per_loss():
    # verl's defaults: gspo and sapo seq-mean-token-mean, the others token-mean.
    old, logp, adv, mask, _ = make_inputs(5)
    for name, fn in gf_verl.POLICY_LOSSES.items():
        if name == "bypass_mode":
            continue
        default = "seq-mean-token-mean" if name in ("gspo", "sapo") else "token-mean"
        torch.manual_seed(0)
        a, _ = fn(old, logp, adv, mask, config=BASE_CFG)
        torch.manual_seed(0)
        b, _ = fn(old, logp, adv, mask, default, BASE_CFG)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs():
    old, logp, adv, mask, _ = make_inputs(0)
    with pytest.raises(ValueError, match="config is required"):
        gf_verl.compute_policy_loss_vanilla(old, logp, adv, mask)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        gf_verl.compute_policy_loss_vanilla(old, logp, adv, mask, loss_agg_mode="token-max", config=BASE_CFG)
    with pytest.raises(ValueError, match="advantages must have shape"):
        gf_verl.compute_policy_loss_gpg(old, logp, adv[:, :3], mask, config=BASE_CFG)
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        gf_verl.compute_policy_loss_gpg(old, logp, adv, mask, config=dict(BASE_CFG, global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="global_batch_size is required"):
        gf_verl.compute_policy_loss_gpg(old, logp, adv, mask, "seq-mean-token-sum",
                                        dict(BASE_CFG, global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="tau_pos"):
        gf_verl.compute_policy_loss_sapo(old, logp, adv, mask, config={"clip_ratio": 0.2})
    with pytest.raises(ValueError, match="policy_loss is required"):
        gf_verl.compute_policy_loss_kl_cov(old, logp, adv, mask, config={"clip_ratio": 0.2})
    with pytest.raises(ValueError, match="rollout_correction config not found"):
        gf_verl.compute_policy_loss_bypass_mode(old, logp, adv, mask, config=BASE_CFG)
    with pytest.raises(ValueError, match="Invalid loss_type"):
        cfg = dict(BASE_CFG, policy_loss={"rollout_correction": {"loss_type": "ppo"}})
        gf_verl.compute_policy_loss_bypass_mode(old, logp, adv, mask, config=cfg)
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        gf_verl.get_policy_loss_fn("grpo")
    assert gf_verl.get_policy_loss_fn("kl_cov") is gf_verl.compute_policy_loss_kl_cov


def test_token_sum_scales_by_dp_size():
    old, logp, adv, mask, _ = make_inputs(1)
    one, _ = gf_verl.compute_policy_loss_gpg(old, logp, adv, mask, "token-sum", BASE_CFG)
    four, _ = gf_verl.compute_policy_loss_gpg(old, logp, adv, mask, "token-sum",
                                              dict(BASE_CFG, global_batch_info={"dp_size": 4}))
    torch.testing.assert_close(one, -(adv * logp * mask).sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(four, 4 * one, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------
# The verl loss types through the main API.
# --------------------------------------------------------------------------------------

MAIN_API_CASES = {
    "dppo_tv": dict(loss_type="dppo_tv", epsilon_low=0.05, epsilon_high=0.03),
    "dppo_kl": dict(loss_type="dppo_kl", epsilon_low=0.01, epsilon_high=0.005, clip_ratio_c=1.3),
    "clip_cov": dict(loss_type="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=5.0),
    "kl_cov": dict(loss_type="kl_cov", kl_cov_ratio=0.2, ppo_kl_coef=0.5, beta=0.04, kl_estimator="low_var_kl"),
    "dro": dict(loss_type="dro", dro_beta=0.3, loss_agg_mode="seq-mean-token-mean"),
    "token-sum": dict(loss_type="dapo", loss_agg_mode="token-sum", dp_size=2, clip_ratio_c=3.0),
}


def _logits_inputs(seed=2, V=33):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    old, _, adv, mask, _ = make_inputs(seed)
    old = torch.log_softmax(logits + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(
        -1, ids.unsqueeze(-1)).squeeze(-1)
    ref = old - 0.1
    return logits, ids, adv, mask, old, ref


@pytest.mark.parametrize("backend", fused_backends("grpo_loss"))
@pytest.mark.parametrize("case", list(MAIN_API_CASES))
def test_verl_loss_types_through_the_main_api(case, backend):
    # gf.grpo_loss(config=GRPOConfig(loss_type=...)) on a fused backend (the vocab pass, then the
    # semantics tail: these rows have no fused epilogue) equals the reference, which equals the verl
    # adapter on the same per-token log-probs (held to verl's own functions by test_verl_parity.py).
    config = gf.GRPOConfig(**MAIN_API_CASES[case])
    logits, ids, adv, mask, old, ref = _logits_inputs()
    results = []
    for name in ("reference", backend):
        x = logits.clone().requires_grad_(True)
        torch.manual_seed(0)  # clip_cov's draw
        out = gf.grpo_loss(x, ids, adv, mask, old_logps=old, ref_logps=ref, config=config, backend=name)
        (grad,) = torch.autograd.grad(out.loss, x)
        results.append((out, grad))
    (ref_out, ref_grad), (fused_out, fused_grad) = results
    torch.testing.assert_close(fused_out.loss, ref_out.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert fused_out.metrics.keys() == ref_out.metrics.keys()
    for name in config.params.spec.loss_type.metrics:
        assert name in ref_out.metrics
        torch.testing.assert_close(fused_out.metrics[name], ref_out.metrics[name], rtol=1e-12, atol=1e-12)
    if config.beta:
        return  # the adapter's policy losses have no KL term (verl adds it outside)
    row = config.params.spec.loss_type
    verl_cfg = dict(BASE_CFG, clip_ratio_low=config.epsilon_low, clip_ratio_high=config.eps_high,
                    clip_ratio_c=config.clip_ratio_c if config.clip_ratio_c is not None else 20.0,
                    global_batch_info={"dp_size": config.dp_size},
                    policy_loss=dict(BASE_CFG["policy_loss"], dro_beta=config.dro_beta))
    verl_name = {"dapo": "vanilla"}.get(row.name, row.name)
    torch.manual_seed(0)
    verl_loss, _ = gf_verl.POLICY_LOSSES[verl_name](old, ref_out.logps, adv, mask,
                                                    config.loss_agg_mode or "token-mean", verl_cfg)
    torch.testing.assert_close(ref_out.loss, verl_loss, rtol=1e-12, atol=1e-12)


def test_verl_loss_type_config_checks():
    with pytest.raises(ValueError, match="dro_beta is required"):
        gf.GRPOConfig(loss_type="dro")
    with pytest.raises(ValueError, match="token-level ratio only"):
        gf.GRPOConfig(loss_type="dppo_tv", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="delta"):
        gf.GRPOConfig(loss_type="kl_cov", delta=2.0)
    with pytest.raises(ValueError, match="clip_cov_ratio must be > 0"):
        gf.GRPOConfig(loss_type="clip_cov", clip_cov_ratio=0.0)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 0"):
        gf.GRPOConfig(loss_type="dppo_kl", clip_ratio_c=0.0)
    assert float(gf.GRPOConfig(loss_type="dppo_tv").params.hyper(torch.float64, "cpu").clip_ratio_c) == 20.0
    rows = gf.semantics.LOSS_TYPES
    assert all(not rows[n].fused_epilogue for n in ("dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "dro", "gmpo"))
    assert rows["clip_cov"].batch_coupled and rows["kl_cov"].batch_coupled and not rows["dro"].batch_coupled


# --------------------------------------------------------------------------------------
# kl_penalty and linear_cross_entropy.
# --------------------------------------------------------------------------------------


def test_kl_penalty_refusals():
    # (Values and gradients against verl's kl_penalty: tests/test_verl_parity.py.)
    logp, ref = -torch.rand(2, 3, dtype=torch.float64), -torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="kl_penalty must be one of"):
        gf_verl.kl_penalty(logp, ref, "k4")
    with pytest.raises(NotImplementedError, match="full"):
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


def test_linear_cross_entropy_reductions():
    # verl's kernel: "sum" / "mean" reduce the log-probs over the tokens; the entropy stays per token.
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(257, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 257, (2, 5), generator=g)
    per_token, entropy = gf_verl.linear_cross_entropy(hidden, weight, labels, 0.9, backend="reference")
    total, entropy_sum = gf_verl.linear_cross_entropy(hidden, weight, labels, 0.9, "sum", backend="reference")
    mean, _ = gf_verl.linear_cross_entropy(hidden, weight, labels, 0.9, "mean", backend="reference")
    assert total.shape == mean.shape == () and entropy_sum.shape == (10,)
    torch.testing.assert_close(total, per_token.sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(mean, per_token.sum() / 10, rtol=1e-14, atol=0)
    torch.testing.assert_close(entropy_sum, entropy, rtol=0, atol=0)
    got = torch.autograd.grad(mean, hidden)[0]
    want = torch.autograd.grad(per_token.mean(), hidden)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_linear_cross_entropy_rejects_what_it_cannot_do():
    hidden, weight, labels = torch.randn(3, 4), torch.randn(9, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        gf_verl.linear_cross_entropy(hidden, weight, labels, 1.0, "max")
    with pytest.raises(ValueError, match="labels must hold one id per token"):
        gf_verl.linear_cross_entropy(hidden, weight, labels[:2])
    with pytest.raises(ValueError, match="ids must lie in"):
        gf_verl.linear_cross_entropy(hidden, weight, labels + 9)


# The vocab-parallel form: 2 gloo processes, each holding half of a V = 21 lm_head (10 + 11 rows).
_VP = dict(N=6, H=8, V=21, split=10, temperature=0.8)


def _vocab_parallel_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    error = None
    try:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, _VP["N"] // 2, _VP["H"], generator=g, dtype=torch.float64)
        weight = torch.randn(_VP["V"], _VP["H"], generator=g, dtype=torch.float64)
        labels = torch.randint(0, _VP["V"], (2, _VP["N"] // 2), generator=g)
        c1, c2 = torch.randn(_VP["N"], generator=g, dtype=torch.float64), torch.randn(_VP["N"], generator=g,
                                                                                       dtype=torch.float64)
        rows = slice(0, _VP["split"]) if rank == 0 else slice(_VP["split"], _VP["V"])

        def run(h, w, group):
            h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            logprobs, entropy = gf_verl.linear_cross_entropy(h, w, labels, _VP["temperature"], "none", group)
            dh, dw = torch.autograd.grad((c1 * logprobs + c2 * entropy).sum(), (h, w))
            return logprobs, entropy, dh, dw

        def sharded_equals_full():
            full = run(hidden, weight, None)
            shard = run(hidden, weight[rows].contiguous(), dist.group.WORLD)
            torch.testing.assert_close(shard[0], full[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(shard[1], full[1], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(shard[3], full[3][rows], rtol=1e-12, atol=1e-12)
            # verl's contract: each rank's dhidden is a part; the group's sum is the full gradient.
            summed = shard[2].clone()
            dist.all_reduce(summed)
            torch.testing.assert_close(summed, full[2], rtol=1e-12, atol=1e-12)
            return full[0]

        sharded_equals_full()
        # Under the sampler's truncation too (the rollout's rule), across the two shards.
        with gf_verl.sampling_support(gf.SamplingRule(top_k=6, top_p=0.9)):
            logprobs = sharded_equals_full()
        assert torch.isneginf(logprobs).any() and torch.isfinite(logprobs).any()  # some labels fall outside
    except Exception as exc:  # reported by the test
        error = repr(exc)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(error, f)
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_linear_cross_entropy_vocab_parallel():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_vocab_parallel_worker, args=(os.path.join(tmp, "rendezvous"), tmp), nprocs=2, join=True)
        errors = []
        for rank in range(2):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                errors.append(json.load(f))
    assert errors == [None, None], errors


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
