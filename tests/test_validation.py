"""Every bad input of DESIGN.md section 4 gets a clear error naming the argument, before any compute."""

import pytest
import torch

import grpo_fused as gf
from grpo_fused import GRPOConfig

B, T, V, H = 2, 3, 5, 4


def _good():
    g = torch.Generator().manual_seed(0)
    return dict(
        logits=torch.randn(B, T, V, generator=g),
        completion_ids=torch.randint(0, V, (B, T), generator=g),
        advantages=torch.randn(B, generator=g),
        completion_mask=torch.ones(B, T, dtype=torch.bool),
        old_logps=torch.randn(B, T, generator=g) - 2,
        ref_logps=torch.randn(B, T, generator=g) - 2,
    )


def _call(**changes):
    args = _good()
    config = changes.pop("config", GRPOConfig(beta=0.04))
    extra = {k: changes.pop(k) for k in ("is_weights", "num_items_in_batch", "backend") if k in changes}
    args.update(changes)
    return gf.grpo_loss(**args, config=config, **extra)


LOSS_CASES = [
    ({"logits": [[1.0]]}, TypeError, "logits must be a torch.Tensor"),
    ({"logits": torch.ones(B, T, V, dtype=torch.int32)}, TypeError, "logits must be float32"),
    ({"logits": torch.randn(B * T, V)}, ValueError, "logits must be 3-D"),
    ({"completion_ids": torch.zeros(B, T)}, TypeError, "completion_ids must be an integer tensor"),
    ({"completion_ids": torch.zeros(B, T + 1, dtype=torch.long)}, ValueError, "completion_ids must have shape (2, 3)"),
    ({"completion_ids": torch.full((B, T), V, dtype=torch.long)}, ValueError, "completion_ids must lie in [0, 5)"),
    ({"completion_ids": torch.full((B, T), -1, dtype=torch.long)}, ValueError, "completion_ids must lie in [0, 5)"),
    ({"advantages": torch.randn(B + 1)}, ValueError, "advantages must have shape (2,), (2, 1) or (2, 3)"),
    ({"advantages": torch.ones(B, dtype=torch.long)}, TypeError, "advantages must be float32"),
    ({"completion_mask": torch.ones(B, T + 2)}, ValueError, "completion_mask must have shape (2, 3)"),
    ({"old_logps": torch.randn(B, T - 1)}, ValueError, "old_logps must have shape (2, 3)"),
    ({"ref_logps": torch.zeros(B, T, dtype=torch.long)}, TypeError, "ref_logps must be float32"),
    ({"ref_logps": None}, ValueError, "ref_logps is required when config.beta != 0"),
    ({"is_weights": torch.ones(B, T + 1)}, ValueError, "is_weights must have shape"),
    ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch must be a finite number > 0"),
    ({"num_items_in_batch": "12"}, TypeError, "num_items_in_batch must be a number"),
    ({"config": {"loss_type": "dapo"}}, TypeError, "config must be a grpo_fused.GRPOConfig"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ({"advantages": torch.randn(B, device="meta")}, ValueError, "advantages is on meta but logits is on cpu"),
]


@pytest.mark.parametrize("changes,error,message", LOSS_CASES, ids=[c[2][:40] for c in LOSS_CASES])
def test_grpo_loss_rejects_bad_input(changes, error, message):
    with pytest.raises(error) as info:
        _call(**changes)
    assert message in str(info.value)


CONFIG_CASES = [
    (dict(loss_type="ppo"), "loss_type must be one of"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(importance_sampling_level="segment"), "importance_sampling_level must be one of"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(epsilon_low=-0.1), "epsilon_low must be >= 0"),
    (dict(clip_ratio_c=0.9), "clip_ratio_c must be > 1"),
    (dict(delta=-1.0), "delta must be > 0"),
    (dict(loss_agg_mode="token-max"), "loss_agg_mode must be one of"),
    (dict(max_completion_length=0), "max_completion_length must be >= 1"),
    (dict(beta="0.1"), "beta must be a float"),
]


@pytest.mark.parametrize("kwargs,message", CONFIG_CASES, ids=[c[1][:30] for c in CONFIG_CASES])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as info:
        GRPOConfig(**kwargs)
    assert message in str(info.value)


def test_config_aliases_and_defaults_follow_trl():
    cfg = GRPOConfig()
    assert (cfg.loss_type, cfg.epsilon_low, cfg.eps_high, cfg.beta, cfg.use_bias_correction_kl) == ("dapo", 0.2, 0.2, 0.0, True)
    assert (cfg.sapo_temperature_pos, cfg.sapo_temperature_neg, cfg.importance_sampling_level) == (1.0, 1.05, "token")
    assert GRPOConfig(loss_type="geo_mean").loss_type == "gmpo"
    assert GRPOConfig(kl_estimator="mse").kl_estimator == "k2"
    assert GRPOConfig(epsilon_low=0.3).eps_high == 0.3


def test_linear_and_log_softmax_reject_bad_input():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    ids, adv = torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)
    cases = [
        (lambda: gf.linear_grpo_loss(hidden, torch.randn(V, H + 1), ids, adv), ValueError, "weight must have shape (V, 4)"),
        (lambda: gf.linear_grpo_loss(hidden, weight, ids, adv, bias=torch.randn(V + 1)), ValueError, "bias must have shape (5,)"),
        (lambda: gf.linear_grpo_loss(hidden, weight, ids + V, adv), ValueError, "completion_ids must lie in [0, 5)"),
        (lambda: gf.linear_grpo_loss(hidden, weight, ids, adv, strategy="fast"), ValueError, "strategy must be one of"),
        (lambda: gf.linear_grpo_loss(hidden[0], weight, ids, adv), ValueError, "hidden must be 3-D"),
        (lambda: gf.selective_log_softmax(torch.randn(B, T, V), ids[:, :2]), ValueError, "ids must have shape (2, 3)"),
        (lambda: gf.selective_log_softmax(torch.randn(B, T, V), ids, temperature=0), ValueError, "temperature must be"),
        (lambda: gf.selective_log_softmax(torch.randn(B, T, V), ids.float()), TypeError, "ids must be an integer"),
        (lambda: gf.linear_log_softmax(hidden, weight.t(), ids), ValueError, "weight must have shape (V, 4)"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error) as info:
            fn()
        assert message in str(info.value)


def test_group_advantages_rejects_bad_input():
    r = torch.randn(8)
    cases = [
        (lambda: gf.group_advantages(r), "give exactly one of group_size, group_ids, group_offsets"),
        (lambda: gf.group_advantages(r, 4, torch.zeros(8, dtype=torch.long)), "give exactly one of"),
        (lambda: gf.group_advantages(r, 3), "group_size=3 does not divide the number of rewards 8"),
        (lambda: gf.group_advantages(r, 0), "group_size must be a positive int"),
        (lambda: gf.group_advantages(r, group_ids=torch.zeros(7, dtype=torch.long)), "group_ids must have shape (8,)"),
        (lambda: gf.group_advantages(r, group_offsets=torch.tensor([0, 5, 3, 8])), "group_offsets must rise from 0 to 8"),
        (lambda: gf.group_advantages(r, group_offsets=torch.tensor([0, 4, 7])), "group_offsets must rise from 0 to 8"),
        (lambda: gf.group_advantages(r, 4, reward_weights=torch.ones(2)), "reward_weights must have shape (K,)"),
        (lambda: gf.group_advantages(r, 4, keep_mask=torch.ones(3, dtype=torch.bool)), "keep_mask must have shape (8,)"),
        (lambda: gf.group_advantages(r, 4, scale="std"), "scale must be one of ('group', 'batch', 'none')"),
        (lambda: gf.group_advantages(r.long(), 4), "rewards must be float32"),
    ]
    for fn, message in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            fn()
        assert message in str(info.value)


def test_inputs_are_never_modified():
    args = _good()
    args["logits"].requires_grad_(True)
    before = {k: v.detach().clone() for k, v in args.items()}
    out = gf.grpo_loss(**args, config=GRPOConfig(beta=0.04, entropy_coef=0.01), backend="reference")
    out.loss.backward()
    for k, v in args.items():
        assert torch.equal(v.detach(), before[k]), f"{k} was modified"
    rewards = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    kept = rewards.clone()
    gf.group_advantages(rewards, 2, backend="reference")
    assert torch.equal(rewards.isnan(), kept.isnan()) and torch.equal(rewards.nan_to_num(), kept.nan_to_num())
