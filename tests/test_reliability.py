"""Nothing at a masked position reaches the loss, and every bad input gets a clear error.

Each test here pins one rule of the README's Semantics section on every backend that can run on
this machine (the reference, the C++ extension, Triton under the interpreter on CPU tensors):
masked positions are selected out, in-place gradients refuse overlapping memory, ids are read
only where masked in, normalizers are finite, empty batches give a zero loss with a zero
gradient, non-finite values at masked-in positions propagate the same way everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

import grpo_fused as gf
from grpo_fused import _validation

from conftest import fused_backends

BACKENDS = [pytest.param("reference")] + fused_backends("grpo_loss")
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "gmpo", "gpg"]


def _batch(B=3, T=5, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    logps = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (logps + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (logps + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=g)
    is_weights = torch.rand(B, T, generator=g) + 0.5
    return dict(logits=logits, ids=ids, mask=mask, old=old, ref=ref, adv=adv, is_weights=is_weights)


def _loss(b, backend, config, **overrides):
    x = b["logits"].clone().requires_grad_()
    out = gf.grpo_loss(x, b["ids"], overrides.get("adv", b["adv"]), b["mask"], overrides.get("old", b["old"]),
                       overrides.get("ref", b["ref"]), config=config, is_weights=overrides.get("is_weights", b["is_weights"]),
                       backend=backend)
    out.loss.backward()
    return out, x.grad


def _poison(b, value):
    """The batch with ``value`` at every masked position of every per-token input, and TRL's padding:
    ``ref_logps = 0`` against a padding logit of -200 (``exp(200)`` overflows fp32)."""
    masked = ~b["mask"]
    poisoned = dict(b)
    for key in ("old", "adv", "is_weights"):
        poisoned[key] = torch.where(masked, torch.full_like(b[key], value), b[key])
    poisoned["ref"] = torch.where(masked, torch.zeros_like(b["ref"]), b["ref"])
    logits = b["logits"].clone()
    logits[masked] = -200.0
    logits[masked, 0] = 0.0  # the pad token: the padding positions' id below
    poisoned["logits"] = logits
    poisoned["ids"] = torch.where(masked, torch.ones_like(b["ids"]), b["ids"])
    return poisoned


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e30])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "gmpo", "cispo"])
def test_masked_positions_cannot_poison_the_loss(backend, value, loss_type):
    b = _batch()
    config = gf.GRPOConfig(loss_type=loss_type, beta=0.04, entropy_coef=0.01,
                           importance_sampling_level="sequence" if loss_type == "grpo" else "token")
    clean, clean_grad = _loss(b, backend, config)
    out, grad = _loss(_poison(b, value), backend, config)
    assert torch.isfinite(out.loss), f"loss {out.loss}"
    torch.testing.assert_close(out.loss, clean.loss, rtol=1e-5, atol=1e-6)
    for name, metric in out.metrics.items():
        if not name.endswith(("_min", "_max")):  # nanmin / nanmax over sequences may be NaN by design
            torch.testing.assert_close(metric, clean.metrics[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.isfinite(grad).all()
    assert (grad[~b["mask"]] == 0).all(), "a masked row received a gradient"
    torch.testing.assert_close(grad[b["mask"]], clean_grad[b["mask"]], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_row_at_a_masked_position(backend):
    b = _batch()
    config = gf.GRPOConfig(loss_type="dapo", beta=0.04)
    clean, _ = _loss(b, backend, config)
    b["logits"][~b["mask"]] = float("nan")
    out, grad = _loss(b, backend, config)
    torch.testing.assert_close(out.loss, clean.loss, rtol=1e-5, atol=1e-6)
    assert (grad[~b["mask"]] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_masked_in_row_gives_nan(backend):
    # A non-target logit of a masked-in row: PyTorch's log_softmax gives NaN; so must every backend.
    b = _batch()
    target = int(b["ids"][1, 2])
    b["logits"][1, 2, (target + 1) % 11] = float("nan")
    out, _ = _loss(b, backend, gf.GRPOConfig())
    assert math.isnan(out.loss.item())


@pytest.mark.parametrize("backend", fused_backends("grpo_loss"))
def test_inplace_backward_refuses_overlapping_memory(backend):
    row = torch.randn(1, 1, 11, requires_grad=True)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="inplace_backward"):
        gf.grpo_loss(row.expand(2, 3, 11), ids, torch.randn(2), inplace_backward=True, backend=backend)
    squeezed = torch.randn(200).as_strided((2, 3, 11), (33, 5, 1))  # rows 5 apart, 11 long
    with pytest.raises(ValueError, match="inplace_backward"):
        gf.grpo_loss(squeezed, ids, torch.randn(2), inplace_backward=True, backend=backend)
    # A slice with a batch stride (TRL's logits[:, :-1]) shares nothing: accepted.
    sliced = torch.randn(2, 4, 11)[:, :-1]
    gf.grpo_loss(sliced, ids, torch.randn(2), inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_ids_at_masked_positions_are_never_read(backend):
    b = _batch()
    clean, clean_grad = _loss(b, backend, gf.GRPOConfig())
    b["ids"] = torch.where(b["mask"], b["ids"], torch.full_like(b["ids"], -100))
    out, grad = _loss(b, backend, gf.GRPOConfig())
    torch.testing.assert_close(out.loss, clean.loss)
    torch.testing.assert_close(grad, clean_grad)


def test_masked_in_ids_are_still_checked():
    b = _batch()
    b["ids"][1, 1] = 11
    with pytest.raises(ValueError, match=r"completion_ids must lie in \[0, 11\) .* masked-in position, found 11"):
        _loss(b, "reference", gf.GRPOConfig())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_ids_with_the_check_off_never_read_out_of_bounds(backend, monkeypatch):
    monkeypatch.setattr(_validation, "CHECK_IDS", False)
    b = _batch()
    b["ids"][1, 1] = -100
    try:
        out, _ = _loss(b, backend, gf.GRPOConfig())
    except (RuntimeError, IndexError) as exc:  # a clear error is fine; a silent wrong read is not
        assert "ids" in str(exc) or "index" in str(exc)
    else:
        assert not torch.isfinite(out.logps[1, 1]) or out.logps[1, 1] == float("-inf")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0, -3.0, True, "10"])
@pytest.mark.parametrize("name", ["num_items_in_batch", "global_batch_size"])
def test_python_normalizers_must_be_finite_and_positive(name, value):
    b = _batch()
    with pytest.raises((ValueError, TypeError), match=name):
        gf.grpo_loss(b["logits"], b["ids"], b["adv"], b["mask"], config=gf.GRPOConfig(), **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_normalizers_are_clamped_not_read(backend):
    b = _batch()
    config = gf.GRPOConfig(loss_type="dapo")

    def loss(n):
        return gf.grpo_loss(b["logits"], b["ids"], b["adv"], b["mask"], b["old"], config=config,
                            num_items_in_batch=n, backend=backend).loss

    torch.testing.assert_close(loss(torch.tensor(0.0)), loss(1.0))
    torch.testing.assert_close(loss(torch.tensor(-5.0)), loss(1.0))
    assert math.isnan(loss(torch.tensor(float("nan"))).item())
    assert loss(torch.tensor(float("inf"))).item() == 0.0


@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(compute_entropy="False"), TypeError, "compute_entropy must be a bool"),
    (dict(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl must be a bool"),
    (dict(cispo_two_sided=None), TypeError, "cispo_two_sided must be a bool"),
    (dict(max_completion_length=True), TypeError, "max_completion_length must be an int"),
    (dict(max_completion_length=2.0), TypeError, "max_completion_length must be an int"),
    (dict(dp_size=0), ValueError, "dp_size must be >= 1"),
    (dict(beta=-0.1), ValueError, "beta must be >= 0"),
    (dict(epsilon_low="0.2"), TypeError, "epsilon_low must be a float"),
    (dict(epsilon_high=float("nan")), ValueError, "epsilon_high must be finite"),
    (dict(delta=0.0), ValueError, "delta must be > 0"),
    (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c must be > 1"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg must be > 0"),
    (dict(entropy_coef=float("nan")), ValueError, "entropy_coef must be finite"),
    (dict(loss_type=3), TypeError, "loss_type must be a str"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level must be one of"),
    (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode must be one of"),
])
def test_config_checks_every_field(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        gf.GRPOConfig(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_empty_batches_give_zero_loss_and_zero_gradient(backend, loss_type, shape):
    B, T = shape
    x = torch.randn(B, T, 7, requires_grad=True)
    out = gf.grpo_loss(x, torch.zeros(B, T, dtype=torch.long), torch.randn(B), config=gf.GRPOConfig(loss_type=loss_type),
                       backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert x.grad.shape == x.shape and (x.grad == 0).all()


@pytest.mark.parametrize("backend", [pytest.param("reference")] + fused_backends("linear_grpo_loss"))
def test_linear_path_with_zero_hidden_size(backend):
    # H = 0: every logit is the bias, a defined loss; the weight gradient is (V, 0).
    bias = torch.randn(5)
    ids, adv = torch.tensor([[1, 2, 3]]), torch.tensor([1.0])
    w = torch.randn(5, 0, requires_grad=True)
    out = gf.linear_grpo_loss(torch.randn(1, 3, 0), w, ids, adv, bias=bias, backend=backend)
    want = gf.grpo_loss(bias.expand(1, 3, 5), ids, adv, backend="reference")
    torch.testing.assert_close(out.loss, want.loss)
    out.loss.backward()
    assert w.grad.shape == (5, 0)


def test_empty_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="logits must have a vocab dim V >= 1"):
        gf.grpo_loss(torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.long), torch.randn(2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32, torch.int64])
def test_every_integer_id_dtype(backend, dtype):
    b = _batch()
    want, want_grad = _loss(b, "reference", gf.GRPOConfig())
    b["ids"] = b["ids"].to(dtype)
    out, grad = _loss(b, backend, gf.GRPOConfig())
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", [pytest.param("reference")] + fused_backends("group_advantages"))
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_of_huge_rewards(backend, scale):
    rewards = torch.tensor([1e30, 3e30, 2e30, 5e30])
    adv, stats = gf.group_advantages(rewards, group_size=2, scale=scale, backend=backend)
    want, want_stats = gf.group_advantages(rewards.double(), group_size=2, scale=scale, backend="reference")
    assert torch.isfinite(adv).all() and torch.isfinite(stats.std).all()
    torch.testing.assert_close(adv.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.std.double(), want_stats.std, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpg_ratio_metric_does_not_read_old_logps(backend):
    b = _batch()
    b["old"] = torch.full_like(b["old"], float("nan"))
    out, _ = _loss(b, backend, gf.GRPOConfig(loss_type="gpg"))
    assert out.metrics["ratio"].item() == 1.0 and torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_sapo_temperatures_at_fp64_precision(backend):
    b = {k: v.double() if v.is_floating_point() else v for k, v in _batch(dtype=torch.float64).items()}
    config = gf.GRPOConfig(loss_type="sapo", sapo_temperature_neg=1.05)
    want, want_grad = _loss(b, "reference", config)
    out, grad = _loss(b, backend, config)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("grpo_loss"))
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_outputs_are_zero_at_masked_positions(backend, path):
    # What stands at a masked position is padding: every backend shows 0 there, whatever the id.
    g = torch.Generator().manual_seed(5)
    B, T, V, H = 2, 4, 11, 6
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[~mask] = -100
    adv = torch.randn(B, generator=g)
    if path == "logits":
        out = gf.grpo_loss(torch.randn(B, T, V, generator=g), ids, adv, mask, backend=backend)
    else:
        out = gf.linear_grpo_loss(torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g), ids, adv, mask,
                                  backend=backend)
    for name in ("logps", "entropy"):
        shown = getattr(out, name)
        assert bool((shown[~mask] == 0).all()), name
        assert bool((shown[mask] != 0).all()), name
