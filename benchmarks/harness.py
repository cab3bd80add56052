"""Benchmark harness: providers x cases, timing, peak memory, device floors, JSON results.

Used by ``grpo-fused bench`` / ``grpo-fused profile-memory`` (:mod:`grpo_fused.cli`) and by the
pytest-benchmark suite in ``benchmarks/``. Nothing here is imported by the package itself.

Providers are discovered at run time:

* ``eager``: :func:`grpo_fused.reference.grpo_loss` / ``linear_grpo_loss`` called directly, the
  TRL-style eager PyTorch baseline (fp32 ``(N, V)`` logits materialized), entropy computed (the
  bench config's default); ``eager-noent``: the same without the entropy (``compute_entropy=False``).
* ``trl``, ``trl-noent`` (logits path): TRL 1.16's own vocabulary-pass arithmetic
  (:func:`trl_vocab_pass`: ``selective_log_softmax``, and ``entropy_from_logits`` under
  ``no_grad`` for its entropy metric, as GRPOTrainer runs them without Triton), then the same
  ``(B, T)`` tail; ``-noent`` skips the entropy, as TRL does when it neither logs nor uses it.
* ``compile``: ``torch.compile`` of the same function; reported as unavailable when compiling fails.
* ``triton``, ``triton-inplace`` (logits path), ``triton-chunked``, ``triton-tiled`` (linear path),
  ``cpp``, ``cpp-inplace``: the public API with ``backend=`` / ``strategy=`` /
  ``inplace_backward=``. A ``RuntimeError`` saying the backend "cannot run" marks it unavailable,
  with that reason.
* ``liger``: Liger-Kernel's ``triton_grpo_loss`` (logits path) and ``LigerFusedLinearGRPOLoss``
  (linear path) when ``liger_kernel`` is importable and the device is CUDA.

Each (op, provider) runs in a fresh Python subprocess, so a crash, an out-of-memory or a slow
compile stays contained and peak memory is measured from a clean process.

Timing: ``warmup`` untimed fwd+bwd iterations, then ``reps`` iterations each timed in three
segments (forward, backward, both) with CUDA events (L2 flushed before each) on GPU or
``time.perf_counter`` on CPU; reported as median, 20th / 80th percentile, min and max.

Peak memory (bytes beyond the inputs, over one fwd+bwd that also allocates the gradients):
on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the
allocated bytes before the call; on CPU the process's peak resident set (``VmHWM``, reset by
writing 5 to ``/proc/self/clear_refs``) minus its resident set before the call, with glibc told
to return freed blocks above 128 KiB to the system (``mallopt``) so freed memory is not counted
twice or hidden. Where ``clear_refs`` cannot be written, ``ru_maxrss`` over the first call is used
(and that includes one-time initialization); the JSON names the method used.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

OPS = ("logits", "linear")
MODES = ("fwd", "bwd", "fwd+bwd")
RESULT_SCHEMA = 1

# Nominal HBM bandwidth (bytes/s) of GPUs we know, matched in order against the device name.
# DESIGN.md's floors use the H100 SXM's 3.35 TB/s. Unknown devices use the measured copy rate.
NOMINAL_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("GH200", 4.0e12),  # before "H200", which its name contains
    ("H200", 4.8e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
)

# The loss every provider computes in the benchmark: DAPO normalizer, asymmetric clip, k3 KL
# against a reference policy, entropy metric on (TRL's defaults plus beta, as in its docs' DAPO
# recipe). Liger's kernels are given the same hyperparameters (they compute no entropy).
BENCH_CONFIG = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.04, temperature=1.0)


# ----------------------------------------------------------------------------------------------
# Cases and the work they represent.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem size.

    Attributes:
        op: ``"logits"`` (loss from ``(B, T, V)`` logits) or ``"linear"`` (from ``(B, T, H)``
            hidden states and a ``(V, H)`` lm_head weight).
        B, T, V: sequences, completion positions, vocabulary. H: hidden size (linear only).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` of logits / hidden / weight.
    """

    op: str
    B: int
    T: int
    V: int
    H: Optional[int] = None
    dtype: str = "float32"

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def work(self) -> Dict[str, float]:
        """Bytes (logits path) or FLOPs (linear path) per mode; see :data:`WORK_MODELS`."""
        if self.op == "logits":
            # Logits path, HBM-bound: fwd reads the (N, V) logits once; bwd reads them again and
            # writes dlogits (N, V). Everything of size N is negligible next to N*V.
            nv_bytes = self.N * self.V * self.elem_bytes
            return {"fwd": nv_bytes, "bwd": 2 * nv_bytes, "fwd+bwd": 3 * nv_bytes}
        # Linear path, GEMM-bound: fwd is one GEMM (N, H) x (H, V) = 2*N*V*H FLOPs; a fused bwd
        # recomputes the logits and runs the two gradient GEMMs = 3 more. 4 GEMMs = 8*N*V*H in all
        # (DESIGN.md section 5). Eager does no recompute (6*N*V*H), so its figure here is a model
        # rate on the same yardstick, not the rate its hardware ran at.
        gemm = 2 * self.N * self.V * self.H
        return {"fwd": gemm, "bwd": 3 * gemm, "fwd+bwd": 4 * gemm}

    @property
    def work_unit(self) -> str:
        return "bytes" if self.op == "logits" else "flops"

    @property
    def label(self) -> str:
        return f"{self.op} N={self.N}"

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["N"] = self.N
        d["work"] = self.work()
        d["work_unit"] = self.work_unit
        return d


WORK_MODELS = {
    "logits": "bytes: fwd N*V*e (read logits), bwd 2*N*V*e (read logits, write dlogits), "
    "fwd+bwd 3*N*V*e; e = element size; N-sized tensors ignored; floor = bytes / HBM bandwidth",
    "linear": "FLOPs: fwd 2*N*V*H (one GEMM), bwd 6*N*V*H (recompute logits + dhidden + dweight), "
    "fwd+bwd 8*N*V*H (4 GEMMs, DESIGN.md section 5); floor = FLOPs / measured GEMM rate; eager "
    "does 6*N*V*H (no recompute), so its rate is on the same yardstick, not its hardware rate",
}


def default_cases(device_type: str, ops: Sequence[str] = OPS, long: bool = False) -> List[Case]:
    """DESIGN.md reference shapes on GPU (Qwen2.5-7B head, bf16, N = 8 x 2048); small fp32 on CPU.

    ``long`` adds DESIGN.md's long-sequence linear case (N = 1 x 131072) on GPU, where eager runs
    out of memory on an 80 GB device. The CPU shapes keep ``grpo-fused bench`` short on 2 cores
    (eager fwd+bwd at N=256, V=32000 takes ~0.7 s there); V stays a real vocabulary size.
    """
    if device_type == "cuda":
        shapes = {"logits": [Case("logits", 8, 2048, 151936, None, "bfloat16")],
                  "linear": [Case("linear", 8, 2048, 151936, 3584, "bfloat16")]}
        if long:
            shapes["linear"].append(Case("linear", 1, 131072, 151936, 3584, "bfloat16"))
    else:
        shapes = {"logits": [Case("logits", 2, 128, 32000, None, "float32")],
                  "linear": [Case("linear", 2, 128, 32000, 256, "float32")]}
    return [case for op in ops for case in shapes[op]]


def default_sweep(device_type: str) -> Dict[str, Any]:
    """Sequence lengths of ``profile-memory``: 1k to 128k tokens (B = 1) on GPU, 128 to 1024 on CPU."""
    if device_type == "cuda":
        return dict(B=1, seq_lens=[1024 * 2**i for i in range(8)], V=151936, H=3584, dtype="bfloat16")
    return dict(B=1, seq_lens=[128, 256, 512, 1024], V=32000, H=256, dtype="float32")


# ----------------------------------------------------------------------------------------------
# Providers.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation of one op.

    Attributes:
        name: short name shown in tables (``eager``, ``triton-chunked``, ...).
        op: ``"logits"`` or ``"linear"``.
        kind: ``"eager"``, ``"compile"``, ``"api"`` (public grpo_fused API) or ``"liger"``.
        backend / strategy / inplace: the API arguments of an ``"api"`` provider.
        description: one line for the report.
    """

    name: str
    op: str
    kind: str
    description: str
    backend: Optional[str] = None
    strategy: Optional[str] = None
    inplace: bool = False


PROVIDERS = (
    Provider("eager", "logits", "eager", "grpo_fused.reference (TRL-style eager PyTorch)"),
    Provider("eager-noent", "logits", "eager", "grpo_fused.reference without the entropy"),
    Provider("trl", "logits", "eager", "TRL 1.16's arithmetic (selective_log_softmax; entropy_from_logits "
             "under no_grad)"),
    Provider("trl-noent", "logits", "eager", "TRL 1.16's arithmetic without the entropy"),
    Provider("compile", "logits", "compile", "torch.compile of the eager reference"),
    Provider("triton", "logits", "api", "grpo_fused logits path, backend='triton'", backend="triton"),
    Provider("triton-inplace", "logits", "api", "grpo_fused logits path, triton, dlogits written into "
             "the logits", backend="triton", inplace=True),
    Provider("cpp", "logits", "api", "grpo_fused logits path, backend='cpp'", backend="cpp"),
    Provider("cpp-inplace", "logits", "api", "grpo_fused logits path, cpp, dlogits written into the "
             "logits", backend="cpp", inplace=True),
    Provider("liger", "logits", "liger", "Liger-Kernel triton_grpo_loss"),
    Provider("eager", "linear", "eager", "grpo_fused.reference (materializes fp32 logits)"),
    Provider("eager-noent", "linear", "eager", "grpo_fused.reference without the entropy"),
    Provider("compile", "linear", "compile", "torch.compile of the eager reference"),
    Provider("triton-chunked", "linear", "api", "grpo_fused linear path, triton, strategy='chunked'",
             backend="triton", strategy="chunked"),
    Provider("triton-tiled", "linear", "api", "grpo_fused linear path, triton, strategy='tiled'",
             backend="triton", strategy="tiled"),
    Provider("cpp", "linear", "api", "grpo_fused linear path, backend='cpp'", backend="cpp", strategy="auto"),
    Provider("liger", "linear", "liger", "Liger-Kernel LigerFusedLinearGRPOLoss"),
)


def providers_for(op: str, names: Optional[Sequence[str]] = None) -> List[Provider]:
    """The providers of ``op``, all of them or those named (unknown names raise ValueError)."""
    ours = [p for p in PROVIDERS if p.op == op]
    if names is None:
        return ours
    known = {p.name for p in PROVIDERS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; known: {sorted(known)}")
    return [p for p in ours if p.name in names]


def _liger_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "Liger-Kernel runs on CUDA tensors only"
    try:
        import liger_kernel  # noqa: F401
    except ImportError as exc:
        return f"liger_kernel is not installed ({exc})"
    return None


def static_reason(provider: Provider, device: torch.device) -> Optional[str]:
    """Why ``provider`` cannot run on ``device`` without trying it, or None."""
    if provider.kind == "liger":
        return _liger_reason(device)
    if provider.kind == "api" and provider.backend == "triton" and device.type != "cuda":
        # Triton on CPU tensors is its interpreter: correct, but its timings say nothing.
        return "Triton on CPU tensors runs only under TRITON_INTERPRET=1, whose timings mean nothing"
    return None


def probe(provider: Provider, device: torch.device) -> Optional[Dict[str, str]]:
    """None when ``provider`` runs a tiny fwd+bwd on ``device``, else ``{"status", "reason"}``.

    The dispatcher's "not available" answers (a RuntimeError saying the backend "cannot run" the
    op, or NotImplementedError) give status ``"unavailable"``; any other exception is a bug in the
    provider and gives status ``"error"`` with the exception, so one broken backend never stops
    the others from being measured.
    """
    reason = static_reason(provider, device)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    if provider.kind in ("eager", "compile", "liger"):
        return None
    case = Case(provider.op, 2, 3, 37, 8 if provider.op == "linear" else None, "float32")
    try:
        inputs = make_inputs(case, device, seed=0)
        build_step(provider, case, inputs)().backward()
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        missing = isinstance(exc, NotImplementedError) or (
            isinstance(exc, RuntimeError) and ("cannot run" in text or "not implemented" in text))
        return {"status": "unavailable" if missing else "error",
                "reason": (text if missing else f"{type(exc).__name__}: {text}")[:500]}
    return None


# ----------------------------------------------------------------------------------------------
# Inputs and one training step per provider.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def bench_config():
    """The :class:`GRPOConfig` of :data:`BENCH_CONFIG`, one object per process (compile guards on it)."""
    from grpo_fused.semantics import GRPOConfig

    return GRPOConfig(**BENCH_CONFIG)


@functools.lru_cache(maxsize=None)
def bench_config_without_entropy():
    """:func:`bench_config` with ``compute_entropy=False`` (the ``-noent`` baselines)."""
    from grpo_fused.semantics import GRPOConfig

    return GRPOConfig(**BENCH_CONFIG, compute_entropy=False)


def _eager_logits_loss(logits, ids, adv, mask, old, ref, config):
    from grpo_fused.reference import grpo_loss

    return grpo_loss(logits, ids, adv, mask, old, ref, config=config).loss


def _eager_linear_loss(hidden, weight, ids, adv, mask, old, ref, config):
    from grpo_fused.reference import linear_grpo_loss

    return linear_grpo_loss(hidden, weight, ids, adv, mask, old, ref, config=config).loss


def trl_vocab_pass(logits, ids, temperature: float = 1.0, compute_entropy: bool = False):
    """TRL 1.16's per-token log-probs and entropy of ``(B, T, V)`` logits, its arithmetic verbatim.

    ``trl/trainer/utils.py`` as ``GRPOTrainer`` runs it where its Triton kernel does not apply (any
    CPU tensor): the logits divided by the temperature; ``selective_log_softmax``: for fp32 / fp64
    a gather minus a per-sequence ``logsumexp``, for bf16 / fp16 a per-sequence ``log_softmax`` in
    the logits' dtype and a gather (its comment: logsumexp is unstable in bf16); the entropy, a
    logged metric, by ``entropy_from_logits`` (``log_softmax`` of 128-row chunks, ``-sum(p log p)``)
    under ``torch.no_grad()``. Returns ``(logps, entropy or None)`` in the logits' dtype.
    """
    import torch.nn.functional as F

    if temperature != 1.0:
        logits = logits / temperature
    index = ids.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index)
        lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])  # loop to reduce peak mem
        logps = (selected - lse.unsqueeze(-1)).squeeze(-1)
    else:
        logps = torch.stack([F.log_softmax(row, dim=-1).gather(dim=-1, index=row_ids)
                             for row, row_ids in zip(logits, index)]).squeeze(-1)
    entropy = None
    if compute_entropy:
        with torch.no_grad():
            flat = logits.reshape(-1, logits.shape[-1])
            chunks = []
            for chunk in flat.split(128, dim=0):
                chunk_logps = F.log_softmax(chunk, dim=-1)
                chunks.append(-(torch.exp(chunk_logps) * chunk_logps).sum(-1))
            entropy = torch.cat(chunks, dim=0).reshape(logits.shape[:-1])
    return logps, entropy


def _trl_logits_loss(logits, ids, adv, mask, old, ref, config):
    from grpo_fused.semantics import LossBatch, compute_dtype, grpo_output

    logps, entropy = trl_vocab_pass(logits, ids, config.temperature, config.compute_entropy)
    dtype = compute_dtype(logits.dtype)  # the (B, T) tail in fp32, as TRL's loss promotes to
    batch = LossBatch(ids, adv, mask, old, ref)
    return grpo_output(logps.to(dtype), None if entropy is None else entropy.to(dtype), batch, config.params).loss


# The function and config behind each provider of kind "eager", by (op, name).
_EAGER_BASELINES = {
    ("logits", "eager"): (_eager_logits_loss, True),
    ("logits", "eager-noent"): (_eager_logits_loss, False),
    ("logits", "trl"): (_trl_logits_loss, True),
    ("logits", "trl-noent"): (_trl_logits_loss, False),
    ("linear", "eager"): (_eager_linear_loss, True),
    ("linear", "eager-noent"): (_eager_linear_loss, False),
}


@functools.lru_cache(maxsize=None)
def _compiled(op: str, dynamic: Optional[bool]):
    # One compiled function per (op, dynamic) and process, so a sweep over lengths reuses it.
    return torch.compile(_eager_logits_loss if op == "logits" else _eager_linear_loss, dynamic=dynamic)


def make_inputs(case: Case, device, seed: int = 0, extra_position: bool = False) -> Dict[str, torch.Tensor]:
    """Fresh random inputs for ``case`` (never zeros): a realistic off-policy GRPO batch.

    Logits are N(0, 1) (linear: hidden N(0, 1), weight N(0, 1/H), so logits are N(0, 1) too);
    each sequence has a random length in ``[T/2, T]`` (mask); ``old_logps`` and ``ref_logps`` are
    the current log-probs plus N(0, 0.1) noise, so some tokens clip. ``extra_position`` appends one
    logits position per sequence (Liger's ``triton_grpo_loss`` takes ``(B, T+1, V)``).
    """
    from grpo_fused.reference import selective_log_softmax

    device = torch.device(device)
    # Drawn on the device in the target dtype: at N = 131072, V = 151936 an fp32 host copy of
    # the logits would be 80 GB.
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, V, dtype = case.B, case.T, case.V, case.torch_dtype

    def randn(*shape, dtype=dtype, scale=1.0):
        x = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
        return x.mul_(scale) if scale != 1.0 else x

    inputs: Dict[str, torch.Tensor] = {}
    if case.op == "logits":
        inputs["logits"] = randn(B, T + int(extra_position), V).requires_grad_()
    else:
        inputs["hidden"] = randn(B, T, case.H).requires_grad_()
        inputs["weight"] = randn(V, case.H, scale=case.H ** -0.5).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=gen, device=device)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=gen, device=device)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).to(torch.float32)

    # Current log-probs a block of rows at a time, so that making the inputs never needs more
    # than a (rows, V) fp32 block beyond them.
    logps = torch.empty(B, T, dtype=torch.float32, device=device)
    rows = max(1, (1 << (28 if device.type == "cuda" else 26)) // V)
    with torch.no_grad():
        for b in range(B):
            for start in range(0, T, rows):
                stop = min(start + rows, T)
                if case.op == "logits":
                    block = inputs["logits"][b, start:stop]  # (rows, V), a contiguous slice
                else:
                    block = torch.nn.functional.linear(inputs["hidden"][b, start:stop], inputs["weight"])
                logps[b, start:stop] = selective_log_softmax(block, ids[b, start:stop])[0].float()
                del block
    inputs["completion_ids"] = ids
    inputs["advantages"] = randn(B, dtype=torch.float32)
    inputs["completion_mask"] = mask
    inputs["old_logps"] = logps + 0.1 * randn(B, T, dtype=torch.float32)
    inputs["ref_logps"] = logps + 0.1 * randn(B, T, dtype=torch.float32)
    return inputs


def leaves(inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """The tensors that receive gradients."""
    return [t for t in inputs.values() if t.requires_grad]


def build_step(provider: Provider, case: Case, inputs: Dict[str, torch.Tensor],
               dynamic: Optional[bool] = None) -> Callable[[], torch.Tensor]:
    """A zero-argument function running the forward and returning the scalar loss.

    ``dynamic`` is passed to ``torch.compile`` (``None``: its default) by the ``compile`` provider.
    """
    from grpo_fused import api

    cfg = bench_config()
    x = dict(inputs)
    if case.op == "logits":
        # In training the logits come out of the lm_head, not a leaf. A leaf whose gradient aliases
        # it would be cloned by autograd's gradient accumulation, hiding what an in-place backward
        # saves; a view makes the logits a non-leaf at no cost, for every provider alike.
        x["logits"] = inputs["logits"].view_as(inputs["logits"])
    if provider.kind in ("eager", "compile"):
        args = (x["logits"],) if case.op == "logits" else (x["hidden"], x["weight"])
        if provider.kind == "compile":
            fn = _compiled(case.op, dynamic)
        else:
            fn, with_entropy = _EAGER_BASELINES[(case.op, provider.name)]
            cfg = cfg if with_entropy else bench_config_without_entropy()
        args = args + (x["completion_ids"], x["advantages"], x["completion_mask"], x["old_logps"], x["ref_logps"], cfg)
        return lambda: fn(*args)
    rest = (x["completion_ids"], x["advantages"], x["completion_mask"], x["old_logps"], x["ref_logps"])
    if provider.kind == "api":
        if case.op == "logits":
            return lambda: api.grpo_loss(x["logits"], *rest, config=cfg, backend=provider.backend,
                                         inplace_backward=provider.inplace).loss
        return lambda: api.linear_grpo_loss(x["hidden"], x["weight"], *rest, config=cfg,
                                            strategy=provider.strategy, backend=provider.backend).loss
    if provider.kind == "liger":
        return _liger_step(case, x, cfg)
    raise ValueError(f"unknown provider kind {provider.kind!r}")


def _liger_step(case: Case, x, cfg):
    ids, adv, mask, old, ref = (x["completion_ids"], x["advantages"], x["completion_mask"],
                                x["old_logps"], x["ref_logps"])
    if case.op == "logits":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        # inplace=False: like our default call, the logits stay intact for the next repetition.
        def step():
            loss, _ = triton_grpo_loss(x["logits"], old, ref, ids, adv, mask, temperature=cfg.temperature,
                                       beta=cfg.beta, eps_low=cfg.epsilon_low, eps_high=cfg.eps_high,
                                       inplace=False, loss_type=cfg.loss_type, reduce=True)
            return loss
        return step
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.eps_high,
                                      loss_type=cfg.loss_type, temperature=cfg.temperature, use_ref_model=True)

    def step():
        out = module(x["hidden"], x["weight"], ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
        return out[0] if isinstance(out, (tuple, list)) else out
    return step


# ----------------------------------------------------------------------------------------------
# Measurement.
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def summarize(samples_ms: Sequence[float]) -> Dict[str, float]:
    """Median, 20th / 80th percentiles, min, max of a list of times in ms."""
    s = sorted(samples_ms)

    def pct(q):
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)

    return {"median": statistics.median(s), "p20": pct(0.2), "p80": pct(0.8), "min": s[0], "max": s[-1],
            "reps": len(s)}


def time_fwd_bwd(step: Callable[[], torch.Tensor], grad_tensors, device: torch.device, warmup: int,
                 reps: int) -> Dict[str, Dict[str, float]]:
    """Times ``reps`` iterations of forward + backward after ``warmup``; returns summarize() per mode.

    Every repetition is timed in three segments (fwd, bwd, fwd+bwd end to end) in one pass.
    On CUDA, a 256 MiB buffer is zeroed before each repetition so the L2 cache starts cold.
    """
    for _ in range(warmup):
        _clear_grads(grad_tensors)
        step().backward()
    _sync(device)
    fwd, bwd, total = [], [], []
    if device.type == "cuda":
        flush = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)
        events = []
        for _ in range(reps):
            _clear_grads(grad_tensors)
            flush.zero_()
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            loss = step()
            e[1].record()
            loss.backward()
            e[2].record()
            events.append(e)
        torch.cuda.synchronize(device)
        for e in events:
            fwd.append(e[0].elapsed_time(e[1]))
            bwd.append(e[1].elapsed_time(e[2]))
            total.append(e[0].elapsed_time(e[2]))
    else:
        for _ in range(reps):
            _clear_grads(grad_tensors)
            t0 = time.perf_counter()
            loss = step()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            total.append((t2 - t0) * 1e3)
    _clear_grads(grad_tensors)
    return {"fwd": summarize(fwd), "bwd": summarize(bwd), "fwd+bwd": summarize(total)}


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _return_freed_memory_to_os():
    # glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, so a
    # tensor freed and reallocated would not move the resident set. Pin the threshold at 128 KiB
    # and trim what is already held.
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_memory_method() -> str:
    if _reset_rss_peak():
        return ("cpu-rss: peak resident set (VmHWM, reset via /proc/self/clear_refs) minus resident set "
                "before the fwd+bwd, fresh subprocess per provider, glibc mmap threshold pinned at 128 KiB; "
                f"bench: one settling fwd+bwd after pinning, then the least of {CPU_MEMORY_REPS} fwd+bwd")
    return "cpu-ru_maxrss: ru_maxrss over the first fwd+bwd minus the resident set before it (includes init)"


# On CPU the first fwd+bwd after pinning glibc's threshold, and GEMMs (whose library keeps its own
# buffers), read up to one (N, V) fp32 buffer high now and then (measured: eager logits path at
# N=256, V=32000 gave 195, 164, 164 MiB in a row); one settling run and the least of three agree.
CPU_MEMORY_REPS = 3


def settled_peak_memory(step: Callable[[], torch.Tensor], grad_tensors, device: torch.device) -> int:
    """:func:`peak_memory` as the bench reports it: on CPU, one settling run and the least of several."""
    if device.type == "cuda":
        return peak_memory(step, grad_tensors, device)
    _return_freed_memory_to_os()
    _clear_grads(grad_tensors)
    step().backward()
    return min(peak_memory(step, grad_tensors, device) for _ in range(CPU_MEMORY_REPS))


def peak_memory(step: Callable[[], torch.Tensor], grad_tensors, device: torch.device) -> int:
    """Bytes allocated beyond the inputs at the peak of one fwd+bwd (gradients included)."""
    _clear_grads(grad_tensors)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step().backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        _return_freed_memory_to_os()
        if _reset_rss_peak():
            base = _proc_status_kib("VmRSS")
            step().backward()
            peak = (_proc_status_kib("VmHWM") - base) * 1024
        else:
            import resource

            base = _proc_status_kib("VmRSS") or 0
            step().backward()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base * 1024
    _clear_grads(grad_tensors)
    return int(peak)


def memory_method(device_type: str) -> str:
    if device_type == "cuda":
        return "cuda: max_memory_allocated after reset_peak_memory_stats minus allocated before the fwd+bwd"
    return cpu_memory_method()


def timing_method(device_type: str) -> str:
    if device_type == "cuda":
        return "cuda events around fwd / bwd of each repetition, L2 flushed (256 MiB write) before each"
    return "time.perf_counter around fwd / bwd of each repetition"


# ----------------------------------------------------------------------------------------------
# Device floors.
# ----------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def measure_floors(device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """The device's bandwidth and GEMM rate: the two floors every figure is compared with.

    Bandwidth: the nominal HBM rate for known GPUs, else a measured device-to-device copy
    (read + write bytes over the median time). GEMM rate: a measured square matmul in ``dtype``
    (8192 on GPU, 1024 on CPU), median of several.
    """
    floors: Dict[str, Any] = {}
    name = device_name(device)
    gpu = device.type == "cuda"

    def median_seconds(fn, reps):
        fn()
        _sync(device)
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    n_bytes = (1 << 30) if gpu else (1 << 26)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_rate = 2 * n_bytes / median_seconds(lambda: dst.copy_(src), 10 if gpu else 5)
    del src, dst
    floors["copy_bandwidth_measured"] = copy_rate
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH if gpu and key in name), None)
    floors["bandwidth"] = nominal if nominal is not None else copy_rate
    floors["bandwidth_source"] = f"nominal for {name}" if nominal is not None else "measured copy"

    n = 8192 if gpu else 1024
    gemm_dtype = dtype if gpu else torch.float32
    a = torch.randn(n, n, device=device).to(gemm_dtype)
    b = torch.randn(n, n, device=device).to(gemm_dtype)
    floors["gemm_flops"] = 2 * n**3 / median_seconds(lambda: a @ b, 10 if gpu else 3)
    floors["gemm_source"] = f"measured {n}x{n}x{n} {str(gemm_dtype).replace('torch.', '')} matmul"
    return floors


def environment(device: torch.device) -> Dict[str, Any]:
    """Device, versions, date, git revision: the header of every results file."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "liger_kernel", "grpo_fused"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "installed")
        except ImportError:
            versions[mod] = None
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device)},
        "cpu_only": device.type != "cuda",
        "host": platform.node(),
        "platform": platform.platform(),
        "versions": versions,
        "git_revision": rev,
        # Other work on a shared machine skews timings; the load average says how much there was.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # GRPO_FUSED_CHECK_IDS=0 drops the public API's id range check (one host sync per call).
        "environment_variables": {k: os.environ.get(k) for k in (
            "GRPO_FUSED_CHECK_IDS", "TRITON_INTERPRET", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")},
    }


# ----------------------------------------------------------------------------------------------
# Subprocess workers.
# ----------------------------------------------------------------------------------------------


def _provider_by(op: str, name: str) -> Provider:
    return next(p for p in PROVIDERS if p.op == op and p.name == name)


def _worker_bench(spec) -> Dict[str, Any]:
    device = torch.device(spec["device"])
    case = Case(**spec["case"])
    provider = _provider_by(case.op, spec["provider"])
    inputs = make_inputs(case, device, seed=spec.get("seed", 0), extra_position=provider.kind == "liger")
    grads = leaves(inputs)
    rss_reset_works = device.type == "cpu" and _reset_rss_peak()
    try:
        step = build_step(provider, case, inputs)
        if device.type == "cpu" and not rss_reset_works:
            # ru_maxrss cannot be reset: the first call is the only one it can measure.
            peak = peak_memory(step, grads, device)
        _clear_grads(grads)
        step().backward()  # first call: compiles, autotunes, or says the backend is missing
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "reason": str(exc).splitlines()[0][:300]}
    except Exception as exc:  # reported back with its type, listed in the output
        return {"status": "unavailable" if provider.kind == "compile" else "error",
                "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    try:
        times = time_fwd_bwd(step, grads, device, spec["warmup"], spec["reps"])
        if device.type == "cuda" or rss_reset_works:
            peak = settled_peak_memory(step, grads, device)
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "reason": str(exc).splitlines()[0][:300]}
    return {"status": "ok", "time_ms": times, "peak_memory_bytes": peak}


def _worker_sweep(spec) -> Dict[str, Any]:
    device = torch.device(spec["device"])
    op, provider = spec["op"], _provider_by(spec["op"], spec["provider"])
    points = []
    failed = None
    if device.type == "cpu":
        _return_freed_memory_to_os()
    for i, c in enumerate(spec["cases"]):
        case = Case(**c)
        if failed is not None:
            points.append({"T": case.T, "N": case.N, "status": "skipped", "reason": failed})
            continue
        try:
            inputs = make_inputs(case, device, seed=0, extra_position=provider.kind == "liger")
            grads = leaves(inputs)
            # dynamic=True: one compiled graph serves every length instead of one compile each.
            step = build_step(provider, case, inputs, dynamic=True)
            if i == 0 or provider.kind == "compile":
                # warm-up: compile / autotune (a new length may mean a new specialization).
                step().backward()
                _clear_grads(grads)
            peak = peak_memory(step, grads, device)
            points.append({"T": case.T, "N": case.N, "status": "ok", "peak_memory_bytes": peak})
        except torch.OutOfMemoryError as exc:
            points.append({"T": case.T, "N": case.N, "status": "oom", "reason": str(exc).splitlines()[0][:300]})
            failed = f"a shorter length ran out of memory (N={case.N})"
        except RuntimeError as exc:
            # The CPU allocator's failure is a plain RuntimeError.
            status = "oom" if "can't allocate memory" in str(exc) else "error"
            points.append({"T": case.T, "N": case.N, "status": status,
                           "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]})
            failed = f"failed at N={case.N}"
        except Exception as exc:
            points.append({"T": case.T, "N": case.N, "status": "error",
                           "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]})
            failed = f"failed at N={case.N}"
        inputs = grads = step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "ok", "points": points}


def _worker_main():
    """Entry of a measurement subprocess: spec JSON on stdin, result JSON to the path it names."""
    spec = json.loads(sys.stdin.read())
    result = _worker_sweep(spec) if spec["task"] == "sweep" else _worker_bench(spec)
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)


def run_worker(spec: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Runs one measurement in a fresh Python process; failures come back as a status, not a raise."""
    fd, path = tempfile.mkstemp(prefix="grpo_fused_bench_", suffix=".json")
    os.close(fd)
    spec = dict(spec, result_path=path)
    cmd = [sys.executable, "-c", "from grpo_fused.benchmarks.harness import _worker_main; _worker_main()"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout)
        with open(path) as f:
            text = f.read()
        if proc.returncode == 0 and text:
            # wall_s: the whole worker (start-up, inputs, compile, measurement), for planning runs.
            return dict(json.loads(text), wall_s=round(time.perf_counter() - start, 1))
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        return {"status": "error", "reason": f"worker exited with {proc.returncode}: {' | '.join(tail)}"[:800]}
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"did not finish within {timeout:.0f} s"}
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------------------------
# Whole runs.
# ----------------------------------------------------------------------------------------------


def _release_cached(device: torch.device):
    # The workers need the whole GPU; what this process's caching allocator holds is theirs.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def derive(case: Case, times: Dict[str, Dict[str, float]], floors: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Achieved TB/s (logits path) or TFLOP/s (linear path) per mode, and the floor's share of it."""
    out = {}
    rate_floor = floors["bandwidth"] if case.op == "logits" else floors["gemm_flops"]
    for mode, amount in case.work().items():
        seconds = times[mode]["median"] / 1e3
        floor_ms = amount / rate_floor * 1e3
        out[mode] = {"achieved": amount / seconds / 1e12, "unit": "TB/s" if case.op == "logits" else "TFLOP/s",
                     "floor_ms": floor_ms, "pct_of_floor": 100.0 * floor_ms / times[mode]["median"]}
    return out


def run_bench(device: torch.device, cases: Sequence[Case], provider_names: Optional[Sequence[str]] = None,
              warmup: int = 1, reps: int = 3, timeout: float = 600.0,
              progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Measures every provider of every case; returns the results document (see :func:`save`).

    ``progress(label)`` is called once per (op, provider) about to run; None for silence.
    """
    env = environment(device)
    floors = measure_floors(device, cases[0].torch_dtype if cases else torch.float32)
    _release_cached(device)
    rows: List[Dict[str, Any]] = []
    for case in cases:
        eager = None
        for provider in providers_for(case.op, provider_names):
            if progress is not None:
                progress(f"{case.op}/{provider.name}")
            row: Dict[str, Any] = {"op": case.op, "provider": provider.name, "description": provider.description,
                                   "case": case.to_json()}
            failure = probe(provider, device)
            _release_cached(device)
            if failure is not None:
                row.update(failure)
                rows.append(row)
                continue
            spec = {"task": "bench", "device": str(device), "case": dataclasses.asdict(case),
                    "provider": provider.name, "warmup": warmup, "reps": reps}
            row.update(run_worker(spec, timeout))
            if row["status"] == "ok":
                row["rates"] = derive(case, row["time_ms"], floors)
                if provider.name == "eager":
                    eager = row
                if eager is not None:
                    row["speedup_vs_eager"] = {m: eager["time_ms"][m]["median"] / row["time_ms"][m]["median"]
                                               for m in MODES}
                    if eager["peak_memory_bytes"] > 0:
                        row["memory_vs_eager"] = row["peak_memory_bytes"] / eager["peak_memory_bytes"]
            rows.append(row)
    return dict(kind="bench", schema=RESULT_SCHEMA, **env, floors=floors, config=BENCH_CONFIG,
                timing_method=timing_method(device.type), memory_method=memory_method(device.type),
                warmup=warmup, reps=reps, work_models=WORK_MODELS, cases=[c.to_json() for c in cases], results=rows)


def run_memory_sweep(device: torch.device, ops: Sequence[str], B: int, seq_lens: Sequence[int], V: int, H: int,
                     dtype: str, provider_names: Optional[Sequence[str]] = None, timeout: float = 600.0,
                     progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Peak memory of one fwd+bwd per provider over sequence lengths; returns the results document."""
    env = environment(device)
    rows: List[Dict[str, Any]] = []
    mem_available = _proc_status_meminfo("MemAvailable") if device.type == "cpu" else None
    for op in ops:
        cases = [Case(op, B, T, V, H if op == "linear" else None, dtype) for T in seq_lens]
        for provider in providers_for(op, provider_names):
            if progress is not None:
                progress(f"{op}/{provider.name}")
            row: Dict[str, Any] = {"op": op, "provider": provider.name, "description": provider.description}
            failure = probe(provider, device)
            _release_cached(device)
            if failure is not None:
                row.update(failure)
                rows.append(row)
                continue
            runnable = cases
            if mem_available is not None:
                # Eager needs ~6 fp32 (N, V) buffers at its peak; never swap the machine to death.
                runnable = [c for c in cases if 6 * c.N * c.V * 4 < 0.8 * mem_available]
            spec = {"task": "sweep", "device": str(device), "op": op, "provider": provider.name,
                    "cases": [dataclasses.asdict(c) for c in runnable]}
            result = run_worker(spec, timeout)
            points = result.get("points", [])
            for c in cases[len(runnable):]:
                points.append({"T": c.T, "N": c.N, "status": "skipped", "reason": "would not fit in this machine's RAM"})
            row.update(status=result["status"], reason=result.get("reason"), points=points,
                       wall_s=result.get("wall_s"))
            rows.append(row)
    return dict(kind="memory", schema=RESULT_SCHEMA, **env, config=BENCH_CONFIG, memory_method=memory_method(device.type),
                sweep=dict(B=B, seq_lens=list(seq_lens), V=V, H=H, dtype=dtype), results=rows)


def _proc_status_meminfo(field: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def results_stem(doc: Dict[str, Any]) -> str:
    """``<kind>-<cpu|cuda>-<UTC date-time>``: sorts by date within a kind and device type."""
    stamp = doc["date"].replace(":", "").replace("-", "").replace("+0000", "Z").replace("+00:00", "Z")
    return f"{doc['kind']}-{doc['device']['type']}-{stamp}"


def save(doc: Dict[str, Any], out_dir: str) -> str:
    """Writes ``doc`` as ``<out_dir>/<results_stem>.json``; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, results_stem(doc) + ".json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    return path


# ----------------------------------------------------------------------------------------------
# Presentation.
# ----------------------------------------------------------------------------------------------


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_ms(stats: Optional[Dict[str, float]]) -> str:
    if not stats:
        return "-"
    spread = (stats["p80"] - stats["p20"]) / 2
    return f"{stats['median']:.3g} ±{spread:.2g}"


def bench_table(doc: Dict[str, Any]) -> List[List[str]]:
    """Header + rows of the bench table (strings), one row per (op, provider)."""
    header = ["case", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "vs eager", "achieved", "% floor",
              "peak mem", "mem vs eager"]
    rows = [header]
    for r in doc["results"]:
        label = f"{r['op']} N={r['case']['N']}"
        if r["status"] != "ok":
            # The reason is listed under the table; a long cell would wreck the layout.
            rows.append([label, r["provider"], r["status"], "", "", "", "", "", "", ""])
            continue
        t, rate = r["time_ms"], r["rates"]["fwd+bwd"]
        speed = r.get("speedup_vs_eager", {}).get("fwd+bwd")
        mem_ratio = r.get("memory_vs_eager")
        rows.append([
            label, r["provider"], _fmt_ms(t["fwd"]), _fmt_ms(t["bwd"]), _fmt_ms(t["fwd+bwd"]),
            "-" if speed is None else f"{speed:.2f}x",
            f"{rate['achieved']:.3g} {rate['unit']}", f"{rate['pct_of_floor']:.1f}%",
            fmt_bytes(r["peak_memory_bytes"]), "-" if mem_ratio is None else f"{mem_ratio:.3g}x",
        ])
    return rows


def memory_table(doc: Dict[str, Any]) -> List[List[str]]:
    """Header + rows: peak memory per (op, provider) per sequence length."""
    seq_lens = doc["sweep"]["seq_lens"]
    rows = [["op", "provider"] + [f"T={t}" for t in seq_lens]]
    for r in doc["results"]:
        if r["status"] != "ok":
            rows.append([r["op"], r["provider"], r["status"]] + [""] * (len(seq_lens) - 1))
            continue
        by_t = {p["T"]: p for p in r.get("points", [])}
        cells = []
        for t in seq_lens:
            p = by_t.get(t)
            cells.append("-" if p is None else fmt_bytes(p["peak_memory_bytes"]) if p["status"] == "ok" else p["status"])
        rows.append([r["op"], r["provider"]] + cells)
    return rows


def plain_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_memory(doc: Dict[str, Any], path: str) -> str:
    """PNG of peak memory vs tokens, one panel per op, one line per provider; OOM points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ops = [op for op in OPS if any(r["op"] == op for r in doc["results"])]
    sweep = doc["sweep"]
    elem = torch.empty((), dtype=getattr(torch, sweep["dtype"])).element_size()
    token_counts = [sweep["B"] * t for t in sweep["seq_lens"]]
    fig, axes = plt.subplots(1, len(ops), figsize=(6.4 * len(ops), 5.0), squeeze=False)
    for ax, op in zip(axes[0], ops):
        top = 0.0
        failed = []
        for r in doc["results"]:
            if r["op"] != op or r["status"] == "unavailable":
                continue
            ok = [p for p in r.get("points", []) if p["status"] == "ok" and p["peak_memory_bytes"] > 0]
            if ok:
                ys = [p["peak_memory_bytes"] for p in ok]
                ax.plot([p["N"] for p in ok], ys, marker="o", label=r["provider"])
                top = max(top, max(ys))
            failed += [(p["N"], r["provider"], p["status"]) for p in r.get("points", [])
                       if p["status"] in ("oom", "error", "timeout")]
        # One (N, V) tensor in the input dtype: the yardstick (the logits themselves, or one
        # materialized logits copy on the linear path).
        ax.plot(token_counts, [n * sweep["V"] * elem for n in token_counts], linestyle="--", color="gray",
                linewidth=1, label=f"one (N, V) {sweep['dtype']} tensor")
        for n, name, status in failed:
            y = top * 1.5 if top else 1 << 30
            ax.scatter([n], [y], marker="x", color="red", zorder=5)
            ax.annotate(f"{name}: {status}", (n, y), fontsize=7, rotation=30, textcoords="offset points",
                        xytext=(3, 3))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(token_counts))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: fmt_bytes(y).replace(".00", "")))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(f"tokens N = B x T (B = {sweep['B']})")
        ax.set_ylabel("peak memory of one fwd+bwd, beyond the inputs")
        shape = f"V={sweep['V']}" + (f", H={sweep['H']}" if op == "linear" else "")
        ax.set_title(f"{'logits path' if op == 'logits' else 'linear path (from hidden states)'}: "
                     f"{shape}, {sweep['dtype']}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    tag = "CPU-only figures" if doc.get("cpu_only") else "GPU"
    fig.suptitle(f"grpo-fused peak memory: {doc['device']['name']} ({tag}), torch {doc['versions']['torch']}, "
                 f"{doc['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
