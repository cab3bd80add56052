"""The Triton group-advantages kernel against the reference.

Runs on CUDA when present, else on CPU tensors under TRITON_INTERPRET=1 (set by conftest).
Every comparison uses a float64 ground truth (the reference on the rewards upcast to fp64,
which holds the exact bf16 / fp16 values) and the reference in the kernel's own compute dtype:
the kernel's error may be at most PyTorch's own plus a few ulps (the rule of tests/tolerance.py).
Group index, counts, zero-std flags and NaN positions must match exactly.
"""

import math

import pytest
import torch

import grpo_fused as gf
from grpo_fused import reference, semantics
from grpo_fused.semantics import AdvantageRequest

from conftest import DEVICE, has_triton
from tolerance import ULPS_ADVANTAGE as ULPS, assert_close_to_truth

pytestmark = pytest.mark.skipif(not has_triton(), reason="Triton is not installed")

if has_triton():
    import grpo_fused.kernels.group_advantages as ga


def triton_group_advantages(rewards, **request):
    """The Triton kernel entry, called with the public API's keyword arguments."""
    return ga.group_advantages(rewards, AdvantageRequest(**request))


ON_CUDA = DEVICE == "cuda"


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def check_against_reference(rewards, **kwargs):
    """Run the kernel entry and compare every output with the reference; returns the kernel's."""
    inputs = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    rewards_before = rewards.clone()
    adv, stats = triton_group_advantages(rewards, **kwargs)
    # Inputs are never modified.
    assert torch.equal(rewards.cpu().nan_to_num(7.0), rewards_before.cpu().nan_to_num(7.0))
    for k, v in inputs.items():
        assert torch.equal(kwargs[k].cpu().nan_to_num(7.0), v.cpu().nan_to_num(7.0)), k

    ref_adv, ref_stats = reference.group_advantages(rewards, **kwargs)
    true_adv, true_stats = truth_group_advantages(rewards, **kwargs)

    assert_close_to_truth(adv, true_adv, ref_adv, ulps=ULPS, what="advantages")
    assert not torch.isnan(adv).any() and torch.isfinite(adv).all()
    for name in ("rewards", "mean", "std"):
        assert_close_to_truth(getattr(stats, name), getattr(true_stats, name), getattr(ref_stats, name), ulps=ULPS,
                              what=name)
    # A ratio of two exact counts: eager's one division errs half an ulp at most, the kernel's may
    # err half an ulp more (k = 0.5 keeps the former bound, 1e-7 from eager's result).
    assert_close_to_truth(stats.frac_zero_std, true_stats.frac_zero_std, ref_stats.frac_zero_std, ulps=0.5,
                          what="frac_zero_std")
    assert torch.equal(stats.group_index.cpu(), ref_stats.group_index.cpu())
    assert stats.count.dtype == torch.int64 and torch.equal(stats.count.cpu(), ref_stats.count.cpu())
    assert stats.zero_std.dtype == torch.bool and torch.equal(stats.zero_std.cpu(), ref_stats.zero_std.cpu())
    assert stats.frac_zero_std.dim() == 0
    # Advantage 0 exactly where the reference gives 0 for want of signal.
    no_signal = ref_adv == 0
    assert (adv[no_signal] == 0).all()
    return adv, stats


def truth_group_advantages(rewards, **kwargs):
    """The reference on the rewards upcast to float64 (exact for every rewards dtype)."""
    if kwargs.get("reward_weights") is not None:
        # Weights rounded to the compute dtype are part of the spec, not an error.
        compute = semantics.compute_dtype(rewards.dtype)
        kwargs = dict(kwargs, reward_weights=kwargs["reward_weights"].to(compute).double())
    return reference.group_advantages(rewards.double(), **kwargs)


def sizes_to_offsets(sizes):
    return torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int64, device=DEVICE)


def make_rewards(group_sizes, *, k=None, dtype=torch.float32, seed=0, nan_frac=0.1):
    """Rewards for groups of the given sizes (contiguous), with the cases that matter mixed in:
    binary constant groups (zero std: DAPO drops them), a group with every reward NaN,
    scattered NaN (unscored) rewards, otherwise Gaussian rewards with group-specific offsets."""
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for i, n in enumerate(group_sizes):
        kind = i % 6
        if kind == 1:
            piece = torch.full((n,), float(i % 2), dtype=torch.float64)  # zero std
        elif kind == 4 and n > 1:
            piece = torch.full((n,), float("nan"), dtype=torch.float64)  # all unscored
        else:
            piece = torch.randn(n, generator=g, dtype=torch.float64) * (0.5 + i % 3) + (i % 5) - 2
        pieces.append(piece)
    r = torch.cat(pieces)
    nan_at = torch.rand(r.shape, generator=g) < nan_frac
    r[nan_at] = float("nan")
    if k is not None:
        r = r[:, None] + torch.randn(r.numel(), k, generator=g, dtype=torch.float64) * 0.3
        r[torch.rand(r.shape, generator=g) < nan_frac] = float("nan")
    return r.to(dtype).to(DEVICE)


def random_keep(batch, seed=0, frac=0.2):
    g = torch.Generator().manual_seed(seed + 100)
    return (torch.rand(batch, generator=g) >= frac).to(DEVICE)


def shuffled_ids(group_sizes, seed=0):
    """Group ids labelled out of order (label 3*g+7 for group g, groups given in a shuffled
    label order), in shuffled row order: exercises the argsort path and the sorted-label numbering."""
    g = torch.Generator().manual_seed(seed + 200)
    labels = torch.randperm(len(group_sizes), generator=g) * 3 + 7
    ids = torch.repeat_interleave(labels, torch.tensor(group_sizes))
    return ids[torch.randperm(ids.numel(), generator=g)].to(DEVICE)


# --------------------------------------------------------------------------------------
# Option matrix.
# --------------------------------------------------------------------------------------

# Ragged group sizes: singletons, pairs, an odd 7, sizes that straddle the tile width.
VARIABLE_SIZES = [1, 2, 7, 3, 5, 1, 2, 9, 4, 6, 1, 8]


def layout_kwargs(layout, rewards_len, sizes):
    if layout == "size":
        return {"group_size": sizes[0]}
    if layout == "offsets":
        return {"group_offsets": sizes_to_offsets(sizes)}
    if layout == "ids_sorted":
        return {"group_ids": torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(DEVICE)}
    return {"group_ids": shuffled_ids(sizes)}


@pytest.mark.parametrize("layout", ["size", "offsets", "ids_sorted", "ids_unsorted"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_option_matrix(layout, scale, unbiased):
    sizes = [6] * 9 if layout == "size" else VARIABLE_SIZES
    # Pairwise with the layout x scale x unbiased product: 2-D rewards with weights on half the
    # cases, a keep mask on the other half, NaNs everywhere.
    two_d = (scale == "batch") == unbiased
    rewards = make_rewards(sizes, k=3 if two_d else None, seed=len(layout) + 3 * unbiased)
    kwargs = layout_kwargs(layout, rewards.shape[0], sizes)
    if two_d:
        kwargs["reward_weights"] = torch.tensor([1.0, 0.5, -2.0], device=DEVICE)
    else:
        kwargs["keep_mask"] = random_keep(rewards.shape[0])
    check_against_reference(rewards, scale=scale, unbiased=unbiased, eps=1e-4, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_dtypes(dtype, scale):
    sizes = VARIABLE_SIZES
    rewards = make_rewards(sizes, k=2, dtype=dtype, seed=5)
    adv, stats = check_against_reference(
        rewards, group_offsets=sizes_to_offsets(sizes), reward_weights=torch.tensor([0.7, 1.3], device=DEVICE,
                                                                                    dtype=dtype),
        keep_mask=random_keep(rewards.shape[0], seed=5), scale=scale,
    )
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert adv.dtype == stats.mean.dtype == stats.std.dtype == stats.rewards.dtype == expected


@pytest.mark.parametrize(
    "group_size",
    [
        1,  # every group a singleton: advantage 0, std NaN (unbiased)
        2,  # the smallest group with a std
        7,  # not a power of two: a masked tile column
        64,
        4096,  # above the widest tile (1024): the multi-chunk loop on the fixed-size path
    ],
)
def test_fixed_group_sizes(group_size):
    n_groups = 3 if group_size == 4096 else max(5, 300 // group_size)
    rewards = make_rewards([group_size] * n_groups, seed=group_size)
    for scale in ("group", "batch"):
        check_against_reference(rewards, group_size=group_size, scale=scale, keep_mask=random_keep(rewards.shape[0]))


def test_sizes_1_2_7_64_4096_in_one_batch():
    sizes = [1, 2, 7, 64, 4096, 2, 1, 7, 64]
    rewards = make_rewards(sizes, seed=11)
    keep = random_keep(rewards.shape[0], seed=11)
    for scale, kwargs in (
        ("group", {"group_offsets": sizes_to_offsets(sizes)}),
        ("batch", {"group_ids": shuffled_ids(sizes, seed=11)}),
        ("none", {"group_offsets": sizes_to_offsets(sizes), "unbiased": False}),
    ):
        check_against_reference(rewards, scale=scale, keep_mask=keep, **kwargs)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_many_programs(monkeypatch, scale):
    # Small tiles force many programs at a small B, so the per-program partials of the batch std
    # and of frac_zero_std are merged across programs, and the last program is partly empty.
    monkeypatch.setattr(ga, "TILE_ELEMENTS", 16)
    sizes = VARIABLE_SIZES * 4
    rewards = make_rewards(sizes, seed=3)
    check_against_reference(rewards, group_offsets=sizes_to_offsets(sizes), scale=scale)
    rewards = make_rewards([5] * 23, seed=4)
    check_against_reference(rewards, group_size=5, scale=scale, unbiased=False)


# --------------------------------------------------------------------------------------
# Hand-computed values and edge cases.
# --------------------------------------------------------------------------------------


def test_hand_computed_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, float("nan")], device=DEVICE)
    # The hand-computed values are the float64 truth; the reference on the fp32 rewards is eager.
    f64 = dict(dtype=torch.float64)
    adv, stats = triton_group_advantages(rewards, group_size=4)
    eager_adv, eager_stats = reference.group_advantages(rewards, group_size=4)
    std0 = math.sqrt(5.0 / 3.0)  # deviations -1.5, -0.5, 0.5, 1.5: sum of squares 5, n - 1 = 3
    std1 = math.sqrt(50.0 / 3.0 / 2.0)  # valid 0, 0, 5: mean 5/3, squares sum 50/3, n - 1 = 2
    expected = [(x - 2.5) / (std0 + 1e-4) for x in (1, 2, 3, 4)]
    expected += [(x - 5 / 3) / (std1 + 1e-4) for x in (0, 0, 5)] + [0.0]
    assert_close_to_truth(adv, torch.tensor(expected, **f64), eager_adv, ulps=ULPS, what="advantages")
    assert_close_to_truth(stats.mean, torch.tensor([2.5, 5 / 3], **f64), eager_stats.mean, ulps=ULPS, what="mean")
    assert_close_to_truth(stats.std, torch.tensor([std0, std1], **f64), eager_stats.std, ulps=ULPS, what="std")
    assert stats.count.tolist() == [4, 3] and stats.group_index.tolist() == [0] * 4 + [1] * 4

    # Biased std, no scaling, a kept subset: group 0 keeps 1 and 3 (mean 2, biased std 1).
    keep = torch.tensor([1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool, device=DEVICE)
    options = dict(group_size=4, keep_mask=keep, unbiased=False, scale="none")
    adv, stats = triton_group_advantages(rewards, **options)
    eager_adv, eager_stats = reference.group_advantages(rewards, **options)
    assert_close_to_truth(adv[:4], torch.tensor([-1.0, 0.0, 1.0, 0.0], **f64), eager_adv[:4], ulps=ULPS,
                          what="kept advantages")
    assert_close_to_truth(stats.std, torch.tensor([1.0, math.sqrt(50 / 9)], **f64), eager_stats.std, ulps=ULPS,
                          what="biased std")

    # Batch scale (LitePPO): group means, one std over all 7 valid rewards.
    adv, _ = triton_group_advantages(rewards, group_size=4, scale="batch")
    eager_adv, _ = reference.group_advantages(rewards, group_size=4, scale="batch")
    valid = torch.tensor([1.0, 2, 3, 4, 0, 0, 5], dtype=torch.float64)
    batch_std = valid.std().item()
    expected = [(x - 2.5) / (batch_std + 1e-4) for x in (1, 2, 3, 4)]
    expected += [(x - 5 / 3) / (batch_std + 1e-4) for x in (0, 0, 5)] + [0.0]
    assert_close_to_truth(adv, torch.tensor(expected, **f64), eager_adv, ulps=ULPS, what="batch-scaled advantages")


def test_degenerate_groups():
    nan = float("nan")
    # groups: empty, singleton, all NaN, zero std (binary), one valid of three, two valid.
    rewards = torch.tensor([3.0, nan, nan, 1.0, 1.0, 1.0, nan, 2.0, nan, 4.0, 6.0], device=DEVICE)
    offsets = torch.tensor([0, 0, 1, 3, 6, 9, 11], device=DEVICE)
    for unbiased in (True, False):
        for eps in (1e-4, 0.0):  # eps = 0: a zero-std group must still give 0, not NaN
            adv, stats = check_against_reference(rewards, group_offsets=offsets, unbiased=unbiased, eps=eps)
            assert stats.count.tolist() == [0, 1, 0, 3, 1, 2]
            assert stats.zero_std.tolist() == [True, True, True, True, True, False]
            assert torch.isnan(stats.mean[[0, 2]]).all() and stats.mean[3].item() == 1.0
            # Undefined std is NaN: unbiased needs 2 valid rewards, biased needs 1.
            assert torch.isnan(stats.std[1]).item() == unbiased and torch.isnan(stats.std[0]).item()
            assert (adv[:9] == 0).all() and adv[9].item() < 0 < adv[10].item()
            assert stats.frac_zero_std.item() == pytest.approx(5 / 6)


def test_infinite_reward_gives_finite_advantages():
    rewards = torch.tensor([1.0, float("inf"), 2.0, 0.0, 1.0, 3.0], device=DEVICE)
    for scale in ("group", "batch", "none"):
        adv, _ = check_against_reference(rewards, group_size=3, scale=scale)
        assert (adv[:3] == 0).all()


def test_empty_batch():
    rewards = torch.empty(0, device=DEVICE)
    adv, stats = triton_group_advantages(rewards, group_size=4)
    assert adv.shape == (0,) and stats.mean.shape == (0,) and torch.isnan(stats.frac_zero_std)
    adv, stats = check_against_reference(rewards, group_offsets=torch.tensor([0, 0, 0], device=DEVICE))
    assert stats.zero_std.tolist() == [True, True]


def test_strided_inputs_and_mask_dtypes():
    base = make_rewards([4] * 7, k=3, seed=9)  # (28, 3)
    rewards_t = base.t().contiguous().t()  # (28, 3) with strides (1, 28)
    assert not rewards_t.is_contiguous()
    weights = torch.tensor([1.0, 0.0, 2.0, 0.0, -1.0, 0.0], device=DEVICE)[::2]  # stride 2
    keep_wide = torch.tensor([1, 1, 0, 1] * 14, dtype=torch.int32, device=DEVICE)[::2]  # stride 2, int
    check_against_reference(rewards_t, group_size=4, reward_weights=weights, keep_mask=keep_wide)
    column = make_rewards([4] * 7, k=2, seed=10)[:, 1]  # 1-D with stride 2
    check_against_reference(column, group_size=4, keep_mask=keep_wide.to(torch.float32) * 0.5)


def test_all_nan_row_of_multiple_rewards_is_unscored():
    nan = float("nan")
    rewards = torch.tensor([[1.0, nan], [nan, nan], [nan, 2.0], [0.5, 0.5]], device=DEVICE)
    adv, stats = check_against_reference(rewards, group_size=4, reward_weights=torch.tensor([2.0, 1.0], device=DEVICE))
    assert torch.isnan(stats.rewards[1]) and stats.rewards[[0, 2, 3]].tolist() == [2.0, 2.0, 1.5]
    assert stats.count.tolist() == [3] and adv[1].item() == 0.0


def test_cpu_tensor_outside_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="rewards must be a CUDA tensor"):
        triton_group_advantages(torch.zeros(4), group_size=2)


def test_rewards_carry_no_gradient():
    rewards = make_rewards([4] * 3, seed=8, nan_frac=0.0).requires_grad_()
    adv, _ = triton_group_advantages(rewards, group_size=4)
    with pytest.raises(RuntimeError):  # no autograd formula is registered for the op
        adv.sum().backward()


# --------------------------------------------------------------------------------------
# Through the public API, and against TRL's own nanstd.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_public_api_backend_triton(scale):
    sizes = VARIABLE_SIZES
    rewards = make_rewards(sizes, k=2, seed=21)
    kwargs = dict(group_ids=shuffled_ids(sizes, seed=21), reward_weights=torch.tensor([1.0, 0.25], device=DEVICE),
                  keep_mask=random_keep(rewards.shape[0], seed=21), scale=scale, unbiased=scale != "none", eps=1e-6)
    adv, stats = gf.group_advantages(rewards, backend="triton", **kwargs)
    ref_adv, ref_stats = gf.group_advantages(rewards, backend="reference", **kwargs)
    true_adv, true_stats = truth_group_advantages(rewards, **kwargs)
    assert_close_to_truth(adv, true_adv, ref_adv, ulps=ULPS, what="advantages")
    assert_close_to_truth(stats.std, true_stats.std, ref_stats.std, ulps=ULPS, what="std")
    assert torch.equal(stats.zero_std, ref_stats.zero_std) and torch.equal(stats.group_index, ref_stats.group_index)
    with pytest.raises(ValueError, match="scale"):
        gf.group_advantages(rewards, group_size=7, scale="sequence", backend="triton")
    with pytest.raises(ValueError, match="group_size"):
        gf.group_advantages(rewards, group_size=5, backend="triton")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_to_trl_nanstd(scale):
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="TRL is part of the test extra")
    G = 8
    rewards = torch.randn(6 * G, generator=torch.Generator().manual_seed(31), dtype=torch.float64).to(DEVICE)
    rewards[G:2 * G] = 1.0  # a zero-std group
    adv, stats = triton_group_advantages(rewards, group_size=G, scale=scale)
    # TRL 1.16 GRPOTrainer: group nanmean, nanstd per group (or over the batch), eps 1e-4.
    grouped = rewards.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
    if scale == "batch":
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    else:
        std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(G)
    expected = rewards - mean if scale == "none" else (rewards - mean) / (std + 1e-4)
    # TRL's nanstd forms its Bessel factor count / (count - 1) from int64 counts, i.e. in
    # float32 (relative error ~3e-8), hence not a float64 tolerance.
    torch.testing.assert_close(adv, expected, rtol=1e-7, atol=1e-7)
    if scale != "batch":
        trl_zero = torch.isclose(std, torch.zeros_like(std)).double().mean()
        torch.testing.assert_close(stats.frac_zero_std, trl_zero, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------
# CUDA only: large shapes, and a new eps does not recompile.
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_CUDA, reason="large shapes need a CUDA GPU (too slow under the interpreter)")
@pytest.mark.parametrize("layout", ["size", "offsets", "ids_unsorted"])
def test_large_cuda(layout):
    if layout == "size":
        sizes = [16] * (1 << 16)
    else:
        g = torch.Generator().manual_seed(7)
        sizes = (torch.randint(1, 64, (20000,), generator=g).tolist() + [4096, 1, 2, 7, 64, 10_000])
    rewards = make_rewards(sizes, seed=41)
    kwargs = layout_kwargs(layout, rewards.shape[0], sizes)
    for scale in ("group", "batch"):
        check_against_reference(rewards, scale=scale, keep_mask=random_keep(rewards.shape[0]), **kwargs)


@pytest.mark.skipif(not ON_CUDA, reason="the compile cache exists only on a GPU")
def test_new_eps_does_not_recompile():
    rewards = make_rewards([8] * 64, seed=51)
    triton_group_advantages(rewards, group_size=8, eps=1e-4)
    caches = ga._group_advantages_kernel.device_caches  # device -> (kernel cache, ...)
    before = sum(len(c[0]) for c in caches.values())
    triton_group_advantages(rewards, group_size=8, eps=1e-6)
    triton_group_advantages(rewards, group_size=8, eps=0.5)
    assert before >= 1 and sum(len(c[0]) for c in caches.values()) == before


@pytest.mark.skipif(not ON_CUDA, reason="torch.compile cannot trace a Triton op on CPU tensors (interpreter)")
@pytest.mark.parametrize("layout", ["size", "offsets"])
def test_torch_compile_fullgraph(layout):
    sizes = [8] * 40 if layout == "size" else VARIABLE_SIZES * 3
    rewards = make_rewards(sizes, k=2, seed=61)
    kwargs = layout_kwargs(layout, rewards.shape[0], sizes)
    weights = torch.tensor([1.0, 0.5], device=DEVICE)
    keep = random_keep(rewards.shape[0], seed=61)

    def fn(r):
        adv, stats = triton_group_advantages(r, reward_weights=weights, keep_mask=keep, scale="batch", **kwargs)
        return adv, stats.std, stats.zero_std, stats.frac_zero_std

    compiled = torch.compile(fn, fullgraph=True)
    options = dict(reward_weights=weights, keep_mask=keep, scale="batch", **kwargs)
    eager_adv, eager_stats = reference.group_advantages(rewards, **options)
    true_adv, true_stats = truth_group_advantages(rewards, **options)
    eager = (eager_adv, eager_stats.std, eager_stats.zero_std, eager_stats.frac_zero_std)
    truth = (true_adv, true_stats.std, true_stats.zero_std, true_stats.frac_zero_std)
    for name, got, want, t, e in zip(("advantages", "std", "zero_std", "frac_zero_std"), compiled(rewards),
                                     fn(rewards), truth, eager):
        if got.dtype == torch.bool:
            assert torch.equal(got, want), name
        else:  # the compiled step answers to the same rule as the kernel called eagerly
            assert_close_to_truth(got, t, e, ulps=ULPS, what=f"compiled {name}")
