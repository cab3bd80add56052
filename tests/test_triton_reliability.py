"""Reliability of the Triton kernels through the public API (``backend="triton"``), each rule
pinned by a test that failed before the kernels enforced it.

* An id outside ``[0, V)`` at a masked-in position (the API's id check off) is never loaded: its
  target logit counts as -inf, so its log-prob is exactly -inf, on every path (the vocab op, the
  fused loss, both linear strategies). Before, the unmasked target load read a neighbouring row.
* A NaN logit of a masked-in row gives a NaN log-prob, entropy and loss (the spec's log_softmax),
  and a NaN old log-prob a NaN loss. Before, the online max (``z > m``) and the epilogue's min /
  max dropped the NaN.
* Nothing at a masked position reaches the loss or a gradient: NaN / inf logits rows there give the
  clean loss and exact-zero gradient rows, in place too. Masked rows are not read in forward
  (their log-prob and entropy are 0, whatever the row holds), and a row with no incoming gradient
  is written as zeros without being read.
* The loss types without a fused epilogue run the tail; a linear path with H = 0 is defined.

Shapes are small (the interpreter runs every kernel here): V = 37, a ragged single tile; the
multi-tile and large-shape paths are tests/test_triton_logits.py's.
"""

from __future__ import annotations

import math

import pytest
import torch

import grpo_fused as gf
from grpo_fused import _validation
from grpo_fused.backends import triton as triton_backend
from grpo_fused.semantics import vocab_values

from conftest import DEVICE, has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

V = 37


def _batch(B=2, T=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1, 3] = False
    logps = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    old = logps + 0.2 * torch.randn(B, T, generator=g)
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(logits=to(logits), ids=to(ids), mask=to(mask), old=to(old), ref=to(ref), adv=to(adv))


def _loss(b, config, backend="triton", inplace=False, **override):
    x = override.get("logits", b["logits"]).clone().requires_grad_()
    out = gf.grpo_loss(x, override.get("ids", b["ids"]), b["adv"], b["mask"], override.get("old", b["old"]), b["ref"],
                       config=config, inplace_backward=inplace, backend=backend)
    out.loss.backward()
    return out, x.grad


TOKEN = gf.GRPOConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
SEQUENCE = gf.GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, entropy_coef=0.01)


# --------------------------------------------------------------------------------------
# Ids outside the vocabulary (the API's check off).
# --------------------------------------------------------------------------------------


@pytest.fixture
def ids_unchecked(monkeypatch):
    monkeypatch.setattr(_validation, "CHECK_IDS", False)


@pytest.mark.parametrize("bad", [-100, -1, V, V + 5])
def test_out_of_vocab_id_has_logp_minus_inf_in_the_vocab_op(ids_unchecked, bad):
    b = _batch()
    ids = b["ids"].clone()
    ids[1, 1] = bad
    x = b["logits"].clone().requires_grad_()
    logps, entropy = gf.selective_log_softmax(x, ids, compute_entropy=True, backend="triton")
    assert logps[1, 1].item() == float("-inf")
    good = torch.ones_like(ids, dtype=torch.bool)
    good[1, 1] = False
    want, want_entropy = gf.selective_log_softmax(b["logits"], b["ids"], compute_entropy=True, backend="reference")
    torch.testing.assert_close(logps[good], want[good])
    torch.testing.assert_close(entropy, want_entropy)  # the entropy does not involve the id
    # The gradient of a -inf log-prob's row: -p (no one-hot column), finite.
    logps[good].sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("config", [TOKEN, SEQUENCE], ids=["token", "sequence"])
def test_out_of_vocab_id_at_a_masked_in_position_gives_logp_minus_inf(ids_unchecked, config):
    b = _batch()
    ids = b["ids"].clone()
    ids[1, 1] = -100  # masked in
    out, _ = _loss(b, config, ids=ids)
    assert out.logps[1, 1].item() == float("-inf")
    keep = b["mask"].clone()
    keep[1, 1] = False
    want, _ = _loss(b, config, backend="reference")
    torch.testing.assert_close(out.logps[keep], want.logps[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["chunked", "tiled"])
def test_out_of_vocab_id_in_the_linear_paths(ids_unchecked, strategy):
    g = torch.Generator().manual_seed(3)
    H = 16
    hidden = torch.randn(2, 4, H, generator=g).to(DEVICE)
    weight = torch.randn(V, H, generator=g).to(DEVICE)
    ids = torch.randint(0, V, (2, 4), generator=g).to(DEVICE)
    ids[0, 1], ids[1, 2] = -7, V + 3
    logps, _ = gf.linear_log_softmax(hidden, weight, ids, strategy=strategy, backend="triton")
    assert logps[0, 1].item() == float("-inf") and logps[1, 2].item() == float("-inf")
    fine = torch.ones_like(ids, dtype=torch.bool)
    fine[0, 1] = fine[1, 2] = False
    want, _ = gf.linear_log_softmax(hidden, weight, ids.clamp(0, V - 1), backend="reference")
    torch.testing.assert_close(logps[fine], want[fine], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Non-finite values at masked-in positions propagate.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TOKEN, SEQUENCE, gf.GRPOConfig(loss_type="cispo")],
                         ids=["token", "sequence", "cispo"])
def test_nan_in_a_non_target_logit_gives_nan(config):
    b = _batch()
    logits = b["logits"].clone()
    target = int(b["ids"][1, 1])
    logits[1, 1, (target + 5) % V] = float("nan")
    out, _ = _loss(b, config, logits=logits)
    assert math.isnan(out.logps[1, 1].item())
    assert out.entropy is not None and math.isnan(out.entropy[1, 1].item())
    assert math.isnan(out.loss.item())


def test_nan_logit_in_the_vocab_op_gives_nan_logp_and_entropy():
    b = _batch()
    logits = b["logits"].clone()
    logits[0, 0, (int(b["ids"][0, 0]) + 1) % V] = float("nan")
    logps, entropy = gf.selective_log_softmax(logits, b["ids"], compute_entropy=True, backend="triton")
    assert math.isnan(logps[0, 0].item()) and math.isnan(entropy[0, 0].item())
    assert torch.isfinite(logps.view(-1)[1:]).all()


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo"])
def test_nan_old_logp_at_a_masked_in_position_gives_nan_loss(loss_type):
    # min / max / clamp drop NaN on the GPU (IEEE minNum); torch.clamp keeps it.
    b = _batch()
    old = b["old"].clone()
    old[0, 1] = float("nan")
    config = gf.GRPOConfig(loss_type=loss_type)
    out, _ = _loss(b, config, old=old)
    want, _ = _loss(b, config, backend="reference", old=old)
    assert math.isnan(want.loss.item()) and math.isnan(out.loss.item())


# --------------------------------------------------------------------------------------
# Masked positions: never read in forward, never reached by a gradient.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False], ids=["skip-masked-rows", "read-masked-rows"])
@pytest.mark.parametrize("config", [TOKEN, SEQUENCE], ids=["token", "sequence"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_rows_at_masked_positions(monkeypatch, skip, config, value):
    monkeypatch.setattr(triton_backend, "SKIP_MASKED_ROWS", skip)
    b = _batch(dtype=torch.bfloat16)
    clean, clean_grad = _loss(b, config)
    logits = b["logits"].clone()
    logits[~b["mask"]] = value
    out, grad = _loss(b, config, logits=logits)
    torch.testing.assert_close(out.loss, clean.loss)
    assert (grad[~b["mask"]] == 0).all() and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(grad, clean_grad)
    for name, metric in out.metrics.items():
        torch.testing.assert_close(metric, clean.metrics[name], equal_nan=True, msg=name)
    if skip:
        # Not read: the row's content cannot show in its outputs.
        assert (out.logps[~b["mask"]] == 0).all() and (out.entropy[~b["mask"]] == 0).all()


def test_masked_rows_in_place_backward_are_zero():
    b = _batch(dtype=torch.bfloat16)
    logits = b["logits"].clone()
    logits[~b["mask"]] = float("nan")
    x = logits.clone().requires_grad_()
    out = gf.grpo_loss(x, b["ids"], b["adv"], b["mask"], b["old"], b["ref"], config=TOKEN, inplace_backward=True,
                       backend="triton")
    out.loss.backward()
    _, want = _loss(b, TOKEN)
    assert torch.isfinite(x.grad.float()).all() and (x.grad[~b["mask"]] == 0).all()
    torch.testing.assert_close(x.grad, want)


def test_vocab_op_row_mask_reads_nothing_and_passes_no_gradient():
    from grpo_fused.kernels import selective_log_softmax as sls

    b = _batch()
    logits = b["logits"].clone()
    logits[~b["mask"]] = float("nan")
    x = logits.clone().requires_grad_()
    params = vocab_values(0.8).to(DEVICE)
    logps, entropy = sls.selective_log_softmax(x, b["ids"], params, True, row_mask=b["mask"])
    assert (logps[~b["mask"]] == 0).all() and (entropy[~b["mask"]] == 0).all()
    (logps.sum() + entropy.sum()).backward()
    assert (x.grad[~b["mask"]] == 0).all() and torch.isfinite(x.grad).all()
    want, want_entropy = sls.selective_log_softmax(b["logits"], b["ids"], params, True)
    torch.testing.assert_close(logps[b["mask"]], want[b["mask"]])
    torch.testing.assert_close(entropy[b["mask"]], want_entropy[b["mask"]])


def test_backward_rows_without_gradient_are_zeros_whatever_they_hold():
    from grpo_fused.kernels import selective_log_softmax as sls

    logits = torch.randn(3, V, device=DEVICE)
    logits[1] = float("nan")
    ids = torch.tensor([0, 1, 2], device=DEVICE)
    params = vocab_values(1.0).to(DEVICE)
    logps, lse, entropy = sls.logits_fwd(logits, ids, params, True)
    dlogps = torch.tensor([1.0, 0.0, -0.5], device=DEVICE)
    dentropy = torch.tensor([0.3, 0.0, 0.0], device=DEVICE)
    dlogits = sls.logits_bwd(logits, ids, lse, dlogps, dentropy, entropy, params)
    assert (dlogits[1] == 0).all() and torch.isfinite(dlogits).all()
    # The bf16 gradient of fp32 logits (the chunked linear path's GEMM operand) in the same pass.
    low = sls.logits_bwd(logits, ids, lse, dlogps, dentropy, entropy, params, grad_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    # (Within one bf16 rounding: the interpreter's fp32 -> bf16 cast need not round to nearest.)
    torch.testing.assert_close(low.float(), dlogits, rtol=2.0**-7, atol=0)


# --------------------------------------------------------------------------------------
# Loss types and shapes the fused epilogue does not cover.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["dppo_tv", "dppo_kl", "dro", "gmpo"])
def test_tail_only_loss_types_match_the_reference(loss_type):
    extra = dict(dro_beta=0.1) if loss_type == "dro" else {}
    config = gf.GRPOConfig(loss_type=loss_type, **extra)
    b = _batch()
    out, grad = _loss(b, config)
    want, want_grad = _loss(b, config, backend="reference")
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["chunked", "tiled"])
def test_linear_path_with_zero_hidden_size(strategy):
    bias = torch.randn(5, device=DEVICE)
    ids, adv = torch.tensor([[1, 2, 3]], device=DEVICE), torch.tensor([1.0], device=DEVICE)
    w = torch.zeros(5, 0, device=DEVICE, requires_grad=True)
    out = gf.linear_grpo_loss(torch.randn(1, 3, 0, device=DEVICE), w, ids, adv, bias=bias, strategy=strategy,
                              backend="triton")
    want = gf.grpo_loss(bias.expand(1, 3, 5), ids, adv, backend="reference")
    torch.testing.assert_close(out.loss, want.loss)
    out.loss.backward()
    assert w.grad.shape == (5, 0)


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_tiled_entropy_gradient_is_finite_past_the_vocab(scale):
    # V = 37 leaves most of a logit tile past the vocab (z = -inf there) and a -inf bias column
    # masks one more: with an entropy gradient above 1, a floor of -3e38 overflowed to -inf and
    # 0 * -inf put NaN into every row of dhidden.
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 16, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(V, 16, generator=g).to(DEVICE).requires_grad_()
    bias = torch.zeros(V, device=DEVICE)
    bias[4] = float("-inf")
    ids = torch.randint(5, V, (2, 3), generator=g).to(DEVICE)
    logps, entropy = gf.linear_log_softmax(hidden, weight, ids, compute_entropy=True, bias=bias, strategy="tiled",
                                           backend="triton")
    (logps.sum() + scale * entropy.sum()).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want_logps, want_entropy = gf.linear_log_softmax(h64, w64, ids, compute_entropy=True, bias=bias.double(),
                                                     backend="reference")
    (want_logps.sum() + scale * want_entropy.sum()).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
