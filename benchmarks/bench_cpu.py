"""CPU benchmark: GRPO loss fwd+bwd, the C++ backend against eager PyTorch, side by side in one run.

Usage::

    python benchmarks/bench_cpu.py                  # default grid, writes benchmarks/results/cpu_grpo_loss.json
    python benchmarks/bench_cpu.py --shapes 4096x32000 --dtypes bfloat16 --repeats 5
    python benchmarks/bench_cpu.py --hidden 256 --shapes 1024x32000 --dtypes float32   # linear path
    python benchmarks/bench_cpu.py --floor          # this CPU's copy and exp rates only

Every provider runs twice, with the entropy computed and without (``--entropy on off``), because
that is the difference a user sees first: TRL computes the per-token entropy only when it logs or
uses it, and the softmax it needs is most of eager PyTorch's cost.

Providers (logits path; the loss of ``harness.BENCH_CONFIG``: DAPO, eps 0.2 / 0.28, beta 0.04):
    trl          TRL 1.16's own arithmetic (harness.trl_vocab_pass: selective_log_softmax, the
                 entropy by entropy_from_logits under no_grad), then the (B, T) tail: the baseline
    eager        grpo_fused.reference.grpo_loss (fp32 upcast of the logits, logsumexp, gather;
                 the entropy through the softmax)
    compile      torch.compile of the trl provider's function (default mode, dynamic=False)
    cpp          grpo_fused.grpo_loss(backend="cpp") (the fused C++ row kernels)
    cpp_inplace  the same with inplace_backward=True (the gradient overwrites the logits)
With --hidden H, the linear path (gradients of hidden and weight), written to cpu_linear_grpo_loss.json:
    eager_linear    grpo_fused.reference.linear_grpo_loss (materializes the fp32 logits)
    compile_linear  torch.compile of it
    trl_linear      TRL 1.16's own fused LM head, trl.kernels.ChunkedLogProbFunction (what GRPOTrainer
                    runs: token chunks of 4096 x vocab chunks of 32768, torch ops off Triton devices,
                    the entropy when asked), then the (B, T) tail; needs trl installed
    cpp_linear      grpo_fused.linear_grpo_loss(backend="cpp") (chunks of fp32 logits)

Each (provider, entropy, shape, dtype) runs in a fresh subprocess. Time: wall-clock median (and
min, max) of --repeats fwd+bwd calls after one warm-up call (which includes any compile), and the
process CPU time of the same calls (all threads; it suffers less from a shared machine). Peak
memory: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
during one fwd+bwd minus the resident set just before it, glibc's mmap threshold pinned at
128 KiB so freed memory leaves the resident set; one settling call, then the least of three.
That is the transient memory the loss needs beyond its inputs, the gradient included.

Bytes the fused logits path must move, per fwd+bwd (the floor it is compared with): the forward
reads the logits once (N*V*s bytes, s = element size), the backward reads them once and writes
the gradient once (2*N*V*s): 3*N*V*s in all; the O(N) tensors are negligible. It also evaluates
2*N*V exponentials (the forward's sum, the backward's softmax). --floor measures this CPU's copy
rate and exp rate, from which benchmarks/README.md derives the floor. FLOPs of the linear path,
per fwd+bwd: the logits GEMM twice (forward, and recomputed in the backward) plus the dhidden
and dweight GEMMs: 4 * 2*N*V*H (eager: 3 GEMMs, no recompute).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

DEFAULT_SHAPES = ("4096x32000", "2048x151936")
PROVIDERS = ("trl", "eager", "compile", "cpp", "cpp_inplace")
LINEAR_PROVIDERS = ("eager_linear", "compile_linear", "trl_linear", "cpp_linear")
BASELINE, LINEAR_BASELINE = "trl", "eager_linear"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_REPS = 3


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")


def _pin_malloc() -> None:
    # glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) in the heap; pinned
    # at 128 KiB, a freed tensor leaves the resident set and a new one enters it.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)


def _harness():
    # The installed package's copy (grpo_fused.benchmarks): the bench then runs against whichever
    # grpo_fused is installed (a wheel, an editable checkout), never a checkout it happens to sit in.
    try:
        from grpo_fused.benchmarks import harness
    except ImportError:
        sys.path.append(ROOT)
        from benchmarks import harness
    return harness


def _build_step(provider: str, inputs: dict, config, hidden: int):
    """A function running one fwd+bwd and returning the gradients of the leaves."""
    import torch

    import grpo_fused as gf
    from grpo_fused import reference as ref
    from grpo_fused.semantics import LossBatch, compute_dtype, grpo_output

    harness = _harness()
    ids, adv, mask = inputs["completion_ids"], inputs["advantages"], inputs["completion_mask"]
    old, ref_logps = inputs["old_logps"], inputs["ref_logps"]

    def trl_loss(logits):
        logps, entropy = harness.trl_vocab_pass(logits, ids, config.temperature, config.compute_entropy)
        dtype = compute_dtype(logits.dtype)
        batch = LossBatch(ids, adv, mask, old, ref_logps)
        return grpo_output(logps.to(dtype), None if entropy is None else entropy.to(dtype), batch,
                           config.params).loss

    if hidden:
        states, weight = inputs["hidden"], inputs["weight"]

        def eager_linear(h, w):
            return ref.linear_grpo_loss(h, w, ids, adv, mask, old, ref_logps, config=config).loss

        def trl_linear(h, w):
            from trl.kernels import ChunkedLogProbFunction

            wanted = ("entropy",) if config.compute_entropy else ()
            per_token = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), w, None, ids.reshape(-1),
                                                     config.temperature, 32768, None, 1.0, wanted)
            logps, entropy = per_token[0].view(ids.shape), per_token[1]
            batch = LossBatch(ids, adv, mask, old, ref_logps)
            return grpo_output(logps.float(), None if entropy is None else entropy.view(ids.shape).float(), batch,
                               config.params).loss

        loss_fn = {
            "eager_linear": eager_linear,
            "compile_linear": torch.compile(eager_linear, dynamic=False),
            "trl_linear": trl_linear,
            "cpp_linear": lambda h, w: gf.linear_grpo_loss(h, w, ids, adv, mask, old, ref_logps, config=config,
                                                           backend="cpp").loss,
        }[provider]
        return lambda: torch.autograd.grad(loss_fn(states, weight), (states, weight))

    logits = inputs["logits"]
    loss_fn = {
        "trl": trl_loss,
        "eager": lambda x: ref.grpo_loss(x, ids, adv, mask, old, ref_logps, config=config).loss,
        "compile": torch.compile(trl_loss, dynamic=False),
        "cpp": lambda x: gf.grpo_loss(x, ids, adv, mask, old, ref_logps, config=config, backend="cpp").loss,
        "cpp_inplace": lambda x: gf.grpo_loss(x, ids, adv, mask, old, ref_logps, config=config, backend="cpp",
                                              inplace_backward=True).loss,
    }[provider]
    pristine = logits.detach().clone() if provider == "cpp_inplace" else None

    # In training the logits come out of the lm_head (not a leaf): a view makes them a non-leaf.
    # torch.autograd.grad returns the gradient as the loss produced it (the in-place one is the
    # logits' own buffer), as the lm_head's backward would receive it.
    def step():
        return torch.autograd.grad(loss_fn(logits.view_as(logits)), logits)

    def restore():  # the in-place backward overwrote the logits with their gradient
        if pristine is not None:
            with torch.no_grad():
                logits.copy_(pristine)

    step.restore = restore
    return step


def run_one(provider: str, tokens: int, vocab: int, dtype_name: str, entropy: bool, repeats: int, threads: int,
            hidden: int) -> dict:
    """Runs in the child process: builds inputs, warms up, measures; returns one result row."""
    import torch

    from grpo_fused.backends import cpp
    from grpo_fused.semantics import GRPOConfig

    harness = _harness()
    torch.set_num_threads(threads)
    _pin_malloc()
    batch = 8
    case = harness.Case("linear" if hidden else "logits", batch, tokens // batch, vocab, hidden or None, dtype_name)
    inputs = harness.make_inputs(case, "cpu")
    config = GRPOConfig(**harness.BENCH_CONFIG, compute_entropy=entropy)
    capability = library = None
    if provider.startswith("cpp"):
        reason = cpp.availability(torch.device("cpu"))
        assert reason is None, reason
        ops = torch.ops.grpo_fused_cpp
        # None for a build older than the run-time dispatch, which has no cpu_capability op.
        capability = ops.cpu_capability() if hasattr(ops, "cpu_capability") else None
        prebuilt = sys.modules.get("grpo_fused._C")
        library = prebuilt.__file__ if prebuilt is not None else sorted(torch.ops.loaded_libraries)
    step = _build_step(provider, inputs, config, hidden)
    restore = getattr(step, "restore", lambda: None)

    grads = step()  # warm-up: one-time build / load of the extension, compile
    assert all(torch.isfinite(g).all() for g in grads)
    del grads
    times, cpu_times = [], []
    for _ in range(repeats):
        restore()
        t0, c0 = time.perf_counter(), time.process_time()
        grads = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del grads
    peaks = []
    for i in range(MEMORY_REPS + 1):  # the first call settles glibc and the GEMM library's buffers
        restore()
        _pin_malloc()
        _reset_peak_rss()
        before_kib = _status_kib("VmRSS")
        grads = step()
        del grads
        if i:
            peaks.append((_status_kib("VmHWM") - before_kib) * 1024)
    element = torch.empty(0, dtype=case.torch_dtype).element_size()
    median = statistics.median(times)
    row = dict(
        provider=provider, entropy=entropy, tokens=tokens, vocab=vocab, dtype=dtype_name, threads=threads,
        cpu_capability=capability, cpp_library=library, times_s=times, median_s=median, min_s=min(times), max_s=max(times),
        cpu_times_s=cpu_times, median_cpu_s=statistics.median(cpu_times), peak_extra_bytes=min(peaks),
        logits_bytes=tokens * vocab * element,
    )
    if hidden:
        # The fused paths (ours, TRL's) recompute the logits GEMM in the backward: 4 GEMMs, eager 3.
        flops = (4 if provider in ("cpp_linear", "trl_linear") else 3) * 2 * tokens * vocab * hidden
        row.update(hidden=hidden, flops=flops, achieved_gflop_per_s=flops / median / 1e9)
    else:
        floor_bytes = 3 * tokens * vocab * element
        row.update(floor_bytes=floor_bytes, achieved_gb_per_s=floor_bytes / median / 1e9)
    return row


def measure_floor(threads: int) -> dict:
    """This CPU's rates behind the floor: copy bandwidth and the throughput of a vectorized exp."""
    import torch

    torch.set_num_threads(threads)

    def median_s(fn, reps=7):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    n_bytes = 512 * 2**20
    src = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy = median_s(lambda: dst.copy_(src))
    fresh = median_s(lambda: torch.empty_like(src).copy_(src))  # the destination page-faulted in
    # exp: 256 KiB of fp32 (L2-resident) exponentiated many times, one thread: the compute rate of
    # torch's vectorized exp (not its memory rate; 64k elements make the call overhead negligible).
    small = torch.randn(65536) - 5
    out = torch.empty_like(small)
    reps = 2000
    torch.set_num_threads(1)
    with torch.no_grad():
        exp_s = median_s(lambda: [torch.exp(small, out=out) for _ in range(reps)], reps=3) / (reps * small.numel())
    torch.set_num_threads(threads)
    with torch.no_grad():
        big = torch.randn(n_bytes // 4)
        exp_big_s = median_s(lambda: torch.exp(big, out=dst)) / big.numel()
        lse_s = median_s(lambda: torch.logsumexp(big.view(-1, 32768), dim=-1)) / big.numel()
    # The C++ forward on cache-resident rows (8 x 32000 bf16, 512 KiB): its compute rate per logit
    # (max pass, exp-sum pass), with no memory traffic.
    kernel_s = None
    from grpo_fused.backends import cpp

    if cpp.availability(torch.device("cpu")) is None:
        from grpo_fused.semantics import vocab_values

        rows = (torch.randn(8, 32000) * 2).to(torch.bfloat16)
        ids = torch.zeros(8, dtype=torch.long)
        params = vocab_values(1.0)
        fwd = torch.ops.grpo_fused_cpp.logits_fwd
        torch.set_num_threads(1)
        kernel_s = median_s(lambda: [fwd(rows, ids, params, False) for _ in range(500)], reps=5) / (500 * rows.numel())
        torch.set_num_threads(threads)
    return dict(
        threads=threads,
        cpp_forward_s_per_logit_cached_1_thread=kernel_s,
        cpu_capability=torch.ops.grpo_fused_cpp.cpu_capability() if kernel_s else None,
        copy_bytes_per_s=2 * n_bytes / copy,  # read + write
        copy_into_fresh_bytes_per_s=2 * n_bytes / fresh,
        torch_exp_s_per_element_l2_1_thread=exp_s,
        torch_exp_s_per_element_512mib=exp_big_s,
        torch_logsumexp_s_per_element_512mib=lse_s,
    )


def _machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    # Which build of the C++ extension the cpp providers load: a prebuilt grpo_fused._C (setup.py,
    # a wheel) takes precedence over the just-in-time build.
    probe = ("import importlib.util as u; s = u.find_spec('grpo_fused._C'); "
             "print('prebuilt grpo_fused._C' if s else 'just-in-time build')")
    install = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    return dict(
        device=f"CPU: {cpu}",
        cores=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_rev=rev,
        cpp_extension=install,
        # A shared machine slows every provider; the 1-minute load average says how shared it was.
        load_average_1min=os.getloadavg()[0],
    )


def _summary(results, hidden: bool):
    """Ratios against the baseline (trl; eager_linear for the linear path) and every other eager
    provider, per (shape, dtype, entropy)."""
    out = []
    keys = sorted({(r["tokens"], r["vocab"], r["dtype"], r["entropy"]) for r in results})
    for tokens, vocab, dtype, entropy in keys:
        rows = {r["provider"]: r for r in results
                if (r["tokens"], r["vocab"], r["dtype"], r["entropy"]) == (tokens, vocab, dtype, entropy)}
        refs = [p for p in (("eager_linear", "compile_linear", "trl_linear") if hidden else ("trl", "eager", "compile"))
                if p in rows]
        for provider in (("cpp_linear",) if hidden else ("cpp", "cpp_inplace")):
            if provider not in rows:
                continue
            c = rows[provider]
            s = dict(provider=provider, tokens=tokens, vocab=vocab, dtype=dtype, entropy=entropy)
            for base in refs:
                e = rows[base]
                s[f"speedup_vs_{base}"] = e["median_s"] / c["median_s"]
                s[f"cpu_time_ratio_vs_{base}"] = e["median_cpu_s"] / c["median_cpu_s"]
                # None when the fused path's peak is under 1 MiB (in place): no meaningful ratio.
                s[f"memory_ratio_vs_{base}"] = (e["peak_extra_bytes"] / c["peak_extra_bytes"]
                                                if c["peak_extra_bytes"] >= 2**20 else None)
            out.append(s)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="NxV token x vocab sizes")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS + LINEAR_PROVIDERS)
    parser.add_argument("--entropy", nargs="+", choices=("on", "off"), default=["off", "on"])
    parser.add_argument("--hidden", type=int, default=0, help="H > 0 benchmarks the linear path")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--floor", action="store_true", help="measure this CPU's copy and exp rates only")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        provider, tokens, vocab, dtype, entropy = args.child.split(",")
        row = run_one(provider, int(tokens), int(vocab), dtype, entropy == "on", args.repeats, args.threads,
                      args.hidden)
        print("RESULT " + json.dumps(row))
        return
    if args.floor:
        floor = measure_floor(args.threads)
        print(json.dumps(dict(machine=_machine(), floor=floor), indent=1))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(dict(machine=_machine(), floor=floor), f, indent=1)
        return
    if args.providers is None:
        args.providers = list(LINEAR_PROVIDERS if args.hidden else PROVIDERS)
    if args.out is None:
        name = "cpu_linear_grpo_loss.json" if args.hidden else "cpu_grpo_loss.json"
        args.out = os.path.join(ROOT, "benchmarks", "results", name)

    machine = _machine()
    print(f"{machine['device']}, {args.threads} threads, torch {machine['torch']}, C++ extension: "
          f"{machine['cpp_extension']}", flush=True)
    results = []
    for shape in args.shapes:
        tokens, vocab = (int(x) for x in shape.lower().split("x"))
        for dtype in args.dtypes:
            for entropy in args.entropy:
                for provider in args.providers:
                    cmd = [sys.executable, os.path.abspath(__file__), "--child",
                           f"{provider},{tokens},{vocab},{dtype},{entropy}", "--repeats", str(args.repeats),
                           "--threads", str(args.threads), "--hidden", str(args.hidden)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        print(f"{provider} {shape} {dtype} entropy {entropy}: failed\n{proc.stderr[-2000:]}",
                              file=sys.stderr)
                        continue
                    row = json.loads(lines[-1][len("RESULT "):])
                    results.append(row)
                    rate = (f"{row['achieved_gflop_per_s']:.1f} GFLOP/s" if args.hidden else
                            f"{row['achieved_gb_per_s']:.1f} GB/s of the 3*N*V*s floor")
                    print(f"{provider:14s} N={tokens:6d} V={vocab:6d} {dtype:9s} entropy {entropy:3s} "
                          f"median {row['median_s'] * 1e3:8.1f} ms (min {row['min_s'] * 1e3:8.1f}, "
                          f"cpu {row['median_cpu_s'] * 1e3:8.1f})  peak extra "
                          f"{row['peak_extra_bytes'] / 2**20:7.0f} MiB  ({rate})", flush=True)

    summary = _summary(results, bool(args.hidden))
    for s in summary:
        parts = []
        for base in (("eager_linear", "compile_linear", "trl_linear") if args.hidden else ("trl", "eager", "compile")):
            if f"speedup_vs_{base}" in s:
                mem = s[f"memory_ratio_vs_{base}"]
                parts.append(f"{s[f'speedup_vs_{base}']:.2f}x faster than {base}"
                             + ("" if mem is None else f" ({mem:.1f}x less memory)"))
        print(f"{s['provider']:12s} N={s['tokens']} V={s['vocab']} {s['dtype']} entropy "
              f"{'on' if s['entropy'] else 'off'}: " + ", ".join(parts))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(dict(machine=machine, results=results, summary=summary), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
