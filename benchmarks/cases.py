"""The benchmark cases, shared by the pytest-benchmark suite and ``benchmarks/gpu_check.py``.

A case is one operation at one size and dtype; each case runs under several
implementations side by side: ``fastvae`` and the baselines people would
otherwise write.

Stable API (other modules import these names; keep them):

    IMPLS = ("fastvae", "eager", "compile", "distributions")
    BASELINES = IMPLS[1:]
        eager          the formulas as people write them: F.mse_loss / F.l1_loss / F.binary_cross_entropy /
                       F.binary_cross_entropy_with_logits + -0.5 * sum(1 + logvar - mu^2 - exp(logvar));
                       z = mu + randn_like(std) * std with std = exp(0.5 * logvar)
        compile        the eager function under torch.compile (static shapes; each ``step``
                       call starts from ``torch._dynamo.reset()``, so its first call
                       compiles: time that call separately as the compile time)
        distributions  torch.distributions: Normal(mu, std).rsample() and
                       kl_divergence(Normal(mu, std), Normal(0, 1))
    OPS = ("loss_fwd", "loss_fwd_bwd", "kl_fwd_bwd", "reparam_fwd_bwd",
           "reparam_kl_fwd_bwd", "train_step")
    Size(name, x_shape, latent_shape)   a problem size; SIZES maps name -> Size:
        mnist_mlp   x 128x784,          latents 128x20
        cpu_target  x 512x12288,        latents 512x128   (issue 6's CPU target)
        ldm         x 8x3x256x256,      latents 8x4x32x32 (latent-diffusion autoencoder)
        gpu_target  x 64x3x256x256,     latents 64x4x32x32 (issue 3's GPU target)
        reparam     latents 4096x512 (x unused)
        conv64      x 64x3x64x64,       latents 64x4x8x8  (conv VAE training step)
        fixed_tiny  x 2x4,              latents 2x2       (nothing but the fixed cost per call)
        tiny_*      small versions of the above for CI (benchmarks run once as tests)
    LIKELIHOODS  the loss cases of issue 15's likelihoods, by case recon name:
        gaussian_learned  recon="gaussian" with a learned scalar obs_logvar (an input
                          with a gradient); eager 1/2 [(x_hat - x)^2 e^-s + s + log 2pi],
                          distributions Normal(x_hat, e^(s/2)).log_prob
        gaussian_optimal  obs_logvar="optimal"; eager with sigma^2 = mse(x_hat, x).detach(),
                          distributions Normal with that sigma
        laplace_learned   recon="laplace", a learned scalar; eager |x_hat - x| e^-s + s + log 2,
                          distributions Laplace(x_hat, e^s).log_prob
        continuous_bernoulli  eager BCE-with-logits - log(l / tanh(l / 2)),
                          distributions ContinuousBernoulli(logits=l).log_prob
    KL_VARIANTS  issue 15's KL controls, a Case's ``variant`` (kl_fwd_bwd, reparam_*):
        prior_learned     KL against a learned diagonal Gaussian prior of the latent's
                          trailing shape ((d,) for flat latents), gradients to it; eager
                          1/2 sum[plv - lv + (e^lv + (mu - pm)^2) e^-plv - 1],
                          distributions kl_divergence(Normal(mu, std), Normal(pm, pstd))
        prior_per_sample  the same with a per-sample (mu-shaped) conditional prior
        free_bits         kl_fwd_bwd: sum_k max(N K_k, N * FREE_BITS) (K_k the batch-mean
                          KL of latent element k); eager/distributions clamp_min of the
                          per-element KL's batch mean
        samples4          reparam_*: num_samples=4 (z of shape (4, *mu.shape)); eager
                          mu + std * randn(4, ...), distributions Normal.rsample((4,))
    LOSS_VARIANTS  a loss case's ``variant``:
        grad_scaled       the backward receives GRAD_SCALE (AMP's GradScaler) instead of
                          1 (loss.backward()), which the gradients computed in the forward
                          must then be scaled by
    a loss case's reduction: "sum" (the headline: loss.backward() of a summed loss,
        fastvae's cheapest backward), "none" (per sample) or "batchmean" (sum / N;
        eager: the summed loss divided by N)
    Case(op, size, dtype, recon=None, reduction="sum", variant=None)   frozen dataclass
        .id                  e.g. "loss_fwd_bwd/mse/sum/cpu_target/float32",
                             "kl_fwd_bwd/prior_learned/ldm/float32"
        .impls               the implementations this case runs ("fastvae" first)
        .inputs(device, seed=0)   fresh inputs: a dict of tensors (train_step: also model,
                             optimizer); the same values on every device
        .step(impl, inputs)  a zero-argument callable that runs one iteration (forward, and
                             backward where the op has one, via torch.autograd.grad so no
                             .grad accumulation is timed); no device synchronization inside
        .steps(impl, input_sets)  one such callable per input set, sharing one function
                             (one compilation); not for train_step
        .run(impl, inputs)   one iteration returning the tensors that are compared:
                             the values, then the gradients
        .check(impl, device) run ``impl`` and compare with a float64 reference computed from
                             the math; raises AssertionError on a mismatch
        .verify(impl, inputs, got)  the same comparison for outputs already computed by
                             ``run`` or (not train_step) by a ``step`` call
        .bytes_moved()       bytes that must move: each input read once, each output and
                             gradient written once (None for train_step)
    suite(device, full=True) -> list[Case]   the cases to run on this device; full=False
                             gives the small CI set (same ops, tiny sizes)
    fixed_cost_suite(device) -> list[Case]   the "fixed cost" group (issue 12): each op at
                             fixed_tiny and mnist_mlp, float32 and bfloat16, mse/sum losses;
                             small enough to run in full in CI too
    copy_bandwidth(device, nbytes=None, repeats=20) -> bytes/s, the median of
                             ``dst.copy_(src)`` counting read + write
    synchronize(device)      wait for the device (no-op on CPU)
"""

import dataclasses
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

IMPLS = ("fastvae", "eager", "compile", "distributions")
BASELINES = IMPLS[1:]
OPS = ("loss_fwd", "loss_fwd_bwd", "kl_fwd_bwd", "reparam_fwd_bwd", "reparam_kl_fwd_bwd",
       "train_step")
RECONS = ("mse", "l1", "bce", "bce_logits")
# case recon name -> (fastvae's recon, obs_logvar: "learned" is a scalar input with a gradient)
LIKELIHOODS = {"gaussian_learned": ("gaussian", "learned"),
               "gaussian_optimal": ("gaussian", "optimal"),
               "laplace_learned": ("laplace", "learned"),
               "continuous_bernoulli": ("continuous_bernoulli", None)}
LEARNED_OBS_LOGVAR = 0.3  # the learned scalar's value in the benchmarks
KL_VARIANTS = ("prior_learned", "prior_per_sample", "free_bits", "samples4")
LOSS_VARIANTS = ("grad_scaled",)
GRAD_SCALE = 2.0 ** 16  # torch.amp.GradScaler's initial scale
FREE_BITS = 0.567  # about the mean KL per element of the benchmark latents (E[mu^2 + e^lv - 1 - lv] / 2
# with mu ~ N(0, 1), lv ~ N(0, 1/4)): about half the elements are held at the floor
NUM_SAMPLES = 4


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    x_shape: tuple[int, ...] | None
    latent_shape: tuple[int, ...]


SIZES = {s.name: s for s in [
    Size("mnist_mlp", (128, 784), (128, 20)),
    Size("cpu_target", (512, 12288), (512, 128)),
    Size("ldm", (8, 3, 256, 256), (8, 4, 32, 32)),
    Size("gpu_target", (64, 3, 256, 256), (64, 4, 32, 32)),
    Size("reparam", None, (4096, 512)),
    Size("conv64", (64, 3, 64, 64), (64, 4, 8, 8)),
    # the fixed cost per call: tensors so small that only the call itself costs
    Size("fixed_tiny", (2, 4), (2, 2)),
    # CI: the same code paths at sizes that take milliseconds
    Size("tiny_flat", (8, 97), (8, 5)),
    Size("tiny_image", (2, 3, 16, 16), (2, 4, 4, 4)),
    Size("tiny_reparam", None, (64, 33)),
    Size("tiny_mnist_mlp", (16, 784), (16, 20)),
    Size("tiny_conv64", (4, 3, 64, 64), (4, 4, 8, 8)),
]}


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- inputs --------------------------------------------------------------

def _randn(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _loss_tensors(size, recon, gen):
    """x_hat, x, mu, logvar in float64 on the CPU: x_hat is a probability for
    bce, a logit for bce_logits, a value for mse and l1; x in [0, 1] for the bces."""
    if recon in ("mse", "l1") or recon in LIKELIHOODS and recon != "continuous_bernoulli":
        x_hat, x = _randn(size.x_shape, gen), _randn(size.x_shape, gen)
    else:
        x_hat = _randn(size.x_shape, gen) * 2.0
        x = torch.rand(size.x_shape, generator=gen, dtype=torch.float64)
        if recon == "bce":
            x_hat = torch.sigmoid(x_hat)
    return x_hat, x, *_latents(size, gen)


def _latents(size, gen):
    return _randn(size.latent_shape, gen), _randn(size.latent_shape, gen) * 0.5


def _leaf(t, device, dtype, requires_grad):
    return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)


# ---- eager formulas, as people write them ----------------------------------

_RECON_EAGER = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "bce": F.binary_cross_entropy,
    "bce_logits": F.binary_cross_entropy_with_logits,
}


def _per_sample(t):
    return t.flatten(1).sum(1)


def _batchmean(total, reduction, batch):
    """A summed loss, divided by the batch size for "batchmean" (as written by hand)."""
    return total / batch if reduction == "batchmean" else total


def eager_kl(mu, logvar, reduction):
    """-1/2 sum(1 + logvar - mu^2 - exp(logvar)), the VAE paper's formula."""
    terms = 1 + logvar - mu.pow(2) - logvar.exp()
    if reduction != "none":
        return _batchmean(-0.5 * torch.sum(terms), reduction, mu.shape[0])
    return -0.5 * _per_sample(terms)


def distributions_kl(mu, logvar, reduction):
    q = D.Normal(mu, torch.exp(0.5 * logvar))
    prior = D.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = D.kl_divergence(q, prior)
    return _reduced_terms(kl, reduction)


def _reduced_terms(terms, reduction):
    if reduction == "none":
        return _per_sample(terms)
    return _batchmean(terms.sum(), reduction, terms.shape[0])


def _cb_log_norm_eager(logits):
    """log C(l) = log(l / tanh(l / 2)), its limit 2 near l = 0, as written by hand."""
    near = logits.abs() < 1e-3
    safe = torch.where(near, torch.ones_like(logits), logits)
    return torch.where(near, 2.0 + logits * logits / 6.0, safe / torch.tanh(safe / 2)).log()


def eager_likelihood(x_hat, x, recon, reduction, obs_logvar=None):
    """The new likelihoods (LIKELIHOODS) as people write them."""
    if recon == "continuous_bernoulli":
        terms = F.binary_cross_entropy_with_logits(x_hat, x, reduction="none") \
            - _cb_log_norm_eager(x_hat)
        return _reduced_terms(terms, reduction)
    if recon == "gaussian_optimal":
        var = F.mse_loss(x_hat, x).detach()
        terms = 0.5 * ((x_hat - x) ** 2 / var + torch.log(var) + math.log(2 * math.pi))
    elif recon == "gaussian_learned":
        terms = 0.5 * ((x_hat - x) ** 2 * torch.exp(-obs_logvar) + obs_logvar
                       + math.log(2 * math.pi))
    else:
        terms = (x_hat - x).abs() * torch.exp(-obs_logvar) + obs_logvar + math.log(2.0)
    return _reduced_terms(terms, reduction)


def distributions_likelihood(x_hat, x, recon, reduction, obs_logvar=None):
    if recon == "continuous_bernoulli":
        dist = D.ContinuousBernoulli(logits=x_hat)
    elif recon == "gaussian_optimal":
        dist = D.Normal(x_hat, F.mse_loss(x_hat, x).detach().sqrt())
    elif recon == "gaussian_learned":
        dist = D.Normal(x_hat, torch.exp(0.5 * obs_logvar))
    else:
        dist = D.Laplace(x_hat, torch.exp(obs_logvar))
    return _reduced_terms(-dist.log_prob(x), reduction)


def eager_recon(x_hat, x, recon, reduction):
    if reduction != "none":
        return _batchmean(_RECON_EAGER[recon](x_hat, x, reduction="sum"), reduction,
                          x_hat.shape[0])
    return _per_sample(_RECON_EAGER[recon](x_hat, x, reduction="none"))


def eager_reparameterize(mu, logvar):
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + eps * std


def distributions_reparameterize(mu, logvar):
    return D.Normal(mu, torch.exp(0.5 * logvar)).rsample()


def _loss_fn(impl, recon, reduction):
    """(x_hat, x, mu, logvar[, obs_logvar]) -> loss."""
    if impl == "fastvae":
        import fastvae

        fastvae_recon, obs = LIKELIHOODS.get(recon, (recon, None))
        obs_fixed = "optimal" if obs == "optimal" else None
        return lambda x_hat, x, mu, logvar, obs_logvar=obs_fixed: fastvae.vae_loss(
            x_hat, x, mu, logvar, recon=fastvae_recon, reduction=reduction, obs_logvar=obs_logvar)
    kl = distributions_kl if impl == "distributions" else eager_kl
    if recon in LIKELIHOODS:
        likelihood = distributions_likelihood if impl == "distributions" else eager_likelihood

        def loss(x_hat, x, mu, logvar, obs_logvar=None):
            return likelihood(x_hat, x, recon, reduction, obs_logvar) + kl(mu, logvar, reduction)

        return _compiled(loss) if impl == "compile" else loss

    def loss(x_hat, x, mu, logvar):
        return eager_recon(x_hat, x, recon, reduction) + kl(mu, logvar, reduction)

    return _compiled(loss) if impl == "compile" else loss


def _kl_fn(impl):
    if impl == "fastvae":
        import fastvae

        return lambda mu, logvar: fastvae.kl_divergence(mu, logvar)
    if impl == "distributions":
        return lambda mu, logvar: distributions_kl(mu, logvar, "sum")
    fn = lambda mu, logvar: eager_kl(mu, logvar, "sum")  # noqa: E731
    return _compiled(fn) if impl == "compile" else fn


def _reparam_fn(impl, with_kl):
    """(mu, logvar) -> z, or (z, per-sample kl) when ``with_kl``."""
    if impl == "fastvae":
        import fastvae

        return fastvae.sample_and_kl if with_kl else fastvae.reparameterize
    sample = distributions_reparameterize if impl == "distributions" else eager_reparameterize
    kl = distributions_kl if impl == "distributions" else eager_kl

    def fn(mu, logvar):
        z = sample(mu, logvar)
        return (z, kl(mu, logvar, "none")) if with_kl else z

    return _compiled(fn) if impl == "compile" else fn


def _variant_kl_fn(impl, variant):
    """(mu, logvar[, prior_mu, prior_logvar]) -> the summed KL of a KL_VARIANTS case."""
    if impl == "fastvae":
        import fastvae

        if variant == "free_bits":
            return lambda mu, logvar: fastvae.kl_divergence(mu, logvar, free_bits=FREE_BITS)
        return lambda mu, logvar, pm, plv: fastvae.kl_divergence(mu, logvar, prior_mu=pm,
                                                                 prior_logvar=plv)
    if variant == "free_bits":
        terms = (lambda mu, logvar: D.kl_divergence(
            D.Normal(mu, torch.exp(0.5 * logvar)),
            D.Normal(torch.zeros_like(mu), torch.ones_like(mu)))) if impl == "distributions" \
            else (lambda mu, logvar: -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()))

        def fn(mu, logvar):
            return terms(mu, logvar).mean(0).clamp_min(FREE_BITS).sum() * mu.shape[0]
    elif impl == "distributions":
        def fn(mu, logvar, pm, plv):
            return D.kl_divergence(D.Normal(mu, torch.exp(0.5 * logvar)),
                                   D.Normal(pm, torch.exp(0.5 * plv))).sum()
    else:
        def fn(mu, logvar, pm, plv):
            return 0.5 * torch.sum(plv - logvar + (logvar.exp() + (mu - pm).pow(2))
                                   * torch.exp(-plv) - 1)
    return _compiled(fn) if impl == "compile" else fn


def _samples_fn(impl, with_kl):
    """(mu, logvar) -> NUM_SAMPLES samples (and the per-sample KL)."""
    if impl == "fastvae":
        import fastvae

        if with_kl:
            return lambda mu, logvar: fastvae.sample_and_kl(mu, logvar, num_samples=NUM_SAMPLES)
        return lambda mu, logvar: fastvae.reparameterize(mu, logvar, num_samples=NUM_SAMPLES)
    kl = distributions_kl if impl == "distributions" else eager_kl

    def fn(mu, logvar):
        std = torch.exp(0.5 * logvar)
        if impl == "distributions":
            z = D.Normal(mu, std).rsample((NUM_SAMPLES,))
        else:
            z = mu + std * torch.randn((NUM_SAMPLES, *mu.shape), dtype=mu.dtype, device=mu.device)
        return (z, kl(mu, logvar, "none")) if with_kl else z

    return _compiled(fn) if impl == "compile" else fn


def _compiled(fn):
    # A fresh Dynamo cache per case: the cases share code objects, and a warm
    # cache would hit the recompile limit and fall back to eager silently.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# ---- small VAEs for the training-step cases ---------------------------------

class MLPVAE(nn.Module):
    """The PyTorch examples' MNIST VAE: 784 -> 400 -> (20, 20) -> 400 -> 784."""

    def __init__(self, data_dim=784, hidden=400, latent=20):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU())
        self.to_mu, self.to_logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(),
                                     nn.Linear(hidden, data_dim), nn.Sigmoid())

    def encode(self, x):
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)


class ConvVAE(nn.Module):
    """A small 64x64 conv VAE with a 4x8x8 latent map, latent-diffusion style."""

    def __init__(self, channels=3, width=32, latent_channels=4):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(4 * w, 2 * latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 4 * w, 1), nn.SiLU(),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(w, channels, 4, 2, 1))

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)


_TRAIN_MODELS = {"mnist_mlp": (MLPVAE, "bce"), "conv64": (ConvVAE, "mse")}


def _train_model_kind(size):
    return size.name.removeprefix("tiny_")


def _vae_step_loss(impl, recon):
    """(model, x, eps) -> loss of one VAE forward. ``eps`` None: each
    implementation draws its own noise; a tensor: that noise is used (checks)."""
    if impl == "fastvae":
        import fastvae

        def loss(model, x, eps):
            mu, logvar = model.encode(x)
            z = fastvae.reparameterize(mu, logvar) if eps is None else mu + eps * torch.exp(0.5 * logvar)
            return fastvae.vae_loss(model.decoder(z), x, mu, logvar, recon=recon)
        return loss
    sample = distributions_reparameterize if impl == "distributions" else eager_reparameterize
    kl = distributions_kl if impl == "distributions" else eager_kl

    def loss(model, x, eps):
        mu, logvar = model.encode(x)
        z = sample(mu, logvar) if eps is None else mu + eps * torch.exp(0.5 * logvar)
        return eager_recon(model.decoder(z), x, recon, "sum") + kl(mu, logvar, "sum")

    return _compiled(loss) if impl == "compile" else loss


# ---- cases -------------------------------------------------------------------

_TOLERANCE = {  # rtol per output dtype; atol is rtol times the mean magnitude
    torch.float64: 1e-7, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3,
}


def _correlation(a, b):
    """Pearson correlation of two same-shaped float64 tensors, flattened."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _assert_close(name, got, want, extra=None, loose=False):
    """|got - want| <= rtol |want| + atol (+ ``extra``, an elementwise allowance).
    ``loose``: 4x the tolerance, for baselines that round every intermediate to
    half precision (fastvae computes in float32 and is held to the tight one)."""
    rtol = max(_TOLERANCE[got.dtype], _TOLERANCE[torch.float32]) * (4 if loose else 1)
    largest = torch.finfo(got.dtype).max
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    # an exact value beyond the output dtype's range rounds to inf in it (float16 tops out
    # at 65504: an eager float16 summed loss, a BCE gradient at a near-0 probability)
    want = torch.where(want.abs() > largest, want.sign() * math.inf, want)
    finite = want[want.isfinite()]
    atol = rtol * float(finite.abs().mean() if finite.numel() else 0.0) + 1e-12
    if extra is None:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        return
    excess = (got - want).abs() - (rtol * want.abs() + atol + extra)
    worst = int(excess.flatten().argmax())
    assert float(excess.flatten()[worst]) <= 0, (
        f"{name}: element {worst} is {float(got.flatten()[worst])}, expected "
        f"{float(want.flatten()[worst])} (rtol {rtol:g}, atol {atol:g}, "
        f"allowance {float(extra.flatten()[worst]):g})")


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    size: Size
    dtype: torch.dtype = torch.float32
    recon: str | None = None
    reduction: str = "sum"
    variant: str | None = None  # one of KL_VARIANTS (latent ops), LOSS_VARIANTS (losses)

    @property
    def id(self):
        parts = [self.op]
        if self.recon is not None:
            parts += [self.recon, self.reduction]
        if self.variant is not None:
            parts.append(self.variant)
        return "/".join(parts + [self.size.name, _dtype_name(self.dtype)])

    @property
    def impls(self):
        return IMPLS

    # -- inputs --
    def inputs(self, device, seed=0):
        device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        grad = self.op != "loss_fwd"
        if self.op.startswith("loss"):
            x_hat, x, mu, logvar = _loss_tensors(self.size, self.recon, gen)
            out = dict(x_hat=_leaf(x_hat, device, self.dtype, grad),
                       x=_leaf(x, device, self.dtype, False),
                       mu=_leaf(mu, device, self.dtype, grad),
                       logvar=_leaf(logvar, device, self.dtype, grad))
            if LIKELIHOODS.get(self.recon, (None, None))[1] == "learned":
                # a learned scalar is a float32 parameter, whatever the data's dtype
                out["obs_logvar"] = torch.tensor(LEARNED_OBS_LOGVAR, device=device,
                                                 requires_grad=grad)
        elif self.op == "train_step":
            model_cls, _ = _TRAIN_MODELS[_train_model_kind(self.size)]
            torch.manual_seed(seed)
            model = model_cls().to(device)
            x = torch.rand(self.size.x_shape, generator=gen, dtype=torch.float64)
            out = dict(model=model, x=x.to(device, torch.float32),
                       optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                       eps=_randn(self.size.latent_shape, gen).to(device, torch.float32))
        else:
            mu, logvar = _latents(self.size, gen)
            out = dict(mu=_leaf(mu, device, self.dtype, True),
                       logvar=_leaf(logvar, device, self.dtype, True))
            if self.variant in ("prior_learned", "prior_per_sample"):
                shape = self.size.latent_shape[1:] if self.variant == "prior_learned" \
                    else self.size.latent_shape
                out["prior_mu"] = _leaf(_randn(shape, gen) * 0.5, device, self.dtype, True)
                out["prior_logvar"] = _leaf(_randn(shape, gen) * 0.5, device, self.dtype, True)
        if self.op.startswith("reparam"):
            # the upstream gradients a backward receives
            samples = (NUM_SAMPLES,) if self.variant == "samples4" else ()
            out["grad_z"] = _randn(samples + self.size.latent_shape, gen).to(device, self.dtype)
            out["grad_kl"] = _randn(self.size.latent_shape[:1], gen).to(device, torch.float32)
        return out

    # -- one iteration --
    def step(self, impl, inputs):
        """A zero-argument callable running one iteration of ``impl``."""
        if impl not in self.impls:
            raise ValueError(f"impl must be one of {self.impls}, got {impl!r}")
        if self.op == "train_step":
            return self._train_step(impl, inputs)
        run = self._runner(impl, inputs)
        return lambda: run()

    def steps(self, impl, input_sets):
        """One zero-argument callable per input set, all sharing one function (for
        ``compile``: one compilation), e.g. to rotate through more data than the
        GPU's L2 cache holds. Not for train_step."""
        if self.op == "train_step" or impl not in self.impls:
            raise ValueError(f"steps() takes an impl of {self.impls} and no train_step case")
        fn = self._function(impl)
        return [self._runner(impl, inputs, fn) for inputs in input_sets]

    def run(self, impl, inputs):
        """One iteration; the compared tensors: values, then gradients."""
        if self.op == "train_step":
            return self._train_grads(impl, inputs)
        return list(self._runner(impl, inputs)())

    def _function(self, impl):
        if self.op.startswith("loss"):
            return _loss_fn(impl, self.recon, self.reduction)
        if self.op == "kl_fwd_bwd":
            return _kl_fn(impl) if self.variant is None else _variant_kl_fn(impl, self.variant)
        if self.variant == "samples4":
            return _samples_fn(impl, self.op == "reparam_kl_fwd_bwd")
        return _reparam_fn(impl, self.op == "reparam_kl_fwd_bwd")

    def _runner(self, impl, inp, fn=None):
        if fn is None:
            fn = self._function(impl)
        if self.op.startswith("loss"):
            learned = (inp["obs_logvar"],) if "obs_logvar" in inp else ()
            args = (inp["x_hat"], inp["x"], inp["mu"], inp["logvar"], *learned)
            wrt = (inp["x_hat"], inp["mu"], inp["logvar"], *learned)
            if self.op == "loss_fwd":
                return lambda: (fn(*args),)

            upstream = GRAD_SCALE if self.variant == "grad_scaled" else 1.0

            def fwd_bwd():
                loss = fn(*args)
                # made on the loss's device, as loss.backward() does: a CPU tensor
                # here would put a blocking host-to-device copy into every timed step
                # (and cannot be captured in a CUDA graph)
                return (loss, *torch.autograd.grad(loss, wrt, torch.full_like(loss, upstream)))
            return fwd_bwd
        wrt = (inp["mu"], inp["logvar"])
        if "prior_mu" in inp:
            wrt += (inp["prior_mu"], inp["prior_logvar"])
        if self.op == "kl_fwd_bwd":
            def kl_fwd_bwd():
                kl = fn(*wrt)
                return (kl, *torch.autograd.grad(kl, wrt))
            return kl_fwd_bwd
        with_kl = self.op == "reparam_kl_fwd_bwd"

        def reparam_fwd_bwd():
            out = fn(*wrt)
            outs, grads = ((out[0], out[1]), (inp["grad_z"], inp["grad_kl"])) if with_kl \
                else ((out,), (inp["grad_z"],))
            grads = tuple(g.to(o.dtype) for g, o in zip(grads, outs))
            return (*outs, *torch.autograd.grad(outs, wrt, grads))
        return reparam_fwd_bwd

    def _train_step(self, impl, inp):
        model, x, opt = inp["model"], inp["x"], inp["optimizer"]
        loss_fn = _vae_step_loss(impl, _TRAIN_MODELS[_train_model_kind(self.size)][1])

        def train_step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, None)
            loss.backward()
            opt.step()
            return loss
        return train_step

    def _train_grads(self, impl, inp):
        model, x = inp["model"], inp["x"]
        loss = _vae_step_loss(impl, _TRAIN_MODELS[_train_model_kind(self.size)][1])(
            model, x, inp["eps"])
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    # -- correctness --
    def check(self, impl, device):
        """Compare ``impl`` with a float64 reference written from the math; sampling
        also draws fresh noise on a second call."""
        inputs = self.inputs(device)
        got = self.run(impl, inputs)
        self.verify(impl, inputs, got)
        if self.op.startswith("reparam"):
            again = self.run(impl, inputs)
            assert not torch.equal(got[0], again[0]), f"{self.id} {impl}: two calls drew the same z"

    def verify(self, impl, inputs, got):
        """Compare ``got`` = ``run(impl, inputs)`` (or, except for train_step, the
        result of a ``step(impl, inputs)`` call) with the float64 reference."""
        got = list(got)
        if self.op == "train_step":
            # the reference: the eager formulas on a float64 copy of the model, same noise
            ref_inputs = {k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()}
            ref_inputs["model"] = inputs["model"].double()
            want = self.run("eager", ref_inputs)
            names = ["loss"] + [f"grad {n}" for n, _ in inputs["model"].named_parameters()]
            for name, g, w in zip(names, got, want):
                _assert_close(f"{self.id} {impl} {name}", g.float(), w)
            return
        ref = self._reference(inputs, got)
        names = self._output_names()
        assert len(got) == len(ref) == len(names), (len(got), len(ref))
        # The baselines' half-precision gradients of issue 15's likelihoods go through
        # half-precision intermediates (a learned scalar's gradient is a sum of bf16
        # terms that cancel; CB's normaliser cancels near l = 0): off by more than any
        # fixed tolerance. Only their values are compared; fastvae's gradients always are.
        # So are free bits': a half-precision batch mean can land on the other side of
        # the floor than the exact one, which switches that element's gradient off or on.
        values_only = (impl != "fastvae" and (self.recon in LIKELIHOODS
                                              or self.variant == "free_bits")
                       and self.dtype in (torch.float16, torch.bfloat16))
        # torch.distributions' continuous Bernoulli normaliser, atanh(1 - 2p) / (1 - 2p)
        # outside its Taylor window (0.499, 0.501) in p, cancels in float32 near l = 0: its
        # gradient was off by up to 3.4e-3 at the ldm size (measured), unlike its value
        values_only = values_only or (impl == "distributions" and self.recon == "continuous_bernoulli")
        for name, g, w in zip(names, got, ref):
            if w is None:  # no value reference (z: its noise is checked in _reference)
                continue
            if values_only and name.startswith("grad"):
                continue
            assert g.shape == w.shape, f"{self.id} {impl} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
            extra = None
            if self.op.startswith("reparam") and name == "grad logvar":
                # the reference reads the noise back from z, which was rounded to
                # z's dtype: allow that rounding, times d(grad)/dz = grad_z / 2
                z = got[0].detach().double()
                extra = 0.5 * inputs["grad_z"].double().abs() * z.abs() * torch.finfo(got[0].dtype).eps
                if self.variant == "samples4":
                    extra = extra.sum(0)
            _assert_close(f"{self.id} {impl} {name}", g, w, extra, loose=impl != "fastvae")

    def _output_names(self):
        if self.op == "loss_fwd":
            return ["loss"]
        if self.op.startswith("loss"):
            learned = LIKELIHOODS.get(self.recon, (None, None))[1] == "learned"
            return ["loss", "grad x_hat", "grad mu", "grad logvar"] + (
                ["grad obs_logvar"] if learned else [])
        if self.op == "kl_fwd_bwd":
            prior = ["grad prior_mu", "grad prior_logvar"] if self.variant in (
                "prior_learned", "prior_per_sample") else []
            return ["kl", "grad mu", "grad logvar"] + prior
        if self.op == "reparam_fwd_bwd":
            return ["z", "grad mu", "grad logvar"]
        return ["z", "kl", "grad mu", "grad logvar"]

    def _reference(self, inp, got):
        """float64 values and gradients from the formulas, written out by hand."""
        inp = {k: v.detach() for k, v in inp.items()}
        got = [g.detach() for g in got]
        mu, lv = inp["mu"].double(), inp["logvar"].double()
        kl_terms = 0.5 * (mu * mu + lv.exp() - 1.0 - lv)
        kl_rows = _per_sample(kl_terms)
        if self.op.startswith("loss"):
            x_hat, x = inp["x_hat"].double(), inp["x"].double()
            grad_obs = []
            if self.recon in ("gaussian_learned", "gaussian_optimal"):
                diff = x_hat - x
                log_var = LEARNED_OBS_LOGVAR if self.recon == "gaussian_learned" \
                    else math.log(float((diff ** 2).mean()))
                var = math.exp(log_var)
                terms = 0.5 * (diff ** 2 / var + log_var + math.log(2 * math.pi))
                grad = diff / var
                if self.recon == "gaussian_learned":  # d/ds, summed over every element
                    grad_obs = [(0.5 * (1.0 - diff ** 2 / var)).sum()]
            elif self.recon == "laplace_learned":
                diff, b = x_hat - x, math.exp(LEARNED_OBS_LOGVAR)
                terms = diff.abs() / b + LEARNED_OBS_LOGVAR + math.log(2.0)
                grad = diff.sign() / b
                grad_obs = [(1.0 - diff.abs() / b).sum()]
            elif self.recon == "continuous_bernoulli":
                # -log CB(x | l) = BCE-with-logits - log(l / tanh(l / 2)); d/dl =
                # sigmoid(l) - x - (1/l - 1/sinh(l)) (random logits are never 0)
                terms = torch.clamp(x_hat, min=0) - x_hat * x + torch.log1p(torch.exp(-x_hat.abs())) \
                    - torch.log(x_hat / torch.tanh(x_hat / 2))
                grad = torch.sigmoid(x_hat) - x - (1.0 / x_hat - 1.0 / torch.sinh(x_hat))
            elif self.recon == "mse":
                terms, grad = (x_hat - x) ** 2, 2.0 * (x_hat - x)
            elif self.recon == "l1":  # (random inputs: x_hat == x never happens)
                terms, grad = (x_hat - x).abs(), (x_hat - x).sign()
            elif self.recon == "bce":
                terms = -(x * x_hat.log().clamp_min(-100) + (1 - x) * (1 - x_hat).log().clamp_min(-100))
                grad = (x_hat - x) / (x_hat * (1 - x_hat)).clamp_min(1e-12)
            else:
                terms = torch.clamp(x_hat, min=0) - x_hat * x + torch.log1p(torch.exp(-x_hat.abs()))
                grad = torch.sigmoid(x_hat) - x
            rows = _per_sample(terms) + kl_rows
            batch = rows.shape[0]
            loss = rows if self.reduction == "none" else rows.sum() / (
                batch if self.reduction == "batchmean" else 1)
            if self.op == "loss_fwd":
                return [loss]
            # d(upstream . loss): the reduction's 1/N and the upstream gradient
            w = (1.0 / batch if self.reduction == "batchmean" else 1.0) \
                * (GRAD_SCALE if self.variant == "grad_scaled" else 1.0)
            return [loss] + [w * g for g in [grad, mu, 0.5 * (lv.exp() - 1.0)] + grad_obs]
        if self.op == "kl_fwd_bwd" and self.variant == "free_bits":
            per_element = kl_terms.mean(0)  # K_k; the floored ones pass no gradient
            held = (per_element >= FREE_BITS).to(torch.float64)
            kl = torch.clamp(per_element, min=FREE_BITS).sum() * mu.shape[0]
            return [kl, mu * held, 0.5 * (lv.exp() - 1.0) * held]
        if self.op == "kl_fwd_bwd" and "prior_mu" in inp:
            pm, plv = inp["prior_mu"].double(), inp["prior_logvar"].double()
            inv_pvar = torch.exp(-plv)
            kl = 0.5 * (plv - lv + (lv.exp() + (mu - pm) ** 2) * inv_pvar - 1.0)
            g_mu = (mu - pm) * inv_pvar
            g_lv = 0.5 * (torch.exp(lv - plv) - 1.0)
            g_plv = 0.5 * (1.0 - (lv.exp() + (mu - pm) ** 2) * inv_pvar)
            return [kl.sum(), g_mu, g_lv, (-g_mu).sum_to_size(pm.shape),
                    g_plv.sum_to_size(plv.shape)]
        if self.op == "kl_fwd_bwd":
            return [kl_rows.sum(), mu, 0.5 * (lv.exp() - 1.0)]
        # reparameterization: the noise each implementation drew is recovered from its z.
        # z has no value reference (the noise is the implementation's own): its noise
        # must be N(0, 1) to 5 standard errors of its mean and std, and the gradients
        # below hold the backward to that same noise.
        z = got[0].double()
        eps = (z - mu) / torch.exp(0.5 * lv)
        n = eps.numel()
        mean_bound, std_bound = 5 / math.sqrt(n), 5 * math.sqrt(0.5 / n)
        mean, std = float(eps.mean()), float(eps.std())
        assert abs(mean) < mean_bound and abs(std - 1) < std_bound, \
            f"{self.id}: recovered noise of {n} draws has mean {mean:.4f} (bound {mean_bound:.4f}), " \
            f"std {std:.4f} (bound 1 +- {std_bound:.4f})"
        # and independent: of the inputs (noise made from mu, logvar or grad_z is N(0, 1)
        # too) and, with several samples, of each other (the same draw K times), to 5
        # standard errors of a correlation
        pairs = [(eps, t.expand(eps.shape), name)
                 for name, t in (("mu", mu), ("logvar", lv), ("grad_z", inp["grad_z"].double()))]
        if self.variant == "samples4":
            pairs += [(eps[k], eps[0], f"sample 0's noise (sample {k})") for k in range(1, len(eps))]
        for a, b, name in pairs:
            corr = _correlation(a, b)
            bound = 5 / math.sqrt(a.numel())
            assert abs(corr) < bound, \
                f"{self.id}: recovered noise correlates with {name}: {corr:+.4f} (bound {bound:.4f})"
        g_z = inp["grad_z"].double()
        grad_mu, grad_lv = g_z, 0.5 * g_z * (z - mu)
        if self.variant == "samples4":  # the samples' gradients add up
            grad_mu, grad_lv = grad_mu.sum(0), grad_lv.sum(0)
        out = [None]  # z: checked through its noise above
        if self.op == "reparam_kl_fwd_bwd":
            g_kl = inp["grad_kl"].double().reshape((-1,) + (1,) * (mu.dim() - 1))
            grad_mu = grad_mu + g_kl * mu
            grad_lv = grad_lv + g_kl * 0.5 * (lv.exp() - 1.0)
            out.append(kl_rows)
        return out + [grad_mu, grad_lv]

    def bytes_moved(self):
        """Bytes that must move: inputs read once, outputs and gradients written once."""
        if self.op == "train_step":
            return None
        item = self.dtype.itemsize
        latent = math.prod(self.size.latent_shape) * item
        if self.op.startswith("loss"):
            x = math.prod(self.size.x_shape) * item
            reads = 2 * x + 2 * latent
            writes = 0 if self.op == "loss_fwd" else x + 2 * latent
            return reads + writes
        if self.op == "kl_fwd_bwd":
            prior = 0
            if self.variant in ("prior_learned", "prior_per_sample"):  # read, gradient written
                shape = self.size.latent_shape[1:] if self.variant == "prior_learned" \
                    else self.size.latent_shape
                prior = 4 * math.prod(shape) * item
            return 4 * latent + prior
        # forward reads mu, logvar and writes z; backward reads grad_z, mu, logvar, writes
        # two grads (z and grad_z NUM_SAMPLES times as large for samples4)
        samples = NUM_SAMPLES if self.variant == "samples4" else 1
        return 6 * latent + 2 * samples * latent


def _loss_cases(sizes, dtypes, full_grid_size):
    out = []
    for size in sizes:
        for dtype in dtypes:
            for recon in RECONS:
                for reduction in ("sum", "none"):
                    full = size == full_grid_size
                    if reduction == "none" and not full:
                        continue
                    out.append(Case("loss_fwd_bwd", size, dtype, recon, reduction))
                    if full or dtype == torch.float32:
                        out.append(Case("loss_fwd", size, dtype, recon, reduction))
    # what the headline (a summed loss, loss.backward()) leaves out: the mean over the
    # batch, and AMP's scaled upstream gradient, both of which fastvae's gradients computed
    # in the forward must be scaled by (eager folds them into its backward)
    if full_grid_size in sizes:
        for recon in ("mse", "bce_logits"):
            out += [Case("loss_fwd_bwd", full_grid_size, dtype, recon, "batchmean")
                    for dtype in (torch.float32, torch.bfloat16)]
            out.append(Case("loss_fwd_bwd", full_grid_size, torch.float32, recon, "sum", "grad_scaled"))
    return out


def _likelihood_cases(sizes, dtypes):
    """Issue 15's likelihoods, forward+backward, summed: every loss size, float32 and bfloat16."""
    return [Case("loss_fwd_bwd", size, dtype, recon, "sum")
            for size in sizes for dtype in dtypes for recon in LIKELIHOODS]


def suite(device, full=True):
    """The cases for ``device``: issue 6's sizes when ``full``, else tiny CI sizes
    exercising the same code paths."""
    cuda = torch.device(device).type == "cuda"
    dtypes = [torch.float32, torch.bfloat16, torch.float16]  # every dtype, on every device
    S = SIZES
    if full:
        loss_sizes = [S["mnist_mlp"], S["cpu_target"], S["ldm"]] + ([S["gpu_target"]] if cuda else [])
        latent_sizes = [S["reparam"], S["ldm"]]
        train_sizes = [S["mnist_mlp"], S["conv64"]]
        grid = S["gpu_target"] if cuda else S["cpu_target"]
    else:
        loss_sizes, latent_sizes = [S["tiny_flat"], S["tiny_image"]], [S["tiny_reparam"], S["tiny_image"]]
        train_sizes = [S["tiny_mnist_mlp"], S["tiny_conv64"]]
        grid = S["tiny_flat"]
    cases = _loss_cases(loss_sizes, dtypes, grid)
    cases += _likelihood_cases(loss_sizes, dtypes[:2])
    for size in latent_sizes:
        for dtype in dtypes:
            cases += [Case(op, size, dtype)
                      for op in ("reparam_kl_fwd_bwd", "reparam_fwd_bwd", "kl_fwd_bwd")]
    cases += _kl_control_cases(latent_sizes, dtypes[:2])
    cases += [Case("train_step", size, torch.float32) for size in train_sizes]
    return cases


def _kl_control_cases(sizes, dtypes):
    """Issue 15's KL controls: a learned (d,) and a per-sample prior and free bits
    (kl_fwd_bwd), num_samples=4 (both reparameterizations), float32 and bfloat16."""
    out = []
    for size in sizes:
        for dtype in dtypes:
            out += [Case("kl_fwd_bwd", size, dtype, variant=v)
                    for v in ("prior_learned", "prior_per_sample", "free_bits")]
            out += [Case(op, size, dtype, variant="samples4")
                    for op in ("reparam_fwd_bwd", "reparam_kl_fwd_bwd")]
    return out


FIXED_COST_OPS = ("loss_fwd", "loss_fwd_bwd", "kl_fwd_bwd", "reparam_fwd_bwd", "reparam_kl_fwd_bwd")


def fixed_cost_suite(device):
    """The "fixed cost" group: sizes where the cost of the call itself (argument
    checks, dispatch, autograd bookkeeping) is most or all of the time, and eager's
    ~10 small ops set the bar. Same cases on every device (a GPU's host time per call
    shows there too)."""
    dtypes = (torch.float32, torch.bfloat16)
    out = []
    for size in (SIZES["fixed_tiny"], SIZES["mnist_mlp"]):
        for dtype in dtypes:
            for op in FIXED_COST_OPS:
                recon = "mse" if op.startswith("loss") else None
                out.append(Case(op, size, dtype, recon))
    return out


# ---- the memory system ---------------------------------------------------------

def copy_bandwidth(device, nbytes=None, repeats=20):
    """Median bytes/s of ``dst.copy_(src)``, counting the read and the write."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[2:])
