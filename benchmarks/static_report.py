"""Static sm_90a report: what every Triton kernel of the package compiles to on a Hopper GPU,
and what that predicts, on a machine with no GPU.

How it works. The *public* ops (``grpo_fused.grpo_loss``, ``linear_grpo_loss``,
``selective_log_softmax``, ``group_advantages`` with ``backend="triton"``) run forward and backward
on CPU tensors of the DESIGN.md reference shapes (bf16, V = 151936, H = 3584) while
``JITFunction.run`` is replaced by a recorder: every kernel launch the launchers make is recorded
with its arguments, constexprs and ``num_warps`` / ``num_stages`` exactly as they were produced,
and nothing runs. Each distinct launch becomes an ``ASTSource`` compiled by
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` (Triton picks ``sm_90a``) with Triton's
bundled ``ptxas``; the cubin is disassembled with the bundled ``nvdisasm`` and its resources read
with ``cuobjdump --dump-resource-usage``. Pointers are marked 16-byte divisible when their address
is, integers when they are multiples of 16, as Triton's own launch would.

The token count of a recorded launch is small (``--record-tokens``, default 16 = a multiple of 16
like 16384): tokens, H and V reach the kernels only as runtime integers (loop bounds, strides) and
the grid, so a launch at N = 16 compiles to the same binary as at N = 16384 (the specialization
key -- dtypes, constexprs, 16-divisibility -- is the same, and the report prints it). The byte and
FLOP models use the DESIGN N.

The sampling-support scenarios (``sampling-*``, ``grpo-sampling``, ``linear-chunked-sampling``) add
the cutoff kernel (:mod:`grpo_fused.kernels.sampling_support`), whose sweeps are told apart by role
(:func:`cutoff_sweeps`), and the row kernels' ``SUPPORT`` specializations; :func:`sampling_model`
turns them into the extra bytes and time of a sampling rule on the logits path.

Per kernel it reports: registers, spills (ptxas ``-v``), stack, shared memory, CTAs per SM (from
registers, shared memory and warps, H100 limits), 16-byte global loads / stores (SASS
``LDG.E.128`` / ``STG.E.128``, and PTX ``ld/st.global.v4``), the innermost loops of the SASS with
their instruction counts (a loop is the span from a label to a backward branch to it; the count is
static, NOPs excluded, and for the streaming row kernels normalized to 8 columns per thread by the
bytes the loop body loads), memory fences (``MEMBAR``), atomics (PTX ``atom`` / ``red`` forms, SASS
``RED`` / ``ATOM``), ``wgmma`` (SASS ``HGMMA``) and ``mma.sync`` (``HMMA``) use, and the exp lowering
(``ex2.approx[.ftz].f32``). Per op it gives the byte / FLOP model, the floor time on an H100 SXM
and a predicted time from the instruction counts (an issue-rate model: 4 warp-instructions per
clock per SM). Everything predicted is labelled "predicted, not measured on GPU".

Run: ``python -m grpo_fused.benchmarks.static_report`` (JSON under ``benchmarks/results/``,
a table on stdout); ``bash scripts/bench.sh`` runs it too. The work happens in a child process
started without ``TRITON_INTERPRET`` (Triton decides interpreted vs compiled when the kernels are
decorated, at import). :func:`main` is the CLI entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
TARGET = ("cuda", 90, 32)
CHILD_TIMEOUT_S = 1200
PREDICTED = "predicted, not measured on GPU"

# DESIGN.md section 5: Qwen2.5-7B head, bf16, N = 16384 (8 x 2048) and 131072 (1 x 128k).
DESIGN_SHAPES = dict(tokens=16384, tokens_long=131072, seq_len=2048, vocab=151936, hidden=3584,
                     dtype="bfloat16", rewards=2**20, group_size=8)
# The benchmark harness draws each sequence's length uniformly in [T/2, T]: 25 % of positions are
# masked in expectation.
BENCH_MASKED_FRACTION = 0.25
RECORD_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """The H100 SXM figures the predictions use (DESIGN.md's floors; public H100 limits)."""

    name: str = "H100 SXM (sm_90a)"
    hbm_bytes_per_s: float = 3.35e12
    gemm_flops_bf16: float = 800e12  # DESIGN.md: measured cuBLAS bf16 rate
    gemm_flops_fp32_simt: float = 60e12  # fp32 FFMA peak ~67 TFLOP/s; "ieee" tl.dot runs there
    sms: int = 132
    clock_hz: Tuple[float, float] = (1.755e9, 1.98e9)  # sustained under load .. max boost
    issue_per_clk_per_sm: int = 4  # four schedulers, one warp-instruction each per clock
    l2_bytes: int = 50 * 2**20
    regs_per_sm: int = 65536
    reg_alloc_unit_per_warp: int = 256
    max_regs_per_thread: int = 255
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_cta: int = 1024
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    mufu_per_clk_per_sm: int = 16  # ex2 / lg2 lanes a clock (4 SFUs per sub-partition)
    # Assumed, not measured: L2 -> SM bandwidth for GEMM operand tiles (a 64 x 128 bf16 tile at
    # these rates is the 30-37 % of 800 TFLOP/s the issue's review predicted).
    l2_bytes_per_s: Tuple[float, float] = (5.5e12, 7.0e12)
    # Assumed, not measured: throughput of fp32 vector reductions (red.global.add.v4.f32) resolved
    # in L2 for non-conflicting addresses, in payload bytes per second.
    l2_reduction_bytes_per_s: Tuple[float, float] = (1.5e12, 3.0e12)


H100 = DeviceModel()


# ======================================================================================
# Recording launches.
# ======================================================================================


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the JITFunction and exactly what the launcher passed."""

    fn: Any
    args: Tuple
    kwargs: Dict[str, Any]
    grid: Any
    scenario: str = ""


@contextlib.contextmanager
def record_launches(scenario: str = ""):
    """Within the block, every ``@triton.jit`` kernel launch is appended to the yielded list instead
    of running (launchers reach ``JITFunction.run`` through ``wrap_triton`` and heuristics alike),
    and the launchers accept CPU tensors with their GPU configuration
    (:class:`grpo_fused.kernels.common.recording_launches`). Needs a process where Triton was
    imported without ``TRITON_INTERPRET``."""
    from triton.runtime.jit import JITFunction

    from grpo_fused import _dispatch
    from grpo_fused.kernels.common import recording_launches

    if not isinstance(getattr(__import__("grpo_fused.kernels.selective_log_softmax").kernels.selective_log_softmax,
                              "_selective_log_softmax_fwd_kernel"), JITFunction):
        raise RuntimeError("the kernels were decorated under TRITON_INTERPRET=1: record in a fresh process")
    launches: List[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid, scenario))

    JITFunction.run = record
    _dispatch._chosen.clear()  # a backend refused on CPU before is available while recording
    try:
        with recording_launches():
            yield launches
    finally:
        JITFunction.run = original
        _dispatch._chosen.clear()


def _backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget(*TARGET))


def ast_source(fn, args, kwargs):
    """``(ASTSource, options, summary)`` of one recorded launch, specialized exactly as Triton's own
    launch on an sm_90 device would (``JITFunction.run``'s binder and ``_pack_args``): pointers
    marked 16-byte divisible when their address is, integers 16-divisible when they are, an
    integer equal to 1 (a unit stride) a constant, None a constant. Keyword arguments that are not
    parameters (num_warps, num_stages, enable_fp_fusion, ...) are compile options.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler import ASTSource

    backend = _backend()
    # What JITFunction.run's generated binder computes, argument by argument (the binder itself is
    # exercised by launch_failure: a parameter name can break it).
    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound.apply_defaults()
    bound_args = dict(bound.arguments)
    specialization = []
    for kp, value in zip(fn.params, bound_args.values()):
        if kp.is_constexpr:
            specialization.append(("constexpr", value))
        else:
            specialization.append(native_specialize_impl(backend, value, kp.is_const, not kp.do_not_specialize,
                                                         not kp.do_not_specialize_on_alignment))
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound_args, specialization, options)
    summary = {}
    for index, (name, kind) in enumerate(signature.items()):
        if kind == "constexpr":
            summary[name] = repr(constexprs.get((index,)))
        elif kind.startswith("*") or kind.startswith("i"):
            divisible = any(a and a[0][0] == "tt.divisibility" for a in [attrs.get((index,), [])])
            summary[name] = kind + ("/16" if divisible else "")
    return ASTSource(fn, signature, constexprs, attrs), options, summary


def launch_failure(launch: Launch) -> Optional[str]:
    """Why Triton's own launch path would refuse this launch before compiling (its generated
    argument binder), or None. A kernel parameter named like one of the binder's locals
    (``params``, ``specialization``, ``options``) makes every GPU launch fail."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, _backend())
    try:
        binder(*launch.args, **launch.kwargs)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def launch_key(launch: Launch) -> str:
    """What a compile depends on: kernel, specialization (types, constexprs, divisibility), options."""
    _, options, summary = ast_source(launch.fn, launch.args, launch.kwargs)
    return json.dumps([launch.fn.__name__, summary, options], sort_keys=True, default=str)


# ======================================================================================
# Compiling and reading the binary.
# ======================================================================================


def _tool(name: str) -> Optional[str]:
    """Path of a tool Triton's wheel ships (``ptxas``, ``nvdisasm``, ``cuobjdump``), or None."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
    except Exception:
        return None
    return path if path and os.access(path, os.X_OK) else None


def toolchain_missing() -> Optional[str]:
    """Why this machine cannot produce the report (no NVIDIA backend, no ptxas), or None."""
    try:
        from triton.backends import backends
    except ImportError as e:
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return "the installed triton has no NVIDIA backend"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(TARGET[1]).path  # runs `ptxas --version`
    except Exception as e:
        return f"the installed triton has no usable ptxas: {type(e).__name__}: {e}"
    return None


@dataclasses.dataclass
class Compiled:
    name: str
    cubin: bytes
    ptx: str
    shared: int
    num_warps: int
    num_stages: int
    enable_fp_fusion: bool
    ptxas_log: str
    seconds: float


def compile_launch(launch: Launch) -> Compiled:
    """``triton.compile`` of one recorded launch for sm_90a, with ptxas' ``-v`` log captured."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    src, options, _ = ast_source(launch.fn, launch.args, launch.kwargs)
    start = time.perf_counter()
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v output when asked to
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget(*TARGET), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    meta = compiled.metadata
    return Compiled(launch.fn.__name__, compiled.asm.get("cubin", b""), compiled.asm.get("ptx", ""),
                    int(meta.shared), int(meta.num_warps), int(meta.num_stages), bool(meta.enable_fp_fusion),
                    log.getvalue(), time.perf_counter() - start)


@dataclasses.dataclass
class Instr:
    index: int
    opcode: str  # e.g. "LDG.E.128", without predicate
    text: str
    target: Optional[str] = None  # branch target label


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+`\((\.L_x_\d+)\)")


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (bundled ``nvdisasm -c``; ``cuobjdump -sass`` when it is missing)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        nvdisasm = _tool("nvdisasm")
        if nvdisasm:
            return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
        cuobjdump = _tool("cuobjdump")
        if cuobjdump:
            return subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
        raise RuntimeError("neither nvdisasm nor cuobjdump ships with this triton")
    finally:
        os.unlink(path)


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """``cuobjdump --dump-resource-usage``: REG, STACK, SHARED, LOCAL of the kernel."""
    tool = _tool("cuobjdump")
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    line = next((l for l in out.splitlines() if "REG:" in l), "")
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def parse_sass(text: str) -> List[Instr]:
    instrs: List[Instr] = []
    pending: List[str] = []
    labels: Dict[str, int] = {}
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        body = re.sub(r"^@!?U?P[T\d]+\s+", "", body)
        opcode = body.split()[0] if body else ""
        branch = _BRANCH.search(body)
        instrs.append(Instr(len(instrs), opcode, body, branch.group(1) if branch else None))
    for ins in instrs:
        if ins.target is not None:
            ins.target = str(labels.get(ins.target, -1))
    return instrs


def _global_bytes(opcode: str) -> int:
    """Bytes one thread moves with a global load / store opcode (LDG.E.128 -> 16)."""
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in opcode:
            return size
    return 4


def _summarize(instrs: Sequence[Instr]) -> Dict[str, Any]:
    ops = [i.opcode for i in instrs if not i.opcode.startswith("NOP")]
    ldg = [o for o in ops if o.startswith("LDG")]
    stg = [o for o in ops if o.startswith("STG")]
    atomics: Dict[str, int] = {}
    for o in ops:
        if o.startswith(("RED", "ATOM")) and not o.startswith("ATOMS"):
            atomics[o] = atomics.get(o, 0) + 1
    fences: Dict[str, int] = {}
    for o in ops:
        if o.startswith(("MEMBAR", "FENCE", "ERRBAR")):
            fences[o] = fences.get(o, 0) + 1
    return {
        "instructions": len(ops),
        "ldg": len(ldg), "ldg_128": sum(".128" in o for o in ldg), "ldg_bytes": sum(_global_bytes(o) for o in ldg),
        "stg": len(stg), "stg_128": sum(".128" in o for o in stg), "stg_bytes": sum(_global_bytes(o) for o in stg),
        "mufu_ex2": sum(o.startswith("MUFU.EX2") for o in ops),
        "hgmma": sum(o.startswith("HGMMA") for o in ops), "hmma": sum(o.startswith("HMMA") for o in ops),
        "local": sum(o.startswith(("LDL", "STL")) for o in ops),
        "bar": sum(o.startswith("BAR") for o in ops),
        "fences": fences, "atomics": atomics,
    }


def innermost_loops(instrs: Sequence[Instr]) -> List[Tuple[int, int]]:
    """``(first, last)`` instruction indices of each loop that contains no other loop: a backward
    branch to a label, the loop being the label's instruction through the branch."""
    spans = sorted({(int(i.target), i.index) for i in instrs
                    if i.target is not None and 0 <= int(i.target) <= i.index})
    # (A branch to itself is the trap every kernel ends with, not a loop.)
    spans = [(a, b) for a, b in spans if a < b]
    return [(a, b) for a, b in spans if not any((c, d) != (a, b) and a <= c and d <= b for c, d in spans)]


# Kernels that stream rows of a (rows, V) tensor: the tensor they stream (its element size
# normalizes their loop to "per 8 columns per thread").
STREAMED_ARG = {
    "_selective_log_softmax_fwd_kernel": "logits_ptr",
    "_selective_log_softmax_bwd_kernel": "logits_ptr",
    "_grpo_logits_fwd_kernel": "logits_ptr",
    "_sampling_cutoff_kernel": "logits_ptr",
}


def occupancy(regs: int, shared: int, num_warps: int, device: DeviceModel = H100) -> Tuple[int, str]:
    """CTAs per SM and what limits them (registers, shared memory, warps or the CTA cap)."""
    unit = device.reg_alloc_unit_per_warp
    regs_per_warp = max(unit, -(-regs * 32 // unit) * unit)
    by = {
        "registers": (device.regs_per_sm // regs_per_warp) // num_warps,
        "shared memory": device.smem_per_sm // (shared + device.smem_reserved_per_cta),
        "warps": device.max_warps_per_sm // num_warps,
        "CTA limit": device.max_ctas_per_sm,
    }
    limiter = min(by, key=by.get)
    return by[limiter], limiter


def analyze(launch: Launch, compiled: Compiled, device: DeviceModel = H100) -> Dict[str, Any]:
    """Everything the report says about one compiled kernel."""
    import torch

    log = compiled.ptxas_log
    regs = int(m.group(1)) if (m := re.search(r"Used (\d+) registers", log)) else None
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    res = resource_usage(compiled.cubin)
    if regs is None:
        regs = res.get("reg")
    sass = disassemble(compiled.cubin)
    instrs = parse_sass(sass)
    ptx = compiled.ptx
    _, options, summary = ast_source(launch.fn, launch.args, launch.kwargs)
    ctas, limiter = occupancy(regs or 0, compiled.shared, compiled.num_warps, device)

    loops = []
    streamed = STREAMED_ARG.get(compiled.name)
    elem = None
    if streamed is not None:
        values = dict(zip(launch.fn.arg_names, launch.args))
        t = values.get(streamed)
        elem = t.element_size() if isinstance(t, torch.Tensor) else None
    for first, last in innermost_loops(instrs):
        body = _summarize(instrs[first:last + 1])
        if elem and body["ldg_bytes"]:
            columns = body["ldg_bytes"] / elem  # columns per thread one pass of the body reads
            body["columns_per_thread"] = columns
            body["per_8_columns"] = round(body["instructions"] * 8 / columns, 1)
        loops.append(body)
    streaming = None
    if loops:
        # The loop that streams: the one reading the most (a zero-fill loop only stores), or the
        # tensor-core loop of a GEMM kernel.
        streaming = max(loops, key=lambda b: (b["ldg_bytes"] + 64 * (b["hgmma"] + b["hmma"]), b["stg_bytes"],
                                               b["instructions"]))
    whole = _summarize(instrs)
    ptx_atomics: Dict[str, int] = {}
    for form in re.findall(r"\b((?:atom|red)\.[\w.]+)", ptx):
        ptx_atomics[form] = ptx_atomics.get(form, 0) + 1
    ptx_fences: Dict[str, int] = {}
    for form in re.findall(r"\b(fence\.[\w.]+|membar\.\w+)", ptx):
        ptx_fences[form] = ptx_fences.get(form, 0) + 1
    return {
        "kernel": compiled.name,
        "scenario": launch.scenario,
        "specialization": summary,
        "options": options,
        "num_warps": compiled.num_warps,
        "num_stages": compiled.num_stages,
        "enable_fp_fusion": compiled.enable_fp_fusion,
        "registers": regs,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "stack_bytes": int(stack.group(1)) if stack else res.get("stack"),
        "shared_bytes": compiled.shared,
        "ctas_per_sm": ctas,
        "occupancy_limiter": limiter,
        "sass_instructions": whole["instructions"],
        "ldg_128": whole["ldg_128"], "stg_128": whole["stg_128"], "ldg": whole["ldg"], "stg": whole["stg"],
        "ptx_ld_global_v4": len(re.findall(r"ld\.global[\w.]*\.v4\.b32", ptx)),
        "ptx_st_global_v4": len(re.findall(r"st\.global[\w.]*\.v4\.b32", ptx)),
        "fences": whole["fences"], "ptx_fences": ptx_fences,
        "atomics": whole["atomics"], "ptx_atomics": ptx_atomics,
        "hgmma": whole["hgmma"], "hmma": whole["hmma"], "local_memory_instructions": whole["local"],
        "ex2": sorted(set(re.findall(r"\bex2\.approx[\w.]*", ptx))),
        "loops": loops,
        "streaming_loop": streaming,
        "compile_seconds": round(compiled.seconds, 2),
    }


# ======================================================================================
# Scenarios: the public ops at the reference shapes.
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class Shapes:
    tokens: int = RECORD_TOKENS
    vocab: int = DESIGN_SHAPES["vocab"]
    hidden: int = DESIGN_SHAPES["hidden"]
    dtype: str = DESIGN_SHAPES["dtype"]
    rewards: int = DESIGN_SHAPES["rewards"]
    group_size: int = DESIGN_SHAPES["group_size"]


def _loss_inputs(torch, shapes: Shapes, B: int, T: int):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, T)
    mask[:, -T // 4:] = 0  # a masked tail, as padded completions have
    return dict(
        completion_ids=torch.randint(0, shapes.vocab, (B, T), generator=g),
        advantages=torch.randn(B, generator=g),
        completion_mask=mask,
        old_logps=-torch.rand(B, T, generator=g),
        ref_logps=-torch.rand(B, T, generator=g),
    )


def _logits(torch, shapes: Shapes, B: int, T: int, dtype=None):
    # Uninitialized: the kernels do not run, and at V = 151936 filling would cost more than the report.
    return torch.empty(B, T, shapes.vocab, dtype=getattr(torch, dtype or shapes.dtype)).requires_grad_()


def _grpo_loss(config_kwargs, **call):
    def run(shapes: Shapes):
        import torch

        import grpo_fused as gf

        B, T = 2, shapes.tokens // 2
        logits = _logits(torch, shapes, B, T)
        out = gf.grpo_loss(logits, config=gf.GRPOConfig(**config_kwargs), backend="triton",
                           **_loss_inputs(torch, shapes, B, T), **call)
        out.loss.backward()

    return run


def _selective_log_softmax(shapes: Shapes):
    import torch

    import grpo_fused as gf

    logits = _logits(torch, shapes, 1, shapes.tokens)[0]
    ids = torch.zeros(shapes.tokens, dtype=torch.int64)
    logps, entropy = gf.selective_log_softmax(logits, ids, compute_entropy=True, backend="triton")
    (logps.sum() + entropy.sum()).backward()


def _sampled_log_softmax(**rule):
    def run(shapes: Shapes):
        import torch

        import grpo_fused as gf

        logits = _logits(torch, shapes, 1, shapes.tokens)[0]
        ids = torch.zeros(shapes.tokens, dtype=torch.int64)
        logps, entropy = gf.selective_log_softmax(logits, ids, compute_entropy=True, backend="triton", **rule)
        (logps.sum() + entropy.sum()).backward()

    return run


def _linear_grpo_loss(strategy: str, dtype: str, bias: bool = False, **config_kwargs):
    def run(shapes: Shapes):
        import torch

        import grpo_fused as gf

        B, T = 2, shapes.tokens // 2
        torch_dtype = getattr(torch, dtype)
        hidden = torch.empty(B, T, shapes.hidden, dtype=torch_dtype).normal_().requires_grad_()
        weight = torch.empty(shapes.vocab, shapes.hidden, dtype=torch_dtype).requires_grad_()
        b = torch.zeros(shapes.vocab, dtype=torch_dtype, requires_grad=True) if bias else None
        config = gf.GRPOConfig(**{"loss_type": "dapo", "beta": 0.04, **config_kwargs})
        out = gf.linear_grpo_loss(hidden, weight, bias=b, config=config, strategy=strategy, backend="triton",
                                  **_loss_inputs(torch, shapes, B, T))
        out.loss.backward()

    return run


def _group_advantages(shapes: Shapes):
    import torch

    import grpo_fused as gf

    rewards = torch.rand(shapes.rewards)
    gf.group_advantages(rewards, group_size=shapes.group_size, backend="triton")


# name -> (op, description, run)
SCENARIOS: Dict[str, Tuple[str, str, Callable[[Shapes], None]]] = {
    "grpo-entropy": ("grpo_loss", "token-level dapo, beta 0.04, entropy on with a bonus (entropy term in backward)",
                     _grpo_loss(dict(loss_type="dapo", beta=0.04, entropy_coef=0.01))),
    "grpo-no-entropy": ("grpo_loss", "token-level dapo, beta 0.04, compute_entropy=False",
                        _grpo_loss(dict(loss_type="dapo", beta=0.04, compute_entropy=False))),
    "gspo-sequence": ("grpo_loss", "sequence-level (GSPO): the vocab op, then the (B, T) tail",
                      _grpo_loss(dict(loss_type="grpo", importance_sampling_level="sequence"))),
    "selective-log-softmax": ("selective_log_softmax", "logps and entropy, both differentiated",
                              _selective_log_softmax),
    "linear-tiled-bf16": ("linear_grpo_loss", "strategy tiled, bf16", _linear_grpo_loss("tiled", "bfloat16")),
    "linear-tiled-bf16-bias-entropy": ("linear_grpo_loss", "strategy tiled, bf16, lm_head bias, entropy bonus "
                                       "(the backward's heaviest specialization)",
                                       _linear_grpo_loss("tiled", "bfloat16", bias=True, entropy_coef=0.01)),
    "linear-tiled-fp32": ("linear_grpo_loss", "strategy tiled, fp32", _linear_grpo_loss("tiled", "float32")),
    "linear-chunked-bf16": ("linear_grpo_loss", "strategy chunked, bf16 (cuBLAS GEMMs + row kernels on fp32 logits)",
                            _linear_grpo_loss("chunked", "bfloat16")),
    "group-advantages": ("group_advantages", "2^20 rewards, groups of 8", _group_advantages),
    # Sampling-support replay: the cutoff search, then the row kernels over the support.
    "sampling-top-k-top-p": ("selective_log_softmax", "top_k 50 + top_p 0.95 (vLLM's Triton tie rule), entropy",
                             _sampled_log_softmax(top_k=50, top_p=0.95)),
    "sampling-top-p": ("selective_log_softmax", "top_p 0.7 alone: the same compiled kernels (numbers are data)",
                       _sampled_log_softmax(top_p=0.7)),
    "sampling-top-k-all-ties": ("selective_log_softmax", "top_k 50 keeping every tie (vLLM's PyTorch rule)",
                                _sampled_log_softmax(top_k=50, top_k_ties="all")),
    "grpo-sampling": ("grpo_loss", "token-level dapo, beta 0.04, top_p 0.95: vocab op on the support + (B, T) tail",
                      _grpo_loss(dict(loss_type="dapo", beta=0.04, top_p=0.95))),
    "linear-chunked-sampling": ("linear_grpo_loss", "strategy chunked, bf16, top_p 0.95 (cutoff on fp32 chunk logits)",
                                _linear_grpo_loss("chunked", "bfloat16", top_p=0.95)),
}


# ======================================================================================
# Models: bytes and FLOPs of each op, floor and predicted time.
# ======================================================================================


def stream_columns_per_s(per8: Optional[float], mufu_per8: Optional[float], clock_hz: float,
                         device: DeviceModel = H100) -> float:
    """Columns a second the SMs can push through a streaming loop when instruction issue or the
    MUFU (ex2) pipe is the limit: a warp-instruction covers 32 threads x 8 columns / ``per8``
    columns and an SM issues ``issue_per_clk_per_sm`` of them a clock; MUFU retires
    ``mufu_per_clk_per_sm`` lanes a clock."""
    rates = []
    if per8:
        rates.append(device.issue_per_clk_per_sm * 32 * 8 / per8)
    if mufu_per8:
        rates.append(device.mufu_per_clk_per_sm * 8 / mufu_per8)
    return (min(rates) if rates else float("inf")) * device.sms * clock_hz


def _pass_time(bytes_moved: float, columns: float, kernel: Optional[Dict[str, Any]], device: DeviceModel
               ) -> Tuple[float, float]:
    """(seconds at the HBM floor, predicted seconds at the slow clock) of one streaming pass."""
    floor = bytes_moved / device.hbm_bytes_per_s
    loop = (kernel or {}).get("streaming_loop") or {}
    per8, cols = loop.get("per_8_columns"), loop.get("columns_per_thread")
    mufu8 = loop["mufu_ex2"] * 8 / cols if cols else None
    rate = stream_columns_per_s(per8, mufu8, device.clock_hz[0], device)
    return floor, max(floor, columns / rate)


def logits_path_model(N: int, V: int, elem: int, fwd: Optional[Dict[str, Any]], bwd: Optional[Dict[str, Any]],
                      masked_fraction: float, skip_masked_forward: bool, device: DeviceModel = H100) -> Dict[str, Any]:
    """Bytes and time of the logits path fwd+bwd (``N`` tokens, ``V`` columns of ``elem`` bytes).

    Forward reads every masked-in row (every row when masked rows are read,
    ``GRPO_FUSED_SKIP_MASKED_ROWS=0``); backward reads the rows with a nonzero incoming gradient
    (masked rows have none) and writes every row (zeros for the rest). DESIGN.md's floor is
    3 x N x V x e bytes (every row read twice and written once). Each pass is predicted as the
    slowest of HBM bandwidth, instruction issue and the MUFU pipe, from its compiled loop.
    """
    nv = N * V
    active = 1.0 - masked_fraction
    fwd_rows = active if skip_masked_forward else 1.0
    fwd_bytes = fwd_rows * nv * elem
    bwd_read, bwd_write = active * nv * elem, nv * elem
    f_floor, f_pred = _pass_time(fwd_bytes, fwd_rows * nv, fwd, device)
    b_floor, b_pred = _pass_time(bwd_read + bwd_write, active * nv, bwd, device)
    design_floor = 3 * nv * elem / device.hbm_bytes_per_s
    return {
        "bytes": {"forward": fwd_bytes, "backward_read": bwd_read, "backward_write": bwd_write,
                  "total": fwd_bytes + bwd_read + bwd_write, "design_floor": 3 * nv * elem},
        "ms": {"design_floor": design_floor * 1e3, "floor": (f_floor + b_floor) * 1e3,
               "predicted": (f_pred + b_pred) * 1e3, "forward": f_pred * 1e3, "backward": b_pred * 1e3},
        "bound": "memory" if f_pred <= f_floor * 1.0001 and b_pred <= b_floor * 1.0001 else "issue",
        "predicted_vs_design_floor": design_floor / (f_pred + b_pred),
    }


def cutoff_sweeps(kernel: Optional[Dict[str, Any]]) -> Dict[str, Optional[Dict[str, Any]]]:
    """The sampling cutoff kernel's streaming loops by role, in source order (SASS keeps it): the
    max sweep (the first loop that loads, no ex2), the ladder sweep (the first with ex2), the
    refining sweeps (the other ex2 loops), the gather sweeps (the loops that store) and the tie
    sweep (the last loop that loads). Loops that load nothing (the scalar bisections) are left out."""
    roles: Dict[str, Optional[Dict[str, Any]]] = dict.fromkeys(("max", "ladder", "refine", "gather", "tie"))
    loads = [loop for loop in (kernel or {}).get("loops", []) if loop["ldg"] > 0]
    if not loads:
        return roles
    ex2 = [loop for loop in loads if loop["mufu_ex2"] > 0]
    stores = [loop for loop in loads if loop["stg"] > 0]
    slowest = lambda loops: max(loops, key=lambda loop: loop["per_8_columns"] or 0) if loops else None  # noqa: E731
    roles.update(max=loads[0], ladder=ex2[0] if ex2 else None, refine=slowest(ex2[1:]), gather=slowest(stores),
                 tie=loads[-1] if loads[-1] not in ex2 + stores + [loads[0]] else None)
    return roles


def sampling_model(N: int, V: int, elem: int, cutoff: Optional[Dict[str, Any]], fwd: Optional[Dict[str, Any]],
                   bwd: Optional[Dict[str, Any]], masked_fraction: float, sweep_bound: int, refine_bound: int,
                   device: DeviceModel = H100) -> Dict[str, Any]:
    """Bytes and time of sampling-support replay on the logits path (grpo_loss with top_k / top_p /
    min_p: the cutoff kernel on every masked-in row, then the vocab op's forward and backward over
    the support), against the same path without a rule.

    Extra bytes: ``sweeps x N_active x V x elem`` (every sweep reads the row once; the gather's
    scratch writes are a few KB a row). Sweeps a row: one stage (top-p or top-k alone) 3: max,
    ladder, gather; both stages 4 (a second gather when top-p's cutoff lies above top-k's
    candidates); the bound ``sweep_bound`` (each stage refining ``refine_bound`` times, one tie
    sweep). Each sweep is predicted as the slowest of HBM and instruction issue from its compiled
    loop; the row kernels over the support as :func:`logits_path_model`. The cutoff kernel holds
    one 256-thread program an SM (registers): 132 rows of ``V x elem`` bytes resident between
    their sweeps, which fit L2 (:func:`two_pass_l2_check`, 1 CTA an SM), so the repeat sweeps may
    read L2 rather than HBM; the prediction charges HBM.
    """
    roles = cutoff_sweeps(cutoff)
    active = (1.0 - masked_fraction) * N * V
    sweep_ms = {}
    for role, loop in roles.items():
        if loop is not None:
            floor, predicted = _pass_time(active * elem, active, {"streaming_loop": loop}, device)
            sweep_ms[role] = {"floor": floor * 1e3, "predicted": predicted * 1e3,
                              "per_8_columns": loop["per_8_columns"]}
    plans = {"one_stage": {"max": 1, "ladder": 1, "gather": 1},
             "two_stages": {"max": 1, "ladder": 1, "gather": 2},
             "bound": {"max": 1, "ladder": 1, "refine": 2 * refine_bound, "gather": 2, "tie": 1}}
    base = logits_path_model(N, V, elem, fwd, bwd, masked_fraction, True, device)
    out: Dict[str, Any] = {"sweep_ms": sweep_ms, "label": PREDICTED, "support_kernels": base}
    for name, plan in plans.items():
        sweeps = sum(plan.values())
        ms = sum(count * sweep_ms.get(role, {}).get("predicted", float("nan")) for role, count in plan.items())
        out[name] = {"sweeps": sweeps, "extra_bytes": sweeps * active * elem, "cutoff_ms": ms,
                     "total_ms": ms + base["ms"]["predicted"]}
    assert plans["bound"]["max"] + plans["bound"]["ladder"] + plans["bound"]["refine"] + plans["bound"]["gather"] + \
        plans["bound"]["tie"] == sweep_bound, "the plan of the bound must add up to the kernel's sweep bound"
    return out


def two_pass_l2_check(V: int, elem: int, ctas_per_sm: Sequence[int], device: DeviceModel = H100) -> List[Dict[str, Any]]:
    """Whether a two-pass row program (statistics sweep, then a gradient sweep re-reading the row)
    can find its row in L2 on the second sweep: every resident program holds one row between its
    sweeps, so ``resident rows x row bytes`` must fit in L2 (with the other half left for the
    streams themselves)."""
    rows = []
    for ctas in ctas_per_sm:
        resident = device.sms * ctas * V * elem
        rows.append({"ctas_per_sm": ctas, "resident_rows": device.sms * ctas, "row_bytes": V * elem,
                     "resident_bytes": resident, "l2_bytes": device.l2_bytes,
                     "fits_half_of_l2": resident <= device.l2_bytes / 2, "fits_l2": resident <= device.l2_bytes})
    return rows


def gemm_rate(block_m: int, block_n: int, operand_bytes: int, device: DeviceModel = H100) -> Tuple[float, float]:
    """FLOP/s of a Triton GEMM main loop whose operand tiles stream from L2: a K-step of a
    ``block_m x block_n`` tile does ``2 m n k`` FLOPs on ``(m + n) k`` operands, so the intensity is
    ``m n / ((m + n) e)`` FLOP per L2 byte; the rate is that times the L2 bandwidth, capped by the
    tensor-core rate (cuBLAS' measured 800 TFLOP/s). Returns (slow, fast) for the L2 range."""
    intensity = 2 * block_m * block_n / ((block_m + block_n) * operand_bytes)
    peak = device.gemm_flops_bf16 if operand_bytes == 2 else device.gemm_flops_fp32_simt
    return tuple(min(peak, intensity * bw) for bw in device.l2_bytes_per_s)


def linear_model(N: int, V: int, H: int, elem: int, fwd_blocks: Optional[Tuple[int, int]],
                 bwd_blocks: Optional[Tuple[int, int]], device: DeviceModel = H100) -> Dict[str, Any]:
    """FLOPs, bytes and time of the fused linear path fwd+bwd, both strategies, at ``N`` tokens.

    chunked: forward 1 GEMM; backward 2 recomputing GEMMs + 2 gradient GEMMs (the dweight pass
    over vocab slices recomputes its logits: no fp32 (V, H) accumulator) = 10 N V H FLOPs at
    cuBLAS' rate; logits are fp32 in HBM: 8 bytes a logit in forward (GEMM write, row-kernel read),
    12 per backward pass (GEMM write 4, row kernel read 4 and bf16 dlogits write 2, GEMM read 2).
    tiled: 8 N V H FLOPs in Triton GEMMs whose operands stream from L2 (:func:`gemm_rate`); the
    backward's gradient GEMMs load their operands once more and reduce dhidden and dweight in L2
    with fp32 atomics: (N / BN) V H 4 + (V / BV) N H 4 bytes.
    """
    nvh, nv = N * V * H, N * V
    out: Dict[str, Any] = {}
    gemm = device.gemm_flops_bf16 if elem == 2 else device.gemm_flops_fp32_simt
    chunked_flops, chunked_bytes = 10 * nvh, (8 + 2 * 12) * nv
    chunked = chunked_flops / gemm + chunked_bytes / device.hbm_bytes_per_s
    out["chunked"] = {"flops": chunked_flops, "logit_bytes": chunked_bytes,
                      "ms": {"gemm_floor": chunked_flops / gemm * 1e3, "predicted": chunked * 1e3},
                      "before_no_cast_pass_ms": (chunked_flops / gemm + 48 * nv / device.hbm_bytes_per_s) * 1e3}
    out["eager_gemm_floor_ms"] = 6 * nvh / gemm * 1e3
    out["design_floor_ms"] = 8 * nvh / device.gemm_flops_bf16 * 1e3
    if fwd_blocks and bwd_blocks:
        fm, fn = fwd_blocks
        bm, bn = bwd_blocks
        f_rate = gemm_rate(fm, fn, elem, device)
        b_rate = gemm_rate(bm, bn, elem, device)
        fwd = [2 * nvh / r for r in f_rate]
        operand_bytes = 2 * nvh * (bm + bn) * elem / (2 * bm * bn)  # one pass of operand tiles through L2
        reductions = (N / bm) * V * H * 4 + (V / bn) * N * H * 4
        bwd = [2 * nvh / r + operand_bytes / l2 + reductions / red
               for r, l2, red in zip(b_rate, device.l2_bytes_per_s, device.l2_reduction_bytes_per_s)]
        fast, slow = fwd[1] + bwd[1], fwd[0] + bwd[0]
        out["tiled"] = {"flops": 8 * nvh, "reduction_bytes": reductions, "forward_tile": [fm, fn],
                        "backward_tile": [bm, bn],
                        "forward_pct_of_800_tflops": [100 * r / device.gemm_flops_bf16 for r in f_rate],
                        "ms": {"gemm_floor": 8 * nvh / gemm * 1e3, "forward": [fwd[1] * 1e3, fwd[0] * 1e3],
                               "backward": [bwd[1] * 1e3, bwd[0] * 1e3], "predicted": [fast * 1e3, slow * 1e3]}}
        out["winner"] = "chunked" if chunked < fast else "tiled"
    return out


# ======================================================================================
# Running it.
# ======================================================================================


def collect(scenarios: Sequence[str], shapes: Shapes, progress=print) -> Dict[str, Any]:
    """Record the scenarios' launches, compile each distinct one, analyze it (this process must
    have imported Triton without ``TRITON_INTERPRET``)."""
    import torch

    os.environ["GRPO_FUSED_CHECK_IDS"] = os.environ.get("GRPO_FUSED_CHECK_IDS", "1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    launches: List[Launch] = []
    errors = []
    for name in scenarios:
        op, _, run = SCENARIOS[name]
        start = time.perf_counter()
        try:
            with record_launches(name) as recorded:
                run(shapes)
        except Exception as e:  # a launcher that fails is reported, the rest goes on
            errors.append({"scenario": name, "error": f"{type(e).__name__}: {e}"})
            continue
        if not recorded:
            errors.append({"scenario": name, "error": "no kernel launched"})
        launches.extend(recorded)
        progress(f"{name}: {len(recorded)} launches recorded in {time.perf_counter() - start:.1f} s")
    seen: Dict[str, Dict[str, Any]] = {}
    kernels = []
    for launch in launches:
        key = launch_key(launch)
        if key in seen:
            seen[key]["scenarios"].append(launch.scenario)
            continue
        try:
            row = analyze(launch, compile_launch(launch))
            failure = launch_failure(launch)
            if failure:
                row["launch_error"] = failure
        except Exception as e:
            row = {"kernel": launch.fn.__name__, "scenario": launch.scenario, "error": f"{type(e).__name__}: {e}"[-4000:]}
        row["scenarios"] = [launch.scenario]
        row["grid_recorded"] = list(launch.grid) if isinstance(launch.grid, tuple) else repr(launch.grid)
        seen[key] = row
        kernels.append(row)
        progress(f"  {row['kernel']}: " + (row.get("error") or
                 f"{row['registers']} regs, {row['spill_stores']}/{row['spill_loads']} B spilled, "
                 f"loop {(row['streaming_loop'] or {}).get('per_8_columns', (row['streaming_loop'] or {}).get('instructions'))}"))
    return {"kernels": kernels, "errors": errors}


def _find(kernels, name, **spec) -> Optional[Dict[str, Any]]:
    for k in kernels:
        if k.get("kernel") == name and all(k.get("specialization", {}).get(a) == v for a, v in spec.items()):
            return k
    return None


def _per8(k) -> Optional[float]:
    loop = (k or {}).get("streaming_loop") or {}
    return loop.get("per_8_columns")


def models(kernels: List[Dict[str, Any]], masked_fraction: float = BENCH_MASKED_FRACTION,
           device: DeviceModel = H100) -> Dict[str, Any]:
    """The op models at the DESIGN shapes, fed with the compiled kernels' loops and tiles."""
    N, NL, V, H = (DESIGN_SHAPES[k] for k in ("tokens", "tokens_long", "vocab", "hidden"))
    elem = 2
    fwd = _find(kernels, "_grpo_logits_fwd_kernel", COMPUTE_ENTROPY="True")
    fwd_plain = _find(kernels, "_grpo_logits_fwd_kernel", COMPUTE_ENTROPY="False")
    bwd = _find(kernels, "_selective_log_softmax_bwd_kernel", HAS_DENTROPY="True", logits_ptr="*bf16/16")
    bwd_plain = _find(kernels, "_selective_log_softmax_bwd_kernel", HAS_DENTROPY="False", logits_ptr="*bf16/16")
    out: Dict[str, Any] = {"assumptions": dict(dataclasses.asdict(device), masked_fraction=masked_fraction,
                                               label=PREDICTED)}
    for label, f, b in (("entropy", fwd, bwd), ("no_entropy", fwd_plain, bwd_plain)):
        for n_label, n in (("N16k", N), ("N128k", NL)):
            for mode, skip in (("skip_masked", True), ("read_masked", False)):
                out[f"grpo_loss/{label}/{n_label}/{mode}"] = logits_path_model(
                    n, V, elem, f, b, masked_fraction, skip, device)
    out["grpo_loss/two_pass/l2_check"] = two_pass_l2_check(V, elem, (1, 2, (fwd or {}).get("ctas_per_sm") or 8), device)

    def blocks(kernel):
        if kernel is None:
            return None
        spec = kernel["specialization"]
        return int(spec["BLOCK_N"]), int(spec["BLOCK_V"])

    tiled_fwd = blocks(_find(kernels, "_linear_lse_fwd_kernel", hidden="*bf16/16"))
    tiled_bwd = blocks(_find(kernels, "_linear_lse_bwd_kernel", hidden="*bf16/16"))
    for n_label, n in (("N16k", N), ("N128k", NL)):
        out[f"linear_grpo_loss/{n_label}"] = linear_model(n, V, H, elem, tiled_fwd, tiled_bwd, device)
    # Sampling-support replay: the cutoff kernel and the row kernels over the support (bf16 logits).
    from grpo_fused.kernels.sampling_support import refine_sweep_bound, sweep_bound

    cutoff = _find(kernels, "_sampling_cutoff_kernel", logits_ptr="*bf16/16", HAS_ROW_MASK="True") or \
        _find(kernels, "_sampling_cutoff_kernel", logits_ptr="*bf16/16")
    support_fwd = _find(kernels, "_selective_log_softmax_fwd_kernel", logits_ptr="*bf16/16", SUPPORT="True",
                        COMPUTE_ENTROPY="True")
    support_bwd = _find(kernels, "_selective_log_softmax_bwd_kernel", logits_ptr="*bf16/16", SUPPORT="True")
    if cutoff is not None:
        for n_label, n in (("N16k", N), ("N128k", NL)):
            out[f"sampling/grpo_loss/{n_label}"] = sampling_model(
                n, V, elem, cutoff, support_fwd, support_bwd, masked_fraction, sweep_bound(32),
                refine_sweep_bound(32), device)
        out["sampling/l2_check"] = two_pass_l2_check(V, elem, (cutoff.get("ctas_per_sm") or 1,), device)
    B = DESIGN_SHAPES["rewards"]
    adv_bytes = B * (4 + 4 + 4 + 8)  # rewards in; advantages, combined rewards, group index out
    out["group_advantages/1M"] = {"bytes": adv_bytes, "ms": {"floor": adv_bytes / device.hbm_bytes_per_s * 1e3}}
    return out


def _git_revision() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def build_report(scenarios: Sequence[str], shapes: Shapes, masked_fraction: float, progress=print) -> Dict[str, Any]:
    import torch
    import triton

    collected = collect(scenarios, shapes, progress)
    ptxas = None
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(TARGET[1]).version
    except Exception:
        pass
    return {
        "kind": "static-sm90a",
        "label": PREDICTED,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": _git_revision(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "ptxas": ptxas},
        "target": "sm_90a",
        "design_shapes": DESIGN_SHAPES,
        "recorded_tokens": shapes.tokens,
        "recorded_hidden": shapes.hidden,
        "scenarios": {name: {"op": SCENARIOS[name][0], "description": SCENARIOS[name][1]} for name in scenarios},
        "kernels": collected["kernels"],
        "errors": collected["errors"],
        "models": models(collected["kernels"], masked_fraction),
    }


# ---------------------------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------------------------


def _fmt_counts(d: Dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) or "none"


def kernel_table(report: Dict[str, Any]) -> str:
    rows = ["| kernel | specialization | regs | spills (st/ld B) | smem | CTAs/SM | 16-B ld/st (loop) "
            "| loop SASS | per 8 cols | fences | atomics | wgmma |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for k in report["kernels"]:
        if "error" in k:
            rows.append(f"| {k['kernel']} | {k['scenario']} | compile error | | | | | | | | | |")
            continue
        spec = k["specialization"]
        flags = [f"{a}={v}" for a, v in spec.items() if a.isupper() and v in ("True",)]
        dtype = next((v for a, v in spec.items() if a in ("logits_ptr", "hidden", "rewards")), "")
        loop = k["streaming_loop"] or {}
        rows.append("| {} | {} | {} | {}/{} | {} | {} ({}) | {}/{} | {} | {} | {} | {} | {} |".format(
            k["kernel"].strip("_"), " ".join([dtype] + flags), k["registers"], k["spill_stores"], k["spill_loads"],
            k["shared_bytes"], k["ctas_per_sm"], k["occupancy_limiter"], loop.get("ldg_128", 0),
            loop.get("stg_128", 0), loop.get("instructions", ""), loop.get("per_8_columns", ""),
            _fmt_counts(loop.get("fences", {})), _fmt_counts(k["atomics"]), k["hgmma"]))
    return "\n".join(rows)


def model_table(report: Dict[str, Any]) -> str:
    m = report["models"]
    rows = [f"| op (V = 151936, H = 3584, bf16; 25 % of positions masked) | N | bytes / FLOPs | floor | "
            f"{PREDICTED} |", "|---|---:|---:|---:|---:|"]
    for n_label, n in (("N16k", 16384), ("N128k", 131072)):
        for label in ("entropy", "no_entropy"):
            for mode in ("skip_masked", "read_masked"):
                x = m.get(f"grpo_loss/{label}/{n_label}/{mode}")
                if x:
                    rows.append(
                        f"| grpo_loss fwd+bwd, {label.replace('_', ' ')}, masked rows "
                        f"{'skipped' if mode == 'skip_masked' else 'read'} | {n} | {x['bytes']['total'] / 1e9:.2f} GB | "
                        f"{x['ms']['floor']:.2f} ms (DESIGN 3-pass floor {x['ms']['design_floor']:.2f} ms) | "
                        f"{x['ms']['predicted']:.2f} ms ({x['bound']}-bound) |")
    for n_label, n in (("N16k", 16384), ("N128k", 131072)):
        x = m.get(f"sampling/grpo_loss/{n_label}")
        if not x:
            continue
        plain = m.get(f"grpo_loss/entropy/{n_label}/skip_masked", {}).get("ms", {}).get("predicted", float("nan"))
        for plan in ("one_stage", "two_stages", "bound"):
            y = x[plan]
            rows.append(f"| grpo_loss fwd+bwd with a sampling rule ({plan.replace('_', ' ')}: {y['sweeps']} cutoff "
                        f"sweeps) | {n} | +{y['extra_bytes'] / 1e9:.1f} GB | | {y['total_ms']:.1f} ms "
                        f"(cutoff {y['cutoff_ms']:.1f}; plain path {plain:.2f}) |")
    for n_label, n in (("N16k", 16384), ("N128k", 131072)):
        x = m.get(f"linear_grpo_loss/{n_label}")
        if not x:
            continue
        c = x["chunked"]
        rows.append(f"| linear_grpo_loss chunked | {n} | {c['flops'] / 1e12:.0f} TFLOP + {c['logit_bytes'] / 1e9:.0f} GB | "
                    f"{c['ms']['gemm_floor']:.0f} ms | {c['ms']['predicted']:.0f} ms |")
        if "tiled" in x:
            t = x["tiled"]
            rows.append(f"| linear_grpo_loss tiled ({t['backward_tile'][0]} x {t['backward_tile'][1]} tiles) | {n} | "
                        f"{t['flops'] / 1e12:.0f} TFLOP + {t['reduction_bytes'] / 1e9:.0f} GB of L2 reductions | "
                        f"{t['ms']['gemm_floor']:.0f} ms | {t['ms']['predicted'][0]:.0f}-{t['ms']['predicted'][1]:.0f} ms |")
            rows.append(f"| linear_grpo_loss `strategy=\"auto\"` | {n} | | | {x['winner']} |")
    return "\n".join(rows)


def cutoff_table(report: Dict[str, Any]) -> str:
    """The sampling cutoff kernel's sweeps (SASS instructions per 8 columns a thread, by role)."""
    roles = ("max", "ladder", "refine", "gather", "tie")
    rows = ["| sampling cutoff kernel | regs | spills (st/ld B) | CTAs/SM | " + " | ".join(roles) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(roles)]
    for k in report["kernels"]:
        if k.get("kernel") != "_sampling_cutoff_kernel" or "error" in k:
            continue
        spec = k["specialization"]
        flags = [f"{a}={v}" for a, v in spec.items() if a.isupper() and v == "True"]
        sweeps = cutoff_sweeps(k)
        rows.append("| {} | {} | {}/{} | {} | {} |".format(
            " ".join([spec.get("logits_ptr", "")] + flags), k["registers"], k["spill_stores"], k["spill_loads"],
            k["ctas_per_sm"], " | ".join(str((sweeps[r] or {}).get("per_8_columns", "")) for r in roles)))
    return "\n".join(rows)


def render(report: Dict[str, Any]) -> str:
    return (f"Static sm_90a report ({report['versions']}, git {report['git']}, {report['date']}); "
            f"every time below is {PREDICTED}.\n\n" + kernel_table(report) + "\n\n" + cutoff_table(report) + "\n\n"
            + model_table(report) + "\n")


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def _child(args) -> int:
    shapes = Shapes(tokens=args.record_tokens, hidden=args.hidden or DESIGN_SHAPES["hidden"])
    report = build_report(args.scenarios, shapes, args.masked_fraction,
                          progress=lambda s: print(s, file=sys.stderr, flush=True))
    with open(args.child_out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    return 0


def run_child(scenarios: Sequence[str], record_tokens: int = RECORD_TOKENS,
              masked_fraction: float = BENCH_MASKED_FRACTION, timeout: float = CHILD_TIMEOUT_S,
              quiet: bool = False, hidden: Optional[int] = None) -> Dict[str, Any]:
    """The report of ``scenarios``, built in a fresh process without ``TRITON_INTERPRET`` and with a
    cold Triton cache (every kernel really compiles, and ptxas' log is there to read). ``hidden``
    overrides H of the recorded linear launches (a runtime loop bound and stride to the kernels:
    any multiple of 16 compiles to the same binary as 3584; the models keep the DESIGN H)."""
    with tempfile.TemporaryDirectory(prefix="grpo-fused-static-") as work:
        out = os.path.join(work, "report.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = os.path.join(work, "triton-cache")
        cmd = [sys.executable, "-m", "grpo_fused.benchmarks.static_report", "--child-out", out,
               "--record-tokens", str(record_tokens), "--masked-fraction", str(masked_fraction),
               "--scenarios", *scenarios] + (["--hidden", str(hidden)] if hidden else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if not quiet and proc.stderr:
            print(proc.stderr, file=sys.stderr, end="")
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"static report child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-8000:]}")
        with open(out) as f:
            return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--record-tokens", type=int, default=RECORD_TOKENS,
                        help="tokens of the recorded launches (a runtime int to the kernels; the models use N = 16384)")
    parser.add_argument("--masked-fraction", type=float, default=BENCH_MASKED_FRACTION,
                        help="fraction of masked positions in the byte models (the bench's mask: 0.25)")
    parser.add_argument("--hidden", type=int, default=None,
                        help="H of the recorded linear launches (default 3584; any multiple of 16 compiles the same)")
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_out:
        return _child(args)
    missing = toolchain_missing()
    if missing:
        print(f"static report: skipped ({missing})", file=sys.stderr)
        return 0
    report = run_child(args.scenarios, args.record_tokens, args.masked_fraction, hidden=args.hidden)
    print(render(report))
    if not args.no_save:
        os.makedirs(args.out_dir, exist_ok=True)
        stamp = report["date"].replace("-", "").replace(":", "")
        path = os.path.join(args.out_dir, f"static-sm90a-{stamp}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {path}")
    return 1 if report["errors"] or any("error" in k for k in report["kernels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
