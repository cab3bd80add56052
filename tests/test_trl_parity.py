"""The reference equals TRL 1.16's own ``GRPOTrainer._compute_loss`` on the same tensors.

TRL's method is called unmodified on a stand-in trainer object whose
``_get_per_token_logps_and_entropies`` returns our per-token log-probs (a float64 leaf), so
the loss, its gradient w.r.t. the log-probs, and the logged metrics come from TRL's code,
not from formulas re-typed here.
"""

import itertools
import types
from collections import defaultdict

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is part of the test extra")

from grpo_fused import GRPOConfig, reference, semantics  # noqa: E402

TRL_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"]


class _SingleProcessAccelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logps, entropies, inputs, *, cfg: GRPOConfig, trl_epsilon_high, training, vllm_is, max_len):
    """Run TRL's _compute_loss on a stand-in trainer; returns (loss, metrics dict of floats)."""
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *a, **k: (logps, entropies, None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=cfg.importance_sampling_level,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=trl_epsilon_high,
        use_vllm=vllm_is is not None,
        vllm_importance_sampling_correction=vllm_is is not None,
        model=types.SimpleNamespace(training=training),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=_SingleProcessAccelerator(),
        _entropy_bonus_enabled=cfg.entropy_coef != 0.0,
        entropy_coef=cfg.entropy_coef,
        use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            delta=cfg.delta,
            sapo_temperature_pos=cfg.sapo_temperature_pos,
            sapo_temperature_neg=cfg.sapo_temperature_neg,
            steps_per_generation=1,
        ),
    )
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    mode = "train" if training else "eval"
    return loss, {k: v[-1] for k, v in trainer._metrics[mode].items()}


def _batch(seed, B=5, T=7, V=13):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    logps, entropy = reference.selective_log_softmax(logits, ids, compute_entropy=True)
    lengths = torch.tensor([T, 3, 0, 1, T - 2])[:B]  # ragged, one empty completion
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    # old / ref policies a noisy step away, so that ratios spread across the clip range.
    old = logps + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logps + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[1] = 0.0
    is_ratio = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.8 + 0.6
    return logps, entropy, ids, mask, old, ref, adv, is_ratio


# delta only acts on TRL's clipped surrogates; for cispo / sapo both sides must ignore it.
CASES = list(itertools.product(TRL_LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [None, 1.6]))


@pytest.mark.parametrize("seed,case", list(enumerate(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_reference_matches_trl_compute_loss(seed, case):
    loss_type, level, beta, delta = case
    logps, entropy, ids, mask, old, ref, adv, is_ratio = _batch(seed)
    # cispo caps the ratio at epsilon_high itself (TRL: clamp(r, max=epsilon_high)).
    eps_high = 1.15 if loss_type == "cispo" else 0.28
    cfg = GRPOConfig(
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, delta=delta, beta=beta,
        importance_sampling_level=level, use_bias_correction_kl=(seed % 2 == 0),
    )
    num_items = torch.tensor(float(mask.sum() + 3))  # a global count that differs from the local one
    use_is = seed % 3 == 0

    trl_logps = logps.detach().clone().requires_grad_(True)
    inputs = {
        "prompt_ids": torch.zeros(5, 1, dtype=torch.long),
        "prompt_mask": torch.ones(5, 1, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": num_items,
        "importance_sampling_ratio": is_ratio,
    }
    trl_loss, trl_metrics = _trl_loss(
        trl_logps, entropy, inputs, cfg=cfg, trl_epsilon_high=eps_high, training=True,
        vllm_is=is_ratio if use_is else None, max_len=ids.shape[1],
    )
    trl_loss.backward()

    our_logps = logps.detach().clone().requires_grad_(True)
    loss, metrics = semantics.grpo_loss_from_logps(
        our_logps, adv, mask.to(torch.float64), cfg.params, old, ref, entropy=entropy,
        is_weights=is_ratio if use_is else None, num_items_in_batch=num_items,
    )
    loss.backward()

    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(our_logps.grad, trl_logps.grad, rtol=1e-6, atol=1e-12)
    assert our_logps.grad.abs().sum() > 0, "the gradient must not vanish on this batch"
    for name, value in trl_metrics.items():
        assert name in metrics, f"metric {name} logged by TRL is missing"
        # TRL casts the clip flags to float32 before averaging, hence 1e-6.
        assert float(metrics[name]) == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), name


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_entropy_bonus_and_eval_mode_match_trl(loss_type):
    logps, entropy, ids, mask, old, ref, adv, _ = _batch(7)
    eps_high = 1.15 if loss_type == "cispo" else 0.28
    cfg = GRPOConfig(loss_type=loss_type, epsilon_high=eps_high, beta=0.04, entropy_coef=0.01)
    num_items = torch.tensor(float(mask.sum()))
    inputs = {
        "prompt_ids": torch.zeros(5, 1, dtype=torch.long), "prompt_mask": torch.ones(5, 1, dtype=torch.long),
        "completion_ids": ids, "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": num_items,
    }
    # Entropy enters TRL's loss but not its gradient path to logps here (entropies are a
    # separate tensor), so a leaf entropy tensor lets us compare both gradients.
    for training in (True, False):
        trl_logps = logps.detach().clone().requires_grad_(True)
        trl_ent = entropy.detach().clone().requires_grad_(True)
        trl_loss, _ = _trl_loss(trl_logps, trl_ent, inputs, cfg=cfg, trl_epsilon_high=eps_high,
                                training=training, vllm_is=None, max_len=ids.shape[1])
        trl_loss.backward()
        our_logps = logps.detach().clone().requires_grad_(True)
        our_ent = entropy.detach().clone().requires_grad_(True)
        loss, _ = semantics.grpo_loss_from_logps(our_logps, adv, mask.double(), cfg.params, old, ref,
                                                 entropy=our_ent, num_items_in_batch=num_items)
        loss.backward()
        torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(our_logps.grad, trl_logps.grad, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(our_ent.grad, trl_ent.grad, rtol=1e-6, atol=1e-12)
