"""Peak memory of the fused linear path over sequence length: eager vs chunked vs tiled.

    python benchmarks/profile_linear_memory.py                 # GPU: H=3584, V=151936, bf16, N=1k..128k
    python benchmarks/profile_linear_memory.py --seq-lens 1024,2048 --providers eager,triton-tiled

Runs one fwd+bwd of ``linear_grpo_loss`` per provider and length in a fresh subprocess (the
shared harness :func:`grpo_fused.benchmarks.harness.run_memory_sweep`), B = 1, and records
``torch.cuda.max_memory_allocated`` beyond the inputs (gradients included). Next to each
measurement it stores the peak the model below predicts, and checks DESIGN.md section 5:
loss-side peak <= 2% of eager's at N = 16k, and N = 131072 running where eager cannot.
Output: ``benchmarks/results/memory-<device>-<date>.json`` (+ ``.png``), and a table.

Memory model (bytes beyond the inputs, e = element size, N tokens, written before measuring):
  gradients, every provider:  dhidden N*H*e + dweight V*H*e
  eager (reference):          fp32 copies of hidden and weight (N*H*4 + V*H*4), and about six
                              fp32 (N, V) buffers alive at once (logits, z = logits / T, softmax,
                              p * z and their gradients): ~ 6*N*V*4
  chunked:                    at most DEFAULT_MAX_CHUNK_BYTES of logit state at once: one token
                              chunk (fp32 logits, gradient in place, bf16 copy) in forward and
                              in the dhidden pass, one vocab slice in the dweight pass
  tiled:                      fp32 accumulators N*H*4 + V*H*4 and their casts; O(N) otherwise
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from grpo_fused.benchmarks import harness as bm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("eager", "triton-chunked", "triton-tiled", "liger")


def predicted_peak(provider: str, N: int, V: int, H: int, e: int) -> int:
    """The model of the module docstring, in bytes."""
    grads = N * H * e + V * H * e
    if provider == "eager":
        return grads + N * H * 4 + V * H * 4 + 6 * N * V * 4
    if provider == "triton-chunked":
        from grpo_fused.kernels.linear_chunked import chunk_rows

        per_logit = e if e == 4 else 4 + e
        return grads + max(chunk_rows(N, V, per_logit) * V, chunk_rows(V, N, per_logit) * N) * per_logit
    if provider == "triton-tiled":
        return grads + N * H * 4 + V * H * 4
    return 0


def loss_side(peak: int, N: int, V: int, H: int, e: int) -> int:
    """Peak minus the gradients every implementation must return (dhidden, dweight)."""
    return peak - (N * H * e + V * H * e)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-lens", default=",".join(str(1024 * 2**i) for i in range(8)),
                        help="comma-separated token counts (B = 1); default 1024..131072")
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per provider (all lengths)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    providers = [p for p in args.providers.split(",") if p]
    V, H = args.vocab, args.hidden
    e = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    doc = bm.run_memory_sweep(device, ["linear"], B=1, seq_lens=seq_lens, V=V, H=H, dtype=args.dtype,
                              provider_names=providers, timeout=args.timeout,
                              progress=lambda label: print(f"running {label}", file=sys.stderr))

    # Predictions next to the measurements, and the section-5 checks on what was measured.
    peaks = {}
    for row in doc["results"]:
        for p in row.get("points", []):
            p["predicted_peak_bytes"] = predicted_peak(row["provider"], p["N"], V, H, e) or None
            if p["status"] == "ok":
                peaks[(row["provider"], p["N"])] = p["peak_memory_bytes"]
    checks = {}
    n16 = 16384
    if ("eager", n16) in peaks:
        for name in ("triton-chunked", "triton-tiled"):
            if (name, n16) in peaks:
                checks[f"{name} loss-side peak / eager at N=16384 (target <= 0.02)"] = (
                    loss_side(peaks[(name, n16)], n16, V, H, e) / loss_side(peaks[("eager", n16)], n16, V, H, e))
                checks[f"{name} total peak / eager at N=16384"] = peaks[(name, n16)] / peaks[("eager", n16)]
    n128 = 131072
    if n128 in seq_lens:
        for row in doc["results"]:
            point = next((p for p in row.get("points", []) if p["N"] == n128), None)
            if point is not None:
                checks[f"{row['provider']} at N=131072"] = point["status"]
    doc["linear_memory_model"] = __doc__[__doc__.index("Memory model"):].strip()
    doc["checks"] = checks

    path = bm.save(doc, args.out_dir)
    png = bm.plot_memory(doc, path[: -len(".json")] + ".png")
    print(f"peak memory beyond inputs, one fwd+bwd of linear_grpo_loss, B=1, H={H}, V={V}, {args.dtype}, "
          f"on {doc['device']['name']} (torch {torch.__version__})")
    print(f"{'provider':<16}{'N':>8}  {'measured':>12}  {'predicted':>12}  status")
    for row in doc["results"]:
        if row["status"] == "unavailable":
            print(f"{row['provider']:<16}  unavailable: {row.get('reason')}")
            continue
        for p in row.get("points", []):
            measured = bm.fmt_bytes(p["peak_memory_bytes"]) if p["status"] == "ok" else "-"
            print(f"{row['provider']:<16}{p['N']:>8}  {measured:>12}  {bm.fmt_bytes(p.get('predicted_peak_bytes')):>12}  "
                  f"{p['status']}")
    for name, value in checks.items():
        print(f"{name}: {value if isinstance(value, str) else f'{value:.4f}'}")
    print(f"wrote {path}\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
