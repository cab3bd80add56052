"""Backend selection: auto picks the device's fused backend, falls back to the reference with one
warning, and an explicitly named backend that cannot run raises instead of falling back."""

import types
import warnings

import pytest
import torch

import grpo_fused as gf
from grpo_fused import _dispatch, reference

from tolerance import ULPS_GRAD, ULPS_LOSS, ULPS_VALUE, assert_close_to_truth


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    # Choices are cached per (op, backend, device type); stubs must not leak into other tests.
    monkeypatch.setattr(_dispatch, "_chosen", {})
    monkeypatch.setattr(_dispatch, "_loaded", {})


@pytest.fixture
def unbuilt_cpp(monkeypatch):
    real = _dispatch._module
    stub = types.SimpleNamespace(availability=lambda device: "the C++ extension is not built (stub)")

    def fake(name):
        return stub if name == "cpp" else real(name)

    monkeypatch.setattr(_dispatch, "_module", fake)
    monkeypatch.setattr(_dispatch, "_warned", set())
    return stub


def _args():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 5, generator=g), torch.randint(0, 5, (2, 3), generator=g), torch.randn(2, generator=g)


def test_explicit_backend_that_cannot_run_raises(unbuilt_cpp):
    logits, ids, adv = _args()
    with pytest.raises(RuntimeError, match="backend='cpp' cannot run grpo_loss on cpu tensors: the C\\+\\+ extension is not built"):
        gf.grpo_loss(logits, ids, adv, backend="cpp")


def test_auto_falls_back_to_reference_with_one_warning(unbuilt_cpp):
    logits, ids, adv = _args()
    with pytest.warns(RuntimeWarning, match="using the eager reference"):
        out = gf.grpo_loss(logits, ids, adv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        again = gf.grpo_loss(logits, ids, adv)
    expected = reference.grpo_loss(logits, ids, adv)
    assert out.loss.item() == again.loss.item() == expected.loss.item()


def test_auto_uses_a_backend_that_implements_the_op(monkeypatch):
    real = _dispatch._module
    calls = []
    stub = types.SimpleNamespace(availability=lambda device: None, grpo_loss=lambda *a, **k: calls.append(k) or "stub")
    monkeypatch.setattr(_dispatch, "_module", lambda name: stub if name == "cpp" else real(name))
    logits, ids, adv = _args()
    assert gf.grpo_loss(logits, ids, adv) == "stub"
    assert calls and "inplace_backward" in calls[0]


def test_missing_op_is_reported(monkeypatch):
    real = _dispatch._module
    stub = types.SimpleNamespace(availability=lambda device: None)
    monkeypatch.setattr(_dispatch, "_module", lambda name: stub if name == "cpp" else real(name))
    logits, ids, adv = _args()
    with pytest.raises(RuntimeError, match="does not implement grpo_loss yet"):
        gf.grpo_loss(logits, ids, adv, backend="cpp")


def test_warns_once_per_backend_not_per_op(unbuilt_cpp):
    logits, ids, adv = _args()
    with pytest.warns(RuntimeWarning) as record:
        gf.grpo_loss(logits, ids, adv)
        gf.selective_log_softmax(logits, ids)
        gf.group_advantages(adv, 2)
    assert len([w for w in record if "grpo_fused" in str(w.message)]) == 1


def test_compile_fullgraph_through_the_public_api():
    # The backend choice is a trace-time constant: no graph break on imports or warnings.
    logits, ids, adv = _args()
    cfg = gf.GRPOConfig(loss_type="grpo", beta=0.0)

    def step(z, a):
        return gf.grpo_loss(z, ids, a, config=cfg).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z = logits.clone().requires_grad_(True)
    loss = compiled(z, adv)
    loss.backward()
    z_eager = logits.clone().requires_grad_(True)
    eager = reference.grpo_loss(z_eager, ids, adv, config=cfg).loss
    eager.backward()
    z_truth = logits.double().requires_grad_(True)
    truth = reference.grpo_loss(z_truth, ids, adv.double(), config=cfg).loss
    truth.backward()
    assert_close_to_truth(loss, truth, eager, ulps=ULPS_LOSS, what="compiled loss")
    assert_close_to_truth(z.grad, z_truth.grad, z_eager.grad, ulps=ULPS_GRAD, floor=0, what="compiled dlogits")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_linear_strategy_options_reach_the_fused_backend(backend):
    from grpo_fused._dispatch import _unavailable_reason

    reason = _unavailable_reason(backend, "linear_grpo_loss", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable here: {reason}")
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 16, generator=g)
    weight = torch.randn(33, 16, generator=g)
    ids = torch.randint(0, 33, (2, 5), generator=g)
    adv = torch.randn(2, generator=g)
    cfg = gf.GRPOConfig(loss_type="bnpo", beta=0.0)
    eager = reference.linear_grpo_loss(hidden, weight, ids, adv, config=cfg)
    truth = reference.linear_grpo_loss(hidden.double(), weight.double(), ids, adv.double(), config=cfg)
    # chunk_size=3 splits the 10 tokens into ragged chunks.
    out = gf.linear_grpo_loss(hidden, weight, ids, adv, config=cfg, strategy="chunked", chunk_size=3, backend=backend)
    # On policy the loss is -mean(advantages) whatever the log-probs: they are compared too.
    assert_close_to_truth(out.loss, truth.loss, eager.loss, ulps=ULPS_LOSS, what=f"{backend} chunked loss")
    assert_close_to_truth(out.logps, truth.logps, eager.logps, ulps=ULPS_VALUE, what=f"{backend} chunked logps")
    assert_close_to_truth(out.entropy, truth.entropy, eager.entropy, ulps=ULPS_VALUE, what=f"{backend} chunked entropy")


def test_linear_strategy_options_are_checked():
    hidden, weight = torch.randn(1, 2, 4), torch.randn(5, 4)
    ids, adv = torch.zeros(1, 2, dtype=torch.long), torch.ones(1)
    cases = [
        (dict(filter_eps=1e-3), "filter_eps (gradient filtering) applies to strategy='tiled' only"),
        (dict(strategy="tiled", chunk_size=4), "chunk_size applies to strategy='chunked'"),
        (dict(chunk_size=0), "chunk_size must be None or a positive int"),
        (dict(strategy="tiled", filter_eps=2.0), "filter_eps must be a number in (0, 1)"),
        (dict(chunk_size=4, backend="reference"), "chunk_size tunes a fused backend"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            gf.linear_grpo_loss(hidden, weight, ids, adv, **kwargs)
        assert message in str(info.value)
