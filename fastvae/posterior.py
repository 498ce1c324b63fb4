"""``GaussianPosterior``: the diagonal-Gaussian posterior of latent-diffusion
autoencoders, on fastvae's fused sampling and KL ops."""

import math

import torch

from fastvae import _validate
from fastvae.functional import kl_divergence, reparameterize

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianPosterior:
    """N(mean, exp(logvar)) with ``mean`` and ``logvar`` the two halves of
    ``parameters`` along ``dim``; logvar is clamped to ``logvar_clamp``.

    With ``deterministic=True`` the distribution collapses to its mean:
    ``std`` and ``var`` are zero, ``sample()`` returns the mean, and ``kl`` /
    ``nll`` are zeros. ``kl`` and ``nll`` are per sample (summed over every
    non-batch dim).
    """

    def __init__(self, parameters, dim=1, logvar_clamp=(-30.0, 20.0), deterministic=False):
        _validate.check_tensor("parameters", parameters)
        if parameters.dim() < 2:
            raise ValueError(
                f"parameters must have a batch dim and a dim to split, got shape {tuple(parameters.shape)}")
        if not -parameters.dim() <= dim < parameters.dim():
            raise ValueError(f"dim={dim} is out of range for parameters of shape {tuple(parameters.shape)}")
        if parameters.shape[dim] % 2:
            raise ValueError(
                f"parameters must have an even size along dim={dim} (mean and logvar), "
                f"got shape {tuple(parameters.shape)}")
        lo, hi = _validate.check_logvar_clamp(logvar_clamp)
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=dim)
        self.logvar = logvar if lo is None else logvar.clamp(lo, hi)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        if self.deterministic:
            return self.mean
        return reparameterize(self.mean, self.logvar, generator=generator)

    def mode(self):
        return self.mean

    def _zeros(self):
        return torch.zeros(self.mean.shape[0], device=self.mean.device,
                           dtype=torch.promote_types(self.mean.dtype, torch.float32))

    def kl(self, other=None):
        """KL(self || other) per sample; ``other`` defaults to N(0, I)."""
        if self.deterministic:
            return self._zeros()
        if other is None:
            return kl_divergence(self.mean, self.logvar, reduction="none")
        if not isinstance(other, GaussianPosterior):
            raise TypeError(f"other must be a GaussianPosterior or None, got {type(other).__name__}")
        _validate.check_same_shape("self.mean", self.mean, "other.mean", other.mean)
        if other.deterministic:
            raise ValueError("KL against a deterministic GaussianPosterior (zero variance) is infinite")
        m, lv, om, olv = (self._compute(t, other.mean) for t in
                          (self.mean, self.logvar, other.mean, other.logvar))
        terms = (m - om).pow(2) * torch.exp(-olv) + torch.exp(lv - olv) - 1.0 - lv + olv
        return 0.5 * terms.flatten(1).sum(1)

    def nll(self, sample):
        """-log N(sample; mean, var) per sample."""
        if self.deterministic:
            return self._zeros()
        _validate.check_tensor("sample", sample)
        _validate.check_same_shape("sample", sample, "mean", self.mean)
        x, m, lv = (self._compute(t) for t in (sample, self.mean, self.logvar))
        terms = _LOG_2PI + lv + (x - m).pow(2) * torch.exp(-lv)
        return 0.5 * terms.flatten(1).sum(1)

    def _compute(self, t, *others):
        """``t`` in the dtype the math runs in: float32, or float64 where any input is."""
        dtype = torch.promote_types(self.mean.dtype, torch.float32)
        for o in others:
            dtype = torch.promote_types(dtype, o.dtype)
        return t.to(dtype)
