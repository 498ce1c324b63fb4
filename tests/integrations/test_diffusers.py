"""fastvae.integrations.diffusers: diffusers' autoencoders on fastvae's posterior.

Tiny models built from configs (no hub downloads), CPU. Where a patched and an
unpatched run are compared, diffusers' own sampling is made to draw the noise that
fastvae draws from the same generator state (``fastvae.reparameterize`` of a zero
mean and zero logvar is exactly that noise), so the runs differ only by float
rounding.
"""

import copy
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")  # the dev extra installs it

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.autoencoders import vae as diffusers_vae  # noqa: E402

import fastvae  # noqa: E402
from fastvae import GaussianPosterior  # noqa: E402
from fastvae.integrations import diffusers as fastvae_diffusers  # noqa: E402

DiagonalGaussianDistribution = fastvae_diffusers.DiagonalGaussianDistribution  # diffusers' own class
Fused = fastvae_diffusers.FusedDiagonalGaussianDistribution
KL_SCALE = 1e-3
ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_autoencoder_kl(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        sample_size=16,  # the tile size: inputs above 16x16 are tiled when tiling is on
    )


def images(n=2, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def patched():
    fastvae_diffusers.apply()
    yield
    fastvae_diffusers.revert()


@pytest.fixture
def fastvae_noise(monkeypatch):
    """Unpatched diffusers draws fastvae's noise: the same eps for the same generator state."""
    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert not isinstance(generator, list)
        zeros = torch.zeros(shape, device=device)
        return fastvae.reparameterize(zeros, zeros, generator=generator).to(dtype)  # 0 + exp(0) * eps

    monkeypatch.setattr(diffusers_vae, "randn_tensor", randn_tensor)


def diffusers_train_loss(reconstructions, targets, posterior):
    """The VAE loss of diffusers' examples/research_projects/autoencoderkl/train_autoencoderkl.py
    without its perceptual and GAN terms: per-sample summed MSE and KL, over the batch."""
    rec_loss = F.mse_loss(reconstructions.float(), targets.float(), reduction="none")
    nll_loss = torch.sum(rec_loss) / rec_loss.shape[0]
    kl_loss = posterior.kl()
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    return nll_loss + KL_SCALE * kl_loss


# ---- the switch -----------------------------------------------------------------

def test_importing_fastvae_or_its_integrations_package_does_not_import_diffusers():
    code = ("import sys, fastvae, fastvae.integrations; fastvae.GaussianPosterior; "
            "print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_without_diffusers_a_clear_import_error_and_a_skipped_benchmark():
    code = """
import sys
sys.modules["diffusers"] = None  # import diffusers now raises ImportError
import pytest
rc = pytest.main(["-q", "-p", "no:cacheprovider", "benchmarks/test_diffusers_bench.py"])
print("pytest exit code", int(rc))
try:
    import fastvae.integrations.diffusers
except ImportError as e:
    print("ImportError:", e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    # the benchmark module skips at collection: one skip, nothing collected, no error
    assert "1 skipped" in run.stdout and "pytest exit code 5" in run.stdout, run.stdout + run.stderr
    assert ("ImportError: fastvae.integrations.diffusers needs diffusers: "
            "pip install 'fastvae[diffusers]'") in run.stdout, run.stdout + run.stderr


def test_reloading_the_integration_while_applied_keeps_diffusers_class_apart():
    """A reload (a notebook's autoreload) while applied took the patched class for
    diffusers' own and failed to build its subclass ("consistent method resolution
    order"), leaving diffusers patched; now the reloaded module knows diffusers' class,
    is_applied() holds, revert() removes the earlier import's class, apply() works again."""
    code = """
import importlib
from diffusers.models.autoencoders import vae
import fastvae.integrations.diffusers as fd
original = vae.DiagonalGaussianDistribution
fd.apply()
fd = importlib.reload(fd)
assert fd.DiagonalGaussianDistribution is original
assert fd.is_applied()
fd.revert()
assert vae.DiagonalGaussianDistribution is original and not fd.is_applied()
fd.apply()
assert vae.DiagonalGaussianDistribution is fd.FusedDiagonalGaussianDistribution
fd.revert()
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.stdout.strip() == "ok", run.stdout + run.stderr


def holders(cls):
    return {name for name, module in list(sys.modules.items())
            if name.startswith("diffusers") and getattr(module, "__dict__", {}).get(
                "DiagonalGaussianDistribution") is cls}


def test_apply_switches_every_diffusers_module_and_revert_restores_them(monkeypatch):
    before = holders(DiagonalGaussianDistribution)
    # the models that build the posterior, found in diffusers' source
    assert {"diffusers.models.autoencoders.vae", "diffusers.models.autoencoders.autoencoder_kl",
            "diffusers.models.autoencoders.autoencoder_asym_kl",
            "diffusers.models.autoencoders.autoencoder_kl_temporal_decoder",
            "diffusers.models.autoencoders.consistency_decoder_vae",
            "diffusers.models.autoencoders.autoencoder_kl_wan"} <= before
    model, x = tiny_autoencoder_kl(), images()
    fastvae_diffusers.apply()
    try:
        fastvae_diffusers.apply()  # idempotent
        assert fastvae_diffusers.is_applied()
        assert holders(Fused) == before and not holders(DiagonalGaussianDistribution)
        posterior = model.encode(x).latent_dist  # a model built before apply() switches too
        assert type(posterior) is Fused and isinstance(posterior, DiagonalGaussianDistribution)
        assert posterior.semantics == "diffusers"
        # a diffusers module imported after apply() takes the switched class from vae.py ...
        late = type(sys)("diffusers._fastvae_test_late_module")
        exec("from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution", late.__dict__)
        monkeypatch.setitem(sys.modules, late.__name__, late)
        assert late.DiagonalGaussianDistribution is Fused
    finally:
        fastvae_diffusers.revert()
    # ... and revert() restores it too
    assert late.DiagonalGaussianDistribution is DiagonalGaussianDistribution
    assert not fastvae_diffusers.is_applied() and not holders(Fused)
    assert type(model.encode(x).latent_dist) is DiagonalGaussianDistribution


def test_apply_with_fastvae_semantics_and_a_bad_choice():
    fastvae_diffusers.apply(semantics="fastvae")
    try:
        posterior = tiny_autoencoder_kl().half().encode(images().half()).latent_dist
        assert posterior.semantics == "fastvae" and posterior.kl().dtype == torch.float32
    finally:
        fastvae_diffusers.revert()
    with pytest.raises(ValueError, match="semantics must be one of 'fastvae', 'diffusers'; got 'fast'"):
        fastvae_diffusers.apply(semantics="fast")
    assert not fastvae_diffusers.is_applied()


# ---- patched vs unpatched: values and gradients -----------------------------------

def forward_and_grads(model, x, sample_posterior):
    x = x.clone().requires_grad_()
    posterior = model.encode(x).latent_dist
    out = model(x, sample_posterior=sample_posterior, generator=torch.Generator().manual_seed(3)).sample
    loss = diffusers_train_loss(out, x, posterior)
    params = [p for _, p in sorted(model.named_parameters())]
    grads = torch.autograd.grad(loss, params + [x])
    return posterior, out, loss, grads


@pytest.mark.parametrize("mode", ["plain", "slicing", "tiling"])
@pytest.mark.parametrize("sample_posterior", [True, False])
def test_patched_model_matches_unpatched_values_and_gradients(mode, sample_posterior, fastvae_noise,
                                                              one_thread):
    model = tiny_autoencoder_kl()
    x = images(n=3, size=24 if mode == "tiling" else 16)
    if mode == "slicing":
        model.enable_slicing()
    if mode == "tiling":
        model.enable_tiling()
    post0, out0, loss0, grads0 = forward_and_grads(model, x, sample_posterior)
    fastvae_diffusers.apply()
    try:
        post1, out1, loss1, grads1 = forward_and_grads(model, x, sample_posterior)
    finally:
        fastvae_diffusers.revert()
    assert type(post0) is DiagonalGaussianDistribution and type(post1) is Fused
    for name in ("mean", "logvar", "std", "var"):  # the same formulas, bit for bit
        assert torch.equal(getattr(post0, name), getattr(post1, name)), name
    assert torch.equal(post0.mode(), post1.mode())
    torch.testing.assert_close(post1.kl(), post0.kl(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post1.nll(post0.mean), post0.nll(post0.mean), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads1, grads0)


def assert_grads_close(got, want):
    # an absolute floor on the scale of the largest gradient: some gradients are zero in exact
    # arithmetic (a conv bias feeding a GroupNorm) and only rounding noise in float32
    scale = max(w.abs().max().item() for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * scale)


def test_patched_video_autoencoder_matches_unpatched(fastvae_noise, one_thread):
    # a 5-D posterior: diffusers' kl sums dims 1-3 and leaves (N, W); so does the patched one
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                             temperal_downsample=[False])
    x = torch.randn(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for patch in (False, True):
        if patch:
            fastvae_diffusers.apply()
        try:
            posterior = model.encode(x).latent_dist
            kl = posterior.kl()
            z = posterior.sample(generator=torch.Generator().manual_seed(2))
            loss = z.square().sum() + kl.sum()
            grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True,
                                        materialize_grads=True)  # the decoder is unused
            results.append((type(posterior), kl, z, grads))
        finally:
            fastvae_diffusers.revert()
    (cls0, kl0, z0, g0), (cls1, kl1, z1, g1) = results
    assert cls0 is DiagonalGaussianDistribution and cls1 is Fused
    assert kl1.shape == kl0.shape == (2, 8)
    torch.testing.assert_close(kl1, kl0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z1, z0, rtol=1e-5, atol=1e-6)
    assert_grads_close(g1, g0)


def train(model, batches, loss_fn, steps=20):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1234)  # the noise of posterior.sample() comes from the default generator
    losses = []
    for step in range(steps):
        targets = batches[step % len(batches)]
        posterior = model.encode(targets).latent_dist
        latents = posterior.sample()
        reconstructions = model.decode(latents).sample
        loss = loss_fn(reconstructions, targets, posterior)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model


def fastvae_loss(reconstructions, targets, posterior):
    """The same loss with fastvae's fused vae_loss (README's diffusers section)."""
    return fastvae.vae_loss(reconstructions, targets, posterior.mean, posterior.logvar, recon="mse",
                            reduction="batchmean", beta=KL_SCALE)


def test_twenty_training_steps_patched_follow_the_unpatched_loss_curve(fastvae_noise, one_thread):
    start = tiny_autoencoder_kl(seed=5)
    batches = [images(n=4, seed=s) for s in range(3)]
    unpatched, model0 = train(copy.deepcopy(start), batches, diffusers_train_loss)
    fastvae_diffusers.apply()
    try:
        same_script, model1 = train(copy.deepcopy(start), batches, diffusers_train_loss)
        with_vae_loss, model2 = train(copy.deepcopy(start), batches, fastvae_loss)
    finally:
        fastvae_diffusers.revert()
    assert unpatched[-1] < 0.8 * unpatched[0]  # it trains
    # float rounding only (measured: 1.6e-6 relative at most; another noise stream: 4e-2)
    torch.testing.assert_close(same_script, unpatched, rtol=2e-5, atol=0)
    torch.testing.assert_close(with_vae_loss, unpatched, rtol=2e-5, atol=0)
    # the trained models compute the same function (not every weight is comparable: a conv bias
    # feeding a GroupNorm has a zero gradient in exact arithmetic, and Adam turns the float32
    # rounding noise there into full-size steps, which the GroupNorm then removes again)
    held_out = images(n=2, seed=99)
    with torch.no_grad():
        want = model0(held_out).sample
        for model in (model1, model2):
            torch.testing.assert_close(model(held_out).sample, want, rtol=1e-3, atol=1e-4)


def test_learned_logvar_nll_recipe_is_latent_diffusions_loss_plus_log_2(patched, one_thread):
    """The README's learned-logvar step: recon="laplace" with latent diffusion's learned scalar
    logvar is LDM's nll_loss (|x - x_hat| / exp(logvar) + logvar, summed per sample, over the
    batch) + log 2 per pixel, with the same gradients for the model and for logvar."""
    model = tiny_autoencoder_kl(seed=3)
    targets = images(n=3, seed=4)
    ldm_logvar = torch.nn.Parameter(torch.tensor(0.3))

    def step(loss_of):
        model.zero_grad()
        ldm_logvar.grad = None
        posterior = model.encode(targets).latent_dist
        reconstructions = model.decode(posterior.sample(generator=torch.Generator().manual_seed(7))).sample
        loss = loss_of(reconstructions, posterior)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (*model.parameters(), ldm_logvar)]

    def ldm_loss(reconstructions, posterior):
        rec_loss = torch.abs(targets.contiguous() - reconstructions.contiguous())
        nll_loss = rec_loss / torch.exp(ldm_logvar) + ldm_logvar
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = torch.sum(posterior.kl()) / targets.shape[0]
        return nll_loss + KL_SCALE * kl_loss

    def fused_loss(reconstructions, posterior):
        return fastvae.vae_loss(reconstructions, targets, posterior.mean, posterior.logvar,
                                recon="laplace", obs_logvar=ldm_logvar, reduction="batchmean",
                                beta=KL_SCALE)

    want, want_grads = step(ldm_loss)
    got, got_grads = step(fused_loss)
    pixels_per_sample = targets[0].numel()
    torch.testing.assert_close(got, want + pixels_per_sample * math.log(2.0), rtol=1e-5, atol=0)
    assert want_grads[-1].abs() > 0  # logvar is learned through the loss
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ---- compatibility with diffusers' DiagonalGaussianDistribution ---------------------

def both(parameters, **kwargs):
    return DiagonalGaussianDistribution(parameters, **kwargs), Fused(parameters, **kwargs)


def moments(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_kl_against_either_class_and_a_broadcast_prior():
    theirs, ours = both(moments((3, 8, 4, 4), 0))
    other_theirs, other_ours = both(moments((3, 8, 4, 4), 1))
    want = theirs.kl(other_theirs)
    for got in (ours.kl(other_theirs), ours.kl(other_ours), theirs.kl(other_ours)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    prior_theirs, prior_ours = both(moments((1, 8, 4, 4), 2))  # one prior for the batch
    torch.testing.assert_close(ours.kl(prior_ours), theirs.kl(prior_theirs), rtol=1e-5, atol=1e-5)


def test_nll_with_dims_and_a_broadcast_sample():
    theirs, ours = both(moments((3, 8, 4, 4), 3))
    sample = moments((1, 4, 4, 4), 4)
    for dims in ([1, 2, 3], [1], (2, 3)):
        torch.testing.assert_close(ours.nll(sample, dims=dims), theirs.nll(sample, dims=dims),
                                   rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.nll(sample), theirs.nll(sample), rtol=1e-5, atol=1e-4)


def test_half_precision_results_in_the_input_dtype_and_closer_to_the_exact_value():
    p = moments((4, 8, 16, 16), 5, torch.float16) * 2
    theirs, ours = both(p)
    m, lv = p.double().chunk(2, dim=1)
    exact = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    got_theirs, got_ours = theirs.kl(), ours.kl()
    assert got_theirs.dtype == got_ours.dtype == torch.float16
    err_theirs = (got_theirs.double() - exact).abs().max().item()
    err_ours = (got_ours.double() - exact).abs().max().item()
    # ours: float32 sums rounded once to float16 (half an ulp: 2^-11 relative)
    assert err_ours <= exact.abs().max().item() * 2**-11
    assert err_ours <= err_theirs
    assert ours.sample().dtype == theirs.sample().dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_built_under_an_autocast_that_widens_exp_the_results_are_float32(monkeypatch, dtype):
    """Under CUDA autocast diffusers' std and var (exp: float32 in CUDA's autocast lists)
    are float32, so are its sample, kl and nll; the patched posterior returned the
    parameters' half-precision dtype (a KL summed over a large latent overflows float16).
    The CPU's autocast keeps exp in bfloat16, so here the CPU stands in for CUDA: the same
    rule, then the values against the formulas on the half-precision parameters."""
    from fastvae import posterior

    monkeypatch.setattr(posterior, "_AUTOCAST_WIDENS_EXP", ("cuda", "cpu"))
    p = (moments((2, 8, 4, 4), 6, torch.float32) * 2).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = Fused(p)
    outside = Fused(p)
    z = ours.sample()
    assert ours.std.dtype == ours.var.dtype == z.dtype == ours.kl().dtype == torch.float32
    assert ours.nll(z).dtype == ours.kl(outside).dtype == torch.float32
    assert outside.kl().dtype == outside.sample().dtype == outside.std.dtype == dtype
    m, lv = (t.double() for t in p.chunk(2, dim=1))
    lv = lv.clamp(-30.0, 20.0)
    torch.testing.assert_close(ours.kl().double(), 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3)),
                               rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours.std.double(), torch.exp(0.5 * lv), rtol=1e-6, atol=0)
    # z's noise, read back from a float32 z, is standard normal (not rounded to the half dtype)
    eps = (z.double() - m) / torch.exp(0.5 * lv)
    assert eps.abs().max() < 6 and not torch.equal(z, z.to(dtype).float())
    # autocast leaves float64 alone, and so does the rule
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide = Fused(p.double())
    assert wide.std.dtype == wide.sample().dtype == wide.kl().dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_under_cuda_autocast_the_dtypes_are_diffusers(dtype):
    conv = torch.nn.Conv2d(8, 8, 1).cuda()
    p = moments((2, 8, 4, 4), 7, torch.float32).cuda()
    with torch.autocast("cuda", dtype=dtype):
        h = conv(p)
        theirs, ours = DiagonalGaussianDistribution(h), Fused(h)
        z_theirs, z_ours = theirs.sample(), ours.sample()
        for a, b in ((theirs.std, ours.std), (theirs.var, ours.var), (z_theirs, z_ours),
                     (theirs.kl(), ours.kl()), (theirs.nll(z_theirs), ours.nll(z_ours))):
            assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("edit", ["mean", "logvar", "std", "var"])
def test_moments_written_in_place_are_read_as_diffusers_reads_them(fastvae_noise, edit):
    """A moment written in place (not assigned) after sample(): diffusers' results read
    the attribute as it now is; the fused posterior's kl() returned the KL its sample()
    had computed, and its sample() ignored an in-place std (temperature 0 still drew noise)."""
    p = moments((2, 8, 4, 4), 8)
    theirs, ours = DiagonalGaussianDistribution(p.clone()), Fused(p.clone())
    for post in (theirs, ours):
        post.sample()
        moment = getattr(post, edit)
        moment.mul_(0.0) if edit in ("mean", "std") else moment.fill_(0.25)
    torch.testing.assert_close(ours.kl(), theirs.kl())
    torch.testing.assert_close(ours.nll(p[:, :4]), theirs.nll(p[:, :4]))
    z = []
    for post in (theirs, ours):
        torch.manual_seed(3)
        z.append(post.sample())
    torch.testing.assert_close(z[1], z[0])


def test_switching_deterministic_after_construction_is_diffusers(fastvae_noise):
    """diffusers fixes std and var (zeros if deterministic) when built and reads
    ``deterministic`` again only in kl and nll."""
    p = moments((2, 8, 4, 4), 9)
    theirs, ours = both(p)  # built stochastic, switched on: still samples noise, kl is 0
    z = []
    for post in (theirs, ours):
        post.deterministic = True
        torch.manual_seed(4)
        z.append(post.sample())
    torch.testing.assert_close(z[1], z[0])
    assert not torch.equal(z[1], ours.mean)
    assert torch.equal(ours.kl().cpu(), theirs.kl().cpu())
    theirs = DiagonalGaussianDistribution(p.clone(), deterministic=True)
    ours = Fused(p.clone(), deterministic=True)
    for post in (theirs, ours):  # built deterministic, switched off: var stays 0
        post.deterministic = False
    assert torch.equal(ours.sample(), ours.mean)
    torch.testing.assert_close(ours.kl(), theirs.kl())
    # (var = 0: 0 / 0 where the sample is the mean; NaN in both)
    torch.testing.assert_close(ours.nll(p[:, :4]), theirs.nll(p[:, :4]), equal_nan=True)


def test_pickles_of_either_class_load_patched_as_what_they_were(patched):
    """A posterior pickled before apply() loads after it as diffusers' own (it was a
    fused posterior missing its state: mean raised AttributeError); a fused one pickles
    and loads as fused."""
    import pickle

    p = moments((2, 8, 4, 4), 10)
    fastvae_diffusers.revert()
    own = pickle.dumps(DiagonalGaussianDistribution(p))
    fastvae_diffusers.apply()
    loaded = pickle.loads(own)
    assert type(loaded) is DiagonalGaussianDistribution
    assert torch.equal(loaded.mean, p[:, :4])
    assert torch.equal(loaded.kl(), DiagonalGaussianDistribution(p).kl())
    fused = pickle.loads(pickle.dumps(Fused(p)))
    assert type(fused) is Fused and torch.equal(fused.kl(), Fused(p).kl())


def test_video_posterior_sums_dims_1_to_3_like_diffusers():
    theirs, ours = both(moments((2, 8, 3, 4, 5), 6))
    want = theirs.kl()
    assert ours.kl().shape == want.shape == (2, 5)
    torch.testing.assert_close(ours.kl(), want, rtol=1e-5, atol=1e-5)
    other_theirs, other_ours = both(moments((2, 8, 3, 4, 5), 7))
    torch.testing.assert_close(ours.kl(other_ours), theirs.kl(other_theirs), rtol=1e-5, atol=1e-5)


def test_deterministic_like_diffusers():
    theirs, ours = both(moments((3, 8, 4, 4), 8), deterministic=True)
    for name in ("std", "var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name))
    assert torch.equal(ours.sample(), theirs.sample())  # the mean
    for got, want in ((ours.kl(), theirs.kl()), (ours.nll(ours.mean), theirs.nll(theirs.mean))):
        assert got.shape == want.shape == (1,) and got.dtype == want.dtype and torch.equal(got, want)
    # against a deterministic other diffusers divides by a zero variance; fastvae says inf
    stochastic = Fused(moments((3, 8, 4, 4), 9))
    assert torch.isposinf(stochastic.kl(ours)).all()


def test_generator_list_in_the_model_forward(patched):
    model, x = tiny_autoencoder_kl(), images(n=3)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    out = model(x, sample_posterior=True, generator=gens).sample
    # sample 1 depends only on generator 1: alone, with a fresh generator of the same seed, it is the same
    alone = model(x[1:2], sample_posterior=True, generator=[torch.Generator().manual_seed(1)]).sample
    torch.testing.assert_close(out[1:2], alone, rtol=1e-4, atol=1e-5)  # batch 3 vs 1 convolutions
    # and not the sample of another generator
    assert not torch.allclose(out[0:1], model(x[0:1], sample_posterior=True,
                                              generator=torch.Generator().manual_seed(1)).sample)


def test_channels_last_sample_like_diffusers():
    p = moments((2, 8, 4, 4), 10).contiguous(memory_format=torch.channels_last)
    theirs, ours = both(p)
    for z in (theirs.sample(), ours.sample()):
        assert z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()


def test_fused_kl_reused_by_the_training_script_pattern(patched, monkeypatch):
    model, x = tiny_autoencoder_kl(), images()
    posterior = model.encode(x).latent_dist
    posterior.sample()
    from fastvae import posterior as posterior_module

    def no_second_pass(*args, **kwargs):
        raise AssertionError("kl() computed the KL again")

    monkeypatch.setattr(posterior_module, "kl_divergence", no_second_pass)
    kl = posterior.kl()  # the KL drawn with the sample (a copy of it: kl() returns a new tensor)
    assert torch.equal(kl, posterior._kl_of_sample[0]) and kl is not posterior._kl_of_sample[0]
    monkeypatch.undo()
    separate = GaussianPosterior(posterior.parameters, semantics="diffusers").kl()
    torch.testing.assert_close(kl, separate, rtol=1e-6, atol=1e-5)


# ---- torch.compile ------------------------------------------------------------------

def test_compiled_patched_training_step_is_one_graph(patched, one_thread):
    # aot_eager: dynamo captures the step and AOTAutograd traces forward and backward through
    # fastvae's custom ops (graph breaks are dynamo's business; inductor's C++ compile of the
    # whole model takes a minute on a shared CPU, and fastvae's ops under inductor are covered by
    # tests/test_ops.py). A torch.Generator passed into a compiled region is a graph break in
    # PyTorch itself, for diffusers' own randn_tensor as for fastvae: sample with the default generator.
    torch._dynamo.reset()
    model, x = tiny_autoencoder_kl(), images()

    def step(x):
        posterior = model.encode(x).latent_dist
        latents = posterior.sample()
        reconstructions = model.decode(latents).sample
        return diffusers_train_loss(reconstructions, x, posterior)

    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    torch.manual_seed(0)
    eager_loss = step(x)  # aot_eager draws the seed from the default generator as eager does
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, eager_grads)
