"""diffusers' autoencoders on fastvae (``fastvae.integrations.diffusers.apply()``)
against diffusers as shipped. Skipped where diffusers is not installed.

Implementations (``impl``; the report's "vs eager" column is the speedup over diffusers):
    fastvae           patched: diffusers' ``train_autoencoderkl.py`` loss code unchanged, the
                      posterior is fastvae's (fused sample + KL)
    eager             diffusers' ``DiagonalGaussianDistribution`` and the same loss code
    fastvae_vae_loss  patched, and the loss as ``fastvae.vae_loss(..., reduction="batchmean",
                      beta=kl_scale)`` (the README's diffusers section)

Cases:
    diffusers_posterior_loss_fwd_bwd   the posterior and the loss alone: build the posterior
        from the encoder's moments, sample z, loss = sum(mse)/N + kl_scale * sum(kl)/N, and the
        backward into the reconstruction and the moments with a fixed upstream gradient on z
        (standing in for the decoder). Images 8x3x256x256 (latents 8x4x32x32) and
        16x3x512x512 (16x4x64x64) in a full run.
    diffusers_train_step   a whole training step of a tiny AutoencoderKL (encode, sample,
        decode, loss, backward, AdamW): what the posterior's share of a real step is.

``python -m benchmarks.test_diffusers_bench [--full] [--threads N]`` times the implementations
interleaved, round by round, in one process (for a contended machine) and prints
the medians.
"""

import argparse
import dataclasses
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.autoencoders import vae as diffusers_vae  # noqa: E402

import fastvae  # noqa: E402
from benchmarks.conftest import _timed as _synced  # noqa: E402
from benchmarks.conftest import bench_devices, full_run, rounds_for  # noqa: E402
from fastvae.integrations import diffusers as fastvae_diffusers  # noqa: E402

IMPLS = ("fastvae", "eager", "fastvae_vae_loss")
KL_SCALE = 1e-6  # train_autoencoderkl.py's default --kl_scale
MAX_ROUNDS = 100  # a training step of the tiny AutoencoderKL is slow: fewer rounds


@dataclasses.dataclass(frozen=True)
class DiffusersCase:
    op: str  # "diffusers_posterior_loss_fwd_bwd" or "diffusers_train_step"
    size: str
    x_shape: tuple[int, ...]  # images (N, 3, H, W); latents are (N, 4, H/8, W/8)

    @property
    def id(self):
        return f"{self.op}/{self.size}/float32"

    @property
    def latent_shape(self):
        n, _, h, w = self.x_shape
        downsample = 8 if self.op == "diffusers_posterior_loss_fwd_bwd" else 2  # the tiny model: 2
        return (n, 4, h // downsample, w // downsample)


def suite(full):
    if full:
        return [DiffusersCase("diffusers_posterior_loss_fwd_bwd", "ldm", (8, 3, 256, 256)),
                DiffusersCase("diffusers_posterior_loss_fwd_bwd", "ldm512", (16, 3, 512, 512)),
                DiffusersCase("diffusers_train_step", "tiny_autoencoder_kl", (8, 3, 64, 64))]
    return [DiffusersCase("diffusers_posterior_loss_fwd_bwd", "tiny_image", (2, 3, 32, 32)),
            DiffusersCase("diffusers_train_step", "tiny_autoencoder_kl_ci", (2, 3, 16, 16))]


# ---- the two losses ----------------------------------------------------------------

def script_loss(reconstructions, targets, posterior):
    """train_autoencoderkl.py's loss without its perceptual and GAN terms."""
    rec_loss = F.mse_loss(reconstructions.float(), targets.float(), reduction="none")
    nll_loss = torch.sum(rec_loss) / rec_loss.shape[0]
    kl_loss = posterior.kl()
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    return nll_loss + KL_SCALE * kl_loss


def fused_loss(reconstructions, targets, posterior):
    return fastvae.vae_loss(reconstructions, targets, posterior.mean, posterior.logvar, recon="mse",
                            reduction="batchmean", beta=KL_SCALE)


LOSSES = {"fastvae": script_loss, "eager": script_loss, "fastvae_vae_loss": fused_loss}
POSTERIORS = {"fastvae": fastvae_diffusers.FusedDiagonalGaussianDistribution,
              "eager": fastvae_diffusers.DiagonalGaussianDistribution,
              "fastvae_vae_loss": fastvae_diffusers.FusedDiagonalGaussianDistribution}


# ---- posterior + loss alone ------------------------------------------------------------

def posterior_inputs(case, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = case.latent_shape
    moments = torch.randn((n, 2 * c, h, w), generator=gen)
    moments[:, c:] = moments[:, c:] * 0.5 - 1.0  # logvar around -1
    x = torch.rand(case.x_shape, generator=gen) * 2 - 1
    x_hat = x + 0.1 * torch.randn(case.x_shape, generator=gen)
    grad_z = torch.randn(case.latent_shape, generator=gen)
    return {"moments": moments.to(device).requires_grad_(), "x_hat": x_hat.to(device).requires_grad_(),
            "x": x.to(device), "grad_z": grad_z.to(device)}


def posterior_step(impl, inputs):
    cls, loss_fn = POSTERIORS[impl], LOSSES[impl]
    moments, x_hat, x, grad_z = inputs["moments"], inputs["x_hat"], inputs["x"], inputs["grad_z"]

    def step():
        posterior = cls(moments)
        z = posterior.sample()
        loss = loss_fn(x_hat, x, posterior)
        grads = torch.autograd.grad((loss, z), (x_hat, moments), (None, grad_z))
        return z, loss, grads

    return step


def check_posterior_step(inputs, out):
    """Against float64 formulas, with the noise recovered from z."""
    z, loss, (g_x_hat, g_moments) = out
    moments = inputs["moments"].detach().double()
    x_hat, x, grad_z = inputs["x_hat"].detach().double(), inputs["x"].double(), inputs["grad_z"].double()
    n = x.shape[0]
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    std = torch.exp(0.5 * logvar)
    eps = (z.detach().double() - mean) / std
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum()
    want_loss = ((x_hat - x) ** 2).sum() / n + KL_SCALE * kl / n
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(g_x_hat.double(), 2 * (x_hat - x) / n, rtol=1e-5, atol=1e-7)
    want_mean = grad_z + KL_SCALE / n * mean
    want_logvar = grad_z * eps * std / 2 + KL_SCALE / n * 0.5 * (logvar.exp() - 1)
    torch.testing.assert_close(g_moments.double(), torch.cat([want_mean, want_logvar], 1), rtol=1e-4,
                               atol=1e-6)


# ---- a training step of a tiny AutoencoderKL ---------------------------------------------

def tiny_autoencoder_kl(device, seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
    ).to(device)


def train_inputs(case, device, seed=0):
    model = tiny_autoencoder_kl(device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = (torch.rand(case.x_shape, generator=gen) * 2 - 1).to(device)
    return {"model": model, "targets": targets, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4)}


def train_step(impl, inputs):
    """One step; the posterior class is whatever diffusers' modules hold (apply() or not)."""
    model, targets, optimizer, loss_fn = inputs["model"], inputs["targets"], inputs["optimizer"], LOSSES[impl]

    def step():
        posterior = model.encode(targets).latent_dist
        reconstructions = model.decode(posterior.sample()).sample
        loss = loss_fn(reconstructions, targets, posterior)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


class patched_if:
    """``apply()`` for the fastvae implementations, for the length of a ``with``."""

    def __init__(self, impl):
        self.on = impl != "eager"

    def __enter__(self):
        if self.on:
            fastvae_diffusers.apply()

    def __exit__(self, *exc):
        if self.on:
            fastvae_diffusers.revert()


def check_train_step(case, impl, device):
    """The first step's loss equals diffusers' on the same noise (diffusers made to draw
    fastvae's noise: reparameterize of a zero mean and logvar is exactly that noise)."""
    original = diffusers_vae.randn_tensor

    def fastvae_noise(shape, generator=None, device=None, dtype=None, layout=None):
        zeros = torch.zeros(shape, device=device)
        return fastvae.reparameterize(zeros, zeros, generator=generator).to(dtype)

    diffusers_vae.randn_tensor = fastvae_noise
    try:
        torch.manual_seed(7)
        want = train_step("eager", train_inputs(case, device))()
        with patched_if(impl):
            torch.manual_seed(7)
            got = train_step(impl, train_inputs(case, device))()
    finally:
        diffusers_vae.randn_tensor = original
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


# ---- pytest-benchmark -------------------------------------------------------------------

def pytest_generate_tests(metafunc):
    if "diffusers_case" not in metafunc.fixturenames:
        return
    full = full_run(metafunc.config)
    params = [pytest.param(device, case, impl, id=f"{device}:{case.id}:{impl}")
              for device in bench_devices(metafunc.config) for case in suite(full) for impl in IMPLS]
    metafunc.parametrize(("device", "diffusers_case", "impl"), params)


def test_diffusers_bench(benchmark, request, device, diffusers_case, impl):
    case, full = diffusers_case, full_run(request.config)
    benchmark.group = f"{device}:{case.id}"
    benchmark.extra_info.update(case=case.id, op=case.op, impl=impl, device=device, size=case.size,
                                dtype="float32", baseline="diffusers " + _diffusers_version())
    if case.op == "diffusers_train_step":
        check_train_step(case, impl, device)
        inputs = train_inputs(case, device)
        make_step = train_step
    else:
        inputs = posterior_inputs(case, device)
        make_step = posterior_step
    with patched_if(impl):
        step = _synced(make_step(impl, inputs), device)
        out = step()  # warm-up
        if case.op == "diffusers_posterior_loss_fwd_bwd":
            check_posterior_step(inputs, out)
        del out
        rounds = rounds_for(step, full, max_rounds=MAX_ROUNDS)
        benchmark.pedantic(step, rounds=rounds, iterations=1)


def _diffusers_version():
    import diffusers

    return diffusers.__version__


# ---- interleaved timing in one process ------------------------------------------------------

def interleaved(full, device="cpu", rounds=15):
    """Median seconds per (case, impl), the implementations timed round-robin."""
    results = {}
    for case in suite(full):
        steps = {}
        for impl in IMPLS:
            if case.op == "diffusers_train_step":
                steps[impl] = _synced(train_step(impl, train_inputs(case, device)), device)
            else:
                steps[impl] = _synced(posterior_step(impl, posterior_inputs(case, device)), device)
            with patched_if(impl):
                steps[impl]()  # warm-up
        times = {impl: [] for impl in IMPLS}
        for _ in range(rounds):
            for impl in IMPLS:
                with patched_if(impl):  # apply()/revert() outside the timed region
                    start = time.perf_counter()
                    steps[impl]()
                    times[impl].append(time.perf_counter() - start)
        results[case.id] = {impl: statistics.median(t) for impl, t in times.items()}
    return results


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.test_diffusers_bench",
                                     description="diffusers' AutoencoderKL with and without "
                                                 "fastvae, timed interleaved")
    parser.add_argument("--full", action="store_true", help="the large sizes too")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    full = args.full
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"diffusers {_diffusers_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "medians of interleaved rounds (a shared machine: compare within a row)")
    for case_id, by_impl in interleaved(full).items():
        base = by_impl["eager"]
        cells = ", ".join(f"{impl} {t * 1e3:.2f} ms ({base / t:.2f}x)" for impl, t in by_impl.items())
        print(f"{case_id}: {cells}")


if __name__ == "__main__":
    main(sys.argv[1:])
