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
    parameter of this module, learned with the model; a plain tensor is a buffer.
    """

    def __init__(self, *, recon: str = "mse", beta: float | Tensor = 1.0, reduction: str = "sum",
                 logvar_clamp: tuple[float, float] | None = None, return_parts: bool = False,
                 obs_logvar: float | Tensor | str | None = None) -> None:
        super().__init__()
        _validate.check_choice("recon", recon, _validate.RECONS)
        _validate.check_choice("reduction", reduction, _validate.REDUCTIONS)
        _validate.check_beta(beta)
        _validate.check_logvar_clamp(logvar_clamp)
        _validate.check_obs_logvar(obs_logvar, recon, None)
        self.recon, self.beta, self.reduction = recon, beta, reduction
        self.logvar_clamp, self.return_parts = logvar_clamp, return_parts
        if isinstance(obs_logvar, torch.Tensor) and not isinstance(obs_logvar, torch.nn.Parameter):
            # a fixed scale is module state: in the state dict, moved and cast with the module
            self.register_buffer("obs_logvar", obs_logvar)
        else:
            self.obs_logvar = obs_logvar  # (an nn.Parameter registers itself)

    def forward(self, x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor | LossParts:
        return vae_loss(x_hat, x, mu, logvar, recon=self.recon, beta=self.beta,
                        reduction=self.reduction, logvar_clamp=self.logvar_clamp,
                        return_parts=self.return_parts, obs_logvar=self.obs_logvar)

    def extra_repr(self):
        obs = "" if self.obs_logvar is None or isinstance(self.obs_logvar, torch.Tensor) \
            else f", obs_logvar={self.obs_logvar!r}"
        return (f"recon={self.recon!r}, beta={self.beta}, reduction={self.reduction!r}, "
                f"logvar_clamp={self.logvar_clamp}{obs}")
