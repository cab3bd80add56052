"""The ``grpo-fused`` command (also ``python -m grpo_fused``).

Subcommands:

* ``bench``: forward, backward and fwd+bwd time and peak memory of every implementation that can
  run here (eager reference, torch.compile'd reference, the Triton / C++ backends, Liger-Kernel),
  side by side, with ratios to eager and achieved TB/s or TFLOP/s against the device's floors.
  Prints a table, writes ``bench-<device>-<date>.json`` under ``--out-dir``.
* ``profile-memory``: peak memory of one fwd+bwd per implementation over sequence lengths
  (1k to 128k tokens on GPU, 128 to 1024 on CPU); writes JSON and a PNG plot.
* ``static-report``: compiles the Triton kernels for sm_90a at the DESIGN shapes (no GPU needed),
  reads their SASS and writes predicted times (:mod:`grpo_fused.benchmarks.static_report`; it
  takes that module's arguments, ``--help`` lists them).
* ``train``: forwards its arguments to ``grpo_fused.trainer.main(argv)``.

Shapes default to DESIGN.md's reference shapes on a GPU and to small fp32 shapes on CPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

DEFAULT_OUT_DIR = os.path.join("benchmarks", "results")


class UsageError(Exception):
    """A bad command-line argument: reported as one line naming it, exit status 2, before any work."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message>`` on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_checked(prog: str, fn, *args) -> int:
    """``fn(*args)``, with a :class:`UsageError` (or the ValueError / TypeError of a check that runs
    before any work) printed as one line and turned into exit status 2."""
    try:
        return fn(*args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def writable_dir(name: str, path: str) -> str:
    """``path`` created if needed and proven writable now, not after a long run."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".grpo-fused-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"{name} {path!r} is not a writable folder ({exc.strerror or exc})") from None
    return path


def _csv(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _ints(text: str) -> List[int]:
    try:
        values = [int(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu or cuda[:i]")
    p.add_argument("--ops", type=_csv, default=["logits", "linear"],
                   help="comma-separated: logits (loss from logits), linear (from hidden states)")
    p.add_argument("--providers", type=_csv, default=None,
                   help="comma-separated provider names (default: all of them; the unavailable ones are "
                        "listed with their reason)")
    p.add_argument("--vocab", type=_positive_int, default=None, help="V (default: 151936 on GPU, 32000 on CPU)")
    p.add_argument("--hidden", type=_positive_int, default=None, help="H of the linear path")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="logits / hidden dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"results folder (default: {DEFAULT_OUT_DIR})")
    p.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds per implementation (default 600)")
    p.add_argument("--plain", action="store_true", help="plain-text table instead of rich")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="grpo-fused", description="Fused GRPO-family losses: benchmarks and tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time and memory of every available implementation, side by side")
    _add_common(bench)
    bench.add_argument("--batch", type=_positive_int, default=None, help="B (default: 8 on GPU, 2 on CPU)")
    bench.add_argument("--seq", type=_positive_int, default=None, help="T (default: 2048 on GPU, 128 on CPU)")
    bench.add_argument("--warmup", type=_non_negative_int, default=None,
                       help="untimed iterations (default: 3 GPU, 1 CPU)")
    bench.add_argument("--reps", type=_positive_int, default=None, help="timed iterations (default: 20 GPU, 3 CPU)")
    bench.add_argument("--long", action="store_true",
                       help="GPU: add DESIGN.md's long-sequence linear case, N = 1 x 131072")

    mem = sub.add_parser("profile-memory", help="peak memory vs sequence length, JSON + PNG plot")
    _add_common(mem)
    mem.add_argument("--batch", type=_positive_int, default=None, help="B (default 1)")
    mem.add_argument("--seq-lens", type=_ints, default=None,
                     help="comma-separated T values (default: 1024..131072 on GPU, 128..1024 on CPU)")

    sub.add_parser("static-report", help="sm_90a compile + SASS report of the Triton kernels, predicted times",
                   add_help=False)
    train = sub.add_parser("train", help="run grpo_fused.trainer with the remaining arguments", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def resolve_device(name: str, option: str = "--device"):
    """``auto`` (cuda when present, else cpu), ``cpu`` or ``cuda[:i]`` of a visible GPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} must be auto, cpu or cuda[:i], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{option} must be auto, cpu or cuda[:i], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {name} asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {name}: there are {torch.cuda.device_count()} GPUs")
    return device


class _Progress:
    """A progress bar over (op, provider) steps on stderr: tqdm when installed, else one line each."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="impl", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass
        self.started = False

    def __call__(self, label: str):
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.set_postfix_str(label)
        elif self.enabled:
            print(f"  running {label} ...", file=sys.stderr, flush=True)
        self.started = True

    def close(self):
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.close()


def _print_table(rows, title: str, plain: bool):
    from .benchmarks import harness as bm

    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            plain = True
    print(title)
    if plain:
        print(bm.plain_table(rows))
        return
    table = Table(show_lines=False)
    for i, name in enumerate(rows[0]):
        table.add_column(name, justify="left" if i < 2 else "right", overflow="fold")
    for r in rows[1:]:
        table.add_row(*r)
    Console(width=max(150, Console().width)).print(table)


def _print_unavailable(doc):
    missing = [r for r in doc["results"] if r["status"] != "ok"]
    if missing:
        print("Not measured:")
        for r in missing:
            n = f" N={r['case']['N']}" if "case" in r else ""
            print(f"  {r['op']}{n} / {r['provider']}: {r['status']}: {r.get('reason')}")


def _check_ops(ops):
    from .benchmarks import harness as bm

    bad = [op for op in ops if op not in bm.OPS]
    if bad or not ops:
        raise UsageError(f"--ops must be a comma-separated subset of {bm.OPS}, got {ops}")


def _check_providers(names):
    from .benchmarks import harness as bm

    if names is None:
        return
    known = {p.name for p in bm.PROVIDERS}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"--providers: unknown provider(s) {unknown}; known: {', '.join(sorted(known))}")


def _check_common(args):
    """Every check of the options bench and profile-memory share; returns the device."""
    _check_ops(args.ops)
    _check_providers(args.providers)
    device = resolve_device(args.device)
    writable_dir("--out-dir", args.out_dir)
    return device


def cmd_bench(args) -> int:
    from .benchmarks import harness as bm

    device = _check_common(args)
    gpu = device.type == "cuda"
    cases = []
    for case in bm.default_cases(device.type, args.ops, long=args.long):
        changes = {k: v for k, v in (("B", args.batch), ("T", args.seq), ("V", args.vocab), ("dtype", args.dtype),
                                     ("H", args.hidden if case.op == "linear" else None)) if v is not None}
        case = bm.dataclasses.replace(case, **changes)
        if case not in cases:  # --batch / --seq make the long case the same as the default one
            cases.append(case)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    reps = args.reps if args.reps is not None else (20 if gpu else 3)
    total = sum(len(bm.providers_for(c.op, args.providers)) for c in cases)
    progress = _Progress(total, not args.no_progress, "bench")
    try:
        doc = bm.run_bench(device, cases, args.providers, warmup=warmup, reps=reps, timeout=args.timeout,
                           progress=progress)
    finally:
        progress.close()
    path = bm.save(doc, args.out_dir)
    shapes = "; ".join(f"{c.label}: B={c.B} T={c.T} V={c.V}" + (f" H={c.H}" if c.H else "") + f" {c.dtype}"
                       for c in cases)
    tag = " [CPU-only figures]" if doc["cpu_only"] else ""
    floors = doc["floors"]
    _print_table(bm.bench_table(doc), f"grpo-fused bench on {doc['device']['name']}{tag}\n{shapes}", args.plain)
    print(f"times: median ±(p80-p20)/2 of {reps} reps after {warmup} warm-up; 'vs eager' = eager time / time; "
          f"floors: {floors['bandwidth'] / 1e12:.3g} TB/s ({floors['bandwidth_source']}), "
          f"{floors['gemm_flops'] / 1e12:.3g} TFLOP/s ({floors['gemm_source']})")
    _print_unavailable(doc)
    print(f"wrote {path}")
    return 0


def cmd_profile_memory(args) -> int:
    from .benchmarks import harness as bm

    device = _check_common(args)
    sweep = bm.default_sweep(device.type)
    for key, value in (("B", args.batch), ("seq_lens", args.seq_lens), ("V", args.vocab), ("H", args.hidden),
                       ("dtype", args.dtype)):
        if value is not None:
            sweep[key] = value
    total = sum(len(bm.providers_for(op, args.providers)) for op in args.ops)
    progress = _Progress(total, not args.no_progress, "profile-memory")
    try:
        doc = bm.run_memory_sweep(device, args.ops, provider_names=args.providers, timeout=args.timeout,
                                  progress=progress, **sweep)
    finally:
        progress.close()
    path = bm.save(doc, args.out_dir)
    png = bm.plot_memory(doc, path[: -len(".json")] + ".png")
    tag = " [CPU-only figures]" if doc["cpu_only"] else ""
    title = (f"grpo-fused peak memory (fwd+bwd, beyond inputs) on {doc['device']['name']}{tag}\n"
             f"B={sweep['B']} V={sweep['V']} H={sweep['H']} (linear) {sweep['dtype']}")
    _print_table(bm.memory_table(doc), title, args.plain)
    print(f"method: {doc['memory_method']}")
    _print_unavailable(doc)
    print(f"wrote {path}\nwrote {png}")
    return 0


def cmd_train(argv: List[str]) -> int:
    try:
        trainer = importlib.import_module("grpo_fused.trainer")
    except ImportError as exc:
        print(f"grpo-fused train: the trainer is not available in this installation (grpo_fused.trainer could "
              f"not be imported: {exc})", file=sys.stderr)
        return 2
    result = trainer.main(argv)
    return 0 if result is None else int(result)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``grpo-fused`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        # Everything after "train" belongs to the trainer, --help included.
        return cmd_train(argv[1:])
    if argv and argv[0] == "static-report":
        from .benchmarks import static_report  # its own parser: everything after the name is its

        return int(static_report.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    command = cmd_bench if args.command == "bench" else cmd_profile_memory
    return run_checked(f"grpo-fused {args.command}", command, args)
