"""Group advantages at 1M rewards: the Triton kernel against the eager reference (DESIGN.md: >= 10x).

    python benchmarks/bench_advantages.py                        # GPU: B = 2**20, G in 8, 16, 64
    python benchmarks/bench_advantages.py --rewards 65536 --group-sizes 8 --layouts size

Providers: ``eager`` (:func:`grpo_fused.reference.group_advantages`), ``compile`` (torch.compile
of it; reported unavailable when compiling fails), ``triton`` (the kernel entry), ``cpp`` (the
public API with ``backend="cpp"``, when built). Layouts: ``size`` (``group_size=G``), ``offsets``
(the same groups as ``group_offsets``), ``ids`` (the same groups under shuffled labels and a
shuffled row order: ``group_ids``). Scales: ``group`` and ``batch``. Rewards are fp32 Gaussian,
5% NaN, a fresh tensor per configuration.

Timing (CUDA): ``triton.testing.do_bench`` (L2 flushed before each call, median and 20/80th
percentiles of the device time between events), and a host wall time per call (``reps`` calls
back to back, one synchronize at the end): the eager reference is bound by its launches, which the
wall time shows. Launches per call are counted with ``torch.profiler`` (CUDA kernels, memsets
and memcpys). On CPU the Triton kernel would run in the interpreter, whose times mean nothing:
it is not timed there, and the run says so.

Bytes each call must move at least (written out for the GB/s column), B rewards, G groups:
  read rewards 4B; write advantages 4B, combined rewards 4B, group index 8B;
  write mean 4G, std 4G, count 8G, zero_std 1G.
  The ``ids`` layout also reads the ids and the permutation (8B + 8B) and sorts (not counted).

Floor and prediction, written before any GPU measurement (none has been taken yet): at B = 2**20,
G = 8, the bytes above are 22.2 MB, 6.6 us at the H100's 3.35 TB/s. The kernel is one launch of
ceil(G / 256) = 512 programs of (256, 8) tiles, so its device time should sit near that floor
plus launch latency (~10-15 us); the Python side (argument binding of the triton_op, 8 output
allocations, two tiny ops for frac_zero_std) is expected to dominate the wall time, ~40-60 us.
The eager reference issues ~35 kernels (three index_add_ among them), ~200-400 us of wall time
when launch-bound. Expected: ~5-10x on wall time, more on device time; the ``ids`` layout adds
an argsort, a host sync and a gather on both sides.

Results: ``benchmarks/results/advantages-<device>-<date>.json`` (long format, one record per
provider x configuration) with the device, versions, date and git revision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

if os.environ.get("TRITON_INTERPRET") == "1":
    # Interpreter timings mean nothing; on CPU the Triton provider is skipped instead.
    del os.environ["TRITON_INTERPRET"]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import grpo_fused as gf  # noqa: E402
from grpo_fused import reference  # noqa: E402
from grpo_fused.benchmarks.harness import environment, summarize  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("eager", "compile", "triton", "cpp")


def make_case(n_rewards: int, group_size: int, layout: str, device, seed: int = 0) -> Dict[str, Any]:
    """Rewards (fp32, 5% NaN) and the group description of ``layout`` for groups of ``group_size``."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n_rewards, generator=g)
    rewards[torch.rand(n_rewards, generator=g) < 0.05] = float("nan")
    n_groups = n_rewards // group_size
    case: Dict[str, Any] = {"rewards": rewards.to(device)}
    if layout == "size":
        case["group_size"] = group_size
    elif layout == "offsets":
        case["group_offsets"] = (torch.arange(n_groups + 1) * group_size).to(device)
    elif layout == "ids":
        labels = torch.randperm(n_groups, generator=g) * 7 + 3
        ids = labels.repeat_interleave(group_size)
        case["group_ids"] = ids[torch.randperm(n_rewards, generator=g)].to(device)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return case


def min_bytes(n_rewards: int, n_groups: int, layout: str) -> int:
    """The module docstring's byte count."""
    per_reward = 4 + 4 + 4 + 8 + (16 if layout == "ids" else 0)
    return n_rewards * per_reward + n_groups * (4 + 4 + 8 + 1)


def make_fn(provider: str, case: Dict[str, Any], scale: str) -> Callable[[], Any]:
    kwargs = dict(case, scale=scale)
    rewards = kwargs.pop("rewards")
    if provider == "eager":
        return lambda: reference.group_advantages(rewards, **kwargs)
    if provider == "compile":
        compiled = torch.compile(reference.group_advantages)
        return lambda: compiled(rewards, **kwargs)
    if provider == "triton":
        from grpo_fused.kernels.group_advantages import group_advantages

        return lambda: group_advantages(rewards, **kwargs)
    if provider == "cpp":
        return lambda: gf.group_advantages(rewards, backend="cpp", **kwargs)
    raise ValueError(f"unknown provider {provider!r}")


def unavailable(provider: str, device: torch.device) -> Optional[str]:
    if provider == "triton" and device.type != "cuda":
        return "the Triton kernel needs a CUDA GPU to be timed (the CPU interpreter's times mean nothing)"
    if provider == "cpp" and device.type != "cpu":
        return "the C++ backend runs on CPU tensors"
    return None


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Host wall time per call of ``reps`` back-to-back calls (one synchronize at the end)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / reps


def device_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> Dict[str, float]:
    """CUDA: device time between events (do_bench). CPU: host time of each call."""
    if device.type == "cuda":
        import triton.testing

        q50, q20, q80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median": q50, "p20": q20, "p80": q80}
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def count_launches(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """CUDA kernels, memsets and memcpys of one call, from torch.profiler."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def max_abs_diff(out, ref) -> float:
    adv, stats = out
    ref_adv, ref_stats = ref
    diffs = [(adv - ref_adv).abs().max()]
    for name in ("mean", "std"):
        a, b = getattr(stats, name), getattr(ref_stats, name)
        diffs.append(torch.where(torch.isnan(b), 0.0, (a - b).abs()).max())
    return float(torch.stack(diffs).max())


def run(args) -> Dict[str, Any]:
    device = torch.device(args.device)
    env = environment(device)
    records: List[Dict[str, Any]] = []
    for layout in args.layouts:
        for group_size in args.group_sizes:
            case = make_case(args.rewards, group_size, layout, device)
            n_groups = args.rewards // group_size
            for scale in args.scales:
                expected = reference.group_advantages(case["rewards"], **{k: v for k, v in case.items()
                                                                           if k != "rewards"}, scale=scale)
                eager_ms = None
                for provider in args.providers:
                    record = {"provider": provider, "layout": layout, "rewards": args.rewards,
                              "group_size": group_size, "groups": n_groups, "scale": scale, "dtype": "float32",
                              "min_bytes": min_bytes(args.rewards, n_groups, layout)}
                    reason = unavailable(provider, device)
                    fn = None
                    if reason is None:
                        try:
                            fn = make_fn(provider, case, scale)
                            record["max_abs_diff_vs_eager"] = max_abs_diff(fn(), expected)
                        except Exception as exc:  # recorded and printed, never hidden
                            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    if reason is not None:
                        record["unavailable"] = reason
                        records.append(record)
                        print(f"{layout:7s} G={group_size:<5d} {scale:5s} {provider:8s} unavailable: {reason}")
                        continue
                    for _ in range(args.warmup):
                        fn()
                    record["device_ms"] = device_ms(fn, device, args.reps)
                    record["wall_ms"] = wall_ms(fn, device, args.reps)
                    record["launches"] = count_launches(fn, device)
                    record["GB_per_s"] = record["min_bytes"] / (record["device_ms"]["median"] * 1e-3) / 1e9
                    if provider == "eager":
                        eager_ms = record
                    if eager_ms is not None:
                        record["speedup_device"] = eager_ms["device_ms"]["median"] / record["device_ms"]["median"]
                        record["speedup_wall"] = eager_ms["wall_ms"] / record["wall_ms"]
                    records.append(record)
                    print(f"{layout:7s} G={group_size:<5d} {scale:5s} {provider:8s} "
                          f"{'events' if device.type == 'cuda' else 'host'} {record['device_ms']['median']:8.4f} ms  "
                          f"wall {record['wall_ms']:8.4f} ms  "
                          f"{record['GB_per_s']:7.1f} GB/s  launches {record['launches']}  "
                          f"x{record.get('speedup_device', float('nan')):.1f} (device) "
                          f"x{record.get('speedup_wall', float('nan')):.1f} (wall)  "
                          f"diff {record['max_abs_diff_vs_eager']:.2e}")
    return {"kind": "advantages", **env, "warmup": args.warmup, "reps": args.reps, "records": records}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rewards", type=int, default=1 << 20)
    parser.add_argument("--group-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 64])
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=["size", "offsets", "ids"])
    parser.add_argument("--scales", type=lambda s: s.split(","), default=["group", "batch"])
    parser.add_argument("--providers", type=lambda s: s.split(","), default=list(PROVIDERS))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/advantages-...)")
    args = parser.parse_args(argv)
    for p in args.providers:
        if p not in PROVIDERS:
            parser.error(f"unknown provider {p!r}; choose from {PROVIDERS}")
    doc = run(args)
    out = args.out or os.path.join(
        HERE, "results", f"advantages-{doc['device']['type']}-{doc['date'][:19].replace(':', '')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
