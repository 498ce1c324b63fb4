"""🤗 diffusers on fastvae's posterior, with one call and no change to the training script.

    import fastvae.integrations.diffusers as fastvae_diffusers
    fastvae_diffusers.apply()     # every diffusers autoencoder now builds fastvae's posterior
    ...
    fastvae_diffusers.revert()    # back to diffusers' own DiagonalGaussianDistribution

``apply()`` replaces ``DiagonalGaussianDistribution`` in every imported diffusers
module that refers to it (``diffusers.models.autoencoders.vae``, where it is
defined, and the autoencoders that import it: AutoencoderKL, AsymmetricAutoencoderKL,
AutoencoderKLTemporalDecoder, ConsistencyDecoderVAE, the video and audio KL
autoencoders, ...). Their ``encode`` (with slicing and tiling) and
``forward(sample_posterior=True, generator=...)`` then build a
``FusedDiagonalGaussianDistribution``: fastvae's ``GaussianPosterior`` with
diffusers' conventions (``semantics="diffusers"``), still an instance of
diffusers' class. ``sample()`` draws the latent and its KL in one fused op, so the
usual ``posterior.sample()`` ... ``posterior.kl()`` pair costs one pass.

Posteriors with another parameterization (``OobleckDiagonalGaussianDistribution``:
softplus scale; ``MiniMaxH3AudioDiagonalGaussianDistribution``: mean and log std) are left alone.
"""

import sys

import torch

from fastvae import _validate
from fastvae.posterior import SEMANTICS, GaussianPosterior

try:
    from diffusers.models.autoencoders import vae as _diffusers_vae
except ImportError as e:
    raise ImportError(
        "fastvae.integrations.diffusers needs diffusers: pip install 'fastvae[diffusers]'") from e

__all__ = ["FusedDiagonalGaussianDistribution", "apply", "revert", "is_applied"]

_NAME = "DiagonalGaussianDistribution"
# diffusers' own class: what the module holds, unless a fastvae class patched in by an
# earlier import of this module (reloaded, e.g. by a notebook's autoreload) stands there
DiagonalGaussianDistribution = getattr(_diffusers_vae.DiagonalGaussianDistribution,
                                       "fastvae_replaces", _diffusers_vae.DiagonalGaussianDistribution)


def _is_fastvae_class(obj):
    """A FusedDiagonalGaussianDistribution, of this import of the module or an earlier one."""
    return getattr(obj, "fastvae_replaces", None) is DiagonalGaussianDistribution


class FusedDiagonalGaussianDistribution(GaussianPosterior, DiagonalGaussianDistribution):
    """diffusers' ``DiagonalGaussianDistribution(parameters, deterministic)`` on
    fastvae's fused ops: mean and logvar split along dim 1, logvar clamped to
    [-30, 20], results in the conventions of ``semantics`` (set by ``apply``)."""

    semantics_of_new = "diffusers"
    fastvae_replaces = DiagonalGaussianDistribution  # the class apply() stands in for

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        GaussianPosterior.__init__(self, parameters, dim=1, logvar_clamp=(-30.0, 20.0),
                                   deterministic=deterministic, semantics=self.semantics_of_new)

    def __setstate__(self, state):
        # a diffusers posterior pickled unpatched and loaded patched: pickle finds this class
        # under diffusers' name, but the state is diffusers' own (plain attributes)
        if "_mean" not in state:
            self.__class__ = DiagonalGaussianDistribution
        self.__dict__.update(state)


def _diffusers_modules():
    # a copy: looking modules up must not race an import that adds one
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "diffusers" or name.startswith("diffusers.")):
            yield module


def apply(*, semantics: str = "diffusers") -> None:
    """Make every diffusers model that builds a ``DiagonalGaussianDistribution``
    build a ``FusedDiagonalGaussianDistribution`` instead, including models
    already constructed. ``semantics="fastvae"`` gives fastvae's result
    conventions instead (float32 KL/NLL for half models, sums over every non-batch
    dim; see ``fastvae.posterior``). Calling it again only changes ``semantics``."""
    _validate.check_choice("semantics", semantics, SEMANTICS)
    FusedDiagonalGaussianDistribution.semantics_of_new = semantics
    for module in _diffusers_modules():
        # the module's own dict: getattr on diffusers' lazy modules would import things
        current = getattr(module, "__dict__", {}).get(_NAME)
        if current is DiagonalGaussianDistribution or _is_fastvae_class(current):
            setattr(module, _NAME, FusedDiagonalGaussianDistribution)


def revert() -> None:
    """Undo ``apply()``, also in diffusers modules imported since (they took the
    patched name from ``diffusers.models.autoencoders.vae``)."""
    for module in _diffusers_modules():
        if _is_fastvae_class(getattr(module, "__dict__", {}).get(_NAME)):
            setattr(module, _NAME, DiagonalGaussianDistribution)
    FusedDiagonalGaussianDistribution.semantics_of_new = "diffusers"


def is_applied() -> bool:
    return _is_fastvae_class(vars(_diffusers_vae).get(_NAME))
