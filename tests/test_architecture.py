"""The architecture's promises, checked: what each layer may import, and hyperparameters as data.

* ``kernels/`` imports nothing of the package but the neutral semantics layer, and the semantics
  layer imports nothing of the package at all (it is the bottom layer).
* A ``torch.compile(fullgraph=True)`` training step that calls the public losses with a new
  :class:`grpo_fused.GRPOConfig` differing only in float hyperparameters compiles once and gives
  the values of the new config (the floats travel as ``config.params.values``, a tensor). The C++
  ops do the same for new sampling numbers (``top_k`` / ``top_p`` / ``min_p``), which travel there
  too; only the tie rule and which stages exist select code.
"""

from __future__ import annotations

import ast
import os

import pytest
import torch

import grpo_fused as gf
from grpo_fused import _dispatch

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _package_imports(path):
    """Modules a file imports from the ``grpo_fused`` package (absolute names; relative ones resolved
    against the file's own package ``prefix``)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(("." * node.level) + (node.module or ""))
    return names


def _files(folder):
    return sorted(os.path.join(ROOT, folder, f) for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py"))


@pytest.mark.parametrize("path", _files("kernels"), ids=os.path.basename)
def test_kernels_import_only_the_semantics_layer(path):
    for name in _package_imports(path):
        if name.startswith("grpo_fused"):
            assert name == "grpo_fused.semantics" or name.startswith("grpo_fused.semantics."), (
                f"{os.path.basename(path)} imports {name}: kernels/ may read only grpo_fused.semantics")
        elif name.startswith("."):
            assert not name.startswith(".."), f"{os.path.basename(path)} imports {name} from above kernels/"


@pytest.mark.parametrize("path", _files(os.path.join("grpo_fused", "semantics")), ids=os.path.basename)
def test_semantics_layer_imports_nothing_above_it(path):
    for name in _package_imports(path):
        assert not name.startswith("grpo_fused") and not name.startswith(".."), (
            f"semantics/{os.path.basename(path)} imports {name}: the semantics layer is the bottom layer")


def _cpp_reason():
    return _dispatch._unavailable_reason("cpp", "grpo_loss", torch.device("cpu"))


# Five configs of one loss type and options, differing in every float hyperparameter.
FLOAT_SCHEDULE = [
    dict(beta=0.04, temperature=1.0, epsilon_low=0.2, epsilon_high=0.28, delta=2.0, entropy_coef=0.01),
    dict(beta=0.10, temperature=0.7, epsilon_low=0.1, epsilon_high=0.18, delta=2.5, entropy_coef=0.02),
    dict(beta=0.30, temperature=1.3, epsilon_low=0.25, epsilon_high=0.33, delta=3.0, entropy_coef=0.03),
    dict(beta=0.02, temperature=0.9, epsilon_low=0.3, epsilon_high=0.38, delta=1.5, entropy_coef=0.04),
    dict(beta=0.50, temperature=1.1, epsilon_low=0.15, epsilon_high=0.23, delta=4.0, entropy_coef=0.05),
]


def _step_inputs(path):
    """``(ids, adv, mask, old, ref, feature, weight)`` of a tiny loss call; ``feature`` is the logits
    ``(B, T, V)`` or the hidden states ``(B, T, H)`` of ``path``."""
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 2, 5, 33, 8
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    old = torch.randn(B, T, generator=g) * 0.1 - 3
    feature = torch.randn(B, T, H if path == "linear" else V, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    return ids, adv, mask, old, old + 0.1, feature, weight


@pytest.mark.skipif(_cpp_reason() is not None, reason=f"the C++ extension is not available: {_cpp_reason()}")
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_new_float_hyperparameters_compile_once(path):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    ids, adv, mask, old, ref, feature, weight = _step_inputs(path)

    def loss(x, config, backend):
        if path == "linear":
            return gf.linear_grpo_loss(x, weight, ids, adv, mask, old, ref, config=config, backend=backend).loss
        return gf.grpo_loss(x, ids, adv, mask, old, ref, config=config, backend=backend).loss

    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda x, config: loss(x, config, "cpp"), fullgraph=True, backend=counter)
    for floats in FLOAT_SCHEDULE:
        config = gf.GRPOConfig(loss_type="dapo", **floats)
        x = feature.clone().requires_grad_()
        got = step(x, config)
        got.backward()
        y = feature.clone().requires_grad_()
        want = loss(y, config, "reference")
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for {len(FLOAT_SCHEDULE)} float-only changes"


# Five sampling rules of one tie rule, every stage on, each number new.
SAMPLING_SCHEDULE = [
    dict(top_k=8, top_p=0.9, min_p=0.05, temperature=1.0),
    dict(top_k=5, top_p=0.8, min_p=0.1, temperature=0.7),
    dict(top_k=12, top_p=0.95, min_p=0.02, temperature=1.3),
    dict(top_k=3, top_p=0.6, min_p=0.2, temperature=0.9),
    dict(top_k=20, top_p=0.99, min_p=0.01, temperature=1.1),
]


@pytest.mark.skipif(_cpp_reason() is not None, reason=f"the C++ extension is not available: {_cpp_reason()}")
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_new_sampling_numbers_compile_once(path):
    """The C++ backend's losses under a sampling rule, compiled with the config's params as input: a
    new top_k / top_p / min_p is new data (the params' TOP_K / TOP_P / LOG_MIN_P slots), one graph.
    (The step takes ``config.params`` rather than the config: tracing ``GRPOConfig.sampling`` checks
    the rule's numbers with Python math, a graph break under fullgraph=True.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    from grpo_fused.backends import cpp as cpp_backend
    from grpo_fused.semantics import LossBatch

    torch._dynamo.reset()
    _, adv, mask, old, ref, feature, weight = _step_inputs(path)
    B, T = adv.shape[0], mask.shape[1]
    # ids among each position's top 3, so that most stay inside the support
    logits = feature @ weight.T if path == "linear" else feature
    ranks = (torch.arange(T) % 3).expand(B, T).unsqueeze(-1)
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices.gather(-1, ranks).squeeze(-1)

    def cpp_loss(x, params):
        batch = LossBatch(ids, adv, mask, old, ref)
        if path == "linear":
            return cpp_backend.linear_grpo_loss(x, weight, None, batch, params).loss
        return cpp_backend.grpo_loss(x, batch, params).loss

    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(cpp_loss, fullgraph=True, backend=counter)
    for numbers in SAMPLING_SCHEDULE:
        config = gf.GRPOConfig(loss_type="dapo", beta=0.04, **numbers)
        x = feature.clone().requires_grad_()
        got = step(x, config.params)
        got.backward()
        y = feature.clone().requires_grad_()
        if path == "linear":
            want = gf.linear_grpo_loss(y, weight, ids, adv, mask, old, ref, config=config, backend="reference").loss
        else:
            want = gf.grpo_loss(y, ids, adv, mask, old, ref, config=config, backend="reference").loss
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for {len(SAMPLING_SCHEDULE)} sampling rules"
