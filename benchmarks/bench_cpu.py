"""CPU benchmark: GRPO loss fwd+bwd from logits, C++ backend vs eager PyTorch, side by side.

Usage::

    python benchmarks/bench_cpu.py                     # default grid, writes benchmarks/results/cpu_grpo_loss.json
    python benchmarks/bench_cpu.py --shapes 4096x32000 --dtypes bfloat16 --repeats 3
    python benchmarks/bench_cpu.py --hidden 1024 --shapes 2048x32000 --dtypes float32   # linear path

Providers:
    eager        grpo_fused.reference.grpo_loss (TRL-style: fp32 logits, log_softmax, gather, entropy)
    cpp          grpo_fused.backends.cpp.grpo_loss (fused C++ row kernels)
    cpp_inplace  the same with inplace_backward=True (the gradient overwrites the logits)
With --hidden H, the linear path instead (gradients of hidden and weight), written to
cpu_linear_grpo_loss.json:
    eager_linear grpo_fused.reference.linear_grpo_loss (materializes the fp32 logits)
    cpp_linear   grpo_fused.backends.cpp.linear_grpo_loss (256 MiB chunks of fp32 logits)

Each (provider, shape, dtype) runs in a fresh subprocess so that its memory peak is its own.
Peak memory is the process's resident-set high-water mark (Linux VmHWM, reset through
/proc/self/clear_refs) during one fwd+bwd, minus the resident size just before it: the
transient memory the loss needs beyond its inputs (logits, ids, ...), gradient included.
Time is the wall-clock median of --repeats fwd+bwd calls after one warm-up call; the process
CPU time (all threads) of the same calls is stored too, as it suffers less from a shared machine.

Bytes the fused path must move (the floor it is compared with), per fwd+bwd:
    forward reads the logits once (N*V*s bytes, s = element size), backward reads them once and
    writes the gradient once (2*N*V*s): 3*N*V*s in all; the O(N) tensors are negligible.
FLOPs of the linear path, per fwd+bwd: the logits GEMM twice (forward, and recomputed in the
backward) plus the dhidden and dweight GEMMs: 4 * 2*N*V*H.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

DEFAULT_SHAPES = ("4096x32000", "2048x151936")
PROVIDERS = ("eager", "cpp", "cpp_inplace")
LINEAR_PROVIDERS = ("eager_linear", "cpp_linear")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run_one(provider: str, tokens: int, vocab: int, dtype_name: str, repeats: int, threads: int, hidden: int) -> dict:
    """Runs in the child process: builds inputs, warms up, measures; returns one result row."""
    import torch

    import grpo_fused as gf
    from grpo_fused import reference as ref
    from grpo_fused.backends import cpp

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    batch = 8
    seq = tokens // batch
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, seq, vocab, generator=g) * 2).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    adv = torch.randn(batch, generator=g)
    mask = torch.rand(batch, seq, generator=g) > 0.1
    with torch.no_grad():
        base = torch.randn(batch, seq, generator=g) - 10.0
    old = base + 0.1 * torch.randn(batch, seq, generator=g)
    ref_logps = base + 0.1 * torch.randn(batch, seq, generator=g)
    config = gf.GRPOConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04)  # entropy computed (default)

    # torch.autograd.grad rather than .backward(): a leaf's AccumulateGrad would copy the
    # in-place gradient (it aliases the saved logits); in training the logits' gradient goes on
    # to the lm_head GEMM and is freed, which is what returning it here models.
    if provider.startswith("cpp"):
        assert cpp.availability(torch.device("cpu")) is None, cpp.availability(torch.device("cpu"))
    if hidden:
        del logits
        states = (torch.randn(batch, seq, hidden, generator=g)).to(dtype).requires_grad_()
        weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_()
        linear = ref.linear_grpo_loss if provider == "eager_linear" else cpp.linear_grpo_loss

        def step():
            out = linear(states, weight, ids, adv, mask, old, ref_logps, config=config)
            return torch.autograd.grad(out.loss, (states, weight))[0]
    elif provider == "eager":
        def step():
            out = ref.grpo_loss(logits, ids, adv, mask, old, ref_logps, config=config)
            return torch.autograd.grad(out.loss, logits)[0]
    else:
        inplace = provider == "cpp_inplace"

        def step():
            out = cpp.grpo_loss(logits, ids, adv, mask, old, ref_logps, config=config, inplace_backward=inplace)
            return torch.autograd.grad(out.loss, logits)[0]

    grad = step()  # warm-up (and the one-time build / load of the extension)
    assert torch.isfinite(grad).all()
    del grad
    times, cpu_times = [], []
    _reset_peak_rss()
    before_kib = _status_kib("VmRSS")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        grad = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del grad
    peak_extra = (_status_kib("VmHWM") - before_kib) * 1024
    element = torch.empty(0, dtype=dtype).element_size()
    floor_bytes = 3 * tokens * vocab * element
    median = statistics.median(times)
    extra = {}
    if hidden:
        flops = 4 * 2 * tokens * vocab * hidden
        extra = dict(hidden=hidden, flops=flops, achieved_gflop_per_s=flops / median / 1e9)
    return dict(
        provider=provider,
        tokens=tokens,
        vocab=vocab,
        dtype=dtype_name,
        threads=threads,
        times_s=times,
        median_s=median,
        min_s=min(times),
        max_s=max(times),
        cpu_times_s=cpu_times,
        median_cpu_s=statistics.median(cpu_times),
        peak_extra_bytes=peak_extra,
        logits_bytes=tokens * vocab * element,
        floor_bytes=floor_bytes,
        achieved_gb_per_s=floor_bytes / median / 1e9,
        **extra,
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
    return dict(
        device=f"CPU: {cpu}",
        cores=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_rev=rev,
        # A shared machine slows every provider; the 1-minute load average says how shared it was.
        load_average_1min=os.getloadavg()[0],
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="NxV token x vocab sizes")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS + LINEAR_PROVIDERS)
    parser.add_argument("--hidden", type=int, default=0, help="H > 0 benchmarks the linear path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.providers is None:
        args.providers = list(LINEAR_PROVIDERS if args.hidden else PROVIDERS)
    if args.out is None:
        name = "cpu_linear_grpo_loss.json" if args.hidden else "cpu_grpo_loss.json"
        args.out = os.path.join(ROOT, "benchmarks", "results", name)

    if args.child:
        provider, tokens, vocab, dtype = args.child.split(",")
        row = run_one(provider, int(tokens), int(vocab), dtype, args.repeats, args.threads, args.hidden)
        print("RESULT " + json.dumps(row))
        return

    results = []
    for shape in args.shapes:
        tokens, vocab = (int(x) for x in shape.lower().split("x"))
        for dtype in args.dtypes:
            for provider in args.providers:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{provider},{tokens},{vocab},{dtype}",
                       "--repeats", str(args.repeats), "--threads", str(args.threads), "--hidden", str(args.hidden)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(f"{provider} {shape} {dtype}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(lines[-1][len("RESULT "):])
                results.append(row)
                print(f"{provider:12s} N={tokens:6d} V={vocab:6d} {dtype:9s} median {row['median_s'] * 1e3:9.1f} ms "
                      f"(cpu {row['median_cpu_s'] * 1e3:9.1f} ms)  "
                      f"peak extra {row['peak_extra_bytes'] / 2**20:8.0f} MiB  " + (
                          f"({row['achieved_gflop_per_s']:.1f} GFLOP/s)" if args.hidden else
                          f"({row['achieved_gb_per_s']:.1f} GB/s of the 3*N*V*s floor)"), flush=True)

    summary = []
    for shape in args.shapes:
        tokens, vocab = (int(x) for x in shape.lower().split("x"))
        for dtype in args.dtypes:
            rows = {r["provider"]: r for r in results if (r["tokens"], r["vocab"], r["dtype"]) == (tokens, vocab, dtype)}
            baseline = "eager_linear" if args.hidden else "eager"
            if baseline not in rows:
                continue
            for provider in ("cpp", "cpp_inplace", "cpp_linear"):
                if provider in rows:
                    e, c = rows[baseline], rows[provider]
                    summary.append(dict(
                        provider=provider, tokens=tokens, vocab=vocab, dtype=dtype,
                        speedup_vs_eager=e["median_s"] / c["median_s"],
                        cpu_time_ratio_vs_eager=e["median_cpu_s"] / c["median_cpu_s"],
                        # None when the fused path's peak is under 1 MiB (in place): no meaningful ratio.
                        memory_ratio_vs_eager=(e["peak_extra_bytes"] / c["peak_extra_bytes"]
                                               if c["peak_extra_bytes"] >= 2**20 else None),
                    ))
    for s in summary:
        ratio = s["memory_ratio_vs_eager"]
        memory = "under 1 MiB of peak memory" if ratio is None else f"{ratio:.1f}x less peak memory"
        print(f"{s['provider']:12s} N={s['tokens']} V={s['vocab']} {s['dtype']}: {s['speedup_vs_eager']:.2f}x faster, "
              f"{memory} than eager "
              f"({s['cpu_time_ratio_vs_eager']:.2f}x less CPU time)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(dict(machine=_machine(), results=results, summary=summary), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
