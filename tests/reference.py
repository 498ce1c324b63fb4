"""Straight-from-the-math reference formulas for the tests, in float64.

Written independently of fastvae: elementwise textbook formulas, then sums.
"""

import math

import torch


def recon_elementwise(x_hat, x, recon, obs_logvar=None):
    """Per-element -log p(x | x_hat); ``obs_logvar`` (gaussian: log sigma^2, laplace:
    log b) a float, a tensor broadcastable to x, "optimal" or None (0)."""
    x_hat, x = x_hat.double(), x.double()
    if recon in ("gaussian", "laplace"):
        err = (x_hat - x) ** 2 if recon == "gaussian" else (x_hat - x).abs()
        if isinstance(obs_logvar, str):  # the maximum-likelihood scale of the batch
            s = math.log(err.mean().item())
        elif isinstance(obs_logvar, torch.Tensor):
            s = obs_logvar.double()
        else:
            s = 0.0 if obs_logvar is None else float(obs_logvar)
        s = torch.as_tensor(s, dtype=torch.float64)
        if recon == "gaussian":  # -log N(x; x_hat, sigma^2), sigma^2 = e^s
            var = torch.exp(s)
            return 0.5 * torch.log(2 * math.pi * var) + (x - x_hat) ** 2 / (2 * var)
        b = torch.exp(s)  # -log Laplace(x; x_hat, b) = log(2 b) + |x - x_hat| / b
        return torch.log(2 * b) + (x - x_hat).abs() / b
    if recon == "continuous_bernoulli":  # -log CB(x | lambda = sigmoid(l))
        # C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda); with 1 - 2 sigmoid(l) =
        # -tanh(l / 2) that is l / tanh(l / 2), 2 at l = 0 (float64 is exact enough
        # for it at every l; through lambda it would round to 1 for |l| > 37)
        safe = torch.where(x_hat == 0, torch.ones_like(x_hat), x_hat)
        norm = torch.where(x_hat == 0, torch.full_like(x_hat, 2.0), safe / torch.tanh(safe / 2))
        bce = x_hat.clamp(min=0) - x_hat * x + torch.log1p(torch.exp(-x_hat.abs()))
        return bce - torch.log(norm)
    if recon == "mse":
        return (x_hat - x) ** 2
    if recon == "l1":
        return (x_hat - x).abs()
    if recon == "bce":  # PyTorch clamps each log at -100
        log_p = torch.log(x_hat).clamp(min=-100)
        log_1mp = torch.log(1 - x_hat).clamp(min=-100)
        return -(x * log_p + (1 - x) * log_1mp)
    if recon == "bce_logits":  # log(1 + e^l) - l x, written stably
        return x_hat.clamp(min=0) - x_hat * x + torch.log1p(torch.exp(-x_hat.abs()))
    raise AssertionError(recon)


def kl_elementwise(mu, logvar, logvar_clamp=None):
    mu, logvar = mu.double(), logvar.double()
    if logvar_clamp is not None:
        logvar = logvar.clamp(*logvar_clamp)
    return -0.5 * (1 + logvar - mu**2 - torch.exp(logvar))


def per_sample(t):
    return t.reshape(t.shape[0], -1).sum(1)


def reduce(elementwise, reduction):
    n = elementwise.shape[0]
    if reduction == "sum":
        return elementwise.sum()
    if reduction == "batchmean":
        return elementwise.sum() / n
    if reduction == "mean":
        return elementwise.sum() / elementwise.numel()
    if reduction == "none":
        return per_sample(elementwise)
    raise AssertionError(reduction)


def vae_loss(x_hat, x, mu, logvar, recon, beta, reduction, logvar_clamp=None, obs_logvar=None):
    """(loss, recon, kl) in float64, each reduced as ``reduction`` says."""
    r = reduce(recon_elementwise(x_hat, x, recon, obs_logvar), reduction)
    k = reduce(kl_elementwise(mu, logvar, logvar_clamp), reduction)
    return r + float(beta) * k, r, k


def normal_cdf(v):
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


# ---- the sampling distribution of a standard normal sample's mean and std ----

NOISE_SAMPLES = 10**6  # enough that a noise scaled by 1.01 is more than 10 standard errors off


def standard_normal_bounds(n, standard_errors=5.0):
    """Bounds on |mean| and |std - 1| of n independent N(0, 1) draws: the sample
    mean has standard error 1 / sqrt(n); the sample std, asymptotically normal,
    has variance (kurtosis - 1) / (4 n) = 1 / (2 n) for a normal (kurtosis 3)."""
    return standard_errors / math.sqrt(n), standard_errors * math.sqrt(0.5 / n)


def assert_standard_normal(samples, min_samples=NOISE_SAMPLES):
    """Mean 0 and std 1 within 5 standard errors, on at least ``min_samples`` draws."""
    samples = samples.detach().double().flatten().cpu()
    n = samples.numel()
    assert n >= min_samples, f"{n} draws cannot resolve a 1% error in the noise scale"
    mean_bound, std_bound = standard_normal_bounds(n)
    mean, std = samples.mean().item(), samples.std().item()
    assert abs(mean) < mean_bound, f"mean {mean:.5f} of {n} draws, bound {mean_bound:.5f}"
    assert abs(std - 1.0) < std_bound, f"std {std:.5f} of {n} draws, bound 1 +- {std_bound:.5f}"


def kl_elementwise_prior(mu, logvar, prior_mu=None, prior_logvar=None, logvar_clamp=None):
    """KL(N(mu, e^lv) || N(pm, e^plv)) per element, the textbook formula
    log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2
    (pm, plv None: 0, the standard normal)."""
    mu, logvar = mu.double(), logvar.double()
    if logvar_clamp is not None:
        logvar = logvar.clamp(*logvar_clamp)
    pm = torch.zeros((), dtype=torch.float64) if prior_mu is None else prior_mu.double()
    plv = torch.zeros((), dtype=torch.float64) if prior_logvar is None else prior_logvar.double()
    var_q, var_p = torch.exp(logvar), torch.exp(plv)
    return 0.5 * (plv - logvar) + (var_q + (mu - pm) ** 2) / (2 * var_p) - 0.5


def kl_free_bits(elementwise, free_bits, reduction):
    """The free-bits KL term: K_k, the batch mean of latent element k's KL, floored at
    ``free_bits`` and summed over k (per sample: "batchmean"); "sum" is N times
    that, "mean" that divided by the number of latent elements per sample."""
    n = elementwise.shape[0]
    per_element = elementwise.reshape(n, -1).mean(0)
    floored = torch.maximum(per_element, torch.full_like(per_element, free_bits)).sum()
    if reduction == "batchmean":
        return floored
    if reduction == "sum":
        return n * floored
    if reduction == "mean":
        return floored / per_element.numel()
    raise AssertionError(reduction)
