"""``VAELoss``: ``fastvae.vae_loss`` as an ``nn.Module``."""

import torch
from torch import Tensor

from fastvae import _validate
from fastvae.functional import LossParts, vae_loss


class VAELoss(torch.nn.Module):
    """Reconstruction + beta * KL loss; see ``fastvae.vae_loss`` for the options.

    ``beta`` may be a float or a 0-dim tensor; assign ``loss_fn.beta`` to
    follow a schedule (a tensor changes value without recompiling).
    ``obs_logvar`` (gaussian, laplace) may be an ``nn.Parameter``: it is then a
    parameter of this module, learned with the model; so may ``prior_mu`` /
    ``prior_logvar`` (a learned diagonal Gaussian prior, e.g. of shape (d,)).
    A plain tensor in any of the three is a buffer (a fixed part of the loss).
    """

    def __init__(self, *, recon: str = "mse", beta: float | Tensor = 1.0, reduction: str = "sum",
                 logvar_clamp: tuple[float, float] | None = None, return_parts: bool = False,
                 obs_logvar: float | Tensor | str | None = None, free_bits: float = 0.0,
                 prior_mu: Tensor | None = None, prior_logvar: Tensor | None = None) -> None:
        super().__init__()
        _validate.check_choice("recon", recon, _validate.RECONS)
        _validate.check_choice("reduction", reduction, _validate.REDUCTIONS)
        _validate.check_beta(beta)
        _validate.check_logvar_clamp(logvar_clamp)
        _validate.check_obs_logvar(obs_logvar, recon, None)
        self.free_bits = _validate.check_free_bits(free_bits, reduction)
        for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
            if prior is not None and not isinstance(prior, torch.Tensor):
                raise TypeError(f"{name} must be a tensor or None, got {type(prior).__name__}")
        self.recon, self.beta, self.reduction = recon, beta, reduction
        self.logvar_clamp, self.return_parts = logvar_clamp, return_parts
        for name, value in (("obs_logvar", obs_logvar), ("prior_mu", prior_mu),
                            ("prior_logvar", prior_logvar)):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                # a fixed tensor is module state: in the state dict, moved and cast with the module
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)  # (an nn.Parameter registers itself)

    def forward(self, x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor | LossParts:
        return vae_loss(x_hat, x, mu, logvar, recon=self.recon, beta=self.beta,
                        reduction=self.reduction, logvar_clamp=self.logvar_clamp,
                        return_parts=self.return_parts, obs_logvar=self.obs_logvar,
                        free_bits=self.free_bits, prior_mu=self.prior_mu,
                        prior_logvar=self.prior_logvar)

    def extra_repr(self) -> str:
        obs = "" if self.obs_logvar is None or isinstance(self.obs_logvar, torch.Tensor) \
            else f", obs_logvar={self.obs_logvar!r}"
        return (f"recon={self.recon!r}, beta={self.beta}, reduction={self.reduction!r}, "
                f"logvar_clamp={self.logvar_clamp}{obs}"
                + (f", free_bits={self.free_bits}" if self.free_bits else ""))
