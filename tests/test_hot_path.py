"""The fixed cost of a call (issue 12): what a repeated call with the same
shapes, dtypes, devices and options must not do again. Counted, not timed
(speed goals live in benchmarks/: the "fixed cost" group)."""

import collections.abc
import os
import sys

import pytest
import torch

import fastvae
from fastvae import _validate, ops


def _fastvae_dirs():
    from fastvae import kernels

    return tuple(os.path.dirname(m.__file__) + os.sep for m in (fastvae, kernels))


class CountingEnviron(collections.abc.MutableMapping):
    """os.environ, recording each read of a variable by fastvae's code (the
    package and its kernels; Triton's own launcher is not counted here)."""

    def __init__(self, environ):
        self._environ = environ
        self._dirs = _fastvae_dirs()
        self.reads = []

    def _record(self, key):
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.endswith(("os.py", "_collections_abc.py")):
            frame = frame.f_back  # os.getenv, Mapping.get: the caller is further up
        if frame is not None and frame.f_code.co_filename.startswith(self._dirs):
            self.reads.append(key)

    def __getitem__(self, key):
        self._record(key)
        return self._environ[key]

    def __setitem__(self, key, value):
        self._environ[key] = value

    def __delitem__(self, key):
        del self._environ[key]

    def __iter__(self):
        self._record("<iteration>")
        return iter(self._environ)

    def __len__(self):
        return len(self._environ)

    def __contains__(self, key):
        self._record(key)
        return key in self._environ

    def get(self, key, default=None):
        self._record(key)
        return self._environ.get(key, default)


def tensors(dtype=torch.float32, requires_grad=True, n=2, d=4, latent=2):
    x_hat = torch.rand(n, d, dtype=dtype).requires_grad_(requires_grad)
    mu = torch.randn(n, latent, dtype=dtype).requires_grad_(requires_grad)
    logvar = torch.randn(n, latent, dtype=dtype).requires_grad_(requires_grad)
    return x_hat, torch.rand(n, d, dtype=dtype), mu, logvar


def every_public_call(x_hat, x, mu, logvar):
    """Each public function once, forward and (where anything requires grad) backward."""
    outs = [
        fastvae.vae_loss(x_hat, x, mu, logvar),
        fastvae.vae_loss(x_hat, x, mu, logvar, recon="bce", beta=0.5, reduction="none",
                         logvar_clamp=(-30.0, 20.0)).sum(),
        fastvae.kl_divergence(mu, logvar, reduction="batchmean"),
        fastvae.reparameterize(mu, logvar).sum(),
        sum(t.sum() for t in fastvae.sample_and_kl(mu, logvar, logvar_clamp=(-5, 5))),
        fastvae.GaussianPosterior(torch.cat([mu, logvar], dim=1)).kl().sum(),
    ]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_hat, mu, logvar)):
        torch.autograd.grad(sum(outs), [x_hat, mu, logvar])
    return outs


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_calls_do_not_read_the_environment(monkeypatch, dtype, requires_grad):
    inputs = tensors(dtype, requires_grad)
    every_public_call(*inputs)  # first use: FASTVAE_BACKEND may be read here
    environ = CountingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", environ)
    every_public_call(*inputs)
    every_public_call(*tensors(dtype, requires_grad, n=3, d=5))  # new shapes: still no read
    assert environ.reads == []


def test_the_counter_sees_an_environment_read(monkeypatch):
    """The check above can fail: a read of FASTVAE_BACKEND is counted."""
    environ = CountingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", environ)
    from fastvae import _dispatch

    monkeypatch.setattr(_dispatch, "_forced", _dispatch._NOT_READ)
    every_public_call(*tensors())
    assert environ.reads == ["FASTVAE_BACKEND"]  # once, for all the calls


@pytest.fixture
def derivations(monkeypatch):
    """Counts the metadata checks that derive a plan (the uncached path), from an empty cache."""
    monkeypatch.setattr(_validate, "_PLANS", {})
    counts = collections.Counter()
    for name in ("_derive_loss_plan", "_derive_latent_plan"):
        real = getattr(_validate, name)

        def counted(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)
        monkeypatch.setattr(_validate, name, counted)
    return counts


def test_a_repeated_call_does_not_derive_its_plan_again(derivations):
    inputs = tensors()
    every_public_call(*inputs)
    first = sum(derivations.values())
    assert first == 6  # two loss option sets, two kl reductions, reparameterize, sample_and_kl
    every_public_call(*inputs)
    every_public_call(*(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs))
    assert sum(derivations.values()) == first  # same metadata: nothing re-derived
    # new shapes, a new dtype, new options: derived once each, then remembered
    for _ in range(2):
        every_public_call(*tensors(n=3))
        every_public_call(*tensors(torch.bfloat16))
        fastvae.kl_divergence(*inputs[2:], logvar_clamp=(-1.0, 1.0))
    assert sum(derivations.values()) == first + 2 * first + 1


def test_the_plan_cache_is_bounded(derivations, monkeypatch):
    monkeypatch.setattr(_validate, "MAX_PLANS", 4)
    for n in range(2, 12):
        fastvae.kl_divergence(torch.randn(n, 2), torch.randn(n, 2))
    assert len(_validate._PLANS) <= 4
    assert derivations["_derive_latent_plan"] == 10


class ApplySpy:
    """Stands in for an autograd.Function class, counting its applications."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def apply(self, *args):
        self.calls += 1
        return self.function.apply(*args)


class OpSpies(dict):
    """ApplySpy per autograd.Function; ``calls()``: applications per op (the loss, the
    KL, the reparameterization), whichever of the op's Functions ran."""

    OPS = {"loss": ("_VAELossFunction", "_SmallLossFunction"),
           "kl": ("_KLDivergenceFunction", "_SmallKLFunction"),
           "reparameterize": ("_ReparameterizeFunction", "_SmallSampleFunction")}

    def calls(self):
        return [sum(self[name].calls for name in names) for names in self.OPS.values()]


@pytest.fixture
def function_spies(monkeypatch):
    spies = OpSpies()
    for names in OpSpies.OPS.values():
        for name in names:
            spies[name] = ApplySpy(getattr(ops, name))
            monkeypatch.setattr(ops, name, spies[name])
    return spies


def test_calls_no_gradient_can_flow_through_skip_the_autograd_function(function_spies):
    x_hat, x, mu, logvar = tensors(requires_grad=False)
    gen = torch.Generator()
    without = [fastvae.vae_loss(x_hat, x, mu, logvar, return_parts=True),
               fastvae.kl_divergence(mu, logvar),
               fastvae.reparameterize(mu, logvar, generator=gen.manual_seed(1)),
               fastvae.sample_and_kl(mu, logvar, generator=gen.manual_seed(2))]
    assert function_spies.calls() == [0, 0, 0]
    with torch.no_grad():
        grads_off = [fastvae.vae_loss(*tensors(), return_parts=True),
                     fastvae.vae_loss(x_hat, x, mu, logvar, beta=torch.tensor(2.0, requires_grad=True)),
                     fastvae.kl_divergence(*tensors()[2:]),
                     fastvae.reparameterize(*tensors()[2:])]
    assert function_spies.calls() == [0, 0, 0]
    assert not any(t.requires_grad for out in grads_off for t in (out if isinstance(out, tuple) else [out]))
    # the same values as through the autograd.Function
    leaves = [t.requires_grad_() for t in (x_hat.clone(), mu.clone(), logvar.clone())]
    with_grad = [fastvae.vae_loss(leaves[0], x, leaves[1], leaves[2], return_parts=True),
                 fastvae.kl_divergence(*leaves[1:]),
                 fastvae.reparameterize(*leaves[1:], generator=gen.manual_seed(1)),
                 fastvae.sample_and_kl(*leaves[1:], generator=gen.manual_seed(2))]
    assert function_spies.calls() == [1, 1, 2]
    for a, b in zip(without, with_grad):
        for t, u in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
            assert u.grad_fn is not None and t.grad_fn is None
            torch.testing.assert_close(t, u.detach(), rtol=0, atol=0)


def test_a_beta_that_requires_grad_keeps_the_autograd_function(function_spies):
    x_hat, x, mu, logvar = tensors(requires_grad=False)
    beta = torch.tensor(0.5, requires_grad=True)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, beta=beta)
    assert function_spies["_VAELossFunction"].calls == 1
    (grad_beta,) = torch.autograd.grad(loss, beta)
    kl = fastvae.kl_divergence(mu, logvar)
    torch.testing.assert_close(grad_beta, kl)



def test_repeated_calls_reuse_the_cached_constants(monkeypatch):
    """The PyTorch path's 0-dim constants are made once per (value, dtype, device),
    and their cache is bounded."""
    from fastvae import _torch_impl

    monkeypatch.setattr(_torch_impl, "_constants", {})
    inputs = tensors()
    every_public_call(*inputs)
    first = dict(_torch_impl._constants)
    assert first  # the loss, KL and sampling use some
    every_public_call(*inputs)
    every_public_call(*(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs))
    assert _torch_impl._constants.keys() == first.keys()
    assert all(_torch_impl._constants[k] is t for k, t in first.items())  # not made again
    for value in range(2 * _torch_impl.MAX_CONSTANTS):
        assert _torch_impl.constant(float(value), torch.float32, inputs[0].device).item() == value
    assert len(_torch_impl._constants) <= _torch_impl.MAX_CONSTANTS


def test_small_cpu_draws_reuse_one_generator_per_thread_and_stay_reproducible():
    """standard_normal reseeds one CPU generator per thread instead of creating one
    per draw; the noise of a seed stays the same, whatever was drawn in between,
    and another thread gets its own generator."""
    import threading

    from fastvae import _torch_impl

    first = _torch_impl.standard_normal(123, (3, 5), torch.float32, "cpu")
    gen = _torch_impl._thread_generators.cpu
    _torch_impl.standard_normal(456, (7,), torch.float32, "cpu")
    again = _torch_impl.standard_normal(123, (3, 5), torch.float32, "cpu")
    assert _torch_impl._thread_generators.cpu is gen
    assert torch.equal(first, again)
    assert not torch.equal(first, _torch_impl.standard_normal(124, (3, 5), torch.float32, "cpu"))
    other = {}

    def draw():
        other["noise"] = _torch_impl.standard_normal(123, (3, 5), torch.float32, "cpu")
        other["gen"] = _torch_impl._thread_generators.cpu

    thread = threading.Thread(target=draw)
    thread.start()
    thread.join()
    assert other["gen"] is not gen and torch.equal(other["noise"], first)
