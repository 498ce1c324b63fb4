"""The benchmark suite's own logic: the report's figures and target verdicts,
its files, and that a benchmark's numerical check fails on a wrong result."""

import json

import pytest
import torch

from benchmarks import cases, report

COPY_BW = 20e9


def bench(case, impl, median, nbytes=None, device="cpu", peak=None, compile_s=None):
    info = dict(case=case, impl=impl, device=device, bytes=nbytes, op=case.split("/")[0])
    if peak is not None:
        info["peak_memory_bytes"] = peak
    if compile_s is not None:
        info["compile_s"] = compile_s
    return {"name": f"{case}:{impl}", "extra_info": info,
            "stats": {"median": median, "data": [median] * 7}}


MSE = "loss_fwd_bwd/mse/sum/cpu_target/float32"
BCE = "loss_fwd_bwd/bce/sum/cpu_target/float32"


def sample_run():
    nbytes = 100_000_000
    return {
        "datetime": "2030-01-02T03:04:05",
        "machine_info": {"cpu": {"count": 2}, "fastvae": {
            "date": "2030-01-02T03:04:05+00:00", "cpu_model": "Test CPU 9000", "torch": "9.9",
            "torch_threads": 2, "full_run": True,
            "devices": {"cpu": {"copy_bandwidth_bytes_per_s": COPY_BW},
                        "cuda": {"copy_bandwidth_bytes_per_s": 3e12, "name": "NVIDIA H100 80GB HBM3"}}}},
        "benchmarks": [
            bench(MSE, "fastvae", 0.004, nbytes), bench(MSE, "eager", 0.006, nbytes),
            bench(MSE, "compile", 0.007, nbytes, compile_s=3.5),
            bench(MSE, "distributions", 0.0065, nbytes),
            bench(BCE, "fastvae", 0.010, nbytes), bench(BCE, "eager", 0.120, nbytes),
            bench(BCE, "compile", 0.008, nbytes),
            bench("kl_fwd_bwd/reparam/float32", "fastvae", 0.001, 10**6, device="cuda", peak=300),
            bench("kl_fwd_bwd/reparam/float32", "eager", 0.002, 10**6, device="cuda", peak=200),
        ],
    }


def test_speedup_bandwidth_and_memory_figures():
    by_device = report.collect(sample_run())
    assert set(by_device) == {"cpu", "cuda"}
    mse = by_device["cpu"][MSE]
    assert report.speedup(mse, "eager") == pytest.approx(0.006 / 0.004)
    assert report.speedup(mse, "compile") == pytest.approx(0.007 / 0.004)
    assert report.achieved(mse) == pytest.approx(100_000_000 / 0.004)
    kl = by_device["cuda"]["kl_fwd_bwd/reparam/float32"]
    assert report.memory_ratio(kl, "eager") == pytest.approx(300 / 200)
    assert report.speedup(kl, "compile") is None  # not measured


def test_target_verdicts_say_met_or_by_how_much_missed():
    by_device = report.collect(sample_run())
    mse, bce = by_device["cpu"][MSE], by_device["cpu"][BCE]
    value, met, text = report.evaluate_target(
        dict(kind="speedup", baseline="eager", minimum=2.0), mse, COPY_BW)
    assert met is False and value == pytest.approx(1.5)
    assert "missed" in text and f"short by {1 - 1.5 / 2.0:.0%}" in text
    _, met, text = report.evaluate_target(
        dict(kind="speedup", baseline="eager", minimum=3.0), bce, COPY_BW)
    assert met is True and "met" in text and f"{0.120 / 0.010:.2f}×" in text
    value, met, _ = report.evaluate_target(dict(kind="bandwidth", minimum=0.85), mse, COPY_BW)
    assert value == pytest.approx(100_000_000 / 0.004 / COPY_BW) and met is True
    kl = by_device["cuda"]["kl_fwd_bwd/reparam/float32"]
    _, met, text = report.evaluate_target(
        dict(kind="memory", baseline="eager", minimum=1.0), kl, 3e12)
    assert met is False and f"{300 / 200 - 1:.0%} over" in text


def test_main_writes_table_chart_and_slim_json(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(sample_run()))
    assert report.main([str(src), "--out", str(tmp_path / "results")]) == 0
    cpu = tmp_path / "results" / "cpu"
    text = (cpu / "bench.md").read_text()
    assert "Test CPU 9000" in text and "2030-01-02" in text
    assert f"`{MSE}`" in text and "1.50×" in text  # 0.006 / 0.004
    assert "**missed**" in text and "why:" in text  # mse vs eager >= 2x is missed here
    assert (cpu / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    slim = json.loads((cpu / "bench.json").read_text())
    assert all("data" not in b["stats"] for b in slim["benchmarks"])
    assert {b["extra_info"]["device"] for b in slim["benchmarks"]} == {"cpu"}
    assert len(slim["benchmarks"]) == 7
    assert (tmp_path / "results" / "nvidia-h100-80gb-hbm3" / "bench.md").exists()


def test_first_line_is_the_slowest_case_vs_eager(tmp_path, capsys):
    run = sample_run()
    # a third cpu case, slower than eager: it must be the one named first
    slow = "loss_fwd_bwd/mse/none/cpu_target/bfloat16"
    run["benchmarks"] += [bench(slow, "fastvae", 0.009), bench(slow, "eager", 0.003)]
    src = tmp_path / "run.json"
    src.write_text(json.dumps(run))
    assert report.main([str(src), "--out", str(tmp_path / "results")]) == 0
    first = (tmp_path / "results" / "cpu" / "bench.md").read_text().splitlines()[0]
    assert first.startswith(f"Slowest case vs eager: {0.003 / 0.009:.2f}× (`{slow}`)")
    assert "**below**" in first
    assert capsys.readouterr().out.splitlines()[0] == first
    # without it, the mse case (1.5×) is the slowest, and nothing is below eager
    assert report.slowest(report.collect(sample_run())["cpu"]) == (pytest.approx(1.5), MSE)
    assert "**below**" not in report.slowest_line(report.collect(sample_run())["cpu"])


def test_main_refuses_a_run_without_fastvae_benchmarks(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps({"benchmarks": [{"name": "other", "stats": {"median": 1.0}}]}))
    assert report.main([str(src), "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("op", ["loss_fwd_bwd", "reparam_kl_fwd_bwd", "kl_fwd_bwd"])
def test_a_benchmark_check_fails_on_a_wrong_baseline(monkeypatch, op):
    recon = "mse" if op.startswith("loss") else None
    case = cases.Case(op, cases.SIZES["tiny_reparam" if recon is None else "tiny_flat"],
                      torch.float32, recon)
    case.check("eager", "cpu")  # right as written
    def wrong_kl(mu, logvar, reduction):  # the KL without its 1/2, and mu instead of mu^2
        terms = logvar.exp() - logvar + mu
        return terms.sum() if reduction == "sum" else terms.flatten(1).sum(1)

    monkeypatch.setattr(cases, "eager_kl", wrong_kl)
    with pytest.raises(AssertionError):
        case.check("eager", "cpu")


def test_reparameterization_check_rejects_noise_that_is_not_standard_normal(monkeypatch):
    case = cases.Case("reparam_fwd_bwd", cases.SIZES["tiny_reparam"])
    monkeypatch.setattr(cases, "eager_reparameterize",
                        lambda mu, logvar: mu + 0.5 * torch.exp(0.5 * logvar) * torch.randn_like(mu))
    with pytest.raises(AssertionError):
        case.check("eager", "cpu")


def test_interleaved_ratios_are_shown_and_judged_by(tmp_path):
    """A benchmarks.interleaved --json run of the same device: its ratio gets a column,
    and the first line and the eager targets use it where it covers the case."""
    src = tmp_path / "run.json"
    src.write_text(json.dumps(sample_run()))
    inter = tmp_path / "inter.json"
    # the block medians say mse is 1.5x eager; the interleaved run says 0.8x
    inter.write_text(json.dumps({"device": "cpu", "baseline": "eager", "rounds": 10,
                                 "cases": {MSE: {"fastvae_s": 0.005, "baseline_s": 0.004,
                                                 "ratio": 0.8}}}))
    assert report.main([str(src), "--out", str(tmp_path / "results"),
                        "--interleaved", str(inter)]) == 0
    text = (tmp_path / "results" / "cpu" / "bench.md").read_text()
    first = text.splitlines()[0]
    assert first.startswith(f"Slowest case vs eager: 0.80× (`{MSE}`)") and "**below**" in first
    assert "vs eager, interleaved" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| `{MSE}`"))
    assert "0.80×" in row and "1.50×" in row  # both figures, side by side
    assert f"- `{MSE}`: fastvae ≥ 2× eager: **missed**, 0.80×" in text
    # the BCE case, not covered by the interleaved run, keeps its block-median ratio
    bce = report.collect(sample_run())["cpu"][BCE]
    assert report.vs_eager(bce) == pytest.approx(12.0)
    # a run of another device or baseline is not merged
    by_device = report.collect(sample_run())
    report.merge_interleaved(by_device, {"device": "cuda", "cases": {MSE: {"ratio": 0.1}}})
    report.merge_interleaved(by_device, {"device": "cpu", "baseline": "compile",
                                         "cases": {MSE: {"ratio": 0.1}}})
    assert report.vs_eager(by_device["cpu"][MSE]) == pytest.approx(1.5)


def test_interleaved_json_is_written_per_case(tmp_path):
    from benchmarks import interleaved

    out = tmp_path / "inter.json"
    assert interleaved.main(["--group", "fixed_cost", "--match", "kl_fwd_bwd/fixed_tiny/float32",
                             "--rounds", "2", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["device"] == "cpu" and got["baseline"] == "eager"
    # (the match also takes reparam_kl_fwd_bwd/fixed_tiny/float32)
    assert set(got["cases"]) == {"kl_fwd_bwd/fixed_tiny/float32",
                                 "reparam_kl_fwd_bwd/fixed_tiny/float32"}
    for timing in got["cases"].values():
        assert timing["ratio"] > 0 and timing["fastvae_s"] > 0 and timing["baseline_s"] > 0


def test_the_chart_plots_the_eager_ratio_the_table_judges_by():
    """The chart's eager bar is the interleaved ratio where measured (it plotted the block
    medians' ratio: 6.25x for a case the table and the targets had at 2.38x)."""
    entry = {"fastvae": {"median_s": 0.004}, "eager": {"median_s": 0.025},
             "compile": {"median_s": 0.002}, "interleaved_ratio": 2.38}
    assert report.chart_ratio(entry, "eager") == 2.38
    assert report.chart_ratio(entry, "compile") == pytest.approx(0.5)
    del entry["interleaved_ratio"]
    assert report.chart_ratio(entry, "eager") == pytest.approx(6.25)
