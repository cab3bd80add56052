"""The fused logits path (grpo_loss from (B, T, V) logits) over a vocab x tokens grid.

    python benchmarks/bench_logits.py                     # GPU: V in 32000, 128256, 151936; N in 4096, 16384
    python benchmarks/bench_logits.py --vocab 151936 --tokens 16384 --providers eager triton triton-inplace
    python benchmarks/bench_logits.py --smoke             # CPU: tiny shapes, checks the script end to end
    GRPO_FUSED_BLOCK_V=4096 python benchmarks/bench_logits.py --providers triton   # try another tile width

Providers (see :mod:`grpo_fused.benchmarks.harness`): ``eager`` (grpo_fused.reference, TRL-style: fp32
logits materialized, log-softmax, gather), ``compile`` (torch.compile of it), ``triton`` and
``triton-inplace`` (the fused kernels, dlogits in a new buffer or written into the logits),
``liger`` (Liger-Kernel ``triton_grpo_loss``, when installed). Loss: DAPO, eps 0.2 / 0.28, beta
0.04 (k3 KL against ref logps), entropy on. Inputs bf16 N(0, 1) logits, fresh per case; each
sequence is T = 2048 positions (B = N / 2048) with a random length in [T/2, T].

Bytes each mode must move at least (the floor, N tokens, V vocab, e = 2 bytes for bf16):
  fwd      read logits                       N*V*e
  bwd      read logits, write dlogits        2*N*V*e
  fwd+bwd                                    3*N*V*e   (DESIGN.md: 14.9 GB at N=16384, V=151936)
N-sized tensors (ids, logps, lse, advantages, ...) are ignored. Achieved TB/s = bytes / median
time; "% floor" = (bytes / HBM bandwidth) / median time, bandwidth from the device's nominal
figure (or a measured copy rate when unknown). Targets (DESIGN.md section 5): fwd+bwd >= 85% of
the floor and >= 8x eager.

Timing: each (case, provider) runs in a fresh subprocess; CUDA events around fwd, bwd and
fwd+bwd after warm-up, L2 flushed before each repetition; median and 20/80th percentiles.
Peak memory: ``torch.cuda.max_memory_allocated`` beyond the inputs over one fwd+bwd.

The public API checks that ids lie in [0, V), one host sync a call; this script turns that check
off (``GRPO_FUSED_CHECK_IDS=0``, inherited by the workers) unless ``--check-ids`` is given, so
the fused providers are timed as a training loop that trusts its ids would run them.

Predictions written before any GPU run (H100 SXM, 3.35 TB/s; N = 16384, V = 151936, bf16):
  floor: fwd 4.98 GB -> 1.49 ms; bwd 9.96 GB -> 2.97 ms; fwd+bwd 14.9 GB -> 4.46 ms.
  fwd loop: ~12 fp32 ops and one exp per column (the online update takes exp(-|z - m|) once
  instead of exp(m - m') and exp(z - m')): 2.5e9 columns x 12 / ~3e13 op/s ~ 1.0 ms < 1.49 ms,
  so the forward should stay memory-bound; with two exps it would have been close to the
  MUFU limit (~1.35 ms for the exps alone). bwd: one exp and ~8 ops per column, far from it.
  eager: fp32 upcast (N*V*4 written + read), log_softmax (read + write fp32), gather, and a
  backward of the same size: >= 8 N*V*4-byte passes ~ 80 GB ~ 24 ms, so >= 5x from bytes
  alone, more with its launches; the 8x target needs the fused path near its floor.

Results: ``benchmarks/results/bench-logits-<device>-<date>.json`` (long format: one record per
case x provider, with device, torch / triton versions, date, git revision and shapes).
"""

from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    # Interpreter timings mean nothing; on CPU the Triton providers report themselves unavailable.
    del os.environ["TRITON_INTERPRET"]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from grpo_fused.benchmarks import harness as bm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ_LEN = 2048
GRID_VOCAB = (32000, 128256, 151936)
GRID_TOKENS = (4096, 16384)
PROVIDERS = ("eager", "compile", "triton", "triton-inplace", "liger")
TARGET_PCT_FLOOR = 85.0
TARGET_SPEEDUP = 8.0


def cases_for(vocab, tokens, dtype, seq_len):
    cases = []
    for n in tokens:
        t = min(seq_len, n)
        if n % t:
            raise SystemExit(f"--tokens {n} must be a multiple of the sequence length {t}")
        for v in vocab:
            cases.append(bm.Case("logits", n // t, t, v, None, dtype))
    return cases


def verdict(row):
    """Where the fused providers stand against the DESIGN.md targets (fwd+bwd)."""
    if row.get("status") != "ok" or not row["provider"].startswith("triton"):
        return ""
    pct = row["rates"]["fwd+bwd"]["pct_of_floor"]
    speed = row.get("speedup_vs_eager", {}).get("fwd+bwd")
    marks = [f"floor {'ok' if pct >= TARGET_PCT_FLOOR else 'MISS'}"]
    if speed is not None:
        marks.append(f"vs eager {'ok' if speed >= TARGET_SPEEDUP else 'MISS'}")
    return ", ".join(marks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="vocab sizes (default: the grid)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="N = B*T values (default: the grid)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="positions per sequence (T)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per (case, provider) subprocess")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes: checks the script, measures nothing")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--check-ids", action="store_true", help="keep the API's id range check (a host sync)")
    args = parser.parse_args(argv)
    if not args.check_ids:
        os.environ["GRPO_FUSED_CHECK_IDS"] = "0"

    if args.smoke:
        device = torch.device("cpu")
        vocab, tokens, seq_len, dtype = args.vocab or [257], args.tokens or [64], 32, "float32"
        args.warmup, args.reps = 1, 2
    else:
        if not torch.cuda.is_available():
            print("bench_logits.py measures the Triton kernels and needs a CUDA GPU (use --smoke on CPU).",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda")
        vocab, tokens, seq_len, dtype = args.vocab or GRID_VOCAB, args.tokens or GRID_TOKENS, args.seq_len, args.dtype

    cases = cases_for(vocab, tokens, dtype, seq_len)
    rows = []
    doc = None
    for case in cases:
        label = f"N={case.N} V={case.V} {case.dtype}"
        part = bm.run_bench(device, [case], args.providers, warmup=args.warmup, reps=args.reps,
                            timeout=args.timeout, progress=lambda name: print(f"{label}: {name}", flush=True))
        rows.extend(part["results"])
        doc = part if doc is None else doc
    doc = dict(doc, kind="bench-logits", cases=[c.to_json() for c in cases], results=rows,
               targets=dict(pct_of_floor=TARGET_PCT_FLOOR, speedup_vs_eager=TARGET_SPEEDUP))
    path = bm.save(doc, args.out_dir)

    table = [["N", "V"] + bm.bench_table(dict(results=[]))[0] + ["targets"]]
    for r in rows:
        line = bm.bench_table(dict(results=[r]))[1]
        table.append([str(r["case"]["N"]), str(r["case"]["V"])] + line + [verdict(r)])
    print(bm.plain_table(table))
    versions = doc.get("versions", {})
    print(f"\n{doc['device']['name']}, torch {versions.get('torch')}, triton {versions.get('triton')}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
