"""Every Triton kernel compiles ahead of time for Hopper (``cuda``, sm_90), with no GPU needed.

The interpreter (``TRITON_INTERPRET=1``, what the other Triton tests run under on a CPU machine)
accepts code the real compiler rejects: wrong operand types or shapes for ``tl.dot``, constexpr
misuse, ops with no lowering, pointer arithmetic of the wrong width. Triton's wheel ships
``ptxas``, so the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs on any machine.

How: a child process, started without ``TRITON_INTERPRET`` (conftest sets it for this process
and Triton reads it once at import), records the launches of the real launchers
(``vocab_fwd`` / ``vocab_bwd``, ``grpo_fwd``, ``Tiled.forward`` / ``Tiled.backward``,
``group_stats``) on small CPU tensors with the GPU launch configuration, and compiles each for
sm_90a, with the machinery of :mod:`grpo_fused.benchmarks.static_report` (its one home):
``record_launches``, ``ast_source`` (the specialization Triton's own launch computes: 16-byte
divisible pointers and integers, unit strides as constants), ``compile_launch`` (ptxas' log
captured) and ``launch_failure`` (Triton's generated argument binder, which a parameter named
``params`` breaks on every GPU launch). The misaligned variant reads a deliberately misaligned
slice.

The variants cover, per kernel: bf16, fp16, fp32 and fp64 inputs, every ``HAS_*`` / ``NEED_*``
/ boolean constexpr on and off, every surrogate / KL / scale code, and the default block sizes
(vocabs of 32000 and 32001 for the 2048-wide tile, the tiled linear path's GPU configs per dtype,
group tiles of ``TILE_ELEMENTS``) -- a covering subset, not the full product: about 30 compiles,
about 40 s on two cores. No compiled kernel spills; where the logits rows are 16-byte aligned,
the streaming kernels' PTX must also read them with 16-byte vector loads. (The public ops at the
DESIGN shapes, with SASS counts, are tests/test_static_report.py's.)

Run directly (``python tests/test_triton_compile_sm90.py OUT.json``) it is the child.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import pytest

# The four files with Triton kernels of their own (linear_chunked reuses the vocab kernels; common
# holds the shared row pass, a jit function, not a kernel).
KERNEL_MODULES = ("selective_log_softmax", "grpo_logits", "linear_tiled", "group_advantages")
TARGET = ("cuda", 90, 32)
CHILD_TIMEOUT_S = 600


# --------------------------------------------------------------------------------------
# Variants: each calls launchers; every kernel launch it makes is compiled.
# --------------------------------------------------------------------------------------

# Vocabs wider than 2048 so the launchers pick their default 2048-column tile. A multiple of 16
# (as real vocabs are padded) makes every row start 16-byte aligned, which is what lets the
# compiler vectorize the row loads; an odd one is the ragged, unvectorized case.
VOCAB_ALIGNED = 32000
VOCAB_RAGGED = 32001


def _vocab_pass(dtype_name: str, entropy: bool, dentropy: bool, vocab: int = VOCAB_RAGGED, misaligned: bool = False):
    def run(m):
        import torch

        S = m["selective_log_softmax"]
        dtype = getattr(torch, dtype_name)
        B, T = 2, 5
        # (B, T + 1, V) sliced to (B, T, V): the batch stride is not T * V, as in logits[:, :-1].
        logits = torch.zeros(B, T + 1, vocab, dtype=dtype)[:, :-1]
        if misaligned:
            # Rows of V - 1 starting one element into the buffer: no 16-byte alignment anywhere.
            logits = logits[..., 1:]
        ids = torch.zeros(B, T, dtype=torch.int64 if not misaligned else torch.int32)
        from grpo_fused.semantics import vocab_values

        params = vocab_values(0.7)
        logps, lse, ent = S.vocab_fwd(logits, ids, params, entropy)
        if dentropy and ent is None:
            ent = torch.zeros_like(lse)
        S.vocab_bwd(logits, ids, lse, torch.ones_like(lse), torch.ones_like(lse) if dentropy else None,
                    ent if dentropy else None, params)

    return run


def _grpo_pass(dtype_name: str, with_old: bool, with_ref: bool, with_is: bool, vocab: int = VOCAB_RAGGED, **config):
    def run(m):
        import torch

        from grpo_fused import GRPOConfig

        G = m["grpo_logits"]
        dtype = getattr(torch, dtype_name)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        N = 7
        logits = torch.zeros(N, vocab, dtype=dtype)
        ids = torch.zeros(N, dtype=torch.int64)
        spec = GRPOConfig(**config).params.spec
        per_token = torch.zeros(N, dtype=acc)
        G.grpo_fwd(
            logits, ids, GRPOConfig(**config).params.values, per_token, torch.ones(N, dtype=acc),
            per_token.clone() if with_old else None,
            per_token.clone() if with_ref else None,
            torch.ones(N, dtype=acc) if with_is else None,
            torch.ones(N, dtype=acc) if spec.entropy_bonus else None,
            int(spec.loss_type.surrogate), int(spec.kl or 0), int(spec.options),
        )

    return run


def _linear_pass(dtype_name: str, bias: bool, entropy: bool, dlogps: bool, dentropy: bool, needs, filter_eps):
    def run(m):
        import torch

        L = m["linear_tiled"]
        dtype = getattr(torch, dtype_name)
        N, H, V = 37, 96, 1001
        cfg = L.default_config(torch.device("cuda"), dtype)  # the GPU config of this dtype; reads no device
        hidden = torch.zeros(N, H, dtype=dtype)
        weight = torch.zeros(V, H, dtype=dtype)
        b = torch.zeros(V, dtype=dtype) if bias else None
        ids = torch.zeros(N, dtype=torch.int64)
        from grpo_fused.semantics import vocab_values

        params = vocab_values(1.3)
        tiled = L.Tiled(filter_eps, cfg)
        _, lse, ent = tiled.forward(hidden, weight, b, ids, params, entropy)
        if ent is None:
            ent = torch.zeros_like(lse)
        tiled.backward(hidden, weight, b, ids, params, lse, ent, torch.ones_like(lse) if dlogps else None,
                       torch.ones_like(lse) if dentropy else None, needs)

    return run


def _groups_pass(dtype_name: str, k: int, how: str, group_size: int, scale: str,
                 weights: bool, keep: Optional[str]):
    def run(m):
        import torch

        A = m["group_advantages"]
        dtype = getattr(torch, dtype_name)
        B = 2048 if how != "large" else 2 * group_size
        rewards = torch.zeros(B, k, dtype=dtype)
        size, ids, offsets = None, None, None
        if how in ("size", "large"):
            size = group_size
        elif how == "ids":
            ids = torch.arange(B) % (B // group_size)
        else:
            offsets = torch.arange(0, B + 1, group_size)
        num_groups, offsets, perm = A._segments(B, size, ids, offsets)
        keep_mask = None if keep is None else torch.ones(B, dtype=getattr(torch, keep))
        A.group_stats(
            rewards, torch.ones(k, dtype=dtype) if weights else None, keep_mask, offsets, perm,
            num_groups, size or 0, int(A.ADVANTAGE_SCALES[scale]), 1, 1e-4,
        )

    return run


VARIANTS: Dict[str, Callable] = {
    # selective_log_softmax: forward (COMPUTE_ENTROPY) and backward (HAS_DENTROPY) kernels.
    "vocab-bf16-entropy": _vocab_pass("bfloat16", entropy=True, dentropy=True, vocab=VOCAB_ALIGNED),
    "vocab-fp16": _vocab_pass("float16", entropy=False, dentropy=False),
    "vocab-fp32-entropy-fwd-only": _vocab_pass("float32", entropy=True, dentropy=False),
    "vocab-fp64-dentropy": _vocab_pass("float64", entropy=False, dentropy=True),
    # A slice one element in: the logits pointer is not 16-byte aligned; int32 ids.
    "vocab-bf16-misaligned": _vocab_pass("bfloat16", entropy=True, dentropy=True, misaligned=True),
    # grpo_logits: every LOSS and KL code, every flag both ways.
    "grpo-bf16-delta-k3-is-bonus": _grpo_pass(
        "bfloat16", True, True, True, vocab=VOCAB_ALIGNED, loss_type="grpo", delta=1.5, beta=0.04,
        kl_estimator="k3", entropy_coef=0.01),
    "dapo-fp16-dualclip-nokl": _grpo_pass(
        "float16", False, False, False, loss_type="dapo", clip_ratio_c=3.0, compute_entropy=False),
    "cispo-fp32-twosided-lowvar": _grpo_pass(
        "float32", True, True, False, loss_type="cispo", cispo_two_sided=True, beta=0.1,
        kl_estimator="low_var_kl", use_bias_correction_kl=False),
    "cispo-bf16-k1": _grpo_pass("bfloat16", True, True, True, loss_type="cispo", beta=0.1, kl_estimator="k1"),
    "sapo-bf16-k2": _grpo_pass("bfloat16", True, True, False, loss_type="sapo", beta=0.1, kl_estimator="k2"),
    "gpg-fp16-abs": _grpo_pass("float16", False, True, True, loss_type="gpg", beta=0.1, kl_estimator="abs"),
    "grpo-fp64": _grpo_pass("float64", True, False, False, loss_type="bnpo"),
    # linear_tiled: forward (HAS_BIAS, HAS_ENTROPY) and backward (the six flags and FILTER).
    "linear-bf16-bias-entropy-filter": _linear_pass(
        "bfloat16", True, True, True, True, (True, True, True), 2.0**-12),
    "linear-fp16-dhidden": _linear_pass("float16", False, False, True, False, (True, False, False), None),
    "linear-fp32-dweight-dbias": _linear_pass("float32", True, False, False, True, (False, True, True), None),
    "linear-fp64-as-fp32": _linear_pass("float64", False, True, True, True, (True, True, False), 1e-3),
    # group_advantages: layouts (size / offsets / ids -> perm), scales, ONE_CHUNK both ways.
    "groups-fp32-size-group": _groups_pass("float32", 1, "size", 16, "group", False, None),
    "groups-bf16-ids-batch": _groups_pass("bfloat16", 3, "ids", 8, "batch", True, "bool"),
    "groups-fp16-offsets-none": _groups_pass("float16", 2, "offsets", 32, "none", False, "float32"),
    # Groups of 1500 > MAX_BLOCK_S: the multi-tile loops.
    "groups-fp64-large": _groups_pass("float64", 2, "large", 1500, "group", True, "int64"),
}


# --------------------------------------------------------------------------------------
# Child: record the launches, compile them for sm_90.
# --------------------------------------------------------------------------------------

def _jit_functions(module):
    """``{name: JITFunction}`` defined in ``module`` (``@triton.heuristics`` wrappers unwrapped)."""
    from triton.runtime.jit import JITFunction

    found = {}
    for name, obj in vars(module).items():
        while obj is not None and not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
            obj = obj.fn
        if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
            found[name] = obj
    return found


def _uncovered(modules, compiled_names) -> List[str]:
    """Jitted functions neither compiled as a kernel nor called (transitively) from one."""
    everything = {}
    for module in modules.values():
        everything.update(_jit_functions(module))
    covered = {name for name in everything if name in compiled_names}
    grew = True
    while grew:
        sources = " ".join(everything[name].src for name in covered)
        more = {name for name in everything if name not in covered and f"{name}(" in sources}
        covered |= more
        grew = bool(more)
    return sorted(set(everything) - covered)


def child_main(out_path: str) -> None:
    import importlib

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "the child must run the real compiler"
    import triton

    from grpo_fused.benchmarks import static_report as R

    modules = {name: importlib.import_module(f"grpo_fused.kernels.{name}") for name in KERNEL_MODULES}
    results = []
    for variant, launch in VARIANTS.items():
        try:
            with R.record_launches(variant) as recorded:
                launch(modules)
        except Exception as e:  # a launcher bug is a failure of this variant, reported below
            results.append({"variant": variant, "kernel": None, "ok": False, "error": f"launcher: {e!r}"})
            continue
        if not recorded:
            results.append({"variant": variant, "kernel": None, "ok": False, "error": "no kernel launched"})
        for rec in recorded:
            row = {"variant": variant, "kernel": rec.fn.__name__, "ok": False}
            start = time.perf_counter()
            try:
                _, row["options"], row["args"] = R.ast_source(rec.fn, rec.args, rec.kwargs)
                row["launch_error"] = R.launch_failure(rec)
                compiled = R.compile_launch(rec)
                spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", compiled.ptxas_log)
                row.update(ok=len(compiled.cubin) > 0, cubin_bytes=len(compiled.cubin), shared=compiled.shared,
                           spills=None if spill is None else int(spill.group(1)) + int(spill.group(2)))
                row["wide_loads"] = len(re.findall(r"ld\.global[\w.]*\.v4\.b32", compiled.ptx))
                if not compiled.cubin:
                    row["error"] = "no cubin produced"
            except Exception as e:  # the compiler's message is the point of the test
                row["error"] = f"{type(e).__name__}: {e}"[-4000:]
            row["seconds"] = round(time.perf_counter() - start, 2)
            results.append(row)
    compiled_names = {r["kernel"] for r in results if r.get("ok")}
    report = {"triton": triton.__version__, "results": results,
              "uncovered": _uncovered(modules, compiled_names)}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=str)


# --------------------------------------------------------------------------------------
# Tests (parent process).
# --------------------------------------------------------------------------------------


def _nvidia_toolchain_missing() -> Optional[str]:
    """Why the installed Triton cannot compile for NVIDIA here, or None when it can."""
    try:
        from triton.backends import backends
    except ImportError as e:
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return "the installed triton has no NVIDIA backend"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(TARGET[1])  # the ptxas Triton picks for this arch (bundled or TRITON_PTXAS_PATH)
        except TypeError:  # a triton whose get_ptxas takes no arch
            tool = get_ptxas()
        path = tool.path  # runs `ptxas --version`; raises when no usable binary is found
    except Exception as e:
        return f"the installed triton has no usable ptxas: {type(e).__name__}: {e}"
    if not os.access(path, os.X_OK):
        return f"ptxas at {path} is not executable"
    return None


_MISSING = _nvidia_toolchain_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    work = tmp_path_factory.mktemp("sm90")
    out = work / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(work / "triton-cache")  # a cold cache: every kernel really compiles
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(out)], cwd=repo, env=env,
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )
    assert proc.returncode == 0 and out.exists(), f"compile child failed:\n{proc.stdout}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_compiles_for_sm90(compile_report, variant):
    rows = [r for r in compile_report["results"] if r["variant"] == variant]
    assert rows, f"{variant}: no result"
    failures = [f"{r['kernel']}: {r.get('error')}" for r in rows if not r["ok"]]
    assert not failures, f"{variant} does not compile for sm_90:\n" + "\n\n".join(failures)
    for r in rows:
        assert r["cubin_bytes"] > 0, f"{variant}/{r['kernel']}: empty cubin"
        # Triton's launch binds the arguments before compiling; a bad parameter name fails there.
        assert r["launch_error"] is None, f"{variant}/{r['kernel']}: the GPU launch would fail: {r['launch_error']}"
        assert r["spills"] == 0, f"{variant}/{r['kernel']}: spills {r['spills']} bytes (ptxas -v)"


def test_every_jitted_function_is_compiled(compile_report):
    """A kernel added to these files without a variant here fails this test."""
    assert compile_report["uncovered"] == []


def _seen(compile_report, kernel, arg):
    # (The specialization summary marks 16-byte divisible pointers "*bf16/16": the dtype is compared.)
    return {r["args"][arg].split("/")[0] for r in compile_report["results"] if r["kernel"] == kernel and "args" in r}


# What the variants must have compiled each kernel with; a variant edited away fails here.
EXPECTED_COVERAGE = {
    "_selective_log_softmax_fwd_kernel": {
        "logits_ptr": {"*bf16", "*fp16", "*fp32", "*fp64"}, "COMPUTE_ENTROPY": {"True", "False"},
        "BLOCK_V": {"2048"},
    },
    "_selective_log_softmax_bwd_kernel": {
        "logits_ptr": {"*bf16", "*fp16", "*fp32", "*fp64"}, "HAS_DENTROPY": {"True", "False"},
        "BLOCK_V": {"2048"},
    },
    "_grpo_logits_fwd_kernel": {
        "logits_ptr": {"*bf16", "*fp16", "*fp32", "*fp64"}, "BLOCK_V": {"2048"},
        "LOSS": {"0", "1", "2", "3"}, "KL": {"0", "1", "2", "3", "4"},
        **{flag: {"True", "False"} for flag in (
            "HAS_DELTA", "HAS_DUAL_CLIP", "CISPO_TWO_SIDED", "BIAS_CORRECT_KL", "HAS_OLD", "HAS_KL",
            "HAS_IS_WEIGHTS", "HAS_ENTROPY_BONUS", "COMPUTE_ENTROPY")},
    },
    # GPU configs: 128 x 128 x 64 (backward: x 32) for bf16 / fp16 (wgmma), 64 x 128 x 32 for fp32 /
    # fp64 (FMA dot).
    "_linear_lse_fwd_kernel": {
        "hidden": {"*bf16", "*fp16", "*fp32"}, "HAS_BIAS": {"True", "False"}, "HAS_ENTROPY": {"True", "False"},
        "BLOCK_N": {"128", "64"}, "BLOCK_V": {"128"}, "BLOCK_H": {"64", "32"},
    },
    "_linear_lse_bwd_kernel": {
        "hidden": {"*bf16", "*fp16", "*fp32"}, "BLOCK_N": {"128", "64"}, "BLOCK_V": {"128"}, "BLOCK_H": {"32"},
        **{flag: {"True", "False"} for flag in (
            "HAS_BIAS", "HAS_DLOGPS", "HAS_DENTROPY", "NEED_DHIDDEN", "NEED_DWEIGHT", "NEED_DBIAS", "FILTER")},
    },
    "_group_advantages_kernel": {
        "rewards": {"*bf16", "*fp16", "*fp32", "*fp64"}, "SCALE": {"0", "1", "2"},
        "BLOCK_S": {"16", "1024"}, "BLOCK_G": {"128", "2"},
        **{flag: {"True", "False"} for flag in ("ONE_CHUNK", "HAS_OFFSETS", "HAS_PERM", "HAS_WEIGHTS", "HAS_KEEP")},
    },
}


@pytest.mark.parametrize("kernel", list(EXPECTED_COVERAGE))
def test_variants_cover_dtypes_flags_and_default_blocks(compile_report, kernel):
    for arg, wanted in EXPECTED_COVERAGE[kernel].items():
        missing = wanted - _seen(compile_report, kernel, arg)
        assert not missing, f"{kernel}: {arg} never compiled with {sorted(missing)}"


# Variants whose logits rows are 16-byte aligned (V % 16 == 0, aligned base and strides): the
# streaming kernels must read them with 16-byte vector loads. A change to the row addressing
# that hides the alignment from the compiler would cut the bandwidth of a memory-bound kernel
# and still pass every numerical test.
VECTORIZED = {
    "vocab-bf16-entropy": ("_selective_log_softmax_fwd_kernel", "_selective_log_softmax_bwd_kernel"),
    "grpo-bf16-delta-k3-is-bonus": ("_grpo_logits_fwd_kernel",),
}


@pytest.mark.parametrize("variant", list(VECTORIZED))
def test_aligned_rows_are_read_with_16_byte_loads(compile_report, variant):
    rows = {r["kernel"]: r for r in compile_report["results"] if r["variant"] == variant and r.get("ok")}
    for kernel in VECTORIZED[variant]:
        assert kernel in rows, f"{variant}: {kernel} not compiled"
        assert rows[kernel]["wide_loads"] > 0, f"{variant}: {kernel} reads its rows without 16-byte loads"


if __name__ == "__main__":
    child_main(sys.argv[1])
