"""The parts of benchmarks/gpu_check.py that need no GPU: naming, writing and
summarizing results, and the exit without a CUDA device."""

import datetime
import json
import os
import sys
import time

import pytest
import torch

import fastvae
from benchmarks import gpu_check


def fake_results():
    timings = [
        dict(case="loss_fwd_bwd/mse/sum/gpu_target/bfloat16", op="loss_fwd_bwd",
             ms=dict(fastvae=0.5, eager=2.0, compile=0.6), peak_mib=dict(fastvae=100.0, eager=150.0),
             vs_eager=4.0, vs_compile=1.2, copy_fraction=0.9,
             graph_ms=dict(fastvae=0.05, eager=0.3, compile=0.1), vs_eager_graph=6.0,
             vs_compile_graph=2.0, copy_fraction_graph=0.8),
        dict(case="reparam_kl_fwd_bwd/reparam/float32", op="reparam_kl_fwd_bwd",
             ms=dict(fastvae=0.1, eager=0.3), peak_mib={}, vs_eager=3.0),
    ]
    return dict(
        date="2025-01-31",
        environment=dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6", cuda="12.8",
                         python="3.11"),
        checks=[dict(name="test suite on CUDA", ok=True, detail="10 passed"),
                dict(name="past 2**31 elements", ok=None, detail="skipped: memory")],
        timings=timings, targets=gpu_check.evaluate_targets(timings),
        copy_bandwidth_gbs=3000.0, launch_us=dict(aten=5.0, triton=20.0), wall_s=300.0)


def test_results_are_named_by_gpu_model_and_date(tmp_path):
    json_path, md_path = gpu_check.result_paths(tmp_path, "NVIDIA H100 80GB HBM3",
                                                datetime.date(2025, 1, 31))
    assert json_path.name == "gpu_check-nvidia-h100-80gb-hbm3-2025-01-31.json"
    assert md_path.name == "gpu_check-nvidia-h100-80gb-hbm3-2025-01-31.md"


def test_write_results_and_tables(tmp_path):
    results = fake_results()
    json_path, md_path = gpu_check.write_results(results, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([json_path.name, md_path.name])
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
    md = md_path.read_text()
    assert "# gpu_check on NVIDIA H100 80GB HBM3 (2025-01-31)" in md
    assert "- PASS test suite on CUDA: 10 passed" in md
    assert "- SKIP past 2**31 elements" in md
    assert "| loss_fwd_bwd/mse/sum/gpu_target/bfloat16 | 0.500 | 2.000 | 0.600 | 4.00x | 1.20x | 90 |" in md
    assert "host time per no-op launch: aten 5.0 us, triton 20.0 us" in md
    assert "| loss_fwd_bwd/mse/sum/gpu_target/bfloat16 | 0.050 | 0.300 | 0.100 | 6.00x | 2.00x | 80 |" in md
    # the targets: 1.2x torch.compile misses 1.5x, 80% of the copy bandwidth in
    # device time misses 85%; the rest are met
    missed = [t["what"] for t in results["targets"] if not t["met"]]
    assert missed == ["loss_fwd_bwd/mse/sum/gpu_target/bfloat16 copy_fraction (device time, CUDA graph)",
                      "loss_fwd_bwd/mse/sum/gpu_target/bfloat16 vs_compile"]
    # 3 loss targets twice (do_bench, graph) + peak memory + reparam vs eager
    assert len(results["targets"]) == 8
    table = gpu_check.short_table(results)
    assert table.splitlines()[0] == "gpu_check on NVIDIA H100 80GB HBM3: ALL CHECKS PASSED"
    assert table.splitlines()[-1] == ("targets missed: " + "; ".join(missed))


def test_a_failed_check_is_named_in_the_summary():
    results = fake_results()
    results["checks"].append(dict(name="determinism x", ok=False, detail="two runs differ"))
    assert gpu_check.short_table(results).splitlines()[0] == \
        "gpu_check on NVIDIA H100 80GB HBM3: FAILED: determinism x"


def test_exits_with_a_clear_message_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--results-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_suite_timeout_kills_the_whole_process_group(monkeypatch, tmp_path):
    pid_file = tmp_path / "child.pid"
    # a parent that starts a child (as xdist starts workers), prints, then hangs
    script = (f"import subprocess, sys, time; "
              f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); "
              f"time.sleep(60)")
    monkeypatch.setattr(gpu_check, "test_command", lambda workers: [sys.executable, "-c", script])
    run = gpu_check.Run(deadline=float("inf"))
    log = tmp_path / "tests.log"
    gpu_check.run_test_suite(run, 3.0, log)
    assert run.checks[-1]["ok"] is None and "INCOMPLETE" in run.checks[-1]["detail"]
    assert "started" in log.read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # the child was killed with its parent
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"child {child} of the timed-out suite still runs")


def test_suite_result_and_log(monkeypatch, tmp_path):
    out = "3 passed, 1 warning in 0.5s"
    monkeypatch.setattr(gpu_check, "test_command",
                        lambda workers: [sys.executable, "-c",
                                         f"import sys; print('== {out} =='); "
                                         "print('to stderr', file=sys.stderr)"])
    run = gpu_check.Run(deadline=float("inf"))
    gpu_check.run_test_suite(run, 30.0, tmp_path / "tests.log")
    assert run.checks[-1]["ok"] is True and run.checks[-1]["detail"].startswith(out)
    assert "to stderr" in (tmp_path / "tests.log").read_text()


def test_graph_timing_rotates_through_more_data_than_l2():
    from benchmarks import cases

    loss = cases.Case("loss_fwd_bwd", cases.SIZES["gpu_target"], torch.bfloat16, "mse")
    ldm = cases.Case("loss_fwd_bwd", cases.SIZES["ldm"], torch.bfloat16, "mse")
    l2 = 50 << 20
    for case in (loss, ldm):
        sets = gpu_check.rotation_sets(case, l2)
        assert sets * case.bytes_moved() >= min(3 * l2, 16 * case.bytes_moved())
    assert gpu_check.rotation_sets(ldm, l2) == 16  # capped
    assert gpu_check.rotation_sets(loss, l2) == 3


def test_steps_share_one_function_across_input_sets():
    from benchmarks import cases

    case = cases.Case("loss_fwd_bwd", cases.SIZES["tiny_flat"], torch.float32, "mse")
    sets = [case.inputs("cpu", seed=k) for k in range(3)]
    steps = case.steps("fastvae", sets)
    for inputs, step in zip(sets, steps):  # each step computes on its own inputs
        case.verify("fastvae", inputs, step())


# ---- the CUDA-graph sampling checks, their logic on the CPU --------------------------
#
# A CUDA graph cannot be captured here; a stand-in "capture" that re-runs the step
# on every replay into the same output tensors behaves as a correct graph does,
# and one whose seed was frozen at capture behaves as the host-seeded sampling
# did. The checks must pass the first and fail the second.


def replaying_capture(step):
    outputs = [t.clone() for t in step()]

    def replay():
        for out, new in zip(outputs, step()):
            out.copy_(new)
    return replay, outputs


def records(run):
    return {c["name"]: c for c in run.checks}


def test_graph_check_passes_when_every_replay_draws_fresh_noise(one_thread):
    run = gpu_check.Run(deadline=float("inf"))
    gpu_check.check_graph_sampling(run, torch.device("cpu"), capture=replaying_capture)
    got = records(run)
    assert len(got) == 4 and all(c["ok"] for c in got.values()), got


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernels run on CPU tensors only under the interpreter; "
                           "on a GPU gpu_check runs this check on real CUDA graphs")
def test_graph_check_passes_on_the_kernels(monkeypatch, one_thread):
    """The same check with the sampling and the loss on the Triton kernels (interpreter)."""
    fastvae.set_backend("triton")
    run = gpu_check.Run(deadline=float("inf"))
    gpu_check.check_graph_sampling(run, torch.device("cpu"), capture=replaying_capture)
    got = records(run)
    assert len(got) == 4 and all(c["ok"] for c in got.values()), got


def test_graph_check_fails_when_the_seed_is_frozen_at_capture(monkeypatch, one_thread):
    from fastvae import functional

    draw = functional._draw_seed
    frozen = []

    def host_seed_once(generator, like):  # the old defect: one host seed for every replay
        if not frozen:
            frozen.append(draw(generator, like))
        return frozen[0]

    monkeypatch.setattr(functional, "_draw_seed", host_seed_once)
    run = gpu_check.Run(deadline=float("inf"))
    gpu_check.check_graph_sampling(run, torch.device("cpu"), capture=replaying_capture)
    got = records(run)
    fresh = got["CUDA graph replays: fresh noise on every replay"]
    assert fresh["ok"] is False and "IDENTICAL z" in fresh["detail"]
    # the rest still holds: each replay's backward matches its own (same) noise
    assert got["CUDA graph replays: the backward regenerates its replay's noise"]["ok"]
    assert got["CUDA graph replays: the loss follows a 0-dim beta tensor"]["ok"]


def test_graph_check_fails_when_beta_is_read_once(monkeypatch, one_thread):
    import fastvae

    real = fastvae.vae_loss
    captured = []

    def beta_read_at_capture(*args, beta, **kwargs):  # as if beta became a Python float
        if not captured:
            captured.append(float(beta))
        return real(*args, beta=captured[0], **kwargs)

    monkeypatch.setattr(fastvae, "vae_loss", beta_read_at_capture)
    run = gpu_check.Run(deadline=float("inf"))
    gpu_check.check_graph_sampling(run, torch.device("cpu"), capture=replaying_capture)
    assert records(run)["CUDA graph replays: the loss follows a 0-dim beta tensor"]["ok"] is False


def test_normal_check_and_correlation():
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(100_000, generator=g)
    assert gpu_check.normal_check(sample)[0]
    assert not gpu_check.normal_check(sample + 0.05)[0]
    assert not gpu_check.normal_check(sample * 1.05)[0]
    other = torch.randn(100_000, generator=g)
    assert abs(gpu_check.correlation(sample, other)) < 0.02
    assert gpu_check.correlation(sample, sample) == pytest.approx(1.0)


def test_report_shows_the_training_step_table_and_targets(tmp_path):
    def row(variant, impl, steps_per_s):
        return dict(model="mlp784", variant=variant, impl=impl, batch=8, steps_per_s=steps_per_s,
                    peak_mib=100.0, first_call_s=1.0)

    results = fake_results()
    results["train_steps"] = [row("eager", "plain", 100.0), row("eager", "fastvae", 150.0),
                              row("reduce-overhead", "plain", 400.0),
                              row("reduce-overhead", "fastvae", 380.0)]
    results["targets"] = gpu_check.all_targets(results)
    _, md_path = gpu_check.write_results(results, tmp_path)
    md = md_path.read_text()
    assert "## Training step (benchmarks/train_steps.py)" in md
    assert "| mlp784 | 8 | eager | 100.0 | 150.0 | 1.50x |" in md
    assert "MISSED: train step mlp784 reduce-overhead: fastvae / plain steps/s" in md
    assert "training step:" in gpu_check.short_table(results)
    # a results file without the group (an older run) still renders
    del results["train_steps"]
    assert "(not measured)" in gpu_check.markdown_report(results)


def test_report_gives_the_seconds_of_each_stage(tmp_path):
    results = fake_results()
    results["stage_s"] = {"test suite": 120.0, "training step group": 150.5}
    assert "Total wall time 300 s (test suite 120 s, training step group 150 s)." in \
        gpu_check.markdown_report(results)


def test_fixed_cost_cases_are_held_to_eager_and_to_half_its_host_time():
    def timing(case, op, vs_eager, host_fastvae, host_eager):
        return dict(case=case, op=op, ms=dict(fastvae=1.0, eager=vs_eager), vs_eager=vs_eager,
                    host_us=dict(fastvae=host_fastvae, eager=host_eager),
                    host_vs_eager=host_eager / host_fastvae)

    timings = [timing("loss_fwd_bwd/mse/sum/fixed_tiny/float32", "loss_fwd_bwd", 0.8, 40.0, 100.0),
               timing("reparam_kl_fwd_bwd/mnist_mlp/float32", "reparam_kl_fwd_bwd", 1.2, 50.0, 60.0),
               timing("loss_fwd_bwd/mse/sum/gpu_target/float32", "loss_fwd_bwd", 3.5, 80.0, 120.0)]
    got = {t["what"]: t["met"] for t in gpu_check.evaluate_targets(timings)}
    # a fixed-cost case has eager's wall time to beat (not 3x, no bandwidth target); a
    # loss call also half of eager's host time per call, at every size
    assert got == {
        "loss_fwd_bwd/mse/sum/fixed_tiny/float32 vs_eager": False,
        "loss_fwd_bwd/mse/sum/fixed_tiny/float32 host_vs_eager": True,
        "reparam_kl_fwd_bwd/mnist_mlp/float32 vs_eager": True,
        "loss_fwd_bwd/mse/sum/gpu_target/float32 vs_eager": True,
        "loss_fwd_bwd/mse/sum/gpu_target/float32 host_vs_eager": False,
    }


def test_each_timed_case_gets_its_own_issues_targets_only():
    """Targets by case, not by op: issue 3's bandwidth/compile/3x for the headline losses at
    the headline size only, issue 15's 3x eager for the likelihoods there, issue 3's 2x for
    float32 reparameterize+KL; every other case only eager's wall time (issue 12), and every
    loss call half its host time. (Keyed by op, the ldm-size mse and the bf16/samples4
    sampling cases were held to targets no issue sets.)"""
    want = {
        "loss_fwd_bwd/mse/sum/gpu_target/bfloat16": {"vs_eager": 3.0, "copy_fraction": 0.85,
                                                     "vs_compile": 1.5, "host_vs_eager": 2.0},
        "loss_fwd_bwd/gaussian_learned/sum/gpu_target/bfloat16": {"vs_eager": 3.0,
                                                                  "host_vs_eager": 2.0},
        "loss_fwd_bwd/mse/sum/ldm/bfloat16": {"vs_eager": 1.0, "host_vs_eager": 2.0},
        "reparam_kl_fwd_bwd/reparam/float32": {"vs_eager": 2.0},
        "reparam_kl_fwd_bwd/reparam/bfloat16": {"vs_eager": 1.0},
        "reparam_kl_fwd_bwd/samples4/reparam/float32": {"vs_eager": 1.0},
        "kl_fwd_bwd/prior_learned/reparam/float32": {"vs_eager": 1.0},
        "loss_fwd_bwd/mse/sum/fixed_tiny/float32": {"vs_eager": 1.0, "host_vs_eager": 2.0},
    }
    for case, targets in want.items():
        assert gpu_check.targets_for(dict(case=case, op=case.split("/")[0])) == targets, case
    # and every case gpu_check times has targets it can be judged by
    for case in gpu_check.benchmark_cases():
        assert "vs_eager" in gpu_check.targets_for(dict(case=case.id, op=case.op)), case.id


def test_gpu_check_times_the_fixed_cost_sizes_without_compile():
    fixed = [c for c in gpu_check.benchmark_cases() if gpu_check.is_fixed_cost(c.id)]
    assert {c.size.name for c in fixed} == set(gpu_check.FIXED_COST_SIZES)
    assert {c.op for c in fixed} == {"loss_fwd_bwd", "reparam_kl_fwd_bwd"}
    assert "compile" not in gpu_check.FIXED_COST_IMPLS


def test_diffusers_check_is_skipped_with_its_reason_without_diffusers(monkeypatch):
    real_find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffusers" else real_find_spec(name, *a))
    run, results = gpu_check.Run(deadline=float("inf")), fake_results()
    gpu_check.check_diffusers(run, "cpu", results)
    assert run.checks[-1]["ok"] is None and "diffusers is not installed" in run.checks[-1]["detail"]
    assert "diffusers" not in results


def test_diffusers_check_checks_then_times_the_patched_model(monkeypatch, one_thread):
    bench = pytest.importorskip("benchmarks.test_diffusers_bench")
    small = bench.suite(full=False)  # the CI sizes, standing in for the GPU's
    monkeypatch.setattr(bench, "suite", lambda full: small)
    run, results = gpu_check.Run(deadline=float("inf")), fake_results()
    gpu_check.check_diffusers(run, torch.device("cpu"), results, rounds=1)
    assert run.checks[-1]["ok"] is True
    assert set(results["diffusers"]) == {case.id for case in small}
    for by_impl in results["diffusers"].values():
        assert set(by_impl) == set(bench.IMPLS) and all(ms > 0 for ms in by_impl.values())
    md = gpu_check.markdown_report(results)
    case_id = small[0].id
    ratio = results["diffusers"][case_id]["eager"] / results["diffusers"][case_id]["fastvae"]
    assert f"| {case_id} | " in md and f"| {ratio:.2f}x |" in md


def test_torch_path_sync_check_runs_every_case_and_names_the_ones_that_sync(one_thread):
    """The check itself (on CPU tensors, where nothing can sync): every case runs its
    loss forward + backward and passes; a case whose call raises inside the guard, as
    torch.cuda's sync debug mode raises on a sync, is named in the failure."""
    import contextlib

    run = gpu_check.Run(deadline=float("inf"))
    gpu_check.check_torch_path_without_host_sync(run, torch.device("cpu"),
                                                 no_sync=contextlib.nullcontext, n=4, d=10)
    (got,) = run.checks
    assert got["ok"] and str(len(gpu_check.torch_path_cases())) in got["detail"], got

    @contextlib.contextmanager
    def refusing_host_reads():  # a stand-in for a sync: any read of a value on the host
        original = torch.Tensor.__bool__

        def refuse(self):
            raise RuntimeError("called a synchronizing CUDA operation")

        torch.Tensor.__bool__ = refuse
        try:
            yield
        finally:
            torch.Tensor.__bool__ = original

    run = gpu_check.Run(deadline=float("inf"))
    gpu_check.check_torch_path_without_host_sync(run, torch.device("cpu"),
                                                 no_sync=refusing_host_reads, n=4, d=10)
    (got,) = run.checks
    # on CPU tensors the checks of bce's probabilities read values on the host
    assert got["ok"] is False and "bce float64: called a synchronizing" in got["detail"], got


# ---- the whole run's order and budget, on a stand-in for the GPU ---------------------


class _FakeCase:
    """A benchmark case whose steps are instant; ``check`` fails where asked, and
    fastvae's step where ``step_fails``."""

    def __init__(self, case_id, fails=False, step_fails=False):
        self.id, self.op, self.fails, self.step_fails = case_id, case_id.split("/")[0], fails, step_fails

    def check(self, impl, device):
        if self.fails:
            raise AssertionError(f"{self.id}: off the float64 reference")

    def inputs(self, device, seed=0):
        return {}

    def step(self, impl, inputs):
        if self.step_fails and impl == "fastvae":
            raise RuntimeError("stand-in launch failure")
        return lambda: None

    def bytes_moved(self):
        return 10**6


def _fake_gpu_run(monkeypatch, tmp_path, budget, consumed_by_checks, train_error=False):
    """Run main() with every CUDA call stood in for: the checks cost
    ``consumed_by_checks`` seconds of the budget (taken from the deadline); returns
    (exit code, results, the order things ran in)."""
    import triton.testing

    from benchmarks import cases, train_steps

    order = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu_check, "environment", lambda device: dict(
        gpu="Fake GPU", torch=torch.__version__, triton="3.6", cuda="12.8", python="3.11"))

    def check(name, cost=0.0):
        def run_check(run, device, *args, **kwargs):
            order.append(name)
            run.deadline -= cost
            run.record(name, True, "stand-in")
        return run_check

    for name in ("check_determinism", "check_past_2_to_31", "check_device_seed",
                 "check_torch_path_without_host_sync", "check_graph_sampling"):
        monkeypatch.setattr(gpu_check, name, check(name))
    monkeypatch.setattr(gpu_check, "check_reduce_overhead_step",
                        check("reduce-overhead", consumed_by_checks / 2))
    monkeypatch.setattr(gpu_check, "check_diffusers",
                        lambda run, device, results: check("diffusers")(run, device))
    monkeypatch.setattr(gpu_check, "cuda_generator",
                        lambda device, seed: torch.Generator().manual_seed(seed))
    fake_cases = [_FakeCase("loss_fwd_bwd/mse/sum/gpu_target/bfloat16"),
                  _FakeCase("kl_fwd_bwd/free_bits/reparam/float32", fails=True),
                  _FakeCase("loss_fwd_bwd/bce_logits/sum/gpu_target/float32", step_fails=True),
                  _FakeCase("loss_fwd_bwd/mse/sum/fixed_tiny/float32")]
    monkeypatch.setattr(gpu_check, "benchmark_cases", lambda: fake_cases)
    for case in fake_cases:
        original = case.check

        def logged(impl, device, case=case, original=original):
            order.append(f"check {case.id}")
            original(impl, device)
        case.check = logged
    monkeypatch.setattr(cases, "copy_bandwidth", lambda device: 2e12)
    monkeypatch.setattr(gpu_check, "launch_overhead_us", lambda device: dict(aten=5.0, triton=9.0))
    monkeypatch.setattr(gpu_check, "host_us", lambda step, device, calls=20: 50.0)
    monkeypatch.setattr(gpu_check, "peak_mib", lambda step, device: 10.0)
    monkeypatch.setattr(gpu_check, "graph_ms", lambda steps, device: 0.01)
    monkeypatch.setattr(gpu_check, "rotation_steps",
                        lambda case, impl, device: [case.step(impl, case.inputs(device))] * 2)

    def do_bench(step, warmup=25, rep=100, return_mode="median"):
        return 0.1

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    real_time_case = gpu_check.time_case

    def time_case(run, case, device, bandwidth, impls=None, entry=None):
        order.append(f"time {case.id} {','.join(impls)}")
        return real_time_case(run, case, device, bandwidth, impls, entry)

    monkeypatch.setattr(gpu_check, "time_case", time_case)

    def run_group(device, variants, time_left, log, rows, **kwargs):
        for variant in variants:
            need = 45 if variant in ("compile", "reduce-overhead") else 10
            for impl in ("plain", "fastvae"):
                row = dict(model="mlp784", variant=variant, impl=impl)
                if time_left() < need:
                    row["skipped"] = "time budget"
                elif train_error and impl == "fastvae" and variant == "bf16":
                    row["error"] = "RuntimeError: stand-in failure"
                else:
                    row["steps_per_s"] = 100.0
                    order.append(f"train {variant} {impl}")
                rows.append(row)
                log(f"train step {variant} {impl}")
        return rows

    monkeypatch.setattr(train_steps, "run_group", run_group)
    code = gpu_check.main(["--skip-tests", "--budget", str(budget), "--results-dir", str(tmp_path)])
    [json_file] = tmp_path.glob("gpu_check-fake-gpu-*.json")
    return code, json.loads(json_file.read_text()), order


def test_a_full_budget_checks_everything_then_times_in_passes(monkeypatch, tmp_path):
    code, results, order = _fake_gpu_run(monkeypatch, tmp_path, budget=1000.0, consumed_by_checks=0)
    first_timing = next(i for i, step in enumerate(order) if step.startswith("time"))
    assert all(step.startswith(("check", "reduce")) for step in order[:first_timing])
    assert sum(step.startswith("check ") for step in order[:first_timing]) == 4
    # fastvae and eager on the checked cases, eager/bf16 steps, compile baselines, compiled steps
    assert [s for s in order[first_timing:] if not s.startswith("train")][:3] == [
        "time loss_fwd_bwd/mse/sum/gpu_target/bfloat16 fastvae,eager",
        "time loss_fwd_bwd/bce_logits/sum/gpu_target/float32 fastvae,eager",
        "time loss_fwd_bwd/mse/sum/fixed_tiny/float32 fastvae,eager"]
    train_at = [i for i, s in enumerate(order) if s.startswith("train")]
    compile_at = order.index("time loss_fwd_bwd/mse/sum/gpu_target/bfloat16 compile")
    assert order[train_at[0]] == "train eager plain" and train_at[3] < compile_at < train_at[4]
    assert order[train_at[4]] == "train compile plain"
    # the case that failed its float64 check is not timed, and the run says so; the one
    # whose fastvae step fails is a failed timing, and no later pass times it
    assert not any("free_bits" in s for s in order if s.startswith("time"))
    assert not any("bce_logits" in s for s in order if s.endswith("compile"))
    failed = {c["name"] for c in results["checks"] if c["ok"] is False}
    assert "timing loss_fwd_bwd/bce_logits/sum/gpu_target/float32" in failed
    assert code == 1
    timed = {t["case"]: t for t in results["timings"]}
    assert "loss_fwd_bwd/bce_logits/sum/gpu_target/float32" not in timed
    assert set(timed["loss_fwd_bwd/mse/sum/gpu_target/bfloat16"]["ms"]) == {"fastvae", "eager",
                                                                            "compile"}
    assert set(timed["loss_fwd_bwd/mse/sum/fixed_tiny/float32"]["ms"]) == {"fastvae", "eager"}
    assert list(results["stage_s"])[:2] == ["start", "test suite"]
    assert all(isinstance(c["ok"], (bool, type(None))) for c in results["checks"])


def test_a_short_budget_loses_timings_never_checks(monkeypatch, tmp_path):
    """With 40 s left after the random-number checks: every float64 check still runs,
    fastvae and eager are timed, and neither the compile baselines (45 s each) nor any
    training step fit: recorded as skipped, not failed."""
    code, results, order = _fake_gpu_run(monkeypatch, tmp_path, budget=1000.0,
                                         consumed_by_checks=960.0)
    assert sum(step.startswith("check ") for step in order) == 4
    assert "time loss_fwd_bwd/mse/sum/gpu_target/bfloat16 fastvae,eager" in order
    assert not any(s.startswith("train") for s in order)
    timed = {t["case"]: t for t in results["timings"]}
    headline = timed["loss_fwd_bwd/mse/sum/gpu_target/bfloat16"]
    assert "compile" not in headline["ms"] and headline["skipped"] == ["compile"]
    assert all(row.get("skipped") for row in results["train_steps"])
    failed = [c["name"] for c in results["checks"] if c["ok"] is False]
    assert failed == ["float64 check kl_fwd_bwd/free_bits/reparam/float32",
                      "timing loss_fwd_bwd/bce_logits/sum/gpu_target/float32"] and code == 1


def test_a_failing_fastvae_training_step_fails_the_run(monkeypatch, tmp_path):
    code, results, _ = _fake_gpu_run(monkeypatch, tmp_path, budget=1000.0, consumed_by_checks=0,
                                     train_error=True)
    failed = [c["name"] for c in results["checks"] if c["ok"] is False]
    assert "training step mlp784 bf16 fastvae" in failed and code == 1


def test_each_implementation_is_built_once_per_timed_case(monkeypatch):
    """do_bench, the host time and the graph replays share one set of steps: torch.compile
    compiles once per case (it compiled twice, the graph replays' steps again)."""
    import triton.testing

    built = []

    class Case(_FakeCase):
        def step(self, impl, inputs):
            raise AssertionError("time_case builds its steps with steps(), once")

        def steps(self, impl, input_sets):
            built.append(impl)
            return [lambda: None for _ in input_sets]

    class Props:
        L2_cache_size = 50 << 20

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    monkeypatch.setattr(triton.testing, "do_bench", lambda step, **kwargs: 0.1)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda step, **kwargs: 0.05)
    monkeypatch.setattr(gpu_check, "host_us", lambda step, device, calls=20: 50.0)
    monkeypatch.setattr(gpu_check, "peak_mib", lambda step, device: 10.0)
    case = Case("loss_fwd_bwd/mse/sum/gpu_target/bfloat16")
    entry = gpu_check.time_case(gpu_check.Run(deadline=float("inf")), case, "cpu", 2e12)
    assert built == ["fastvae", "eager", "compile"]
    assert entry["graph_ms"] == {"fastvae": 0.05, "eager": 0.05, "compile": 0.05}
    assert entry["vs_eager"] == 1.0 and entry["vs_eager_graph"] == 1.0
