"""Compile every kernel variant fastvae launches for a Hopper GPU (sm_90), on a
machine without one: ``python tests/kernels/compile_for_gpu.py``.

Triton's interpreter, which runs the kernels in CI, skips the compiler's type
checks: e.g. a variable assigned with different shapes in the two branches of a
runtime ``if`` runs fine there and fails to compile for a GPU. This script
stands in a driver that reports an sm_90 target, turns every launch into
Triton's ``warmup`` (compile to a cubin with the ptxas Triton ships, launch
nothing) and drives the public API over every recon, reduction, dtype, clamp
and beta form. The tensors are CPU tensors and the outputs are never written:
only compilation (and that no kernel needs more shared memory than sm_90 has) is
checked. Exit status 1 when a variant fails to compile.
It must run in a process where TRITON_INTERPRET is unset (see the test beside it).
"""

import contextlib
import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_for_gpu: TRITON_INTERPRET=1 is set; the compiler would not run")
os.environ["FASTVAE_BACKEND"] = "triton"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
SM_COUNT = 132
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes a block may use on sm_90


class CompileOnlyDriver:
    """What Triton's JIT asks of the active driver before it compiles."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


def install():
    """Route every launch to compile-only; returns the list of compiled names."""
    driver.set_active(CompileOnlyDriver())
    compiled = []
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        # a launch would fail with OutOfResources past this; registers are only
        # known once a driver loads the binary
        if kernel.metadata.shared > SHARED_MEMORY_LIMIT:
            raise RuntimeError(f"{self.fn.__name__} needs {kernel.metadata.shared} bytes of "
                               f"shared memory, more than sm_90's {SHARED_MEMORY_LIMIT}")
        compiled.append(self.fn.__name__)
        return kernel

    JITFunction.run = compile_only

    from fastvae.kernels import _shared

    _shared.device_guard = lambda t: contextlib.nullcontext()  # CPU tensors, no interpreter
    _shared._sm_count = lambda device: SM_COUNT  # the GPU launch-size heuristics
    return compiled


def variants():
    """(name, callable) for the kernel specializations the public API can launch:
    every recon x reduction x dtype x clamp x beta form, targets in the model's
    dtype or float32, training and eval, one or three gradients, and tile shapes
    from one sample to many long rows."""
    import fastvae

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for dtype, recon, reduction, clamp, x_dtype in itertools.product(
            dtypes, ("mse", "l1", "bce", "bce_logits"), ("sum", "none"), (None, (-8.0, 8.0)),
            ("same", torch.float32)):
        if x_dtype == torch.float32 and (dtype == torch.float32 or clamp is not None):
            continue  # mixed targets once per dtype and recon is enough
        def loss(dtype=dtype, recon=recon, reduction=reduction, clamp=clamp,
                 x_dtype=dtype if x_dtype == "same" else x_dtype):
            x_hat = torch.rand(4, 3, 64, 64, dtype=dtype, requires_grad=True)
            x = torch.rand(4, 3, 64, 64, dtype=x_dtype)
            mu = torch.randn(4, 16, dtype=dtype, requires_grad=True)
            logvar = torch.randn(4, 16, dtype=dtype, requires_grad=True)
            for beta in (0.5, torch.tensor(0.5)):
                out = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, reduction=reduction,
                                       beta=beta, logvar_clamp=clamp)
                (out.sum() * 2.0).backward()  # a weight other than 1: the scaling kernel
            with torch.no_grad():  # eval: no gradient written
                fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, reduction=reduction)
        yield f"vae_loss {dtype} {recon} {reduction} clamp={clamp} x={x_dtype}", loss
    for dtype, recon, obs in itertools.product(dtypes, ("gaussian", "laplace", "continuous_bernoulli"),
                                               ("float", "scalar", "channel", "element", "optimal")):
        if recon == "continuous_bernoulli" and obs != "float":
            continue  # no obs_logvar
        def likelihood(dtype=dtype, recon=recon, obs=obs):
            x_hat = torch.rand(4, 3, 64, 64, dtype=dtype, requires_grad=True)
            x = torch.rand(4, 3, 64, 64, dtype=dtype)
            mu = torch.randn(4, 16, dtype=dtype, requires_grad=True)
            obs_logvar = {"float": None if recon == "continuous_bernoulli" else 0.5,
                          "scalar": torch.tensor(0.5, requires_grad=True),
                          "channel": torch.zeros(1, 3, 1, 1, dtype=dtype, requires_grad=True),
                          "element": torch.zeros(4, 3, 64, 64, dtype=dtype, requires_grad=True),
                          "optimal": "optimal"}[obs]
            for reduction in ("sum", "none"):
                out = fastvae.vae_loss(x_hat, x, mu, mu, recon=recon, reduction=reduction,
                                       obs_logvar=obs_logvar)
                (out.sum() * 2.0).backward()
        yield f"vae_loss {dtype} {recon} obs_logvar={obs}", likelihood
    for dtype, prior, clamp in itertools.product(dtypes, ("learned", "per_sample"),
                                                 (None, (-8.0, 8.0))):
        def with_prior(dtype=dtype, prior=prior, clamp=clamp):
            x_hat = torch.rand(4, 3, 64, 64, dtype=dtype, requires_grad=True)
            x = torch.rand(4, 3, 64, 64, dtype=dtype)
            mu = torch.randn(4, 16, dtype=dtype, requires_grad=True)
            shape = (16,) if prior == "learned" else (4, 16)
            prior_mu = torch.zeros(shape, requires_grad=True)  # a float32 parameter
            prior_logvar = torch.zeros(shape, dtype=dtype, requires_grad=True)
            for reduction in ("sum", "none"):
                out = fastvae.vae_loss(x_hat, x, mu, mu, reduction=reduction, logvar_clamp=clamp,
                                       prior_mu=prior_mu, prior_logvar=prior_logvar)
                (out.sum() * 2.0).backward()
                fastvae.kl_divergence(mu, mu, reduction=reduction, prior_mu=prior_mu,
                                      prior_logvar=prior_logvar).sum().backward()
        yield f"KL against a prior {dtype} {prior} clamp={clamp}", with_prior
    for dtype, prior, clamp in itertools.product(dtypes, ("none", "learned"),
                                                 (None, (-8.0, 8.0))):
        def free_bits(dtype=dtype, prior=prior, clamp=clamp):
            # the column-sum pre-pass, the loss/KL pass with FREE_BITS, the finish with
            # FREE_BITS; a long latent without a prior (pre-pass tiles of 16 columns)
            batch, latent = (64, 512) if prior == "none" else (4, 16)
            x_hat = torch.rand(batch, 784, dtype=dtype, requires_grad=True)
            x = torch.rand(batch, 784, dtype=dtype)
            mu = torch.randn(batch, latent, dtype=dtype, requires_grad=True)
            logvar = torch.randn(batch, latent, dtype=dtype, requires_grad=True)
            pm = plv = None
            if prior == "learned":
                pm = torch.zeros(latent, requires_grad=True)
                plv = torch.zeros(latent, dtype=dtype, requires_grad=True)
            for reduction in ("sum", "mean"):
                out = fastvae.vae_loss(x_hat, x, mu, logvar, reduction=reduction, free_bits=0.1,
                                       logvar_clamp=clamp, prior_mu=pm, prior_logvar=plv)
                (out * 2.0).backward()
                fastvae.kl_divergence(mu, logvar, reduction=reduction, free_bits=0.1,
                                      logvar_clamp=clamp, prior_mu=pm,
                                      prior_logvar=plv).backward()
            out = fastvae.vae_loss(x_hat, x, mu, logvar, recon="gaussian", obs_logvar="optimal",
                                   free_bits=0.1, prior_mu=pm, prior_logvar=plv)
            out.backward()
            with torch.no_grad():  # eval: no gradient written
                fastvae.vae_loss(x_hat, x, mu, logvar, free_bits=0.1, prior_mu=pm,
                                 prior_logvar=plv)
        yield f"free bits {dtype} prior={prior} clamp={clamp}", free_bits
    for batch, cols, latent in ((1, 777, 3), (64, 784, 20), (2, 3 * 256 * 256, 4 * 32 * 32)):
        def shapes(batch=batch, cols=cols, latent=latent):
            x_hat = torch.rand(batch, cols, requires_grad=True)
            mu = torch.randn(batch, latent)  # only x_hat needs a gradient: one buffer scaled
            out = fastvae.vae_loss(x_hat, torch.rand(batch, cols), mu, mu, reduction="none")
            out.backward(torch.full_like(out, 0.5))
            z, kl = fastvae.sample_and_kl(mu.requires_grad_(), mu)
            (z.sum() + kl.sum()).backward()
        yield f"tile shapes batch={batch} cols={cols} latent={latent}", shapes
    for dtype, clamp in itertools.product(dtypes, (None, (-8.0, 8.0))):
        def sampling(dtype=dtype, clamp=clamp):
            mu = torch.randn(64, 512, dtype=dtype, requires_grad=True)
            logvar = torch.randn(64, 512, dtype=dtype, requires_grad=True)
            fastvae.reparameterize(mu, logvar).sum().backward()
            z, kl = fastvae.sample_and_kl(mu, logvar, logvar_clamp=clamp)
            (z.sum() + kl.sum()).backward()
            for reduction in ("batchmean", "none"):
                fastvae.kl_divergence(mu, logvar, reduction=reduction,
                                      logvar_clamp=clamp).sum().backward()
            # several samples, and the KL against a learned prior
            prior = torch.zeros(512, requires_grad=True)
            z, kl = fastvae.sample_and_kl(mu, logvar, logvar_clamp=clamp, num_samples=3,
                                          prior_mu=prior, prior_logvar=prior)
            (z.sum() + kl.sum()).backward()
            fastvae.reparameterize(mu, logvar, num_samples=2).sum().backward()
        yield f"sampling {dtype} clamp={clamp}", sampling


def main():
    compiled = install()
    start, failures = time.monotonic(), []
    for name, fn in variants():
        before = len(compiled)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report every variant that fails
            failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if len(compiled) == before:  # e.g. a dispatch change sent it to the PyTorch path
            failures.append(name)
            print(f"FAIL {name}: no kernel was launched", file=sys.stderr)
    print(f"compile_for_gpu: {len(set(compiled))} kernels, {len(compiled)} launches compiled "
          f"for sm_{TARGET.arch} in {time.monotonic() - start:.0f} s; "
          f"{len(failures)} variants failed")
    return 1 if failures or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
