"""Render the README's headline table and memory plot from the newest results.

    python benchmarks/render.py [--results-dir benchmarks/results]

Reads the ``bench-*.json`` and ``memory-*.json`` files that ``grpo-fused bench`` and
``grpo-fused profile-memory`` write, picks the newest GPU run of each (the newest CPU run when
there is no GPU run, and then says so in bold at the top), writes
``<results-dir>/README_table.md`` and copies the newest memory plot to ``<results-dir>/memory.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from grpo_fused.benchmarks.harness import fmt_bytes  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load(results_dir: str, kind: str) -> List[Dict[str, Any]]:
    docs = []
    for path in glob.glob(os.path.join(results_dir, f"{kind}-*.json")):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        if doc.get("kind") == kind:
            doc["_path"] = path
            docs.append(doc)
    return docs


def newest(docs: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The newest GPU document, else the newest CPU one."""
    gpu = [d for d in docs if d["device"]["type"] == "cuda"]
    pool = gpu or docs
    return max(pool, key=lambda d: d["date"]) if pool else None


def _ms(stats) -> str:
    return f"{stats['median']:.3g}"


def bench_markdown(doc: Dict[str, Any]) -> List[str]:
    lines = []
    env = f"{doc['device']['name']}, torch {doc['versions']['torch']}, triton {doc['versions'].get('triton')}"
    lines.append(f"Measured {doc['date'][:10]} on {env}, git {doc.get('git_revision')}; "
                 f"median of {doc['reps']} repetitions after {doc['warmup']} warm-up "
                 f"(`{os.path.basename(doc['_path'])}`).")
    floors = doc["floors"]
    lines.append(f"Floors: {floors['bandwidth'] / 1e12:.3g} TB/s ({floors['bandwidth_source']}), "
                 f"{floors['gemm_flops'] / 1e12:.3g} TFLOP/s ({floors['gemm_source']}).")
    if doc["device"]["type"] != "cuda":
        lines.append("On CPU the floors are rates measured here and a working set that fits in cache can beat "
                     "them (more than 100% of floor); load average at the start: "
                     f"{', '.join(f'{x:.1f}' for x in doc.get('load_average') or [])}.")
    lines.append("")
    for case in doc["cases"]:
        op = case["op"]
        shape = f"B={case['B']} T={case['T']} (N={case['N']}) V={case['V']}" + (
            f" H={case['H']}" if case.get("H") else "") + f", {case['dtype']}"
        title = "Loss from logits" if op == "logits" else "Loss from hidden states (lm_head fused)"
        unit = "TB/s" if op == "logits" else "TFLOP/s"
        lines.append(f"**{title}**, {shape}, fwd+bwd:")
        lines.append("")
        lines.append(f"| implementation | fwd ms | bwd ms | fwd+bwd ms | speedup vs eager | {unit} | % of floor "
                     "| peak memory | memory vs eager |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        missing = []
        for r in doc["results"]:
            if r["op"] != op or r["case"]["N"] != case["N"]:
                continue
            if r["status"] != "ok":
                missing.append(f"{r['provider']} ({r['status']}: {r.get('reason')})")
                continue
            t, rate = r["time_ms"], r["rates"]["fwd+bwd"]
            speed = r.get("speedup_vs_eager", {}).get("fwd+bwd")
            mem = r.get("memory_vs_eager")
            lines.append(
                f"| {r['provider']} | {_ms(t['fwd'])} | {_ms(t['bwd'])} | {_ms(t['fwd+bwd'])} | "
                f"{'-' if speed is None else f'{speed:.2f}x'} | {rate['achieved']:.3g} | "
                f"{rate['pct_of_floor']:.1f}% | {fmt_bytes(r['peak_memory_bytes'])} | "
                f"{'-' if mem is None else f'{mem:.3g}x'} |")
        lines.append("")
        if missing:
            lines.append("Not measured: " + "; ".join(missing) + ".")
            lines.append("")
    lines.append(f"Peak memory: {doc['memory_method']}.")
    return lines


def memory_markdown(doc: Dict[str, Any]) -> List[str]:
    sweep = doc["sweep"]
    lines = [f"Peak memory of one fwd+bwd beyond the inputs, B={sweep['B']}, V={sweep['V']}, H={sweep['H']} "
             f"(linear), {sweep['dtype']}, {doc['device']['name']} (`{os.path.basename(doc['_path'])}`):", ""]
    lines.append("| path | implementation | " + " | ".join(f"N={sweep['B'] * t}" for t in sweep["seq_lens"]) + " |")
    lines.append("|---|---|" + "---:|" * len(sweep["seq_lens"]))
    for r in doc["results"]:
        if r["status"] == "unavailable":
            continue
        by_t = {p["T"]: p for p in r.get("points", [])}
        cells = []
        for t in sweep["seq_lens"]:
            p = by_t.get(t)
            cells.append("-" if p is None else fmt_bytes(p["peak_memory_bytes"]) if p["status"] == "ok"
                         else p["status"].upper() if p["status"] == "oom" else p["status"])
        lines.append(f"| {r['op']} | {r['provider']} | " + " | ".join(cells) + " |")
    return lines


def render(results_dir: str) -> str:
    """Writes README_table.md (and memory.png when a plot exists); returns the markdown."""
    bench, memory = newest(load(results_dir, "bench")), newest(load(results_dir, "memory"))
    if bench is None and memory is None:
        raise SystemExit(f"no bench-*.json or memory-*.json under {results_dir}; run `grpo-fused bench` first")
    lines: List[str] = []
    cpu_only = [d for d in (bench, memory) if d is not None and d["device"]["type"] != "cuda"]
    if cpu_only:
        lines.append("> **CPU-only figures**: no GPU results yet; these numbers come from "
                     f"{cpu_only[0]['device']['name']} and say nothing about GPU performance.")
        lines.append("")
    if bench is not None:
        lines += bench_markdown(bench)
        lines.append("")
    if memory is not None:
        lines += memory_markdown(memory)
        png = memory["_path"][: -len(".json")] + ".png"
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(results_dir, "memory.png"))
            lines += ["", "![peak memory vs tokens](benchmarks/results/memory.png)"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results_dir, "README_table.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    print(render(args.results_dir))


if __name__ == "__main__":
    main()
