"""Benchmark set-up: which cases run, and how each is checked then timed.

With benchmarking disabled (the default ``--benchmark-disable`` of CI) every
case runs once as a test at tiny sizes, and only a few torch.compile baselines
run (each compile costs seconds on a CPU). ``--benchmark-enable`` (``make
bench``) or ``FASTVAE_BENCH_FULL=1`` selects the full sizes and every baseline.
``FASTVAE_BENCH_DEVICES=cpu,cuda`` picks the devices (default: CUDA alone in a
full run where present, else the CPU; every device present in CI mode).

Each test first checks its implementation against a float64 reference (so a
benchmark can fail), then times it with ``benchmark.pedantic``. A module with
``GROUP = "fixed_cost"`` (test_fixed_cost.py) takes ``cases.fixed_cost_suite``,
the same at every size setting; the others take ``cases.suite`` less those.
"""

import datetime
import os
import platform
import time

import pytest
import torch

from benchmarks import cases

# The torch.compile baselines that still run in CI mode, to keep that path alive.
CI_COMPILE_CASES = {
    "loss_fwd_bwd/mse/sum/tiny_flat/float32",
    "reparam_kl_fwd_bwd/tiny_reparam/float32",
}
# untimed calls before the rounds: fastvae's fused CPU loops compile at a kernel's third
# call (fastvae._cpu_fusion.COMPILE_AT_CALL), a training loop's steady state is after it
WARM_UP_CALLS = 3
ROUND_SECONDS = 0.4  # timing budget per benchmark in a full run
MIN_ROUNDS, MAX_ROUNDS = 5, 200

_INDUCTOR_SET = []


def _configure_inductor(full):
    """Set once, before the first torch.compile baseline (not at import: importing
    Inductor imports triton, which tests/conftest.py must see first)."""
    if _INDUCTOR_SET:
        return
    _INDUCTOR_SET.append(True)
    import torch._functorch.config
    import torch._inductor.config

    if (os.cpu_count() or 1) <= 4:
        # parallel compile workers would keep these few cores busy while the
        # next benchmarks run; compile in-process instead
        torch._inductor.config.compile_threads = 1
    if full:  # compile times are reported: no compiled-graph caches of earlier runs
        torch._inductor.config.fx_graph_cache = False
        if hasattr(torch._functorch.config, "enable_autograd_cache"):
            torch._functorch.config.enable_autograd_cache = False


def full_run(config):
    if os.environ.get("FASTVAE_BENCH_FULL", "") not in ("", "0"):
        return True
    return not (config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


def bench_devices(config):
    forced = os.environ.get("FASTVAE_BENCH_DEVICES")
    if forced:
        return [d.strip() for d in forced.split(",") if d.strip()]
    if torch.cuda.is_available():
        return ["cuda"] if full_run(config) else ["cpu", "cuda"]
    return ["cpu"]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    full = full_run(metafunc.config)
    ops = metafunc.module.OPS
    fixed_cost = getattr(metafunc.module, "GROUP", None) == "fixed_cost"
    params = []
    for device in bench_devices(metafunc.config):
        group = cases.fixed_cost_suite(device)
        if not fixed_cost:  # a case of both runs once, in the fixed cost group
            in_group = {c.id for c in group}
            group = [c for c in cases.suite(device, full=full) if c.id not in in_group]
        for case in group:
            if case.op not in ops:
                continue
            for impl in case.impls:
                if impl == "compile" and not full and case.id not in CI_COMPILE_CASES:
                    continue
                params.append(pytest.param(device, case, impl, id=f"{device}:{case.id}:{impl}"))
    metafunc.parametrize(("device", "case", "impl"), params)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Facts the report needs: CPU model, devices and their copy bandwidth, versions, date."""
    machine_info["fastvae"] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "full_run": full_run(config),
        "devices": {},
    }
    for device in bench_devices(config):
        info = {"copy_bandwidth_bytes_per_s": cases.copy_bandwidth(device)}
        if device.startswith("cuda"):
            info["name"] = torch.cuda.get_device_name(device)
        machine_info["fastvae"]["devices"][device] = info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rounds_for(step, full, max_rounds=MAX_ROUNDS):
    """How many timed rounds: 1 in a quick run; in a full run as many as fill ROUND_SECONDS
    (one untimed call measures a round), within [MIN_ROUNDS, max_rounds]."""
    if not full:
        return 1
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    return int(min(max_rounds, max(MIN_ROUNDS, ROUND_SECONDS / max(once, 1e-9))))


def _timed(step, device):
    if torch.device(device).type != "cuda":
        return step

    def synced():
        out = step()
        torch.cuda.synchronize(device)
        return out
    return synced


@pytest.fixture
def run_case(benchmark, request):
    """Check ``impl`` on ``case`` against the float64 reference, then time it."""

    def run(device, case, impl):
        if impl == "compile" and torch.device(device).type == "cpu" and not _has_compiler():
            pytest.skip("torch.compile on CPU needs a C++ compiler")
        full = full_run(request.config)
        if impl == "compile":
            _configure_inductor(full)
        if case.op == "train_step":
            # its check (fixed noise, a float64 model) first: the check's compiled loss resets
            # dynamo, which would throw away the compiled step about to be timed
            case.check(impl, device)
        inputs = case.inputs(device)
        step = _timed(case.step(impl, inputs), device)
        benchmark.group = f"{device}:{case.id}"
        info = benchmark.extra_info
        info.update(case=case.id, op=case.op, impl=impl, device=device, size=case.size.name,
                    dtype=str(case.dtype).removeprefix("torch."), recon=case.recon,
                    reduction=case.reduction, bytes=case.bytes_moved())
        start = time.perf_counter()
        out = step()  # warm-up; for torch.compile this is the compilation
        first = time.perf_counter() - start
        if impl == "compile":
            info["compile_s"] = first
        for _ in range(WARM_UP_CALLS - 1):
            out = step()
        if case.op != "train_step":  # (checked above) what is timed is checked
            case.verify(impl, inputs, out)
        del out
        rounds = rounds_for(step, full)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device)
            step()
            info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            info["extra_memory_bytes"] = info["peak_memory_bytes"] - held
        benchmark.pedantic(step, rounds=rounds, iterations=1)

    return run


_COMPILER = []


def _has_compiler():
    if not _COMPILER:
        import shutil

        _COMPILER.append(any(shutil.which(c) for c in ("g++", "c++", "clang++")))
    return _COMPILER[0]
