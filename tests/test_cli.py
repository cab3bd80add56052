"""The ``grpo-fused`` command: bench / profile-memory produce sane JSON, tables and a PNG; train forwards.

The measurements run the eager reference on tiny CPU shapes in worker subprocesses (one per op),
exactly as ``grpo-fused bench`` does on a machine with no GPU. Sizes: V = 1031 / 2053 (primes, not
a multiple of any block), odd T, so the numbers below are the shapes' own, not round defaults.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from grpo_fused.benchmarks import harness as bm
from grpo_fused import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, V, H = 2, 25, 1031, 48
SWEEP_T, SWEEP_V, SWEEP_H = (16, 64), 2053, 32
MIB = 1 << 20


def _only(paths, prefix, suffix):
    found = [p for p in paths if p.startswith(prefix) and p.endswith(suffix)]
    assert len(found) == 1, paths
    return found[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One bench and one profile-memory run into a fresh results folder (they take most of the time)."""
    out = str(tmp_path_factory.mktemp("results"))
    outputs = {}
    import contextlib
    import io

    for name, argv in {
        "bench": ["bench", "--device", "cpu", "--providers", "eager,triton,liger", "--batch", str(B), "--seq", str(T),
                  "--vocab", str(V), "--hidden", str(H), "--warmup", "1", "--reps", "2"],
        "memory": ["profile-memory", "--device", "cpu", "--providers", "eager", "--seq-lens",
                   ",".join(map(str, SWEEP_T)), "--vocab", str(SWEEP_V), "--hidden", str(SWEEP_H)],
    }.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            status = cli.main(argv + ["--out-dir", out, "--plain", "--no-progress", "--timeout", "300"])
        assert status == 0
        outputs[name] = buf.getvalue()
    files = sorted(os.listdir(out))
    with open(os.path.join(out, _only(files, "bench-cpu-", ".json"))) as f:
        bench = json.load(f)
    with open(os.path.join(out, _only(files, "memory-cpu-", ".json"))) as f:
        memory = json.load(f)
    return dict(out=out, files=files, bench=bench, memory=memory, stdout=outputs)


def test_bench_json_header(runs):
    doc = runs["bench"]
    assert doc["kind"] == "bench" and doc["device"]["type"] == "cpu" and doc["cpu_only"] is True
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["date"][:2] == "20" and "T" in doc["date"]
    assert doc["reps"] == 2 and doc["warmup"] == 1
    assert doc["memory_method"].startswith("cpu-")
    assert doc["floors"]["bandwidth"] > 0 and doc["floors"]["gemm_flops"] > 0
    shapes = {c["op"]: (c["B"], c["T"], c["V"], c["H"], c["dtype"]) for c in doc["cases"]}
    assert shapes == {"logits": (B, T, V, None, "float32"), "linear": (B, T, V, H, "float32")}


def test_bench_eager_figures(runs):
    rows = {(r["op"], r["provider"]): r for r in runs["bench"]["results"]}
    N = B * T
    for op in ("logits", "linear"):
        r = rows[(op, "eager")]
        assert r["status"] == "ok", r.get("reason")
        for mode in bm.MODES:
            t = r["time_ms"][mode]
            assert t["reps"] == 2 and 0 < t["min"] <= t["median"] <= t["max"]
            assert r["rates"][mode]["achieved"] > 0 and r["rates"][mode]["pct_of_floor"] > 0
            assert r["speedup_vs_eager"][mode] == 1.0
        # The eager reference keeps at least the fp32 logits and their gradient alive at its peak;
        # the inputs (and the ~300 MB of the interpreter and torch) must not be counted.
        assert 2 * N * V * 4 <= r["peak_memory_bytes"] < 64 * MIB
        assert r["memory_vs_eager"] == 1.0
    # Hand-computed work: 3 * N * V * 4 bytes for the logits path, 8 * N * V * H FLOPs for the linear path.
    assert rows[("logits", "eager")]["case"]["work"]["fwd+bwd"] == 3 * 50 * 1031 * 4
    assert rows[("linear", "eager")]["case"]["work"]["fwd+bwd"] == 8 * 50 * 1031 * 48
    rate = rows[("logits", "eager")]["rates"]["fwd+bwd"]
    median_s = rows[("logits", "eager")]["time_ms"]["fwd+bwd"]["median"] / 1e3
    assert rate["achieved"] == pytest.approx(3 * 50 * 1031 * 4 / median_s / 1e12)


def test_bench_lists_unavailable_with_reason(runs):
    rows = {(r["op"], r["provider"]): r for r in runs["bench"]["results"]}
    assert rows[("logits", "liger")]["status"] == "unavailable"
    assert "CUDA" in rows[("logits", "liger")]["reason"]
    assert rows[("logits", "triton")]["status"] == "unavailable"
    assert ("linear", "triton") not in rows  # the logits-path provider is not a linear-path one
    text = runs["stdout"]["bench"]
    assert "eager" in text and "liger" in text and "Not measured" in text and "wrote " in text
    table_rows = [line.split()[:3] for line in text.splitlines()]
    assert ["logits", f"N={B * T}", "eager"] in table_rows and ["linear", f"N={B * T}", "eager"] in table_rows
    assert ["logits", f"N={B * T}", "liger"] in table_rows


def test_profile_memory_json_and_png(runs):
    doc = runs["memory"]
    assert doc["kind"] == "memory" and doc["sweep"]["seq_lens"] == list(SWEEP_T)
    for r in doc["results"]:
        assert r["provider"] == "eager" and r["status"] == "ok"
        points = r["points"]
        assert [p["status"] for p in points] == ["ok", "ok"], points
        small, large = (p["peak_memory_bytes"] for p in points)
        # 4x the tokens: the (N, V) buffers dominate, so the peak must grow at least 2x.
        assert 2 * SWEEP_T[0] * SWEEP_V * 4 <= small and large >= 2 * small
        assert large < 64 * MIB
    png = _only(runs["files"], "memory-cpu-", ".png")
    with open(os.path.join(runs["out"], png), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(os.path.join(runs["out"], png))
    assert image.shape[0] > 300 and image.shape[1] > 1000  # two readable panels
    assert "eager" in runs["stdout"]["memory"] and "T=64" in runs["stdout"]["memory"]


def test_render_marks_cpu_only(runs):
    spec = importlib.util.spec_from_file_location("render", os.path.join(ROOT, "benchmarks", "render.py"))
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = render.render(runs["out"])
    assert text.startswith("> **CPU-only figures**")
    assert "| eager |" in text and f"N={SWEEP_T[1]}" in text
    assert os.path.exists(os.path.join(runs["out"], "README_table.md"))
    assert os.path.exists(os.path.join(runs["out"], "memory.png"))


def test_newest_prefers_gpu():
    spec = importlib.util.spec_from_file_location("render", os.path.join(ROOT, "benchmarks", "render.py"))
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    docs = [{"device": {"type": "cuda"}, "date": "2026-01-01T00:00:00+00:00"},
            {"device": {"type": "cpu"}, "date": "2026-06-01T00:00:00+00:00"},
            {"device": {"type": "cuda"}, "date": "2026-02-01T00:00:00+00:00"}]
    assert render.newest(docs) is docs[2]
    assert render.newest(docs[1:2]) is docs[1]


def test_summarize_and_work_by_hand():
    s = bm.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["min"], s["max"], s["reps"]) == (3.0, 1.0, 5.0, 5)
    assert s["p20"] == pytest.approx(1.8) and s["p80"] == pytest.approx(4.2)
    bf16 = bm.Case("logits", 8, 2048, 151936, None, "bfloat16")
    assert bf16.work()["fwd+bwd"] == 3 * 16384 * 151936 * 2  # DESIGN.md: 14.9 GB
    lin = bm.Case("linear", 8, 2048, 151936, 3584, "bfloat16")
    assert lin.work()["fwd+bwd"] == pytest.approx(71.4e12, rel=1e-3)  # DESIGN.md: 71 TFLOP


def test_train_forwards_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("grpo_fused.trainer")
    fake.main = lambda argv: seen.append(list(argv))
    monkeypatch.setitem(sys.modules, "grpo_fused.trainer", fake)
    assert cli.main(["train", "--steps", "3", "--help"]) == 0
    assert seen == [["--steps", "3", "--help"]]


def test_train_without_trainer_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "grpo_fused.trainer", None)  # makes the import fail
    assert cli.main(["train"]) == 2
    assert "grpo_fused.trainer" in capsys.readouterr().err


UNWRITABLE = "/proc/grpo-fused-cannot-write-here"

BAD_ARGUMENTS = [
    (["bench", "--ops", "logits,nope"], "--ops"),
    (["bench", "--providers", "eager,fast"], "--providers"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--timeout", "-5"], "--timeout"),
    (["bench", "--reps", "0"], "--reps"),
    (["bench", "--out-dir", UNWRITABLE], "--out-dir"),
    (["profile-memory", "--seq-lens", "0,8"], "--seq-lens"),
    (["profile-memory", "--out-dir", UNWRITABLE], "--out-dir"),
    (["train", "--loss-type", "nope"], "--loss-type"),
    (["train", "--backend", "tpu"], "--backend"),
    (["train", "--strategy", "dense"], "--strategy"),
    (["train", "--model", "/no/such/model"], "--model"),
    (["train", "--reward", "no_colon"], "--reward"),
    (["train", "--reward", "no_such_module_xyz:score"], "--reward"),
    (["train", "--reward", "json:no_such_function"], "--reward"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--num-generations", "1"], "--num-generations"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--temperature", "0"], "--temperature"),
    (["train", "--epsilon", "-0.1"], "--epsilon"),
    (["train", "--output-dir", UNWRITABLE], "--output-dir"),
    (["train", "--prompts", "/no/such/prompts.jsonl"], "--prompts"),
    (["train", "--device", "tpu"], "--device"),
    (["train", "--grad-accum", "3"], "--grad-accum"),
    (["train", "--steps", "many"], "--steps"),
]


@pytest.mark.parametrize("argv,option", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_naming_the_option_and_exit_2(argv, option, capsys, monkeypatch):
    # No work may start: the harness and the training loop would fail loudly if reached.
    monkeypatch.setattr("grpo_fused.benchmarks.harness.run_bench", lambda *a, **k: pytest.fail("bench ran"))
    monkeypatch.setattr("grpo_fused.benchmarks.harness.run_memory_sweep", lambda *a, **k: pytest.fail("sweep ran"))
    monkeypatch.setattr("grpo_fused.trainer.train", lambda *a, **k: pytest.fail("training ran"))
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert option in err and "error" in err


def test_python_m_help():
    proc = subprocess.run([sys.executable, "-m", "grpo_fused", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "bench" in proc.stdout and "profile-memory" in proc.stdout and "train" in proc.stdout


@pytest.mark.parametrize("op", ["logits", "linear"])
def test_bench_inputs_are_a_realistic_off_policy_batch(op):
    from grpo_fused import reference

    case = bm.Case(op, 3, 41, 257, 16 if op == "linear" else None, "float32")
    x = bm.make_inputs(case, "cpu", seed=1, extra_position=(op == "logits"))
    if op == "logits":
        assert x["logits"].shape == (3, 42, 257)  # Liger's (B, T+1, V) layout
        logps = reference.selective_log_softmax(x["logits"][:, :41].detach(), x["completion_ids"])[0]
    else:
        logps = reference.linear_log_softmax(x["hidden"].detach(), x["weight"].detach(), x["completion_ids"])[0]
    for name in ("old_logps", "ref_logps"):
        noise = x[name] - logps
        assert abs(noise.mean().item()) < 0.05 and 0.07 < noise.std().item() < 0.13  # N(0, 0.1) by construction
    lengths = x["completion_mask"].sum(-1)
    assert ((lengths >= 20) & (lengths <= 41)).all()
    assert [t.shape for t in bm.leaves(x)] == ([(3, 42, 257)] if op == "logits" else [(3, 41, 16), (257, 16)])


def test_static_report_forwards_its_arguments(monkeypatch):
    from grpo_fused.benchmarks import static_report

    seen = []
    monkeypatch.setattr(static_report, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["static-report", "--scenarios", "group-advantages", "--no-save"]) == 0
    assert seen == [["--scenarios", "group-advantages", "--no-save"]]


def test_static_report_bad_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["static-report", "--scenarios", "no-such-scenario"])
    assert exit_info.value.code == 2
    assert "--scenarios" in capsys.readouterr().err
