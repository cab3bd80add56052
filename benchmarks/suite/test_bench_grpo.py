"""pytest-benchmark cases: every (op, provider, mode) of ``grpo-fused bench``, in process.

Each benchmark times one mode (``fwd``, ``bwd`` or ``fwd+bwd``) of one provider on the default
case of its op; the backward's forward runs in the untimed setup. ``extra_info`` carries the
shape, the byte / FLOP count the rates assume, and the achieved rate from the median.
"""

import pytest
import torch

from grpo_fused.benchmarks import harness as bm

DEVICE_TYPE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {case.op: case for case in bm.default_cases(DEVICE_TYPE)}
ROUNDS = 20 if DEVICE_TYPE == "cuda" else 3


def _params():
    for op, case in CASES.items():
        for provider in bm.providers_for(op):
            for mode in bm.MODES:
                yield pytest.param(case, provider, mode, id=f"{op}-{provider.name}-{mode}")


@pytest.mark.parametrize("case,provider,mode", list(_params()))
def test_bench(benchmark, bench_device, case, provider, mode):
    reason = bm.probe(provider, bench_device)
    if reason is not None:
        pytest.skip(f"{provider.name} cannot run on {bench_device.type}: {reason}")
    inputs = bm.make_inputs(case, bench_device, seed=0, extra_position=provider.kind == "liger")
    grads = bm.leaves(inputs)
    step = bm.build_step(provider, case, inputs)
    try:
        step().backward()  # compile / autotune outside the timing
    except Exception as exc:
        if provider.kind == "compile":
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}")
        raise

    def sync():
        if bench_device.type == "cuda":
            torch.cuda.synchronize(bench_device)

    def clear():
        bm._clear_grads(grads)
        sync()

    if mode == "fwd":
        def setup():
            clear()
            return (), {}

        def target():
            loss = step()
            sync()
            return loss
    elif mode == "bwd":
        def setup():
            clear()
            loss = step()
            sync()
            return (loss,), {}

        def target(loss):
            loss.backward()
            sync()
    else:
        def setup():
            clear()
            return (), {}

        def target():
            step().backward()
            sync()

    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    work = case.work()[mode]
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=bm.device_name(bench_device), case=case.to_json(), mode=mode, work=work, work_unit=case.work_unit,
        work_model=bm.WORK_MODELS[case.op],
        achieved=work / median_s / 1e12, achieved_unit="TB/s" if case.op == "logits" else "TFLOP/s",
    )
    # The loss must be a finite number, so a broken provider cannot post a fast time.
    bm._clear_grads(grads)
    assert torch.isfinite(step().detach()).item()
