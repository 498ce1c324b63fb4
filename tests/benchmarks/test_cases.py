"""The benchmark cases' own checks: what an implementation must satisfy before it is
timed. The sampling check recovers each implementation's noise from its z; noise that
is N(0, 1) in distribution but not random must fail it."""

import pytest
import torch

from benchmarks import cases


def sampling_case(variant=None):
    return cases.Case("reparam_kl_fwd_bwd", cases.SIZES["tiny_reparam"], torch.float32,
                      variant=variant)


def test_fastvae_and_eager_sampling_pass_the_check():
    for variant in (None, "samples4"):
        for impl in ("fastvae", "eager"):
            sampling_case(variant).check(impl, torch.device("cpu"))


def _with_noise(case, inputs, eps):
    """fastvae's outputs with z replaced by mu + std * eps (the gradients from that noise)."""
    got = list(case.run("fastvae", inputs))
    mu, lv = inputs["mu"].detach(), inputs["logvar"].detach()
    got[0] = mu + torch.exp(0.5 * lv) * eps
    return got


@pytest.mark.parametrize("broken", ["same_noise_per_sample", "noise_from_mu", "noise_from_grad_z"])
def test_noise_that_is_not_random_fails_the_check(broken):
    """Each was N(0, 1) to the mean/std test and passed before: the same draw for all K
    samples, 'noise' standardised from mu, 'noise' that is grad_z."""
    case = sampling_case("samples4" if broken == "same_noise_per_sample" else None)
    inputs = case.inputs(torch.device("cpu"))
    mu = inputs["mu"].detach()
    if broken == "same_noise_per_sample":
        one = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
        eps = one.expand(cases.NUM_SAMPLES, *mu.shape)
    elif broken == "noise_from_mu":
        eps = (mu - mu.mean()) / mu.std()
    else:
        eps = inputs["grad_z"]
    with pytest.raises(AssertionError, match="correlates"):
        case.verify("fastvae", inputs, _with_noise(case, inputs, eps))


def test_the_same_z_on_every_call_fails_the_check(monkeypatch):
    case = sampling_case()
    frozen = {}
    real_run = cases.Case.run

    def run_with_frozen_noise(self, impl, inputs):
        got = real_run(self, impl, inputs)
        frozen.setdefault("z", got[0])
        return [frozen["z"].clone(), *got[1:]]

    monkeypatch.setattr(cases.Case, "run", run_with_frozen_noise)
    with pytest.raises(AssertionError, match="two calls drew the same z"):
        case.check("fastvae", torch.device("cpu"))
