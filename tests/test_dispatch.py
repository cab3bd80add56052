"""Backend selection: auto picks the device's fused backend, falls back to the reference with one
warning, and an explicitly named backend that cannot run raises instead of falling back."""

import types
import warnings

import pytest
import torch

import grpo_fused as gf
from grpo_fused import _dispatch, reference


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
    assert calls and isinstance(calls[0]["config"], gf.GRPOConfig)


def test_missing_op_is_reported(monkeypatch):
    real = _dispatch._module
    stub = types.SimpleNamespace(availability=lambda device: None)
    monkeypatch.setattr(_dispatch, "_module", lambda name: stub if name == "cpp" else real(name))
    logits, ids, adv = _args()
    with pytest.raises(RuntimeError, match="does not implement grpo_loss yet"):
        gf.grpo_loss(logits, ids, adv, backend="cpp")
