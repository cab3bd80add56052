"""Run-time CPU dispatch of the C++ row kernels: every compiled variant against the baseline.

The extension carries the row kernels compiled once per instruction set (csrc/kernels_baseline.cpp,
kernels_avx2.cpp, kernels_avx512.cpp) and runs the widest the CPU has;
``GRPO_FUSED_CPU_CAPABILITY`` caps the choice and is read on every op call, so one process can
run the same inputs through each variant. A variant the CPU lacks is skipped.

What must agree, and how closely (eps = 2^-24, the float32 unit roundoff):

* exactly: the float64 path (one scalar copy, in the baseline, whatever the CPU), zero rows of the
  backward (masked tokens), gradients at -inf logits (exactly 0), and the 16-bit conversions;
* to a few ulps: everything else. The variants differ only in vector width (8 / 16 / 32 partial
  sums, so the sum of exponentials is added in another order) and in fused multiply-adds (AVX2 /
  AVX-512 round once where the baseline rounds twice). The sum's relative difference is a few eps,
  so lse, logp and the entropy differ by a few eps (1 + |lse|) (1 + |value|); a gradient element
  p_j (g + g_H (logp_j + H)) carries the same difference through exp(logp_j), so it may differ by
  8 eps (1 + |lse|) times the size of its terms, plus one ulp of the output dtype for bf16 / fp16
  (a value near a rounding boundary may round either way).
"""

import os

import pytest
import torch

from grpo_fused.backends import cpp as cpp_backend
from grpo_fused.semantics import vocab_values

ENV = "GRPO_FUSED_CPU_CAPABILITY"
EPS32 = 2.0**-24
# One ulp of each output dtype, relative (2^(1 - precision bits)) and absolute (the subnormal
# spacing): the step by which a value near a rounding boundary may round either way.
OUT_ULP = {torch.float32: (2.0**-23, 2.0**-149), torch.bfloat16: (2.0**-7, 2.0**-133),
           torch.float16: (2.0**-10, 2.0**-24)}


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    reason = cpp_backend.availability(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def _ops():
    return torch.ops.grpo_fused_cpp


def _capability(monkeypatch, name):
    if name is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, name)
    return _ops().cpu_capability()


@pytest.fixture(params=["avx2", "avx512"])
def variant(request, monkeypatch):
    """A vector variant this CPU runs (skipped otherwise)."""
    if _capability(monkeypatch, request.param) != request.param:
        pytest.skip(f"this CPU (or compiler) has no {request.param} variant")
    return request.param


def test_capability_names_and_the_cap(monkeypatch):
    best = _capability(monkeypatch, None)
    assert best in ("baseline", "avx2", "avx512")
    assert _capability(monkeypatch, "baseline") == "baseline"
    assert _capability(monkeypatch, "default") == "baseline"  # PyTorch's name for it
    assert _capability(monkeypatch, "") == best
    # A cap above what the CPU has gives what it has, never a crash.
    assert _capability(monkeypatch, "avx512") == best
    if best == "avx512":
        assert _capability(monkeypatch, "avx2") == "avx2"
    monkeypatch.setenv(ENV, "sse9")
    with pytest.raises(RuntimeError, match="GRPO_FUSED_CPU_CAPABILITY must be baseline, avx2 or avx512"):
        _ops().cpu_capability()
    with pytest.raises(RuntimeError, match="GRPO_FUSED_CPU_CAPABILITY"):
        _ops().logits_fwd(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), vocab_values(1.0), False)


def _inputs(rows, vocab, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.randint(0, vocab, (rows,), generator=g)
    if vocab > 40:
        logits[0, 3:40] = float("-inf")  # masked vocabulary inside a vector and across vectors
        ids[0] = 1
    if rows > 2 and vocab > 1:
        logits[2] *= 30  # large logits (bf16 / fp16 saturate less than this; the shift keeps exp finite)
    return logits, ids, g


def _run(monkeypatch, name, logits, ids, temperature, grads):
    """Forward and the two backwards (out of place, in place) under one variant."""
    monkeypatch.setenv(ENV, name)
    assert _ops().cpu_capability() == name
    params = vocab_values(temperature)
    logps, lse, entropy = _ops().logits_fwd(logits, ids, params, True)
    grad_logps, grad_entropy = grads
    dlogits = _ops().logits_bwd(grad_logps, grad_entropy, logits, ids, lse, entropy, params)
    inplace = logits.clone()
    _ops().logits_bwd_inplace(grad_logps, grad_entropy, inplace, ids, lse, entropy, params)
    no_entropy = _ops().logits_bwd(grad_logps, grad_entropy.new_empty(0), logits, ids, lse, entropy, params)
    logps_only, lse_only, _ = _ops().logits_fwd(logits, ids, params, False)
    return dict(logps=logps, lse=lse, entropy=entropy, dlogits=dlogits, inplace=inplace, no_entropy=no_entropy,
                logps_only=logps_only, lse_only=lse_only)


def _tol(lse):
    """8 eps (1 + |lse|) per row: the few-ulp difference of the sum of exponentials, carried by lse."""
    return 8 * EPS32 * (1 + lse.double().abs())


def _assert_rows_close(got, want, lse, name):
    """Per-row values (logps, lse, entropy): absolute error <= 8 eps (1 + |lse|) (1 + |value|)."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), name
    bound = _tol(lse) * (1 + want.abs())
    worst = ((got - want).abs() / bound).max().item()
    assert worst <= 1.0, f"{name}: {worst:.2f} x the bound"


def _assert_grads_close(got, want, logits, ids, lse, entropy, grads, temperature, name, out_ulp):
    """Gradients: each element p_j (g + g_H (logp_j + H)) scale (and g (1 - p) at the target) may
    differ by the row's tolerance times the size of the terms it is made of, plus one rounding of
    the output dtype."""
    got, want = got.double(), want.double()
    scale = 1.0 / temperature
    z = logits.double() * scale
    logp = torch.where(torch.isfinite(z), z - lse.double()[:, None], torch.full_like(z, float("-inf")))
    p = logp.exp()
    g, g_h = (t.double()[:, None].abs() for t in grads)
    h = entropy.double()[:, None].abs()
    terms = p * (g + g_h * (1 + logp.nan_to_num(neginf=0).abs() + h)) * scale
    terms[torch.arange(len(ids)), ids] += g[:, 0] * scale
    rel_ulp, abs_ulp = out_ulp
    bound = _tol(lse)[:, None] * (want.abs() + terms) + rel_ulp * want.abs() + abs_ulp + torch.finfo(torch.float32).tiny
    worst = ((got - want).abs() / bound).max().item()
    assert worst <= 1.0, f"{name}: {worst:.2f} x the bound"


# V: 1 (degenerate), 7 (< one vector of any width, all tail), 33 (ragged tail after two AVX-512
# vectors), 257 (ragged), 5003 (many vectors, ragged), 40000 (three 16384-value chunks of the
# forward's online merge, ragged). Rows: 6, so the zero-gradient row, the masked-vocab row and the
# large-logit row all occur, and the row loop's next-row prefetch reaches its last row.
@pytest.mark.parametrize("vocab", [1, 7, 33, 257, 5003, 40000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_variant_matches_baseline(monkeypatch, variant, vocab, dtype, temperature):
    rows = 6
    logits, ids, g = _inputs(rows, vocab, dtype, seed=vocab)
    grad_logps = torch.randn(rows, generator=g)
    grad_entropy = torch.randn(rows, generator=g)
    grad_logps[1] = 0.0
    grad_entropy[1] = 0.0  # a masked token: its gradient row is exactly zero
    grads = (grad_logps, grad_entropy)
    want = _run(monkeypatch, "baseline", logits, ids, temperature, grads)
    got = _run(monkeypatch, variant, logits, ids, temperature, grads)
    lse = want["lse"]
    for name in ("logps", "lse", "entropy", "logps_only", "lse_only"):
        _assert_rows_close(got[name], want[name], lse, name)
    # Without and with the entropy the forward adds the same exponentials in the same order.
    assert torch.equal(got["logps_only"], got["logps"]) and torch.equal(got["lse_only"], got["lse"])
    for name in ("dlogits", "inplace", "no_entropy"):
        assert got[name].dtype == dtype
        both = grads if name != "no_entropy" else (grad_logps, torch.zeros_like(grad_entropy))
        _assert_grads_close(got[name], want[name], logits, ids, lse, want["entropy"], both, temperature, name,
                            OUT_ULP[dtype])
        assert torch.equal(got[name][1], torch.zeros_like(got[name][1])), name  # exact zeros, +0 bits
        if vocab > 40:
            assert (got[name][0, 3:40] == 0).all(), name  # -inf logits: exactly 0
    assert torch.equal(got["inplace"], got["dlogits"])  # one kernel, two destinations


def test_float64_is_the_same_code_on_every_variant(monkeypatch, variant):
    logits, ids, g = _inputs(5, 301, torch.float64, seed=3)
    grads = (torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64))
    want = _run(monkeypatch, "baseline", logits, ids, 0.9, grads)
    got = _run(monkeypatch, variant, logits, ids, 0.9, grads)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_16bit_conversions_round_like_torch(monkeypatch, variant):
    # The kernels convert bf16 / fp16 in registers (shifts and rounding in integer arithmetic, F16C
    # on AVX2 / AVX-512, a software conversion on the baseline): the gradient they write must be
    # torch's own rounding of the float gradient, on every variant. A float32 run of the same
    # logits gives that float gradient.
    rows, vocab = 4, 1000
    for dtype in (torch.bfloat16, torch.float16):
        logits, ids, g = _inputs(rows, vocab, dtype, seed=11)
        grads = (torch.randn(rows, generator=g), torch.randn(rows, generator=g))
        for name in ("baseline", variant):
            out16 = _run(monkeypatch, name, logits, ids, 1.0, grads)["dlogits"]
            out32 = _run(monkeypatch, name, logits.float(), ids, 1.0, grads)["dlogits"]
            assert torch.equal(out16, out32.to(dtype)), (name, dtype)


def test_unset_variable_runs_the_widest_variant(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    best = _ops().cpu_capability()
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    have = set(flags.split())
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= have:
        assert best == "avx512"
    elif {"avx2", "fma", "f16c"} <= have:
        assert best == "avx2"
    elif flags:
        assert best == "baseline"


def _extension_library():
    import importlib.util

    spec = importlib.util.find_spec("grpo_fused._C")
    if spec is not None and spec.origin:
        return spec.origin  # a prebuilt grpo_fused._C takes precedence over the JIT build
    libs = [p for p in torch.ops.loaded_libraries if "grpo_fused_cpp" in os.path.basename(p)]
    return libs[0] if libs else None


def test_no_wide_instruction_outside_the_variants():
    # The build is portable: only the avx2 / avx512 copies of the row kernels may hold VEX / EVEX
    # (AVX) instructions, or the library would crash an older CPU the moment it ran that code
    # (the hazard of an inline function compiled for a wider target and kept by the linker).
    import platform
    import shutil
    import subprocess

    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and binutils' objdump")
    path = _extension_library()
    if path is None:
        pytest.skip("the extension's library file was not found")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], capture_output=True, text=True,
                          check=True).stdout
    offenders, function = set(), None
    for line in text.splitlines():
        if line.endswith(">:"):
            function = line
        elif "\tv" in line and function is not None:  # every AVX mnemonic starts with v (vaddps, vpmovzxwd...)
            if "grpo_fused_cpp::avx2::" not in function and "grpo_fused_cpp::avx512::" not in function:
                offenders.add(function)
    assert not offenders, sorted(offenders)[:10]
    assert any("grpo_fused_cpp::avx512::" in ln for ln in text.splitlines() if ln.endswith(">:"))
