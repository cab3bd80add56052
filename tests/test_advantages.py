"""Group advantages of the reference against TRL's and verl's formulas and hand-computed values."""

from collections import defaultdict

import pytest
import torch

import grpo_fused as gf
from grpo_fused import reference

trl_utils = pytest.importorskip("trl.trainer.utils", reason="TRL is part of the test extra")


def trl_advantages(rewards_per_func, weights, G, scale):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, multi_objective_aggregation
    "sum_then_normalize": the few lines around its use of trl.trainer.utils.nanstd."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ("group", "none"):
        std = trl_utils.nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def verl_grpo_advantages(scores, index, epsilon=1e-6, norm_by_std=True):
    """verl compute_grpo_outcome_advantage: per-index mean and torch.std (unbiased)."""
    by_id = defaultdict(list)
    for i, k in enumerate(index):
        by_id[k].append(scores[i])
    stats = {}
    for k, members in by_id.items():
        group = torch.stack(members)
        # verl: a singleton group gets mean 0, std 1 (grpo-fused gives it advantage 0 instead).
        stats[k] = (group.mean(), group.std()) if len(members) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
    out = scores.clone()
    for i, k in enumerate(index):
        mean, std = stats[k]
        out[i] = (scores[i] - mean) / (std + epsilon) if norm_by_std else scores[i] - mean
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_to_trl_with_multiple_rewards_and_nans(scale):
    g = torch.Generator().manual_seed(1)
    G, P, K = 6, 5, 3
    rewards = torch.randn(G * P, K, generator=g, dtype=torch.float64)
    rewards[3, 1] = float("nan")  # one reward function did not score
    rewards[7, :] = float("nan")  # an unscorable completion
    rewards[12:18, :] = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)  # a zero-std group
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    expected, expected_zero = trl_advantages(rewards, weights, G, scale)
    adv, stats = gf.group_advantages(rewards, group_size=G, reward_weights=weights, scale=scale, backend="reference")
    # TRL's nanstd computes Bessel's factor count / (count - 1) from int64 counts, i.e. in
    # float32: a 1e-8 relative difference from an exact float64 computation.
    torch.testing.assert_close(adv, expected, rtol=1e-7, atol=1e-10)
    if scale == "group":
        # TRL flags zero-std completions; ours flags groups. Equal group sizes: same fraction.
        assert stats.zero_std[stats.group_index].tolist() == expected_zero.tolist()
        assert stats.frac_zero_std.item() == pytest.approx(expected_zero.double().mean().item())
        assert stats.zero_std.tolist() == [False, False, True, False, False]


def test_equal_to_verl_on_variable_size_groups_with_unsorted_ids():
    g = torch.Generator().manual_seed(2)
    sizes = [2, 7, 64, 3, 2]
    labels = torch.cat([torch.full((n,), 10 * k + 3) for k, n in enumerate(sizes)])
    perm = torch.randperm(labels.numel(), generator=g)
    group_ids = labels[perm]  # interleaved, unsorted
    rewards = torch.randn(labels.numel(), generator=g, dtype=torch.float64)
    for norm in (True, False):
        expected = verl_grpo_advantages(rewards, group_ids.tolist(), epsilon=1e-6, norm_by_std=norm)
        adv, stats = gf.group_advantages(
            rewards, group_ids=group_ids, scale="group" if norm else "none", eps=1e-6, backend="reference"
        )
        torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    assert stats.count.tolist() == sizes  # groups numbered by sorted label


def test_offsets_equal_ids_and_singletons_give_zero():
    # verl gives a singleton group mean 0 and std 1 (advantage r / (1 + eps)); TRL gives NaN -> 0.
    # grpo-fused follows the design: a group with fewer than two valid rewards carries no signal -> 0.
    g = torch.Generator().manual_seed(3)
    sizes = torch.tensor([1, 2, 7, 64, 1, 4096])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    rewards = torch.randn(int(sizes.sum()), generator=g)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    by_offsets, s1 = gf.group_advantages(rewards, group_offsets=offsets, backend="reference")
    by_ids, s2 = gf.group_advantages(rewards, group_ids=ids, backend="reference")
    torch.testing.assert_close(by_offsets, by_ids, rtol=0, atol=0)
    assert by_offsets[0].item() == 0.0 and by_offsets[74].item() == 0.0
    assert torch.isnan(s1.std[0]) and s1.zero_std[0] and s1.zero_std[4]
    # The other groups equal verl's formula.
    expected = verl_grpo_advantages(rewards.double(), ids.tolist(), epsilon=1e-4)
    keep = s1.count[s1.group_index] > 1
    torch.testing.assert_close(by_offsets[keep].double(), expected[keep], rtol=1e-5, atol=1e-5)


def test_hand_computed_group_stats_biased_and_unbiased():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 5.0, float("nan")], dtype=torch.float64)
    adv, stats = gf.group_advantages(rewards, group_size=2, eps=0.0, backend="reference")
    # Group 0: mean 2, unbiased std sqrt(2) -> -1/sqrt 2, +1/sqrt 2. Group 1: std 0 -> 0/0 -> 0.
    torch.testing.assert_close(adv, torch.tensor([-(0.5 ** 0.5), 0.5 ** 0.5, 0, 0, 0, 0], dtype=torch.float64))
    assert stats.mean[:2].tolist() == [2.0, 0.0] and stats.mean[2].item() == 5.0
    assert stats.zero_std.tolist() == [False, True, True]
    assert stats.frac_zero_std.item() == pytest.approx(2 / 3)
    adv_b, stats_b = gf.group_advantages(rewards, group_size=2, eps=0.0, unbiased=False, backend="reference")
    torch.testing.assert_close(adv_b[:2], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert stats_b.std[2].item() == 0.0  # one valid reward: biased std is 0


def test_keep_mask_filters_before_statistics():
    rewards = torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=torch.float64)
    keep = torch.tensor([True, True, True, False])
    adv, stats = gf.group_advantages(rewards, group_size=4, keep_mask=keep, scale="none", backend="reference")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert stats.count.tolist() == [3]
    assert not torch.equal(rewards, torch.zeros(4))  # input untouched
