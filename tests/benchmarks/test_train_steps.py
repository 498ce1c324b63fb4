"""benchmarks/train_steps.py without a GPU: the models and both losses at small
sizes, the phased step used for the profile, the attribution of device time to
phases, the table and the targets."""

import copy

import pytest
import torch

from benchmarks import train_steps


def test_models_have_the_issue_shapes():
    shapes = {}
    for name in train_steps.MODELS:
        net, x, recon, beta = train_steps.build(name, "cpu", small=name != "mlp784")
        with torch.no_grad():
            mu, logvar = net.encode(x)
            x_hat = net.decoder(mu)
        assert mu.shape == logvar.shape and x_hat.shape == x.shape
        shapes[name] = (tuple(x.shape), tuple(mu.shape))
    assert shapes["mlp784"] == ((128, 784), (128, 20))
    # the latent-diffusion layout: 3 channels -> 4 latent channels at 1/8 the side
    net = train_steps.LatentDiffusionStyleVAE()
    with torch.no_grad():
        mu, _ = net.encode(torch.zeros(1, 3, 256, 256))
    assert mu.shape == (1, 4, 32, 32)


@pytest.mark.parametrize("model", train_steps.MODELS)
def test_both_losses_agree_with_the_same_noise(model, one_thread):
    """plain and fastvae compute the same loss: with the noise fixed (the sampler
    swapped for mu + eps std with one eps), their losses and gradients match."""
    net, x, recon, beta = train_steps.build(model, "cpu", small=True)
    eps = None
    results = []
    for impl in train_steps.IMPLS:
        criterion = train_steps.criterion(impl, recon, beta)
        mu, logvar = net.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        loss = criterion(net.decoder(mu + eps * torch.exp(0.5 * logvar)), x, mu, logvar)
        results.append((loss.detach(), torch.autograd.grad(loss, list(net.parameters()))))
    (loss_p, grads_p), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads_f, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", train_steps.IMPLS)
def test_phased_step_is_the_step(impl, one_thread):
    """The step cut into phases for the profile updates the weights exactly as the
    real step does (same noise: the generator is reseeded before each)."""
    net, x, recon, beta = train_steps.build("conv64", "cpu", small=True)
    after = []
    for make in (train_steps.make_step, train_steps.phased_step):
        model = copy.deepcopy(net)
        step = make(impl, "eager", model, x, recon, beta)
        torch.manual_seed(1)
        loss = step()
        after.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = after
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, p) for a, p in zip(params_a, net.parameters()))  # it trained


def test_phase_device_time_attributes_launches_by_host_window():
    ranges = [("model", 0, 10), ("loss+sampling", 10.5, 20), ("model", 25, 40),
              ("optimizer", 40.5, 45)]
    launches = [(1, 5.0), (9.9, 1.0), (12, 3.0), (19.5, 0.5), (21, 7.0), (30, 2.0), (41, 4.0),
                (50, 8.0), (15, 0.0)]
    assert train_steps.phase_device_time(ranges, launches) == {
        "model": 8.0, "loss+sampling": 3.5, "optimizer": 4.0, "other": 15.0}


def test_profile_records_find_the_phases(one_thread):
    from torch.profiler import ProfilerActivity, profile

    net, x, recon, beta = train_steps.build("mlp784", "cpu", small=True)
    step = train_steps.phased_step("fastvae", "eager", net, x, recon, beta)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ranges, launches = train_steps.profile_records(prof)
    assert [r[0] for r in ranges].count("model") == 4
    assert [r[0] for r in ranges].count("loss+sampling") == 3
    assert [r[0] for r in ranges].count("optimizer") == 1
    assert all(start <= end for _, start, end in ranges)
    assert len(launches) > len(ranges)  # every host event, each with its device time (0 here)


def test_run_group_measures_and_skips_past_the_budget(one_thread):
    left = iter([100.0, 100.0, 0.0, 0.0])
    lines = []
    rows = train_steps.run_group("cpu", models=("mlp784",), variants=("eager", "bf16"),
                                 small=True, time_left=lambda: next(left), log=lines.append,
                                 warmup=1, min_steps=1, max_steps=2, min_seconds=0.0)
    assert [(r["variant"], r["impl"]) for r in rows] == [
        ("eager", "plain"), ("eager", "fastvae"), ("bf16", "plain"), ("bf16", "fastvae")]
    for row in rows[:2]:
        assert row["steps_per_s"] > 0 and row["timed_steps"] >= 1 and row["peak_mib"] is None
        assert set(row["share"]) == {"model", "loss+sampling", "optimizer", "other"}
        assert "error" not in row
    assert all("time budget" in r["skipped"] for r in rows[2:])
    assert len(lines) == 4


def fake_rows():
    def row(model, variant, impl, sps, **extra):
        return dict(model=model, variant=variant, impl=impl, batch=8, steps_per_s=sps,
                    peak_mib=100.0, first_call_s=1.0, **extra)
    return [row("mlp784", "eager", "plain", 100.0, share={"loss+sampling": 0.4}),
            row("mlp784", "eager", "fastvae", 150.0, share={"loss+sampling": 0.1}),
            row("mlp784", "reduce-overhead", "plain", 400.0),
            row("mlp784", "reduce-overhead", "fastvae", 380.0),
            dict(model="ldm256", variant="eager", impl="plain", batch=8, skipped="time budget"),
            row("ldm256", "eager", "fastvae", 10.0)]


def test_targets_pairs_and_fastest_row():
    targets = {t["what"]: t for t in train_steps.evaluate(fake_rows())}
    assert targets["train step mlp784 eager: fastvae / plain steps/s"]["measured"] == 1.5
    assert not targets["train step mlp784 reduce-overhead: fastvae / plain steps/s"]["met"]
    fastest = targets["train step mlp784: fastest row (reduce-overhead plain) uses fastvae"]
    assert not fastest["met"]
    assert "train step ldm256 eager: fastvae / plain steps/s" not in targets  # no pair
    assert targets["train step ldm256: fastest row (eager fastvae) uses fastvae"]["met"]


def test_table():
    lines = train_steps.table(fake_rows())
    assert lines[2] == ("| mlp784 | 8 | eager | 100.0 | 150.0 | 1.50x | 100/100 | 40%/10% | "
                        "1.0/1.0 |")
    assert lines[3].startswith("| mlp784 | 8 | reduce-overhead | 400.0 | 380.0 | 0.95x |")
    assert lines[4].endswith("plain: time budget")


def test_command_line_runs_one_small_group(capsys, one_thread):
    assert train_steps.main(["--models", "mlp784", "--variants", "eager", "--device", "cpu",
                             "--small"]) == 0
    out = capsys.readouterr().out
    assert "| mlp784 | 8 | eager |" in out and "fastvae / plain steps/s" in out
